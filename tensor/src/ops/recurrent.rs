//! Recurrent layers over whole sequences, forward and backward through time, each in one
//! call: the checks and the dtype dispatch of [`aigc_kernels::cpu::recurrent`], where
//! the method and the cell equations are described.
//!
//! Shapes are time-major, with `G` the cell's gate count and `S` its state parts
//! ([`RecurrentCell::gates`], [`RecurrentCell::state_parts`]): the input projections
//! `x_gates [steps, batch, G * hidden]` (each step's `x_t W_ih^T + b_ih`), `weight_hh
//! [G * hidden, hidden]`, `bias_hh [G * hidden]` and the initial state `state0 [batch,
//! S * hidden]` (the LSTM's `h` then `c` on each row).

use crate::{DType, Error, Result, Tensor, WithDType};
use aigc_kernels::cpu::recurrent::{self, SequenceDims};
use half::{bf16, f16};

pub use aigc_kernels::cpu::recurrent::Cell as RecurrentCell;

const OP: &str = "recurrent_sequence";

/// What the forward computes.
#[derive(Clone)]
pub struct RecurrentStates {
    /// Every step's state, `[steps, batch, S * hidden]`.
    pub states: Tensor,
    /// Every step's hidden projection `h_{t-1} W_hh^T + b_hh`, `[steps, batch, G * hidden]`,
    /// kept for the backward.
    pub hidden_gates: Tensor,
}

/// The gradients of the forward's inputs.
pub struct RecurrentGrads {
    pub x_gates: Tensor,
    pub weight_hh: Tensor,
    /// The gradient a `bias_hh` would get (given whether or not the forward had one).
    pub bias_hh: Tensor,
    pub state0: Tensor,
}

impl Tensor {
    /// Runs `cell` over the sequence whose input projections are `x_gates` (see the module
    /// doc for the shapes), from `state0`.
    pub fn recurrent_sequence(
        cell: RecurrentCell,
        x_gates: &Tensor,
        weight_hh: &Tensor,
        bias_hh: Option<&Tensor>,
        state0: &Tensor,
    ) -> Result<RecurrentStates> {
        let dims = check_inputs(cell, x_gates, weight_hh, bias_hh, state0)?;
        let mut inputs = vec![x_gates, weight_hh, state0];
        inputs.extend(bias_hh);
        let [states, hidden_gates] = dispatch!(x_gates.dtype(), |T| {
            Tensor::read_contiguous::<T, _>(&inputs, OP, |s| {
                let f = recurrent::sequence_forward(cell, dims, s[0], s[1], s.get(3).copied(), s[2]);
                [T::into_storage(f.states), T::into_storage(f.hidden_gates)]
            })?
        });
        let (gh, sh) = (cell.gates() * dims.hidden, cell.state_parts() * dims.hidden);
        Ok(RecurrentStates {
            states: Tensor::from_cpu(states, &[dims.steps, dims.batch, sh]),
            hidden_gates: Tensor::from_cpu(hidden_gates, &[dims.steps, dims.batch, gh]),
        })
    }

    /// The gradients of [`Tensor::recurrent_sequence`]'s inputs, given its result
    /// `forward` and the gradient `d_states` of the states.
    pub fn recurrent_sequence_backward(
        cell: RecurrentCell,
        x_gates: &Tensor,
        weight_hh: &Tensor,
        state0: &Tensor,
        forward: &RecurrentStates,
        d_states: &Tensor,
    ) -> Result<RecurrentGrads> {
        let dims = check_inputs(cell, x_gates, weight_hh, None, state0)?;
        let (sh, gh) = (cell.state_parts() * dims.hidden, cell.gates() * dims.hidden);
        for (name, t, width) in
            [("d_states", d_states, sh), ("states", &forward.states, sh), ("hidden_gates", &forward.hidden_gates, gh)]
        {
            let want = [dims.steps, dims.batch, width];
            if t.dims() != want {
                return Err(Error::bad_shape(OP, &t.shape(), format!("{name}: expected {want:?}")));
            }
            x_gates.same_dtype(t, OP)?;
            x_gates.same_device(t, OP)?;
        }
        let inputs = [x_gates, weight_hh, state0, &forward.states, &forward.hidden_gates, d_states];
        let [dx, dw, db, ds] = dispatch!(x_gates.dtype(), |T| {
            Tensor::read_contiguous::<T, _>(&inputs, OP, |s| {
                let g = recurrent::sequence_backward(cell, dims, s[0], s[1], s[2], [s[3], s[4]], s[5]);
                [g.x_gates, g.weight_hh, g.bias_hh, g.state0].map(T::into_storage)
            })?
        });
        Ok(RecurrentGrads {
            x_gates: Tensor::from_cpu(dx, x_gates.dims()),
            weight_hh: Tensor::from_cpu(dw, &[gh, dims.hidden]),
            bias_hh: Tensor::from_cpu(db, &[gh]),
            state0: Tensor::from_cpu(ds, state0.dims()),
        })
    }
}

/// `$body` with the type alias `T` set to the element type of the float dtype `$dtype`.
macro_rules! dispatch {
    ($dtype:expr, |$t:ident| $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F64 => {
                type $t = f64;
                $body
            }
            DType::F16 => {
                type $t = f16;
                $body
            }
            DType::BF16 => {
                type $t = bf16;
                $body
            }
            other => {
                return Err(Error::UnsupportedDType {
                    op: OP,
                    dtype: other,
                    expected: "a float dtype (f32, f64, f16, bf16)",
                });
            }
        }
    };
}
use dispatch;

/// Checks the shapes, dtypes and devices of the inputs; returns the sizes.
fn check_inputs(
    cell: RecurrentCell,
    x_gates: &Tensor,
    weight_hh: &Tensor,
    bias_hh: Option<&Tensor>,
    state0: &Tensor,
) -> Result<SequenceDims> {
    x_gates.expect_float(OP)?;
    let (g, s) = (cell.gates(), cell.state_parts());
    if weight_hh.rank() != 2 || weight_hh.dims()[0] != g * weight_hh.dims()[1] || weight_hh.dims()[1] == 0 {
        return Err(Error::bad_shape(
            OP,
            &weight_hh.shape(),
            format!("weight_hh: expected [{g} * hidden, hidden] for a {cell:?} cell"),
        ));
    }
    let hidden = weight_hh.dims()[1];
    if x_gates.rank() != 3 || x_gates.dims()[2] != g * hidden || x_gates.dims()[0] == 0 {
        return Err(Error::bad_shape(
            OP,
            &x_gates.shape(),
            format!("x_gates: expected [steps >= 1, batch, {}] (time-major, {g} gates of {hidden})", g * hidden),
        ));
    }
    let (steps, batch) = (x_gates.dims()[0], x_gates.dims()[1]);
    if state0.dims() != [batch, s * hidden] {
        return Err(Error::bad_shape(OP, &state0.shape(), format!("state0: expected [{batch}, {}]", s * hidden)));
    }
    if let Some(b) = bias_hh
        && b.dims() != [g * hidden]
    {
        return Err(Error::bad_shape(OP, &b.shape(), format!("bias_hh: expected [{}]", g * hidden)));
    }
    for t in [weight_hh, state0].into_iter().chain(bias_hh) {
        x_gates.same_dtype(t, OP)?;
        x_gates.same_device(t, OP)?;
    }
    Ok(SequenceDims { steps, batch, hidden })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Device;

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        Tensor::uniform(shape, -1.0, 1.0, DType::F64, &Device::Cpu, seed).unwrap()
    }

    #[test]
    fn f32_and_bf16_follow_f64_and_a_strided_input_equals_its_copy() {
        for cell in [RecurrentCell::RnnTanh, RecurrentCell::Lstm, RecurrentCell::Gru] {
            let (g, s, h) = (cell.gates(), cell.state_parts(), 6);
            // x_gates seen through a transpose: batch-major storage read time-major.
            let x = rand(&[3, 5, g * h], 1).permute(&[1, 0, 2]).unwrap();
            let (w, b, s0) = (rand(&[g * h, h], 2), rand(&[g * h], 3), rand(&[3, s * h], 4));
            let want = Tensor::recurrent_sequence(cell, &x.copy().unwrap(), &w, Some(&b), &s0).unwrap();
            let got = Tensor::recurrent_sequence(cell, &x, &w, Some(&b), &s0).unwrap();
            assert_eq!(got.states.to_vec::<f64>().unwrap(), want.states.to_vec::<f64>().unwrap());
            let want = want.states.to_vec::<f64>().unwrap();
            for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 0.05)] {
                let c = |t: &Tensor| t.to_dtype(dtype).unwrap();
                let got = Tensor::recurrent_sequence(cell, &c(&x), &c(&w), Some(&c(&b)), &c(&s0)).unwrap();
                let got = got.states.to_f64_vec().unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() <= tol, "{cell:?} {dtype:?}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn bad_shapes_and_dtypes_are_clear_errors() {
        let cell = RecurrentCell::Lstm;
        let (x, w, s0) = (rand(&[2, 3, 8], 1), rand(&[8, 2], 2), rand(&[3, 4], 3));
        assert!(Tensor::recurrent_sequence(cell, &x, &w, None, &s0).is_ok());
        let err = |r: Result<RecurrentStates>| r.err().expect("should fail").to_string();
        let e = err(Tensor::recurrent_sequence(cell, &x, &rand(&[6, 2], 2), None, &s0));
        assert!(e.contains("weight_hh: expected [4 * hidden, hidden]"), "{e}");
        let e = err(Tensor::recurrent_sequence(cell, &rand(&[2, 3, 6], 1), &w, None, &s0));
        assert!(e.contains("x_gates: expected [steps >= 1, batch, 8]"), "{e}");
        let e = err(Tensor::recurrent_sequence(cell, &x, &w, None, &rand(&[3, 2], 3)));
        assert!(e.contains("state0: expected [3, 4]"), "{e}");
        let e = err(Tensor::recurrent_sequence(cell, &x, &w, Some(&rand(&[4], 4)), &s0));
        assert!(e.contains("bias_hh: expected [8]"), "{e}");
        let e = err(Tensor::recurrent_sequence(cell, &x, &w.to_dtype(DType::F32).unwrap(), None, &s0));
        assert!(e.contains("f32") || e.contains("F32"), "{e}");
        let ints = Tensor::zeros([2, 3, 8], DType::I64, &Device::Cpu).unwrap();
        let e = err(Tensor::recurrent_sequence(cell, &ints, &w, None, &s0));
        assert!(e.contains("float"), "{e}");
    }
}
