//! Recurrent layers run over a whole sequence in one call, forward and backward through
//! time: the Elman RNN (tanh or relu), the LSTM (Hochreiter & Schmidhuber 1997) and the
//! GRU (Cho et al. 2014), with PyTorch's gate order and equations (see [`Cell`]). This is
//! what cuDNN's and oneDNN's RNN primitives do; written as separate ops, one LSTM step is
//! a dozen passes over `[batch, 4 * hidden]` plus the bookkeeping of slicing each step's
//! input out of the sequence, and that, not the arithmetic, dominated a step.
//!
//! Everything is **time-major**. The caller projects the whole input sequence at once,
//! `x_gates[t] = x_t W_ih^T + b_ih` (`[steps, batch, G * hidden]`, one GEMM), and passes
//! the initial state. Each step `t` is then one GEMM and one pass over the rows:
//!
//! ```text
//! h_gates[t] = h_{t-1} W_hh^T + b_hh                   GEMM, bias in its epilogue
//! state_t    = cell(x_gates[t], h_gates[t], state_{t-1})  the gate arithmetic, fused
//! ```
//!
//! A state row holds `S * hidden` values: `h` (S = 1), or `h` then `c` for the LSTM
//! (S = 2). The forward returns every step's state (`[steps, batch, S * hidden]`) and the
//! `h_gates` it computed, which the backward reuses.
//!
//! **Backward through time.** Walking the steps in reverse, with `d_state_t` the
//! gradient of the outputs at step `t` plus what step `t + 1` sent back:
//!
//! ```text
//! d_x_gates[t], d_h_gates[t], d_direct = cell_backward(.., d_state_t)
//! d_state_{t-1} (sent back)            = d_direct + [d_h_gates[t] W_hh, 0]
//! ```
//!
//! where `d_direct` is the part of the gradient of `state_{t-1}` that does not pass
//! through `h_gates` (the LSTM's `c`, the GRU's `z * h` term). The weight gradient is one
//! GEMM over all steps at the end, `d_W_hh = sum_t d_h_gates[t]^T h_{t-1}`, with
//! `batch * steps` as its inner dimension instead of `steps` products of depth `batch`;
//! `d_b_hh` is the column sum of `d_h_gates`.
//!
//! The cell equations are written once (`step`, `step_backward`) over a number type
//! and its activations: f32 runs them on SIMD vectors along each row (the activations
//! of [`math`], with the error bounds stated there), the other dtypes on scalars in their
//! accumulator type with the definitions of [`UnaryOp`]. The gate arithmetic of a step is
//! a small part of its GEMM's cost, so it runs on the calling thread; the GEMMs use the
//! kernels' pool. Where the GEMM would pack `W_hh` for every step's product, it is packed
//! once for the sequence instead (`StepWeights`, [`super::gemm::PackedA`]).

use super::gemm::{self, Epilogue, MatRef, PackedA, gemm_packed_a};
use super::matmul::matmul_fused;
use super::reduce::sum_columns;
use super::simd::{F32Vector, Isa, kernel, math};
use super::unary::UnaryOp;
use crate::layout::Layout;
use crate::{FloatElem, Real};
use std::ops::{Add, Mul, Sub};

/// A recurrent cell. With `x` the input projection and `h` the hidden projection of the
/// step (each including its bias) and `σ` the logistic sigmoid:
///
/// - `RnnTanh`, `RnnRelu`: `h' = act(x + h)`.
/// - `Lstm`, gate blocks `i, f, g, o`: `i = σ(x_i + h_i)`, `f = σ(x_f + h_f)`,
///   `g = tanh(x_g + h_g)`, `o = σ(x_o + h_o)`, `c' = f * c + i * g`, `h' = o * tanh(c')`.
/// - `Gru`, gate blocks `r, z, n`: `r = σ(x_r + h_r)`, `z = σ(x_z + h_z)`,
///   `n = tanh(x_n + r * h_n)`, `h' = (1 - z) * n + z * h_prev`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Cell {
    RnnTanh,
    RnnRelu,
    Lstm,
    Gru,
}

impl Cell {
    /// The number of gate blocks `G` of the projections.
    pub fn gates(self) -> usize {
        match self {
            Cell::RnnTanh | Cell::RnnRelu => 1,
            Cell::Lstm => 4,
            Cell::Gru => 3,
        }
    }

    /// The number of `hidden`-long parts `S` of a state row: 2 for the LSTM (`h`, `c`), else 1.
    pub fn state_parts(self) -> usize {
        if self == Cell::Lstm { 2 } else { 1 }
    }
}

/// The sizes of a sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SequenceDims {
    pub steps: usize,
    pub batch: usize,
    pub hidden: usize,
}

impl SequenceDims {
    /// Elements of one step's gate block `[batch, G * hidden]`.
    fn gate_len(&self, cell: Cell) -> usize {
        self.batch * cell.gates() * self.hidden
    }
    /// Elements of one step's state `[batch, S * hidden]`.
    fn state_len(&self, cell: Cell) -> usize {
        self.batch * cell.state_parts() * self.hidden
    }
}

/// What the forward computes: every step's state and hidden projection.
pub struct SequenceForward<T> {
    /// `[steps, batch, S * hidden]`.
    pub states: Vec<T>,
    /// `[steps, batch, G * hidden]`: `h_{t-1} W_hh^T + b_hh` of each step.
    pub hidden_gates: Vec<T>,
}

/// The gradients of a sequence's inputs.
pub struct SequenceGrads<T> {
    /// `[steps, batch, G * hidden]`.
    pub x_gates: Vec<T>,
    /// `[G * hidden, hidden]`.
    pub weight_hh: Vec<T>,
    /// `[G * hidden]` (the column sums of the hidden projections' gradient).
    pub bias_hh: Vec<T>,
    /// `[batch, S * hidden]`.
    pub state0: Vec<T>,
}

/// Runs `cell` over the sequence. `x_gates` is `[steps, batch, G * hidden]`, `weight_hh`
/// `[G * hidden, hidden]`, `bias_hh` `[G * hidden]`, `state0` `[batch, S * hidden]`, all
/// contiguous row-major.
///
/// # Panics
/// If a buffer's length does not match `dims`.
pub fn sequence_forward<T: FloatElem>(
    cell: Cell,
    dims: SequenceDims,
    x_gates: &[T],
    weight_hh: &[T],
    bias_hh: Option<&[T]>,
    state0: &[T],
) -> SequenceForward<T> {
    check_lengths(cell, dims, x_gates, weight_hh, state0);
    let (gate_len, state_len) = (dims.gate_len(cell), dims.state_len(cell));
    let mut states = crate::buffers::for_overwrite(dims.steps * state_len);
    let mut hidden_gates = crate::buffers::for_overwrite(dims.steps * gate_len);
    let (gh, sh) = (cell.gates() * dims.hidden, cell.state_parts() * dims.hidden);
    // h_{t-1} W_hh^T: W_hh^T is [hidden, G * hidden], and h is read out of the state rows.
    let w_hh_t = StepWeights::new(weight_hh, Layout::new(&[dims.hidden, gh], &[1, dims.hidden], 0), dims.batch);
    let h = Layout::new(&[dims.batch, dims.hidden], &[sh, 1], 0);
    for t in 0..dims.steps {
        let (done, rest) = states.split_at_mut(t * state_len);
        let prev = if t == 0 { state0 } else { &done[(t - 1) * state_len..] };
        let h_gates = &mut hidden_gates[t * gate_len..(t + 1) * gate_len];
        w_hh_t.times(prev, &h, bias_hh, h_gates);
        let x = &x_gates[t * gate_len..(t + 1) * gate_len];
        rows_forward(cell, dims.hidden, x, h_gates, &prev[..state_len], &mut rest[..state_len]);
    }
    SequenceForward { states, hidden_gates }
}

/// The gradients of [`sequence_forward`]'s inputs, given the gradient `d_states` of its
/// states (`[steps, batch, S * hidden]`) and what it returned (`[states, hidden_gates]`).
///
/// # Panics
/// If a buffer's length does not match `dims`.
pub fn sequence_backward<T: FloatElem>(
    cell: Cell,
    dims: SequenceDims,
    x_gates: &[T],
    weight_hh: &[T],
    state0: &[T],
    [states, hidden_gates]: [&[T]; 2],
    d_states: &[T],
) -> SequenceGrads<T> {
    check_lengths(cell, dims, x_gates, weight_hh, state0);
    let (gate_len, state_len) = (dims.gate_len(cell), dims.state_len(cell));
    for (buf, len, what) in
        [(d_states, state_len, "d_states"), (states, state_len, "states"), (hidden_gates, gate_len, "hidden_gates")]
    {
        assert_eq!(buf.len(), dims.steps * len, "sequence_backward: {what} length");
    }
    let (gh, sh, hidden) = (cell.gates() * dims.hidden, cell.state_parts() * dims.hidden, dims.hidden);
    let mut d_x = crate::buffers::for_overwrite(dims.steps * gate_len);
    let mut d_h_gates = crate::buffers::for_overwrite(dims.steps * gate_len);
    // The gradient reaching the state of the step being walked from the steps after it.
    let mut carried = vec![T::from_f64(0.0); state_len];
    let mut d_state = vec![T::from_f64(0.0); state_len];
    let w_hh = StepWeights::new(weight_hh, Layout::contiguous(&[gh, hidden]), dims.batch);
    let mut through_gemm = crate::buffers::for_overwrite(dims.batch * hidden);
    for t in (0..dims.steps).rev() {
        for ((d, &out), &back) in d_state.iter_mut().zip(&d_states[t * state_len..]).zip(&carried) {
            *d = T::from_acc(out.to_acc() + back.to_acc());
        }
        let prev = if t == 0 { state0 } else { &states[(t - 1) * state_len..t * state_len] };
        let block = t * gate_len..(t + 1) * gate_len;
        let grads = RowGrads { x: &mut d_x[block.clone()], h: &mut d_h_gates[block.clone()], prev: &mut carried };
        rows_backward(cell, hidden, &x_gates[block.clone()], &hidden_gates[block.clone()], prev, &d_state, grads);
        // h_{t-1} also fed the hidden projection: add d_h_gates[t] W_hh to its part.
        w_hh.times(&d_h_gates[block], &Layout::contiguous(&[dims.batch, gh]), None, &mut through_gemm);
        for (row, extra) in carried.chunks_exact_mut(sh).zip(through_gemm.chunks_exact(hidden)) {
            for (d, &e) in row[..hidden].iter_mut().zip(extra) {
                *d = T::from_acc(d.to_acc() + e.to_acc());
            }
        }
    }
    crate::buffers::recycle(through_gemm);
    // Every step's h_{t-1} as the rows of one matrix [steps * batch, hidden].
    let mut prev_h = Vec::with_capacity(dims.steps * dims.batch * hidden);
    let earlier = &states[..dims.steps.saturating_sub(1) * state_len];
    for row in state0.chunks_exact(sh).chain(earlier.chunks_exact(sh)) {
        prev_h.extend_from_slice(&row[..hidden]);
    }
    let rows = dims.steps * dims.batch;
    let weight_hh = matmul_fused(
        &d_h_gates,
        &Layout::new(&[gh, rows], &[1, gh], 0),
        &prev_h,
        &Layout::contiguous(&[rows, hidden]),
        None,
        None,
    );
    let bias_hh = sum_columns(&d_h_gates, gh, |v| v);
    SequenceGrads { x_gates: d_x, weight_hh, bias_hh, state0: carried }
}

/// `W_hh` or its transpose as every step of a sequence multiplies by it: `x W` for each
/// step's `x` (`batch x k`) and the same `W` (`k x n`).
enum StepWeights<'a, T> {
    /// `W^T` packed once for the whole sequence, each step computed as `(W^T x^T)^T`
    /// (f32, where that pays: [`StepWeights::new`]).
    Packed(PackedA),
    /// `W` read through its layout by each step's GEMM.
    InPlace(&'a [T], Layout),
}

impl<'a, T: FloatElem> StepWeights<'a, T> {
    /// `W` (`k x n`, `data` through `layout`) for steps of `batch` rows. `W^T` is packed
    /// once ([`PackedA`]) when `W` is f32 and the GEMM would pack the step's product
    /// (packing `W` on every step) and either computes it transposed (then the packed
    /// product runs the same tiles, less the packing) or the batch fills at least a
    /// quarter of a tile's columns.
    ///
    /// Measured on Zen 3 (AVX2) for an LSTM's backward over 32 steps, whose
    /// `d_h_gates[t] W_hh` the GEMM packs (depth `4 hidden` past the unpacked path's limit),
    /// ms packed per step -> packed once: one thread, batch x hidden `16 x 512` 42.2 ->
    /// 36.6, `32 x 512` 64.2 -> 54.4, `16 x 1024` 142 -> 114, `4 x 256` 5.1 -> 4.2, `128 x
    /// 256` 87.0 -> 87.3; two threads `16 x 512` 29.2 -> 25.0, `16 x 1024` 99.8 -> 68.5,
    /// `2 x 512` 15.3 -> 13.3. At one thread a batch filling under a quarter of the 16
    /// columns lost (`2 x 512` 12.8 -> 18.2, `3 x 512` 13.4 -> 15.1), and so did products
    /// that the GEMM streams unpacked (the forward's `h W_hh^T` at `16 x 512`: 14.7 ->
    /// 15.5 at one thread, 9.9 -> 11.4 at two; `2 x 128` backward 0.42 -> 0.98). Forward
    /// and backward together at `16 x 1100`, where the forward's depth passes the limit
    /// too: 304 -> 204 ms at one thread, 160 -> 125 at two. Training a 512-unit LSTM on
    /// characters (`rnn_shakespeare`, same losses): 15.4-15.7 -> 17.9-18.0 it/s at one
    /// thread, 24.9-25.2 -> 27.7-29.8 at two; a GRU 22.2-22.4 -> 24.0-24.9 and 34.9-35.8
    /// -> 39.4-40.3.
    fn new(data: &'a [T], layout: Layout, batch: usize) -> Self {
        let (k, n) = (layout.shape()[0], layout.shape()[1]);
        let [row_stride, col_stride] = [layout.strides()[0], layout.strides()[1]];
        let isa = Isa::best();
        // Both callers' `x` have contiguous rows.
        let pays = match gemm::packed_route(isa, [batch, n, k], [true, row_stride == 1]) {
            None => false,
            Some(transposed) => transposed || 4 * batch >= gemm::tile_shape(isa)[1],
        };
        match T::as_f32(data) {
            Some(w) if pays => {
                let w_t = MatRef { data: w, offset: layout.offset(), row_stride: col_stride, col_stride: row_stride };
                StepWeights::Packed(PackedA::new(n, k, w_t))
            }
            _ => StepWeights::InPlace(data, layout),
        }
    }

    /// `out = x W + bias` (`bias`: `n` values; `out`: `[batch, n]` row-major) for `x`
    /// (`batch x k`) read through its layout.
    fn times(&self, x: &[T], x_layout: &Layout, bias: Option<&[T]>, out: &mut [T]) {
        let w_t = match self {
            StepWeights::InPlace(data, layout) => {
                let product = matmul_fused(x, x_layout, data, layout, bias, None);
                out.copy_from_slice(&product);
                return crate::buffers::recycle(product);
            }
            StepWeights::Packed(w_t) => w_t,
        };
        let x = T::as_f32(x).expect("packed weights are f32, and so is x");
        let bias = bias.map(|bias| T::as_f32(bias).expect("packed weights are f32, and so is the bias"));
        let (batch, n) = (x_layout.shape()[0], w_t.rows());
        let [row_stride, col_stride] = [x_layout.strides()[0], x_layout.strides()[1]];
        let x_t = MatRef { data: x, offset: x_layout.offset(), row_stride: col_stride, col_stride: row_stride };
        let mut product_t = crate::buffers::for_overwrite(n * batch);
        gemm_packed_a(w_t, batch, x_t, &mut product_t, Epilogue::NONE);
        let rows = T::as_f32_mut(out).expect("T is f32").chunks_exact_mut(n);
        for (b, row) in rows.enumerate() {
            for (j, (o, &v)) in row.iter_mut().zip(product_t[b..].iter().step_by(batch)).enumerate() {
                *o = v + bias.map_or(0.0, |bias| bias[j]);
            }
        }
        crate::buffers::recycle(product_t);
    }
}

fn check_lengths<T>(cell: Cell, dims: SequenceDims, x_gates: &[T], weight_hh: &[T], state0: &[T]) {
    let gh = cell.gates() * dims.hidden;
    assert_eq!(x_gates.len(), dims.steps * dims.gate_len(cell), "recurrent sequence: x_gates length");
    assert_eq!(weight_hh.len(), gh * dims.hidden, "recurrent sequence: weight_hh length");
    assert_eq!(state0.len(), dims.state_len(cell), "recurrent sequence: state0 length");
}

/// The gradients one step's backward writes: `[batch, G * hidden]` for each projection
/// and `[batch, S * hidden]` for the previous state (the part not through `h_gates`).
struct RowGrads<'a, T> {
    x: &'a mut [T],
    h: &'a mut [T],
    prev: &'a mut [T],
}

/// The cell over every row of one step: `next[b] = cell(x[b], h_gates[b], prev[b])`.
fn rows_forward<T: FloatElem>(cell: Cell, hidden: usize, x: &[T], h_gates: &[T], prev: &[T], next: &mut [T]) {
    if let (Some(x), Some(h_gates), Some(prev)) = (T::as_f32(x), T::as_f32(h_gates), T::as_f32(prev)) {
        let next = T::as_f32_mut(next).expect("T is f32");
        return rows_forward_f32(Isa::best(), cell, hidden, x, h_gates, prev, next);
    }
    let (g, s) = (cell.gates(), cell.state_parts());
    for (b, next) in next.chunks_exact_mut(s * hidden).enumerate() {
        for j in 0..hidden {
            let lane = |buf: &[T], parts: usize, k: usize| buf[(b * parts + k) * hidden + j].to_acc();
            let out = step(cell, &ScalarMath, gather(g, |k| lane(x, g, k)), gather(g, |k| lane(h_gates, g, k)), {
                gather(s, |p| lane(prev, s, p))
            });
            for (p, v) in out.into_iter().take(s).enumerate() {
                next[p * hidden + j] = T::from_acc(v);
            }
        }
    }
}

/// The backward of [`rows_forward`] for the gradient `d_next` of its output.
fn rows_backward<T: FloatElem>(
    cell: Cell,
    hidden: usize,
    x: &[T],
    h_gates: &[T],
    prev: &[T],
    d_next: &[T],
    grads: RowGrads<T>,
) {
    if let (Some(x), Some(h_gates), Some(prev), Some(d_next)) =
        (T::as_f32(x), T::as_f32(h_gates), T::as_f32(prev), T::as_f32(d_next))
    {
        let [dx, dh, dp] = [grads.x, grads.h, grads.prev].map(|g| T::as_f32_mut(g).expect("T is f32"));
        return rows_backward_f32(Isa::best(), cell, hidden, [x, h_gates, prev, d_next], [dx, dh, dp]);
    }
    let (g, s) = (cell.gates(), cell.state_parts());
    for b in 0..d_next.len() / (s * hidden) {
        for j in 0..hidden {
            let at = |parts: usize, k: usize| (b * parts + k) * hidden + j;
            let lane = |buf: &[T], parts: usize, k: usize| buf[at(parts, k)].to_acc();
            let (dx, dh, dp) = step_backward(
                cell,
                &ScalarMath,
                gather(g, |k| lane(x, g, k)),
                gather(g, |k| lane(h_gates, g, k)),
                gather(s, |p| lane(prev, s, p)),
                gather(s, |p| lane(d_next, s, p)),
            );
            for k in 0..g {
                grads.x[at(g, k)] = T::from_acc(dx[k]);
                grads.h[at(g, k)] = T::from_acc(dh[k]);
            }
            for p in 0..s {
                grads.prev[at(s, p)] = T::from_acc(dp[p]);
            }
        }
    }
}

/// `[f(0), .., f(n - 1), 0, ..]`: up to four lanes, the rest zero.
#[inline(always)]
fn gather<R: Real, const N: usize>(n: usize, f: impl Fn(usize) -> R) -> [R; N] {
    std::array::from_fn(|k| if k < n { f(k) } else { R::zero() })
}

kernel! {
    /// [`rows_forward`] for f32, a vector of lanes of every row at a time.
    fn rows_forward_f32(cell: Cell, hidden: usize, x: &[f32], h_gates: &[f32], prev: &[f32], next: &mut [f32]) {
        let (g, s) = (cell.gates(), cell.state_parts());
        let zero = V::splat(0.0);
        for b in 0..next.len() / (s * hidden) {
            let mut j = 0;
            while j < hidden {
                let n = V::LANES.min(hidden - j);
                let load = |buf: &[f32], parts: usize, k: usize| load_lanes::<V>(buf, (b * parts + k) * hidden + j, n);
                let (mut xs, mut hs, mut ps) = ([zero; 4], [zero; 4], [zero; 2]);
                for k in 0..g {
                    (xs[k], hs[k]) = (load(x, g, k), load(h_gates, g, k));
                }
                for (p, v) in ps.iter_mut().enumerate().take(s) {
                    *v = load(prev, s, p);
                }
                let out = step(cell, &VectorMath, xs, hs, ps);
                for (p, v) in out.into_iter().enumerate().take(s) {
                    store_lanes(v, next, (b * s + p) * hidden + j, n);
                }
                j += V::LANES;
            }
        }
    }
}

kernel! {
    /// [`rows_backward`] for f32: inputs `[x, h_gates, prev, d_next]`, outputs
    /// `[d_x, d_h_gates, d_prev]`.
    fn rows_backward_f32(cell: Cell, hidden: usize, inputs: [&[f32]; 4], outputs: [&mut [f32]; 3]) {
        let (g, s) = (cell.gates(), cell.state_parts());
        let [x, h_gates, prev, d_next] = inputs;
        let [d_x, d_h, d_prev] = outputs;
        let zero = V::splat(0.0);
        for b in 0..d_next.len() / (s * hidden) {
            let mut j = 0;
            while j < hidden {
                let n = V::LANES.min(hidden - j);
                let at = |parts: usize, k: usize| (b * parts + k) * hidden + j;
                let (mut xs, mut hs, mut ps, mut ds) = ([zero; 4], [zero; 4], [zero; 2], [zero; 2]);
                for k in 0..g {
                    (xs[k], hs[k]) = (load_lanes::<V>(x, at(g, k), n), load_lanes::<V>(h_gates, at(g, k), n));
                }
                for p in 0..s {
                    (ps[p], ds[p]) = (load_lanes::<V>(prev, at(s, p), n), load_lanes::<V>(d_next, at(s, p), n));
                }
                let (dx, dh, dp) = step_backward(cell, &VectorMath, xs, hs, ps, ds);
                for k in 0..g {
                    store_lanes(dx[k], d_x, at(g, k), n);
                    store_lanes(dh[k], d_h, at(g, k), n);
                }
                for (p, v) in dp.into_iter().enumerate().take(s) {
                    store_lanes(v, d_prev, at(s, p), n);
                }
                j += V::LANES;
            }
        }
    }
}

/// `buf[start..start + n]` as a vector (`n <= LANES`; missing lanes are 0).
#[inline(always)]
fn load_lanes<V: F32Vector>(buf: &[f32], start: usize, n: usize) -> V {
    if n == V::LANES { V::load(&buf[start..]) } else { V::load_partial(&buf[start..start + n], 0.0) }
}

/// Stores the first `n` lanes of `v` at `buf[start..]`.
#[inline(always)]
fn store_lanes<V: F32Vector>(v: V, buf: &mut [f32], start: usize, n: usize) {
    if n == V::LANES { v.store(&mut buf[start..]) } else { v.store_partial(&mut buf[start..start + n]) }
}

/// The activations the cell equations use, for one kind of number: scalars in their
/// accumulator type ([`ScalarMath`]) or SIMD vectors ([`VectorMath`]).
trait Activations<N> {
    fn sigmoid(&self, x: N) -> N;
    fn tanh(&self, x: N) -> N;
    fn relu(&self, x: N) -> N;
    /// Relu's derivative: 1 where `x > 0`, else 0.
    fn positive(&self, x: N) -> N;
    fn one(&self) -> N;
    fn zero(&self) -> N;
}

/// The scalar definitions of [`UnaryOp`].
struct ScalarMath;

impl<R: Real> Activations<R> for ScalarMath {
    fn sigmoid(&self, x: R) -> R {
        UnaryOp::Sigmoid.apply(x)
    }
    fn tanh(&self, x: R) -> R {
        UnaryOp::Tanh.apply(x)
    }
    fn relu(&self, x: R) -> R {
        UnaryOp::Relu.apply(x)
    }
    fn positive(&self, x: R) -> R {
        if x > R::zero() { R::one() } else { R::zero() }
    }
    fn one(&self) -> R {
        R::one()
    }
    fn zero(&self) -> R {
        R::zero()
    }
}

/// The SIMD functions of [`math`], as the unary kernels use them.
struct VectorMath;

impl<V: F32Vector> Activations<V> for VectorMath {
    #[inline(always)]
    fn sigmoid(&self, x: V) -> V {
        math::sigmoid(x)
    }
    #[inline(always)]
    fn tanh(&self, x: V) -> V {
        math::tanh(x)
    }
    #[inline(always)]
    fn relu(&self, x: V) -> V {
        let zero = V::splat(0.0);
        V::select(x.le(zero), zero, x)
    }
    #[inline(always)]
    fn positive(&self, x: V) -> V {
        V::select(x.gt(V::splat(0.0)), V::splat(1.0), V::splat(0.0))
    }
    #[inline(always)]
    fn one(&self) -> V {
        V::splat(1.0)
    }
    #[inline(always)]
    fn zero(&self) -> V {
        V::splat(0.0)
    }
}

/// One lane of one step: the next state's parts from the gate pre-activations of both
/// projections (`G` used entries each) and the previous state's parts.
#[inline(always)]
fn step<N, A>(cell: Cell, m: &A, x: [N; 4], h: [N; 4], prev: [N; 2]) -> [N; 2]
where
    N: Copy + Add<Output = N> + Sub<Output = N> + Mul<Output = N>,
    A: Activations<N>,
{
    match cell {
        Cell::RnnTanh => [m.tanh(x[0] + h[0]), prev[1]],
        Cell::RnnRelu => [m.relu(x[0] + h[0]), prev[1]],
        Cell::Lstm => {
            let (i, f) = (m.sigmoid(x[0] + h[0]), m.sigmoid(x[1] + h[1]));
            let (g, o) = (m.tanh(x[2] + h[2]), m.sigmoid(x[3] + h[3]));
            let c = f * prev[1] + i * g;
            [o * m.tanh(c), c]
        }
        Cell::Gru => {
            let (r, z) = (m.sigmoid(x[0] + h[0]), m.sigmoid(x[1] + h[1]));
            let n = m.tanh(x[2] + r * h[2]);
            // (1 - z) * n + z * h, written as n + z * (h - n).
            [n + z * (prev[0] - n), prev[1]]
        }
    }
}

/// The backward of `step` on one lane, given the gradient `d` of the next state's
/// parts: the gradients of the two projections' pre-activations and of the previous
/// state's parts (the latter without what flows through the hidden projection).
#[inline(always)]
#[allow(clippy::type_complexity)]
fn step_backward<N, A>(cell: Cell, m: &A, x: [N; 4], h: [N; 4], prev: [N; 2], d: [N; 2]) -> ([N; 4], [N; 4], [N; 2])
where
    N: Copy + Add<Output = N> + Sub<Output = N> + Mul<Output = N>,
    A: Activations<N>,
{
    let (one, zero) = (m.one(), m.zero());
    match cell {
        Cell::RnnTanh | Cell::RnnRelu => {
            let a = x[0] + h[0];
            let da = if cell == Cell::RnnTanh {
                let y = m.tanh(a);
                d[0] * (one - y * y)
            } else {
                d[0] * m.positive(a)
            };
            let gates = [da, zero, zero, zero];
            (gates, gates, [zero, zero])
        }
        Cell::Lstm => {
            let (i, f) = (m.sigmoid(x[0] + h[0]), m.sigmoid(x[1] + h[1]));
            let (g, o) = (m.tanh(x[2] + h[2]), m.sigmoid(x[3] + h[3]));
            let c = f * prev[1] + i * g;
            let tanh_c = m.tanh(c);
            // The gradient of c' from both of its uses: the output and the next step.
            let dc = d[1] + d[0] * o * (one - tanh_c * tanh_c);
            let gates = [
                dc * g * i * (one - i),
                dc * prev[1] * f * (one - f),
                dc * i * (one - g * g),
                d[0] * tanh_c * o * (one - o),
            ];
            (gates, gates, [zero, dc * f])
        }
        Cell::Gru => {
            let (r, z) = (m.sigmoid(x[0] + h[0]), m.sigmoid(x[1] + h[1]));
            let n = m.tanh(x[2] + r * h[2]);
            let dn = d[0] * (one - z) * (one - n * n);
            let dr = dn * h[2] * r * (one - r);
            let dz = d[0] * (prev[0] - n) * z * (one - z);
            ([dr, dz, dn, zero], [dr, dz, dn * r, zero], [d[0] * z, zero])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::simd::test_isas;

    const CELLS: [Cell; 4] = [Cell::RnnTanh, Cell::RnnRelu, Cell::Lstm, Cell::Gru];

    /// Deterministic values in [-1.5, 1.5).
    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 11) as f64 / (1u64 << 53) as f64 * 3.0 - 1.5
            })
            .collect()
    }

    struct Problem {
        cell: Cell,
        dims: SequenceDims,
        x: Vec<f64>,
        w: Vec<f64>,
        b: Vec<f64>,
        s0: Vec<f64>,
    }

    fn problem(cell: Cell, steps: usize, batch: usize, hidden: usize, seed: u64) -> Problem {
        let dims = SequenceDims { steps, batch, hidden };
        let gh = cell.gates() * hidden;
        Problem {
            cell,
            dims,
            x: values(steps * batch * gh, seed),
            w: values(gh * hidden, seed + 1).iter().map(|v| v * 0.5).collect(),
            b: values(gh, seed + 2),
            s0: values(dims.state_len(cell), seed + 3),
        }
    }

    /// The sequence written out step by step, lane by lane, in f64: the reference.
    fn naive_states(p: &Problem, x: &[f64], w: &[f64], s0: &[f64]) -> Vec<f64> {
        let (cell, d) = (p.cell, p.dims);
        let (g, s, hdim) = (cell.gates(), cell.state_parts(), d.hidden);
        let sig = |v: f64| 1.0 / (1.0 + (-v).exp());
        let mut state = s0.to_vec();
        let mut all = Vec::new();
        for t in 0..d.steps {
            let mut next = vec![0.0; state.len()];
            for b in 0..d.batch {
                let h = &state[b * s * hdim..b * s * hdim + hdim];
                // hg[k * H + j] = sum_i W[k * H + j, i] h[i] + b
                let hg: Vec<f64> =
                    (0..g * hdim).map(|r| (0..hdim).map(|i| w[r * hdim + i] * h[i]).sum::<f64>() + p.b[r]).collect();
                let xg = &x[(t * d.batch + b) * g * hdim..][..g * hdim];
                for j in 0..hdim {
                    let a = |k: usize| xg[k * hdim + j] + hg[k * hdim + j];
                    let out = &mut next[b * s * hdim..];
                    match cell {
                        Cell::RnnTanh => out[j] = a(0).tanh(),
                        Cell::RnnRelu => out[j] = a(0).max(0.0),
                        Cell::Lstm => {
                            let c = sig(a(1)) * state[b * s * hdim + hdim + j] + sig(a(0)) * a(2).tanh();
                            out[hdim + j] = c;
                            out[j] = sig(a(3)) * c.tanh();
                        }
                        Cell::Gru => {
                            let (r, z) = (sig(a(0)), sig(a(1)));
                            let n = (xg[2 * hdim + j] + r * hg[2 * hdim + j]).tanh();
                            out[j] = (1.0 - z) * n + z * h[j];
                        }
                    }
                }
            }
            all.extend_from_slice(&next);
            state = next;
        }
        all
    }

    fn run_forward<T: FloatElem>(p: &Problem) -> SequenceForward<T> {
        let conv = |v: &[f64]| v.iter().map(|&x| T::from_f64(x)).collect::<Vec<T>>();
        sequence_forward(p.cell, p.dims, &conv(&p.x), &conv(&p.w), Some(&conv(&p.b)), &conv(&p.s0))
    }

    #[test]
    fn forward_matches_the_naive_recurrence_in_f64_and_f32() {
        for cell in CELLS {
            // hidden 13: one full AVX2 vector and a tail; batch 3; 4 steps.
            let p = problem(cell, 4, 3, 13, 7);
            let want = naive_states(&p, &p.x, &p.w, &p.s0);
            let got64 = run_forward::<f64>(&p).states;
            let got32 = run_forward::<f32>(&p).states;
            for (i, w) in want.iter().enumerate() {
                assert!((got64[i] - w).abs() < 1e-12, "{cell:?} f64 state {i}: {} vs {w}", got64[i]);
                assert!((got32[i] as f64 - w).abs() < 2e-5, "{cell:?} f32 state {i}: {} vs {w}", got32[i]);
            }
        }
    }

    /// The loss `sum(states * weights)` of the naive recurrence, for finite differences.
    fn naive_loss(p: &Problem, x: &[f64], w: &[f64], s0: &[f64], weights: &[f64]) -> f64 {
        naive_states(p, x, w, s0).iter().zip(weights).map(|(a, b)| a * b).sum()
    }

    #[test]
    fn backward_matches_finite_differences_of_the_naive_recurrence() {
        for cell in CELLS {
            let p = problem(cell, 3, 2, 5, 11);
            let fwd = run_forward::<f64>(&p);
            let weights = values(fwd.states.len(), 99);
            let grads =
                sequence_backward(p.cell, p.dims, &p.x, &p.w, &p.s0, [&fwd.states, &fwd.hidden_gates], &weights);
            let eps = 1e-6;
            let check = |name: &str, input: &[f64], got: &[f64], loss: &dyn Fn(&[f64]) -> f64| {
                for i in 0..input.len() {
                    let (mut up, mut down) = (input.to_vec(), input.to_vec());
                    up[i] += eps;
                    down[i] -= eps;
                    let want = (loss(&up) - loss(&down)) / (2.0 * eps);
                    assert!((got[i] - want).abs() < 1e-6, "{cell:?} d{name}[{i}]: {} vs {want}", got[i]);
                }
            };
            check("x", &p.x, &grads.x_gates, &|x| naive_loss(&p, x, &p.w, &p.s0, &weights));
            check("w", &p.w, &grads.weight_hh, &|w| naive_loss(&p, &p.x, w, &p.s0, &weights));
            check("s0", &p.s0, &grads.state0, &|s0| naive_loss(&p, &p.x, &p.w, s0, &weights));
            let bias_loss = |b: &[f64]| {
                naive_loss(&Problem { b: b.to_vec(), ..problem(cell, 3, 2, 5, 11) }, &p.x, &p.w, &p.s0, &weights)
            };
            check("b", &p.b, &grads.bias_hh, &bias_loss);
        }
    }

    /// Sequences whose step products the GEMM would pack, so that `W_hh` is packed once
    /// (in the backward; in both directions once `hidden` passes the unpacked depth limit
    /// too), in f32 against the f64 path (checked above against the definition).
    #[test]
    fn f32_sequences_with_weights_packed_once_match_f64() {
        for (cell, batch, hidden) in [(Cell::Lstm, 8, 260), (Cell::Gru, 5, 350), (Cell::RnnTanh, 8, 1030)] {
            let mut p = problem(cell, 2, batch, hidden, 5);
            p.w.iter_mut().for_each(|w| *w *= 2.0 / (hidden as f64).sqrt());
            let gh = cell.gates() * hidden;
            let backward_weights = Layout::contiguous(&[gh, hidden]);
            assert!(matches!(StepWeights::new(&p.w, backward_weights.clone(), batch), StepWeights::InPlace(..)));
            let w32: Vec<f32> = p.w.iter().map(|&v| v as f32).collect();
            assert!(matches!(StepWeights::new(&w32, backward_weights, batch), StepWeights::Packed(_)), "{cell:?}");
            let forward_weights = Layout::new(&[hidden, gh], &[1, hidden], 0);
            let forward_packed = matches!(StepWeights::new(&w32, forward_weights, batch), StepWeights::Packed(_));
            assert_eq!(forward_packed, hidden > 1024, "{cell:?}");

            let (f64s, f32s) = (run_forward::<f64>(&p), run_forward::<f32>(&p));
            let close = |got: &[f32], want: &[f64], what: &str| {
                assert_eq!(got.len(), want.len());
                for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
                    assert!((g as f64 - w).abs() < 1e-4 * (1.0 + w.abs()), "{cell:?} {what}[{i}]: {g} vs {w}");
                }
            };
            close(&f32s.states, &f64s.states, "state");
            let d = values(f64s.states.len(), 17);
            let d32: Vec<f32> = d.iter().map(|&v| v as f32).collect();
            let (x32, s32): (Vec<f32>, Vec<f32>) =
                (p.x.iter().map(|&v| v as f32).collect(), p.s0.iter().map(|&v| v as f32).collect());
            let want = sequence_backward(cell, p.dims, &p.x, &p.w, &p.s0, [&f64s.states, &f64s.hidden_gates], &d);
            let got = sequence_backward(cell, p.dims, &x32, &w32, &s32, [&f32s.states, &f32s.hidden_gates], &d32);
            close(&got.x_gates, &want.x_gates, "d_x_gates");
            close(&got.weight_hh, &want.weight_hh, "d_weight_hh");
            close(&got.bias_hh, &want.bias_hh, "d_bias_hh");
            close(&got.state0, &want.state0, "d_state0");
        }
    }

    #[test]
    fn f32_kernels_agree_with_the_scalar_definition_on_every_isa() {
        for cell in CELLS {
            let (g, s, hidden, batch) = (cell.gates(), cell.state_parts(), 19, 2);
            let f32s = |n: usize, seed| values(n, seed).into_iter().map(|v| v as f32).collect::<Vec<f32>>();
            let (x, hg, prev, d) = (
                f32s(batch * g * hidden, 1),
                f32s(batch * g * hidden, 2),
                f32s(batch * s * hidden, 3),
                f32s(batch * s * hidden, 4),
            );
            let as64 = |v: &[f32]| v.iter().map(|&v| v as f64).collect::<Vec<f64>>();
            let mut want = vec![0.0f64; batch * s * hidden];
            rows_forward(cell, hidden, &as64(&x), &as64(&hg), &as64(&prev), &mut want);
            let (mut wx, mut wh, mut wp) = (vec![0.0f64; x.len()], vec![0.0f64; x.len()], vec![0.0f64; prev.len()]);
            let grads = RowGrads { x: &mut wx, h: &mut wh, prev: &mut wp };
            rows_backward(cell, hidden, &as64(&x), &as64(&hg), &as64(&prev), &as64(&d), grads);
            for isa in test_isas() {
                let mut next = vec![0.0f32; want.len()];
                rows_forward_f32(isa, cell, hidden, &x, &hg, &prev, &mut next);
                let (mut dx, mut dh, mut dp) = (vec![0.0f32; x.len()], vec![0.0f32; x.len()], vec![0.0f32; prev.len()]);
                rows_backward_f32(isa, cell, hidden, [&x, &hg, &prev, &d], [&mut dx, &mut dh, &mut dp]);
                for (got, want, what) in
                    [(&next, &want, "next"), (&dx, &wx, "d_x"), (&dh, &wh, "d_h"), (&dp, &wp, "d_prev")]
                {
                    for (i, (a, b)) in got.iter().zip(want.iter()).enumerate() {
                        assert!(
                            (*a as f64 - b).abs() < 1e-5 * (1.0 + b.abs()),
                            "{cell:?} {isa:?} {what}[{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }
}
