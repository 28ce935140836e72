//! A fuzzer for the C ABI, run in-process: every exported function is called with random
//! adversarial arguments (sizes near every integer limit and products that overflow, null,
//! misaligned and overlapping pointers, bad strides, NaN and Inf scalars, unknown enums) on
//! buffers placed between inaccessible pages, with canaries in front. After each call it
//! checks that
//! - nothing was read or written outside a buffer (a guard page would fault: the handler
//!   prints the call and exits), canaries are intact, and inputs are unchanged;
//! - a call given an argument the header forbids failed, with a status and a message naming
//!   one of the function's arguments as the header spells it;
//! - a failed call wrote no output and, for the optimizer, changed no state.
//!
//! Plus the state-file sweep: every truncation of a saved state, bit flips at many
//! positions, and files resealed with a correct checksum over bad values, all refused with
//! the optimizer unchanged.
//!
//! Seeded and bounded: `THOR_FUZZ_SEED` (default 1) and `THOR_FUZZ_SECS` (default 60 for the
//! whole run). A longer run:
//! `THOR_FUZZ_SECS=600 cargo test --release -p thor-kernels-capi --test fuzz -- --nocapture`.
//! A failure prints the seed, the iteration and the reproducing call.

use std::ffi::{c_char, c_void, CStr, CString};
use std::fmt::Write as _;
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use thor_kernels::layout::FactorSet;
use thor_kernels_capi::*;

// ---------------------------------------------------------------------------------------
// Guarded memory.

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

const CANARY: u8 = 0xA5;
/// The largest buffer the fuzzer allocates; calls that need more get a null pointer there.
const CAP_BYTES: usize = 4 << 20;

/// A buffer whose last byte touches an inaccessible page (and whose mapping starts with
/// one), with canary bytes between the mapping's first usable byte and the data.
struct Guarded {
    map: *mut u8,
    map_len: usize,
    data: *mut u8,
    bytes: usize,
}

impl Guarded {
    fn new(bytes: usize, rng: &mut StdRng) -> Guarded {
        let p = page();
        let usable = (bytes + 64).div_ceil(p) * p;
        let map_len = usable + 2 * p;
        // SAFETY: an anonymous private mapping; the pointers stay inside it.
        unsafe {
            let map = libc::mmap(
                null_mut(),
                map_len,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert!(map != libc::MAP_FAILED, "mmap failed");
            let map = map as *mut u8;
            assert_eq!(
                libc::mprotect(
                    map.add(p) as *mut c_void,
                    usable,
                    libc::PROT_READ | libc::PROT_WRITE
                ),
                0
            );
            let data = map.add(p + usable - bytes);
            std::ptr::write_bytes(map.add(p), CANARY, usable - bytes);
            let g = Guarded {
                map,
                map_len,
                data,
                bytes,
            };
            let s = std::slice::from_raw_parts_mut(data, bytes);
            rng.fill(s);
            g
        }
    }

    fn canary_ok(&self) -> bool {
        let p = page();
        // SAFETY: the canary region is inside the readable part of the mapping.
        unsafe {
            let start = self.map.add(p);
            let n = self.data.offset_from(start) as usize;
            std::slice::from_raw_parts(start, n)
                .iter()
                .all(|&b| b == CANARY)
        }
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the data region is readable.
        unsafe { std::slice::from_raw_parts(self.data, self.bytes) }
    }

    fn fill<T: Copy>(&mut self, values: &[T]) {
        assert!(std::mem::size_of_val(values) <= self.bytes);
        // SAFETY: inside the data region; T is plain data.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr() as *const u8,
                self.data,
                std::mem::size_of_val(values),
            )
        }
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.map as *mut c_void, self.map_len) };
    }
}

// ---------------------------------------------------------------------------------------
// The call being made, printed when anything goes wrong (also from the fault handler).

static CURRENT: AtomicPtr<c_char> = AtomicPtr::new(null_mut());

extern "C" fn on_fault(sig: libc::c_int) {
    let p = CURRENT.load(Ordering::SeqCst);
    let head = b"\nfuzz: memory fault (signal) in the call:\n";
    // SAFETY: write(2) is async-signal-safe; `p` is a NUL-terminated string kept alive by
    // the fuzzing loop while the call runs.
    unsafe {
        libc::write(2, head.as_ptr() as *const c_void, head.len());
        if !p.is_null() {
            libc::write(2, p as *const c_void, libc::strlen(p));
        }
        libc::write(2, b"\n".as_ptr() as *const c_void, 1);
        libc::_exit(128 + sig);
    }
}

fn install_fault_handler() {
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(
            libc::SIGSEGV,
            on_fault as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
        libc::signal(
            libc::SIGBUS,
            on_fault as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
}

fn last() -> String {
    // SAFETY: never null.
    unsafe { CStr::from_ptr(thor_v1_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

// ---------------------------------------------------------------------------------------
// Argument generation.

struct Gen {
    rng: StdRng,
    /// Set when a generator picked an edge value (reset for each call): the call may then
    /// fail for reasons the fuzzer does not model.
    edge: bool,
}

/// Integers near every limit an argument can meet.
const EDGES: [i64; 22] = [
    0,
    -1,
    1,
    2,
    31,
    33,
    255,
    257,
    i32::MAX as i64,
    i32::MAX as i64 + 1,
    u32::MAX as i64,
    1 << 32,
    (1 << 40) + 3,
    1 << 61,
    (1 << 61) + 4,
    1 << 62,
    (1 << 62) + 1,
    i64::MAX,
    i64::MAX - 31,
    i64::MIN,
    -(1 << 31),
    1 << 30,
];

impl Gen {
    fn chance(&mut self, p: f64) -> bool {
        self.rng.random_bool(p)
    }
    fn pick<T: Copy>(&mut self, v: &[T]) -> T {
        v[self.rng.random_range(0..v.len())]
    }
    /// A size: mostly in 1..=max, sometimes an edge value.
    fn size(&mut self, max: i64) -> i64 {
        if self.chance(0.92) {
            self.rng.random_range(1..=max)
        } else {
            self.edge = true;
            self.pick(&EDGES)
        }
    }
    /// A row stride for `dim`: mostly `dim` plus a little, sometimes anything.
    fn ld(&mut self, dim: i64) -> i64 {
        if self.chance(0.92) && (1..1 << 20).contains(&dim) {
            dim + self.rng.random_range(0..4)
        } else {
            self.edge = true;
            self.pick(&EDGES)
        }
    }
    fn block(&mut self) -> i32 {
        if self.chance(0.95) {
            self.pick(&[32, 64, 128, 256])
        } else {
            self.edge = true;
            self.pick(&[0, -1, 16, 33, 48, 96, 512, i32::MAX, i32::MIN])
        }
    }
    fn f32(&mut self) -> f32 {
        if self.chance(0.92) {
            self.rng.random_range(-2.0..2.0)
        } else {
            self.edge = true;
            self.pick(&[
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                0.0,
                -0.0,
                1e38,
                -1.0,
            ])
        }
    }
    fn enum_(&mut self, n: i32) -> i32 {
        if self.chance(0.95) {
            self.rng.random_range(0..n)
        } else {
            self.edge = true;
            self.pick(&[-1, n, n + 1, i32::MAX, i32::MIN])
        }
    }
}

fn valid_block(b: i32) -> bool {
    [32, 64, 128, 256].contains(&b)
}

/// The pointer arguments of one call and what the fuzzer expects of it.
struct Call {
    name: &'static str,
    args: &'static [&'static str],
    desc: String,
    /// Arguments the header forbids that this call carries (it must fail).
    faults: Vec<String>,
    bufs: Vec<Buf>,
    /// The description as the fault handler prints it (kept alive while the call runs).
    published: CString,
    /// The message the call left, read right after it.
    msg: String,
    /// Set at the call: no forbidden argument, no edge value, finite data, so the call
    /// must succeed.
    clean: bool,
    /// The generator put a NaN into an input on purpose.
    data_nan: bool,
    /// The generator cannot tell whether the call can succeed (no GPU, random settings).
    unmodelled: bool,
    /// Pairs of arguments (written, other) that may be the same buffer.
    alias_ok: &'static [(&'static str, &'static str)],
}

struct Buf {
    arg: &'static str,
    mem: Guarded,
    write: bool,
    before: Vec<u8>,
}

impl Call {
    fn new(name: &'static str, args: &'static [&'static str]) -> Call {
        Call {
            name,
            args,
            desc: format!("{name}("),
            faults: Vec::new(),
            bufs: Vec::new(),
            published: CString::default(),
            msg: String::new(),
            clean: false,
            data_nan: false,
            unmodelled: false,
            alias_ok: &[],
        }
    }

    fn arg(&mut self, name: &str, v: impl std::fmt::Debug) {
        let _ = write!(self.desc, "{name}={v:?}, ");
    }

    fn fault(&mut self, why: impl Into<String>) {
        self.faults.push(why.into());
    }

    /// A scalar that must be finite.
    fn finite(&mut self, name: &str, v: f64) {
        self.arg(name, v);
        if !v.is_finite() {
            self.fault(format!("{name} not finite"));
        }
    }

    /// A pointer argument needing `need` elements of T (None: too large to count), written
    /// when `write`, null allowed when `optional`: valid, null, misaligned or overlapping an
    /// earlier buffer of the call.
    fn ptr<T: Copy + 'static>(
        &mut self,
        g: &mut Gen,
        arg: &'static str,
        need: Option<usize>,
        write: bool,
        optional: bool,
    ) -> *mut T {
        let size = std::mem::size_of::<T>();
        let bytes = need
            .and_then(|n| n.checked_mul(size))
            .filter(|&b| b <= CAP_BYTES);
        let roll = g.rng.random_range(0..100);
        if need.is_none_or(|n| n.checked_mul(size).is_none()) {
            // A size that overflows or follows from forbidden values: the call must fail,
            // and must do so before it touches this small buffer.
            self.fault(format!("{arg}: no countable size"));
            if roll < 50 {
                let (p, _) = self.valid::<T>(g, arg, 16 * size, write);
                self.arg(arg, "<16 elements for an uncountable size>");
                return p;
            }
        }
        let (p, what): (*mut T, String) = match (roll, bytes) {
            (0..=3, _) | (_, None) => (null_mut(), "null".into()),
            (4..=6, Some(b)) if std::mem::align_of::<T>() > 1 && b > 0 => {
                // The data ends at a page boundary: one byte more starts it one byte off
                // the alignment of T.
                let mem = Guarded::new(b + 1, &mut g.rng);
                let p = mem.data as *mut T;
                self.keep(arg, mem, write);
                self.fault(format!("{arg} misaligned"));
                (p, format!("misaligned {b} bytes"))
            }
            (7..=10, Some(b)) if b > 0 && !self.bufs.is_empty() => {
                let i = g.rng.random_range(0..self.bufs.len());
                let other = &self.bufs[i];
                let elems = other.mem.bytes / size;
                let other_arg = other.arg;
                // Exact aliasing too, except where the header allows it (in place).
                let same_ok = self
                    .alias_ok
                    .iter()
                    .any(|&(w, o)| (w, o) == (arg, other_arg) || (w, o) == (other_arg, arg));
                if elems >= 1 && (write || other.write) && !(same_ok && elems < 2) {
                    let off = if !same_ok && g.chance(0.3) {
                        0
                    } else {
                        g.rng.random_range(1..elems.max(2))
                    };
                    // SAFETY: inside the other buffer; the aligned start stays aligned.
                    let p = unsafe {
                        let base = other.mem.data.add(other.mem.bytes % size);
                        base.add(off * size)
                    } as *mut T;
                    if (p as usize) % std::mem::align_of::<T>() == 0 && off < elems.max(1) {
                        self.fault(format!("{arg} overlaps {other_arg}"));
                        (p, format!("inside {other_arg}"))
                    } else {
                        self.valid(g, arg, b, write)
                    }
                } else {
                    self.valid(g, arg, b, write)
                }
            }
            (_, Some(b)) => self.valid(g, arg, b, write),
        };
        if p.is_null() && !optional {
            self.fault(format!("{arg} null"));
        }
        self.arg(arg, format_args!("<{what}>"));
        p
    }

    fn valid<T: 'static>(
        &mut self,
        g: &mut Gen,
        arg: &'static str,
        b: usize,
        write: bool,
    ) -> (*mut T, String) {
        let mut mem = Guarded::new(b, &mut g.rng);
        // Float buffers hold finite values, mostly non-negative (damping, inputs), with a
        // NaN now and then on purpose; 16-bit inputs (f16 / bf16) hold finite values.
        let t = std::any::TypeId::of::<T>();
        if t == std::any::TypeId::of::<f32>() {
            let k: u32 = g.rng.random();
            let mut v: Vec<f32> = (0..b / 4)
                .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ k) % 1000)
                .map(|r| r as f32 / 800.0 - 0.25)
                .collect();
            if !v.is_empty() && !write && g.chance(0.03) {
                let i = g.rng.random_range(0..v.len());
                v[i] = f32::NAN;
                self.data_nan = true;
            }
            mem.fill(&v);
        } else if t == std::any::TypeId::of::<u16>() {
            mem.fill(&vec![0x3800u16; b / 2]);
        }
        let p = mem.data as *mut T;
        self.keep(arg, mem, write);
        (p, format!("{b} bytes"))
    }

    fn keep(&mut self, arg: &'static str, mem: Guarded, write: bool) {
        self.bufs.push(Buf {
            arg,
            before: mem.bytes().to_vec(),
            mem,
            write,
        });
    }

    /// A host array of values the call reads (sometimes null: a fault).
    fn host<T: Copy + std::fmt::Debug>(
        &mut self,
        g: &mut Gen,
        arg: &'static str,
        v: &[T],
    ) -> *const T {
        if v.is_empty() || g.chance(0.03) {
            self.arg(arg, "<null>");
            self.fault(format!("{arg} null"));
            return null();
        }
        let misaligned = std::mem::align_of::<T>() > 1 && g.chance(0.02);
        let mut mem = Guarded::new(std::mem::size_of_val(v) + misaligned as usize, &mut g.rng);
        mem.fill(v);
        let p = mem.data as *const T;
        if misaligned {
            self.fault(format!("{arg} misaligned"));
        }
        if v.len() <= 8 {
            self.arg(arg, v);
        } else {
            self.arg(arg, format_args!("[{} values]", v.len()));
        }
        self.keep(arg, mem, false);
        p
    }

    /// A host value the call reads where null is allowed (never nulled here).
    fn host_opt<T: Copy + std::fmt::Debug>(
        &mut self,
        g: &mut Gen,
        arg: &'static str,
        v: &[T],
    ) -> *const T {
        let mut mem = Guarded::new(std::mem::size_of_val(v), &mut g.rng);
        mem.fill(v);
        let p = mem.data as *const T;
        self.arg(arg, v);
        self.keep(arg, mem, false);
        p
    }

    /// Re-records every buffer's content (after the generator filled them) and publishes
    /// the call for the fault handler: called right before the call is made.
    fn snapshot(&mut self, g: &mut Gen) {
        for b in &mut self.bufs {
            b.before = b.mem.bytes().to_vec();
        }
        self.clean = self.faults.is_empty() && !g.edge && !self.data_nan && !self.unmodelled;
        g.edge = false;
        self.published =
            CString::new(format!("{})", self.desc).replace('\0', " ")).unwrap_or_default();
        CURRENT.store(self.published.as_ptr() as *mut c_char, Ordering::SeqCst);
    }

    /// Checks the call's outcome; panics with the call on a violation.
    fn check(&self, status: ThorStatus, ctx: &str) {
        let msg = &self.msg;
        let fail = |why: String| -> ! {
            panic!(
                "{why}\n  call: {})\n  status: {status:?}, message: {msg:?}\n  {ctx}",
                self.desc
            )
        };
        for b in &self.bufs {
            if !b.mem.canary_ok() {
                fail(format!("canary in front of `{}` overwritten", b.arg));
            }
            let changed = b.mem.bytes() != &b.before[..];
            if changed && !b.write {
                fail(format!("input `{}` was modified", b.arg));
            }
            if changed && status != ThorStatus::Ok {
                fail(format!("output `{}` written by a failed call", b.arg));
            }
        }
        if self.clean && status != ThorStatus::Ok {
            fail("a call without a forbidden argument, edge value or NaN failed".into());
        }
        if status == ThorStatus::Ok {
            if !self.faults.is_empty() {
                fail(format!("accepted a forbidden argument: {:?}", self.faults));
            }
            if !msg.is_empty() {
                fail("a message after success".into());
            }
        } else {
            if status == ThorStatus::Internal {
                fail("internal error".into());
            }
            // Argument errors name the argument; the others (no device, driver) say why.
            let about_args = matches!(
                status,
                ThorStatus::InvalidArgument | ThorStatus::Shape | ThorStatus::OutOfMemory
            );
            let named = self.args.iter().any(|a| msg.contains(&format!("`{a}`")));
            if msg.is_empty() || (about_args && !named) {
                fail(format!("the message names none of {:?}", self.args));
            }
        }
    }
}

/// The call just made, with the message it left.
fn made(mut c: Call, s: ThorStatus) -> (Call, ThorStatus) {
    c.msg = last();
    (c, s)
}

// ---------------------------------------------------------------------------------------
// One random call of each kernel op.

fn size_of_set(b: i32, dims: &[i64]) -> Option<FactorSet> {
    let d: Option<Vec<usize>> = dims.iter().map(|&v| usize::try_from(v).ok()).collect();
    FactorSet::new(usize::try_from(b).ok()?, &d?).ok()
}

/// Elements of a factor of `dim` at block `b` as blocks, when the pair is valid.
fn blocks_len(dim: i64, b: i32) -> Option<usize> {
    size_of_set(b, &[dim]).map(|s| s.buffer_len())
}

/// `(rows - 1) * ld + dim` when valid and countable.
fn span(rows: i64, ld: i64, dim: i64) -> Option<usize> {
    if rows < 1 || dim < 1 || ld < dim {
        return None;
    }
    (rows as usize - 1)
        .checked_mul(ld as usize)?
        .checked_add(dim as usize)
}

fn fuzz_split_merge(g: &mut Gen, ctx: *mut ThorContext, merge: bool) -> (Call, ThorStatus) {
    let (dim, block) = (g.size(300), g.block());
    let ld = g.ld(dim);
    let mut c = if merge {
        Call::new(
            "thor_v1_merge",
            &["ctx", "blocks", "dim", "block", "dense", "ld"],
        )
    } else {
        Call::new(
            "thor_v1_split",
            &["ctx", "dense", "ld", "dim", "block", "out"],
        )
    };
    c.arg("dim", dim);
    c.arg("ld", ld);
    c.arg("block", block);
    if dim < 1 || ld < 1 || ld < dim || !valid_block(block) {
        c.fault("bad sizes");
    }
    let dense_n = span(dim, ld, dim);
    let blocks_n = blocks_len(dim, block);
    let s = if merge {
        let blocks = c.ptr::<f32>(g, "blocks", blocks_n, false, false);
        let dense = c.ptr::<f32>(g, "dense", dense_n, true, false);
        c.snapshot(g);
        // SAFETY: every pointer is null or addresses a guarded buffer of the size the
        // contract needs (or the arguments are refused before any access).
        unsafe { thor_v1_merge(ctx, blocks, dim, block, dense, ld) }
    } else {
        let dense = c.ptr::<f32>(g, "dense", dense_n, false, false);
        let out = c.ptr::<f32>(g, "out", blocks_n, true, false);
        c.snapshot(g);
        // SAFETY: as above.
        unsafe { thor_v1_split(ctx, dense, ld, dim, block, out) }
    };
    made(c, s)
}

fn fuzz_traces(g: &mut Gen, ctx: *mut ThorContext) -> (Call, ThorStatus) {
    let mut c = Call::new(
        "thor_v1_traces",
        &[
            "ctx",
            "blocks",
            "block",
            "dims",
            "n_factors",
            "block_traces",
            "factor_traces",
        ],
    );
    let (n, block) = (g.size(5), g.block());
    c.arg("n_factors", n);
    c.arg("block", block);
    let k = if (1..=300).contains(&n) {
        n as usize
    } else {
        4
    };
    let dims: Vec<i64> = (0..k).map(|_| g.size(200)).collect();
    if !(1..=THOR_MAX_FACTORS).contains(&n) || dims.iter().any(|&d| d < 1) || !valid_block(block) {
        c.fault("bad sizes");
    }
    let set = if (1..=300).contains(&n) {
        size_of_set(block, &dims)
    } else {
        None
    };
    let dp = c.host(g, "dims", &dims);
    let blocks = c.ptr::<f32>(
        g,
        "blocks",
        set.as_ref().map(|s| s.buffer_len()),
        false,
        false,
    );
    let bt = c.ptr::<f32>(
        g,
        "block_traces",
        set.as_ref().map(|s| s.total_blocks()),
        true,
        false,
    );
    let ft = c.ptr::<f32>(
        g,
        "factor_traces",
        set.as_ref().map(|s| s.len()),
        true,
        false,
    );
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s = unsafe { thor_v1_traces(ctx, blocks, block, dp, n, bt, ft) };
    made(c, s)
}

fn fuzz_accumulate(g: &mut Gen, ctx: *mut ThorContext) -> (Call, ThorStatus) {
    let mut c = Call::new(
        "thor_v1_accumulate",
        &[
            "ctx",
            "x",
            "dtype",
            "rows",
            "ld",
            "dim",
            "block",
            "alpha",
            "beta",
            "blocks",
            "block_traces",
        ],
    );
    let (rows, dim, block, dtype) = (g.size(40), g.size(200), g.block(), g.enum_(3));
    let ld = g.ld(dim);
    let (alpha, beta) = (g.f32(), g.f32());
    for (k, v) in [("rows", rows), ("dim", dim), ("ld", ld)] {
        c.arg(k, v);
    }
    c.arg("block", block);
    c.arg("dtype", dtype);
    c.finite("alpha", alpha as f64);
    c.finite("beta", beta as f64);
    if rows < 1 || dim < 1 || ld < dim || !valid_block(block) || !(0..3).contains(&dtype) {
        c.fault("bad sizes or dtype");
    }
    let n = span(rows, ld, dim);
    let x: *mut c_void = match dtype {
        1 | 2 => c.ptr::<u16>(g, "x", n, false, false) as *mut c_void,
        _ => {
            let p = c.ptr::<f32>(g, "x", n, false, false);
            // Mostly finite input (random bits are NaN often enough on their own).
            if let (Some(b), false) = (c.bufs.last_mut(), p.is_null()) {
                if b.arg == "x" && b.mem.bytes % 4 == 0 && g.chance(0.8) {
                    let v: Vec<f32> = (0..b.mem.bytes / 4)
                        .map(|i| (i % 7) as f32 * 0.25)
                        .collect();
                    b.mem.fill(&v);
                }
            }
            p as *mut c_void
        }
    };
    let blocks = c.ptr::<f32>(g, "blocks", blocks_len(dim, block), true, false);
    let bt = c.ptr::<f32>(
        g,
        "block_traces",
        size_of_set(block, &[dim]).map(|s| s.total_blocks()),
        true,
        false,
    );
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s =
        unsafe { thor_v1_accumulate(ctx, x, dtype, rows, ld, dim, block, alpha, beta, blocks, bt) };
    made(c, s)
}

fn fuzz_grouped(g: &mut Gen, ctx: *mut ThorContext, out: &mut Vec<(Call, ThorStatus)>) {
    let mut c = Call::new(
        "thor_v1_accumulate_plan_create",
        &[
            "ctx",
            "block",
            "n_factors",
            "dims",
            "rows",
            "dtype",
            "mode",
            "out",
        ],
    );
    let (n, block, dtype, mode) = (g.size(4), g.block(), g.enum_(3), g.enum_(2));
    c.arg("n_factors", n);
    c.arg("block", block);
    c.arg("dtype", dtype);
    c.arg("mode", mode);
    let k = if (1..=300).contains(&n) {
        n as usize
    } else {
        3
    };
    let dims: Vec<i64> = (0..k).map(|_| g.size(150)).collect();
    let rows: Vec<i64> = (0..k).map(|_| g.size(30)).collect();
    if !(1..=THOR_MAX_FACTORS).contains(&n)
        || dims.iter().chain(&rows).any(|&d| d < 1)
        || rows.iter().any(|&r| r > 1 << 30)
        || !valid_block(block)
        || !(0..3).contains(&dtype)
        || !(0..2).contains(&mode)
    {
        c.fault("bad plan arguments");
    }
    let dp = c.host(g, "dims", &dims);
    let rp = c.host(g, "rows", &rows);
    let op = c.ptr::<*mut ThorAccumulatePlan>(g, "out", Some(1), true, false);
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s = unsafe { thor_v1_accumulate_plan_create(ctx, block, n, dp, rp, dtype, mode, op) };
    let plan = if s == ThorStatus::Ok {
        // SAFETY: written on success.
        unsafe { *op }
    } else {
        null_mut()
    };
    out.push(made(c, s));
    if plan.is_null() {
        return;
    }
    let set = size_of_set(block, &dims).expect("a plan was made for this set");
    let size = if dtype == 0 { 4 } else { 2 };
    for _ in 0..g.rng.random_range(1..=3) {
        let mut c = Call::new(
            "thor_v1_accumulate_grouped",
            &[
                "ctx",
                "plan",
                "xs",
                "lds",
                "alphas",
                "betas",
                "blocks",
                "block_traces",
                "factor_traces",
                "status",
            ],
        );
        let lds: Vec<i64> = dims.iter().map(|&d| g.ld(d)).collect();
        let alphas: Vec<f32> = (0..k).map(|_| g.f32()).collect();
        let betas: Vec<f32> = (0..k).map(|_| g.f32()).collect();
        if lds.iter().zip(&dims).any(|(&l, &d)| l < d)
            || alphas.iter().chain(&betas).any(|v| !v.is_finite())
        {
            c.fault("bad lds, alphas or betas");
        }
        let mut xs = Vec::new();
        for f in 0..k {
            let n = span(rows[f], lds[f], dims[f]);
            let p: *mut c_void = if size == 4 {
                c.ptr::<f32>(g, "xs", n, false, false) as *mut c_void
            } else {
                c.ptr::<u16>(g, "xs", n, false, false) as *mut c_void
            };
            xs.push(p as *const c_void);
        }
        let xsp = c.host(g, "xs", &xs);
        let ldp = c.host(g, "lds", &lds);
        let ap = c.host(g, "alphas", &alphas);
        let bp = c.host(g, "betas", &betas);
        let blocks = c.ptr::<f32>(g, "blocks", Some(set.buffer_len()), true, false);
        let bt = c.ptr::<f32>(g, "block_traces", Some(set.total_blocks()), true, false);
        let ft = c.ptr::<f32>(g, "factor_traces", Some(set.len()), true, false);
        let st = c.ptr::<i32>(g, "status", Some(set.len()), true, false);
        c.snapshot(g);
        // SAFETY: as in fuzz_split_merge.
        let s =
            unsafe { thor_v1_accumulate_grouped(ctx, plan, xsp, ldp, ap, bp, blocks, bt, ft, st) };
        out.push(made(c, s));
    }
    // SAFETY: made above, destroyed once.
    unsafe { thor_v1_accumulate_plan_destroy(plan) };
}

fn fuzz_invert(g: &mut Gen, ctx: *mut ThorContext) -> (Call, ThorStatus) {
    let mut c = Call::new(
        "thor_v1_invert",
        &[
            "ctx",
            "block",
            "n_blocks",
            "input",
            "output",
            "damping",
            "damping_all",
            "mask",
            "policy",
            "info",
            "damping_used",
            "policy.factor",
            "policy.floor",
            "policy.max_retries",
        ],
    );
    c.alias_ok = &[("output", "input")];
    let (block, nb) = (g.block(), g.size(3));
    c.arg("block", block);
    c.arg("n_blocks", nb);
    if nb < 1 || !valid_block(block) {
        c.fault("bad sizes");
    }
    let len = (valid_block(block) && nb >= 1)
        .then(|| (nb as usize).checked_mul((block * block) as usize))
        .flatten();
    let n = (nb >= 1).then_some(nb as usize);
    let input = c.ptr::<f32>(g, "input", len, false, false);
    let in_place = g.chance(0.2) && !input.is_null();
    let output = if in_place {
        // The one overlap allowed: the same buffer. It is written.
        if let Some(b) = c.bufs.last_mut() {
            b.write = true;
        }
        c.arg("output", "<= input>");
        input
    } else {
        c.ptr::<f32>(g, "output", len, true, false)
    };
    let per_block = g.chance(0.3);
    let damping = if per_block {
        c.ptr::<f32>(g, "damping", n, false, true)
    } else {
        null_mut()
    };
    let damping_all = if g.chance(0.9) {
        g.f32().abs()
    } else {
        g.f32()
    };
    c.arg("damping_all", damping_all);
    if damping.is_null() && !(damping_all >= 0.0 && damping_all.is_finite()) {
        c.fault("damping_all");
    }
    let mask = if g.chance(0.3) {
        c.ptr::<u8>(g, "mask", n, false, true)
    } else {
        null_mut()
    };
    let policy = if g.chance(0.5) {
        let p = ThorInvertPolicy {
            max_retries: g.pick(&[0, 1, 3, 64, 65, u32::MAX]),
            factor: g.pick(&[10.0, 2.0, 1.0, 0.5, f32::NAN, f32::INFINITY]),
            floor: g.pick(&[1e-6, 1.0, 0.0, -1.0, f32::NAN]),
        };
        if p.max_retries > 0
            && (p.max_retries > 64
                || !(p.factor > 1.0 && p.factor.is_finite())
                || !(p.floor > 0.0 && p.floor.is_finite()))
        {
            c.fault("policy");
        }
        c.host_opt(g, "policy", &[p])
    } else {
        null()
    };
    let info = c.ptr::<i32>(g, "info", n, true, false);
    let used = if g.chance(0.4) {
        c.ptr::<f32>(g, "damping_used", n, true, true)
    } else {
        null_mut()
    };
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s = unsafe {
        thor_v1_invert(
            ctx,
            block,
            nb,
            input,
            output,
            damping,
            damping_all,
            mask,
            policy,
            info,
            used,
        )
    };
    made(c, s)
}

fn fuzz_apply(g: &mut Gen, ctx: *mut ThorContext) -> (Call, ThorStatus) {
    let mut c = Call::new(
        "thor_v1_apply",
        &[
            "ctx", "block", "g_inv", "g_dim", "grad", "a_inv", "a_dim", "scale", "out",
        ],
    );
    let (block, gd, ad, scale) = (g.block(), g.size(150), g.size(150), g.f32());
    c.arg("block", block);
    c.arg("g_dim", gd);
    c.arg("a_dim", ad);
    c.finite("scale", scale as f64);
    if gd < 1 || ad < 1 || !valid_block(block) {
        c.fault("bad sizes");
    }
    let n = (gd >= 1 && ad >= 1)
        .then(|| (gd as usize).checked_mul(ad as usize))
        .flatten();
    let gi = if g.chance(0.7) {
        c.ptr::<f32>(g, "g_inv", blocks_len(gd, block), false, true)
    } else {
        null_mut()
    };
    let grad = c.ptr::<f32>(g, "grad", n, false, false);
    let ai = if g.chance(0.7) {
        c.ptr::<f32>(g, "a_inv", blocks_len(ad, block), false, true)
    } else {
        null_mut()
    };
    let out = c.ptr::<f32>(g, "out", n, true, false);
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s = unsafe { thor_v1_apply(ctx, block, gi, gd, grad, ai, ad, scale, out) };
    made(c, s)
}

fn fuzz_trace_rule(g: &mut Gen) -> (Call, ThorStatus) {
    let mut c = Call::new(
        "thor_v1_trace_rule",
        &["prev", "cur", "w1", "w2", "decision"],
    );
    let f = |g: &mut Gen| g.f32() as f64;
    let (prev, cur, w1, w2) = (f(g), f(g), f(g).abs(), f(g).abs());
    c.finite("prev", prev);
    c.finite("cur", cur);
    c.finite("w1", w1);
    c.finite("w2", w2);
    if !(w1 >= w2 && w2 >= 0.0) {
        c.fault("thresholds");
    }
    let d = c.ptr::<i32>(g, "decision", Some(1), true, false);
    c.snapshot(g);
    // SAFETY: as in fuzz_split_merge.
    let s = unsafe { thor_v1_trace_rule(prev, cur, w1, w2, d) };
    made(c, s)
}

// ---------------------------------------------------------------------------------------
// The optimizer: a random sequence of calls on one handle.

struct Opt {
    opt: *mut ThorOptimizer,
    /// (inputs, d_a, d_g) of each registered layer.
    layers: Vec<(usize, usize, usize)>,
    /// `[c_in, kh, kw, c_out]` of each registered conv layer, `None` for a linear one.
    convs: Vec<Option<[usize; 4]>>,
    dir: std::path::PathBuf,
}

impl Opt {
    fn state(&self) -> Vec<u8> {
        let path = self.dir.join("snapshot");
        let c = CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a live handle and a NUL-terminated path.
        assert_eq!(
            unsafe { thor_v1_optimizer_save(self.opt, c.as_ptr()) },
            ThorStatus::Ok,
            "{}",
            last()
        );
        std::fs::read(&path).unwrap()
    }
}

fn new_opt(
    g: &mut Gen,
    ctx: *mut ThorContext,
    dir: &std::path::Path,
    out: &mut Vec<(Call, ThorStatus)>,
) -> Opt {
    let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
    // SAFETY: filled by the library before it is read.
    let mut cfg = unsafe {
        assert_eq!(
            thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
            ThorStatus::Ok
        );
        cfg.assume_init()
    };
    // On a context (the CPU one here) or without.
    let on = g.chance(0.5);
    let mut c = Call::new(
        if on {
            "thor_v1_optimizer_create_on"
        } else {
            "thor_v1_optimizer_create"
        },
        &[
            "ctx",
            "cfg",
            "out",
            "block",
            "stat_decay",
            "damping_l0",
            "damping_decay",
            "damping_every",
            "interval",
            "w1",
            "kl_clip",
        ],
    );
    cfg.block = if g.chance(0.9) {
        g.pick(&[32, 64])
    } else {
        g.block()
    };
    cfg.interval = g.pick(&[1, 2, 5]);
    if g.chance(0.2) {
        c.unmodelled = true;
        cfg.stat_decay = g.f32();
        cfg.kl_clip = g.f32();
        cfg.w1 = g.f32() as f64;
        cfg.w2 = g.f32() as f64;
        cfg.damping_l0 = g.f32();
    }
    c.arg("cfg", cfg);
    let op = c.ptr::<*mut ThorOptimizer>(g, "out", Some(1), true, false);
    c.snapshot(g);
    // SAFETY: `cfg` is a local; `op` null or a guarded pointer slot.
    let s = unsafe {
        if on {
            thor_v1_optimizer_create_on(ctx, &cfg, op)
        } else {
            thor_v1_optimizer_create(&cfg, op)
        }
    };
    let opt = if s == ThorStatus::Ok {
        // SAFETY: written on success.
        unsafe { *op }
    } else {
        null_mut()
    };
    out.push(made(c, s));
    let opt = if opt.is_null() {
        // A known-good handle to go on with.
        let mut d = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
        let mut h = null_mut();
        // SAFETY: as above.
        unsafe {
            thor_v1_optimizer_config_default(d.as_mut_ptr());
            let mut d = d.assume_init();
            d.block = 32;
            d.interval = 1;
            assert_eq!(thor_v1_optimizer_create(&d, &mut h), ThorStatus::Ok);
        }
        h
    } else {
        opt
    };
    Opt {
        opt,
        layers: Vec::new(),
        convs: Vec::new(),
        dir: dir.to_path_buf(),
    }
}

/// Fills most of the call's f32 buffers so far with finite values (the rest keep their
/// random bytes, NaN patterns included).
fn fill_finite(c: &mut Call, g: &mut Gen) {
    for b in c.bufs.iter_mut() {
        if g.chance(0.9) && b.mem.bytes % 4 == 0 {
            let v: Vec<f32> = (0..b.mem.bytes / 4)
                .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1)
                .collect();
            b.mem.fill(&v);
        }
    }
}

fn fuzz_opt_call(g: &mut Gen, o: &mut Opt, out: &mut Vec<(Call, ThorStatus)>) {
    let before = o.state();
    let nl = o.layers.len() as i64;
    let layer = |g: &mut Gen| -> i32 {
        if nl > 0 && g.chance(0.9) {
            g.rng.random_range(0..nl) as i32
        } else {
            g.pick(&[-1, nl as i32, i32::MAX, i32::MIN])
        }
    };
    let known = |l: i32| l >= 0 && (l as i64) < nl;
    let (c, s, mutates) = match g.rng.random_range(0..12) {
        0 | 1 => {
            let conv = g.chance(0.3);
            let mut c = if conv {
                Call::new(
                    "thor_v1_optimizer_add_conv2d",
                    &["opt", "c_in", "c_out", "kh", "kw", "bias", "id"],
                )
            } else {
                Call::new(
                    "thor_v1_optimizer_add_linear",
                    &["opt", "inputs", "outputs", "bias", "id"],
                )
            };
            let dims: Vec<i64> = (0..if conv { 4 } else { 2 })
                .map(|_| {
                    if g.chance(0.9) {
                        g.rng.random_range(1..=20)
                    } else {
                        g.edge = true;
                        g.pick(&EDGES)
                    }
                })
                .collect();
            let bias = g.pick(&[0, 1, 2, -1]);
            c.arg("dims", &dims);
            c.arg("bias", bias);
            if dims.iter().any(|&d| d < 1) {
                c.fault("a size < 1");
            }
            let id = c.ptr::<i32>(g, "id", Some(1), true, false);
            c.snapshot(g);
            // SAFETY: a live handle; `id` null or a guarded slot.
            let s = unsafe {
                if conv {
                    thor_v1_optimizer_add_conv2d(
                        o.opt, dims[0], dims[1], dims[2], dims[3], bias, id,
                    )
                } else {
                    thor_v1_optimizer_add_linear(o.opt, dims[0], dims[1], bias, id)
                }
            };
            if s == ThorStatus::Ok {
                let b = (bias != 0) as usize;
                let (inputs, d_g) = if conv {
                    ((dims[0] * dims[2] * dims[3]) as usize, dims[1] as usize)
                } else {
                    (dims[0] as usize, dims[1] as usize)
                };
                // SAFETY: written on success.
                assert_eq!(unsafe { *id } as usize, o.layers.len(), "ids in order");
                o.layers.push((inputs, inputs + b, d_g));
                o.convs
                    .push(conv.then(|| [0, 2, 3, 1].map(|i| dims[i] as usize)));
            }
            (c, s, true)
        }
        2 | 3 => {
            let mut c = Call::new(
                "thor_v1_optimizer_observe",
                &["opt", "layer", "acts", "out_grads", "rows", "observation"],
            );
            let (l, rows) = (layer(g), g.size(16));
            c.arg("layer", l);
            c.arg("rows", rows);
            if !known(l) || rows < 1 {
                c.fault("layer or rows");
            }
            let shape = known(l).then(|| o.layers[l as usize]);
            let r = (rows >= 1).then_some(rows as usize);
            let na = shape.zip(r).and_then(|((i, _, _), r)| r.checked_mul(i));
            let ng = shape.zip(r).and_then(|((_, _, dg), r)| r.checked_mul(dg));
            let acts = c.ptr::<f32>(g, "acts", na, false, false);
            let grads = c.ptr::<f32>(g, "out_grads", ng, false, false);
            fill_finite(&mut c, g);
            let obs = if g.chance(0.8) {
                c.ptr::<i32>(g, "observation", Some(1), true, true)
            } else {
                null_mut()
            };
            c.snapshot(g);
            // SAFETY: a live handle; the pointers null or guarded buffers of the sizes the
            // layer implies.
            let s = unsafe { thor_v1_optimizer_observe(o.opt, l, acts, grads, rows, obs) };
            (c, s, true)
        }
        4 => {
            let mut c = Call::new(
                "thor_v1_optimizer_precondition",
                &["opt", "layer", "grad", "out"],
            );
            c.alias_ok = &[("out", "grad")];
            let l = layer(g);
            c.arg("layer", l);
            if !known(l) {
                c.fault("layer");
            }
            let n = known(l)
                .then(|| o.layers[l as usize])
                .map(|(_, da, dg)| da * dg);
            let grad = c.ptr::<f32>(g, "grad", n, false, false);
            let out_ = if g.chance(0.2) && !grad.is_null() {
                if let Some(b) = c.bufs.last_mut() {
                    b.write = true;
                }
                c.arg("out", "<= grad>");
                grad
            } else {
                c.ptr::<f32>(g, "out", n, true, false)
            };
            c.snapshot(g);
            // SAFETY: as above.
            let s = unsafe { thor_v1_optimizer_precondition(o.opt, l, grad, out_) };
            (c, s, false)
        }
        5 => {
            let mut c = Call::new(
                "thor_v1_optimizer_kl_clip_factor",
                &[
                    "opt", "lr", "n_layers", "layers", "grads", "updates", "factor",
                ],
            );
            let lr = g.f32();
            let n = if g.chance(0.9) {
                g.rng.random_range(0..=nl)
            } else {
                g.edge = true;
                g.pick(&EDGES)
            };
            c.arg("lr", lr);
            c.arg("n_layers", n);
            if !(lr.is_finite() && lr >= 0.0) || n < 0 || n > nl {
                c.fault("lr or n_layers");
            }
            let k = if (0..=nl).contains(&n) { n as usize } else { 1 };
            let ids: Vec<i32> = (0..k).map(|_| layer(g)).collect();
            if ids.iter().any(|&l| !known(l)) {
                c.fault("an unknown layer");
            }
            let mut seen = std::collections::HashSet::new();
            if !ids.iter().all(|l| seen.insert(*l)) {
                c.fault("a repeated layer");
            }
            let mut gp = Vec::new();
            let mut up = Vec::new();
            for &l in &ids {
                let len = known(l)
                    .then(|| o.layers[l as usize])
                    .map(|(_, da, dg)| da * dg);
                gp.push(c.ptr::<f32>(g, "grads", len, false, false) as *const f32);
                up.push(c.ptr::<f32>(g, "updates", len, false, false) as *const f32);
            }
            let (no_ids, no_ptrs) = ([0i32; 1], [null::<f32>(); 1]);
            let idp = if k == 0 {
                no_ids.as_ptr()
            } else {
                c.host(g, "layers", &ids)
            };
            let (gpp, upp) = if k == 0 {
                (no_ptrs.as_ptr(), no_ptrs.as_ptr())
            } else {
                (c.host(g, "grads", &gp), c.host(g, "updates", &up))
            };
            let f = c.ptr::<f32>(g, "factor", Some(1), true, false);
            c.snapshot(g);
            // SAFETY: as above.
            let s = unsafe { thor_v1_optimizer_kl_clip_factor(o.opt, lr, n, idp, gpp, upp, f) };
            (c, s, false)
        }
        11 => {
            let mut c = Call::new(
                "thor_v1_optimizer_observe_layers",
                &[
                    "opt",
                    "n",
                    "steps",
                    "observations",
                    "layer",
                    "acts",
                    "out_grads",
                    "rows",
                ],
            );
            let n = if g.chance(0.95) {
                g.rng.random_range(0..4i64)
            } else {
                g.pick(&[-1, i64::MIN])
            };
            c.arg("n", n);
            if n < 0 {
                c.fault("n negative");
            }
            let mut steps = Vec::new();
            let mut seen = Vec::new();
            for _ in 0..n.max(0) {
                let (l, rows) = (layer(g), g.size(16));
                c.arg("layer", l);
                c.arg("rows", rows);
                if !known(l) || rows < 1 {
                    c.fault("layer or rows");
                }
                if seen.contains(&l) {
                    c.fault("a layer twice");
                }
                seen.push(l);
                let shape = known(l).then(|| o.layers[l as usize]);
                let r = (rows >= 1).then_some(rows as usize);
                let na = shape.zip(r).and_then(|((i, _, _), r)| r.checked_mul(i));
                let ng = shape.zip(r).and_then(|((_, _, dg), r)| r.checked_mul(dg));
                let acts = c.ptr::<f32>(g, "acts", na, false, false);
                let grads = c.ptr::<f32>(g, "out_grads", ng, false, false);
                steps.push(ThorLayerStep {
                    layer: l,
                    acts,
                    out_grads: grads,
                    rows,
                    conv: null(),
                });
            }
            fill_finite(&mut c, g);
            let sp = if steps.is_empty() {
                // A valid, empty array (or null: a fault).
                if g.chance(0.1) {
                    c.fault("steps null");
                    null()
                } else {
                    c.host_opt(g, "steps", &[0u8; 8]) as *const ThorLayerStep
                }
            } else {
                c.host(g, "steps", &steps)
            };
            let count = (n >= 0).then_some(n as usize);
            let obs = if g.chance(0.8) {
                c.ptr::<i32>(g, "observations", count, true, true)
            } else {
                null_mut()
            };
            c.snapshot(g);
            // SAFETY: a live handle; `steps` null or a guarded array of `n` steps whose
            // pointers are null or guarded buffers of the sizes their layers imply.
            let s = unsafe { thor_v1_optimizer_observe_layers(o.opt, n, sp, obs) };
            (c, s, true)
        }
        10 => {
            let mut c = Call::new(
                "thor_v1_optimizer_observe_conv",
                &[
                    "opt",
                    "layer",
                    "input",
                    "out_grad",
                    "tensors",
                    "observation",
                ],
            );
            // Mostly a conv layer, when there is one.
            let convs: Vec<i32> = (0..o.convs.len())
                .filter(|&i| o.convs[i].is_some())
                .map(|i| i as i32)
                .collect();
            let l = if !convs.is_empty() && g.chance(0.8) {
                g.pick(&convs)
            } else {
                layer(g)
            };
            c.arg("layer", l);
            let conv = known(l).then(|| o.convs[l as usize]).flatten();
            if conv.is_none() {
                c.fault("layer unknown or not a conv layer");
            }
            let [c_in, kh, kw, c_out] = conv.unwrap_or([1, 1, 1, 1]);
            let small = |g: &mut Gen, lo: i64, hi: i64| -> i64 {
                if g.chance(0.98) {
                    g.rng.random_range(lo..=hi)
                } else {
                    g.edge = true;
                    g.pick(&EDGES)
                }
            };
            let t = ThorConvTensors {
                batch: small(g, 1, 3),
                // Mostly around the kernel's size, so that most geometries are valid.
                h: small(g, (kh as i64 - 2).max(1), kh as i64 + 6),
                w: small(g, (kw as i64 - 2).max(1), kw as i64 + 6),
                stride: [small(g, 1, 3), small(g, 1, 3)],
                padding: [small(g, 0, 2), small(g, 0, 2)],
                dilation: [small(g, 1, 2), small(g, 1, 2)],
                input_strides: [0; 4],
                grad_strides: [0; 4],
            };
            c.arg("tensors", format!("{t:?}"));
            // What the library must make of it: the geometry, its output, the spans.
            let us = |v: i64| usize::try_from(v).ok();
            let geom = (|| {
                let g = thor_kernels::Conv2dGeometry {
                    c_in,
                    h: us(t.h)?,
                    w: us(t.w)?,
                    kernel: [kh, kw],
                    stride: [us(t.stride[0])?, us(t.stride[1])?],
                    padding: [us(t.padding[0])?, us(t.padding[1])?],
                    dilation: [us(t.dilation[0])?, us(t.dilation[1])?],
                };
                let [ho, wo] = g.output().ok()?;
                Some((g, ho, wo, us(t.batch).filter(|&n| n > 0)?))
            })();
            let mut t = t;
            let (na, ng) = match geom {
                Some((geo, ho, wo, n)) => {
                    let layout = g.pick(&[
                        thor_kernels::TensorLayout::Nchw,
                        thor_kernels::TensorLayout::Nhwc,
                    ]);
                    let a = thor_kernels::Patches::new(geo, n, layout);
                    let gr = thor_kernels::Patches::positions(c_out, ho, wo, n, layout);
                    t.input_strides = a.strides.map(|v| v as i64);
                    t.grad_strides = gr.strides.map(|v| v as i64);
                    if g.chance(0.05) {
                        g.edge = true;
                        t.input_strides[g.rng.random_range(0..4)] = g.pick(&EDGES);
                    }
                    let a = a.with_strides(t.input_strides.map(|v| v as usize));
                    let spans = (t.input_strides.iter().all(|&v| v >= 0))
                        .then(|| (a.span().ok(), gr.span().ok()));
                    match spans {
                        Some((Some(x), Some(y))) => (Some(x), Some(y)),
                        _ => {
                            c.fault("strides");
                            (None, None)
                        }
                    }
                }
                None => {
                    c.fault("geometry");
                    (None, None)
                }
            };
            let input = c.ptr::<f32>(g, "input", na, false, false);
            let grads = c.ptr::<f32>(g, "out_grad", ng, false, false);
            fill_finite(&mut c, g);
            let tp = c.host(g, "tensors", &[t]);
            let obs = if g.chance(0.8) {
                c.ptr::<i32>(g, "observation", Some(1), true, true)
            } else {
                null_mut()
            };
            c.snapshot(g);
            // SAFETY: a live handle; the pointers null or guarded buffers of the sizes the
            // geometry implies.
            let s = unsafe { thor_v1_optimizer_observe_conv(o.opt, l, input, grads, tp, obs) };
            (c, s, true)
        }
        9 => {
            // Save and load through paths that cannot work: refused by name, nothing
            // changed, no file left behind.
            let load = g.chance(0.5);
            let mut c = if load {
                Call::new("thor_v1_optimizer_load", &["opt", "path"])
            } else {
                Call::new("thor_v1_optimizer_save", &["opt", "path"])
            };
            let bad = g.pick(&["missing-dir/state", "", "/", "\u{7f}/x"]);
            let path = o.dir.join(bad);
            c.arg("path", &path);
            c.fault("a path that cannot be used");
            let cp = CString::new(path.to_str().unwrap()).unwrap();
            let p = if g.chance(0.2) { null() } else { cp.as_ptr() };
            c.snapshot(g);
            // SAFETY: a live handle; `p` null or a NUL-terminated string.
            let s = unsafe {
                if load {
                    thor_v1_optimizer_load(o.opt, p)
                } else {
                    thor_v1_optimizer_save(o.opt, p)
                }
            };
            let left: Vec<_> = std::fs::read_dir(&o.dir)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .filter(|n| n != "snapshot")
                .collect();
            assert!(left.is_empty(), "files left behind: {left:?}");
            (c, s, true)
        }
        6 if g.chance(0.3) => {
            let mut c = Call::new("thor_v1_optimizer_set_conv_norm", &["opt", "conv_norm"]);
            let v = if g.chance(0.8) {
                g.rng.random_range(0..2)
            } else {
                g.edge = true;
                g.pick(&[-1, 2, i32::MAX, i32::MIN])
            };
            c.arg("conv_norm", v);
            if !(0..2).contains(&v) {
                c.fault("conv_norm");
            }
            // SAFETY: a live handle.
            let s = unsafe { thor_v1_optimizer_set_conv_norm(o.opt, v) };
            (c, s, true)
        }
        6 => {
            let mut c = Call::new("thor_v1_optimizer_set_epoch", &["opt", "epoch"]);
            let e = g.f32() as f64 * 10.0;
            c.arg("epoch", e);
            if !(e.is_finite() && e >= 0.0) {
                c.fault("epoch");
            }
            // SAFETY: a live handle.
            let s = unsafe { thor_v1_optimizer_set_epoch(o.opt, e) };
            (c, s, true)
        }
        7 => {
            let last = g.chance(0.3);
            let mut c = if last {
                Call::new("thor_v1_optimizer_last_decision", &["opt", "layer", "out"])
            } else {
                Call::new("thor_v1_optimizer_counters", &["opt", "layer", "out"])
            };
            let l = layer(g);
            c.arg("layer", l);
            if !known(l) {
                c.fault("layer");
            }
            let s = if last {
                let p = c.ptr::<i32>(g, "out", Some(1), true, false);
                c.snapshot(g);
                // SAFETY: as above.
                unsafe { thor_v1_optimizer_last_decision(o.opt, l, p) }
            } else {
                let p = c.ptr::<ThorCounters>(g, "out", Some(1), true, false);
                c.snapshot(g);
                // SAFETY: as above.
                unsafe { thor_v1_optimizer_counters(o.opt, l, p) }
            };
            (c, s, false)
        }
        _ => {
            let mut c = Call::new("thor_v1_optimizer_needs_statistics", &["opt", "out"]);
            let p = c.ptr::<i32>(g, "out", Some(1), true, false);
            c.snapshot(g);
            // SAFETY: as above.
            let s = unsafe { thor_v1_optimizer_needs_statistics(o.opt, p) };
            let finish = s == ThorStatus::Ok && g.chance(0.3);
            if finish {
                // SAFETY: a live handle.
                unsafe { thor_v1_optimizer_finish_step(o.opt) };
            }
            (c, s, finish)
        }
    };
    let (c, s) = made(c, s);
    if s != ThorStatus::Ok || !mutates {
        // A failed call, and any call that only reads, leaves the state as it was.
        let after = o.state();
        if after != before {
            panic!(
                "the optimizer state changed across {}) (status {s:?}, {})",
                c.desc, c.msg
            );
        }
    }
    out.push((c, s));
}

// ---------------------------------------------------------------------------------------
// The run.

fn settings() -> (u64, Duration) {
    let seed = std::env::var("THOR_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let secs = std::env::var("THOR_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    (seed, Duration::from_secs_f64(secs))
}

#[test]
fn fuzz_every_exported_function() {
    install_fault_handler();
    let (seed, budget) = settings();
    // Most of the budget here, the rest for the state-file sweep.
    let budget = budget.mul_f64(0.75);
    let mut g = Gen {
        rng: StdRng::seed_from_u64(seed),
        edge: false,
    };
    let dir = std::env::temp_dir().join(format!("thor-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ctx = null_mut();
    // SAFETY: a local out pointer.
    assert_eq!(
        unsafe { thor_v1_context_create_cpu(&mut ctx) },
        ThorStatus::Ok
    );
    let start = Instant::now();
    let mut opt: Option<Opt> = None;
    let (mut calls, mut failed, mut iter) = (0u64, 0u64, 0u64);
    // Per function: calls, refused, calls without a forbidden argument, and those that passed.
    let mut per_fn: std::collections::BTreeMap<&'static str, [u64; 4]> = Default::default();
    while start.elapsed() < budget {
        iter += 1;
        let mut done: Vec<(Call, ThorStatus)> = Vec::new();
        let what = g.rng.random_range(0..100);
        // The handler prints the call being made; each generator builds its call fully
        // before making it, so the description is published from inside `run`.
        match what {
            0..=9 => done.push(fuzz_split_merge(&mut g, ctx, false)),
            10..=17 => done.push(fuzz_split_merge(&mut g, ctx, true)),
            18..=25 => done.push(fuzz_traces(&mut g, ctx)),
            26..=37 => done.push(fuzz_accumulate(&mut g, ctx)),
            38..=49 => fuzz_grouped(&mut g, ctx, &mut done),
            50..=61 => done.push(fuzz_invert(&mut g, ctx)),
            62..=71 => done.push(fuzz_apply(&mut g, ctx)),
            72..=75 => done.push(fuzz_trace_rule(&mut g)),
            76..=77 => {
                // Contexts and handles: null everywhere, and CUDA (no device is an error
                // here; where one exists the context is made and released).
                let ord = g.pick(&[0, 1, -1, i32::MAX]);
                let mut c = Call::new("thor_v1_context_create_cuda", &["ordinal", "stream", "out"]);
                c.arg("ordinal", ord);
                if ord < 0 {
                    c.fault("ordinal");
                }
                let p = c.ptr::<*mut ThorContext>(&mut g, "out", Some(1), true, false);
                c.unmodelled = true; // no GPU here, or one: either outcome is right
                c.snapshot(&mut g);
                // SAFETY: `p` null or a guarded slot.
                let s = unsafe { thor_v1_context_create_cuda(ord, null_mut(), p) };
                if s == ThorStatus::Ok {
                    // SAFETY: written on success.
                    unsafe { thor_v1_context_destroy(*p) };
                }
                done.push(made(c, s));
                let mut c = Call::new("thor_v1_context_synchronize", &["ctx"]);
                c.fault("ctx null");
                // SAFETY: null is refused.
                let s = unsafe { thor_v1_context_synchronize(null_mut()) };
                done.push(made(c, s));
                let mut c = Call::new("thor_v1_context_create_cpu", &["out"]);
                c.fault("out null");
                // SAFETY: null is refused.
                let s = unsafe { thor_v1_context_create_cpu(null_mut()) };
                done.push(made(c, s));
                // SAFETY: null handles are ignored.
                unsafe {
                    thor_v1_context_destroy(null_mut());
                    thor_v1_optimizer_destroy(null_mut());
                    thor_v1_accumulate_plan_destroy(null_mut());
                }
                assert_eq!(thor_v1_abi_version(), THOR_ABI_VERSION);
                // Every optimizer entry point with a null handle.
                let (mut i, mut f, mut cnt) = (0i32, 0f32, ThorCounters::default());
                let x = [0.0f32; 4];
                let path = CString::new("x").unwrap();
                // Each call is checked with the message it left.
                macro_rules! null_handle {
                    ($name:literal, $call:expr) => {{
                        let mut c = Call::new($name, &["opt", "cfg", "out"]);
                        c.fault("a null handle");
                        // SAFETY: a null handle is refused before anything is read.
                        let s = unsafe { $call };
                        done.push(made(c, s));
                    }};
                }
                let o = null_mut();
                let mut out4 = [0f32; 4];
                null_handle!(
                    "thor_v1_optimizer_add_linear",
                    thor_v1_optimizer_add_linear(o, 1, 1, 0, &mut i)
                );
                null_handle!(
                    "thor_v1_optimizer_add_conv2d",
                    thor_v1_optimizer_add_conv2d(o, 1, 1, 1, 1, 0, &mut i)
                );
                null_handle!(
                    "thor_v1_optimizer_set_epoch",
                    thor_v1_optimizer_set_epoch(o, 1.0)
                );
                null_handle!(
                    "thor_v1_optimizer_needs_statistics",
                    thor_v1_optimizer_needs_statistics(o, &mut i)
                );
                null_handle!(
                    "thor_v1_optimizer_observe",
                    thor_v1_optimizer_observe(o, 0, x.as_ptr(), x.as_ptr(), 1, &mut i)
                );
                null_handle!(
                    "thor_v1_optimizer_precondition",
                    thor_v1_optimizer_precondition(o, 0, x.as_ptr(), out4.as_mut_ptr())
                );
                null_handle!(
                    "thor_v1_optimizer_kl_clip_factor",
                    thor_v1_optimizer_kl_clip_factor(
                        o,
                        1.0,
                        0,
                        &i,
                        [x.as_ptr()].as_ptr(),
                        [x.as_ptr()].as_ptr(),
                        &mut f
                    )
                );
                null_handle!(
                    "thor_v1_optimizer_finish_step",
                    thor_v1_optimizer_finish_step(o)
                );
                null_handle!(
                    "thor_v1_optimizer_counters",
                    thor_v1_optimizer_counters(o, 0, &mut cnt)
                );
                null_handle!(
                    "thor_v1_optimizer_save",
                    thor_v1_optimizer_save(o, path.as_ptr())
                );
                null_handle!(
                    "thor_v1_optimizer_load",
                    thor_v1_optimizer_load(o, path.as_ptr())
                );
                null_handle!(
                    "thor_v1_optimizer_create",
                    thor_v1_optimizer_create(null(), null_mut())
                );
            }
            _ => {
                if opt.is_none() || g.chance(0.01) {
                    if let Some(o) = opt.take() {
                        // SAFETY: a live handle, destroyed once.
                        unsafe { thor_v1_optimizer_destroy(o.opt) };
                    }
                    opt = Some(new_opt(&mut g, ctx, &dir, &mut done));
                }
                let o = opt.as_mut().unwrap();
                if o.layers.len() < 4 || g.chance(0.9) {
                    fuzz_opt_call(&mut g, o, &mut done);
                }
            }
        }
        for (c, s) in &done {
            calls += 1;
            let e = per_fn.entry(c.name).or_default();
            e[0] += 1;
            if c.faults.is_empty() {
                e[2] += 1;
                e[3] += (*s == ThorStatus::Ok) as u64;
            }
            if *s != ThorStatus::Ok {
                failed += 1;
                e[1] += 1;
                if std::env::var_os("THOR_FUZZ_VERBOSE").is_some() {
                    eprintln!("refused: {}) -> {:?} {}", c.desc, s, c.msg);
                }
            }
            c.check(*s, &format!("seed {seed}, iteration {iter}"));
        }
        CURRENT.store(null_mut(), Ordering::SeqCst);
    }
    if let Some(o) = opt {
        // SAFETY: a live handle.
        unsafe { thor_v1_optimizer_destroy(o.opt) };
    }
    // SAFETY: made above.
    unsafe { thor_v1_context_destroy(ctx) };
    std::fs::remove_dir_all(&dir).ok();
    eprintln!(
        "fuzz: seed {seed}: {calls} calls ({failed} refused) in {iter} iterations, {:.0?}",
        start.elapsed()
    );
    for (name, [n, f, _, _]) in &per_fn {
        eprintln!("  {name}: {n} calls, {f} refused");
    }
    assert!(per_fn.len() >= 28, "every function was reached: {per_fn:?}");
    // Each function also succeeded when given nothing forbidden: the generators reach the
    // code behind the checks (CUDA contexts aside where there is no GPU).
    for (name, [_, _, clean, ok]) in &per_fn {
        assert!(
            *ok > 0 || *clean < 20 || *name == "thor_v1_context_create_cuda",
            "{name}: none of {clean} calls without a forbidden argument succeeded"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The state-file sweep.

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Replaces the trailing checksum with the right one for the damaged body.
fn reseal(bytes: &mut [u8]) {
    let n = bytes.len() - 8;
    let sum = fnv1a(&bytes[..n]);
    bytes[n..].copy_from_slice(&sum.to_le_bytes());
}

#[test]
fn state_file_sweep() {
    install_fault_handler();
    let (seed, budget) = settings();
    let budget = budget.mul_f64(0.25);
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let dir = std::env::temp_dir().join(format!("thor-sweep-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
    let mut opt = null_mut();
    let mut ids = [0i32; 2];
    // SAFETY: locals throughout; buffers of the sizes the layers need.
    unsafe {
        thor_v1_optimizer_config_default(cfg.as_mut_ptr());
        let mut cfg = cfg.assume_init();
        cfg.block = 32;
        cfg.interval = 1;
        assert_eq!(thor_v1_optimizer_create(&cfg, &mut opt), ThorStatus::Ok);
        assert_eq!(
            thor_v1_optimizer_add_linear(opt, 5, 3, 1, &mut ids[0]),
            ThorStatus::Ok
        );
        assert_eq!(
            thor_v1_optimizer_add_conv2d(opt, 2, 4, 3, 1, 0, &mut ids[1]),
            ThorStatus::Ok
        );
        for step in 0..3 {
            let acts: Vec<f32> = (0..8 * 6)
                .map(|i| ((i * 7 + step) % 13) as f32 * 0.1)
                .collect();
            let grads: Vec<f32> = (0..8 * 4)
                .map(|i| ((i * 5 + step) % 11) as f32 * 0.1 - 0.5)
                .collect();
            assert_eq!(
                thor_v1_optimizer_observe(opt, 0, acts.as_ptr(), grads.as_ptr(), 8, null_mut()),
                ThorStatus::Ok
            );
            assert_eq!(
                thor_v1_optimizer_observe(opt, 1, acts.as_ptr(), grads.as_ptr(), 8, null_mut()),
                ThorStatus::Ok
            );
            assert_eq!(
                thor_v1_optimizer_set_epoch(opt, 0.5 * step as f64),
                ThorStatus::Ok
            );
            assert_eq!(thor_v1_optimizer_finish_step(opt), ThorStatus::Ok);
        }
    }
    let cpath = |p: &std::path::Path| CString::new(p.to_str().unwrap()).unwrap();
    let good = dir.join("good");
    // SAFETY: a live handle and a NUL-terminated path.
    assert_eq!(
        unsafe { thor_v1_optimizer_save(opt, cpath(&good).as_ptr()) },
        ThorStatus::Ok
    );
    let original = std::fs::read(&good).unwrap();
    let bad = dir.join("bad");
    let (cgood, cbad) = (cpath(&good), cpath(&bad));
    let mut tried = 0u64;
    let mut refuse = |bytes: &[u8], what: &str| {
        std::fs::write(&bad, bytes).unwrap();
        // For the fault handler (this test runs beside the other one).
        let published = CString::new(format!("state sweep: loading {what}")).unwrap();
        CURRENT.store(published.as_ptr() as *mut c_char, Ordering::SeqCst);
        // SAFETY: as above.
        let s = unsafe { thor_v1_optimizer_load(opt, cbad.as_ptr()) };
        let msg = last();
        assert_eq!(
            s,
            ThorStatus::InvalidArgument,
            "{what} was accepted ({msg})"
        );
        assert!(msg.contains("`path`"), "{what}: {msg}");
        // SAFETY: as above.
        assert_eq!(
            unsafe { thor_v1_optimizer_save(opt, cgood.as_ptr()) },
            ThorStatus::Ok
        );
        assert_eq!(
            std::fs::read(&good).unwrap(),
            original,
            "{what} changed the optimizer"
        );
        CURRENT.store(null_mut(), Ordering::SeqCst);
        drop(published);
        tried += 1;
    };
    // Every truncation.
    for len in 0..original.len() {
        refuse(&original[..len], &format!("the file cut to {len} bytes"));
    }
    // Bit flips (the checksum catches every single flip).
    let start = Instant::now();
    for pos in 0..original.len() {
        let mut b = original.clone();
        b[pos] ^= 1 << rng.random_range(0..8);
        refuse(&b, &format!("a bit flip at byte {pos}"));
        if start.elapsed() > budget / 2 {
            break;
        }
    }
    // Resealed bad values: the checksum is right, the values are not.
    let f64_at =
        |b: &mut Vec<u8>, at: usize, v: f64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    let u64_at =
        |b: &mut Vec<u8>, at: usize, v: u64| b[at..at + 8].copy_from_slice(&v.to_le_bytes());
    // Header: magic 8, version 4, block 8 @12, layers 8 @20, step @28, next @36, epoch @44;
    // layer 0: 6 shape words @52, flags @100, counters @108..156, last trace @156, then the
    // statistics (length word, values) from @164.
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(&str, Damage)> = vec![
        ("epoch NaN", Box::new(move |b| f64_at(b, 44, f64::NAN))),
        ("epoch -1", Box::new(move |b| f64_at(b, 44, -1.0))),
        ("epoch Inf", Box::new(move |b| f64_at(b, 44, f64::INFINITY))),
        ("block 64", Box::new(move |b| u64_at(b, 12, 64))),
        ("3 layers", Box::new(move |b| u64_at(b, 20, 3))),
        ("another shape", Box::new(move |b| u64_at(b, 60, 6))),
        ("unknown flags", Box::new(move |b| u64_at(b, 100, 1 << 9))),
        (
            "statistics count past the decisions",
            Box::new(move |b| u64_at(b, 108, 1000)),
        ),
        ("two freezes", Box::new(move |b| u64_at(b, 132, 2))),
        (
            "last trace NaN",
            Box::new(move |b| f64_at(b, 156, f64::NAN)),
        ),
        (
            "array length huge",
            Box::new(move |b| u64_at(b, 164, u64::MAX)),
        ),
        (
            "a NaN statistic",
            Box::new(move |b| b[172..176].copy_from_slice(&f32::NAN.to_le_bytes())),
        ),
        (
            "an Inf inverse",
            Box::new(move |b| {
                let n = b.len();
                b[n - 12..n - 8].copy_from_slice(&f32::INFINITY.to_le_bytes())
            }),
        ),
        (
            "trailing bytes",
            Box::new(move |b| {
                let n = b.len();
                b.splice(n - 8..n - 8, [0u8; 8]);
            }),
        ),
        (
            "version 2",
            Box::new(move |b| b[8..12].copy_from_slice(&2u32.to_le_bytes())),
        ),
    ];
    for (what, damage) in &cases {
        let mut b = original.clone();
        damage(&mut b);
        reseal(&mut b);
        refuse(&b, what);
    }
    // Random resealed damage to the header and counters: refused or, when it happens to be a
    // state the optimizer can hold, loaded; never a crash (checked by the guard of the run).
    // The original loads back.
    // SAFETY: as above.
    unsafe {
        assert_eq!(
            thor_v1_optimizer_load(opt, cgood.as_ptr()),
            ThorStatus::Ok,
            "{}",
            last()
        );
        thor_v1_optimizer_destroy(opt);
    }
    std::fs::remove_dir_all(&dir).ok();
    eprintln!("state sweep: {tried} damaged files refused, the optimizer unchanged each time");
}
