//! Copies and casts: materialise a strided view row-major, convert between dtypes, join
//! row-major buffers block by block (`cat` of contiguous tensors), and write a strided
//! source into a strided region of an existing buffer (`cat` of views and in-place
//! assignment), or add it there (in-place accumulation).

use super::map::map;
use crate::buffers::for_overwrite;
use crate::layout::{Layout, RunWalk, for_each_offsets};
use crate::{Element, FloatElem};

/// The elements of a strided view, row-major.
pub fn contiguous<T: Element>(src: &[T], layout: &Layout) -> Vec<T> {
    map(src, layout, |v| v)
}

/// Converts every element to another dtype (floats round to nearest; float to integer
/// truncates toward zero and saturates, like Rust's `as`).
pub fn cast<S: Element, D: Element>(src: &[S], layout: &Layout) -> Vec<D> {
    map(src, layout, |v| D::from_f64(v.to_f64()))
}

/// Joins row-major buffers along one dim (`cat` of contiguous tensors): each of `parts`
/// is `outer` blocks laid end to end, all its blocks of one length (its length over
/// `outer`), and the result holds block 0 of every part in order, then block 1 of every
/// part, and so on. `outer` is the product of the dims before the joined one.
pub fn interleave_blocks<T: Element>(parts: &[&[T]], outer: usize) -> Vec<T> {
    let total: usize = parts.iter().map(|part| part.len()).sum();
    let mut out = for_overwrite(total);
    if outer == 0 {
        return out;
    }
    debug_assert!(parts.iter().all(|part| part.len() % outer == 0), "every part must be `outer` whole blocks");
    // Part by part: its blocks land `total / outer` apart, after the earlier parts' blocks.
    let row = total / outer;
    let mut start = 0;
    for part in parts {
        let len = part.len() / outer;
        if len > 0 {
            for (block, src) in part.chunks_exact(len).enumerate() {
                out[block * row + start..][..len].copy_from_slice(src);
            }
        }
        start += len;
    }
    out
}

/// Writes the view `src`/`src_layout` into `dst` at the positions `dst_layout` names.
/// The two layouts must have the same shape.
pub fn copy_into<T: Element>(src: &[T], src_layout: &Layout, dst: &mut [T], dst_layout: &Layout) {
    combine_into(src, src_layout, dst, dst_layout, |d, s| *d = s);
}

/// Adds the view `src`/`src_layout` to the elements of `dst` that `dst_layout` names
/// (`dst += src`, computed in the accumulator type). The two layouts must have the
/// same shape.
pub fn add_into<T: FloatElem>(src: &[T], src_layout: &Layout, dst: &mut [T], dst_layout: &Layout) {
    combine_into(src, src_layout, dst, dst_layout, |d, s| *d = T::from_acc(d.to_acc() + s.to_acc()));
}

/// `f(dst element, src element)` for every pair of elements at the same index. Runs
/// along which both sides are contiguous are walked as slices (which vectorise).
fn combine_into<T: Element>(src: &[T], src_layout: &Layout, dst: &mut [T], dst_layout: &Layout, f: impl Fn(&mut T, T)) {
    debug_assert_eq!(src_layout.shape(), dst_layout.shape());
    let walk = RunWalk::new(src_layout.shape(), [src_layout.strides(), dst_layout.strides()]);
    let len = walk.run_len();
    if len == 0 {
        return;
    }
    if walk.run_strides() == [1, 1] {
        walk.for_each_run([src_layout.offset(), dst_layout.offset()], |[os, od]| {
            dst[od..od + len].iter_mut().zip(&src[os..os + len]).for_each(|(d, &s)| f(d, s))
        });
        return;
    }
    for_each_offsets(
        src_layout.shape(),
        [src_layout.strides(), dst_layout.strides()],
        [src_layout.offset(), dst_layout.offset()],
        |[os, od]| f(&mut dst[od], src[os]),
    );
}
