//! Softmax and log-softmax along one dimension of a strided tensor, and [`Rows`], the
//! strided row reader that the norm kernels share.
//!
//! For one line `x` along the dimension, with `m = max_j x_j`:
//!
//! - `softmax(x)_i = exp(x_i - m) / sum_j exp(x_j - m)`
//! - `log_softmax(x)_i = (x_i - m) - ln(sum_j exp(x_j - m))`
//!
//! Subtracting the max (the usual stabilisation, e.g. Goodfellow, Bengio & Courville,
//! *Deep Learning*, §4.1) keeps every exponential in `(0, 1]`, so nothing overflows and
//! the sum is at least 1. Everything is computed in the accumulator type and rounded
//! once on store.
//!
//! Special values follow PyTorch: a NaN anywhere in a line makes the whole line NaN, and
//! a line whose entries are all `-inf` gives NaN (there is no mass to normalise:
//! `-inf - (-inf)` is NaN).

use super::map::PARALLEL_THRESHOLD;
use crate::layout::{Layout, for_each_offsets};
use crate::{Element, FloatElem, Real};
use rayon::prelude::*;

/// Which of the two functions to compute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SoftmaxKind {
    /// `exp(x_i - m) / sum_j exp(x_j - m)`
    Softmax,
    /// `(x_i - m) - ln(sum_j exp(x_j - m))`
    LogSoftmax,
}

/// Softmax (or log-softmax) of every line along `dim` of a strided view. The output is
/// row-major with the view's shape. `dim < layout.rank()`.
pub fn softmax<T: FloatElem>(src: &[T], layout: &Layout, dim: usize, kind: SoftmaxKind) -> Vec<T> {
    // Each row holds the dims from `dim` on: a row-major `[n, inner]` block whose
    // columns are the lines to normalise.
    let inner: usize = layout.shape()[dim + 1..].iter().product();
    Rows::new(layout, dim).map(src, |_, block, out| softmax_columns(block, out, inner, kind))
}

/// Normalises every column of the row-major `[n, inner]` block `x` into `out`.
/// `x` is scratch: the softmax overwrites it with the shifted exponentials.
fn softmax_columns<T: FloatElem>(x: &mut [T::Acc], out: &mut [T], inner: usize, kind: SoftmaxKind) {
    let zero = <T::Acc as Element>::zero();
    let mut max = vec![T::Acc::NEG_INFINITY; inner];
    for line in x.chunks(inner) {
        for (m, &v) in max.iter_mut().zip(line) {
            *m = Real::max(*m, v);
        }
    }
    let mut sum = vec![zero; inner];
    for line in x.chunks_mut(inner) {
        for ((v, s), &m) in line.iter_mut().zip(&mut sum).zip(&max) {
            let e = (*v - m).exp();
            *s += e;
            if kind == SoftmaxKind::Softmax {
                *v = e;
            }
        }
    }
    let log_sum: Vec<T::Acc> = sum.iter().map(|s| s.ln()).collect();
    for (out_line, line) in out.chunks_mut(inner).zip(x.chunks(inner)) {
        for j in 0..inner {
            let y = match kind {
                SoftmaxKind::Softmax => line[j] / sum[j],
                SoftmaxKind::LogSoftmax => line[j] - max[j] - log_sum[j],
            };
            out_line[j] = T::from_acc(y);
        }
    }
}

/// A strided view seen as rows: the leading `split` dims index the rows, the remaining
/// dims form each row (read row-major). Row-wise kernels (softmax, norms) read a row into
/// a scratch buffer in the accumulator type, whatever the strides, and write one
/// contiguous output row.
pub(crate) struct Rows<'a> {
    row_shape: &'a [usize],
    row_strides: &'a [usize],
    starts: Vec<usize>,
    len: usize,
}

impl<'a> Rows<'a> {
    /// Splits `layout` after its first `split` dims (`split <= rank`).
    pub(crate) fn new(layout: &'a Layout, split: usize) -> Self {
        let (outer_shape, row_shape) = layout.shape().split_at(split);
        let (outer_strides, row_strides) = layout.strides().split_at(split);
        Self {
            row_shape,
            row_strides,
            starts: start_offsets(outer_shape, outer_strides, layout.offset()),
            len: row_shape.iter().product(),
        }
    }

    /// Replaces `buf` with row `row`, converted to the accumulator type.
    fn read<T: FloatElem>(&self, src: &[T], row: usize, buf: &mut Vec<T::Acc>) {
        buf.clear();
        for_each_offsets(self.row_shape, [self.row_strides], [self.starts[row]], |[o]| buf.push(src[o].to_acc()));
    }

    /// Computes every output row with `f(row_index, row_values, out_row)`, in parallel
    /// when the work is large. `row_values` is scratch that `f` may overwrite. Returns the
    /// rows concatenated (row-major output of the view's shape).
    pub(crate) fn map<T: FloatElem>(&self, src: &[T], f: impl Fn(usize, &mut [T::Acc], &mut [T]) + Sync) -> Vec<T> {
        let mut out = vec![T::zero(); self.starts.len() * self.len];
        if out.is_empty() {
            return out;
        }
        let rows_per_task = (PARALLEL_THRESHOLD / self.len).max(1);
        out.par_chunks_mut(self.len).enumerate().with_min_len(rows_per_task).for_each_init(
            || Vec::with_capacity(self.len),
            |buf, (row, out_row)| {
                self.read(src, row, buf);
                f(row, buf, out_row);
            },
        );
        out
    }
}

/// The buffer offset at which each index of the leading dims (`shape`, `strides`)
/// starts, in row-major order of those dims.
pub(crate) fn start_offsets(shape: &[usize], strides: &[usize], offset: usize) -> Vec<usize> {
    let mut starts = Vec::with_capacity(shape.iter().product());
    for_each_offsets(shape, [strides], [offset], |[o]| starts.push(o));
    starts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn softmax_of_a_transposed_view_normalises_each_line() {
        // [[0, 1, 2], [3, 4, 5]] transposed: lines along dim 0 are (0, 1, 2) and (3, 4, 5).
        let src: Vec<f64> = (0..6).map(f64::from).collect();
        let layout = Layout::contiguous(&[2, 3]).permute(&[1, 0]);
        let out = softmax(&src, &layout, 0, SoftmaxKind::Softmax);
        let z: f64 = (0..3).map(|i| f64::from(i).exp()).sum();
        for col in 0..2 {
            for row in 0..3 {
                let want = (row as f64).exp() / z;
                assert!((out[row * 2 + col] - want).abs() < 1e-15);
            }
        }
    }

    #[test]
    fn rows_read_a_stepped_view_row_major() {
        let src: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let layout = Layout::contiguous(&[4, 6]).strided_narrow(1, 1, 3, 2); // columns 1, 3, 5
        let rows = Rows::new(&layout, 1);
        let mut buf = Vec::new();
        rows.read(&src, 2, &mut buf);
        assert_eq!(buf, vec![13.0, 15.0, 17.0]);
    }
}
