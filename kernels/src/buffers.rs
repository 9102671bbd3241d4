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
//! The cache keeps freed buffers of at least [`MIN_CACHED_BYTES`] by capacity, and
//! serves a request from the smallest buffer that holds it with at most half again to
//! spare (a loop asks for exactly the sizes it freed). It stays near the working set of
//! the loop by evicting the buffers that have gone stale: each cache keeps a clock that
//! ticks once per request and per returned buffer, and notes how long the buffers it
//! handed out again had waited (their age, the longest of them decaying slowly). A
//! request it cannot serve frees as many bytes as the new buffer takes from the buffers
//! that have waited more than twice that longest reuse age (the oldest first), so that
//! switching to other sizes (evaluation with another batch size, generation) replaces the
//! old set instead of adding to it. Within a training step no buffer waits longer than a
//! step, so none is evicted, whatever the order in which the step asks for its sizes: an
//! earlier rule, which freed the largest buffers on every miss, evicted the buffers a
//! GPT's backward pass was about to ask for whenever its forward pass asked for others
//! (16 misses and 10 MB of fresh memory per step, in steady state). It never holds more
//! than [`limit`] bytes (1 GiB unless [`set_limit`] says otherwise); when a buffer would
//! not fit, the cache empties itself first.
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

/// The freed buffers of one element type, by capacity, and the clock that ages them.
pub struct BufferCache<T> {
    state: Mutex<CacheState<T>>,
}

/// A [`BufferCache`]'s contents.
struct CacheState<T> {
    /// The buffers of each capacity, each with the tick at which it was returned, oldest
    /// first.
    free: BTreeMap<usize, Vec<(u64, Vec<T>)>>,
    /// Ticks once per request and once per returned buffer.
    clock: u64,
    /// How long the buffers handed out again had waited, the longest of them, decaying by
    /// 1/1024 per reuse (so that one long wait, a training loop resumed after an
    /// evaluation, does not keep stale buffers for ever).
    reuse_age: u64,
}

/// A buffer older than this many ticks may be evicted however short the reuse age.
pub const MIN_STALE_AGE: u64 = 16;

impl<T: Element> BufferCache<T> {
    /// An empty cache (for the one static per element type).
    pub const fn new() -> Self {
        BufferCache { state: Mutex::new(CacheState { free: BTreeMap::new(), clock: 0, reuse_age: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheState<T>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The smallest cached buffer that holds `len` elements without wasting more than
    /// half of that again, resized to `len` (elements past the old length are zeros). On
    /// a miss, frees stale buffers ([`CacheState::evict_stale`]) of as many bytes as the
    /// new buffer will take; returns them with the miss.
    fn take(&self, len: usize) -> Result<Vec<T>, usize> {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        let Some((&capacity, buffers)) = state.free.range_mut(len..=len.saturating_add(len / 2)).next() else {
            return Err(state.evict_stale(len.saturating_mul(size_of::<T>())));
        };
        let (returned, mut buffer) = buffers.pop().expect("no empty lists are kept");
        if buffers.is_empty() {
            state.free.remove(&capacity);
        }
        let age = now - returned;
        state.reuse_age = age.max(state.reuse_age - state.reuse_age / 1024);
        drop(state);
        CACHED_BYTES.fetch_sub(bytes_of(&buffer), Ordering::Relaxed);
        buffer.resize(len, T::zero());
        Ok(buffer)
    }

    /// Keeps `buffer` for reuse.
    fn put(&self, buffer: Vec<T>) {
        let mut state = self.lock();
        state.clock += 1;
        let now = state.clock;
        state.free.entry(buffer.capacity()).or_default().push((now, buffer));
    }

    /// Frees every buffer of this cache; returns the bytes released.
    fn clear(&self) -> usize {
        let mut state = self.lock();
        let released = state.free.values().flatten().map(|(_, buffer)| bytes_of(buffer)).sum();
        state.free.clear();
        released
    }
}

impl<T> CacheState<T> {
    /// Frees the buffers that have waited longer than twice the reuse age (and at least
    /// [`MIN_STALE_AGE`] ticks), the oldest first, until at least `bytes` are released or
    /// none is left; returns the bytes released.
    fn evict_stale(&mut self, bytes: usize) -> usize {
        let oldest_kept = self.clock.saturating_sub(MIN_STALE_AGE.max(self.reuse_age.saturating_mul(2)));
        let mut released = 0;
        while released < bytes {
            // The oldest buffer: the first of some capacity's list.
            let oldest = self.free.iter().map(|(&capacity, buffers)| (buffers[0].0, capacity)).min();
            let Some((_, capacity)) = oldest.filter(|&(returned, _)| returned < oldest_kept) else { break };
            let buffers = self.free.get_mut(&capacity).expect("found above");
            let (_, buffer) = buffers.remove(0);
            if buffers.is_empty() {
                self.free.remove(&capacity);
            }
            released += bytes_of(&buffer);
        }
        released
    }
}

impl<T: Element> Default for BufferCache<T> {
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
    len.saturating_mul(size_of::<T>()) >= MIN_CACHED_BYTES
}

/// A cached buffer of `len` elements, if the cache has one; on a miss, the cache frees
/// as many bytes of stale buffers as the new buffer will take, so that a process whose
/// sizes change (training, then evaluation with another batch) does not hold both sets
/// at once.
fn take_cached<T: Element>(len: usize) -> Option<Vec<T>> {
    if !is_cached_size::<T>(len) {
        return None;
    }
    match T::buffer_cache().take(len) {
        Ok(buffer) => Some(buffer),
        Err(released) => {
            CACHED_BYTES.fetch_sub(released, Ordering::Relaxed);
            None
        }
    }
}

/// A buffer of `len` copies of `value`: a cached one refilled, or a new one.
pub fn filled<T: Element>(len: usize, value: T) -> Vec<T> {
    match take_cached(len) {
        Some(mut buffer) => {
            buffer.fill(value);
            buffer
        }
        None => fresh(len, value),
    }
}

/// A buffer of `len` elements whose values are unspecified (those of a freed tensor, or
/// zeros): for kernels that overwrite every element.
pub fn for_overwrite<T: Element>(len: usize) -> Vec<T> {
    take_cached(len).unwrap_or_else(|| fresh(len, T::zero()))
}

/// A new buffer of `len` copies of `value`. One too small to cache is allocated and then
/// filled, never asked of the allocator already zeroed (as `vec![0; len]` does): glibc's
/// `calloc` bypasses its per-thread cache of small blocks, and freeing such a block next
/// to the top of the heap consolidates the heap's free lists, which was a tenth of the
/// time of an add of 64 elements. A large one is zeroed by the allocator, which gets it
/// as fresh pages the kernel has zeroed already.
fn fresh<T: Element>(len: usize, value: T) -> Vec<T> {
    if is_cached_size::<T>(len) {
        return vec![value; len];
    }
    let mut buffer = Vec::with_capacity(len);
    buffer.resize(len, value);
    buffer
}

/// A scratch buffer of at least `len` elements (it may be longer) with unspecified
/// values, for a kernel that takes one per small task and [`recycle`]s it: rounded up to
/// the smallest size the cache keeps, so that it is reused rather than allocated and
/// zeroed per task. (The attention forward takes one per block of query rows, a few
/// kilobytes: allocating them cost a tenth of a GPT baby layer's attention.)
pub fn scratch<T: Element>(len: usize) -> Vec<T> {
    for_overwrite(len.max(MIN_CACHED_BYTES.div_ceil(size_of::<T>())))
}

/// Gives a buffer back for reuse (or frees it, if it is small or the cache is full).
pub fn recycle<T: Element>(buffer: Vec<T>) {
    let bytes = bytes_of(&buffer);
    if !is_cached_size::<T>(buffer.capacity()) {
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
