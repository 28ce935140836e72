//! Contexts: where the ops run (the CPU, or a CUDA device and stream).

#[allow(unused_imports)]
use super::*;

/// A context: the CPU, or one CUDA device with the stream all work is queued on.
pub struct ThorContext {
    pub(crate) device: AnyBackend,
    pub(crate) ws: Workspace,
}

impl ThorContext {
    /// The context's CPU workspace, grown to `bytes` (an out-of-memory error naming `arg`,
    /// the C argument the size follows from, when it cannot grow; the old workspace stays).
    pub(crate) fn ws(&mut self, arg: &'static str, bytes: usize) -> Result<&mut Workspace> {
        if self.ws.len() < bytes {
            self.ws = Workspace::try_new(bytes).map_err(rename("workspace", arg))?;
        }
        Ok(&mut self.ws)
    }
}

/// Creates a CPU context in `*out`. Release it with `thor_v1_context_destroy`.
///
/// Returns `OK`; `INVALID_ARGUMENT` when `out` is null or misaligned.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_context_create_cpu(out: *mut *mut ThorContext) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const *mut ThorContext)?;
        let ctx = Box::new(ThorContext {
            device: AnyBackend::Cpu(CpuBackend),
            ws: Workspace::new(0),
        });
        // SAFETY: `out` was checked non-null and aligned.
        unsafe { *out = Box::into_raw(ctx) };
        Ok(())
    })
}

/// Creates a CUDA context on device `ordinal` in `*out`. With `stream` null the context makes
/// a stream of its own (non-blocking: unordered with the legacy default stream); otherwise
/// all work is queued on `stream` (a `CUstream` / `cudaStream_t` of the device's primary
/// context, e.g. PyTorch's current stream; for the legacy default stream, whose handle is 0,
/// pass `CU_STREAM_LEGACY`, that is `(void*)1`), which must outlive the context and every
/// optimizer made on it.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`out` null or misaligned, `ordinal` < 0); `NO_DEVICE`
/// (no CUDA driver, or no device `ordinal`); `DRIVER` (a CUDA call failed).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_context_create_cuda(
    ordinal: i32,
    stream: *mut c_void,
    out: *mut *mut ThorContext,
) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const *mut ThorContext)?;
        let ordinal = usize::try_from(ordinal)
            .map_err(|_| Error::invalid("ordinal", format!("must be >= 0, got {ordinal}")))?;
        let dev = if stream.is_null() {
            CudaDevice::new(ordinal)?
        } else {
            // SAFETY: the caller promises a live stream of this device's primary context
            // that outlives the context.
            // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
            unsafe { CudaDevice::wrap_borrowed_stream(ordinal, stream as _)? }
        };
        let ctx = Box::new(ThorContext {
            device: AnyBackend::Cuda(Box::new(dev)),
            ws: Workspace::new(0),
        });
        // SAFETY: `out` was checked.
        unsafe { *out = Box::into_raw(ctx) };
        Ok(())
    })
}

/// Waits for all work queued by the context (no-op on the CPU).
///
/// Returns `OK`; `INVALID_ARGUMENT` (`ctx` null or misaligned); `DRIVER` (queued work
/// failed).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_context_synchronize(ctx: *mut ThorContext) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs).
        if let AnyBackend::Cuda(d) = &unsafe { ctx_mut(ctx)? }.device {
            d.synchronize()?;
        }
        Ok(())
    })
}

/// Destroys a context (null is ignored).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_context_destroy(ctx: *mut ThorContext) {
    // SAFETY: the caller passes a context made by this library, not destroyed before.
    unsafe { destroy(ctx) }
}

/// Frees a handle made by `Box::into_raw` (null ignored), never unwinding into C.
///
/// # Safety
/// `p` is null or came from `Box::into_raw` and was not freed before.
pub(crate) unsafe fn destroy<T>(p: *mut T) {
    if !p.is_null() {
        // SAFETY: per this function's contract.
        let _ = catch_unwind(AssertUnwindSafe(|| drop(unsafe { Box::from_raw(p) })));
    }
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn ctx_mut<'a>(ctx: *mut ThorContext) -> Result<&'a mut ThorContext> {
    check_ptr("ctx", ctx as *const ThorContext)?;
    // SAFETY: a live context made by this library, used by one thread at a time.
    Ok(unsafe { &mut *ctx })
}
