//! Strided layouts: how an n-d index maps to a position in a flat buffer.
//!
//! A [`Layout`] is `(shape, strides, offset)`: element `[i0, i1, ..]` lives at
//! `offset + i0*strides[0] + i1*strides[1] + ..`. Views (transpose, slice, broadcast)
//! only change the layout, never the buffer. A stride of 0 repeats an element
//! (that is how broadcasting works without copies).
//!
//! The walkers [`for_each_offset`] and [`for_each_offsets`] visit every element of
//! one or several same-shaped layouts in row-major order. They first merge
//! dimensions that are contiguous with each other, so a contiguous tensor is
//! walked as one flat run no matter its rank.

use crate::dims::Dims;

/// Shape, strides (in elements) and offset of a strided view into a buffer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Layout {
    shape: Dims,
    strides: Dims,
    offset: usize,
}

/// Row-major (C order) strides for `shape`.
pub fn contiguous_strides(shape: &[usize]) -> Dims {
    let mut strides = Dims::zeros(shape.len());
    let mut acc = 1usize;
    for d in (0..shape.len()).rev() {
        strides[d] = acc;
        acc *= shape[d];
    }
    strides
}

impl Layout {
    /// A row-major layout starting at offset 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Self { shape: shape.into(), strides: contiguous_strides(shape), offset: 0 }
    }

    /// A layout with explicit strides and offset. The caller guarantees that every
    /// element it addresses lies inside the buffer it will be used with.
    pub fn new(shape: &[usize], strides: &[usize], offset: usize) -> Self {
        assert_eq!(shape.len(), strides.len(), "Layout::new: shape and strides need the same rank");
        Self { shape: shape.into(), strides: strides.into(), offset }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    pub fn offset(&self) -> usize {
        self.offset
    }
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements addressed.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// True when the elements are stored row-major with no gaps (offset may be non-zero).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for d in (0..self.shape.len()).rev() {
            if self.shape[d] != 1 && self.strides[d] != expected {
                return false;
            }
            expected *= self.shape[d];
        }
        true
    }

    /// `Some(start..end)` of the buffer when the view is contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous().then(|| self.offset..self.offset + self.numel())
    }

    /// One past the largest buffer position addressed (0 for an empty view).
    pub fn max_extent(&self) -> usize {
        if self.numel() == 0 {
            return 0;
        }
        self.offset + self.shape.iter().zip(self.strides.iter()).map(|(&n, &s)| (n - 1) * s).sum::<usize>() + 1
    }

    /// Reorders the dimensions: result dim `i` is input dim `perm[i]`.
    pub fn permute(&self, perm: &[usize]) -> Self {
        Self {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        }
    }

    /// Keeps `len` entries of dimension `dim` starting at `start`.
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Self {
        let mut out = self.clone();
        out.offset += start * self.strides[dim];
        out.shape[dim] = len;
        out
    }

    /// Keeps every `step`-th entry of dimension `dim` starting at `start`, `len` of them.
    pub fn strided_narrow(&self, dim: usize, start: usize, len: usize, step: usize) -> Self {
        let mut out = self.narrow(dim, start, len);
        out.strides[dim] *= step;
        out
    }

    /// Views the layout as `shape` by numpy broadcasting: the layout's dims align with
    /// the trailing dims of `shape`; size-1 and missing dims get stride 0.
    /// The caller has checked that the shapes are compatible.
    pub fn broadcast_to(&self, shape: &[usize]) -> Self {
        let extra = shape.len() - self.shape.len();
        let mut strides = Dims::zeros(shape.len());
        for (d, s) in strides.iter_mut().enumerate().skip(extra) {
            let src = d - extra;
            *s = if self.shape[src] == 1 && shape[d] != 1 { 0 } else { self.strides[src] };
        }
        Self { shape: shape.into(), strides, offset: self.offset }
    }

    /// Inserts a size-1 dimension at `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Self {
        let mut out = self.clone();
        let stride = if dim < self.rank() { self.strides[dim] * self.shape[dim] } else { 1 };
        out.shape.insert(dim, 1);
        out.strides.insert(dim, stride);
        out
    }

    /// Removes dimension `dim`, which must have size 1.
    pub fn squeeze(&self, dim: usize) -> Self {
        let mut out = self.clone();
        out.shape.remove(dim);
        out.strides.remove(dim);
        out
    }

    /// Views the same elements under a new shape without copying, if the strides allow
    /// it (the rule PyTorch's `view` uses: each run of merged input dims must be
    /// contiguous within itself). Returns `None` when a copy is needed.
    pub fn reshape(&self, shape: &[usize]) -> Option<Self> {
        if self.is_contiguous() {
            return Some(Self { shape: shape.into(), strides: contiguous_strides(shape), offset: self.offset });
        }
        let numel = self.numel();
        if numel == 0 {
            return Some(Self { shape: shape.into(), strides: contiguous_strides(shape), offset: self.offset });
        }
        // Drop size-1 dims of the input: they impose no constraint.
        let old: Vec<(usize, usize)> =
            self.shape.iter().zip(self.strides.iter()).filter(|(n, _)| **n != 1).map(|(&n, &s)| (n, s)).collect();
        let mut new_strides = Dims::zeros(shape.len());
        let (mut oi, mut ni) = (0usize, 0usize);
        while ni < shape.len() {
            if shape[ni] == 1 {
                new_strides[ni] = 1;
                ni += 1;
                continue;
            }
            // Take a run of old dims that is contiguous within itself.
            let mut run_size = old[oi].0;
            while oi + 1 < old.len() && old[oi].1 == old[oi + 1].1 * old[oi + 1].0 {
                oi += 1;
                run_size *= old[oi].0;
            }
            let run_inner_stride = old[oi].1;
            oi += 1;
            // The new dims starting at ni must multiply to exactly run_size.
            let mut acc = 1usize;
            let group_start = ni;
            while ni < shape.len() && acc < run_size {
                acc *= shape[ni];
                ni += 1;
            }
            if acc != run_size {
                return None;
            }
            let mut stride = run_inner_stride;
            for d in (group_start..ni).rev() {
                new_strides[d] = stride;
                stride *= shape[d];
            }
        }
        if oi != old.len() {
            return None;
        }
        Some(Self { shape: shape.into(), strides: new_strides, offset: self.offset })
    }
}

/// Merges adjacent dims that are contiguous with each other in every layout, and drops
/// size-1 dims. Returns the simplified shape and per-layout strides (same walk order).
fn coalesce<const N: usize>(shape: &[usize], strides: [&[usize]; N]) -> (Dims, [Dims; N]) {
    let mut out_shape = Dims::new();
    let mut out_strides: [Dims; N] = std::array::from_fn(|_| Dims::new());
    for d in 0..shape.len() {
        if shape[d] == 1 {
            continue;
        }
        let mergeable = match out_shape.last() {
            Some(_) => (0..N).all(|k| {
                let prev = *out_strides[k].last().unwrap();
                prev == strides[k][d] * shape[d]
            }),
            None => false,
        };
        if mergeable {
            *out_shape.last_mut().unwrap() *= shape[d];
            for k in 0..N {
                *out_strides[k].last_mut().unwrap() = strides[k][d];
            }
        } else {
            out_shape.push(shape[d]);
            for k in 0..N {
                out_strides[k].push(strides[k][d]);
            }
        }
    }
    (out_shape, out_strides)
}

/// `N` same-shaped layouts walked together by runs: the dims are merged as far as every
/// layout allows (see `coalesce`), and the last merged dim is the run, the stretch that
/// the innermost loop covers with one constant stride per layout. A contiguous view is a
/// single run; `[m, n]` plus a broadcast row `[n]` is `m` runs of `n`.
pub struct RunWalk<const N: usize> {
    shape: Dims,
    strides: [Dims; N],
}

impl<const N: usize> RunWalk<N> {
    /// Plans the walk over `shape` for layouts with these strides.
    pub fn new(shape: &[usize], strides: [&[usize]; N]) -> Self {
        let (shape, strides) = if shape.contains(&0) {
            (Dims::from(&[0][..]), [(); N].map(|_| Dims::from(&[1][..])))
        } else {
            coalesce(shape, strides)
        };
        Self { shape, strides }
    }

    /// Elements per run (1 for a single element, 0 for an empty view).
    pub fn run_len(&self) -> usize {
        self.shape.last().copied().unwrap_or(1)
    }

    /// Each layout's stride along a run (1 for a single element).
    pub fn run_strides(&self) -> [usize; N] {
        std::array::from_fn(|k| self.strides[k].last().copied().unwrap_or(1))
    }

    /// Calls `f` with the offsets of the first element of every run, in row-major order,
    /// given the offsets of the first element of the view.
    pub fn for_each_run(&self, offsets: [usize; N], mut f: impl FnMut([usize; N])) {
        if self.run_len() == 0 {
            return;
        }
        let outer = self.shape.len().saturating_sub(1);
        let mut index = Dims::zeros(outer);
        let mut base = offsets;
        loop {
            f(base);
            // Advance the outer index like an odometer.
            let mut d = outer;
            loop {
                if d == 0 {
                    return;
                }
                d -= 1;
                index[d] += 1;
                for k in 0..N {
                    base[k] += self.strides[k][d];
                }
                if index[d] < self.shape[d] {
                    break;
                }
                for k in 0..N {
                    base[k] -= self.strides[k][d] * self.shape[d];
                }
                index[d] = 0;
            }
        }
    }
}

/// Calls `f` with the buffer offsets of every element of `N` same-shaped layouts,
/// in row-major order of `shape`. This is the one strided walker every kernel uses.
pub fn for_each_offsets<const N: usize>(
    shape: &[usize],
    strides: [&[usize]; N],
    offsets: [usize; N],
    mut f: impl FnMut([usize; N]),
) {
    let walk = RunWalk::new(shape, strides);
    let (len, run_strides) = (walk.run_len(), walk.run_strides());
    walk.for_each_run(offsets, |mut pos| {
        for _ in 0..len {
            f(pos);
            for k in 0..N {
                pos[k] += run_strides[k];
            }
        }
    });
}

/// Calls `f` with the buffer offset of every element of `layout`, row-major.
pub fn for_each_offset(layout: &Layout, mut f: impl FnMut(usize)) {
    for_each_offsets(layout.shape(), [layout.strides()], [layout.offset()], |[o]| f(o));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offsets(l: &Layout) -> Vec<usize> {
        let mut v = vec![];
        for_each_offset(l, |o| v.push(o));
        v
    }

    fn naive_offsets(l: &Layout) -> Vec<usize> {
        let n = l.numel();
        (0..n)
            .map(|mut flat| {
                let mut off = l.offset();
                for d in (0..l.rank()).rev() {
                    off += (flat % l.shape()[d]) * l.strides()[d];
                    flat /= l.shape()[d];
                }
                off
            })
            .collect()
    }

    #[test]
    fn walker_matches_naive_index_math_on_a_transpose_and_slice() {
        let l = Layout::contiguous(&[3, 4, 5]).permute(&[2, 0, 1]).narrow(1, 1, 2);
        assert_eq!(offsets(&l), naive_offsets(&l));
    }

    #[test]
    fn broadcast_repeats_elements_with_stride_zero() {
        let l = Layout::contiguous(&[3, 1]).broadcast_to(&[2, 3, 4]);
        assert_eq!(l.strides(), &[0, 1, 0]);
        assert_eq!(offsets(&l), naive_offsets(&l));
    }

    #[test]
    fn scalar_layout_visits_its_one_element() {
        let l = Layout::new(&[], &[], 7);
        assert_eq!(offsets(&l), vec![7]);
    }

    #[test]
    fn reshape_of_a_transpose_needs_a_copy_but_a_slice_of_rows_does_not() {
        let t = Layout::contiguous(&[4, 6]).permute(&[1, 0]);
        assert!(t.reshape(&[24]).is_none());
        let rows = Layout::contiguous(&[4, 6]).narrow(1, 0, 3); // [4,3] strides [6,1]
        let r = rows.reshape(&[2, 2, 3]).unwrap();
        assert_eq!(offsets(&r), naive_offsets(&rows));
    }

    proptest::proptest! {
        #[test]
        fn reshape_view_addresses_the_same_elements(
            dims in proptest::collection::vec(1usize..4, 1..5),
            perm_seed in 0usize..24,
            split in 0usize..3,
        ) {
            let base = Layout::contiguous(&dims);
            let mut perm: Vec<usize> = (0..dims.len()).collect();
            perm.rotate_left(perm_seed % dims.len());
            let l = base.permute(&perm);
            let numel = l.numel();
            // Candidate new shapes: flat, split off a factor, or merge all.
            let target: Vec<usize> = match split {
                0 => vec![numel],
                1 => { let mut s = l.shape().to_vec(); s.insert(0, 1); s }
                _ => l.shape().to_vec(),
            };
            if let Some(r) = l.reshape(&target) {
                proptest::prop_assert_eq!(offsets(&r), naive_offsets(&l));
            }
            proptest::prop_assert_eq!(offsets(&l), naive_offsets(&l));
        }
    }
}
