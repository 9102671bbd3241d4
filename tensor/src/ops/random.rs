//! Random tensors from a seed. Element `i` of a draw is a pure function of `(seed, i)`
//! (see `aigc_kernels::cpu::random`), so the same seed gives the same tensor on every
//! run and every thread count. Use a different seed for each draw you want independent.

use crate::storage::CpuStorage;
use crate::{DType, Device, Error, Result, Shape, Tensor};
use aigc_kernels::cpu::random;

fn float_storage(op: &'static str, dtype: DType, n: usize, draw: impl Fn(usize) -> Vec<f64>) -> Result<CpuStorage> {
    // Draw in f64, then round once into the target dtype.
    let v = draw(n);
    Ok(match dtype {
        DType::F64 => CpuStorage::F64(v),
        DType::F32 => CpuStorage::F32(v.into_iter().map(|x| x as f32).collect()),
        DType::F16 => CpuStorage::F16(v.into_iter().map(half::f16::from_f64).collect()),
        DType::BF16 => CpuStorage::BF16(v.into_iter().map(half::bf16::from_f64).collect()),
        other => {
            return Err(Error::UnsupportedDType { op, dtype: other, expected: "a float dtype (f32, f64, f16, bf16)" });
        }
    })
}

impl Tensor {
    /// Standard normal f32 samples.
    pub fn randn(shape: impl Into<Shape>, device: &Device, seed: u64) -> Result<Tensor> {
        Tensor::normal(shape, 0.0, 1.0, DType::F32, device, seed)
    }

    /// Uniform f32 samples in `[0, 1)`.
    pub fn rand(shape: impl Into<Shape>, device: &Device, seed: u64) -> Result<Tensor> {
        Tensor::uniform(shape, 0.0, 1.0, DType::F32, device, seed)
    }

    /// Normal samples with the given mean and standard deviation, in `dtype`.
    pub fn normal(
        shape: impl Into<Shape>,
        mean: f64,
        std: f64,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Tensor> {
        let shape = shape.into();
        device.check_available()?;
        if !(std >= 0.0 && std.is_finite() && mean.is_finite()) {
            return Err(Error::invalid("normal", format!("mean {mean}, std {std}: need finite values and std >= 0")));
        }
        let s = float_storage("normal", dtype, shape.numel(), |n| random::normal::<f64>(n, seed, mean, std))?;
        Ok(Tensor::from_cpu(s, shape.dims()))
    }

    /// Uniform samples in `[lo, hi)`, in `dtype`.
    pub fn uniform(
        shape: impl Into<Shape>,
        lo: f64,
        hi: f64,
        dtype: DType,
        device: &Device,
        seed: u64,
    ) -> Result<Tensor> {
        let shape = shape.into();
        device.check_available()?;
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(Error::invalid("uniform", format!("interval [{lo}, {hi}): need finite lo <= hi")));
        }
        let s = float_storage("uniform", dtype, shape.numel(), |n| random::uniform::<f64>(n, seed, lo, hi))?;
        Ok(Tensor::from_cpu(s, shape.dims()))
    }

    /// Standard normal samples with this tensor's shape, dtype and device.
    pub fn randn_like(&self, seed: u64) -> Result<Tensor> {
        Tensor::normal(self.shape(), 0.0, 1.0, self.dtype(), &self.device(), seed)
    }

    /// Uniform `[0, 1)` samples with this tensor's shape, dtype and device.
    pub fn rand_like(&self, seed: u64) -> Result<Tensor> {
        Tensor::uniform(self.shape(), 0.0, 1.0, self.dtype(), &self.device(), seed)
    }

    /// i64 integers uniform in `[lo, hi)`.
    pub fn randint(lo: i64, hi: i64, shape: impl Into<Shape>, device: &Device, seed: u64) -> Result<Tensor> {
        let shape = shape.into();
        device.check_available()?;
        if hi <= lo {
            return Err(Error::invalid("randint", format!("range [{lo}, {hi}) is empty: need lo < hi")));
        }
        Ok(Tensor::from_cpu(CpuStorage::I64(random::randint(shape.numel(), seed, lo, hi)), shape.dims()))
    }

    /// A random permutation of `0..n` as i64 (for shuffling a data set).
    pub fn randperm(n: usize, device: &Device, seed: u64) -> Result<Tensor> {
        device.check_available()?;
        Ok(Tensor::from_cpu(CpuStorage::I64(random::permutation(n, seed)), &[n]))
    }

    /// 1 with probability `self` (elementwise, each in `[0, 1]`), else 0, in this dtype.
    pub fn bernoulli(&self, seed: u64) -> Result<Tensor> {
        self.expect_float("bernoulli")?;
        let p = self.to_f64_vec()?;
        if let Some(bad) = p.iter().find(|v| !(0.0..=1.0).contains(*v)) {
            return Err(Error::invalid("bernoulli", format!("probability {bad} is outside [0, 1]")));
        }
        let u = random::uniform::<f64>(p.len(), seed, 0.0, 1.0);
        let draws: Vec<f64> = u.iter().zip(&p).map(|(u, p)| (u < p) as u8 as f64).collect();
        Tensor::from_vec(draws, self.shape(), &self.device())?.to_dtype(self.dtype())
    }

    /// Inverted dropout: zeroes each element with probability `p` and scales the rest by
    /// `1 / (1 - p)`, so the expectation is unchanged (Srivastava et al. 2014).
    pub fn dropout(&self, p: f64, seed: u64) -> Result<Tensor> {
        self.expect_float("dropout")?;
        if !(0.0..1.0).contains(&p) {
            return Err(Error::invalid("dropout", format!("p = {p}: need 0 <= p < 1")));
        }
        if p == 0.0 {
            return Ok(self.clone());
        }
        let keep = Tensor::uniform(self.shape(), 0.0, 1.0, self.dtype(), &self.device(), seed)?.ge(p)?;
        keep.where_cond(&self.affine(1.0 / (1.0 - p), 0.0)?, 0.0)
    }
}

#[cfg(test)]
mod tests {
    use crate::{DType, Device, Tensor};

    #[test]
    fn same_seed_same_tensor_any_dtype() {
        let dev = Device::Cpu;
        let a = Tensor::randn([3, 4], &dev, 42).unwrap();
        let b = Tensor::randn([3, 4], &dev, 42).unwrap();
        assert_eq!(a.to_vec::<f32>().unwrap(), b.to_vec::<f32>().unwrap());
        assert_ne!(a.to_vec::<f32>().unwrap(), Tensor::randn([3, 4], &dev, 43).unwrap().to_vec::<f32>().unwrap());
        let h = Tensor::normal([3, 4], 0.0, 1.0, DType::BF16, &dev, 42).unwrap();
        let close = h.to_f64_vec().unwrap().iter().zip(a.to_f64_vec().unwrap()).all(|(x, y)| (x - y).abs() < 0.02);
        assert!(close);
    }

    #[test]
    fn normal_and_uniform_have_the_requested_moments() {
        let dev = Device::Cpu;
        let x = Tensor::normal([100_000], 3.0, 2.0, DType::F64, &dev, 1).unwrap();
        let mean = x.mean_all().unwrap().to_scalar::<f64>().unwrap();
        let std = x.var(&[], false, 1).unwrap().to_scalar::<f64>().unwrap().sqrt();
        assert!((mean - 3.0).abs() < 0.03 && (std - 2.0).abs() < 0.03, "mean {mean} std {std}");
        let u = Tensor::uniform([100_000], -2.0, 2.0, DType::F32, &dev, 2).unwrap();
        assert!(u.min_all().unwrap().to_scalar::<f32>().unwrap() >= -2.0);
        assert!(u.max_all().unwrap().to_scalar::<f32>().unwrap() < 2.0);
        assert!(u.mean_all().unwrap().to_scalar::<f32>().unwrap().abs() < 0.03);
    }

    #[test]
    fn bernoulli_and_dropout_keep_the_expectation() {
        let dev = Device::Cpu;
        let p = Tensor::full(0.3, [50_000], DType::F32, &dev).unwrap();
        let b = p.bernoulli(5).unwrap();
        let rate = b.mean_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((rate - 0.3).abs() < 0.01, "rate {rate}");
        let x = Tensor::ones([50_000], DType::F32, &dev).unwrap();
        let d = x.dropout(0.25, 9).unwrap();
        assert!((d.mean_all().unwrap().to_scalar::<f32>().unwrap() - 1.0).abs() < 0.02);
        let kept = d.to_vec::<f32>().unwrap();
        assert!(kept.iter().all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6));
    }

    #[test]
    fn randint_and_randperm_cover_their_range() {
        let dev = Device::Cpu;
        let r = Tensor::randint(0, 10, [1000], &dev, 3).unwrap();
        assert_eq!(r.dtype(), DType::I64);
        assert_eq!(r.min_all().unwrap().to_scalar::<i64>().unwrap(), 0);
        assert_eq!(r.max_all().unwrap().to_scalar::<i64>().unwrap(), 9);
        let mut p = Tensor::randperm(20, &dev, 4).unwrap().to_vec::<i64>().unwrap();
        p.sort();
        assert_eq!(p, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn bad_random_arguments_are_errors() {
        let dev = Device::Cpu;
        assert!(Tensor::randint(5, 5, [2], &dev, 0).unwrap_err().to_string().contains("empty"));
        assert!(Tensor::uniform([2], 1.0, 0.0, DType::F32, &dev, 0).is_err());
        assert!(Tensor::normal([2], 0.0, -1.0, DType::F32, &dev, 0).is_err());
        assert!(Tensor::normal([2], 0.0, 1.0, DType::I64, &dev, 0).unwrap_err().to_string().contains("i64"));
        let x = Tensor::ones([2], DType::F32, &dev).unwrap();
        assert!(x.dropout(1.0, 0).is_err());
        assert!((&x * 2.0).unwrap().bernoulli(0).unwrap_err().to_string().contains("outside [0, 1]"));
        assert!(Tensor::randn([2], &Device::Cuda(0), 0).unwrap_err().to_string().contains("cuda:0"));
    }
}
