//! [`Dims`]: a short list of sizes or strides, held inline.
//!
//! Every tensor carries a shape and strides, and every op makes new ones: as `Vec`s, an
//! add of two 64-element tensors made eight heap allocations besides its output buffer,
//! and spent more time in the allocator than in the add. Ranks above four are rare (group
//! norm views an image as five dims: batch, groups, channels, height, width), so a list
//! of up to [`INLINE`] entries lives in the value itself and only a longer one goes to
//! the heap. It reads as a `[usize]` wherever a slice is expected.

use std::ops::{Deref, DerefMut};

/// The longest list held without a heap allocation.
pub const INLINE: usize = 6;

/// A list of `usize` (a shape or strides): inline up to [`INLINE`] entries, else a `Vec`.
///
/// The length is a whole `usize`, though a byte would hold it: the value is then 64 bytes,
/// which a move copies in four aligned 16-byte steps. At 56 bytes (a `u8` length) moves
/// were copied in overlapping pieces whose loads straddled the stores just made, which
/// the CPU cannot forward (planning the walk of a small `cat` was 38% of its time, now
/// 12%).
#[derive(Clone)]
pub enum Dims {
    Inline { len: usize, values: [usize; INLINE] },
    Heap(Vec<usize>),
}

impl Dims {
    /// An empty list.
    pub const fn new() -> Self {
        Dims::Inline { len: 0, values: [0; INLINE] }
    }

    /// `len` zeros.
    pub fn zeros(len: usize) -> Self {
        if len <= INLINE { Dims::Inline { len, values: [0; INLINE] } } else { Dims::Heap(vec![0; len]) }
    }

    /// Appends `value`.
    pub fn push(&mut self, value: usize) {
        match self {
            Dims::Inline { len, values } if *len < INLINE => {
                values[*len] = value;
                *len += 1;
            }
            _ => self.insert(self.len(), value),
        }
    }

    /// Inserts `value` at `index`, shifting the entries after it (as `Vec::insert`).
    pub fn insert(&mut self, index: usize, value: usize) {
        match self {
            Dims::Inline { len, values } if *len < INLINE => {
                let n = *len;
                assert!(index <= n, "Dims::insert: index {index} past the length {n}");
                values.copy_within(index..n, index + 1);
                values[index] = value;
                *len += 1;
            }
            Dims::Inline { .. } => {
                let mut spilled = self.to_vec();
                spilled.insert(index, value);
                *self = Dims::Heap(spilled);
            }
            Dims::Heap(values) => values.insert(index, value),
        }
    }

    /// Removes and returns the entry at `index`, shifting the entries after it.
    pub fn remove(&mut self, index: usize) -> usize {
        match self {
            Dims::Inline { len, values } => {
                let n = *len;
                assert!(index < n, "Dims::remove: index {index} past the length {n}");
                let removed = values[index];
                values.copy_within(index + 1..n, index);
                *len -= 1;
                removed
            }
            Dims::Heap(values) => values.remove(index),
        }
    }
}

impl Default for Dims {
    fn default() -> Self {
        Dims::new()
    }
}

impl Deref for Dims {
    type Target = [usize];
    fn deref(&self) -> &[usize] {
        match self {
            Dims::Inline { len, values } => &values[..*len],
            Dims::Heap(values) => values,
        }
    }
}

impl DerefMut for Dims {
    fn deref_mut(&mut self) -> &mut [usize] {
        match self {
            Dims::Inline { len, values } => &mut values[..*len],
            Dims::Heap(values) => values,
        }
    }
}

impl From<&[usize]> for Dims {
    fn from(values: &[usize]) -> Self {
        match values.len() {
            n if n <= INLINE => {
                let mut inline = [0; INLINE];
                inline[..n].copy_from_slice(values);
                Dims::Inline { len: n, values: inline }
            }
            _ => Dims::Heap(values.to_vec()),
        }
    }
}

impl FromIterator<usize> for Dims {
    fn from_iter<I: IntoIterator<Item = usize>>(iter: I) -> Self {
        let mut dims = Dims::new();
        for value in iter {
            dims.push(value);
        }
        dims
    }
}

// Equality, hashing and printing are those of the slice, whichever way it is held.
impl PartialEq for Dims {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}
impl Eq for Dims {}
impl std::hash::Hash for Dims {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state)
    }
}
impl std::fmt::Debug for Dims {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Pushes, inserts and removes act as on a `Vec`, across the inline limit both ways.
        #[test]
        fn edits_match_a_vec(ops in proptest::collection::vec((0u8..3, 0usize..16, 0usize..1000), 0..40)) {
            let (mut dims, mut reference) = (Dims::new(), Vec::new());
            for (op, at, value) in ops {
                match op {
                    0 => { dims.push(value); reference.push(value); }
                    1 => { let at = at % (reference.len() + 1); dims.insert(at, value); reference.insert(at, value); }
                    _ if !reference.is_empty() => {
                        let at = at % reference.len();
                        proptest::prop_assert_eq!(dims.remove(at), reference.remove(at));
                    }
                    _ => {}
                }
                proptest::prop_assert_eq!(&*dims, &reference[..]);
                proptest::prop_assert_eq!(&dims, &Dims::from(&reference[..]));
            }
        }
    }

    #[test]
    fn a_spilled_list_equals_and_hashes_as_an_inline_one() {
        use std::hash::{BuildHasher, RandomState};
        let mut spilled: Dims = (0..INLINE + 1).collect();
        spilled.remove(INLINE);
        assert!(matches!(spilled, Dims::Heap(_)));
        let inline = Dims::from(&(0..INLINE).collect::<Vec<_>>()[..]);
        assert!(matches!(inline, Dims::Inline { .. }));
        assert_eq!(spilled, inline);
        let hasher = RandomState::new();
        assert_eq!(hasher.hash_one(&spilled), hasher.hash_one(&inline));
        assert_eq!(format!("{inline:?}"), format!("{:?}", (0..INLINE).collect::<Vec<_>>()));
    }
}
