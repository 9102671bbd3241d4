//! Copies and casts: materialise a strided view row-major, convert between dtypes, and
//! write a strided source into a strided region of an existing buffer (used by `cat`
//! and in-place assignment).

use super::map::map;
use crate::Element;
use crate::layout::{Layout, RunWalk, for_each_offsets};

/// The elements of a strided view, row-major.
pub fn contiguous<T: Element>(src: &[T], layout: &Layout) -> Vec<T> {
    map(src, layout, |v| v)
}

/// Converts every element to another dtype (floats round to nearest; float to integer
/// truncates toward zero and saturates, like Rust's `as`).
pub fn cast<S: Element, D: Element>(src: &[S], layout: &Layout) -> Vec<D> {
    map(src, layout, |v| D::from_f64(v.to_f64()))
}

/// Writes the view `src`/`src_layout` into `dst` at the positions `dst_layout` names.
/// The two layouts must have the same shape. Runs along which both sides are
/// contiguous are copied as slices.
pub fn copy_into<T: Element>(src: &[T], src_layout: &Layout, dst: &mut [T], dst_layout: &Layout) {
    debug_assert_eq!(src_layout.shape(), dst_layout.shape());
    let walk = RunWalk::new(src_layout.shape(), [src_layout.strides(), dst_layout.strides()]);
    let len = walk.run_len();
    if len == 0 {
        return;
    }
    if walk.run_strides() == [1, 1] {
        walk.for_each_run([src_layout.offset(), dst_layout.offset()], |[os, od]| {
            dst[od..od + len].copy_from_slice(&src[os..os + len])
        });
        return;
    }
    for_each_offsets(
        src_layout.shape(),
        [src_layout.strides(), dst_layout.strides()],
        [src_layout.offset(), dst_layout.offset()],
        |[os, od]| dst[od] = src[os],
    );
}
