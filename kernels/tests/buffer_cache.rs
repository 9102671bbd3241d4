//! The process-wide cache of freed buffers (`aigc_kernels::buffers`), in a test binary of
//! its own: its byte count and limit are shared by the whole process, and the kernels'
//! unit tests recycle buffers of their own on other threads while these tests count
//! bytes (one of them failed that way, its count changed between two asserts).

use aigc_kernels::buffers::{
    self, MIN_CACHED_BYTES, cached_bytes, clear, filled, for_overwrite, limit, recycle, set_limit,
};
use std::sync::Mutex;

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
    recycle(again);
    let stale = for_overwrite::<f64>(len);
    assert_eq!((stale.as_ptr(), stale.len()), (address, len));
}

#[test]
fn a_request_takes_the_smallest_buffer_that_fits_and_a_miss_frees_stale_room() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // i64 and lengths no other test of this crate uses.
    let big = filled(40_009, 5i64);
    let (big_address, bytes) = (big.as_ptr(), 40_009 * 8);
    recycle(big);
    // 30_007 * 1.5 >= 40_009: served by the big buffer, shortened.
    let shorter = for_overwrite::<i64>(30_007);
    assert_eq!((shorter.as_ptr(), shorter.len()), (big_address, 30_007));
    recycle(shorter);
    // Longer again (within its capacity): the new elements are zeros.
    let longer = for_overwrite::<i64>(40_009);
    assert_eq!(longer.as_ptr(), big_address);
    assert!(longer[..30_007].iter().all(|&v| v == 5) && longer[30_007..].iter().all(|&v| v == 0));
    recycle(longer);
    // Too small to be served by it without waste: a miss, but the big buffer was
    // returned a moment ago, so it stays.
    let before = cached_bytes();
    let small = filled(20_011, 1i64);
    assert_eq!(small.len(), 20_011);
    assert_eq!(cached_bytes(), before);
    // Once it has waited far longer than any reused buffer (a loop of one size that
    // hits every time), the next miss frees it.
    recycle(small);
    for _ in 0..3 * buffers::MIN_STALE_AGE {
        recycle(for_overwrite::<i64>(20_011));
    }
    let before = cached_bytes();
    drop(filled(25_013, 0i64)); // not served by the 20_011 buffer: 25_013 > 20_011
    assert_eq!(cached_bytes(), before - bytes, "the stale buffer is freed");
    assert_eq!(for_overwrite::<i64>(40_009).len(), 40_009);
}

#[test]
fn a_loop_whose_phases_ask_for_different_sizes_stops_missing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // A step in three phases (a forward pass of large activations, a backward pass of
    // smaller gradients, an update of the largest): each phase's buffers are all in use
    // at once, then returned. u8 and lengths no other test of this crate uses.
    let phases = [[3, 3, 3, 3], [1, 1, 2, 2], [5, 5, 0, 0]];
    let len = |units: usize| units * MIN_CACHED_BYTES + 101;
    let mut seen = std::collections::HashSet::new();
    for step in 0..12 {
        let mut fresh = 0;
        for phase in phases {
            let live: Vec<Vec<u8>> = phase.iter().filter(|&&u| u > 0).map(|&u| for_overwrite(len(u))).collect();
            fresh += live.iter().filter(|b| seen.insert(b.as_ptr() as usize)).count();
            live.into_iter().for_each(recycle);
        }
        // The first steps allocate; after them every buffer is served from the cache.
        if step >= 3 {
            assert_eq!(fresh, 0, "step {step} allocated {fresh} new buffers");
        }
    }
    clear();
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
