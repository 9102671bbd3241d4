//! Stacked recurrent layers run over whole sequences: PyTorch's `nn.RNN`, `nn.LSTM` and
//! `nn.GRU`, with `batch_first=True` always (inputs and outputs are `[batch, time, features]`).
//!
//! Layer `k` reads layer `k - 1`'s output sequence (with dropout in between when training).
//! A bidirectional layer runs a second cell from the last step to the first and
//! concatenates both directions' outputs along the features. Each direction of each layer
//! projects its whole input sequence through `W_ih` in one matrix product, time-major;
//! the time loop is the fused recurrent op ([`Recurrent::run`]), which returns every
//! step's state at once.

use super::{CellWeights, GruCell, LstmCell, Nonlinearity, Recurrent, RecurrentState, RnnCell};
use crate::{Module, VarStore};
use aigc_autograd::Var;
use aigc_tensor::{DType, Error, Result, Tensor};

/// Options shared by [`Rnn`], [`Lstm`] and [`Gru`]: PyTorch's `RNNBase` arguments, less
/// `batch_first` (always true here) and `proj_size`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RnnConfig {
    /// Stacked layers: layer `k + 1` reads layer `k`'s output sequence.
    pub num_layers: usize,
    /// Whether the cells have `bias_ih` and `bias_hh`.
    pub bias: bool,
    /// Dropout probability on every layer's output but the last's, in training mode only.
    pub dropout: f64,
    /// Also run each layer backwards in time and concatenate both directions' outputs.
    pub bidirectional: bool,
}

impl Default for RnnConfig {
    fn default() -> Self {
        RnnConfig { num_layers: 1, bias: true, dropout: 0.0, bidirectional: false }
    }
}

impl RnnConfig {
    /// 2 when bidirectional, else 1.
    pub fn directions(&self) -> usize {
        if self.bidirectional { 2 } else { 1 }
    }

    fn check(&self, op: &'static str) -> Result<()> {
        if self.num_layers == 0 {
            return Err(Error::invalid(op, "num_layers must be at least 1"));
        }
        if !(0.0..=1.0).contains(&self.dropout) {
            return Err(Error::invalid(op, format!("dropout {} must lie in [0, 1]", self.dropout)));
        }
        Ok(())
    }
}

/// Stacked recurrent layers over whole sequences, generic over the cell; use [`Rnn`],
/// [`Lstm`] or [`Gru`].
pub struct Sequence<C: Recurrent> {
    /// The cells in PyTorch's order, which is also the order of the state's leading dim:
    /// layer 0, layer 0 reverse (when bidirectional), layer 1, ... Their parameters are
    /// named `weight_ih_l{k}`, `weight_hh_l{k}`, `bias_ih_l{k}`, `bias_hh_l{k}`, with the
    /// suffix `_reverse` for the backward direction.
    pub cells: Vec<C>,
    config: RnnConfig,
    input_size: usize,
    hidden_size: usize,
    /// For the training mode and the dropout seeds at forward time.
    vs: VarStore,
}

/// A stack of Elman RNN layers (`nn.RNN`); its state is `h`.
pub type Rnn = Sequence<RnnCell>;
/// A stack of LSTM layers (`nn.LSTM`); its state is `(h, c)`.
pub type Lstm = Sequence<LstmCell>;
/// A stack of GRU layers (`nn.GRU`); its state is `h`.
pub type Gru = Sequence<GruCell>;

impl Sequence<RnnCell> {
    /// `input_size -> hidden_size` Elman RNN layers with the activation `nonlinearity`.
    pub fn new(
        vs: &VarStore,
        input_size: usize,
        hidden_size: usize,
        nonlinearity: Nonlinearity,
        config: RnnConfig,
    ) -> Result<Rnn> {
        Sequence::build(vs, input_size, hidden_size, config, |weights| RnnCell { weights, nonlinearity })
    }
}

impl Sequence<LstmCell> {
    /// `input_size -> hidden_size` LSTM layers.
    pub fn new(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Lstm> {
        Sequence::build(vs, input_size, hidden_size, config, |weights| LstmCell { weights })
    }
}

impl Sequence<GruCell> {
    /// `input_size -> hidden_size` GRU layers.
    pub fn new(vs: &VarStore, input_size: usize, hidden_size: usize, config: RnnConfig) -> Result<Gru> {
        Sequence::build(vs, input_size, hidden_size, config, |weights| GruCell { weights })
    }
}

impl<C: Recurrent> Sequence<C> {
    /// Registers every layer's and direction's weights under PyTorch's names and wraps
    /// them into cells with `cell`.
    fn build(
        vs: &VarStore,
        input_size: usize,
        hidden_size: usize,
        config: RnnConfig,
        cell: impl Fn(CellWeights) -> C,
    ) -> Result<Self> {
        config.check(C::SEQUENCE_NAME)?;
        let directions = config.directions();
        let mut cells = Vec::with_capacity(config.num_layers * directions);
        for layer in 0..config.num_layers {
            let layer_input = if layer == 0 { input_size } else { directions * hidden_size };
            for direction in 0..directions {
                let suffix = if direction == 0 { format!("_l{layer}") } else { format!("_l{layer}_reverse") };
                cells.push(cell(CellWeights::new(vs, &suffix, layer_input, hidden_size, C::GATES, config.bias)?));
            }
        }
        Ok(Sequence { cells, config, input_size, hidden_size, vs: vs.clone() })
    }

    /// The options the layers were built with.
    pub fn config(&self) -> &RnnConfig {
        &self.config
    }

    /// Features of each input step.
    pub fn input_size(&self) -> usize {
        self.input_size
    }

    /// Features of each direction's hidden state.
    pub fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    /// Runs the layers over `x [batch, time, input_size]` from `initial`, whose every part
    /// is `[num_layers * directions, batch, hidden_size]` (zeros when `None`). Returns the
    /// last layer's hidden state at every step, `[batch, time, directions * hidden_size]`,
    /// and the final state of every layer and direction, shaped like `initial`. For
    /// truncated backpropagation through time, pass the previous chunk's final state,
    /// detached, as `initial`.
    pub fn forward(&self, x: &Var, initial: Option<&C::State>) -> Result<(Var, C::State)> {
        let batch = self.check_input(x)?;
        let state_dims = [self.cells.len(), batch, self.hidden_size];
        let initial = match initial {
            Some(state) => {
                state.check_shape(C::SEQUENCE_NAME, &state_dims, "num_layers * directions, batch, hidden_size")?;
                state.clone()
            }
            None => C::State::zeros(&state_dims, x.dtype(), &x.device())?,
        };
        let directions = self.config.directions();
        let mut layer_input = x.clone();
        let mut final_states = Vec::with_capacity(self.cells.len());
        for (layer, cells) in self.cells.chunks(directions).enumerate() {
            if layer > 0 {
                layer_input = self.dropout_between_layers(&layer_input)?;
            }
            let mut outputs = Vec::with_capacity(directions);
            for (direction, cell) in cells.iter().enumerate() {
                let start = initial.select(layer * directions + direction)?;
                let (output, last) = run_over_time(cell, &layer_input, start, direction == 1)?;
                outputs.push(output);
                final_states.push(last);
            }
            layer_input = if directions == 1 { outputs.remove(0) } else { Var::cat(&[&outputs[0], &outputs[1]], 2)? };
        }
        Ok((layer_input, C::State::stack(&final_states)?))
    }

    /// The batch size of a valid input `[batch, time >= 1, input_size]`.
    fn check_input(&self, x: &Var) -> Result<usize> {
        let input = self.input_size;
        if x.rank() != 3 || x.dims()[2] != input {
            let expected = format!("expected [batch, time, {input}] (batch_first: batch, time, input_size)");
            return Err(Error::bad_shape(C::SEQUENCE_NAME, &x.shape(), expected));
        }
        if x.dims()[1] == 0 {
            return Err(Error::bad_shape(C::SEQUENCE_NAME, &x.shape(), "the sequence has no time steps"));
        }
        Ok(x.dims()[0])
    }

    /// Dropout on a layer's input sequence (every layer but the first), in training mode.
    fn dropout_between_layers(&self, x: &Var) -> Result<Var> {
        if self.config.dropout > 0.0 && self.vs.is_training() {
            x.dropout(self.config.dropout, self.vs.next_seed())
        } else {
            Ok(x.clone())
        }
    }
}

/// One direction of one layer over the whole sequence: from `x [batch, time, features]`
/// and the starting state, the hidden state at every step `[batch, time, hidden]` and the
/// last state. `reverse` steps from the last time step to the first; the output stays in
/// time order.
fn run_over_time<C: Recurrent>(cell: &C, x: &Var, state: C::State, reverse: bool) -> Result<(Var, C::State)> {
    let (batch, time, features) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    let (gate_rows, hidden) = (cell.weights().weight_ih.dims()[0], cell.weights().hidden_size());
    // Time-major, so that each step's input projection is one contiguous block, and in
    // the order of the steps.
    let reversed_time =
        || -> Result<Tensor> { Tensor::arange_step(time as f64 - 1.0, -1.0, -1.0, DType::I64, &x.device()) };
    let mut x = x.permute(&[1, 0, 2])?;
    if reverse {
        x = x.index_select(0, &reversed_time()?)?;
    }
    // Every step's input term `x_t W_ih^T + b_ih`, in one matrix product.
    let x_gates =
        cell.weights().input_projection(&x.reshape([time * batch, features])?)?.reshape([time, batch, gate_rows])?;
    let (states, last) = cell.run(&x_gates, &state)?;
    let mut outputs = states.narrow(2, 0, hidden)?;
    if reverse {
        outputs = outputs.index_select(0, &reversed_time()?)?;
    }
    Ok((outputs.permute(&[1, 0, 2])?, last))
}

/// As a [`Module`]: the output sequence from a zero initial state (the final state is dropped).
impl<C: Recurrent> Module for Sequence<C> {
    fn forward(&self, x: &Var) -> Result<Var> {
        Ok(Sequence::forward(self, x, None)?.0)
    }
}

#[cfg(test)]
mod tests {
    use super::super::LstmState;
    use super::super::testing::{FixtureState, TOL, fixture_loss};
    use super::*;
    use crate::testing::{Fixture, assert_close};
    use crate::{AdamConfig, AdamW, Linear, Optimizer, loss};
    use aigc_tensor::{DType, Device, Tensor};

    const TWO_LAYERS: RnnConfig = RnnConfig { num_layers: 2, bias: true, dropout: 0.0, bidirectional: false };
    const BIDIRECTIONAL: RnnConfig = RnnConfig { bidirectional: true, ..TWO_LAYERS };

    fn store(seed: u64) -> VarStore {
        VarStore::new(DType::F64, &Device::Cpu, seed)
    }

    fn random(dims: &[usize], seed: u64) -> Var {
        Var::leaf(Tensor::uniform(dims, -1.0, 1.0, DType::F64, &Device::Cpu, seed).unwrap())
    }

    /// Runs a layer built under `vs.pp(model)` on the fixture's input and initial state,
    /// backpropagates the fixture's loss, and compares the output, the final state and every
    /// gradient with PyTorch's.
    fn check_against_pytorch<C: Recurrent<State: FixtureState>>(model: &str, build: impl Fn(&VarStore) -> Sequence<C>) {
        let (fx, vs) = (Fixture::rnn(), store(0));
        let key = |name: &str| format!("{model}.{name}");
        let layer = build(&vs.pp(model));
        fx.load_params(&vs, "");
        let x = Var::leaf(fx.get(&key("x")));
        let (out, last) = layer.forward(&x, Some(&C::State::initial(&fx, model))).unwrap();
        fx.assert_matches(out.value(), &key("out"), TOL);
        fx.assert_matches(last.hidden().value(), &key("h_n"), TOL);
        if let Some(c) = last.memory() {
            fx.assert_matches(c.value(), &key("c_n"), TOL);
        }
        fixture_loss(&out, last.hidden(), last.memory()).backward().unwrap();
        fx.assert_matches(&x.grad().unwrap(), &key("grad.x"), TOL);
        fx.assert_grads(&vs.pp(model), |param| key(&format!("grad.{param}")), TOL);
        let pytorch_parameters = fx.keys_under(&key("grad")).iter().filter(|k| k.starts_with("weight")).count();
        assert_eq!(layer.cells.len() * 2, pytorch_parameters, "{model}: as many weights as PyTorch");
    }

    #[test]
    fn two_layer_rnns_match_pytorch_outputs_states_and_gradients() {
        check_against_pytorch("rnn", |vs| Rnn::new(vs, 3, 5, Nonlinearity::Tanh, TWO_LAYERS).unwrap());
        let no_bias = RnnConfig { bias: false, ..TWO_LAYERS };
        check_against_pytorch("rnn_relu", |vs| Rnn::new(vs, 3, 5, Nonlinearity::Relu, no_bias).unwrap());
    }

    #[test]
    fn two_layer_lstm_matches_pytorch_outputs_states_and_gradients() {
        check_against_pytorch("lstm", |vs| Lstm::new(vs, 3, 5, TWO_LAYERS).unwrap());
    }

    #[test]
    fn two_layer_gru_matches_pytorch_outputs_states_and_gradients() {
        check_against_pytorch("gru", |vs| Gru::new(vs, 3, 5, TWO_LAYERS).unwrap());
    }

    #[test]
    fn bidirectional_layers_match_pytorch_outputs_states_and_gradients() {
        check_against_pytorch("bilstm", |vs| Lstm::new(vs, 3, 5, BIDIRECTIONAL).unwrap());
        check_against_pytorch("bigru", |vs| Gru::new(vs, 3, 5, BIDIRECTIONAL).unwrap());
    }

    #[test]
    fn parameters_have_pytorch_names_and_shapes() {
        let vs = store(0);
        let gru = Gru::new(&vs.pp("gru"), 3, 4, BIDIRECTIONAL).unwrap();
        let params: Vec<(String, Vec<usize>)> =
            vs.named_parameters().into_iter().map(|(n, v)| (n, v.dims().to_vec())).collect();
        let mut want = vec![];
        for (layer, input) in [(0, 3), (1, 8)] {
            for suffix in ["", "_reverse"] {
                want.push((format!("gru.weight_ih_l{layer}{suffix}"), vec![12, input]));
                want.push((format!("gru.weight_hh_l{layer}{suffix}"), vec![12, 4]));
                want.push((format!("gru.bias_ih_l{layer}{suffix}"), vec![12]));
                want.push((format!("gru.bias_hh_l{layer}{suffix}"), vec![12]));
            }
        }
        assert_eq!(params, want);
        let x = random(&[2, 5, 3], 1);
        let (out, h_n) = gru.forward(&x, None).unwrap();
        assert_eq!((out.dims(), h_n.dims()), (&[2, 5, 8][..], &[4, 2, 4][..]));
        let as_module = Module::forward(&gru, &x).unwrap();
        assert_eq!(as_module.value().to_vec::<f64>().unwrap(), out.value().to_vec::<f64>().unwrap());
    }

    #[test]
    fn dropout_acts_between_layers_in_training_only() {
        let config = RnnConfig { dropout: 0.5, ..TWO_LAYERS };
        let vs = store(3);
        let lstm = Lstm::new(&vs.pp("lstm"), 3, 6, config).unwrap();
        let plain_vs = store(3);
        let plain = Lstm::new(&plain_vs.pp("lstm"), 3, 6, TWO_LAYERS).unwrap();
        let x = random(&[2, 4, 3], 1);
        let values = |layer: &Lstm| layer.forward(&x, None).unwrap().0.value().to_vec::<f64>().unwrap();

        let without_dropout = values(&plain);
        let first = values(&lstm);
        assert_ne!(first, without_dropout, "training: dropout changes the output");
        assert_ne!(values(&lstm), first, "each forward draws a new mask");
        vs.set_seed_draws(0);
        assert_eq!(values(&lstm), first, "the masks are reproducible from the store's seed");
        vs.set_training(false);
        assert_eq!(values(&lstm), without_dropout, "evaluation: no dropout");

        let one_layer_vs = store(3);
        Lstm::new(&one_layer_vs, 3, 6, RnnConfig { dropout: 0.5, ..Default::default() })
            .unwrap()
            .forward(&x, None)
            .unwrap();
        assert_eq!(one_layer_vs.seed_draws(), 0, "no dropout after the last layer");
    }

    #[test]
    fn truncated_bptt_chunks_reproduce_the_whole_sequence_and_cut_the_gradient() {
        let vs = store(5);
        let lstm = Lstm::new(&vs, 3, 4, TWO_LAYERS).unwrap();
        let x = random(&[2, 6, 3], 7);
        let (whole, whole_state) = lstm.forward(&x, None).unwrap();

        let first_chunk = Var::leaf(x.value().narrow(1, 0, 3).unwrap());
        let second_chunk = Var::leaf(x.value().narrow(1, 3, 3).unwrap());
        let (out1, state1) = lstm.forward(&first_chunk, None).unwrap();
        let (out2, state2) = lstm.forward(&second_chunk, Some(&state1.detach())).unwrap();
        let chunked = Var::cat(&[&out1, &out2], 1).unwrap();
        assert_close(chunked.value(), whole.value(), TOL, "chunked output");
        assert_close(state2.h.value(), whole_state.h.value(), TOL, "chunked final h");
        assert_close(state2.c.value(), whole_state.c.value(), TOL, "chunked final c");

        out2.square().unwrap().sum_all().unwrap().backward().unwrap();
        assert!(second_chunk.grad().is_some());
        assert!(first_chunk.grad().is_none(), "the detached state stops the gradient at the chunk boundary");
    }

    #[test]
    fn lstm_learns_to_echo_the_input_from_three_steps_earlier() {
        let (batch, time, delay, hidden) = (16, 8, 3, 12);
        let vs = VarStore::new(DType::F32, &Device::Cpu, 11);
        let lstm = Lstm::new(&vs.pp("lstm"), 1, hidden, RnnConfig::default()).unwrap();
        let head = Linear::new(&vs.pp("head"), hidden, 1).unwrap();
        let mut opt = AdamW::adamw(vs.named_parameters(), AdamConfig { lr: 0.05, ..Default::default() }).unwrap();
        let echo_loss = |seed: u64| -> Var {
            let x = Tensor::uniform([batch, time, 1], -1.0, 1.0, DType::F32, &Device::Cpu, seed).unwrap();
            let (hidden_states, _) = lstm.forward(&Var::constant(x.clone()), None).unwrap();
            let prediction = head.forward(&hidden_states).unwrap().narrow(1, delay, time - delay).unwrap();
            let target = Var::constant(x.narrow(1, 0, time - delay).unwrap());
            loss::mse(&prediction, &target).unwrap()
        };
        let held_out = |l: &Var| l.value().to_scalar::<f32>().unwrap();
        let first = held_out(&echo_loss(0));
        for step in 1..=120 {
            let l = echo_loss(step);
            opt.zero_grad();
            l.backward().unwrap();
            opt.step().unwrap();
        }
        let last = held_out(&echo_loss(0));
        assert!(last < 0.1 * first, "echo loss {first} -> {last}");
    }

    #[test]
    fn bad_inputs_states_and_configs_are_clear_errors() {
        let vs = store(0);
        let lstm = Lstm::new(&vs.pp("lstm"), 3, 4, TWO_LAYERS).unwrap();
        let err = |r: Result<(Var, LstmState)>| r.err().unwrap().to_string();
        let expected = "expected [batch, time, 3] (batch_first: batch, time, input_size)";
        assert_eq!(err(lstm.forward(&random(&[2, 3], 0), None)), format!("Lstm: input of shape [2, 3]: {expected}"));
        assert_eq!(
            err(lstm.forward(&random(&[2, 5, 2], 0), None)),
            format!("Lstm: input of shape [2, 5, 2]: {expected}")
        );
        assert_eq!(
            err(lstm.forward(&random(&[2, 0, 3], 0), None)),
            "Lstm: input of shape [2, 0, 3]: the sequence has no time steps"
        );
        let one_layer = LstmState { h: random(&[1, 2, 4], 0), c: random(&[1, 2, 4], 0) };
        assert_eq!(
            err(lstm.forward(&random(&[2, 5, 3], 0), Some(&one_layer))),
            "Lstm: state h has shape [1, 2, 4], expected [2, 2, 4] (num_layers * directions, batch, hidden_size)"
        );
        let gru = Gru::new(&vs.pp("gru"), 3, 4, RnnConfig::default()).unwrap();
        let err = gru.forward(&random(&[2, 5, 3], 0), Some(&random(&[1, 3, 4], 0))).err().unwrap().to_string();
        assert!(err.starts_with("Gru: state h has shape [1, 3, 4], expected [1, 2, 4]"), "{err}");
        let err = Rnn::new(&vs.pp("a"), 3, 4, Nonlinearity::Tanh, RnnConfig { num_layers: 0, ..Default::default() });
        assert_eq!(err.err().unwrap().to_string(), "Rnn: num_layers must be at least 1");
        let err = Gru::new(&vs.pp("b"), 3, 4, RnnConfig { dropout: 1.5, ..Default::default() });
        assert_eq!(err.err().unwrap().to_string(), "Gru: dropout 1.5 must lie in [0, 1]");
    }
}
