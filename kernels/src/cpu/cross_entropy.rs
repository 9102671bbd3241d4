//! Cross-entropy of class scores, fused with its log-softmax: the loss of each line from
//! one read of the scores, and the gradient from one read and one write.
//!
//! For one line `x` of `C` class scores (a line along the class dim of a strided
//! tensor), target class `t` and label smoothing `eps` (Szegedy et al. 2016, "Rethinking
//! the Inception architecture", §7), with the log-sum-exp `lse = m + ln sum_c e^(x_c - m)`
//! (`m = max_c x_c`, the usual stabilisation):
//!
//! ```text
//! loss  = (1 - eps) (lse - x_t) + eps (lse - mean_c x_c)      (= -sum_c q_c log p_c)
//! dx_c  = scale (e^(x_c - lse) - eps / C - (1 - eps) [c = t])   (= scale (p_c - q_c))
//! ```
//!
//! with `p = softmax(x)` and `q = (1 - eps) onehot(t) + eps / C` the smoothed target.
//! Without smoothing the mean is not taken (a class masked to `-inf` must not make the
//! loss `0 * inf`). A line whose target is ignored (`None`) has loss 0 and gradient 0,
//! whatever its scores.
//!
//! The composition these replace (log-softmax written out, `gather` of the target, and a
//! backward of log-sum-exp, exponential, one-hot and products) made about eight passes
//! over the scores and kept the log-probabilities alive from the forward to the
//! backward; the forward here keeps only `lse`, one value a line, which the backward
//! takes ([`cross_entropy_backward`]). The loss and `lse` are returned in f64: `lse`
//! rounded to a half-precision score type would move every probability by up to
//! `|lse| 2^-8` relative.
//!
//! For f32 scores whose class dim is the last and unit-stride (logits `[N, C]`), both
//! directions run a SIMD kernel per row: the forward takes the max in one pass (from
//! memory) and sums the exponentials by [`RowExp`] in a second (from cache), asking for
//! the next row's lines as it goes; the backward writes `e^(x - lse)` scaled, by
//! [`RowExp`] with `lse` in place of the max (every `x <= lse`), and puts the target's
//! entry right in f64. The other dtypes and layouts take the generic kernel, which reads
//! each block of lines into scratch in the accumulator type; it is also the f64
//! reference the SIMD kernels are tested against.

use super::map::PARALLEL_THRESHOLD;
use super::simd::math::{self, RowExp};
use super::simd::{F32Vector, Isa, Operand, Wide, kernel, map, max_of, sums};
use super::softmax::{Rows, UnitRows, for_row_blocks, in_pieces_fetching, rows_per_block};
use crate::layout::Layout;
use crate::parallel;
use crate::{Element, FloatElem, Real};

/// What the forward gives for one line.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LineLoss {
    /// `(1 - eps) (lse - x_t) + eps (lse - mean x)`; 0 for an ignored line.
    pub loss: f64,
    /// `ln sum_c e^(x_c)`, what [`cross_entropy_backward`] takes; NaN for an ignored line
    /// (not computed).
    pub log_sum_exp: f64,
}

impl LineLoss {
    /// An ignored line's.
    pub const IGNORED: LineLoss = LineLoss { loss: 0.0, log_sum_exp: f64::NAN };
}

/// The loss of every line along `dim` of a strided view of class scores, with
/// `targets[l]` the class of line `l` (lines in row-major order of the view's shape
/// without `dim`) or `None` to skip it, and label smoothing `smoothing` in `[0, 1]`.
/// The caller has checked that each target is below `layout.shape()[dim]` and that
/// there is one per line.
pub fn cross_entropy<T: FloatElem>(
    x: &[T],
    layout: &Layout,
    dim: usize,
    targets: &[Option<usize>],
    smoothing: f64,
) -> Vec<LineLoss> {
    let mut out = vec![LineLoss::IGNORED; targets.len()];
    let classes = layout.shape()[dim];
    if dim + 1 == layout.rank()
        && let Some(x) = T::as_f32(x)
        && let Some(rows) = UnitRows::new(layout)
    {
        let run = |first: usize, out: &mut [LineLoss]| {
            cross_entropy_f32(Isa::best(), x, &rows, first, &targets[first..first + out.len()], smoothing, out)
        };
        if out.len() * classes <= PARALLEL_THRESHOLD {
            run(0, &mut out);
        } else {
            let per_block = rows_per_block(out.len(), classes);
            parallel::for_each_chunk_mut(&mut out, per_block, |b, block| run(b * per_block, block));
        }
        return out;
    }
    let inner: usize = layout.shape()[dim + 1..].iter().product();
    let rows = Rows::new(layout, dim);
    // One task per block of outer rows, each a `[classes, inner]` block of `inner` lines.
    let rows_per_task = (PARALLEL_THRESHOLD / rows.len().max(1)).max(1);
    let task = |task: usize, out: &mut [LineLoss]| {
        let mut block = Vec::with_capacity(rows.len());
        for (r, lines) in out.chunks_mut(inner).enumerate() {
            rows.read(x, task * rows_per_task + r, &mut block);
            let first = (task * rows_per_task + r) * inner;
            for (j, line) in lines.iter_mut().enumerate() {
                if let Some(t) = targets[first + j] {
                    *line = column_loss::<T>(&block, inner, j, t, smoothing);
                }
            }
        }
    };
    if out.len() * classes <= PARALLEL_THRESHOLD || inner == 0 {
        out.chunks_mut((rows_per_task * inner).max(1)).enumerate().for_each(|(b, block)| task(b, block));
    } else {
        parallel::for_each_chunk_mut(&mut out, rows_per_task * inner, task);
    }
    out
}

/// The gradient of the mean (or any weighting) of [`cross_entropy`]'s losses with respect
/// to the scores: `scale (softmax(x) - q)` on every counted line, 0 on ignored ones, from
/// the forward's `log_sum_exp` of each line (`scale` is the weight of a line's loss times
/// the incoming gradient). The result is row-major with the view's shape.
pub fn cross_entropy_backward<T: FloatElem>(
    x: &[T],
    layout: &Layout,
    dim: usize,
    targets: &[Option<usize>],
    log_sum_exp: &[f64],
    smoothing: f64,
    scale: f64,
) -> Vec<T> {
    assert_eq!(targets.len(), log_sum_exp.len(), "cross_entropy_backward: a log-sum-exp per line");
    if dim + 1 == layout.rank()
        && let Some(x) = T::as_f32(x)
        && let Some(rows) = UnitRows::new(layout)
    {
        // Every row is written by the SIMD kernel.
        let mut out = crate::buffers::for_overwrite(layout.numel());
        let out_f32 = T::as_f32_mut(&mut out).expect("T is f32");
        for_row_blocks(out_f32, rows.n, |first, out| {
            let lines = first..first + out.len() / rows.n;
            let (targets, lse) = (&targets[lines.clone()], &log_sum_exp[lines]);
            cross_entropy_backward_f32(Isa::best(), x, &rows, first, targets, lse, (smoothing, scale), out)
        });
        return out;
    }
    let (classes, inner) = (layout.shape()[dim], layout.shape()[dim + 1..].iter().product::<usize>());
    let uniform = smoothing / classes as f64;
    Rows::new(layout, dim).map(x, |r, block, out| {
        for j in 0..inner {
            let line = r * inner + j;
            let Some(t) = targets[line] else {
                (0..classes).for_each(|c| out[c * inner + j] = T::zero());
                continue;
            };
            let lse = log_sum_exp[line];
            for c in 0..classes {
                let p = (block[c * inner + j].to_f64() - lse).exp();
                let onehot = if c == t { 1.0 - smoothing } else { 0.0 };
                out[c * inner + j] = T::from_f64(scale * (p - uniform - onehot));
            }
        }
    })
}

/// [`LineLoss`] of column `j` of a row-major `[classes, inner]` block, target `t`.
fn column_loss<T: FloatElem>(block: &[T::Acc], inner: usize, j: usize, t: usize, smoothing: f64) -> LineLoss {
    let column = || block[j..].iter().step_by(inner.max(1)).copied();
    let max = column().fold(<T::Acc as Real>::NEG_INFINITY, Real::max);
    let sum = column().fold(T::Acc::zero(), |s, v| s + (v - max).exp());
    let log_sum_exp = max.to_f64() + sum.to_f64().ln();
    let classes = block.len() / inner.max(1);
    let mean = || column().fold(0.0, |s, v| s + v.to_f64()) / classes as f64;
    LineLoss { loss: smoothed_loss(log_sum_exp, block[t * inner + j].to_f64(), mean, smoothing), log_sum_exp }
}

/// `(1 - eps) (lse - x_t) + eps (lse - mean)`, the mean not taken without smoothing.
#[inline(always)]
fn smoothed_loss(log_sum_exp: f64, target_score: f64, mean: impl FnOnce() -> f64, smoothing: f64) -> f64 {
    let target_term = log_sum_exp - target_score;
    if smoothing == 0.0 { target_term } else { (1.0 - smoothing) * target_term + smoothing * (log_sum_exp - mean()) }
}

kernel! {
    /// [`cross_entropy`] of whole rows `first..` of `x`, with SIMD, into `out` (a line each).
    fn cross_entropy_f32(
        x: &[f32],
        rows: &UnitRows,
        first: usize,
        targets: &[Option<usize>],
        smoothing: f64,
        out: &mut [LineLoss],
    ) {
        let n = rows.n;
        let last = first + out.len().saturating_sub(1);
        for (i, (line, target)) in out.iter_mut().zip(targets).enumerate() {
            let Some(t) = *target else { continue };
            let (row, next) = (rows.row(x, first + i), rows.row(x, (first + i + 1).min(last)));
            let max = max_of::<V>(row);
            // The exponentials and the sum of `x - m` (for the smoothing's mean: a sum of
            // `x` itself would lose the spread of a row far from 0 to the rounding of its
            // magnitude), a piece at a time, each after asking for the same lines of the
            // next row.
            let (mut sum, mut sum_x) = (0.0, 0.0);
            let exp = RowExp::<Wide<V>>::new(max);
            let wide_max = Wide::<V>::splat(max);
            in_pieces_fetching(next, |piece| {
                let (x, len) = ([Operand::Slice(&row[piece.clone()])], piece.len());
                let [e, s] = match &exp {
                    Some(exp) => sums::<Wide<V>, 1, 2>(x, len, |[v]| [exp.at(v), v - wide_max]),
                    None => sums::<Wide<V>, 1, 2>(x, len, |[v]| {
                        let shifted = v - wide_max;
                        [math::exp_nonpositive(shifted), shifted]
                    }),
                };
                (sum, sum_x) = (sum + e, sum_x + s);
            });
            // The sum of `RowExp`'s values carries its factor: its logarithm is
            // `log_factor` too large.
            let log_factor = exp.map_or(0.0, |exp| exp.log_factor());
            let log_sum_exp = max as f64 + ((sum as f64).ln() - log_factor);
            let mean = || max as f64 + sum_x as f64 / n as f64;
            *line = LineLoss { loss: smoothed_loss(log_sum_exp, row[t] as f64, mean, smoothing), log_sum_exp };
        }
    }
}

kernel! {
    /// [`cross_entropy_backward`] of whole rows `first..` of `x`, with SIMD, into `out`;
    /// `targets` and `log_sum_exp` start at row `first`, `(smoothing, scale)`.
    fn cross_entropy_backward_f32(
        x: &[f32],
        rows: &UnitRows,
        first: usize,
        targets: &[Option<usize>],
        log_sum_exp: &[f64],
        coefficients: (f64, f64),
        out: &mut [f32],
    ) {
        let ((smoothing, scale), n) = (coefficients, rows.n);
        let uniform = smoothing / n as f64;
        let minus_uniform = Wide::<V>::splat((-scale * uniform) as f32);
        for (i, dx) in out.chunks_exact_mut(n).enumerate() {
            let Some(t) = targets[i] else {
                dx.fill(0.0);
                continue;
            };
            let (row, lse) = (rows.row(x, first + i), log_sum_exp[i]);
            // `e^(x - lse) = e^(x - m) e^(m - lse)`, `m` the f32 nearest `lse`. The row's
            // max may lie a little above `m` (the forward's `lse` carries the rounding of
            // its f32 sum, so it can fall short of the max when one class has nearly all
            // the mass); `RowExp` takes `x` above its max (`k` one or two more).
            let m = lse as f32;
            let shift = m as f64 - lse;
            let x = [Operand::Slice(row)];
            match RowExp::<Wide<V>>::new(m) {
                Some(exp) => {
                    let coef = Wide::<V>::splat((scale * (shift - exp.log_factor()).exp()) as f32);
                    map::<Wide<V>, 1>(x, dx, |[v]| exp.at(v).mul_add(coef, minus_uniform));
                }
                None => {
                    let (wide_m, coef) = (Wide::<V>::splat(m), Wide::<V>::splat((scale * shift.exp()) as f32));
                    map::<Wide<V>, 1>(x, dx, |[v]| math::exp(v - wide_m).mul_add(coef, minus_uniform));
                }
            }
            // The target's entry, `p_t - 1` near 0 when the model is sure, in f64.
            dx[t] = (scale * (((row[t] as f64 - lse).exp() - uniform) - (1.0 - smoothing))) as f32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::map::testing::{data, elements, view};
    use proptest::prelude::*;

    /// Targets for `lines` lines of `classes` classes from `seed`, about one in four
    /// ignored (all of them when there are no classes).
    fn targets(lines: usize, classes: usize, seed: u64) -> Vec<Option<usize>> {
        let mut state = seed | 1;
        (0..lines)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let r = (state >> 33) as usize;
                (classes > 0 && !r.is_multiple_of(4)).then(|| (r / 4) % classes)
            })
            .collect()
    }

    /// `got` is `want` up to `rel` relative and `abs` absolute; NaN matches NaN.
    fn assert_close(
        got: impl IntoIterator<Item = f64>,
        want: impl IntoIterator<Item = f64>,
        rel: f64,
        abs: f64,
        what: &str,
    ) {
        for (i, (g, w)) in got.into_iter().zip(want).enumerate() {
            let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= rel * w.abs() + abs;
            assert!(ok, "{what}[{i}] = {g}, want {w}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn f32_rows_match_the_f64_kernel_on_any_length_layout_and_targets(
            (m, n) in (1usize..6, 1usize..80),
            kind in view(),
            (seed, specials) in (any::<u64>(), any::<bool>()),
            smoothing in prop_oneof![Just(0.0), 0.0..=1.0],
            scale in -3.0..3.0f64,
        ) {
            let layout = kind.layout(m, n);
            let x = data(&layout, seed, specials);
            let wide: Vec<f64> = x.iter().map(|&v| v as f64).collect();
            let targets = targets(m, n, seed ^ 5);
            let (got, want) = (cross_entropy(&x, &layout, 1, &targets, smoothing), cross_entropy(&wide, &layout, 1, &targets, smoothing));
            assert_close(got.iter().map(|l| l.loss), want.iter().map(|l| l.loss), 1e-6, 1e-6, "loss");
            let lse = |lines: &[LineLoss]| lines.iter().map(|l| l.log_sum_exp).collect::<Vec<f64>>();
            assert_close(lse(&got), lse(&want), 1e-6, 1e-6, "log_sum_exp");
            // Both from the f64 log-sum-exp, so that only the gradient passes differ.
            let lse = lse(&want);
            let dx = cross_entropy_backward(&x, &layout, 1, &targets, &lse, smoothing, scale);
            let want = cross_entropy_backward(&wide, &layout, 1, &targets, &lse, smoothing, scale);
            // Probabilities to a few ulp of f32 (scaled), less the uniform part.
            assert_close(dx.iter().map(|&v| v as f64), want, 1e-5, 1e-6 * scale.abs(), "backward");
        }

        #[test]
        fn f64_kernel_matches_the_definition_along_any_dim_of_a_permuted_view(
            (a, c, b) in (1usize..4, 0usize..7, 1usize..4),
            dim_order in 0usize..3,
            seed in any::<u64>(),
            smoothing in prop_oneof![Just(0.0), 0.0..=1.0],
        ) {
            // A view of shape [a, c, b] (class dim 1) over a buffer in another order.
            let perm = [[0, 1, 2], [2, 0, 1], [1, 2, 0]][dim_order];
            let mut stored = [a, c, b];
            for (k, &p) in perm.iter().enumerate() {
                stored[p] = [a, c, b][k];
            }
            let layout = Layout::contiguous(&stored).permute(&perm);
            prop_assert_eq!(layout.shape(), &[a, c, b][..]);
            let x: Vec<f64> = data(&layout, seed, false).iter().map(|&v| v as f64).collect();
            let lines = a * b;
            let targets = targets(lines, c, seed ^ 9);
            let got = cross_entropy(&x, &layout, 1, &targets, smoothing);
            let dx = cross_entropy_backward(&x, &layout, 1, &targets, &got.iter().map(|l| l.log_sum_exp).collect::<Vec<_>>(), smoothing, 0.5);
            let values = elements(&x, &layout);
            for (line, target) in targets.iter().enumerate() {
                let (i, j) = (line / b, line % b);
                let scores: Vec<f64> = (0..c).map(|k| values[(i * c + k) * b + j]).collect();
                let Some(t) = *target else {
                    prop_assert_eq!(got[line].loss, 0.0);
                    prop_assert!((0..c).all(|k| dx[(i * c + k) * b + j] == 0.0));
                    continue;
                };
                // -sum q log p, with p by the plain formula (the scores are within 6).
                let total: f64 = scores.iter().map(|v| v.exp()).sum();
                let q = |k: usize| smoothing / c as f64 + if k == t { 1.0 - smoothing } else { 0.0 };
                let loss: f64 = (0..c).map(|k| -q(k) * (scores[k].exp() / total).ln()).sum();
                prop_assert!((got[line].loss - loss).abs() <= 1e-12 * (1.0 + loss.abs()), "{} vs {}", got[line].loss, loss);
                for k in 0..c {
                    let want = 0.5 * (scores[k].exp() / total - q(k));
                    prop_assert!((dx[(i * c + k) * b + j] - want).abs() <= 1e-14, "{} vs {}", dx[(i * c + k) * b + j], want);
                }
            }
        }
    }

    #[test]
    fn ignored_lines_give_zero_whatever_their_scores_and_masked_classes_stay_finite() {
        let x = [f32::NAN, 1.0, f32::INFINITY, 0.0, f32::NEG_INFINITY, 2.0, 1.0, 1.0];
        let layout = Layout::contiguous(&[4, 2]);
        let targets = [None, None, Some(1), Some(0)];
        let lines = cross_entropy(&x, &layout, 1, &targets, 0.0);
        assert_eq!((lines[0].loss, lines[1].loss), (0.0, 0.0));
        assert!(lines[0].log_sum_exp.is_nan() && lines[1].log_sum_exp.is_nan());
        // A class at -inf has probability 0: the other class's loss is 0 (up to the
        // rounding of the sum of exponentials, which carries `RowExp`'s factor).
        assert!(lines[2].loss.abs() < 1e-7, "{}", lines[2].loss);
        assert!((lines[3].loss - 2f64.ln()).abs() < 1e-7);
        // With smoothing the masked class's log-probability -inf enters the mean.
        assert_eq!(cross_entropy(&x, &layout, 1, &targets, 0.1)[2].loss, f64::INFINITY);
        let lse: Vec<f64> = lines.iter().map(|l| l.log_sum_exp).collect();
        let dx = cross_entropy_backward(&x, &layout, 1, &targets, &lse, 0.0, 1.0);
        assert_eq!(&dx[..4], &[0.0; 4]);
        assert!(dx[4] == 0.0 && dx[5].abs() < 1e-7, "{dx:?}");
        assert!((dx[6] + 0.5).abs() < 1e-7 && (dx[7] - 0.5).abs() < 1e-7, "{dx:?}");
    }

    #[test]
    fn far_rows_and_every_isa_agree_with_the_f64_kernel() {
        // Rows whose log-sum-exp lies on both sides of `RowExp::MAX_ABS` and a spread of
        // 120, a row long enough for several fetched pieces, on each ISA.
        let n = 1000;
        let x: Vec<f32> = (0..4 * n)
            .map(|i| {
                let (row, k) = (i / n, i % n);
                [-70_000.0, -100.0, 3e4, 1e5][row] + (k * 7919 % n) as f32 * 0.12
            })
            .collect();
        let wide: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let layout = Layout::contiguous(&[4, n]);
        let targets = [Some(3), Some(999), Some(0), Some(500)];
        let rows = UnitRows::new(&layout).unwrap();
        let want = cross_entropy(&wide, &layout, 1, &targets, 0.2);
        let lse: Vec<f64> = want.iter().map(|l| l.log_sum_exp).collect();
        let want_dx = cross_entropy_backward(&wide, &layout, 1, &targets, &lse, 0.2, 1.5);
        for isa in crate::cpu::simd::test_isas() {
            let mut got = vec![LineLoss::IGNORED; 4];
            cross_entropy_f32(isa, &x, &rows, 0, &targets, 0.2, &mut got);
            // Losses near 100: the f32 max and sums give about 1e-7 relative of `lse`.
            assert_close(got.iter().map(|l| l.loss), want.iter().map(|l| l.loss), 1e-5, 1e-4, "loss");
            let mut dx = vec![0.0; 4 * n];
            cross_entropy_backward_f32(isa, &x, &rows, 0, &targets, &lse, (0.2, 1.5), &mut dx);
            assert_close(dx.iter().map(|&v| v as f64), want_dx.iter().copied(), 1e-5, 1e-9, "backward");
            // A log-sum-exp below the row's max (as the f32 forward's rounding can leave
            // it): the exponentials of the scores above it, against the f64 kernel's.
            let low: Vec<f64> =
                x.chunks(n).map(|row| row.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64 - 1e-3).collect();
            let want_low = cross_entropy_backward(&wide, &layout, 1, &targets, &low, 0.2, 1.5);
            cross_entropy_backward_f32(isa, &x, &rows, 0, &targets, &low, (0.2, 1.5), &mut dx);
            assert_close(dx.iter().map(|&v| v as f64), want_low, 1e-5, 1e-9, "backward, lse below the max");
        }
    }
}
