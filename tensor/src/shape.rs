//! Shapes, negative-dim resolution and numpy broadcasting.

use crate::{Error, Result};

/// The sizes of a tensor's dimensions. Prints like `[64, 400]`.
#[derive(Clone, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}
impl std::fmt::Display for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(d: &[usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
impl From<&Vec<usize>> for Shape {
    fn from(d: &Vec<usize>) -> Self {
        Shape(d.clone())
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}

/// Resolves a possibly negative dim (`-1` is the last) against `rank`.
pub fn resolve_dim(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    if dim < -r || dim >= r {
        return Err(Error::DimOutOfRange { op, dim, rank });
    }
    Ok(if dim < 0 { (dim + r) as usize } else { dim as usize })
}

/// Resolves a list of dims, sorted ascending; a repeated dim is an error.
pub fn resolve_dims(op: &'static str, dims: &[isize], rank: usize) -> Result<Vec<usize>> {
    let mut out = dims.iter().map(|&d| resolve_dim(op, d, rank)).collect::<Result<Vec<_>>>()?;
    out.sort_unstable();
    if out.windows(2).any(|w| w[0] == w[1]) {
        return Err(Error::invalid(op, format!("dims {dims:?} name the same dimension twice")));
    }
    Ok(out)
}

/// The numpy broadcast of two shapes: align trailing dims; each pair must be equal or
/// contain a 1.
pub fn broadcast_shapes(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Result<Vec<usize>> {
    let rank = lhs.len().max(rhs.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let a = if i < rank - lhs.len() { 1 } else { lhs[i - (rank - lhs.len())] };
        let b = if i < rank - rhs.len() { 1 } else { rhs[i - (rank - rhs.len())] };
        out[i] = if a == b || b == 1 {
            a
        } else if a == 1 {
            b
        } else {
            return Err(Error::ShapeMismatch {
                op,
                lhs: lhs.into(),
                rhs: rhs.into(),
                reason: format!(
                    "cannot broadcast: dim {} has sizes {a} and {b} (each pair of trailing dims must be equal or 1)",
                    i as isize - rank as isize
                ),
            });
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negative_dims_count_from_the_end() {
        assert_eq!(resolve_dim("t", -1, 3).unwrap(), 2);
        assert_eq!(resolve_dim("t", 0, 3).unwrap(), 0);
        let e = resolve_dim("softmax", 3, 3).unwrap_err();
        assert_eq!(e.to_string(), "softmax: dim 3 is out of range for a tensor of rank 3 (expected -3..3)");
    }

    #[test]
    fn broadcasting_follows_numpy() {
        assert_eq!(broadcast_shapes("add", &[8, 1, 6, 1], &[7, 1, 5]).unwrap(), vec![8, 7, 6, 5]);
        assert_eq!(broadcast_shapes("add", &[], &[3]).unwrap(), vec![3]);
        assert_eq!(broadcast_shapes("add", &[0], &[1]).unwrap(), vec![0]);
        let e = broadcast_shapes("add", &[2, 3], &[4, 3]).unwrap_err();
        assert!(e.to_string().starts_with("add: lhs [2, 3] and rhs [4, 3]: cannot broadcast: dim -2"), "{e}");
    }

    #[test]
    fn repeated_dims_are_rejected() {
        assert!(resolve_dims("sum", &[1, -2], 3).is_err());
        assert_eq!(resolve_dims("sum", &[-1, 0], 3).unwrap(), vec![0, 2]);
    }
}
