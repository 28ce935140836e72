//! The CUDA backend: device handle, kernel module loading, raw launchers and safe ops.
//!
//! Everything is loaded at run time (`cudarc` with dynamic loading): a machine without
//! CUDA builds and runs the crate, and [`CudaDevice::new`] returns [`Error::NoDevice`].
//!
//! Kernels come from the fatbin that `build.rs` embedded (nvcc), or, when none was built or
//! `THOR_KERNEL_SOURCE=nvrtc` is set, from the embedded source compiled by NVRTC for the
//! device's architecture on first use. Modules are loaded lazily, once per device handle.

pub mod accumulate;
pub mod apply;
pub mod choose;
pub mod dist;
mod ops;
pub mod raw;
mod rule;
pub mod step;
pub mod tuning;

pub use ops::{DeviceDamping, DeviceFactorSet, DeviceInvertOptions};
pub use rule::{DeviceTraceRule, RuleLayer};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DriverError};
use cudarc::nvrtc::{CompileOptions, Ptx};

use crate::error::{Error, Result};

/// The kernel modules compiled into this build.
pub mod kernels {
    /// One kernel module: a `kernels/*.cu` file.
    #[derive(Debug)]
    pub struct KernelModule {
        /// The file stem (`split`, `trace`).
        pub name: &'static str,
        /// The CUDA C++ source with local includes inlined, for NVRTC.
        pub source: &'static str,
        /// The fatbin nvcc built at compile time, if nvcc was available.
        pub fatbin: Option<&'static [u8]>,
    }

    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

    /// The module called `name`, if this build has it.
    pub fn find(name: &str) -> Option<&'static KernelModule> {
        MODULES.iter().find(|m| m.name == name)
    }
}

impl From<DriverError> for Error {
    fn from(e: DriverError) -> Self {
        Error::Driver(format!("{e:?}"))
    }
}

/// Whether the CUDA driver library can be loaded on this machine. False means no CUDA work
/// is possible; true does not yet mean a device exists.
pub fn driver_present() -> bool {
    // Linked at build time (feature `link-cuda`): the process could not have started
    // without it.
    #[cfg(feature = "link-cuda")]
    return true;
    // SAFETY: only tries to dlopen the driver library; no CUDA call is made.
    #[cfg(not(feature = "link-cuda"))]
    unsafe {
        cudarc::driver::sys::is_culib_present()
    }
}

/// Whether the NVRTC library can be loaded on this machine.
pub fn nvrtc_present() -> bool {
    #[cfg(feature = "link-cuda")]
    return true;
    // SAFETY: only tries to dlopen the NVRTC library.
    #[cfg(not(feature = "link-cuda"))]
    unsafe {
        cudarc::nvrtc::sys::is_culib_present()
    }
}

/// Compiles a kernel module's source to PTX with NVRTC for `compute_<arch>`.
///
/// The include path for CUDA headers comes from `THOR_NVRTC_INCLUDE`, else
/// `$CUDA_HOME/include`, else `/usr/local/cuda/include`, when the folder exists.
pub fn compile_nvrtc(module: &kernels::KernelModule, arch: u32) -> Result<Ptx> {
    if !nvrtc_present() {
        return Err(Error::KernelLoad(
            "libnvrtc not found (install the CUDA NVRTC library or put it on LD_LIBRARY_PATH)"
                .into(),
        ));
    }
    let include = std::env::var("THOR_NVRTC_INCLUDE")
        .ok()
        .or_else(|| {
            std::env::var("CUDA_HOME")
                .ok()
                .map(|h| format!("{h}/include"))
        })
        .unwrap_or_else(|| "/usr/local/cuda/include".into());
    let mut opts = CompileOptions {
        name: Some(format!("{}.cu", module.name)),
        options: vec![
            format!("--gpu-architecture=compute_{arch}"),
            "--std=c++17".into(),
        ],
        ..Default::default()
    };
    if std::path::Path::new(&include).is_dir() {
        opts.include_paths.push(include);
    }
    cudarc::nvrtc::compile_ptx_with_opts(module.source, opts).map_err(|e| match e {
        cudarc::nvrtc::CompileError::CompileError { log, .. } => Error::KernelLoad(format!(
            "NVRTC failed on {}.cu:\n{}",
            module.name,
            log.to_string_lossy()
        )),
        other => Error::KernelLoad(format!("NVRTC failed on {}.cu: {other:?}", module.name)),
    })
}

fn cache_poisoned() -> Error {
    Error::KernelLoad("kernel cache poisoned by a panic in another thread".into())
}

/// Where kernel code comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelSource {
    /// The embedded fatbin when this build has one, else NVRTC.
    Auto,
    /// The embedded fatbin only.
    Fatbin,
    /// NVRTC on the embedded source.
    Nvrtc,
}

impl KernelSource {
    /// From `THOR_KERNEL_SOURCE` (`fatbin`, `nvrtc`, anything else or unset: `Auto`).
    pub fn from_env() -> Self {
        match std::env::var("THOR_KERNEL_SOURCE").as_deref() {
            Ok("fatbin") => KernelSource::Fatbin,
            Ok("nvrtc") => KernelSource::Nvrtc,
            _ => KernelSource::Auto,
        }
    }
}

/// A CUDA device: its context, the stream every operation is queued on, and a cache of
/// loaded kernel modules.
///
/// Operations are asynchronous on the stream; copies back to the host synchronize.
#[derive(Debug)]
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    arch: u32,
    source: KernelSource,
    /// Everything loaded from the current kernel source, dropped as one when it changes.
    cache: Mutex<KernelCache>,
    blas: std::sync::OnceLock<Box<cudarc::cublas::CudaBlas>>,
    /// The card as kernel choices are keyed ([`CudaDevice::card_key`]), once.
    card: std::sync::OnceLock<String>,
    /// The inversion kernel chosen per (block size, block count) on this device.
    invert_kernels: Mutex<HashMap<(usize, usize), raw::InvertKernel>>,
}

/// The modules loaded from one kernel source, their functions, and the dynamic shared
/// memory each function was opted in to (an attribute of the loaded function, so it goes
/// with it).
#[derive(Debug, Default)]
struct KernelCache {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<&'static str, CudaFunction>,
    smem_configured: HashMap<&'static str, usize>,
}

/// A kernel: its module (a `kernels/*.cu` file stem) and its extern "C" name,
/// `<op>_<variant>_<dtype>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelId {
    /// The module, e.g. `split`.
    pub module: &'static str,
    /// The function, e.g. `split_blocks_f32`.
    pub name: &'static str,
}

impl CudaDevice {
    /// Opens device `ordinal` with a stream of its own.
    ///
    /// Returns [`Error::NoDevice`] when the driver library is missing, the driver finds no
    /// device, or `ordinal` is out of range.
    pub fn new(ordinal: usize) -> Result<Self> {
        let ctx = Self::context(ordinal)?;
        let stream = ctx.new_stream()?;
        Self::with_stream(ctx, stream)
    }

    /// Queues all work on `stream`, a cudarc stream another framework made (a candle or
    /// burn device's stream, say), in that stream's context: the library's buffers and
    /// launches then order with the framework's work on the same stream, with no copy and no
    /// synchronization. Safe: the stream is shared by reference count, so it lives as long
    /// as this handle. The crate re-exports its cudarc ([`crate::cudarc`]), which the caller's
    /// must be.
    pub fn from_stream(stream: Arc<CudaStream>) -> Result<Self> {
        Self::with_stream(stream.context().clone(), stream)
    }

    /// Opens device `ordinal` and queues all work on `stream`, a stream owned by another
    /// framework (PyTorch's current stream, say), in the device's primary context.
    ///
    /// # Safety
    /// `stream` must be a valid CUDA stream of device `ordinal`'s primary context and must
    /// outlive the returned handle and every buffer used with it. Ordering with work the
    /// owner queues elsewhere is the caller's business.
    pub unsafe fn wrap_borrowed_stream(
        ordinal: usize,
        stream: cudarc::driver::sys::CUstream,
    ) -> Result<Self> {
        let ctx = Self::context(ordinal)?;
        // SAFETY: the caller guarantees the stream is valid, belongs to this context and
        // outlives the handle.
        let stream = unsafe { ctx.wrap_borrowed_stream(stream) };
        Self::with_stream(ctx, stream)
    }

    fn context(ordinal: usize) -> Result<Arc<CudaContext>> {
        if !driver_present() {
            return Err(Error::NoDevice(
                "the CUDA driver library (libcuda) is not installed".into(),
            ));
        }
        let count = CudaContext::device_count()
            .map_err(|e| Error::NoDevice(format!("driver initialisation failed: {e:?}")))?;
        if ordinal >= count.max(0) as usize {
            return Err(Error::NoDevice(format!(
                "device {ordinal} requested, {count} present"
            )));
        }
        CudaContext::new(ordinal)
            .map_err(|e| Error::NoDevice(format!("cannot open device {ordinal}: {e:?}")))
    }

    fn with_stream(ctx: Arc<CudaContext>, stream: Arc<CudaStream>) -> Result<Self> {
        let (major, minor) = ctx.compute_capability()?;
        Ok(Self {
            ctx,
            stream,
            arch: (major * 10 + minor) as u32,
            source: KernelSource::from_env(),
            cache: Mutex::new(KernelCache::default()),
            blas: std::sync::OnceLock::new(),
            card: std::sync::OnceLock::new(),
            invert_kernels: Mutex::new(HashMap::new()),
        })
    }

    /// Chooses where kernels come from; drops the modules loaded so far (with their
    /// functions and shared-memory opt-ins), so the next launch loads from the new source.
    pub fn set_kernel_source(&mut self, source: KernelSource) {
        self.source = source;
        *self.cache.get_mut().unwrap_or_else(|e| e.into_inner()) = KernelCache::default();
    }

    /// Where kernels come from.
    pub fn kernel_source(&self) -> KernelSource {
        self.source
    }

    /// Number of kernel functions loaded so far and, of those, how many were opted in to
    /// more than 48 KiB of dynamic shared memory.
    pub fn loaded_kernels(&self) -> Result<(usize, usize)> {
        let c = self.cache.lock().map_err(|_| cache_poisoned())?;
        Ok((c.functions.len(), c.smem_configured.len()))
    }

    /// An error naming `arg` unless `buf` (a slice or a view) lives in this device's context.
    pub(crate) fn check_same_context<T>(
        &self,
        arg: &'static str,
        buf: &impl cudarc::driver::DeviceSlice<T>,
    ) -> Result<()> {
        if buf.stream().context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid(
                arg,
                "buffer belongs to another device or context",
            ))
        }
    }

    /// The device's name, as the driver reports it.
    pub fn name(&self) -> Result<String> {
        Ok(self.ctx.name()?)
    }

    /// Compute capability as one number (90 for sm_90).
    pub fn arch(&self) -> u32 {
        self.arch
    }

    /// The stream all work is queued on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The context.
    pub fn context_handle(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// A cuBLAS handle on this device's stream, created on first use. Errors when the
    /// cuBLAS library cannot be loaded.
    pub fn cublas(&self) -> Result<&cudarc::cublas::CudaBlas> {
        if let Some(b) = self.blas.get() {
            return Ok(b);
        }
        // SAFETY: only tries to dlopen the cuBLAS library (linked with `link-cuda`).
        #[cfg(not(feature = "link-cuda"))]
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "the cuBLAS library cannot be loaded".into(),
            ));
        }
        let b = cudarc::cublas::CudaBlas::new(self.stream.clone())
            .map_err(|e| Error::NoDevice(format!("cuBLAS initialisation failed: {e:?}")))?;
        Ok(self.blas.get_or_init(|| Box::new(b)))
    }

    /// Waits for all queued work; surfaces any asynchronous kernel error.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.stream.synchronize()?)
    }

    /// Copies host data into a new device buffer.
    pub fn upload<T: cudarc::driver::DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        Ok(self.stream.clone_htod(host)?)
    }

    /// Copies a device buffer into `host` (same length) and waits for it.
    pub fn download_into<T: cudarc::driver::DeviceRepr>(
        &self,
        dev: &CudaSlice<T>,
        host: &mut [T],
    ) -> Result<()> {
        crate::error::check_len("host", dev.len(), host.len())?;
        self.stream.memcpy_dtoh(dev, host)?;
        self.synchronize()
    }

    /// Copies a device buffer into a new host vector and waits for it.
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        dev: &CudaSlice<T>,
    ) -> Result<Vec<T>> {
        let mut v = vec![T::default(); dev.len()];
        self.download_into(dev, &mut v)?;
        Ok(v)
    }

    /// A new zero-filled device buffer of `len` elements.
    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        len: usize,
    ) -> Result<CudaSlice<T>> {
        Ok(self.stream.alloc_zeros(len)?)
    }

    /// The kernel `k`, loading its module on first use; cached, so the hot path does not
    /// touch the driver's symbol lookup again.
    pub fn function(&self, k: KernelId) -> Result<CudaFunction> {
        let mut c = self.cache.lock().map_err(|_| cache_poisoned())?;
        self.function_in(&mut c, k)
    }

    fn function_in(&self, c: &mut KernelCache, k: KernelId) -> Result<CudaFunction> {
        if let Some(f) = c.functions.get(k.name) {
            return Ok(f.clone());
        }
        let m = match c.modules.get(k.module) {
            Some(m) => m.clone(),
            None => {
                let m = self.load_module(k.module)?;
                c.modules.insert(k.module, m.clone());
                m
            }
        };
        let f = m.load_function(k.name).map_err(|e| {
            Error::KernelLoad(format!("function {} in module {}: {e:?}", k.name, k.module))
        })?;
        c.functions.insert(k.name, f.clone());
        Ok(f)
    }

    /// The kernel `k`, allowed `bytes` of dynamic shared memory (opting in past 48 KiB once
    /// per loaded function); errors when the device cannot give that much to one thread
    /// block.
    pub fn function_with_smem(&self, k: KernelId, bytes: usize) -> Result<CudaFunction> {
        let mut c = self.cache.lock().map_err(|_| cache_poisoned())?;
        let f = self.function_in(&mut c, k)?;
        if bytes <= 48 * 1024 || c.smem_configured.get(k.name).is_some_and(|&b| b >= bytes) {
            return Ok(f);
        }
        use cudarc::driver::sys::{CUdevice_attribute, CUfunction_attribute};
        let max = self
            .ctx
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?;
        if bytes > max.max(0) as usize {
            return Err(Error::invalid(
                "block",
                format!("{} needs {bytes} bytes of shared memory per thread block; this device allows {max}", k.name),
            ));
        }
        f.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            bytes as i32,
        )?;
        // The two-per-SM inversion needs the whole carveout (two 67 KiB blocks; L1 gives
        // way) to get its second block; the others fit one block per SM by registers and keep
        // the default. Only a preference: a driver that refuses it costs occupancy, not
        // correctness.
        if k == raw::kernels::INVERT_CHOL_B128X2_F32 {
            let _ = f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT,
                100,
            );
        }
        c.smem_configured.insert(k.name, bytes);
        Ok(f)
    }

    fn load_module(&self, name: &'static str) -> Result<Arc<CudaModule>> {
        let module = kernels::find(name)
            .ok_or_else(|| Error::KernelLoad(format!("no kernel module {name} in this build")))?;
        let image = match (self.source, module.fatbin) {
            (KernelSource::Auto | KernelSource::Fatbin, Some(fb)) => Ptx::from_binary(fb.to_vec()),
            (KernelSource::Fatbin, None) => {
                return Err(Error::KernelLoad(format!(
                    "module {name}: this build has no fatbin (built without nvcc)"
                )))
            }
            (KernelSource::Auto | KernelSource::Nvrtc, _) => compile_nvrtc(module, self.arch)?,
        };
        self.ctx.load_module(image).map_err(|e| {
            Error::KernelLoad(format!("loading module {name} on sm_{}: {e:?}", self.arch))
        })
    }
}
