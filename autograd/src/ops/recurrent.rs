//! Differentiable recurrent layers over whole sequences: the Elman RNN, the LSTM and the
//! GRU run through time in one op ([`Tensor::recurrent_sequence`], where the method is
//! described), and differentiated through time in one call
//! ([`Tensor::recurrent_sequence_backward`]), as cuDNN's RNN primitive.
//!
//! Plain gradients (no `create_graph`, the training-step case) come from that fused
//! backward. With `create_graph` the rule recomputes the sequence from differentiable
//! ops (`composed_sequence`, the same equations step by step) and differentiates that,
//! so that gradients of gradients flow; the recomputation is also the reference the
//! fused op is tested against.

use crate::tape::partial_grads;
use crate::{Var, mode};
use aigc_tensor::{RecurrentCell, RecurrentStates, Result, Tensor};

const OP: &str = "recurrent_sequence";

impl Var {
    /// Runs `cell` over a time-major sequence and returns every step's state,
    /// `[steps, batch, S * hidden]` (`S = 2` for the LSTM, whose rows hold `h` then `c`;
    /// else 1). `x_gates [steps, batch, G * hidden]` holds each step's input projection
    /// `x_t W_ih^T + b_ih`; `weight_hh [G * hidden, hidden]`, `bias_hh [G * hidden]`;
    /// `state0 [batch, S * hidden]` is the state before the first step.
    pub fn recurrent_sequence(
        cell: RecurrentCell,
        x_gates: &Var,
        weight_hh: &Var,
        bias_hh: Option<&Var>,
        state0: &Var,
    ) -> Result<Var> {
        let forward = Tensor::recurrent_sequence(
            cell,
            x_gates.value(),
            weight_hh.value(),
            bias_hh.map(Var::value),
            state0.value(),
        )?;
        let hidden_gates = forward.hidden_gates;
        let mut inputs = vec![x_gates.clone(), weight_hh.clone(), state0.clone()];
        inputs.extend(bias_hh.cloned());
        let rule = move |out: &Var, g: &Var, xs: &[Var]| -> Result<Vec<Option<Var>>> {
            if mode::is_grad_enabled() {
                let recomputed = composed_sequence(cell, xs)?;
                let grads = partial_grads(&[&recomputed], &[g], &xs.iter().collect::<Vec<_>>())?;
                return Ok(grads.into_iter().map(Some).collect());
            }
            let saved = RecurrentStates { states: out.value().clone(), hidden_gates: hidden_gates.clone() };
            let (x, w, s0) = (xs[0].value(), xs[1].value(), xs[2].value());
            let grads = Tensor::recurrent_sequence_backward(cell, x, w, s0, &saved, g.value())?;
            let mut out = vec![grads.x_gates, grads.weight_hh, grads.state0];
            if xs.len() == 4 {
                out.push(grads.bias_hh);
            }
            Ok(out.into_iter().map(|t| Some(Var::constant(t))).collect())
        };
        Var::from_op(OP, forward.states, inputs, Box::new(rule))
    }
}

/// The sequence step by step from differentiable ops, on the op's inputs
/// `[x_gates, weight_hh, state0, (bias_hh)]`: the equations of [`RecurrentCell`].
pub(crate) fn composed_sequence(cell: RecurrentCell, xs: &[Var]) -> Result<Var> {
    let (x_gates, weight_hh, bias) = (&xs[0], &xs[1], xs.get(3));
    let hidden = weight_hh.dims()[1];
    let mut state = xs[2].clone();
    let mut states = Vec::with_capacity(x_gates.dims()[0]);
    for t in 0..x_gates.dims()[0] {
        let h = state.narrow(1, 0, hidden)?;
        let h_gates = h.matmul_bias_act(&weight_hh.t()?, bias, None)?;
        let x = x_gates.narrow(0, t, 1)?.squeeze(0)?;
        let gate = |v: &Var, k: usize| v.narrow(1, k * hidden, hidden);
        let both = |k: usize| gate(&x, k)?.add(&gate(&h_gates, k)?);
        state = match cell {
            RecurrentCell::RnnTanh => both(0)?.tanh()?,
            RecurrentCell::RnnRelu => both(0)?.relu()?,
            RecurrentCell::Lstm => {
                let (i, f) = (both(0)?.sigmoid()?, both(1)?.sigmoid()?);
                let (g, o) = (both(2)?.tanh()?, both(3)?.sigmoid()?);
                let c = f.mul(&state.narrow(1, hidden, hidden)?)?.add(&i.mul(&g)?)?;
                Var::cat(&[&o.mul(&c.tanh()?)?, &c], 1)?
            }
            RecurrentCell::Gru => {
                let (r, z) = (both(0)?.sigmoid()?, both(1)?.sigmoid()?);
                let n = gate(&x, 2)?.add(&r.mul(&gate(&h_gates, 2)?)?)?.tanh()?;
                n.add(&z.mul(&h.sub(&n)?)?)?
            }
        };
        states.push(state.clone());
    }
    Var::stack(&states.iter().collect::<Vec<_>>(), 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{gradcheck, gradgradcheck};
    use crate::tape::grad;
    use aigc_tensor::{DType, Device};

    const CELLS: [RecurrentCell; 4] =
        [RecurrentCell::RnnTanh, RecurrentCell::RnnRelu, RecurrentCell::Lstm, RecurrentCell::Gru];

    /// `[x_gates, weight_hh, state0, bias_hh]` for `steps` steps of `batch` rows, `hidden` units.
    fn inputs(cell: RecurrentCell, steps: usize, batch: usize, hidden: usize) -> Vec<Tensor> {
        let (g, s) = (cell.gates(), cell.state_parts());
        let random = |shape: &[usize], seed| Tensor::uniform(shape, -1.0, 1.0, DType::F64, &Device::Cpu, seed).unwrap();
        vec![
            random(&[steps, batch, g * hidden], 1),
            random(&[g * hidden, hidden], 2),
            random(&[batch, s * hidden], 3),
            random(&[g * hidden], 4),
        ]
    }

    fn fused(cell: RecurrentCell) -> impl Fn(&[Var]) -> Result<Var> {
        move |v: &[Var]| Var::recurrent_sequence(cell, &v[0], &v[1], v.get(3), &v[2])
    }

    #[test]
    fn fused_values_and_gradients_equal_the_composed_ones() {
        for cell in CELLS {
            let xs: Vec<Var> = inputs(cell, 4, 3, 5).into_iter().map(Var::leaf).collect();
            let (a, b) = (fused(cell)(&xs).unwrap(), composed_sequence(cell, &xs).unwrap());
            let (va, vb) = (a.value().to_vec::<f64>().unwrap(), b.value().to_vec::<f64>().unwrap());
            assert!(va.iter().zip(&vb).all(|(p, q)| (p - q).abs() < 1e-12), "{cell:?} values");
            // Weight the states so that every one matters, then compare every gradient.
            let weights = Var::constant(Tensor::uniform(a.dims(), -1.0, 1.0, DType::F64, &Device::Cpu, 9).unwrap());
            let refs: Vec<&Var> = xs.iter().collect();
            let ga = grad(&[&a.mul(&weights).unwrap().sum_all().unwrap()], &refs, false).unwrap();
            let gb = grad(&[&b.mul(&weights).unwrap().sum_all().unwrap()], &refs, false).unwrap();
            for (k, (p, q)) in ga.iter().zip(&gb).enumerate() {
                let (p, q) = (p.value().to_vec::<f64>().unwrap(), q.value().to_vec::<f64>().unwrap());
                assert!(p.iter().zip(&q).all(|(p, q)| (p - q).abs() < 1e-12), "{cell:?} gradient of input {k}");
            }
        }
    }

    #[test]
    fn every_cell_passes_gradcheck_and_gradgradcheck() {
        for cell in CELLS {
            let owned = inputs(cell, 3, 2, 2);
            let all: Vec<&Tensor> = owned.iter().collect();
            gradcheck(fused(cell), &all, "recurrent_sequence").unwrap();
            gradcheck(fused(cell), &all[..3], "recurrent_sequence without bias").unwrap();
            gradgradcheck(fused(cell), &all, "recurrent_sequence").unwrap();
        }
    }

    #[test]
    fn gradients_stop_at_a_state_that_was_computed() {
        // state0 computed from the weights: the op's rule gives the partial derivative for
        // weight_hh, and the tape adds the path through state0 (checked by gradcheck).
        let cell = RecurrentCell::Gru;
        let owned = inputs(cell, 2, 2, 3);
        let f = |v: &[Var]| {
            let state0 = v[1].narrow(0, 0, 2)?.add(&v[2])?;
            Var::recurrent_sequence(cell, &v[0], &v[1], Some(&v[3]), &state0)
        };
        gradcheck(f, &owned.iter().collect::<Vec<_>>(), "state from weights").unwrap();
        gradgradcheck(f, &owned.iter().collect::<Vec<_>>(), "state from weights").unwrap();
    }
}
