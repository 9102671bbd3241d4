//! # aigc-trainers
//!
//! One module per generative family (GAN, VAE, flows, diffusion, score models, GPT,
//! BERT, encoder-decoder, ViT, CLIP, RNN/LSTM/GRU). Built in the family issues; it
//! exposes nothing yet.
