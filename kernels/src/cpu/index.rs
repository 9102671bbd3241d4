//! Indexing kernels with PyTorch's semantics: `index_select`, `index_add`, `gather`,
//! `scatter_add` and `one_hot`.
//!
//! Each kernel reads row-major buffers seen as `[outer, size, inner]` blocks around the
//! indexed dimension `dim` (see [`DimBlocks`]); the tensor layer makes strided inputs
//! contiguous first. With `idx` the i64 indices:
//!
//! - `index_select`: `out[o, j, k] = src[o, idx[j], k]`
//! - `index_add`:    `out = base; out[o, idx[j], k] += src[o, j, k]`
//! - `gather`:       `out[o, j, k] = src[o, idx[o, j, k], k]`
//! - `scatter_add`:  `out = base; out[o, idx[o, j, k], k] += src[o, j, k]`
//! - `one_hot`:      `out[r, c] = (ids[r] == c)`
//!
//! Every index is checked (`0 <= i < size`) before anything is written; the first bad
//! one comes back as an [`OutOfRange`]. Work is split over disjoint output rows or
//! blocks with rayon when it is large.

use super::map::PARALLEL_THRESHOLD;
use crate::parallel;
use crate::{Element, FloatElem};

/// A row-major tensor seen around one dimension: `outer` blocks (the product of the
/// dims before it), each holding `size` rows (the dim itself) of `inner` elements (the
/// product of the dims after it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DimBlocks {
    pub outer: usize,
    pub size: usize,
    pub inner: usize,
}

impl DimBlocks {
    /// The blocks of a row-major tensor of `shape` around dimension `dim`.
    pub fn new(shape: &[usize], dim: usize) -> Self {
        Self { outer: shape[..dim].iter().product(), size: shape[dim], inner: shape[dim + 1..].iter().product() }
    }

    /// Number of elements of the tensor.
    pub fn numel(&self) -> usize {
        self.outer * self.size * self.inner
    }
}

/// An index outside `0..size`: the first one found, and the size of its dimension.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OutOfRange {
    pub index: i64,
    pub size: usize,
}

/// Checks that every index lies in `0..size`.
pub fn check_indices(indices: &[i64], size: usize) -> Result<(), OutOfRange> {
    match indices.iter().find(|&&i| usize::try_from(i).ok().is_none_or(|i| i >= size)) {
        Some(&index) => Err(OutOfRange { index, size }),
        None => Ok(()),
    }
}

/// Element types the scatter-add kernels can sum: the floats, rounded once per addition
/// as PyTorch's CPU `index_add_` does, and i64 (wrapping on overflow).
pub trait Accumulate: Element {
    /// `self + value`.
    fn accumulate(self, value: Self) -> Self;
}

impl<T: FloatElem> Accumulate for T {
    fn accumulate(self, value: Self) -> Self {
        T::from_acc(self.to_acc() + value.to_acc())
    }
}

impl Accumulate for i64 {
    fn accumulate(self, value: Self) -> Self {
        self.wrapping_add(value)
    }
}

/// Calls `fill(r, chunk)` for every chunk `r` of `chunk_len` elements of `out`, on the
/// thread pool when `out` is large. Chunks are disjoint, so this never races.
fn for_each_chunk<T: Element>(out: &mut [T], chunk_len: usize, fill: impl Fn(usize, &mut [T]) + Sync) {
    if out.is_empty() {
        return;
    }
    if out.len() >= PARALLEL_THRESHOLD {
        parallel::for_each_chunk_mut(out, chunk_len, fill);
    } else {
        out.chunks_mut(chunk_len).enumerate().for_each(|(r, chunk)| fill(r, chunk));
    }
}

/// `out[o, j, k] = src[o, indices[j], k]`: the rows `indices` of dimension `blocks.size`,
/// giving `[outer, indices.len(), inner]`.
pub fn index_select<T: Element>(src: &[T], blocks: DimBlocks, indices: &[i64]) -> Result<Vec<T>, OutOfRange> {
    check_indices(indices, blocks.size)?;
    let DimBlocks { outer, size, inner } = blocks;
    let n = indices.len();
    let mut out = crate::buffers::filled(outer * n * inner, T::zero());
    // Output row r = (o, j) copies input row (o, indices[j]).
    for_each_chunk(&mut out, inner, |r, row| {
        let (o, j) = (r / n, r % n);
        let start = (o * size + indices[j] as usize) * inner;
        row.copy_from_slice(&src[start..start + inner]);
    });
    Ok(out)
}

/// `base` with `source[o, j, :]` added to row `indices[j]` of every block `o`.
/// `base` is `[outer, size, inner]`, `source` is `[outer, indices.len(), inner]`.
pub fn index_add<T: Accumulate>(
    base: &[T],
    blocks: DimBlocks,
    indices: &[i64],
    source: &[T],
) -> Result<Vec<T>, OutOfRange> {
    check_indices(indices, blocks.size)?;
    let DimBlocks { size, inner, .. } = blocks;
    let n = indices.len();
    let mut out = base.to_vec();
    // One task per outer block: a block only receives its own source rows, so threads
    // never share an element. Within a block the loop is sequential, because repeated
    // indices add into the same row.
    for_each_chunk(&mut out, size * inner, |o, block| {
        for (j, &i) in indices.iter().enumerate() {
            let from = &source[(o * n + j) * inner..][..inner];
            let to = &mut block[i as usize * inner..][..inner];
            for (t, &f) in to.iter_mut().zip(from) {
                *t = t.accumulate(f);
            }
        }
    });
    Ok(out)
}

/// `out[o, j, k] = src[o, indices[o, j, k], k]`. `src` is `[outer, size, inner]`,
/// `indices` (and the result) `[outer, index_size, inner]`.
pub fn gather<T: Element>(
    src: &[T],
    blocks: DimBlocks,
    indices: &[i64],
    index_size: usize,
) -> Result<Vec<T>, OutOfRange> {
    check_indices(indices, blocks.size)?;
    let DimBlocks { size, inner, .. } = blocks;
    let mut out = crate::buffers::filled(indices.len(), T::zero());
    // Output row r = (o, j); element k reads row indices[o, j, k] of block o.
    for_each_chunk(&mut out, inner, |r, row| {
        let block = (r / index_size) * size;
        for (k, (value, &i)) in row.iter_mut().zip(&indices[r * inner..][..inner]).enumerate() {
            *value = src[(block + i as usize) * inner + k];
        }
    });
    Ok(out)
}

/// `base` with `source[o, j, k]` added at `[o, indices[o, j, k], k]`. `base` is
/// `[outer, size, inner]`; `indices` and `source` are `[outer, index_size, inner]`.
pub fn scatter_add<T: Accumulate>(
    base: &[T],
    blocks: DimBlocks,
    indices: &[i64],
    source: &[T],
    index_size: usize,
) -> Result<Vec<T>, OutOfRange> {
    check_indices(indices, blocks.size)?;
    let DimBlocks { size, inner, .. } = blocks;
    let block_len = index_size * inner;
    let mut out = base.to_vec();
    // One task per outer block, as in `index_add`: block o only receives entries of
    // block o of `source`. Within a block the loop is sequential, because repeated
    // indices add into the same element.
    for_each_chunk(&mut out, size * inner, |o, block| {
        let range = o * block_len..(o + 1) * block_len;
        for (pos, (&i, &value)) in indices[range.clone()].iter().zip(&source[range]).enumerate() {
            let target = &mut block[i as usize * inner + pos % inner];
            *target = target.accumulate(value);
        }
    });
    Ok(out)
}

/// `[ids.len(), num_classes]` rows with a one at column `ids[r]` and zeros elsewhere.
pub fn one_hot<T: Element>(ids: &[i64], num_classes: usize) -> Result<Vec<T>, OutOfRange> {
    check_indices(ids, num_classes)?;
    let mut out = crate::buffers::filled(ids.len() * num_classes, T::zero());
    for_each_chunk(&mut out, num_classes, |r, row| row[ids[r] as usize] = T::one());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::f16;

    #[test]
    fn blocks_split_a_shape_around_a_dim() {
        assert_eq!(DimBlocks::new(&[2, 3, 4, 5], 1), DimBlocks { outer: 2, size: 3, inner: 20 });
        assert_eq!(DimBlocks::new(&[7], 0), DimBlocks { outer: 1, size: 7, inner: 1 });
        assert_eq!(DimBlocks::new(&[2, 0, 4], 2).numel(), 0);
    }

    #[test]
    fn index_checks_reject_negative_and_too_large_indices() {
        assert_eq!(check_indices(&[0, 2, 1], 3), Ok(()));
        assert_eq!(check_indices(&[0, 3, -1], 3), Err(OutOfRange { index: 3, size: 3 }));
        assert_eq!(check_indices(&[-1], 3), Err(OutOfRange { index: -1, size: 3 }));
        assert_eq!(check_indices(&[], 0), Ok(()));
        assert_eq!(check_indices(&[0], 0), Err(OutOfRange { index: 0, size: 0 }));
    }

    #[test]
    fn small_cases_match_hand_computed_results() {
        // x = [[0, 1, 2], [3, 4, 5]] seen around dim 1.
        let x: Vec<i64> = (0..6).collect();
        let b = DimBlocks::new(&[2, 3], 1);
        assert_eq!(index_select(&x, b, &[2, 0, 2]).unwrap(), vec![2, 0, 2, 5, 3, 5]);
        assert_eq!(index_add(&x, b, &[1, 1], &[10, 20, 30, 40]).unwrap(), vec![0, 31, 2, 3, 74, 5]);
        assert_eq!(gather(&x, b, &[2, 2, 0, 1], 2).unwrap(), vec![2, 2, 3, 4]);
        assert_eq!(scatter_add(&x, b, &[0, 0, 2, 2], &[1, 2, 3, 4], 2).unwrap(), vec![3, 1, 2, 3, 4, 12]);
        assert_eq!(one_hot::<u8>(&[1, 0], 3).unwrap(), vec![0, 1, 0, 1, 0, 0]);
        assert_eq!(index_select(&x, b, &[3]), Err(OutOfRange { index: 3, size: 3 }));
    }

    #[test]
    fn half_precision_accumulates_with_one_rounding_per_addition() {
        // 2048 + 1 is not representable in f16 (spacing 2 there): each addition rounds.
        let base = [f16::from_f32(2048.0)];
        let out = index_add(&base, DimBlocks::new(&[1], 0), &[0, 0], &[f16::ONE, f16::ONE]).unwrap();
        assert_eq!(out[0].to_f32(), 2048.0);
    }

    #[test]
    fn large_inputs_take_the_threaded_path_and_agree_with_a_plain_loop() {
        let (outer, size, inner) = (3, 40, 700);
        let blocks = DimBlocks { outer, size, inner };
        let src: Vec<f32> = (0..blocks.numel()).map(|v| v as f32).collect();
        let indices: Vec<i64> = (0..size as i64).rev().chain([0, 0, 5]).collect();
        let n = indices.len();
        let selected = index_select(&src, blocks, &indices).unwrap();
        let source: Vec<f32> = (0..outer * n * inner).map(|v| (v % 7) as f32).collect();
        let added = index_add(&src, blocks, &indices, &source).unwrap();
        let mut want_added = src.clone();
        for o in 0..outer {
            for (j, &i) in indices.iter().enumerate() {
                for k in 0..inner {
                    let want = src[(o * size + i as usize) * inner + k];
                    assert_eq!(selected[(o * n + j) * inner + k], want);
                    want_added[(o * size + i as usize) * inner + k] += source[(o * n + j) * inner + k];
                }
            }
        }
        assert_eq!(added, want_added);
    }
}
