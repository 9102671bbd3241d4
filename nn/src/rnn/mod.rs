//! Recurrent layers, with PyTorch's parameter names, shapes, initialisation and equations:
//! the Elman RNN (Elman 1990), the LSTM (Hochreiter & Schmidhuber 1997, with the forget
//! gate of Gers et al. 2000) and the GRU (Cho et al. 2014).
//!
//! - [`RnnCell`], [`LstmCell`], [`GruCell`] advance a state by one time step (`cell.rs`).
//! - [`Rnn`], [`Lstm`], [`Gru`] run stacked, optionally bidirectional layers of those cells
//!   over a whole `[batch, time, features]` sequence (`sequence.rs`).
//!
//! Every cell computes its gates from two affine maps, `x W_ih^T + b_ih` of the input and
//! `h W_hh^T + b_hh` of the previous hidden state, where `W_ih` is `[G * hidden, input]`
//! and `W_hh` is `[G * hidden, hidden]`, the `G` gate blocks stacked by rows in PyTorch's
//! order. A sequence layer computes the input map for every time step in one matrix
//! product; the time loop (the hidden map and the gate arithmetic of each step) is one
//! fused op forward and one backward through time ([`Var::recurrent_sequence`]), and a
//! cell's single step is that op over one step.
//!
//! Truncated backpropagation through time: run a long sequence in chunks and pass the
//! previous chunk's final state, cut from the graph with `detach()`, as the next chunk's
//! initial state.

mod cell;
mod sequence;

pub use cell::{GruCell, LstmCell, RnnCell};
pub use sequence::{Gru, Lstm, Rnn, RnnConfig, Sequence};

use crate::{Init, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Device, Error, RecurrentCell, Result, Tensor};

/// The activation of an Elman RNN: `h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Nonlinearity {
    /// `tanh` (PyTorch's default).
    #[default]
    Tanh,
    /// `max(0, x)`.
    Relu,
}

impl Nonlinearity {
    /// Applies the activation.
    pub fn apply(self, x: &Var) -> Result<Var> {
        match self {
            Nonlinearity::Tanh => x.tanh(),
            Nonlinearity::Relu => x.relu(),
        }
    }
}

/// The state of an LSTM: hidden state `h` and cell state `c`, each `[batch, hidden]` for a
/// cell or `[num_layers * directions, batch, hidden]` for a sequence layer.
#[derive(Clone, Debug)]
pub struct LstmState {
    /// Hidden state (the cell's output).
    pub h: Var,
    /// Cell state (the memory the gates write to).
    pub c: Var,
}

impl LstmState {
    /// The same state cut from the graph: the initial state of the next chunk in truncated
    /// backpropagation through time.
    pub fn detach(&self) -> LstmState {
        LstmState { h: self.h.detach(), c: self.c.detach() }
    }
}

/// The parameters of one recurrent cell, in PyTorch's layout. A cell of a sequence layer
/// has them under suffixed names (`weight_ih_l1`, `bias_hh_l0_reverse`).
pub struct CellWeights {
    /// `[G * hidden, input]`: the gate blocks' input weights, stacked by rows.
    pub weight_ih: Var,
    /// `[G * hidden, hidden]`: the gate blocks' recurrent weights.
    pub weight_hh: Var,
    /// `[G * hidden]`, absent when the layer is built without bias.
    pub bias_ih: Option<Var>,
    /// `[G * hidden]`, absent when the layer is built without bias.
    pub bias_hh: Option<Var>,
}

impl CellWeights {
    /// Registers `weight_ih{suffix}`, `weight_hh{suffix}` and, with `bias`, `bias_ih{suffix}`
    /// and `bias_hh{suffix}` for `gates` gate blocks, all drawn from
    /// `U(-1/sqrt(hidden), 1/sqrt(hidden))` as PyTorch's `reset_parameters`.
    pub fn new(
        vs: &VarStore,
        suffix: &str,
        input_size: usize,
        hidden_size: usize,
        gates: usize,
        bias: bool,
    ) -> Result<CellWeights> {
        if input_size == 0 || hidden_size == 0 {
            return Err(Error::invalid(
                "recurrent cell",
                format!("input_size {input_size} and hidden_size {hidden_size} must both be at least 1"),
            ));
        }
        let bound = 1.0 / (hidden_size as f64).sqrt();
        let init = Init::Uniform { lo: -bound, hi: bound };
        let rows = gates * hidden_size;
        let weight_ih = vs.param(&format!("weight_ih{suffix}"), [rows, input_size], init)?;
        let weight_hh = vs.param(&format!("weight_hh{suffix}"), [rows, hidden_size], init)?;
        let (bias_ih, bias_hh) = if bias {
            (
                Some(vs.param(&format!("bias_ih{suffix}"), [rows], init)?),
                Some(vs.param(&format!("bias_hh{suffix}"), [rows], init)?),
            )
        } else {
            (None, None)
        };
        Ok(CellWeights { weight_ih, weight_hh, bias_ih, bias_hh })
    }

    /// Features of the input.
    pub fn input_size(&self) -> usize {
        self.weight_ih.dims()[1]
    }

    /// Features of the hidden state.
    pub fn hidden_size(&self) -> usize {
        self.weight_hh.dims()[1]
    }

    /// `x W_ih^T + b_ih` for `x` of shape `[n, input]`: every gate's input term, `[n, G * hidden]`.
    pub fn input_projection(&self, x: &Var) -> Result<Var> {
        x.matmul_bias_act(&self.weight_ih.t()?, self.bias_ih.as_ref(), None)
    }
}

/// A recurrent cell as the sequence layers drive it: the input projection
/// ([`CellWeights::input_projection`]) is computed for all time steps at once, then the
/// fused op of [`Recurrent::cell`] runs the time steps.
pub trait Recurrent {
    /// The state carried from step to step: `h` (a [`Var`]) or `(h, c)` ([`LstmState`]).
    type State: RecurrentState;
    /// The name of the cell in error messages.
    const NAME: &'static str;
    /// The sequence layer's name in error messages.
    const SEQUENCE_NAME: &'static str;
    /// How many gate blocks the weights stack (RNN 1, LSTM 4, GRU 3).
    const GATES: usize;
    /// The cell's parameters.
    fn weights(&self) -> &CellWeights;
    /// The equations of a step, as the fused op names them.
    fn cell(&self) -> RecurrentCell;

    /// Runs the cell over time-major input projections `x_gates [steps, batch, G * hidden]`
    /// (each step's `x W_ih^T + b_ih`) from `state`: every step's packed state
    /// `[steps, batch, S * hidden]` (see [`RecurrentState::pack`]) and the last state.
    fn run(&self, x_gates: &Var, state: &Self::State) -> Result<(Var, Self::State)> {
        let w = self.weights();
        let states = Var::recurrent_sequence(self.cell(), x_gates, &w.weight_hh, w.bias_hh.as_ref(), &state.pack()?)?;
        let last = states.narrow(0, x_gates.dims()[0] - 1, 1)?.squeeze(0)?;
        Ok((states, Self::State::unpack(&last, w.hidden_size())?))
    }
}

/// What the sequence layers need to do with a cell's state: read its hidden part, make a
/// zero one, take out and stack the per-layer states along a leading dim.
pub trait RecurrentState: Clone + Sized {
    /// The hidden state `h`: what the layer outputs at each step.
    fn hidden(&self) -> &Var;
    /// A state of zeros whose every part has shape `dims`.
    fn zeros(dims: &[usize], dtype: DType, device: &Device) -> Result<Self>;
    /// Entry `k` of the leading dim: one layer's state out of a sequence layer's.
    fn select(&self, k: usize) -> Result<Self>;
    /// The states stacked along a new leading dim.
    fn stack(states: &[Self]) -> Result<Self>;
    /// An error naming `op` unless every part has shape `expected` (described by `what`).
    fn check_shape(&self, op: &'static str, expected: &[usize], what: &str) -> Result<()>;
    /// The parts side by side along the last dim, `[.., S * hidden]`, as the fused op
    /// takes and returns states (the LSTM's `h` then `c`).
    fn pack(&self) -> Result<Var>;
    /// The state out of its packed form.
    fn unpack(packed: &Var, hidden: usize) -> Result<Self>;
}

fn zero_var(dims: &[usize], dtype: DType, device: &Device) -> Result<Var> {
    Ok(Var::constant(Tensor::zeros(dims, dtype, device)?))
}

fn check_part(op: &'static str, part: &str, var: &Var, expected: &[usize], what: &str) -> Result<()> {
    if var.dims() == expected {
        return Ok(());
    }
    Err(Error::invalid(op, format!("state {part} has shape {}, expected {expected:?} ({what})", var.shape())))
}

impl RecurrentState for Var {
    fn hidden(&self) -> &Var {
        self
    }
    fn zeros(dims: &[usize], dtype: DType, device: &Device) -> Result<Var> {
        zero_var(dims, dtype, device)
    }
    fn select(&self, k: usize) -> Result<Var> {
        self.narrow(0, k, 1)?.squeeze(0)
    }
    fn stack(states: &[Var]) -> Result<Var> {
        Var::stack(&states.iter().collect::<Vec<_>>(), 0)
    }
    fn check_shape(&self, op: &'static str, expected: &[usize], what: &str) -> Result<()> {
        check_part(op, "h", self, expected, what)
    }
    fn pack(&self) -> Result<Var> {
        Ok(self.clone())
    }
    fn unpack(packed: &Var, _hidden: usize) -> Result<Var> {
        Ok(packed.clone())
    }
}

impl RecurrentState for LstmState {
    fn hidden(&self) -> &Var {
        &self.h
    }
    fn zeros(dims: &[usize], dtype: DType, device: &Device) -> Result<LstmState> {
        Ok(LstmState { h: zero_var(dims, dtype, device)?, c: zero_var(dims, dtype, device)? })
    }
    fn select(&self, k: usize) -> Result<LstmState> {
        Ok(LstmState { h: self.h.select(k)?, c: self.c.select(k)? })
    }
    fn stack(states: &[LstmState]) -> Result<LstmState> {
        let hs: Vec<Var> = states.iter().map(|s| s.h.clone()).collect();
        let cs: Vec<Var> = states.iter().map(|s| s.c.clone()).collect();
        Ok(LstmState { h: RecurrentState::stack(&hs)?, c: RecurrentState::stack(&cs)? })
    }
    fn check_shape(&self, op: &'static str, expected: &[usize], what: &str) -> Result<()> {
        check_part(op, "h", &self.h, expected, what)?;
        check_part(op, "c", &self.c, expected, what)
    }
    fn pack(&self) -> Result<Var> {
        Var::cat(&[&self.h, &self.c], -1)
    }
    fn unpack(packed: &Var, hidden: usize) -> Result<LstmState> {
        Ok(LstmState { h: packed.narrow(-1, 0, hidden)?, c: packed.narrow(-1, hidden, hidden)? })
    }
}

#[cfg(test)]
mod testing {
    //! The PyTorch fixture of the recurrent layers (`nn/fixtures/rnn.py`): its tolerance, its
    //! initial states and its loss.

    use super::{LstmState, RecurrentState};
    use crate::testing::{Fixture, Tol};
    use aigc_autograd::Var;

    /// The tolerance of a comparison with `rnn.safetensors` (f64 values).
    pub const TOL: Tol = Tol::abs(1e-9);

    /// A state the fixture holds: `<model>.h0` (and `<model>.c0`).
    pub trait FixtureState: RecurrentState {
        /// The fixture's initial state of `model`.
        fn initial(fixture: &Fixture, model: &str) -> Self;
        /// The LSTM cell state `c`; `None` for a state that is only `h`.
        fn memory(&self) -> Option<&Var>;
    }

    impl FixtureState for Var {
        fn initial(fixture: &Fixture, model: &str) -> Var {
            Var::constant(fixture.get(&format!("{model}.h0")))
        }
        fn memory(&self) -> Option<&Var> {
            None
        }
    }

    impl FixtureState for LstmState {
        fn initial(fixture: &Fixture, model: &str) -> LstmState {
            LstmState { h: Var::initial(fixture, model), c: Var::constant(fixture.get(&format!("{model}.c0"))) }
        }
        fn memory(&self) -> Option<&Var> {
            Some(&self.c)
        }
    }

    /// The fixture's loss: `sum(out^2) + sum(h_n^3) (+ sum(c_n^2))`.
    pub fn fixture_loss(out: &Var, h_n: &Var, c_n: Option<&Var>) -> Var {
        let loss = out.square().unwrap().sum_all().unwrap().add(&h_n.powf(3.0).unwrap().sum_all().unwrap()).unwrap();
        match c_n {
            Some(c) => loss.add(&c.square().unwrap().sum_all().unwrap()).unwrap(),
            None => loss,
        }
    }
}
