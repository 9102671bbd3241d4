//! # aigc-nn
//!
//! Neural-network building blocks on `aigc-autograd`:
//! - [`VarStore`]: parameters under hierarchical names, seeded initialisation, train/eval mode.
//! - [`Module`], [`Sequential`]: a model is a struct whose `forward` maps `Var` to `Var`.
//! - layers: [`Linear`], convolutions, embeddings, norms, dropout, attention, Transformer
//!   blocks, recurrent cells, UNet parts, position and timestep embeddings.
//! - [`loss`]: MSE, L1, BCE, cross-entropy, NLL, Gaussian KL and NLL.
//! - [`optim`]: SGD, Adam, AdamW, RMSprop (fused in-place updates), schedulers, EMA, clipping.
//! - serialization: safetensors state dicts and atomic training checkpoints.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod activation;
pub mod attention;
pub mod batch_norm;
pub mod checkpoint;
pub mod conv;
pub mod dropout;
pub mod embedding;
pub mod init;
pub mod linear;
pub mod loss;
pub mod module;
pub mod norm;
pub mod optim;
pub mod position;
pub mod rnn;
pub mod safetensors_io;
pub mod state_dict;
#[cfg(test)]
pub(crate) mod testing;
pub mod transformer;
pub mod unet;
pub mod var_store;

pub use activation::{GELU, LeakyReLU, ReLU, SiLU, Sigmoid, Softplus, Tanh};
pub use attention::{AttentionMask, KvCache, MultiheadAttention, MultiheadAttentionConfig};
pub use batch_norm::{BatchNorm, BatchNorm1d, BatchNorm2d, BatchNormConfig, RunningStats};
pub use checkpoint::Checkpoint;
pub use conv::{Conv1d, Conv1dConfig, Conv2d, Conv2dConfig, ConvConfig, ConvTranspose2d, ConvTranspose2dConfig};
pub use dropout::Dropout;
pub use embedding::Embedding;
pub use init::FanMode;
pub use linear::Linear;
pub use loss::CrossEntropyOptions;
pub use module::{Activation, Module, Sequential};
pub use norm::{GroupNorm, LayerNorm, LayerNormConfig, RmsNorm};
pub use optim::{
    Adam, AdamConfig, AdamW, Ema, IntoParamGroups, LrSchedule, Optimizer, ParamGroup, RmsProp, RmsPropConfig, Sgd,
    SgdConfig, WarmupCosine, clip_grad_norm,
};
pub use position::{LearnedPositionEmbedding, TimestepEmbedding, sinusoidal_position_embedding, timestep_embedding};
pub use rnn::{Gru, GruCell, Lstm, LstmCell, LstmState, Nonlinearity, Rnn, RnnCell, RnnConfig};
pub use safetensors_io::{from_safetensors_bytes, load_safetensors, save_safetensors, to_safetensors_bytes};
pub use state_dict::{LoadReport, load_state_dict, load_state_dict_file, save_state_dict, state_dict};
pub use transformer::{
    FeedForward, FeedForwardActivation, TransformerDecoder, TransformerDecoderLayer, TransformerEncoder,
    TransformerEncoderLayer, TransformerLayerConfig,
};
pub use unet::{AttentionBlock, AttentionBlockConfig, Downsample, ResBlock, ResBlockConfig, Upsample};
pub use var_store::{Init, VarStore};
