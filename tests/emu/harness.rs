//! Runs the CUDA kernels of `kernels/` on the host through the emulator in this folder
//! (emu.hpp, runtime.cpp), with the launch plans the crate's raw launchers build: same
//! grid, block, shared memory and argument list as on a GPU, device pointers being host
//! addresses. Built once per test binary with the system C++ compiler.
#![allow(dead_code)]

use std::ffi::{c_char, c_int, c_void, CString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use thor_kernels::cuda::raw::{KernelArg, LaunchPlan};

type LaunchFn = unsafe extern "C" fn(
    *const c_char,
    u32,
    u32,
    u32,
    u32,
    u32,
    u32,
    usize,
    *mut *mut c_void,
    c_int,
    *mut c_char,
    usize,
) -> c_int;

/// The loaded emulator.
pub struct Emu {
    _lib: libloading::Library,
    launch: LaunchFn,
}

/// Scheduling orders every emulated launch is run under: forward, reverse, two shuffles.
pub const ORDERS: [i32; 4] = [0, 1, 2, 3];

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cpp"))
        .collect();
    v.sort();
    v
}

fn build() -> Emu {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let dir = root.join("tests/emu");
    let srcs = sources(&dir);
    // Rebuild when any emulator or kernel source changes: the output name carries a hash.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut inputs = srcs.clone();
    inputs.push(dir.join("emu.hpp"));
    for e in std::fs::read_dir(root.join("kernels")).unwrap() {
        inputs.push(e.unwrap().path());
    }
    inputs.sort();
    for p in &inputs {
        for b in std::fs::read(p).unwrap() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    let out_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("emu");
    std::fs::create_dir_all(&out_dir).unwrap();
    let lib = out_dir.join(format!("libthor_emu_{h:016x}.so"));
    if !lib.exists() {
        let target = env!("THOR_TARGET");
        let tool = cc::Build::new()
            .target(target)
            .host(target)
            .opt_level(2)
            .cargo_metadata(false)
            .cpp(true)
            .get_compiler();
        let tmp = out_dir.join(format!("build-{}.so", std::process::id()));
        let out = tool
            .to_command()
            .args(["-std=c++20", "-fPIC", "-shared", "-w"])
            .args(&srcs)
            .arg("-o")
            .arg(&tmp)
            .output()
            .expect("running the C++ compiler");
        assert!(
            out.status.success(),
            "building the kernel emulator failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::rename(&tmp, &lib).unwrap();
    }
    // SAFETY: the library is the emulator just built from this repository's sources; it
    // runs no initialisers beyond registering its kernels.
    let l = unsafe { libloading::Library::new(&lib) }.expect("loading the kernel emulator");
    // SAFETY: the symbol's signature is the one declared in runtime.cpp.
    let launch: LaunchFn = unsafe { *l.get::<LaunchFn>(b"thor_emu_launch\0").unwrap() };
    Emu { _lib: l, launch }
}

/// The emulator, built on first use.
pub fn emu() -> &'static Emu {
    static E: OnceLock<Emu> = OnceLock::new();
    E.get_or_init(build)
}

/// Runs launches one after the other under one scheduling `order`. The emulator runs one
/// launch at a time; callers serialise with [`lock`].
pub fn run(plans: &[LaunchPlan], order: i32) -> Result<(), String> {
    for p in plans {
        run_one(p, order)?;
    }
    Ok(())
}

/// The emulator holds global state during a launch: one launch at a time per process.
pub fn lock() -> std::sync::MutexGuard<'static, ()> {
    static M: std::sync::Mutex<()> = std::sync::Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

fn run_one(p: &LaunchPlan, order: i32) -> Result<(), String> {
    let e = emu();
    // One 8-byte cell per argument, each passed by address as cuLaunchKernel takes them.
    let mut cells: Vec<u64> = p
        .args
        .iter()
        .map(|a| match *a {
            KernelArg::Ptr(v) | KernelArg::U64(v) => v,
            KernelArg::I32(v) => v as u32 as u64,
            KernelArg::I64(v) => v as u64,
            KernelArg::F32(v) => v.to_bits() as u64,
            KernelArg::F64(v) => v.to_bits(),
        })
        .collect();
    let mut ptrs: Vec<*mut c_void> = cells
        .iter_mut()
        .map(|c| c as *mut u64 as *mut c_void)
        .collect();
    let name = CString::new(p.kernel.name).unwrap();
    let mut err = vec![0 as c_char; 512];
    // SAFETY: the argument cells outlive the call; the plan's pointers are host addresses of
    // buffers the caller keeps alive; the little-endian low bytes of each cell hold the
    // 4-byte arguments.
    let rc = unsafe {
        (e.launch)(
            name.as_ptr(),
            p.grid.0,
            p.grid.1,
            p.grid.2,
            p.block.0,
            p.block.1,
            p.block.2,
            p.smem as usize,
            ptrs.as_mut_ptr(),
            order,
            err.as_mut_ptr(),
            err.len(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: the emulator wrote a NUL-terminated message.
        let msg = unsafe { std::ffi::CStr::from_ptr(err.as_ptr()) };
        Err(msg.to_string_lossy().into_owned())
    }
}

/// A host buffer standing in for device memory, in its own mapping between two
/// inaccessible pages: its end is 16 bytes (or less) from the page after it, so a kernel
/// that reads or writes past the end faults (the test process dies with SIGSEGV, which
/// fails the test); the few bytes of slack on each side hold canaries that
/// [`Guarded::check`] verifies, for writes the pages cannot see.
pub struct Guarded<T: bytemuck::Pod> {
    base: *mut u8,
    map_len: usize,
    data: *mut u8,
    len: usize,
    _t: std::marker::PhantomData<T>,
}

const CANARY: u8 = 0xA7;

fn page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

impl<T: bytemuck::Pod> Guarded<T> {
    /// A buffer holding `data`.
    pub fn new(data: &[T]) -> Self {
        let bytes = std::mem::size_of_val(data);
        let pg = page();
        let span = bytes.next_multiple_of(16).max(16);
        let body = span.next_multiple_of(pg);
        let map_len = body + 2 * pg;
        // SAFETY: an anonymous private mapping; checked below.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(base != libc::MAP_FAILED, "mmap failed");
        let base = base as *mut u8;
        // SAFETY: both pages lie inside the mapping just made.
        unsafe {
            assert_eq!(libc::mprotect(base as *mut _, pg, libc::PROT_NONE), 0);
            assert_eq!(
                libc::mprotect(base.add(pg + body) as *mut _, pg, libc::PROT_NONE),
                0
            );
        }
        // SAFETY: the body pages are readable and writable; `data` ends at most 15 bytes
        // before the guard page.
        let start = unsafe { base.add(pg + body - span) };
        unsafe {
            std::ptr::write_bytes(base.add(pg), CANARY, body);
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, start, bytes);
        }
        Guarded {
            base,
            map_len,
            data: start,
            len: data.len(),
            _t: std::marker::PhantomData,
        }
    }

    fn bytes(&self) -> usize {
        self.len * std::mem::size_of::<T>()
    }

    /// The element address, as a "device pointer".
    pub fn ptr(&mut self) -> u64 {
        self.data as u64
    }

    /// The contents.
    pub fn get(&self) -> Vec<T> {
        let mut v = vec![T::zeroed(); self.len];
        // SAFETY: `data` holds `len` elements inside the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.data, v.as_mut_ptr() as *mut u8, self.bytes())
        };
        v
    }

    /// Replaces the contents.
    pub fn set(&mut self, data: &[T]) {
        assert_eq!(data.len(), self.len);
        // SAFETY: as in `get`.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr() as *const u8, self.data, self.bytes())
        };
    }

    /// Panics when a canary byte around the data changed.
    pub fn check(&self, what: &str) {
        let pg = page();
        // SAFETY: the readable body of the mapping, around the data.
        let (head, tail) = unsafe {
            let body_start = self.base.add(pg);
            let head =
                std::slice::from_raw_parts(body_start, self.data.offset_from(body_start) as usize);
            let end = self.data.add(self.bytes());
            let body_end = self.base.add(self.map_len - pg);
            let tail = std::slice::from_raw_parts(end, body_end.offset_from(end) as usize);
            (head, tail)
        };
        assert!(
            head.iter().chain(tail).all(|&b| b == CANARY),
            "{what}: a kernel wrote outside the buffer"
        );
    }
}

impl<T: bytemuck::Pod> Drop for Guarded<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.base as *mut _, self.map_len) };
    }
}
