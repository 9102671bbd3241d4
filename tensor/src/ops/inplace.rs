//! In-place ops: the only ops that write into an existing buffer. They exist for the
//! places where a copy per step would be waste: assigning new values to a parameter, the
//! fused optimizer updates (`aigc_kernels::cpu::optim`: SGD, Adam/AdamW, RMSprop) and the
//! parameter EMA (`lerp_`), and gradient accumulation (`add_`). Every view of the
//! buffer sees the change.

use crate::storage::CpuStorage;
use crate::{DType, Error, Result, Tensor, WithDType};
use aigc_kernels::FloatElem;
use aigc_kernels::Layout;
use aigc_kernels::cpu::{copy, optim};

pub use aigc_kernels::cpu::optim::{AdamStep, RmsPropStep, SgdStep};

impl Tensor {
    /// Writes `src` (broadcast to this tensor's shape, same dtype) into this tensor's
    /// elements, in place.
    pub fn assign_(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "assign_";
        self.write_from(OP, src, |s, sl, d, dl| {
            crate::storage::zip_any!(OP, s, d, |a, b| copy::copy_into(a, sl, b, dl));
            Ok(())
        })
    }

    /// Adds `src` (broadcast to this tensor's shape, same dtype) to this tensor's
    /// elements, in place (`+=`; the autograd tape accumulates gradients with it).
    pub fn add_(&self, src: &Tensor) -> Result<()> {
        const OP: &str = "add_";
        self.expect_float(OP)?;
        self.write_from(OP, src, |s, sl, d, dl| {
            use crate::storage::CpuStorage::{BF16, F16, F32, F64};
            match (s, d) {
                (F32(a), F32(b)) => copy::add_into(a, sl, b, dl),
                (F64(a), F64(b)) => copy::add_into(a, sl, b, dl),
                (F16(a), F16(b)) => copy::add_into(a, sl, b, dl),
                (BF16(a), BF16(b)) => copy::add_into(a, sl, b, dl),
                _ => unreachable!("checked above: one float dtype"),
            }
            Ok(())
        })
    }

    /// Runs `write(src buffer, src layout, this buffer, this layout)` with `src` checked
    /// against this tensor and broadcast to its shape.
    fn write_from(
        &self,
        op: &'static str,
        src: &Tensor,
        write: impl FnOnce(&CpuStorage, &Layout, &mut CpuStorage, &Layout) -> Result<()>,
    ) -> Result<()> {
        self.same_dtype(src, op)?;
        self.same_device(src, op)?;
        let src = src.broadcast_to(self.shape())?;
        // Reading and writing the same buffer under one lock is impossible: copy first.
        let src = if src.shares_storage_with(self) { src.copy()? } else { src };
        let dst_layout = self.layout().clone();
        src.read_cpu(|s, sl| self.write_cpu(|d, _| write(s, sl, d, &dst_layout)))
    }

    /// Whether no other tensor shares this tensor's buffer: writing into it in place
    /// then changes nothing anyone else can see.
    pub fn is_sole_owner(&self) -> bool {
        self.holds_buffer_alone()
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

    /// One fused SGD step on this parameter, in place; `buf` is the momentum buffer, needed
    /// exactly when `step.momentum` is non-zero.
    pub fn sgd_step_(&self, grad: &Tensor, buf: Option<&Tensor>, step: SgdStep) -> Result<()> {
        const OP: &str = "sgd_step_";
        check_momentum_buffer(OP, step.momentum, buf)?;
        let operands: Vec<&Tensor> = std::iter::once(grad).chain(buf).collect();
        self.check_update(OP, &operands)?;
        fn run<T: WithDType + FloatElem>(p: &Tensor, g: &Tensor, b: Option<&Tensor>, s: SgdStep) -> Result<()> {
            write_slice(p, |p| {
                write_optional_slice(b, |b| {
                    read_slice(g, |g| {
                        optim::sgd::<T>(p, g, b, s);
                        Ok(())
                    })
                })
            })
        }
        dispatch_float!(self.dtype(), OP, run(self, grad, buf, step))
    }

    /// One fused Adam/AdamW step on this parameter, in place; `m`, `v` are the moments.
    pub fn adam_step_(&self, grad: &Tensor, m: &Tensor, v: &Tensor, step: AdamStep) -> Result<()> {
        self.check_update("adam_step_", &[grad, m, v])?;
        fn run<T: WithDType + FloatElem>(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamStep) -> Result<()> {
            write_slice(p, |p| {
                write_slice(m, |m| {
                    write_slice(v, |v| {
                        read_slice(g, |g| {
                            optim::adam::<T>(p, g, m, v, s);
                            Ok(())
                        })
                    })
                })
            })
        }
        dispatch_float!(self.dtype(), "adam_step_", run(self, grad, m, v, step))
    }

    /// One fused RMSprop step on this parameter, in place. `square_avg` is the running
    /// mean of squared gradients; `grad_avg` (the running mean of gradients) makes it the
    /// centered variant; `momentum_buf` is needed exactly when `step.momentum` is non-zero.
    pub fn rmsprop_step_(
        &self,
        grad: &Tensor,
        square_avg: &Tensor,
        grad_avg: Option<&Tensor>,
        momentum_buf: Option<&Tensor>,
        step: RmsPropStep,
    ) -> Result<()> {
        const OP: &str = "rmsprop_step_";
        check_momentum_buffer(OP, step.momentum, momentum_buf)?;
        let mut operands = vec![grad, square_avg];
        operands.extend(grad_avg.into_iter().chain(momentum_buf));
        self.check_update(OP, &operands)?;
        fn run<T: WithDType + FloatElem>(
            p: &Tensor,
            g: &Tensor,
            sq: &Tensor,
            ga: Option<&Tensor>,
            mb: Option<&Tensor>,
            s: RmsPropStep,
        ) -> Result<()> {
            write_slice(p, |p| {
                write_slice(sq, |square_avg| {
                    write_optional_slice(ga, |grad_avg| {
                        write_optional_slice(mb, |momentum_buf| {
                            read_slice(g, |g| {
                                let state = optim::RmsPropBuffers { square_avg, grad_avg, momentum_buf };
                                optim::rmsprop::<T>(p, g, state, s);
                                Ok(())
                            })
                        })
                    })
                })
            })
        }
        dispatch_float!(self.dtype(), OP, run(self, grad, square_avg, grad_avg, momentum_buf, step))
    }

    /// `self += weight * (end - self)`, in place (`torch.Tensor.lerp_`): the exponential
    /// moving average update `ema = decay * ema + (1 - decay) * x` is `ema.lerp_(x, 1 - decay)`.
    /// `end` must have this tensor's shape and dtype; both must be contiguous.
    pub fn lerp_(&self, end: &Tensor, weight: f64) -> Result<()> {
        self.check_update("lerp_", &[end])?;
        fn run<T: WithDType + FloatElem>(a: &Tensor, b: &Tensor, w: f64) -> Result<()> {
            write_slice(a, |a| {
                read_slice(b, |b| {
                    optim::lerp::<T>(a, b, w);
                    Ok(())
                })
            })
        }
        dispatch_float!(self.dtype(), "lerp_", run(self, end, weight))
    }
}

/// A momentum buffer must be given exactly when the momentum is non-zero.
fn check_momentum_buffer(op: &'static str, momentum: f64, buf: Option<&Tensor>) -> Result<()> {
    if (momentum != 0.0) != buf.is_some() {
        return Err(Error::invalid(op, "a momentum buffer is needed exactly when the momentum is non-zero"));
    }
    Ok(())
}

/// Runs `f` on the elements of a contiguous tensor, read-only.
fn read_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (offset, n) = (t.layout().offset(), t.numel());
    t.read_cpu(|s, _| f(&typed::<T>(s)[offset..offset + n]))
}

/// Runs `f` on the elements of a contiguous tensor, writable.
fn write_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&mut [T]) -> Result<R>) -> Result<R> {
    let (offset, n) = (t.layout().offset(), t.numel());
    t.write_cpu(|s, _| f(&mut typed_mut::<T>(s)[offset..offset + n]))
}

/// [`write_slice`] for an operand that may be absent.
fn write_optional_slice<T: WithDType, R>(
    t: Option<&Tensor>,
    f: impl FnOnce(Option<&mut [T]>) -> Result<R>,
) -> Result<R> {
    match t {
        Some(t) => write_slice(t, |s| f(Some(s))),
        None => f(None),
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
                None,
                SgdStep { lr: 0.1, momentum: 0.0, nesterov: false, weight_decay: 0.0, first: true }
            )
            .is_err()
        );
    }

    #[test]
    fn fused_rmsprop_step_matches_the_kernel_and_checks_its_buffers() {
        let dev = Device::Cpu;
        let p = Tensor::new(&[1.0f64, -1.0], &dev).unwrap();
        let g = Tensor::new(&[2.0f64, -2.0], &dev).unwrap();
        let (sq, ga, mb) = (p.zeros_like().unwrap(), p.zeros_like().unwrap(), p.zeros_like().unwrap());
        let s = RmsPropStep { lr: 0.1, alpha: 0.9, eps: 0.0, weight_decay: 0.0, momentum: 0.5 };
        p.rmsprop_step_(&g, &sq, Some(&ga), Some(&mb), s).unwrap();
        // centered: variance 0.4 - 0.04 = 0.36; b = 2 / 0.6; p -= 0.1 b.
        let got = p.to_vec::<f64>().unwrap();
        assert!((got[0] - (1.0 - 0.1 * 2.0 / 0.6)).abs() < 1e-15 && (got[1] + got[0]).abs() < 1e-15, "{got:?}");
        assert_eq!(mb.to_vec::<f64>().unwrap()[0], 2.0 / 0.6);
        let err = p.rmsprop_step_(&g, &sq, None, None, s).unwrap_err().to_string();
        assert!(err.contains("momentum buffer is needed exactly when"), "{err}");
        let err = p.rmsprop_step_(&g, &sq, Some(&sq), Some(&mb), s).unwrap_err().to_string();
        assert!(err.contains("separate buffers"), "{err}");
    }

    #[test]
    fn add_accumulates_into_views_with_broadcast_and_knows_its_owners() {
        let dev = Device::Cpu;
        let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3], &dev).unwrap();
        assert!(x.is_sole_owner());
        let t = x.t().unwrap(); // [3, 2], sharing x's buffer
        assert!(!x.is_sole_owner());
        t.add_(&Tensor::new(&[10.0f32, 20.0], &dev).unwrap()).unwrap(); // a row broadcast down t
        assert_eq!(x.to_vec::<f32>().unwrap(), vec![11.0, 12.0, 13.0, 24.0, 25.0, 26.0]);
        x.add_(&x).unwrap(); // from its own buffer: read first
        assert_eq!(x.to_vec::<f32>().unwrap(), vec![22.0, 24.0, 26.0, 48.0, 50.0, 52.0]);
        drop(t);
        assert!(x.is_sole_owner());
        let handle = x.clone(); // the same tensor, not a view: it holds the buffer too
        assert!(!x.is_sole_owner() && !handle.is_sole_owner());
        drop(handle);
        assert!(x.is_sole_owner());
        let h = Tensor::from_slice(&[1.5f64, -2.0], [2], &dev).unwrap().to_dtype(DType::BF16).unwrap();
        h.add_(&h.ones_like().unwrap()).unwrap();
        assert_eq!(h.to_dtype(DType::F64).unwrap().to_vec::<f64>().unwrap(), vec![2.5, -1.0]);
        assert!(x.add_(&Tensor::zeros([2, 3], DType::F64, &dev).unwrap()).is_err());
        assert!(x.add_(&Tensor::zeros([2], DType::F32, &dev).unwrap()).is_err());
        let i = Tensor::from_slice(&[1i64], [1], &dev).unwrap();
        assert!(i.add_(&i).is_err());
    }

    #[test]
    fn lerp_updates_in_place_and_rejects_mismatched_operands() {
        let dev = Device::Cpu;
        let ema = Tensor::new(&[0.0f32, 10.0], &dev).unwrap();
        ema.lerp_(&Tensor::new(&[1.0f32, 0.0], &dev).unwrap(), 0.1).unwrap();
        assert_eq!(ema.to_vec::<f32>().unwrap(), vec![0.1, 9.0]);
        let err = ema.lerp_(&Tensor::zeros([3], DType::F32, &dev).unwrap(), 0.1).unwrap_err().to_string();
        assert!(err.contains("parameter's shape"), "{err}");
        assert!(ema.lerp_(&Tensor::zeros([2], DType::F64, &dev).unwrap(), 0.1).is_err());
    }
}
