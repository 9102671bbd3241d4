//! One time step of the three recurrent cells, as PyTorch's `RNNCell`, `LSTMCell` and
//! `GRUCell` (same parameter names, shapes, initialisation, gate order and equations).
//! With `x` the input, `h` the previous hidden state and `σ` the logistic sigmoid:
//!
//! - Elman RNN: `h' = act(W_ih x + b_ih + W_hh h + b_hh)`, `act` tanh or relu.
//! - LSTM, gate blocks `i, f, g, o` stacked in that row order:
//!   `i = σ(W_ii x + b_ii + W_hi h + b_hi)`, `f = σ(..)`, `g = tanh(..)`, `o = σ(..)`,
//!   `c' = f * c + i * g`, `h' = o * tanh(c')`.
//! - GRU, gate blocks `r, z, n` in that row order:
//!   `r = σ(W_ir x + b_ir + W_hr h + b_hr)`, `z = σ(W_iz x + b_iz + W_hz h + b_hz)`,
//!   `n = tanh(W_in x + b_in + r * (W_hn h + b_hn))`, `h' = (1 - z) * n + z * h`.
//!
//! A step is the input projection, then the fused recurrent op over one time step
//! ([`Var::recurrent_sequence`], which implements these equations).

use super::{CellWeights, LstmState, Nonlinearity, Recurrent, RecurrentState};
use crate::VarStore;
use aigc_autograd::Var;
use aigc_tensor::RecurrentCell;
use aigc_tensor::{Error, Result};

/// An Elman RNN cell: `h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)`.
pub struct RnnCell {
    /// `weight_ih [hidden, input]`, `weight_hh [hidden, hidden]`, `bias_ih`, `bias_hh [hidden]`.
    pub weights: CellWeights,
    /// `tanh` or `relu`.
    pub nonlinearity: Nonlinearity,
}

/// An LSTM cell. Its state is `(h, c)`.
pub struct LstmCell {
    /// `weight_ih [4 * hidden, input]`, `weight_hh [4 * hidden, hidden]`, biases `[4 * hidden]`,
    /// gate blocks `i, f, g, o`.
    pub weights: CellWeights,
}

/// A GRU cell.
pub struct GruCell {
    /// `weight_ih [3 * hidden, input]`, `weight_hh [3 * hidden, hidden]`, biases `[3 * hidden]`,
    /// gate blocks `r, z, n`.
    pub weights: CellWeights,
}

impl RnnCell {
    /// `input_size -> hidden_size` with biases.
    pub fn new(vs: &VarStore, input_size: usize, hidden_size: usize, nonlinearity: Nonlinearity) -> Result<RnnCell> {
        Self::with_bias(vs, input_size, hidden_size, nonlinearity, true)
    }

    /// `input_size -> hidden_size`, with or without biases.
    pub fn with_bias(
        vs: &VarStore,
        input_size: usize,
        hidden_size: usize,
        nonlinearity: Nonlinearity,
        bias: bool,
    ) -> Result<RnnCell> {
        let weights = CellWeights::new(vs, "", input_size, hidden_size, Self::GATES, bias)?;
        Ok(RnnCell { weights, nonlinearity })
    }

    /// The next hidden state `[batch, hidden]` from the input `x [batch, input]` and `h [batch, hidden]`.
    pub fn forward(&self, x: &Var, h: &Var) -> Result<Var> {
        checked_step(self, x, h)
    }

    /// A zero hidden state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<Var> {
        zero_state(self, batch)
    }
}

impl LstmCell {
    /// `input_size -> hidden_size` with biases.
    pub fn new(vs: &VarStore, input_size: usize, hidden_size: usize) -> Result<LstmCell> {
        Self::with_bias(vs, input_size, hidden_size, true)
    }

    /// `input_size -> hidden_size`, with or without biases.
    pub fn with_bias(vs: &VarStore, input_size: usize, hidden_size: usize, bias: bool) -> Result<LstmCell> {
        Ok(LstmCell { weights: CellWeights::new(vs, "", input_size, hidden_size, Self::GATES, bias)? })
    }

    /// The next state `(h', c')`, each `[batch, hidden]`, from the input `x [batch, input]`.
    pub fn forward(&self, x: &Var, state: &LstmState) -> Result<LstmState> {
        checked_step(self, x, state)
    }

    /// A zero state `(h, c)` for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<LstmState> {
        zero_state(self, batch)
    }
}

impl GruCell {
    /// `input_size -> hidden_size` with biases.
    pub fn new(vs: &VarStore, input_size: usize, hidden_size: usize) -> Result<GruCell> {
        Self::with_bias(vs, input_size, hidden_size, true)
    }

    /// `input_size -> hidden_size`, with or without biases.
    pub fn with_bias(vs: &VarStore, input_size: usize, hidden_size: usize, bias: bool) -> Result<GruCell> {
        Ok(GruCell { weights: CellWeights::new(vs, "", input_size, hidden_size, Self::GATES, bias)? })
    }

    /// The next hidden state `[batch, hidden]` from the input `x [batch, input]` and `h [batch, hidden]`.
    pub fn forward(&self, x: &Var, h: &Var) -> Result<Var> {
        checked_step(self, x, h)
    }

    /// A zero hidden state for `batch` sequences.
    pub fn zero_state(&self, batch: usize) -> Result<Var> {
        zero_state(self, batch)
    }
}

impl Recurrent for RnnCell {
    type State = Var;
    const NAME: &'static str = "RnnCell";
    const SEQUENCE_NAME: &'static str = "Rnn";
    const GATES: usize = 1;

    fn weights(&self) -> &CellWeights {
        &self.weights
    }

    fn cell(&self) -> RecurrentCell {
        match self.nonlinearity {
            Nonlinearity::Tanh => RecurrentCell::RnnTanh,
            Nonlinearity::Relu => RecurrentCell::RnnRelu,
        }
    }
}

impl Recurrent for LstmCell {
    type State = LstmState;
    const NAME: &'static str = "LstmCell";
    const SEQUENCE_NAME: &'static str = "Lstm";
    const GATES: usize = 4;

    fn weights(&self) -> &CellWeights {
        &self.weights
    }

    fn cell(&self) -> RecurrentCell {
        RecurrentCell::Lstm
    }
}

impl Recurrent for GruCell {
    type State = Var;
    const NAME: &'static str = "GruCell";
    const SEQUENCE_NAME: &'static str = "Gru";
    const GATES: usize = 3;

    fn weights(&self) -> &CellWeights {
        &self.weights
    }

    fn cell(&self) -> RecurrentCell {
        RecurrentCell::Gru
    }
}

/// A cell's forward: checks `x [batch, input]` and the state `[batch, hidden]`, then steps.
fn checked_step<C: Recurrent>(cell: &C, x: &Var, state: &C::State) -> Result<C::State> {
    let (input, hidden) = (cell.weights().input_size(), cell.weights().hidden_size());
    if x.rank() != 2 || x.dims()[1] != input {
        return Err(Error::bad_shape(C::NAME, &x.shape(), format!("expected [batch, {input}] (batch, input_size)")));
    }
    state.check_shape(C::NAME, &[x.dims()[0], hidden], "batch, hidden_size")?;
    Ok(cell.run(&cell.weights().input_projection(x)?.unsqueeze(0)?, state)?.1)
}

/// A zero state of the cell's dtype and device.
fn zero_state<C: Recurrent>(cell: &C, batch: usize) -> Result<C::State> {
    let weight = &cell.weights().weight_hh;
    C::State::zeros(&[batch, cell.weights().hidden_size()], weight.dtype(), &weight.device())
}

#[cfg(test)]
mod tests {
    use super::super::testing::{FixtureState, TOL, fixture_loss};
    use super::*;
    use crate::testing::{Fixture, Tol, assert_close};
    use aigc_autograd::gradcheck;
    use aigc_tensor::{DType, Device, Tensor};

    fn store() -> VarStore {
        VarStore::new(DType::F64, &Device::Cpu, 0)
    }

    /// Runs a cell built under `vs.pp(model)` on the fixture's input and state, backpropagates
    /// the fixture's loss, and compares the new state and every gradient with PyTorch's.
    fn check_against_pytorch<C: Recurrent<State: FixtureState>>(model: &str, build: impl Fn(&VarStore) -> C) {
        let (fx, vs) = (Fixture::rnn(), store());
        let key = |name: &str| format!("{model}.{name}");
        let cell = build(&vs.pp(model));
        fx.load_params(&vs, "");
        let x = Var::leaf(fx.get(&key("x")));
        let next = checked_step(&cell, &x, &C::State::initial(&fx, model)).unwrap();
        let (h, c) = (next.hidden(), next.memory());
        fx.assert_matches(h.value(), &key("out"), TOL);
        if let Some(c) = c {
            fx.assert_matches(c.value(), &key("c_n"), TOL);
        }
        fixture_loss(h, h, c).backward().unwrap();
        fx.assert_matches(&x.grad().unwrap(), &key("grad.x"), TOL);
        fx.assert_grads(&vs.pp(model), |param| key(&format!("grad.{param}")), TOL);
    }

    #[test]
    fn rnn_cells_match_pytorch_outputs_and_gradients() {
        check_against_pytorch("rnn_cell", |vs| RnnCell::new(vs, 3, 5, Nonlinearity::Tanh).unwrap());
        check_against_pytorch("rnn_cell_relu", |vs| RnnCell::new(vs, 3, 5, Nonlinearity::Relu).unwrap());
    }

    #[test]
    fn lstm_cell_matches_pytorch_outputs_and_gradients() {
        check_against_pytorch("lstm_cell", |vs| LstmCell::new(vs, 3, 5).unwrap());
    }

    #[test]
    fn gru_cells_match_pytorch_outputs_and_gradients() {
        check_against_pytorch("gru_cell", |vs| GruCell::new(vs, 3, 5).unwrap());
        check_against_pytorch("gru_cell_no_bias", |vs| GruCell::with_bias(vs, 3, 5, false).unwrap());
    }

    #[test]
    fn parameters_have_pytorch_names_shapes_and_init_bounds() {
        let vs = store();
        LstmCell::new(&vs.pp("cell"), 3, 16).unwrap();
        let params = vs.named_parameters();
        let names: Vec<(&str, Vec<usize>)> = params.iter().map(|(n, v)| (n.as_str(), v.dims().to_vec())).collect();
        assert_eq!(
            names,
            vec![
                ("cell.weight_ih", vec![64, 3]),
                ("cell.weight_hh", vec![64, 16]),
                ("cell.bias_ih", vec![64]),
                ("cell.bias_hh", vec![64])
            ]
        );
        for (name, var) in &params {
            let values = var.value().to_vec::<f64>().unwrap();
            assert!(values.iter().all(|v| v.abs() <= 0.25), "{name} outside U(-1/sqrt(16), 1/sqrt(16))");
            assert!(values.iter().any(|v| v.abs() > 0.2), "{name} does not fill its range");
        }
        GruCell::with_bias(&vs.pp("gru"), 3, 2, false).unwrap();
        assert_eq!(vs.pp("gru").named_parameters().len(), 2, "no biases without bias");
    }

    /// Fixed weights for the hand-computed steps: every entry different, so a wrong gate
    /// order or a transposed weight changes the result.
    fn fixed(rows: usize, cols: usize, scale: f64) -> Vec<Vec<f64>> {
        (0..rows).map(|r| (0..cols).map(|c| scale * (((r * 7 + c * 3) % 11) as f64 - 5.0) / 5.0).collect()).collect()
    }

    fn constant(rows: &[Vec<f64>]) -> Var {
        let flat: Vec<f64> = rows.concat();
        Var::leaf(Tensor::from_vec(flat, [rows.len(), rows[0].len()], &Device::Cpu).unwrap())
    }

    fn vector(values: &[f64]) -> Var {
        Var::leaf(Tensor::from_vec(values.to_vec(), [values.len()], &Device::Cpu).unwrap())
    }

    /// `W v + b` row by row, in plain f64.
    fn affine(weight: &[Vec<f64>], v: &[f64], bias: &[f64]) -> Vec<f64> {
        weight.iter().zip(bias).map(|(row, b)| row.iter().zip(v).map(|(w, x)| w * x).sum::<f64>() + b).collect()
    }

    fn sigmoid(v: f64) -> f64 {
        1.0 / (1.0 + (-v).exp())
    }

    /// Compares a state computed by the cell with the values computed by hand.
    fn assert_values(got: &Var, want: &[f64], what: &str) {
        assert_close(&got.value().to_vec::<f64>().unwrap(), want, Tol::abs(1e-12), what);
    }

    #[test]
    fn lstm_step_matches_a_hand_computed_step() {
        let (w_ih, w_hh) = (fixed(8, 3, 0.7), fixed(8, 2, -0.4));
        let (b_ih, b_hh) =
            ([0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8], [0.05, 0.15, -0.25, 0.35, -0.45, 0.55, 0.0, 0.2]);
        let (x, h, c) = ([0.5, -1.0, 2.0], [0.3, -0.7], [1.5, -0.5]);
        let cell = LstmCell {
            weights: CellWeights {
                weight_ih: constant(&w_ih),
                weight_hh: constant(&w_hh),
                bias_ih: Some(vector(&b_ih)),
                bias_hh: Some(vector(&b_hh)),
            },
        };
        let state = LstmState { h: constant(&[h.to_vec()]), c: constant(&[c.to_vec()]) };
        let next = cell.forward(&constant(&[x.to_vec()]), &state).unwrap();

        // Gate pre-activations: rows 0-1 input gate, 2-3 forget, 4-5 candidate, 6-7 output.
        let from_x = affine(&w_ih, &x, &b_ih);
        let from_h = affine(&w_hh, &h, &b_hh);
        let pre: Vec<f64> = from_x.iter().zip(&from_h).map(|(a, b)| a + b).collect();
        let mut want_h = [0.0; 2];
        let mut want_c = [0.0; 2];
        for j in 0..2 {
            let input_gate = sigmoid(pre[j]);
            let forget_gate = sigmoid(pre[2 + j]);
            let candidate = pre[4 + j].tanh();
            let output_gate = sigmoid(pre[6 + j]);
            want_c[j] = forget_gate * c[j] + input_gate * candidate;
            want_h[j] = output_gate * want_c[j].tanh();
        }
        assert_values(&next.c, &want_c, "c'");
        assert_values(&next.h, &want_h, "h'");
    }

    #[test]
    fn gru_step_matches_a_hand_computed_step() {
        let (w_ih, w_hh) = (fixed(6, 3, 0.8), fixed(6, 2, -0.6));
        let (b_ih, b_hh) = ([0.1, -0.2, 0.3, -0.4, 0.5, -0.6], [0.25, -0.15, 0.35, 0.05, -0.45, 0.65]);
        let (x, h) = ([0.5, -1.0, 2.0], [0.3, -0.7]);
        let cell = GruCell {
            weights: CellWeights {
                weight_ih: constant(&w_ih),
                weight_hh: constant(&w_hh),
                bias_ih: Some(vector(&b_ih)),
                bias_hh: Some(vector(&b_hh)),
            },
        };
        let next = cell.forward(&constant(&[x.to_vec()]), &constant(&[h.to_vec()])).unwrap();

        // Rows 0-1 reset gate, 2-3 update gate, 4-5 new gate; b_hn stays inside r * (..).
        let from_x = affine(&w_ih, &x, &b_ih);
        let from_h = affine(&w_hh, &h, &b_hh);
        let mut want = [0.0; 2];
        for j in 0..2 {
            let reset = sigmoid(from_x[j] + from_h[j]);
            let update = sigmoid(from_x[2 + j] + from_h[2 + j]);
            let new_gate = (from_x[4 + j] + reset * from_h[4 + j]).tanh();
            want[j] = (1.0 - update) * new_gate + update * h[j];
        }
        assert_values(&next, &want, "h'");
    }

    /// `[x, h, (c), weight_ih, weight_hh, bias_ih, bias_hh]` of a cell with `gates` blocks, random.
    fn gradcheck_inputs(gates: usize, with_c: bool) -> Vec<Tensor> {
        let (batch, input, hidden) = (2, 3, 2);
        let dev = Device::Cpu;
        let random = |shape: &[usize], seed| Tensor::uniform(shape, -1.0, 1.0, DType::F64, &dev, seed).unwrap();
        let mut inputs = vec![random(&[batch, input], 1), random(&[batch, hidden], 2)];
        if with_c {
            inputs.push(random(&[batch, hidden], 3));
        }
        inputs.extend([
            random(&[gates * hidden, input], 4),
            random(&[gates * hidden, hidden], 5),
            random(&[gates * hidden], 6),
            random(&[gates * hidden], 7),
        ]);
        inputs
    }

    fn weights_from(vars: &[Var]) -> CellWeights {
        CellWeights {
            weight_ih: vars[0].clone(),
            weight_hh: vars[1].clone(),
            bias_ih: Some(vars[2].clone()),
            bias_hh: Some(vars[3].clone()),
        }
    }

    #[test]
    fn cells_pass_gradcheck() {
        for nonlinearity in [Nonlinearity::Tanh, Nonlinearity::Relu] {
            let inputs = gradcheck_inputs(1, false);
            let f = |v: &[Var]| RnnCell { weights: weights_from(&v[2..]), nonlinearity }.forward(&v[0], &v[1]);
            gradcheck(f, &inputs.iter().collect::<Vec<_>>(), "RnnCell").unwrap();
        }
        let inputs = gradcheck_inputs(3, false);
        let f = |v: &[Var]| GruCell { weights: weights_from(&v[2..]) }.forward(&v[0], &v[1]);
        gradcheck(f, &inputs.iter().collect::<Vec<_>>(), "GruCell").unwrap();
        let inputs = gradcheck_inputs(4, true);
        let f = |v: &[Var]| {
            let state = LstmState { h: v[1].clone(), c: v[2].clone() };
            let next = LstmCell { weights: weights_from(&v[3..]) }.forward(&v[0], &state)?;
            Var::cat(&[&next.h, &next.c], 1)
        };
        gradcheck(f, &inputs.iter().collect::<Vec<_>>(), "LstmCell").unwrap();
    }

    #[test]
    fn zero_state_has_the_cell_shape_and_dtype() {
        let vs = store();
        let lstm = LstmCell::new(&vs.pp("lstm"), 3, 4).unwrap();
        let state = lstm.zero_state(2).unwrap();
        assert_eq!((state.h.dims(), state.c.dims(), state.c.dtype()), (&[2, 4][..], &[2, 4][..], DType::F64));
        let x = Var::constant(Tensor::ones([2, 3], DType::F64, &Device::Cpu).unwrap());
        assert_eq!(lstm.forward(&x, &state).unwrap().h.dims(), &[2, 4]);
        let gru = GruCell::new(&vs.pp("gru"), 3, 4).unwrap();
        assert_eq!(gru.forward(&x, &gru.zero_state(2).unwrap()).unwrap().dims(), &[2, 4]);
    }

    #[test]
    fn bad_shapes_are_clear_errors() {
        let vs = store();
        let gru = GruCell::new(&vs.pp("gru"), 3, 4).unwrap();
        let input = |dims: &[usize]| Var::constant(Tensor::ones(dims, DType::F64, &Device::Cpu).unwrap());
        let h = gru.zero_state(2).unwrap();
        let err = gru.forward(&input(&[2, 5]), &h).unwrap_err().to_string();
        assert_eq!(err, "GruCell: input of shape [2, 5]: expected [batch, 3] (batch, input_size)");
        let err = gru.forward(&input(&[2, 1, 3]), &h).unwrap_err().to_string();
        assert!(err.starts_with("GruCell: input of shape [2, 1, 3]"), "{err}");
        let err = gru.forward(&input(&[3, 3]), &h).unwrap_err().to_string();
        assert_eq!(err, "GruCell: state h has shape [2, 4], expected [3, 4] (batch, hidden_size)");
        let lstm = LstmCell::new(&vs.pp("lstm"), 3, 4).unwrap();
        let state = LstmState { h: input(&[2, 4]), c: input(&[2, 3]) };
        let err = lstm.forward(&input(&[2, 3]), &state).unwrap_err().to_string();
        assert_eq!(err, "LstmCell: state c has shape [2, 3], expected [2, 4] (batch, hidden_size)");
        let err = RnnCell::new(&vs.pp("rnn"), 3, 0, Nonlinearity::Tanh).err().unwrap().to_string();
        assert!(err.contains("hidden_size 0"), "{err}");
    }
}
