//! The elementwise walkers every pointwise kernel is built from: map one strided input,
//! zip two, or select between two by a mask. Contiguous inputs take a flat (and, when
//! large, multi-threaded) path; anything else goes through [`for_each_offsets`].
//!
//! [`SimdRuns`] is the walker of the f32 SIMD kernels: it cuts the output into runs along
//! which every input is contiguous or a single repeated value (a broadcast scalar, a
//! row repeated down a matrix, a column repeated across it), and hands each run to a
//! kernel as [`Operand`]s (see [`super::simd`]).

use super::simd::Operand;
use crate::layout::{Layout, RunWalk, for_each_offsets};
use crate::parallel;
use crate::{Element, buffers};

/// Below this many elements a pointwise op runs on the calling thread: handing work to
/// the pool costs more than it saves.
pub const PARALLEL_THRESHOLD: usize = 1 << 16;

/// Size of the pieces a threaded SIMD kernel is called on: large enough to amortise
/// the call, small enough to balance the threads.
const PIECE: usize = 1 << 14;

/// The shortest run worth a SIMD kernel call when a view has many runs: below this, the
/// call and the partial-vector tail cost more than the scalar walk.
const MIN_RUN: usize = 16;

/// Where the inputs of a run start.
enum Starts<const N: usize> {
    /// One run covering the whole output (every input contiguous).
    One([usize; N]),
    /// The runs of a strided walk, from these offsets of the first element.
    Walk(RunWalk<N>, [usize; N]),
}

/// The plan of an f32 SIMD elementwise kernel over `N` same-shaped inputs: the output
/// cut into runs of `len` elements, along each of which input `k` advances by
/// `strides[k]`, 1 (contiguous) or 0 (a repeated value).
pub struct SimdRuns<const N: usize> {
    len: usize,
    strides: [usize; N],
    starts: Starts<N>,
}

impl<const N: usize> SimdRuns<N> {
    /// Plans the walk, or `None` when some input moves by another stride along the
    /// innermost dims (a transposed or stepped view) or, without `broadcast`, stays put,
    /// or when the runs are too short to be worth it (under 16 elements).
    pub fn plan(layouts: [&Layout; N], broadcast: bool) -> Option<Self> {
        let numel = layouts[0].numel();
        // The common cases first, without planning a walk: every input contiguous, or a
        // single value repeated (a scalar operand, `x * 0.5`).
        let one_run = layouts.map(|l| match l.contiguous_range() {
            Some(range) => Some((range.start, 1)),
            None if broadcast && l.strides().iter().all(|&s| s == 0) => Some((l.offset(), 0)),
            None => None,
        });
        if one_run.iter().all(Option::is_some) {
            let one_run = one_run.map(|run| run.expect("checked above"));
            let (starts, strides) = (one_run.map(|(start, _)| start), one_run.map(|(_, stride)| stride));
            return Some(Self { len: numel, strides, starts: Starts::One(starts) });
        }
        let walk = RunWalk::new(layouts[0].shape(), layouts.map(Layout::strides));
        let strides = walk.run_strides();
        let usable = |s: usize| s == 1 || (broadcast && s == 0);
        if !strides.into_iter().all(usable) || (walk.run_len() < MIN_RUN && walk.run_len() < numel) {
            return None;
        }
        let offsets = layouts.map(Layout::offset);
        Some(Self { len: walk.run_len(), strides, starts: Starts::Walk(walk, offsets) })
    }

    /// Fills `out` (row-major, the layouts' shape) by calling `kernel(operands, out_piece)`
    /// on every run, or on pieces of it, threaded when the output is large.
    pub fn run(&self, inputs: [&[f32]; N], out: &mut [f32], kernel: impl Fn([Operand; N], &mut [f32]) + Sync) {
        let len = self.len;
        if out.is_empty() || len == 0 {
            return;
        }
        // The kernel on `piece`, whose inputs start at `starts`.
        let call = |starts: [usize; N], piece: &mut [f32]| {
            let operands = std::array::from_fn(|k| match self.strides[k] {
                0 => Operand::Splat(inputs[k][starts[k]]),
                _ => Operand::Slice(&inputs[k][starts[k]..starts[k] + piece.len()]),
            });
            kernel(operands, piece)
        };
        if out.len() < PARALLEL_THRESHOLD {
            let mut runs = out.chunks_mut(len);
            self.for_each_run(|starts| call(starts, runs.next().expect("one output run per input run")));
            return;
        }
        let mut all_starts = Vec::with_capacity(out.len() / len);
        self.for_each_run(|starts| all_starts.push(starts));
        if len <= PIECE {
            // Whole runs, grouped into tasks of about a piece.
            let runs_per_task = PIECE / len;
            parallel::for_each_chunk_mut(out, runs_per_task * len, |task, runs| {
                for (r, run) in runs.chunks_mut(len).enumerate() {
                    call(all_starts[task * runs_per_task + r], run);
                }
            });
        } else {
            // Long runs, each cut into pieces.
            for (run, starts) in out.chunks_mut(len).zip(all_starts) {
                parallel::for_each_chunk_mut(run, PIECE, |p, piece| {
                    call(std::array::from_fn(|k| starts[k] + p * PIECE * self.strides[k]), piece)
                });
            }
        }
    }

    fn for_each_run(&self, mut f: impl FnMut([usize; N])) {
        match &self.starts {
            Starts::One(starts) => f(*starts),
            Starts::Walk(walk, offsets) => walk.for_each_run(*offsets, f),
        }
    }
}

/// `out[i] = f(src[i])` over a strided view, written row-major.
pub fn map<S: Element, D: Element>(src: &[S], layout: &Layout, f: impl Fn(S) -> D + Sync) -> Vec<D> {
    let mut out = buffers::for_overwrite(layout.numel());
    if out.is_empty() {
        return out; // an empty view reads nothing, wherever its offset points
    }
    if let Some(range) = layout.contiguous_range() {
        let s = &src[range];
        if s.len() >= PARALLEL_THRESHOLD {
            parallel::for_each_chunk_mut(&mut out, PIECE, |p, o| {
                o.iter_mut().zip(&s[p * PIECE..]).for_each(|(o, &v)| *o = f(v));
            });
        } else {
            out.iter_mut().zip(s).for_each(|(o, &v)| *o = f(v));
        }
        return out;
    }
    let out_strides = crate::layout::contiguous_strides(layout.shape());
    let walk = RunWalk::new(layout.shape(), [layout.strides(), &out_strides]);
    let len = walk.run_len();
    if len > 0 && walk.run_strides() == [1, 1] {
        // Runs of the source are contiguous (a permuted view whose last dim stays last,
        // as when attention heads are merged): each run is a slice, which vectorises.
        walk.for_each_run([layout.offset(), 0], |[o, d]| {
            out[d..d + len].iter_mut().zip(&src[o..o + len]).for_each(|(d, &v)| *d = f(v));
        });
        return out;
    }
    if len > 0 && walk.run_strides() == [0, 1] {
        // Runs of one repeated value (a broadcast view: the gradient of a sum is one
        // value over the whole shape): fills, on every thread when the run is long.
        walk.for_each_run([layout.offset(), 0], |[o, d]| {
            let (value, run) = (f(src[o]), &mut out[d..d + len]);
            if len >= PARALLEL_THRESHOLD {
                parallel::for_each_chunk_mut(run, PIECE, |_, piece| piece.fill(value));
            } else {
                run.fill(value);
            }
        });
        return out;
    }
    let mut dst = out.iter_mut();
    for_each_offsets(layout.shape(), [layout.strides()], [layout.offset()], |[o]| {
        *dst.next().expect("one output per element") = f(src[o])
    });
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
    let mut out = buffers::for_overwrite(la.numel());
    if out.is_empty() {
        return out;
    }
    if let (Some(ra), Some(rb)) = (la.contiguous_range(), lb.contiguous_range()) {
        let (a, b) = (&a[ra], &b[rb]);
        if a.len() >= PARALLEL_THRESHOLD {
            parallel::for_each_chunk_mut(&mut out, PIECE, |p, o| {
                let (a, b) = (&a[p * PIECE..], &b[p * PIECE..]);
                o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = f(x, y));
            });
        } else {
            out.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = f(x, y));
        }
        return out;
    }
    let out_strides = crate::layout::contiguous_strides(la.shape());
    let walk = RunWalk::new(la.shape(), [la.strides(), lb.strides(), &out_strides]);
    let len = walk.run_len();
    if len > 0 && walk.run_strides() == [1, 1, 1] {
        // Both sources contiguous along each run: slices, as in `map`.
        walk.for_each_run([la.offset(), lb.offset(), 0], |[oa, ob, d]| {
            let (a, b) = (&a[oa..oa + len], &b[ob..ob + len]);
            out[d..d + len].iter_mut().zip(a.iter().zip(b)).for_each(|(o, (&x, &y))| *o = f(x, y));
        });
        return out;
    }
    let mut dst = out.iter_mut();
    for_each_offsets(la.shape(), [la.strides(), lb.strides()], [la.offset(), lb.offset()], |[oa, ob]| {
        *dst.next().expect("one output per element") = f(a[oa], b[ob])
    });
    out
}

/// `out[i] = if cond[i] != 0 { a[i] } else { b[i] }` over three same-shaped views.
pub fn select<C: Element, T: Element>(cond: &[C], lc: &Layout, a: &[T], la: &Layout, b: &[T], lb: &Layout) -> Vec<T> {
    let zero = C::zero();
    let mut out = buffers::for_overwrite(lc.numel());
    let mut dst = out.iter_mut();
    for_each_offsets(
        lc.shape(),
        [lc.strides(), la.strides(), lb.strides()],
        [lc.offset(), la.offset(), lb.offset()],
        |[oc, oa, ob]| *dst.next().expect("one output per element") = if cond[oc] != zero { a[oa] } else { b[ob] },
    );
    out
}

/// Layouts and data for the kernel tests: `[m, n]` views of every kind the SIMD walkers
/// distinguish.
#[cfg(test)]
pub(crate) mod testing {
    use crate::Layout;
    use proptest::prelude::*;

    /// How a test operand of shape `[m, n]` is laid out.
    #[derive(Clone, Copy, Debug)]
    pub enum View {
        /// Row-major.
        Contiguous,
        /// Whole rows of a wider buffer: unit stride along a row, gaps between rows.
        RowSlice,
        /// Column-major (a transpose): no unit-stride runs.
        Transposed,
        /// One row `[n]` broadcast down the `m` rows.
        Row,
        /// One column `[m, 1]` broadcast across the `n` columns.
        Column,
        /// One value broadcast everywhere.
        Scalar,
    }

    /// Any [`View`].
    pub fn view() -> impl Strategy<Value = View> {
        prop_oneof![
            Just(View::Contiguous),
            Just(View::RowSlice),
            Just(View::Transposed),
            Just(View::Row),
            Just(View::Column),
            Just(View::Scalar)
        ]
    }

    impl View {
        /// The layout of this view with shape `[m, n]`, offset by 1 into its buffer.
        pub fn layout(self, m: usize, n: usize) -> Layout {
            let shifted = |l: Layout| Layout::new(l.shape(), l.strides(), l.offset() + 1);
            shifted(match self {
                View::Contiguous => Layout::contiguous(&[m, n]),
                View::RowSlice => Layout::contiguous(&[m, n + 3]).narrow(1, 2, n),
                View::Transposed => Layout::contiguous(&[n, m]).permute(&[1, 0]),
                View::Row => Layout::contiguous(&[n]).broadcast_to(&[m, n]),
                View::Column => Layout::contiguous(&[m, 1]).broadcast_to(&[m, n]),
                View::Scalar => Layout::contiguous(&[]).broadcast_to(&[m, n]),
            })
        }
    }

    /// A buffer covering `layout`, filled with values in [-6, 6) from `seed`, with a NaN
    /// and an infinity mixed in when `specials` is set.
    pub fn data(layout: &Layout, seed: u64, specials: bool) -> Vec<f32> {
        let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut out: Vec<f32> = (0..layout.max_extent().max(1))
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 12.0 - 6.0
            })
            .collect();
        if specials && out.len() > 3 {
            let n = out.len();
            out[n / 2] = f32::NAN;
            out[n / 3] = f32::NEG_INFINITY;
        }
        out
    }

    /// The elements of a view, row-major.
    pub fn elements<T: Copy>(buf: &[T], layout: &Layout) -> Vec<T> {
        let mut out = Vec::new();
        crate::layout::for_each_offset(layout, |o| out.push(buf[o]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{data, elements, view};
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// `map` and `zip_map` on every kind of view (contiguous, rows with gaps, transposed,
        /// broadcast) equal the function applied to the views' elements in row-major order.
        #[test]
        fn map_and_zip_map_visit_every_view_in_row_major_order(
            m in 0usize..9, n in 0usize..9, va in view(), vb in view(), seed in any::<u64>(),
        ) {
            let (la, lb) = (va.layout(m, n), vb.layout(m, n));
            let (a, b) = (data(&la, seed, false), data(&lb, seed ^ 1, false));
            let (ea, eb) = (elements(&a, &la), elements(&b, &lb));
            let want: Vec<f32> = ea.iter().map(|x| x * 2.0).collect();
            prop_assert_eq!(map(&a, &la, |x| x * 2.0), want);
            let want: Vec<f32> = ea.iter().zip(&eb).map(|(x, y)| x - y).collect();
            prop_assert_eq!(zip_map(&a, &la, &b, &lb, |x, y| x - y), want);
        }
    }

    /// Broadcast views whose runs repeat one value are filled run by run, long runs on
    /// several threads: a value over a whole shape (a sum's gradient) and a column
    /// repeated across rows longer than the parallel threshold.
    #[test]
    fn broadcast_views_are_filled_with_their_values() {
        let src: Vec<f32> = (0..5).map(|i| i as f32 + 0.5).collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for layout in [Layout::new(&[300, 400], &[0, 0], 2), Layout::new(&[3, 70_000], &[1, 0], 1)] {
            let want: Vec<f32> = elements(&src, &layout).iter().map(|x| -x).collect();
            assert_eq!(pool.install(|| map(&src, &layout, |x: f32| -x)), want, "{layout:?}");
        }
    }

    /// A permuted rank-4 view whose last dim stays last (merging attention heads,
    /// `[B, H, T, D] -> [B, T, H, D]`) is copied run by run, in row-major order.
    #[test]
    fn permuted_view_with_contiguous_runs_is_copied_in_order() {
        let shape = [2, 3, 4, 5];
        let src: Vec<f32> = (0..120).map(|i| i as f32).collect();
        let layout = Layout::contiguous(&shape).permute(&[0, 2, 1, 3]);
        let got = map(&src, &layout, |x| x);
        let mut want = Vec::new();
        for b in 0..2 {
            for t in 0..4 {
                for h in 0..3 {
                    for d in 0..5 {
                        want.push(src[((b * 3 + h) * 4 + t) * 5 + d]);
                    }
                }
            }
        }
        assert_eq!(got, want);
    }
}
