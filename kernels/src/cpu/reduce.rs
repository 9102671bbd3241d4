//! Reductions. The tensor layer permutes the reduced dims to the end, so a reduction
//! here always folds *consecutive groups* of `group` elements of the row-major walk of a
//! layout into one output each. That single shape covers every choice of axes. (Groups
//! are never empty: the tensor layer answers reductions over zero-size dims itself.)
//!
//! Float sums accumulate in f64 whatever the storage type, so a sum of a million f32
//! values is exact to f32 rounding. `max`/`min` propagate NaN (as PyTorch); `argmax`/
//! `argmin` return the first position of the extreme, and the position of the first NaN
//! if there is one.

use crate::layout::{Layout, for_each_offset};
use crate::parallel;
use crate::{Element, FloatElem};

/// Folds each run of `group` consecutive elements (row-major over `layout`) with `fold`,
/// starting from `init`, and maps the final state with `finish`.
fn fold_groups<T: Element, S: Copy + Send + Sync, O: Send>(
    src: &[T],
    layout: &Layout,
    group: usize,
    init: S,
    fold: impl Fn(S, usize, T) -> S + Sync,
    finish: impl Fn(S) -> O + Sync,
) -> Vec<O> {
    assert!(group > 0, "reduce: the tensor layer handles reductions over empty dims");
    let numel = layout.numel();
    let groups = numel / group;
    if let Some(range) = layout.contiguous_range() {
        let data = &src[range];
        let run = |chunk: &[T]| finish(chunk.iter().enumerate().fold(init, |s, (i, &v)| fold(s, i, v)));
        if numel >= super::map::PARALLEL_THRESHOLD {
            return map_groups(data, group, run);
        }
        return data.chunks(group).map(run).collect();
    }
    let mut out = Vec::with_capacity(groups);
    let mut state = init;
    let mut i = 0usize;
    for_each_offset(layout, |o| {
        state = fold(state, i, src[o]);
        i += 1;
        if i == group {
            out.push(finish(state));
            state = init;
            i = 0;
        }
    });
    out
}

/// `run` on each `group`-long chunk of `data`, in parallel: groups are handed out about
/// 16k elements' worth at a time (at least one group), results in order.
fn map_groups<T: Sync, O: Send>(data: &[T], group: usize, run: impl Fn(&[T]) -> O + Sync) -> Vec<O> {
    let per_task = ((super::map::PARALLEL_THRESHOLD / 4) / group).max(1) * group;
    let tasks = data.len().div_ceil(per_task);
    let parts = parallel::map(tasks, |t| {
        data[t * per_task..data.len().min((t + 1) * per_task)].chunks(group).map(&run).collect::<Vec<O>>()
    });
    parts.into_iter().flatten().collect()
}

/// Sum of each group, accumulated in f64.
pub fn sum_float<T: FloatElem>(src: &[T], layout: &Layout, group: usize) -> Vec<T> {
    sum_terms(src, layout, group, |v| v)
}

/// Sum of the squares of each group, accumulated in f64: a squared norm that reads each
/// value once and writes no squared copy (a gradient norm over every parameter).
pub fn sum_squares<T: FloatElem>(src: &[T], layout: &Layout, group: usize) -> Vec<T> {
    sum_terms(src, layout, group, |v| v * v)
}

/// Sum of `term(v)` over each group, `v` widened to f64 and the sum accumulated in f64.
fn sum_terms<T: FloatElem>(
    src: &[T],
    layout: &Layout,
    group: usize,
    term: impl Fn(f64) -> f64 + Copy + Sync,
) -> Vec<T> {
    if let Some(range) = layout.contiguous_range() {
        // Contiguous groups: eight independent accumulators per group, so the adds
        // pipeline instead of waiting on one chain of f64 additions.
        let run = |chunk: &[T]| T::from_f64(sum_f64(chunk, term));
        let data = &src[range];
        if data.len() >= super::map::PARALLEL_THRESHOLD {
            return map_groups(data, group, run);
        }
        return data.chunks(group).map(run).collect();
    }
    if let Some(columns) = columns_of_contiguous(layout, group) {
        return sum_columns(&src[layout.offset()..layout.offset() + layout.numel()], columns, term);
    }
    fold_groups(src, layout, group, 0.0f64, |s, _, v| s + term(v.to_f64()), T::from_f64)
}

/// `Some(columns)` when the groups are the columns of a contiguous row-major matrix
/// `[group, columns]`: the kept dims trail in memory and the reduced dims lead, as when a
/// bias gradient is summed over the batch. The layout is then `[kept.., reduced..]` with
/// contiguous strides for the kept dims and the reduced dims' strides `columns` times theirs.
fn columns_of_contiguous(layout: &Layout, group: usize) -> Option<usize> {
    let columns = layout.numel() / group;
    if columns == 0 {
        return None;
    }
    let (shape, strides) = (layout.shape(), layout.strides());
    let split = (0..=shape.len()).find(|&s| shape[..s].iter().product::<usize>() == columns)?;
    let runs_with = |dims: std::ops::Range<usize>, unit: usize| {
        let mut expected = unit;
        dims.rev().all(|d| {
            let ok = shape[d] == 1 || strides[d] == expected;
            expected *= shape[d];
            ok
        })
    };
    (runs_with(0..split, 1) && runs_with(split..shape.len(), columns)).then_some(columns)
}

/// Column sums of `term(v)` over the row-major matrix `data` with `columns` columns, in
/// f64: each row is added into a row of accumulators (unit-stride, so it vectorises).
/// Large matrices are split by columns across threads; every column is still summed top
/// to bottom.
pub(crate) fn sum_columns<T: FloatElem>(data: &[T], columns: usize, term: impl Fn(f64) -> f64 + Sync) -> Vec<T> {
    const COLUMNS_PER_TASK: usize = 256;
    let sum_range = |cols: std::ops::Range<usize>| {
        let mut acc = vec![0.0f64; cols.len()];
        for row in data.chunks_exact(columns) {
            for (a, v) in acc.iter_mut().zip(&row[cols.clone()]) {
                *a += term(v.to_f64());
            }
        }
        acc.into_iter().map(T::from_f64).collect::<Vec<T>>()
    };
    if data.len() < super::map::PARALLEL_THRESHOLD || columns < 2 * COLUMNS_PER_TASK {
        return sum_range(0..columns);
    }
    let tasks = columns.div_ceil(COLUMNS_PER_TASK);
    let parts = parallel::map(tasks, |t| sum_range(t * COLUMNS_PER_TASK..columns.min((t + 1) * COLUMNS_PER_TASK)));
    parts.into_iter().flatten().collect()
}

/// The f64 sum of `term(v)` over `values`, in eight interleaved partial sums.
fn sum_f64<T: FloatElem>(values: &[T], term: impl Fn(f64) -> f64) -> f64 {
    let mut partial = [0.0f64; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (p, v) in partial.iter_mut().zip(chunk) {
            *p += term(v.to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|v| term(v.to_f64())).sum();
    partial.iter().sum::<f64>() + tail
}

/// Sum of each group of integers (wrapping on overflow, like PyTorch's int64 sum).
pub fn sum_i64(src: &[i64], layout: &Layout, group: usize) -> Vec<i64> {
    fold_groups(src, layout, group, 0i64, |s, _, v| s.wrapping_add(v), |s| s)
}

/// Whether `v` should replace `best` as the maximum (`want_max`) or minimum, treating
/// NaN as the most extreme value so that it propagates.
fn beats<T: Element>(v: T, best: T, want_max: bool) -> bool {
    #[allow(clippy::eq_op)]
    let v_nan = v != v;
    #[allow(clippy::eq_op)]
    let best_nan = best != best;
    if best_nan {
        return false;
    }
    v_nan || if want_max { v > best } else { v < best }
}

/// Maximum (`want_max`) or minimum of each non-empty group.
pub fn extreme<T: Element>(src: &[T], layout: &Layout, group: usize, want_max: bool) -> Vec<T> {
    fold_groups(
        src,
        layout,
        group,
        None,
        |best: Option<T>, _, v| match best {
            Some(b) if !beats(v, b, want_max) => Some(b),
            _ => Some(v),
        },
        |best| best.expect("the tensor layer rejects max/min over empty dims"),
    )
}

/// Position (within its group) of the maximum or minimum of each non-empty group.
pub fn arg_extreme<T: Element>(src: &[T], layout: &Layout, group: usize, want_max: bool) -> Vec<i64> {
    fold_groups(
        src,
        layout,
        group,
        None,
        |best: Option<(T, usize)>, i, v| match best {
            Some((b, bi)) if !beats(v, b, want_max) => Some((b, bi)),
            _ => Some((v, i)),
        },
        |best| best.expect("the tensor layer rejects argmax/argmin over empty dims").1 as i64,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_follow_the_row_major_walk_of_a_strided_view() {
        // [[0, 1, 2], [3, 4, 5]] transposed is [[0, 3], [1, 4], [2, 5]]: sums of rows 3, 5, 7.
        let src: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let l = Layout::contiguous(&[2, 3]).permute(&[1, 0]);
        assert_eq!(sum_float(&src, &l, 2), vec![3.0, 5.0, 7.0]);
        assert_eq!(arg_extreme(&src, &l, 2, true), vec![1, 1, 1]);
    }

    #[test]
    fn sums_over_leading_dims_are_column_sums() {
        // [2, 3, 4] summed over dims 0 and 1 (moved last: [4, 2, 3]) and over dim 0 alone
        // ([3, 4, 2]), against a plain walk of the same views.
        let src: Vec<f64> = (0..24).map(|v| (v * v % 7) as f64 - 2.5).collect();
        let base = Layout::contiguous(&[2, 3, 4]);
        for (perm, group) in [([2, 0, 1], 6), ([1, 2, 0], 2)] {
            let l = base.permute(&perm);
            assert_eq!(columns_of_contiguous(&l, group), Some(24 / group));
            let mut want = vec![0.0; 24 / group];
            let mut i = 0;
            for_each_offset(&l, |o| {
                want[i / group] += src[o];
                i += 1;
            });
            assert_eq!(sum_float(&src, &l, group), want);
        }
        // An empty kept dim is left to the general walk (no columns to split).
        assert_eq!(columns_of_contiguous(&Layout::contiguous(&[3, 0]).permute(&[1, 0]), 3), None);
        assert!(sum_float::<f32>(&[], &Layout::contiguous(&[3, 0]).permute(&[1, 0]), 3).is_empty());
        // A middle dim reduced is not a column sum; neither is a transposed matrix's row sum.
        assert_eq!(columns_of_contiguous(&base.permute(&[0, 2, 1]), 3), None);
        assert_eq!(columns_of_contiguous(&Layout::contiguous(&[3, 2]).permute(&[1, 0]).permute(&[1, 0]), 2), None);
        // Large enough to split across threads.
        let wide: Vec<f32> = (0..64 * 1024).map(|v| (v % 13) as f32).collect();
        let l = Layout::contiguous(&[64, 1024]).permute(&[1, 0]);
        let sums = sum_float(&wide, &l, 64);
        let want: Vec<f32> = (0..1024).map(|c| (0..64).map(|r| ((r * 1024 + c) % 13) as f32).sum()).collect();
        assert_eq!(sums, want);
    }

    #[test]
    fn nan_wins_max_and_argmax_points_at_it() {
        let src = [1.0f32, f32::NAN, 3.0];
        let l = Layout::contiguous(&[3]);
        assert!(extreme(&src, &l, 3, true)[0].is_nan());
        assert_eq!(arg_extreme(&src, &l, 3, true), vec![1]);
        assert_eq!(arg_extreme(&[2.0f32, 1.0, 1.0], &l, 3, false), vec![1]);
    }
}
