//! Batch normalisation (Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep
//! Network Training by Reducing Internal Covariate Shift", Algorithm 1 and 2), as
//! PyTorch's `nn.BatchNorm1d` / `nn.BatchNorm2d`.
//!
//! Each channel `c` is normalised over the batch and every spatial position:
//! `y = (x - mean_c) / sqrt(var_c + eps) * weight_c + bias_c`.
//!
//! - **Training** uses the statistics of the batch (the biased variance, Algorithm 1) and
//!   updates the running estimates `running = (1 - momentum) * running + momentum * batch`,
//!   with the *unbiased* variance `var * n / (n - 1)` for `running_var` (Algorithm 2's
//!   `m / (m - 1)` factor), and counts the batches in `num_batches_tracked`.
//! - **Evaluation** uses the running estimates, so the output of a sample does not depend
//!   on the rest of its batch. Without `track_running_stats` there are no running
//!   estimates and both modes use the batch's statistics.
//!
//! The normalisation is composed of differentiable `Var` ops (mean, variance,
//! broadcasting), so the gradient flows through the batch statistics too. The running
//! estimates are buffers of the [`VarStore`]: saved in the state dict, updated in place,
//! never trained.

use crate::{Init, Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{Error, Result, Tensor};

/// The options of a batch norm, PyTorch's defaults in [`Default`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchNormConfig {
    /// Added to the variance before the square root (default `1e-5`).
    pub eps: f64,
    /// The weight of the new batch in the running estimates (default `0.1`).
    pub momentum: f64,
    /// Learn a per-channel `weight` (ones) and `bias` (zeros) (default `true`).
    pub affine: bool,
    /// Keep running estimates for evaluation (default `true`).
    pub track_running_stats: bool,
}

impl Default for BatchNormConfig {
    fn default() -> Self {
        BatchNormConfig { eps: 1e-5, momentum: 0.1, affine: true, track_running_stats: true }
    }
}

/// The running estimates of a batch norm: buffers `[C]` (and a 0-d i64 count) that share
/// their storage with the store's state dict.
pub struct RunningStats {
    /// `running_mean`, starting at zeros.
    pub mean: Tensor,
    /// `running_var`, starting at ones.
    pub var: Tensor,
    /// `num_batches_tracked`: training batches seen so far.
    pub num_batches_tracked: Tensor,
}

/// Batch normalisation over `D` spatial dims; use [`BatchNorm1d`] or [`BatchNorm2d`].
pub struct BatchNorm<const D: usize> {
    /// The per-channel scale `[C]`, when affine.
    pub weight: Option<Var>,
    /// The per-channel shift `[C]`, when affine.
    pub bias: Option<Var>,
    /// The running estimates, when tracked.
    pub running: Option<RunningStats>,
    num_features: usize,
    config: BatchNormConfig,
    vs: VarStore,
}

/// Batch norm of `[N, C]` or `[N, C, L]`.
pub type BatchNorm1d = BatchNorm<1>;
/// Batch norm of `[N, C, H, W]`.
pub type BatchNorm2d = BatchNorm<2>;

impl<const D: usize> BatchNorm<D> {
    /// The layer's name in errors.
    const NAME: &'static str = match D {
        1 => "BatchNorm1d",
        2 => "BatchNorm2d",
        _ => "BatchNorm",
    };

    /// Batch norm of `num_features` channels with PyTorch's defaults.
    pub fn new(vs: &VarStore, num_features: usize) -> Result<Self> {
        Self::with_config(vs, num_features, BatchNormConfig::default())
    }

    /// Batch norm of `num_features` channels with the given options. The store also says
    /// at each forward whether the layer is training.
    pub fn with_config(vs: &VarStore, num_features: usize, config: BatchNormConfig) -> Result<Self> {
        let (weight, bias) = if config.affine {
            (
                Some(vs.param("weight", [num_features], Init::Const(1.0))?),
                Some(vs.param("bias", [num_features], Init::Const(0.0))?),
            )
        } else {
            (None, None)
        };
        let running = config.track_running_stats.then(|| RunningStats::register(vs, num_features)).transpose()?;
        Ok(BatchNorm { weight, bias, running, num_features, config, vs: vs.clone() })
    }

    /// Checks the input's rank (`[N, C]` or `[N, C, L]` for 1-d, `[N, C, H, W]` for 2-d)
    /// and channels.
    fn check_input(&self, x: &Var) -> Result<()> {
        let ranks: &[usize] = if D == 1 { &[2, 3] } else { &[D + 2] };
        let c = self.num_features;
        if !ranks.contains(&x.rank()) || x.dims()[1] != c {
            let expected = match D {
                1 => format!("[N, {c}] or [N, {c}, L]"),
                2 => format!("[N, {c}, H, W]"),
                _ => format!("[N, {c}, ..] with {D} spatial dims"),
            };
            return Err(Error::bad_shape(Self::NAME, &x.shape(), format!("expected {expected}")));
        }
        Ok(())
    }

    /// The mean and biased variance of each channel over the batch and positions
    /// (`[1, C, 1, ..]`), and in training the update of the running estimates.
    fn batch_statistics(&self, x: &Var) -> Result<(Var, Var)> {
        let reduced: Vec<isize> = (0..x.rank() as isize).filter(|&d| d != 1).collect();
        let count = x.numel() / self.num_features;
        let training = self.vs.is_training();
        if training && count <= 1 {
            return Err(Error::bad_shape(
                Self::NAME,
                &x.shape(),
                "expected more than 1 value per channel when training",
            ));
        }
        let mean = x.mean(&reduced, true)?;
        let var = x.var(&reduced, true, 0)?;
        if let (true, Some(running)) = (training, &self.running) {
            let per_channel = |v: &Var| v.value().reshape([self.num_features]);
            running.update(&per_channel(&mean)?, &per_channel(&var)?, count, self.config.momentum)?;
        }
        Ok((mean, var))
    }
}

impl RunningStats {
    /// Registers the buffers `running_mean`, `running_var` and `num_batches_tracked`.
    fn register(vs: &VarStore, num_features: usize) -> Result<RunningStats> {
        let (dtype, device) = (vs.dtype(), vs.device());
        Ok(RunningStats {
            mean: vs.buffer("running_mean", Tensor::zeros([num_features], dtype, &device)?)?,
            var: vs.buffer("running_var", Tensor::ones([num_features], dtype, &device)?)?,
            num_batches_tracked: vs.buffer("num_batches_tracked", Tensor::scalar(0i64, &device)?)?,
        })
    }

    /// Moves the estimates towards a batch's `mean` and biased `var` (`[C]`), computed
    /// from `count` values per channel, in place.
    fn update(&self, mean: &Tensor, var: &Tensor, count: usize, momentum: f64) -> Result<()> {
        let unbiased = var.affine(count as f64 / (count - 1) as f64, 0.0)?;
        let blend = |running: &Tensor, batch: &Tensor| -> Result<()> {
            running.assign_(&running.affine(1.0 - momentum, 0.0)?.add(&batch.affine(momentum, 0.0)?)?)
        };
        blend(&self.mean, mean)?;
        blend(&self.var, &unbiased)?;
        let batches = self.num_batches_tracked.to_scalar::<i64>()?;
        self.num_batches_tracked.assign_(&Tensor::scalar(batches + 1, &self.num_batches_tracked.device())?)
    }
}

impl<const D: usize> Module for BatchNorm<D> {
    fn forward(&self, x: &Var) -> Result<Var> {
        self.check_input(x)?;
        let c = self.num_features;
        // Per-channel values broadcast against x as [1, C, 1, ..].
        let mut channel_view = vec![1; x.rank()];
        channel_view[1] = c;
        let (mean, var) = match &self.running {
            Some(running) if !self.vs.is_training() => (
                Var::constant(running.mean.reshape(&channel_view)?),
                Var::constant(running.var.reshape(&channel_view)?),
            ),
            _ => self.batch_statistics(x)?,
        };
        let normalized = x.sub(&mean)?.mul(&var.affine(1.0, self.config.eps)?.rsqrt()?)?;
        match (&self.weight, &self.bias) {
            (Some(weight), Some(bias)) => {
                normalized.mul(&weight.reshape(&channel_view)?)?.add(&bias.reshape(&channel_view)?)
            }
            _ => Ok(normalized),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{Fixture, LAYERS_TOL, Tol, assert_close};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{DType, Device};

    /// Two training steps then one evaluation, each compared with PyTorch: outputs,
    /// gradients of the input and parameters, and the running estimates after each step.
    fn check_against_pytorch<const D: usize>(case: &str) {
        let fx = Fixture::layers();
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let num_features = fx.get(&format!("{case}.weight")).dims()[0];
        let bn = BatchNorm::<D>::new(&vs.pp(case), num_features).unwrap();
        fx.load_params(&vs, "");
        for step in ["step1", "step2"] {
            let key = |name: &str| format!("{case}.{step}.{name}");
            vs.zero_grad();
            let x = Var::leaf(fx.get(&key("x")));
            let out = bn.forward(&x).unwrap();
            fx.assert_matches(out.value(), &key("out"), LAYERS_TOL);
            out.mul(&Var::constant(fx.get(&key("proj")))).unwrap().sum_all().unwrap().backward().unwrap();
            fx.assert_matches(&x.grad().unwrap(), &key("x.grad"), LAYERS_TOL);
            fx.assert_grads(&vs.pp(case), |param| key(&format!("{param}.grad")), LAYERS_TOL);
            let running = bn.running.as_ref().unwrap();
            fx.assert_matches(&running.mean, &key("running_mean"), LAYERS_TOL);
            fx.assert_matches(&running.var, &key("running_var"), LAYERS_TOL);
            fx.assert_matches(&running.num_batches_tracked, &key("num_batches_tracked"), LAYERS_TOL);
        }
        vs.set_training(false);
        let out = bn.forward(&Var::constant(fx.get(&format!("{case}.eval.x")))).unwrap();
        fx.assert_matches(out.value(), &format!("{case}.eval.out"), LAYERS_TOL);
    }

    #[test]
    fn batch_norm1d_matches_pytorch_in_training_and_eval() {
        check_against_pytorch::<1>("batch_norm1d");
        check_against_pytorch::<1>("batch_norm1d_flat");
    }

    #[test]
    fn batch_norm2d_matches_pytorch_in_training_and_eval() {
        check_against_pytorch::<2>("batch_norm2d");
    }

    #[test]
    fn state_dict_names_follow_pytorch() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        BatchNorm2d::new(&vs.pp("bn"), 3).unwrap();
        let params: Vec<String> = vs.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(params, ["bn.weight", "bn.bias"]);
        let buffers: Vec<(String, Vec<usize>)> =
            vs.named_buffers().into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
        let want = [("bn.running_mean", vec![3]), ("bn.running_var", vec![3]), ("bn.num_batches_tracked", vec![])];
        assert_eq!(buffers, want.map(|(n, d)| (n.to_string(), d)));
    }

    #[test]
    fn without_running_stats_both_modes_use_the_batch_and_track_nothing() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let config = BatchNormConfig { track_running_stats: false, affine: false, ..Default::default() };
        let bn = BatchNorm1d::with_config(&vs, 2, config).unwrap();
        assert!(vs.named_buffers().is_empty() && vs.named_parameters().is_empty());
        // Channel 0 holds 1 and 3 (mean 2, variance 1), channel 1 holds 10 and 30 (mean 20, variance 100).
        let x = Var::constant(Tensor::from_vec(vec![1.0f64, 10.0, 3.0, 30.0], [2, 2], &Device::Cpu).unwrap());
        let (s0, s1) = ((1.0 + 1e-5f64).sqrt(), (100.0 + 1e-5f64).sqrt());
        let want = [-1.0 / s0, -10.0 / s1, 1.0 / s0, 10.0 / s1];
        for training in [true, false] {
            vs.set_training(training);
            let got = bn.forward(&x).unwrap().value().to_vec::<f64>().unwrap();
            assert_close(&got, &want, Tol::abs(1e-12), &format!("training {training}"));
        }
    }

    #[test]
    fn gradients_flow_through_the_batch_statistics() {
        let vs = VarStore::new(DType::F64, &Device::Cpu, 0);
        let bn = BatchNorm2d::new(&vs, 2).unwrap();
        bn.weight.as_ref().unwrap().value().assign_(&Tensor::new(&[0.5f64, -2.0], &Device::Cpu).unwrap()).unwrap();
        let x = Tensor::normal([2, 2, 2, 3], 0.5, 2.0, DType::F64, &Device::Cpu, 4).unwrap();
        gradcheck(|v| bn.forward(&v[0]), &[&x], "BatchNorm2d training").unwrap();
        vs.set_training(false);
        gradcheck(|v| bn.forward(&v[0]), &[&x], "BatchNorm2d eval").unwrap();
    }

    #[test]
    fn bad_inputs_are_errors_naming_the_layer() {
        let vs = VarStore::new(DType::F32, &Device::Cpu, 0);
        let x = |dims: &[usize]| Var::constant(Tensor::ones(dims, DType::F32, &Device::Cpu).unwrap());
        let bn1 = BatchNorm1d::new(&vs.pp("bn1"), 3).unwrap();
        let err = bn1.forward(&x(&[2, 4, 5])).unwrap_err().to_string();
        assert_eq!(err, "BatchNorm1d: input of shape [2, 4, 5]: expected [N, 3] or [N, 3, L]");
        let err = bn1.forward(&x(&[1, 3])).unwrap_err().to_string();
        assert_eq!(err, "BatchNorm1d: input of shape [1, 3]: expected more than 1 value per channel when training");
        let bn2 = BatchNorm2d::new(&vs.pp("bn2"), 3).unwrap();
        let err = bn2.forward(&x(&[2, 3, 4])).unwrap_err().to_string();
        assert_eq!(err, "BatchNorm2d: input of shape [2, 3, 4]: expected [N, 3, H, W]");
        vs.set_training(false);
        assert!(bn1.forward(&x(&[1, 3])).is_ok(), "one sample is fine in eval mode");
    }
}
