//! GPT (decoder-only Transformer) language modelling: the model with its KV cache,
//! sampling, and the trainer.

pub mod model;
pub mod sample;
pub mod train;

pub use model::{Gpt, GptCache, GptConfig};
pub use sample::{SamplingConfig, generate};
pub use train::{EvalPoint, GptTrainConfig, estimate_loss, sample_batch, train, validation_loss};
