//! Test inputs for gradient checks: f64 tensors with random shapes and layouts
//! (contiguous, transposed, sliced, stepped), kept away from kinks where needed.

pub mod inputs {
    use aigc_tensor::{DType, Device, Tensor};
    use proptest::prelude::*;

    /// A deterministic f64 tensor with values in about [-1.5, 1.5].
    pub fn seeded(shape: &[usize], seed: u64) -> Tensor {
        Tensor::uniform(shape, -1.5, 1.5, DType::F64, &Device::Cpu, seed).unwrap()
    }

    fn laid_out(shape: &[usize], kind: u8, seed: u64) -> Tensor {
        let rank = shape.len();
        match kind % 4 {
            1 if rank >= 2 => {
                let rev: Vec<usize> = shape.iter().rev().copied().collect();
                seeded(&rev, seed).permute(&(0..rank as isize).rev().collect::<Vec<_>>()).unwrap()
            }
            2 => {
                let big: Vec<usize> = shape.iter().map(|d| d + 2).collect();
                let mut t = seeded(&big, seed);
                for (d, &n) in shape.iter().enumerate() {
                    t = t.narrow(d as isize, 1, n).unwrap();
                }
                t
            }
            3 => {
                let big: Vec<usize> = shape.iter().map(|d| 2 * d).collect();
                let mut t = seeded(&big, seed);
                for (d, &n) in shape.iter().enumerate() {
                    t = t.slice(d as isize, 0, 2 * n, 2).unwrap();
                }
                t
            }
            _ => seeded(shape, seed),
        }
    }

    /// Random shape (rank 0..=max_rank, dims 1..=max_dim) and layout.
    pub fn strided(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Tensor> {
        (proptest::collection::vec(1..=max_dim, 0..=max_rank), any::<u8>(), any::<u64>())
            .prop_map(|(s, k, seed)| laid_out(&s, k, seed))
    }

    /// Like [`strided`] with rank at least 1.
    pub fn strided_nonempty(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Tensor> {
        (proptest::collection::vec(1..=max_dim, 1..=max_rank), any::<u8>(), any::<u64>())
            .prop_map(|(s, k, seed)| laid_out(&s, k, seed))
    }

    /// Two tensors whose shapes broadcast together.
    pub fn broadcast_pair(max_rank: usize, max_dim: usize) -> impl Strategy<Value = (Tensor, Tensor)> {
        (proptest::collection::vec(1..=max_dim, 0..=max_rank), any::<u64>(), any::<(u8, u8)>()).prop_map(
            |(s, mask, (ka, kb))| {
                let a: Vec<usize> =
                    s.iter().enumerate().map(|(d, &n)| if (mask >> (2 * d)) & 3 == 1 { 1 } else { n }).collect();
                let b: Vec<usize> =
                    s.iter().enumerate().map(|(d, &n)| if (mask >> (2 * d)) & 3 == 2 { 1 } else { n }).collect();
                let drop = ((mask >> 20) % 2) as usize * b.len().min(1);
                (laid_out(&a, ka, mask), laid_out(&b[drop..], kb, mask ^ 77))
            },
        )
    }

    /// `[batch.., m, k]` and `[batch.., k, n]` with broadcast batch dims.
    pub fn matmul_pair() -> impl Strategy<Value = (Tensor, Tensor)> {
        (proptest::collection::vec(1usize..3, 0..3), 1usize..4, 1usize..4, 1usize..4, any::<u64>()).prop_map(
            |(batch, m, k, n, seed)| {
                let ba: Vec<usize> =
                    batch.iter().enumerate().map(|(d, &x)| if (seed >> d) & 1 == 1 { 1 } else { x }).collect();
                let a = laid_out(&[ba, vec![m, k]].concat(), seed as u8, seed);
                let b = laid_out(&[batch, vec![k, n]].concat(), (seed >> 8) as u8, seed ^ 5);
                (a, b)
            },
        )
    }

    /// Moves values away from 0 (by at least 0.05), where relu-like ops have a kink.
    pub fn away_from_kinks(x: &Tensor) -> Tensor {
        let sign = x.ge(0.0).unwrap().where_cond(1.0, -1.0).unwrap().to_dtype(x.dtype()).unwrap();
        x.add(sign.affine(0.05, 0.0).unwrap()).unwrap().clamp(-3.0, 3.0).unwrap()
    }

    /// The same shape with all values distinct (so max/min have no ties).
    pub fn distinct_values(x: &Tensor) -> Tensor {
        let n = x.numel();
        let ramp = Tensor::arange(0, n as i64, DType::F64, &Device::Cpu).unwrap().reshape(x.shape()).unwrap();
        x.add(ramp.affine(0.37, 0.0).unwrap()).unwrap()
    }

    /// Makes `a` and `b` differ everywhere by at least 0.1 (no ties in maximum/minimum).
    pub fn distinct(a: &Tensor, b: &Tensor) -> (Tensor, Tensor) {
        let (a2, b2) = a.broadcast_pair(b, "distinct").unwrap();
        let gap = a2.sub(&*b2).unwrap();
        let push = gap.ge(0.0).unwrap().where_cond(0.1, -0.1).unwrap().to_dtype(a.dtype()).unwrap();
        let shifted = a2.add(&push).unwrap().contiguous().unwrap();
        if shifted.dims() == a.dims() { (shifted, b.clone()) } else { (shifted, b2.contiguous().unwrap()) }
    }
}
