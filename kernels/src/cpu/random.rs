//! Counter-based random numbers: element `i` of a tensor drawn with seed `s` is a pure
//! function of `(s, i)`. The same seed gives the same numbers on every run, for every
//! thread count, and (with the same function ported) on every device.
//!
//! The generator hashes `(seed, counter)` with two rounds of the SplitMix64 finaliser
//! (Steele, Lea & Flood 2014), which passes BigCrush as a counter-based generator.
//! Normals use the Box-Muller transform on the two 32-bit halves of one draw.

use crate::FloatElem;
use rayon::prelude::*;

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 64 random bits for position `counter` of stream `seed`.
pub fn bits(seed: u64, counter: u64) -> u64 {
    mix(mix(seed.wrapping_mul(GOLDEN) ^ 0x5851_F42D_4C95_7F2D).wrapping_add(counter.wrapping_mul(GOLDEN)))
}

/// A uniform f64 in [0, 1) with 53 random bits.
pub fn unit_f64(seed: u64, counter: u64) -> f64 {
    (bits(seed, counter) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// A standard normal draw (Box-Muller on the two halves of one 64-bit draw).
pub fn normal_f64(seed: u64, counter: u64) -> f64 {
    let b = bits(seed, counter);
    let u1 = ((b >> 32) as f64 + 0.5) / 4_294_967_296.0; // in (0, 1): log is finite
    let u2 = ((b & 0xFFFF_FFFF) as f64) / 4_294_967_296.0;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

fn fill<T: Send>(n: usize, f: impl Fn(u64) -> T + Sync + Send) -> Vec<T> {
    if n >= super::map::PARALLEL_THRESHOLD {
        (0..n as u64).into_par_iter().map(f).collect()
    } else {
        (0..n as u64).map(f).collect()
    }
}

/// `n` uniform draws in `[lo, hi)`.
pub fn uniform<T: FloatElem>(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<T> {
    fill(n, |i| T::from_f64(lo + (hi - lo) * unit_f64(seed, i)))
}

/// `n` normal draws with the given mean and standard deviation.
pub fn normal<T: FloatElem>(n: usize, seed: u64, mean: f64, std: f64) -> Vec<T> {
    fill(n, |i| T::from_f64(mean + std * normal_f64(seed, i)))
}

/// `n` integers uniform in `[lo, hi)` (`hi > lo`).
pub fn randint(n: usize, seed: u64, lo: i64, hi: i64) -> Vec<i64> {
    let span = (hi as i128 - lo as i128) as u128;
    // Multiply-shift maps 64 random bits onto the span with bias below 2^-64 * span.
    fill(n, |i| (lo as i128 + ((bits(seed, i) as u128 * span) >> 64) as i128) as i64)
}

/// A random permutation of `0..n` (Fisher-Yates driven by the counter stream).
pub fn permutation(n: usize, seed: u64) -> Vec<i64> {
    let mut p: Vec<i64> = (0..n as i64).collect();
    for i in (1..n).rev() {
        let j = ((bits(seed, i as u64) as u128 * (i as u128 + 1)) >> 64) as usize;
        p.swap(i, j);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_unit_moments() {
        let v: Vec<f64> = normal(200_000, 7, 0.0, 1.0);
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
        let kurt = v.iter().map(|x| (x - mean).powi(4)).sum::<f64>() / v.len() as f64 / (var * var);
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "var {var}");
        assert!((kurt - 3.0).abs() < 0.05, "kurtosis {kurt}");
    }

    #[test]
    fn uniform_draws_fill_the_interval_evenly() {
        let v: Vec<f64> = uniform(100_000, 3, -1.0, 3.0);
        assert!(v.iter().all(|&x| (-1.0..3.0).contains(&x)));
        let mut hist = [0usize; 8];
        for x in &v {
            hist[((x + 1.0) / 0.5) as usize] += 1;
        }
        for h in hist {
            assert!((h as f64 - 12_500.0).abs() < 500.0, "{hist:?}");
        }
    }

    #[test]
    fn same_seed_same_numbers_different_seed_different_numbers() {
        assert_eq!(uniform::<f32>(100, 1, 0.0, 1.0), uniform::<f32>(100, 1, 0.0, 1.0));
        assert_ne!(uniform::<f32>(100, 1, 0.0, 1.0), uniform::<f32>(100, 2, 0.0, 1.0));
        // The parallel path gives the same prefix as the sequential one.
        let big: Vec<f32> = uniform(1 << 17, 9, 0.0, 1.0);
        assert_eq!(&big[..100], &uniform::<f32>(100, 9, 0.0, 1.0)[..]);
    }

    #[test]
    fn randint_and_permutation_stay_in_range() {
        let v = randint(10_000, 5, -3, 4);
        assert!(v.iter().all(|&x| (-3..4).contains(&x)));
        for k in -3..4 {
            assert!(v.contains(&k));
        }
        let mut p = permutation(50, 11);
        p.sort();
        assert_eq!(p, (0..50).collect::<Vec<i64>>());
    }
}
