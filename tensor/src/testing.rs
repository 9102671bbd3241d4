//! Test support shared by every op's tests: proptest strategies that build tensors as
//! contiguous, transposed, sliced, stepped and broadcast views, and a naive f64 n-d
//! array ([`NdArray`]) to write reference implementations against.

use crate::{Device, Tensor};
use proptest::prelude::*;

/// How a generated tensor is laid out over its buffer.
#[derive(Clone, Copy, Debug)]
pub enum ViewKind {
    Contiguous,
    /// A permutation of a contiguous buffer (all dims reversed).
    Transposed,
    /// A narrow window inside a larger buffer.
    Sliced,
    /// Every other element along each dim.
    Stepped,
    /// Some dims expanded from size 1 with stride 0.
    Broadcast,
}

/// Deterministic values in [-2, 2) from a seed (splitmix64), so shrinking keeps data.
pub fn seeded_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = s;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
        })
        .collect()
}

/// A tensor of `shape` with seeded values, laid out as `kind` describes.
pub fn make_view(shape: &[usize], kind: ViewKind, seed: u64) -> Tensor {
    let dev = Device::Cpu;
    let rank = shape.len();
    let from = |s: &[usize]| {
        let n = s.iter().product();
        Tensor::from_vec(seeded_values(n, seed), s, &dev).unwrap()
    };
    match kind {
        ViewKind::Transposed if rank >= 2 => {
            let rev: Vec<usize> = shape.iter().rev().copied().collect();
            let perm: Vec<isize> = (0..rank as isize).rev().collect();
            from(&rev).permute(&perm).unwrap()
        }
        ViewKind::Sliced => {
            let big: Vec<usize> = shape.iter().map(|&d| d + 2).collect();
            let mut t = from(&big);
            for (d, &n) in shape.iter().enumerate() {
                t = t.narrow(d as isize, 1, n).unwrap();
            }
            t
        }
        ViewKind::Stepped => {
            let big: Vec<usize> = shape.iter().map(|&d| 2 * d).collect();
            let mut t = from(&big);
            for (d, &n) in shape.iter().enumerate() {
                t = t.slice(d as isize, 0, 2 * n, 2).unwrap();
            }
            t
        }
        ViewKind::Broadcast => {
            let small: Vec<usize> =
                shape.iter().enumerate().map(|(d, &n)| if (seed >> d) & 1 == 1 { 1 } else { n }).collect();
            from(&small).broadcast_to(shape).unwrap()
        }
        _ => from(shape),
    }
}

pub fn view_kind() -> impl Strategy<Value = ViewKind> {
    prop_oneof![
        Just(ViewKind::Contiguous),
        Just(ViewKind::Transposed),
        Just(ViewKind::Sliced),
        Just(ViewKind::Stepped),
        Just(ViewKind::Broadcast),
    ]
}

/// Shapes of rank `0..=max_rank` with dims in `0..=max_dim` (zero-size dims are rare).
pub fn shape(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(prop_oneof![1 => Just(0usize), 12 => 1..=max_dim], 0..=max_rank)
}

/// Shapes with every dim at least 1.
pub fn nonempty_shape(min_rank: usize, max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1..=max_dim, min_rank..=max_rank)
}

/// An f32 tensor of random shape and random layout.
pub fn strided_tensor(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Tensor> {
    (shape(max_rank, max_dim), view_kind(), any::<u64>()).prop_map(|(s, k, seed)| make_view(&s, k, seed))
}

/// An f32 tensor of the given shape and random layout.
pub fn tensor_of_shape(shape: Vec<usize>) -> impl Strategy<Value = Tensor> {
    (view_kind(), any::<u64>()).prop_map(move |(k, seed)| make_view(&shape, k, seed))
}

/// Two f32 tensors whose shapes broadcast together (some dims 1 on one side, and
/// sometimes fewer leading dims), each with a random layout.
pub fn broadcast_pair(max_rank: usize, max_dim: usize) -> impl Strategy<Value = (Tensor, Tensor)> {
    (shape(max_rank, max_dim), any::<u64>(), 0usize..3, view_kind(), view_kind(), any::<u64>()).prop_map(
        |(s, mask, drop, ka, kb, seed)| {
            let mut a = s.clone();
            let mut b = s.clone();
            for d in 0..s.len() {
                match (mask >> (2 * d)) & 3 {
                    1 => a[d] = 1,
                    2 => b[d] = 1,
                    _ => {}
                }
            }
            let drop = drop.min(b.len());
            let b = b[drop..].to_vec();
            (make_view(&a, ka, seed), make_view(&b, kb, seed ^ 0xABCD))
        },
    )
}

/// A naive dense f64 n-d array for writing reference implementations.
#[derive(Clone, Debug, PartialEq)]
pub struct NdArray {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl NdArray {
    pub fn new(shape: Vec<usize>, data: Vec<f64>) -> Self {
        assert_eq!(shape.iter().product::<usize>(), data.len());
        Self { shape, data }
    }
    pub fn zeros(shape: &[usize]) -> Self {
        Self::new(shape.to_vec(), vec![0.0; shape.iter().product()])
    }
    pub fn from_tensor(t: &Tensor) -> Self {
        Self::new(t.dims().to_vec(), t.to_f64_vec().unwrap())
    }
    /// Row-major flat position of `idx`.
    pub fn flat(&self, idx: &[usize]) -> usize {
        idx.iter().zip(&self.shape).fold(0, |acc, (&i, &n)| {
            debug_assert!(i < n);
            acc * n + i
        })
    }
    pub fn get(&self, idx: &[usize]) -> f64 {
        self.data[self.flat(idx)]
    }
    pub fn set(&mut self, idx: &[usize], v: f64) {
        let f = self.flat(idx);
        self.data[f] = v;
    }
    /// All multi-indices in row-major order.
    pub fn indices(&self) -> impl Iterator<Item = Vec<usize>> + '_ {
        let n = self.data.len();
        (0..n).map(move |mut flat| {
            let mut idx = vec![0; self.shape.len()];
            for d in (0..self.shape.len()).rev() {
                idx[d] = flat % self.shape[d];
                flat /= self.shape[d];
            }
            idx
        })
    }
    /// Elementwise `f` with numpy broadcasting, computed index by index.
    pub fn zip_broadcast(&self, other: &NdArray, f: impl Fn(f64, f64) -> f64) -> NdArray {
        let rank = self.shape.len().max(other.shape.len());
        let pad = |s: &[usize]| {
            let mut p = vec![1; rank - s.len()];
            p.extend_from_slice(s);
            p
        };
        let (sa, sb) = (pad(&self.shape), pad(&other.shape));
        let shape: Vec<usize> = sa.iter().zip(&sb).map(|(&a, &b)| if a == 1 { b } else { a }).collect();
        let mut out = NdArray::zeros(&shape);
        let a = NdArray::new(sa.clone(), self.data.clone());
        let b = NdArray::new(sb.clone(), other.data.clone());
        let idxs: Vec<Vec<usize>> = out.indices().collect();
        for idx in idxs {
            let ia: Vec<usize> = idx.iter().zip(&sa).map(|(&i, &n)| if n == 1 { 0 } else { i }).collect();
            let ib: Vec<usize> = idx.iter().zip(&sb).map(|(&i, &n)| if n == 1 { 0 } else { i }).collect();
            out.set(&idx, f(a.get(&ia), b.get(&ib)));
        }
        out
    }
}

/// Asserts `|got - want| <= atol + rtol * |want|` everywhere (NaN matches NaN, equal
/// infinities match), printing the first mismatch.
#[track_caller]
pub fn assert_close(got: &[f64], want: &[f64], rtol: f64, atol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let ok = (g.is_nan() && w.is_nan()) || g == w || (g - w).abs() <= atol + rtol * w.abs();
        assert!(ok, "{what}: element {i}: got {g}, want {w} (rtol {rtol}, atol {atol})");
    }
}
