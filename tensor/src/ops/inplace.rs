//! In-place ops: the only ops that write into an existing buffer. They exist for the
//! places where a copy per step would be waste: assigning new values to a parameter and
//! the fused optimizer updates (`aigc_kernels::cpu::optim`). Every view of the buffer
//! sees the change.

use crate::{DType, Error, Result, Tensor, WithDType};
use aigc_kernels::FloatElem;
use aigc_kernels::cpu::{copy, optim};

pub use aigc_kernels::cpu::optim::{AdamStep, SgdStep};

impl Tensor {
    /// Writes `src` (broadcast to this tensor's shape, same dtype) into this tensor's
    /// elements, in place.
    pub fn assign_(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "assign_";
        self.same_dtype(src, OP)?;
        self.same_device(src, OP)?;
        let src = src.broadcast_to(self.shape())?;
        // Reading and writing the same buffer under one lock is impossible: copy first.
        let src = if src.shares_storage_with(self) { src.copy()? } else { src };
        let dst_layout = self.layout().clone();
        src.read_cpu(|s, sl| {
            self.write_cpu(|d, _| {
                crate::storage::zip_any!(OP, s, d, |a, b| copy::copy_into(a, sl, b, &dst_layout));
                Ok(())
            })
        })
    }

    /// Checks that the optimizer operands fit this parameter: same shape and dtype,
    /// contiguous, float, and no two sharing a buffer.
    fn check_update(&self, op: &'static str, others: &[&Tensor]) -> Result<()> {
        self.expect_float(op)?;
        for t in std::iter::once(self).chain(others.iter().copied()) {
            if t.dims() != self.dims() {
                return Err(Error::ShapeMismatch {
                    op,
                    lhs: self.shape(),
                    rhs: t.shape(),
                    reason: "gradient and optimizer state must have the parameter's shape".into(),
                });
            }
            self.same_dtype(t, op)?;
            self.same_device(t, op)?;
            if !t.is_contiguous() {
                return Err(Error::bad_shape(op, &t.shape(), "optimizer operands must be contiguous"));
            }
        }
        for (i, a) in others.iter().enumerate() {
            if a.shares_storage_with(self) || others[i + 1..].iter().any(|b| b.shares_storage_with(a)) {
                return Err(Error::invalid(op, "parameter, gradient and state must be separate buffers"));
            }
        }
        Ok(())
    }

    /// One fused SGD step on this parameter, in place; `buf` is the momentum buffer.
    pub fn sgd_step_(&self, grad: &Tensor, buf: &Tensor, step: SgdStep) -> Result<()> {
        self.check_update("sgd_step_", &[grad, buf])?;
        fn run<T: WithDType + FloatElem>(p: &Tensor, g: &Tensor, b: &Tensor, s: SgdStep) -> Result<()> {
            let (po, go, bo) = (p.layout().offset(), g.layout().offset(), b.layout().offset());
            let n = p.numel();
            p.write_cpu(|ps, _| {
                b.write_cpu(|bs, _| {
                    g.read_cpu(|gs, _| {
                        let (ps, bs, gs) = (typed_mut::<T>(ps), typed_mut::<T>(bs), typed::<T>(gs));
                        optim::sgd(&mut ps[po..po + n], &gs[go..go + n], &mut bs[bo..bo + n], s);
                        Ok(())
                    })
                })
            })
        }
        dispatch_float!(self.dtype(), "sgd_step_", run(self, grad, buf, step))
    }

    /// One fused Adam/AdamW step on this parameter, in place; `m`, `v` are the moments.
    pub fn adam_step_(&self, grad: &Tensor, m: &Tensor, v: &Tensor, step: AdamStep) -> Result<()> {
        self.check_update("adam_step_", &[grad, m, v])?;
        fn run<T: WithDType + FloatElem>(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamStep) -> Result<()> {
            let offs = [p, g, m, v].map(|t| t.layout().offset());
            let n = p.numel();
            p.write_cpu(|ps, _| {
                m.write_cpu(|ms, _| {
                    v.write_cpu(|vs, _| {
                        g.read_cpu(|gs, _| {
                            let (ps, ms, vs, gs) =
                                (typed_mut::<T>(ps), typed_mut::<T>(ms), typed_mut::<T>(vs), typed::<T>(gs));
                            optim::adam(
                                &mut ps[offs[0]..offs[0] + n],
                                &gs[offs[1]..offs[1] + n],
                                &mut ms[offs[2]..offs[2] + n],
                                &mut vs[offs[3]..offs[3] + n],
                                s,
                            );
                            Ok(())
                        })
                    })
                })
            })
        }
        dispatch_float!(self.dtype(), "adam_step_", run(self, grad, m, v, step))
    }
}

fn typed<T: WithDType>(s: &crate::storage::CpuStorage) -> &[T] {
    T::from_storage(s).expect("dtype checked before dispatch")
}
fn typed_mut<T: WithDType>(s: &mut crate::storage::CpuStorage) -> &mut [T] {
    T::from_storage_mut(s).expect("dtype checked before dispatch")
}

/// Calls the generic `run::<T>` for the float dtype `$dtype`.
macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, $name:ident($($arg:expr),*)) => {
        match $dtype {
            DType::F32 => $name::<f32>($($arg),*),
            DType::F64 => $name::<f64>($($arg),*),
            DType::F16 => $name::<half::f16>($($arg),*),
            DType::BF16 => $name::<half::bf16>($($arg),*),
            other => Err(Error::UnsupportedDType { op: $op, dtype: other, expected: "a float dtype (f32, f64, f16, bf16)" }),
        }
    };
}
use dispatch_float;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    #[test]
    fn assign_writes_through_every_view() {
        let dev = Device::Cpu;
        let x = Tensor::zeros([2, 3], DType::F32, &dev).unwrap();
        let row = x.narrow(0, 1, 1).unwrap();
        row.assign_(&Tensor::new(&[1.0f32, 2.0, 3.0], &dev).unwrap()).unwrap();
        assert_eq!(x.to_vec::<f32>().unwrap(), vec![0.0, 0.0, 0.0, 1.0, 2.0, 3.0]);
        // Assigning from another view of the same buffer works (the source is read first).
        x.narrow(0, 0, 1).unwrap().assign_(&row).unwrap();
        assert_eq!(x.to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]);
        x.assign_(&Tensor::scalar(5.0f32, &dev).unwrap()).unwrap();
        assert_eq!(x.to_vec::<f32>().unwrap(), vec![5.0; 6]);
        assert!(x.assign_(&Tensor::zeros([2, 3], DType::F64, &dev).unwrap()).is_err());
    }

    #[test]
    fn fused_adam_step_matches_the_kernel_and_checks_operands() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[1.0f32, -1.0], &dev).unwrap();
        let g = Tensor::new(&[0.5f32, -2.0], &dev).unwrap();
        let (m, v) = (p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let s = AdamStep { lr: 0.1, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, decoupled: true, t: 1 };
        p.adam_step_(&g, &m, &v, s).unwrap();
        let got = p.to_vec::<f32>().unwrap();
        assert!((got[0] - 0.9).abs() < 1e-6 && (got[1] + 0.9).abs() < 1e-6);
        assert!(p.adam_step_(&p, &m, &v, s).unwrap_err().to_string().contains("separate buffers"));
        let short = Tensor::zeros([1], DType::F32, &dev).unwrap();
        assert!(p.adam_step_(&short, &m, &v, s).unwrap_err().to_string().contains("parameter's shape"));
        let idx = Tensor::zeros([2], DType::I64, &dev).unwrap();
        assert!(
            idx.sgd_step_(
                &idx.copy().unwrap(),
                &idx.copy().unwrap(),
                SgdStep { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0, first: true }
            )
            .is_err()
        );
    }
}
