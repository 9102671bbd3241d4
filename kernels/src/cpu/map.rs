//! The elementwise walkers every pointwise kernel is built from: map one strided input,
//! zip two, or select between two by a mask. Contiguous inputs take a flat (and, when
//! large, multi-threaded) path; anything else goes through [`for_each_offsets`].

use crate::Element;
use crate::layout::{Layout, for_each_offsets};
use rayon::prelude::*;

/// Below this many elements a pointwise op runs on the calling thread: handing work to
/// the pool costs more than it saves.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// `out[i] = f(src[i])` over a strided view, written row-major.
pub fn map<S: Element, D: Element>(src: &[S], layout: &Layout, f: impl Fn(S) -> D + Sync) -> Vec<D> {
    if let Some(range) = layout.contiguous_range() {
        let s = &src[range];
        if s.len() >= PARALLEL_THRESHOLD {
            return s.par_iter().map(|&v| f(v)).collect();
        }
        return s.iter().map(|&v| f(v)).collect();
    }
    let mut out = Vec::with_capacity(layout.numel());
    for_each_offsets(layout.shape(), [layout.strides()], [layout.offset()], |[o]| out.push(f(src[o])));
    out
}

/// `out[i] = f(a[i], b[i])` over two strided views of the same shape.
pub fn zip_map<A: Element, B: Element, D: Element>(
    a: &[A],
    la: &Layout,
    b: &[B],
    lb: &Layout,
    f: impl Fn(A, B) -> D + Sync,
) -> Vec<D> {
    debug_assert_eq!(la.shape(), lb.shape());
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        if a.len() >= PARALLEL_THRESHOLD {
            return a.par_iter().zip(b.par_iter()).map(|(&x, &y)| f(x, y)).collect();
        }
        return a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect();
    }
    let mut out = Vec::with_capacity(la.numel());
    for_each_offsets(la.shape(), [la.strides(), lb.strides()], [la.offset(), lb.offset()], |[oa, ob]| {
        out.push(f(a[oa], b[ob]))
    });
    out
}

/// `out[i] = if cond[i] != 0 { a[i] } else { b[i] }` over three same-shaped views.
pub fn select<C: Element, T: Element>(cond: &[C], lc: &Layout, a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    let zero = C::zero();
    let mut out = Vec::with_capacity(lc.numel());
    for_each_offsets(
        lc.shape(),
        [lc.strides(), la.strides(), lb.strides()],
        [lc.offset(), la.offset(), lb.offset()],
        |[oc, oa, ob]| out.push(if cond[oc] != zero { a[oa] } else { b[ob] }),
    );
    out
}
