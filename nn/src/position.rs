//! Position and timestep embeddings: how a model that sees a set learns an order, and how
//! a diffusion model learns which noise level it is denoising.
//!
//! - [`sinusoidal_position_embedding`]: the fixed encoding of Vaswani et al. 2017,
//!   "Attention Is All You Need", §3.5:
//!   `PE(pos, 2i) = sin(pos / 10000^(2i/d))`, `PE(pos, 2i+1) = cos(pos / 10000^(2i/d))`.
//! - [`LearnedPositionEmbedding`]: a trained `[max_len, dim]` table (GPT, BERT, ViT).
//! - [`timestep_embedding`]: the same sinusoids for a diffusion timestep, in the layout of
//!   guided-diffusion's `timestep_embedding` (Ho et al. 2020; Nichol & Dhariwal 2021):
//!   all cosines, then all sines, with frequencies `max_period^(-i/half)`.
//! - [`TimestepEmbedding`]: the MLP the UNet puts on top (`linear_1 -> SiLU -> linear_2`,
//!   diffusers' names).

use crate::{Init, Linear, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Device, Error, Result, Tensor, UnaryOp};

/// The sinusoidal position encodings of positions `0..len`, `[len, dim]`: column `2i` is
/// `sin(pos / 10000^(2i/dim))` and column `2i+1` the cosine of the same angle. (An odd
/// `dim` ends with a sine column.)
pub fn sinusoidal_position_embedding(len: usize, dim: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let mut table = Vec::with_capacity(len * dim);
    for pos in 0..len {
        for column in 0..dim {
            let pair = (column / 2) as f64;
            let angle = pos as f64 / 10000f64.powf(2.0 * pair / dim as f64);
            table.push(if column % 2 == 0 { angle.sin() } else { angle.cos() });
        }
    }
    Tensor::from_vec(table, [len, dim], device)?.to_dtype(dtype)
}

/// A learned table of position embeddings, `weight [max_len, dim]`: PyTorch's
/// `nn.Embedding(max_len, dim)` used for positions (GPT-2's `wpe`), initialised as its
/// default, `N(0, 1)`. Models that want another scale (nanoGPT: `N(0, 0.02)`) re-assign it.
pub struct LearnedPositionEmbedding {
    /// The table, one row per position.
    pub weight: Var,
}

impl LearnedPositionEmbedding {
    /// A table for positions `0..max_len`.
    pub fn new(vs: &VarStore, max_len: usize, dim: usize) -> Result<LearnedPositionEmbedding> {
        let weight = vs.param("weight", [max_len, dim], Init::Normal { mean: 0.0, std: 1.0 })?;
        Ok(LearnedPositionEmbedding { weight })
    }

    /// The most positions the table holds.
    pub fn max_len(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The embeddings of positions `start..start + len`, `[len, dim]` (a start past 0
    /// continues a sequence, as in cached decoding).
    pub fn positions(&self, start: usize, len: usize) -> Result<Var> {
        if start + len > self.max_len() {
            let reason = format!("positions {start}..{} exceed max_len {}", start + len, self.max_len());
            return Err(Error::invalid("LearnedPositionEmbedding", reason));
        }
        self.weight.narrow(0, start, len)
    }
}

impl Module for LearnedPositionEmbedding {
    /// `x [..., L, dim]` plus the embeddings of positions `0..L`.
    fn forward(&self, x: &Var) -> Result<Var> {
        let dim = self.weight.dims()[1];
        match x.dims() {
            &[.., len, d] if d == dim => x.add(&self.positions(0, len)?),
            _ => Err(Error::bad_shape("LearnedPositionEmbedding", &x.shape(), format!("expected [..., L, {dim}]"))),
        }
    }
}

/// Sinusoidal embeddings `[N, dim]` of the timesteps `t [N]` (any real values, any
/// dtype; computed and returned in f64 for f64 timesteps, else f32), as guided-diffusion:
/// with `half = dim / 2` frequencies `f_i = max_period^(-i / half)`, the embedding is
/// `[cos(t f_0), ..., cos(t f_{half-1}), sin(t f_0), ..., sin(t f_{half-1})]`, and an
/// odd `dim` gets a last column of zeros. (diffusers' `get_timestep_embedding` with
/// `flip_sin_to_cos=True, downscale_freq_shift=0` is the same.) `max_period` is
/// 10000 in DDPM.
pub fn timestep_embedding(t: &Tensor, dim: usize, max_period: f64) -> Result<Tensor> {
    let t = match t.dims() {
        &[_] => t.clone(),
        _ => return Err(Error::bad_shape("timestep_embedding", &t.shape(), "timesteps must be a vector [N]")),
    };
    let t = t.to_dtype(if t.dtype() == DType::F64 { DType::F64 } else { DType::F32 })?;
    let half = dim / 2;
    let frequencies: Vec<f64> = (0..half).map(|i| (-max_period.ln() * i as f64 / half as f64).exp()).collect();
    let frequencies = Tensor::from_vec(frequencies, [1, half], &t.device())?.to_dtype(t.dtype())?;
    let angles = t.unsqueeze(1)?.mul(&frequencies)?;
    let mut columns = vec![angles.cos()?, angles.sin()?];
    if dim % 2 == 1 {
        columns.push(Tensor::zeros([t.dims()[0], 1], t.dtype(), &t.device())?);
    }
    Tensor::cat(&columns.iter().collect::<Vec<_>>(), 1)
}

/// The timestep MLP of a diffusion UNet (diffusers' `TimestepEmbedding`):
/// `linear_2(SiLU(linear_1(emb)))`, mapping a sinusoidal embedding to the width the
/// residual blocks read.
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    /// `in_dim -> time_embed_dim -> time_embed_dim`.
    pub fn new(vs: &VarStore, in_dim: usize, time_embed_dim: usize) -> Result<TimestepEmbedding> {
        Ok(TimestepEmbedding {
            linear_1: Linear::new(&vs.pp("linear_1"), in_dim, time_embed_dim)?,
            linear_2: Linear::new(&vs.pp("linear_2"), time_embed_dim, time_embed_dim)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, emb: &Var) -> Result<Var> {
        self.linear_2.forward(&self.linear_1.forward_with(emb, UnaryOp::Silu)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, Tol};

    #[test]
    fn sinusoidal_encoding_follows_the_paper() {
        let pe = sinusoidal_position_embedding(50, 6, DType::F64, &Device::Cpu).unwrap().to_vec2::<f64>().unwrap();
        assert_eq!((pe.len(), pe[0].len()), (50, 6));
        assert_eq!(pe[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0], "position 0: sin 0 = 0, cos 0 = 1");
        let angle = 7.0 / 10000f64.powf(2.0 * 2.0 / 6.0); // position 7, pair i = 2
        assert!((pe[7][4] - angle.sin()).abs() < 1e-15 && (pe[7][5] - angle.cos()).abs() < 1e-15);
        assert!((pe[33][0] - 33f64.sin()).abs() < 1e-15, "pair 0 has wavelength 2 pi");
        let odd = sinusoidal_position_embedding(3, 5, DType::F32, &Device::Cpu).unwrap();
        assert_eq!((odd.dims(), odd.dtype()), (&[3, 5][..], DType::F32));
        // PE(pos + k) is a linear function of PE(pos): each pair rotates by a fixed angle.
        let (k, w) = (5.0, 1.0 / 10000f64.powf(2.0 / 6.0));
        let (s, c) = (pe[10][2], pe[10][3]);
        let rotated = (s * (k * w).cos() + c * (k * w).sin(), c * (k * w).cos() - s * (k * w).sin());
        assert!((rotated.0 - pe[15][2]).abs() < 1e-12 && (rotated.1 - pe[15][3]).abs() < 1e-12);
    }

    #[test]
    fn learned_positions_are_a_named_table_with_a_length_limit() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let wpe = LearnedPositionEmbedding::new(&vs.pp("wpe"), 8, 4).unwrap();
        assert_eq!(vs.named_parameters()[0].0, "wpe.weight");
        let table = wpe.weight.value().to_vec::<f32>().unwrap();
        let std = (table.iter().map(|v| v * v).sum::<f32>() / 32.0).sqrt();
        assert!(std > 0.6 && std < 1.5, "N(0, 1) as nn.Embedding, got std {std}");
        let x = Var::constant(Tensor::zeros([2, 3, 4], DType::F32, &Device::Cpu).unwrap());
        let y = wpe.forward(&x).unwrap();
        assert_eq!(y.value().narrow(0, 1, 1).unwrap().to_vec::<f32>().unwrap(), table[..12].to_vec());
        assert_eq!(wpe.positions(5, 3).unwrap().value().to_vec::<f32>().unwrap(), table[20..].to_vec());
        let err = wpe.positions(6, 3).err().unwrap().to_string();
        assert!(err.contains("LearnedPositionEmbedding: positions 6..9 exceed max_len 8"), "{err}");
        let err = wpe.forward(&Var::constant(Tensor::zeros([9, 4], DType::F32, &Device::Cpu).unwrap())).err().unwrap();
        assert!(err.to_string().contains("exceed max_len 8"));
        y.sum_all().unwrap().backward().unwrap();
        let grad = wpe.weight.grad().unwrap().to_vec::<f32>().unwrap();
        assert_eq!((grad[0], grad[11], grad[12]), (2.0, 2.0, 0.0), "only rows 0..3 are used, twice each");
    }

    #[test]
    fn timestep_embedding_matches_guided_diffusion() {
        let fx = Fixture::attention();
        let t = fx.get("timestep.t");
        fx.assert_matches(&timestep_embedding(&t, 8, 10000.0).unwrap(), "timestep.emb8", Tol::abs(1e-12));
        fx.assert_matches(&timestep_embedding(&t, 7, 100.0).unwrap(), "timestep.emb7", Tol::abs(1e-12));
        let ints = Tensor::new(&[0i64, 1, 17, 999], &Device::Cpu).unwrap();
        let from_ints = timestep_embedding(&ints, 8, 10000.0).unwrap();
        assert_eq!(from_ints.dtype(), DType::F32);
        fx.assert_matches(&from_ints, "timestep.emb8", Tol::abs(1e-4));
        let err = timestep_embedding(&ints.reshape([2, 2]).unwrap(), 8, 10000.0).unwrap_err().to_string();
        assert!(err.contains("timestep_embedding: input of shape [2, 2]: timesteps must be a vector [N]"), "{err}");
    }

    #[test]
    fn timestep_mlp_matches_diffusers_names_and_values() {
        let fx = Fixture::attention();
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let mlp = TimestepEmbedding::new(&vs, 8, 12).unwrap();
        let names: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"]);
        fx.load_params(&vs, "time_mlp");
        let emb = timestep_embedding(&fx.get("timestep.t"), 8, 10000.0).unwrap();
        let out = mlp.forward(&Var::constant(emb)).unwrap();
        fx.assert_matches(out.value(), "time_mlp.out", Tol::abs(1e-12));
    }
}
