//! The kernels' thread pool: work sharing for data-parallel loops, with the calling
//! thread taking part and workers that stay awake for a moment between loops.
//!
//! A training step is hundreds of kernel calls of a millisecond or less, with short serial
//! gaps between them. Handing each one to a pool whose threads have gone to sleep costs a
//! wake-up of the other core, measured at 60-200 us on a 2-vCPU VM (an idle vCPU is
//! halted by the hypervisor), and a rayon call from a thread outside the pool costs a
//! second one, the caller's, when the work is done. So the hot kernels (GEMM, convolution,
//! attention, row kernels, elementwise maps) split their work through this pool instead:
//!
//! - the caller claims tasks itself, so nothing waits to be handed back to it;
//! - tasks are claimed from an atomic counter (dynamic scheduling): when a worker is
//!   descheduled (another process holds its core), the others take its share instead of
//!   waiting for it, which is what made spinning OpenMP pools collapse 10x under
//!   contention;
//! - a worker polls for the next loop for `SPIN` after its last one, yielding its core
//!   to any other runnable thread between polls (`sched_yield`), then sleeps on a condvar;
//!   it never busy-waits for longer than that.
//!
//! The number of threads a loop may use is [`threads`]: the size of the rayon pool the
//! caller runs in (so `rayon::ThreadPool::install` with one thread makes every loop serial,
//! as the benches use it), capped by this pool's size, which is rayon's global thread
//! count (`RAYON_NUM_THREADS`, else the number of CPUs). A loop started inside a task, or
//! while another thread is using the pool, runs serially on its caller.

use std::any::Any;
use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long a worker keeps polling for the next loop before it sleeps.
const SPIN: Duration = Duration::from_micros(500);

thread_local! {
    /// Set on pool workers and on a caller while it runs tasks: a loop started there runs
    /// serially (the other threads are busy with the enclosing loop).
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

/// How many threads a parallel loop started here may use (1: it runs serially).
pub fn threads() -> usize {
    if IN_TASK.get() { 1 } else { rayon::current_num_threads().min(pool().workers + 1) }
}

/// Runs `task(i)` for every `i` in `0..tasks`, on the calling thread and the pool's
/// workers, and returns when all have run. A panic in a task is resumed on the caller
/// once every task has finished.
pub fn for_each(tasks: usize, task: impl Fn(usize) + Sync) {
    run(tasks, &task);
}

/// Cuts `data` into chunks of `chunk_len` (the last may be shorter) and runs
/// `task(index, chunk)` on each, in parallel as [`for_each`].
///
/// # Panics
/// If `chunk_len` is 0 and `data` is not empty.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk_len: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    if data.is_empty() {
        return;
    }
    assert!(chunk_len > 0, "for_each_chunk_mut: chunk length 0");
    let len = data.len();
    split_mut(data, len.div_ceil(chunk_len), |index| len.min(index * chunk_len), task);
}

/// Cuts `data` into `parts` parts of whole `unit`s of values (the last unit may be
/// shorter), as even as whole units allow, and runs `task(offset, part)` on each (`offset`:
/// where the part starts in `data`), in parallel as [`for_each`]. With more parts than
/// threads, a thread that finishes early takes over the parts of one that was
/// descheduled or woke late, instead of waiting for it.
///
/// # Panics
/// If `unit` or `parts` is 0 and `data` is not empty.
pub fn for_each_part_mut<T: Send>(data: &mut [T], unit: usize, parts: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    if data.is_empty() {
        return;
    }
    assert!(unit > 0 && parts > 0, "for_each_part_mut: {parts} parts of units of {unit}");
    let (len, units) = (data.len(), data.len().div_ceil(unit));
    let start = |index: usize| len.min(index * units / parts * unit);
    split_mut(data, parts, start, |index, part| task(start(index), part));
}

/// Runs `task(index, &mut data[start(index)..start(index + 1)])` for every `index` in
/// `0..parts` (`start(parts)` is `data.len()`), in parallel as [`for_each`]: parts of any
/// lengths, one after another. `start` is called once for each part, up front.
///
/// # Panics
/// Unless the starts are non-decreasing and at most `data.len()` (the parts must be
/// disjoint), when the offending part runs.
pub fn for_each_split_mut<T: Send>(
    data: &mut [T],
    parts: usize,
    start: impl Fn(usize) -> usize,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    // Taken once, so that a `start` whose answers change cannot hand out overlapping
    // parts: `split_mut` checks each part against the next one's start.
    let starts: Vec<usize> = (0..parts).map(start).collect();
    split_mut(data, parts, |index| starts[index], task);
}

/// [`for_each_split_mut`] for a `start` that is a pure function of the index (the
/// callers here), called as the parts run.
fn split_mut<T: Send>(
    data: &mut [T],
    parts: usize,
    start: impl Fn(usize) -> usize + Sync,
    task: impl Fn(usize, &mut [T]) + Sync,
) {
    let (len, base) = (data.len(), SendPtr(data.as_mut_ptr()));
    run(parts, &|index| {
        let (begin, end) = (start(index), if index + 1 == parts { len } else { start(index + 1) });
        assert!(begin <= end && end <= len, "split_mut: part {index} is {begin}..{end} of {len}");
        // SAFETY: each index is claimed by exactly one task and the parts are consecutive
        // (`start` is a pure function of the index, non-decreasing, checked against the
        // next part's start here), so the slices handed out are disjoint and inside
        // `data`, which the caller borrows mutably until every task has finished (`run`
        // waits for them).
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(begin), end - begin) };
        task(index, part)
    });
}

/// Runs `task(index, entry)` on each `entry_len`-long entry of `data` (a batch): across
/// entries in parallel when there are at least two per thread, else one entry after
/// another, leaving the threads to the parallel loops inside `task` (a batch of one
/// large convolution still uses every core).
pub fn for_each_entry<T: Send>(data: &mut [T], entry_len: usize, task: impl Fn(usize, &mut [T]) + Sync) {
    if entry_len == 0 {
        return;
    }
    if data.len() / entry_len >= 2 * threads() {
        for_each_chunk_mut(data, entry_len, task);
    } else {
        data.chunks_mut(entry_len).enumerate().for_each(|(index, entry)| task(index, entry));
    }
}

/// Runs `a` and `b` at the same time, one on the calling thread and one on a worker
/// (one after the other when the pool has a single thread), and returns both results.
/// Parallel loops inside them run serially: this is for two independent pieces of work
/// each too small to split well across the threads (the two gradients of a small matrix
/// product), which then run whole, side by side.
pub fn join<A: Send, B: Send>(a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B + Send) -> (A, B) {
    fn take<X>(slot: &Mutex<Option<X>>) -> Option<X> {
        slot.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
    let (a, b) = (Mutex::new(Some(a)), Mutex::new(Some(b)));
    let (out_a, out_b) = (Mutex::new(None), Mutex::new(None));
    for_each(2, |index| {
        if index == 0 {
            let a = take(&a).expect("task 0 runs once");
            *out_a.lock().unwrap_or_else(|e| e.into_inner()) = Some(a());
        } else {
            let b = take(&b).expect("task 1 runs once");
            *out_b.lock().unwrap_or_else(|e| e.into_inner()) = Some(b());
        }
    });
    (take(&out_a).expect("task 0 ran"), take(&out_b).expect("task 1 ran"))
}

/// `task(i)` for every `i` in `0..tasks`, in parallel as [`for_each`], collected in order.
pub fn map<R: Send>(tasks: usize, task: impl Fn(usize) -> R + Sync) -> Vec<R> {
    // One chunk of a zero-sized slice per task (no allocation).
    map_chunks_mut(&mut vec![(); tasks], 1, |index, _| task(index))
}

/// [`for_each_chunk_mut`] that also collects what each task returns, in chunk order.
pub fn map_chunks_mut<T: Send, R: Send>(
    data: &mut [T],
    chunk_len: usize,
    task: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let slots: Vec<Mutex<Option<R>>> = (0..data.len().div_ceil(chunk_len.max(1))).map(|_| Mutex::new(None)).collect();
    for_each_chunk_mut(data, chunk_len, |index, chunk| {
        let result = task(index, chunk);
        *slots[index].lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    });
    slots
        .into_iter()
        .map(|slot| slot.into_inner().unwrap_or_else(|e| e.into_inner()).expect("every task ran"))
        .collect()
}

/// A raw pointer that may cross threads: [`split_mut`] hands out disjoint parts.
struct SendPtr<T>(*mut T);
// SAFETY: only used to rebuild disjoint `&mut [T]` chunks with `T: Send`.
unsafe impl<T: Send> Sync for SendPtr<T> {}
impl<T> SendPtr<T> {
    fn get(&self) -> *mut T {
        self.0
    }
}

/// One parallel loop, shared between the caller and the workers that join it.
struct Job {
    /// The loop body. Only called for claimed indices below `tasks`, and the caller does
    /// not return (ending the borrow this pointer was made from) before `completed`
    /// reaches `tasks`, so it is never called after its referent is gone.
    task: *const (dyn Fn(usize) + Sync + 'static),
    tasks: usize,
    /// How many workers may join (the caller's thread budget minus the caller).
    workers: usize,
    next: AtomicUsize,
    completed: AtomicUsize,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `task` points to a `Sync` closure that outlives every call made through it
// (see the field's doc); the other fields are thread-safe.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none is left.
    fn work(&self) {
        loop {
            let index = self.next.fetch_add(1, Ordering::Relaxed);
            if index >= self.tasks {
                return;
            }
            // SAFETY: `index < tasks` and this task has not completed, so the caller is
            // still waiting and the closure is alive (see `Job::task`).
            let task = unsafe { &*self.task };
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| task(index))) {
                self.panic.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(panic);
            }
            self.completed.fetch_add(1, Ordering::Release);
        }
    }
}

/// The pool: its workers wait for a new `epoch`, then join the job in `slot`.
struct Pool {
    /// Threads besides the caller.
    workers: usize,
    slot: Mutex<Option<Arc<Job>>>,
    wake: Condvar,
    epoch: AtomicU64,
    /// Set while a caller runs a loop on the pool.
    busy: AtomicBool,
    /// Workers waiting on `wake` (the caller skips the notify when there are none).
    sleeping: AtomicUsize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        // Rayon's global default, whichever pool the first caller happens to run in.
        let size = std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let workers = size - 1;
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            workers,
            slot: Mutex::new(None),
            wake: Condvar::new(),
            epoch: AtomicU64::new(0),
            busy: AtomicBool::new(false),
            sleeping: AtomicUsize::new(0),
        }));
        for index in 0..workers {
            std::thread::Builder::new()
                .name(format!("aigc-worker-{index}"))
                .spawn(move || worker(pool, index))
                .expect("aigc: could not start a kernel worker thread");
        }
        pool
    })
}

/// A worker: wait for the next loop (polling for `SPIN`, then asleep), join it if the
/// loop's thread budget includes this worker, repeat.
fn worker(pool: &'static Pool, index: usize) {
    IN_TASK.set(true);
    let mut seen = 0;
    loop {
        let idle_since = Instant::now();
        let mut polls = 0u32;
        loop {
            let epoch = pool.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            polls += 1;
            if !polls.is_multiple_of(32) {
                std::hint::spin_loop();
            } else if idle_since.elapsed() < SPIN {
                std::thread::yield_now();
            } else {
                let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
                pool.sleeping.fetch_add(1, Ordering::Relaxed);
                while pool.epoch.load(Ordering::Acquire) == seen {
                    slot = pool.wake.wait(slot).unwrap_or_else(|e| e.into_inner());
                }
                pool.sleeping.fetch_sub(1, Ordering::Relaxed);
                drop(slot);
            }
        }
        let job = pool.slot.lock().unwrap_or_else(|e| e.into_inner()).clone();
        if let Some(job) = job
            && index < job.workers
        {
            job.work();
        }
    }
}

/// Runs a loop on the pool, or serially where it cannot or need not be shared.
fn run(tasks: usize, task: &(dyn Fn(usize) + Sync)) {
    let threads = threads();
    let pool = pool();
    if tasks <= 1 || threads <= 1 || pool.busy.swap(true, Ordering::Acquire) {
        // Serially (loops inside a task may still use the pool when it is free).
        let mut first_panic = None;
        for index in 0..tasks {
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| task(index))) {
                first_panic.get_or_insert(panic);
            }
        }
        if let Some(panic) = first_panic {
            resume_unwind(panic);
        }
        return;
    }
    // SAFETY: only the lifetime is erased; `Job::task` documents why the pointer is never
    // used after the closure is gone (this function waits for every task below).
    let task: *const (dyn Fn(usize) + Sync + 'static) = unsafe { std::mem::transmute(task) };
    let job = Arc::new(Job {
        task,
        tasks,
        workers: (threads - 1).min(tasks - 1),
        next: AtomicUsize::new(0),
        completed: AtomicUsize::new(0),
        panic: Mutex::new(None),
    });
    {
        let mut slot = pool.slot.lock().unwrap_or_else(|e| e.into_inner());
        *slot = Some(Arc::clone(&job));
        pool.epoch.fetch_add(1, Ordering::Release);
    }
    if pool.sleeping.load(Ordering::Relaxed) > 0 {
        pool.wake.notify_all();
    }
    IN_TASK.set(true);
    job.work();
    IN_TASK.set(false);
    let mut polls = 0u32;
    while job.completed.load(Ordering::Acquire) < tasks {
        polls += 1;
        if polls.is_multiple_of(32) {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    *pool.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    pool.busy.store(false, Ordering::Release);
    if let Some(panic) = job.panic.lock().unwrap_or_else(|e| e.into_inner()).take() {
        resume_unwind(panic);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each(tasks, |i| {
                counts[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(counts.iter().all(|c| c.load(Ordering::Relaxed) == 1), "{tasks} tasks");
        }
    }

    #[test]
    fn chunks_cover_the_slice_once_in_place() {
        for (len, chunk) in [(0, 3), (1, 3), (10, 3), (12, 4), (1000, 7)] {
            let mut data = vec![0usize; len];
            for_each_chunk_mut(&mut data, chunk, |index, values| {
                for (j, v) in values.iter_mut().enumerate() {
                    *v += index * chunk + j + 1;
                }
            });
            assert_eq!(data, (1..=len).collect::<Vec<_>>(), "len {len} chunk {chunk}");
        }
    }

    #[test]
    fn split_parts_are_the_ranges_between_their_starts() {
        let starts = [0, 0, 3, 4, 9];
        let mut data = vec![0usize; 12];
        for_each_split_mut(&mut data, starts.len(), |index| starts[index], |index, part| part.fill(index + 1));
        assert_eq!(data, [2, 2, 2, 3, 4, 4, 4, 4, 4, 5, 5, 5]);
    }

    #[test]
    #[should_panic(expected = "part 1 is 5..3 of 8")]
    fn split_parts_out_of_order_are_refused() {
        // A start that answers differently each time is called once per part, so its
        // answers (0, 5, 3) are checked against each other rather than handed out.
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let start = |_| [0, 5, 3][calls.fetch_add(1, Ordering::Relaxed)];
        for_each_split_mut(&mut [0u8; 8], 3, start, |_, _| {});
    }

    #[test]
    fn parts_cover_the_slice_once_in_whole_units_as_even_as_they_allow() {
        for (len, unit, parts) in [(0, 3, 2), (1, 3, 2), (10, 3, 2), (43 * 6 - 2, 6, 8), (100, 1, 7), (12, 4, 5)] {
            let mut data = vec![0usize; len];
            let seen = Mutex::new(Vec::new());
            for_each_part_mut(&mut data, unit, parts, |offset, part| {
                for (j, v) in part.iter_mut().enumerate() {
                    *v += offset + j + 1;
                }
                seen.lock().unwrap().push((offset, part.len()));
            });
            assert_eq!(data, (1..=len).collect::<Vec<_>>(), "len {len} unit {unit} parts {parts}");
            if len == 0 {
                continue;
            }
            let mut got = seen.into_inner().unwrap();
            got.sort();
            assert_eq!(got.len(), parts);
            // Whole units but at the very end, and no part more than one unit longer than another.
            assert!(got.iter().all(|&(offset, part)| offset % unit == 0 && (part % unit == 0 || offset + part == len)));
            let units: Vec<usize> = got.iter().map(|&(_, part)| part.div_ceil(unit)).collect();
            assert!(units.iter().max().unwrap() - units.iter().min().unwrap() <= 1, "{units:?}");
        }
    }

    #[test]
    fn map_returns_results_in_order() {
        assert_eq!(map(50, |i| i * i), (0..50).map(|i| i * i).collect::<Vec<_>>());
        assert!(map(0, |i| i).is_empty());
    }

    #[test]
    fn entries_run_once_whether_shared_out_or_not() {
        for entries in [1, 3, 40] {
            let mut data = vec![0usize; entries * 6];
            for_each_entry(&mut data, 6, |index, entry| entry.iter_mut().for_each(|v| *v += index + 1));
            assert!(data.chunks(6).enumerate().all(|(i, e)| e.iter().all(|&v| v == i + 1)));
        }
    }

    #[test]
    fn join_returns_both_results_and_moves_what_it_is_given() {
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let run = || {
                let (text, numbers) = (String::from("left"), vec![1u64, 2, 3]);
                // Each side owns its input and runs a parallel loop of its own (serial inside).
                join(
                    move || {
                        let counted = AtomicUsize::new(0);
                        for_each(10, |_| {
                            counted.fetch_add(1, Ordering::Relaxed);
                        });
                        format!("{text}{}", counted.into_inner())
                    },
                    move || numbers.iter().sum::<u64>(),
                )
            };
            let got = pool.install(run);
            assert_eq!(got, ("left10".to_string(), 6), "{threads} threads");
        }
    }

    #[test]
    fn a_panic_in_either_side_of_a_join_reaches_the_caller() {
        for side in 0..2 {
            let caught = catch_unwind(|| {
                join(|| assert!(side != 0, "left failed"), || assert!(side != 1, "right failed"));
            });
            assert!(caught.is_err(), "side {side}");
        }
    }

    #[test]
    fn mapped_chunks_come_back_in_order() {
        let mut data: Vec<u32> = (0..100).collect();
        let sums = map_chunks_mut(&mut data, 7, |_, chunk| chunk.iter().sum::<u32>());
        assert_eq!(sums, (0..100).collect::<Vec<u32>>().chunks(7).map(|c| c.iter().sum()).collect::<Vec<u32>>());
    }

    #[test]
    fn nested_loops_complete() {
        let total = AtomicUsize::new(0);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        pool.install(|| {
            for_each(8, |_| {
                for_each(8, |_| {
                    total.fetch_add(1, Ordering::Relaxed);
                });
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn concurrent_callers_each_finish_their_loop() {
        std::thread::scope(|scope| {
            for caller in 0..4 {
                scope.spawn(move || {
                    for round in 0..200 {
                        let mut data = vec![0u64; 64 + round];
                        for_each_chunk_mut(&mut data, 5, |index, values| values.fill(index as u64 + caller));
                        assert!(data.iter().enumerate().all(|(i, &v)| v == (i / 5) as u64 + caller));
                    }
                });
            }
        });
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_after_the_others_finish() {
        let ran = AtomicUsize::new(0);
        let result = catch_unwind(AssertUnwindSafe(|| {
            for_each(64, |i| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(i != 13, "task 13 fails");
            })
        }));
        assert!(result.is_err());
        assert_eq!(ran.load(Ordering::Relaxed), 64);
        // The pool is usable afterwards.
        let count = AtomicUsize::new(0);
        for_each(10, |_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn a_one_thread_rayon_pool_makes_loops_serial_and_sizes_nothing() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        pool.install(|| {
            assert_eq!(threads(), 1);
            // The pool itself is sized by the machine, not by the pool it was first used in.
            assert_eq!(
                super::pool().workers + 1,
                rayon::ThreadPoolBuilder::new().build().unwrap().current_num_threads()
            );
            let caller = std::thread::current().id();
            for_each(16, |_| assert_eq!(std::thread::current().id(), caller));
        });
    }
}
