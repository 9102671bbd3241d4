//! A cache of freed host buffers, so that a training loop stops paying the kernel for
//! fresh memory on every step.
//!
//! A training step allocates the same large buffers over and over: activations in the
//! forward pass, gradients in the backward pass, each freed before the next step asks for
//! the same sizes again. The system allocator returns such large blocks to the operating
//! system (glibc `mmap`s them, or trims the top of its heap), so each new step faults
//! every page of them back in, one 4 KiB page at a time: on a VM about a microsecond and a
//! half per page, which made a 1.2 MB matmul output cost a third more than its arithmetic.
//! PyTorch keeps the same kind of cache for its CUDA memory.
//!
//! The cache keeps freed buffers of at least [`MIN_CACHED_BYTES`] by exact length (a
//! loop asks for exactly the sizes it freed), up to a total of [`limit`] bytes (1 GiB
//! unless [`set_limit`] says otherwise). When a buffer would not fit, the cache empties
//! itself first, so a process whose shapes change does not keep stale sizes forever.
//! Buffers are handed out either filled ([`filled`], the drop-in for `vec![v; len]`) or
//! with whatever values they held ([`for_overwrite`]) for kernels that write every
//! element; both are plain initialised `Vec`s, so no unsafe code is involved.
//! `aigc-tensor` gives each buffer back when the last tensor using it is dropped.

use crate::Element;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Buffers smaller than this are left to the system allocator, which serves them from
/// its own free lists without touching the operating system.
pub const MIN_CACHED_BYTES: usize = 64 * 1024;

/// The bytes held by every cache together, and the most they may hold.
static CACHED_BYTES: AtomicUsize = AtomicUsize::new(0);
static LIMIT_BYTES: AtomicUsize = AtomicUsize::new(1 << 30);

/// The freed buffers of one element type, by length.
pub struct BufferCache<T> {
    free: Mutex<BTreeMap<usize, Vec<Vec<T>>>>,
}

impl<T> BufferCache<T> {
    /// An empty cache (for the one static per element type).
    pub const fn new() -> Self {
        BufferCache { free: Mutex::new(BTreeMap::new()) }
    }

    /// A cached buffer of exactly `len` elements, if there is one.
    fn take(&self, len: usize) -> Option<Vec<T>> {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let buffers = free.get_mut(&len)?;
        let buffer = buffers.pop()?;
        if buffers.is_empty() {
            free.remove(&len);
        }
        CACHED_BYTES.fetch_sub(bytes_of(&buffer), Ordering::Relaxed);
        Some(buffer)
    }

    /// Keeps `buffer` for reuse.
    fn put(&self, buffer: Vec<T>) {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.entry(buffer.len()).or_default().push(buffer);
    }

    /// Frees every buffer of this cache; returns the bytes released.
    fn clear(&self) -> usize {
        let mut free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        let released = free.values().flatten().map(bytes_of).sum();
        free.clear();
        released
    }
}

impl<T> Default for BufferCache<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The heap bytes of a buffer.
fn bytes_of<T>(buffer: &Vec<T>) -> usize {
    buffer.capacity() * size_of::<T>()
}

/// Whether a buffer of `len` elements of `T` is worth caching.
fn is_cached_size<T>(len: usize) -> bool {
    len * size_of::<T>() >= MIN_CACHED_BYTES
}

/// A buffer of `len` copies of `value`: a cached one refilled, or a new one.
pub fn filled<T: Element>(len: usize, value: T) -> Vec<T> {
    match is_cached_size::<T>(len).then(|| T::buffer_cache().take(len)).flatten() {
        Some(mut buffer) => {
            buffer.fill(value);
            buffer
        }
        None => vec![value; len],
    }
}

/// A buffer of `len` elements whose values are unspecified (those of a freed tensor, or
/// zeros): for kernels that overwrite every element.
pub fn for_overwrite<T: Element>(len: usize) -> Vec<T> {
    is_cached_size::<T>(len).then(|| T::buffer_cache().take(len)).flatten().unwrap_or_else(|| vec![T::zero(); len])
}

/// Gives a buffer back for reuse (or frees it, if it is small or the cache is full).
pub fn recycle<T: Element>(buffer: Vec<T>) {
    let bytes = bytes_of(&buffer);
    if !is_cached_size::<T>(buffer.len()) || buffer.len() != buffer.capacity() {
        return;
    }
    let limit = LIMIT_BYTES.load(Ordering::Relaxed);
    if bytes > limit {
        return;
    }
    if CACHED_BYTES.fetch_add(bytes, Ordering::Relaxed) + bytes > limit {
        CACHED_BYTES.fetch_sub(bytes, Ordering::Relaxed);
        clear();
        CACHED_BYTES.fetch_add(bytes, Ordering::Relaxed);
    }
    T::buffer_cache().put(buffer);
}

/// Frees every cached buffer (of every element type).
pub fn clear() {
    use half::{bf16, f16};
    let released = f32::buffer_cache().clear()
        + f64::buffer_cache().clear()
        + f16::buffer_cache().clear()
        + bf16::buffer_cache().clear()
        + i64::buffer_cache().clear()
        + u8::buffer_cache().clear();
    CACHED_BYTES.fetch_sub(released, Ordering::Relaxed);
}

/// The bytes the cache holds now.
pub fn cached_bytes() -> usize {
    CACHED_BYTES.load(Ordering::Relaxed)
}

/// The most the cache may hold, in bytes.
pub fn limit() -> usize {
    LIMIT_BYTES.load(Ordering::Relaxed)
}

/// Sets the most the cache may hold (0 turns it off) and frees what is cached now.
pub fn set_limit(bytes: usize) {
    LIMIT_BYTES.store(bytes, Ordering::Relaxed);
    clear();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests below change the process-wide cache; they run one at a time.
    static SERIAL: Mutex<()> = Mutex::new(());

    #[test]
    fn a_recycled_buffer_comes_back_for_the_same_length_and_is_refilled() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let len = MIN_CACHED_BYTES + 13; // f64: 8x the minimum size; a length no other test uses
        let mut first = filled(len, 1.0f64);
        first[3] = 7.0;
        let address = first.as_ptr();
        recycle(first);
        let again = filled(len, 2.0f64);
        assert_eq!(again.as_ptr(), address, "the freed buffer is reused");
        assert!(again.iter().all(|&v| v == 2.0));
        let other = filled(len + 1, 0.0f64);
        assert_ne!(other.as_ptr(), address);
        recycle(again);
        let stale = for_overwrite::<f64>(len);
        assert_eq!((stale.as_ptr(), stale.len()), (address, len));
    }

    #[test]
    fn small_buffers_are_not_cached_and_the_limit_is_kept() {
        let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
        let before = cached_bytes();
        recycle(vec![0u8; 100]);
        assert_eq!(cached_bytes(), before);

        let old_limit = limit();
        set_limit(3 * MIN_CACHED_BYTES);
        assert_eq!(cached_bytes(), 0);
        recycle(vec![0u8; MIN_CACHED_BYTES]);
        recycle(vec![0u8; 2 * MIN_CACHED_BYTES]);
        assert_eq!(cached_bytes(), 3 * MIN_CACHED_BYTES);
        // Full: the next one empties the cache and is kept alone.
        recycle(vec![0u8; MIN_CACHED_BYTES + 9]);
        assert_eq!(cached_bytes(), MIN_CACHED_BYTES + 9);
        recycle(vec![0u8; 4 * MIN_CACHED_BYTES]); // larger than the limit: freed
        assert_eq!(cached_bytes(), MIN_CACHED_BYTES + 9);
        set_limit(0);
        recycle(vec![0u8; MIN_CACHED_BYTES]);
        assert_eq!(cached_bytes(), 0);
        set_limit(old_limit);
    }
}
