//! A steady-state `Thor` step on the CPU backend allocates nothing: statistics steps (the
//! accumulation, the trace rule, the inversion) and plain steps (the apply) run in the
//! scratch the optimizer sized when its layers were added. Counted by a global allocator
//! that sees every allocation of the process while a step runs.
//!
//! One allocation is not the library's: rayon hands work from a thread outside its pool to
//! the pool through a global queue (crossbeam's `Injector`), which allocates a new block of
//! slots once per 63 jobs. Those are recognised by their backtrace and counted apart.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

use common::*;
use thor_kernels::thor::{DampingSchedule, IntervalSchedule, LayerKind, Thor, ThorConfig};
use thor_kernels::BackendKind;

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);
static QUEUE_BLOCKS: AtomicUsize = AtomicUsize::new(0);
static REPORTS: Mutex<Vec<String>> = Mutex::new(Vec::new());

thread_local! {
    /// Set while this thread classifies an allocation (the backtrace allocates too).
    static CLASSIFYING: Cell<bool> = const { Cell::new(false) };
}

/// Counts an allocation made while counting is on: rayon's job-queue blocks apart, every
/// other one with its backtrace for the failure message.
fn count() {
    if !COUNTING.load(Ordering::Relaxed) || CLASSIFYING.with(|c| c.replace(true)) {
        return;
    }
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    if trace.contains("crossbeam_deque::deque::Injector") {
        QUEUE_BLOCKS.fetch_add(1, Ordering::Relaxed);
    } else {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut r) = REPORTS.lock() {
            r.push(trace);
        }
    }
    CLASSIFYING.with(|c| c.set(false));
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: the caller's contract, passed on.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, passed on.
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations made while `f` runs (by any thread).
fn allocations(f: impl FnOnce()) -> usize {
    ALLOCATIONS.store(0, Ordering::SeqCst);
    COUNTING.store(true, Ordering::SeqCst);
    f();
    COUNTING.store(false, Ordering::SeqCst);
    ALLOCATIONS.load(Ordering::SeqCst)
}

/// One small f32 product, as the apply does (faer, sequential).
fn warm_matmul() {
    use faer::linalg::matmul::matmul;
    use faer::{Accum, Mat, Par};
    let a = Mat::<f32>::from_fn(32, 32, |i, j| (i + j) as f32);
    let mut c = Mat::<f32>::zeros(32, 32);
    matmul(
        c.as_mut(),
        Accum::Replace,
        a.as_ref(),
        a.as_ref(),
        1.0,
        Par::Seq,
    );
    assert!(c[(1, 1)] > 0.0);
}

/// A layer's activations, output gradients, gradient and preconditioned gradient.
type LayerData = (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>);

#[test]
fn steady_state_cpu_steps_allocate_nothing() {
    let mut t = Thor::new(ThorConfig {
        block: 32,
        damping: DampingSchedule::Constant(1e-2),
        interval: IntervalSchedule::Fixed(2),
        backend: BackendKind::Cpu,
        stat_decay: 0.9,
        ..ThorConfig::thor()
    })
    .unwrap();
    let kinds = [
        LayerKind::Linear {
            inputs: 70,
            outputs: 33,
            bias: true,
        },
        LayerKind::Conv2d {
            c_in: 3,
            c_out: 8,
            kh: 3,
            kw: 3,
            bias: false,
        },
    ];
    let ids: Vec<_> = kinds.iter().map(|&k| t.add_layer(k).unwrap()).collect();
    let n = 48;
    let mut r = rng(5);
    let mut data: Vec<_> = kinds
        .iter()
        .map(|k| {
            (
                normal(&mut r, n * k.inputs()),
                normal(&mut r, n * k.d_g()),
                normal(&mut r, k.d_g() * k.d_a()),
                vec![0.0f32; k.d_g() * k.d_a()],
            )
        })
        .collect();
    let step = |t: &mut Thor, data: &mut [LayerData]| {
        let stats = t.needs_statistics();
        for (id, (a, g, grad, out)) in ids.iter().zip(data.iter_mut()) {
            if stats {
                t.observe(*id, a, g, n).unwrap();
            }
            t.precondition(*id, grad, out).unwrap();
        }
        t.finish_step();
        stats
    };
    // Warm-up: the first statistics step sizes the scratch and the worker threads start.
    for _ in 0..4 {
        step(&mut t, &mut data);
    }
    // faer's matrix product keeps a per-thread cache, made on a thread's first product: a
    // one-time cost of the thread, not of a step. Which pool threads the warm-up steps
    // reached depends on scheduling, so every pool thread does one product here.
    rayon::broadcast(|_| warm_matmul());
    warm_matmul();
    // Enough steps to cross a queue block boundary at least once.
    let steps = 80;
    let mut kinds_seen = [false; 2];
    for k in 0..steps {
        let mut stats = false;
        let count = allocations(|| stats = step(&mut t, &mut data));
        kinds_seen[stats as usize] = true;
        let first = REPORTS.lock().unwrap().first().cloned().unwrap_or_default();
        assert_eq!(
            count, 0,
            "step {k} (statistics: {stats}) allocated {count} times; the first:\n{first}"
        );
    }
    assert_eq!(kinds_seen, [true, true], "both kinds of step were counted");
    // rayon's queue: at most one block per 63 jobs handed over.
    let blocks = QUEUE_BLOCKS.load(Ordering::SeqCst);
    assert!(
        blocks <= steps * 16 / 63 + 1,
        "{blocks} queue blocks in {steps} steps"
    );
    // The results are real: preconditioned gradients are finite and not the gradient.
    for (_, _, grad, out) in &data {
        assert!(out.iter().all(|v| v.is_finite()));
        assert_ne!(grad, out);
    }
}
