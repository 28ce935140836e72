//! The kernel ops on raw pointers: split, merge, traces, accumulation, inversion, apply, the
//! trace rule.

#[allow(unused_imports)]
use super::*;

/// Splits the dense row-major `dim x dim` factor at `dense` (row stride `ld` elements) into
/// `ceil(dim / block)` padded blocks of `block x block` at `out`. A pure copy on both
/// contexts: non-finite values are copied, not reported.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `out` overlapping
/// `dense`, `dim` or `ld` < 1, `block` not 32, 64, 128 or 256, sizes that overflow);
/// `SHAPE` (`ld` < `dim`); on a CUDA context `KERNEL_LOAD`, `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_split(
    ctx: *mut ThorContext,
    dense: *const f32,
    ld: i64,
    dim: i64,
    block: i32,
    out: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let (layout, ld, dense_len) = dense_args(dim, ld, block)?;
        Regions::new()
            .read("dense", dense, dense_len)
            .write("out", out as *const f32, layout.buffer_len())
            .check()?;
        match &c.device {
            AnyBackend::Cpu(_) => {
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let (src, dst) = unsafe {
                    (
                        host("dense", dense, dense_len)?,
                        host_mut("out", out, layout.buffer_len())?,
                    )
                };
                cpu::split(src, ld, &layout, dst)?;
            }
            // SAFETY: device pointers checked non-null, aligned, disjoint; sizes as documented.
            AnyBackend::Cuda(dev) => unsafe {
                raw::split_blocks_f32(dev, dense as u64, ld, &layout, out as u64)?
            },
        }
        Ok(())
    })
}

/// Merges `ceil(dim / block)` blocks at `blocks` into the dense row-major `dim x dim` matrix
/// at `dense` (row stride `ld`), zero off the block diagonal.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `dense` overlapping
/// `blocks`, `dim` or `ld` < 1, `block` not 32, 64, 128 or 256, sizes that overflow);
/// `SHAPE` (`ld` < `dim`); on a CUDA context `KERNEL_LOAD`, `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_merge(
    ctx: *mut ThorContext,
    blocks: *const f32,
    dim: i64,
    block: i32,
    dense: *mut f32,
    ld: i64,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let (layout, ld, dense_len) = dense_args(dim, ld, block)?;
        Regions::new()
            .read("blocks", blocks, layout.buffer_len())
            .write("dense", dense as *const f32, dense_len)
            .check()?;
        match &c.device {
            AnyBackend::Cpu(_) => {
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let (src, dst) = unsafe {
                    (
                        host("blocks", blocks, layout.buffer_len())?,
                        host_mut("dense", dense, dense_len)?,
                    )
                };
                cpu::merge(src, &layout, dst, ld)?;
            }
            // SAFETY: as in thor_v1_split.
            AnyBackend::Cuda(dev) => unsafe {
                raw::merge_blocks_f32(dev, blocks as u64, &layout, dense as u64, ld)?
            },
        }
        Ok(())
    })
}

/// Traces of every block and factor of a set: `n_factors` factors of dimensions `dims`
/// (host array) split at `block`, blocks back to back at `blocks`; writes one trace per block
/// to `block_traces` (padding included) and one per factor to `factor_traces` (real diagonal).
/// A non-finite diagonal gives a non-finite trace, not an error, on both contexts.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, an output overlapping
/// another argument, `n_factors` outside 1..=`THOR_MAX_FACTORS`, a `dims` entry < 1, a set
/// of more than 2^31 - 1 elements, a bad `block`); on a CUDA context `KERNEL_LOAD`,
/// `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_traces(
    ctx: *mut ThorContext,
    blocks: *const f32,
    block: i32,
    dims: *const i64,
    n_factors: i64,
    block_traces: *mut f32,
    factor_traces: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let b = checks::block(block)?;
        let set = factor_set(b, n_factors, dims)?;
        Regions::new()
            .read("dims", dims, set.len())
            .read("blocks", blocks, set.buffer_len())
            .write(
                "block_traces",
                block_traces as *const f32,
                set.total_blocks(),
            )
            .write("factor_traces", factor_traces as *const f32, set.len())
            .check()?;
        match &c.device {
            // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
            AnyBackend::Cpu(_) => unsafe {
                cpu::traces(
                    &set,
                    host("blocks", blocks, set.buffer_len())?,
                    host_mut("block_traces", block_traces, set.total_blocks())?,
                    host_mut("factor_traces", factor_traces, set.len())?,
                )?
            },
            AnyBackend::Cuda(dev) => {
                // The layer table goes up on every call here; Rust callers keep a
                // DeviceFactorSet instead.
                let prepared = dev.prepare_set(&set)?;
                let table = prepared.table_ptr(dev);
                // SAFETY: device pointers checked; the table matches the set.
                unsafe {
                    raw::trace_set_f32(
                        dev,
                        blocks as u64,
                        set.block(),
                        table,
                        set.len(),
                        block_traces as u64,
                        factor_traces as u64,
                    )?
                };
                dev.synchronize()?;
            }
        }
        Ok(())
    })
}

/// Accumulates `blocks <- beta * blocks + alpha * X_j^T X_j` for the factor of dimension
/// `dim` split at `block`, from `x` (`rows x dim`, row stride `ld`, element type `dtype`),
/// with identity padding and the trace of each block in `block_traces`. On a CUDA context the
/// call plans, launches and waits (for repeated calls on many factors use the grouped form,
/// `thor_v1_accumulate_plan_create` and `thor_v1_accumulate_grouped`). A NaN or Inf in `x`
/// is an `InvalidArgument` error and leaves `blocks` unchanged.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, an output overlapping
/// another argument, `rows`, `ld` or `dim` < 1, sizes that overflow, a bad `block` or
/// `dtype`, `alpha` or `beta` not finite, a NaN or Inf in `x`); `SHAPE` (`ld` < `dim`);
/// `OUT_OF_MEMORY` (CPU scratch); on a CUDA context `KERNEL_LOAD`, `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_accumulate(
    ctx: *mut ThorContext,
    x: *const c_void,
    dtype: i32,
    rows: i64,
    ld: i64,
    dim: i64,
    block: i32,
    alpha: f32,
    beta: f32,
    blocks: *mut f32,
    block_traces: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let (d, b) = (checks::dim("dim", dim)?, checks::block(block)?);
        let layout = BlockLayout::new(d, b)?;
        let (rows, ld) = (checks::dim("rows", rows)?, checks::dim("ld", ld)?);
        let n = span("ld", rows, ld, d)?;
        let size = dtype_of(dtype)?.size();
        checks::finite("alpha", alpha as f64)?;
        checks::finite("beta", beta as f64)?;
        Regions::new()
            .read_bytes("x", x, n * size, size)
            .write("blocks", blocks as *const f32, layout.buffer_len())
            .write("block_traces", block_traces as *const f32, layout.blocks())
            .check()?;
        if let AnyBackend::Cuda(dev) = &c.device {
            // One factor through the grouped path (plan and tables made for this call).
            let dt = dtype_of(dtype)?;
            let set = FactorSet::new(block.max(0) as usize, &[layout.dim()])?;
            let mut plan = dev.plan_accumulate(&set, &[rows], dt, AccumulateMode::F32)?;
            let mut ft = dev.zeros::<f32>(1)?;
            let mut st = dev.upload(&[-1i32])?;
            // The traces go to scratch first: a failed call must not write `block_traces`
            // (the trace launch runs whatever the status).
            let mut bt = dev.zeros::<f32>(layout.blocks())?;
            let s = dev.stream().clone();
            let (fp, _a) = ft.device_ptr_mut(&s);
            let (sp, _b) = st.device_ptr_mut(&s);
            let (tp, _c) = bt.device_ptr_mut(&s);
            let input = DevInput {
                x: x as u64,
                layout: thor_kernels::InputLayout::matrix(rows, ld),
                alpha,
                beta,
            };
            // SAFETY: the pointer contract of this function; the plan's buffers live until
            // the synchronization below.
            unsafe { plan.launch_raw(dev, &[input], blocks as u64, tp, fp, sp)? };
            drop((_a, _b, _c));
            if dev.download(&st)?[0] != 0 {
                return Err(Error::invalid(
                    "x",
                    "non-finite value in the input (blocks left unchanged)",
                )
                .into());
            }
            let (tp, _d) = bt.device_ptr(&s);
            // SAFETY: `block_traces` addresses `layout.blocks()` f32 of this context (the
            // pointer contract, checked for overlaps above); `bt` is that long and stays
            // alive (its guard too) until the synchronization below.
            unsafe {
                thor_kernels::cudarc::driver::result::memcpy_dtod_async(
                    block_traces as u64,
                    tp,
                    layout.blocks() * 4,
                    s.cu_stream(),
                )
            }
            .map_err(Error::from)?;
            dev.synchronize()?;
            return Ok(());
        }
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let out = unsafe { host_mut("blocks", blocks, layout.buffer_len())? };
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let tr = unsafe { host_mut("block_traces", block_traces, layout.blocks())? };
        match dtype {
            0 => {
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let xs = unsafe { host("x", x as *const f32, n)? };
                let ws = c.ws("dim", cpu::accumulate_workspace_size::<f32>(&layout))?;
                cpu::accumulate(xs, rows, ld, &layout, alpha, beta, out, tr, ws)?
            }
            1 => {
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let xs = unsafe { host("x", x as *const thor_kernels::half::f16, n)? };
                let ws = c.ws(
                    "dim",
                    cpu::accumulate_workspace_size::<thor_kernels::half::f16>(&layout),
                )?;
                cpu::accumulate(xs, rows, ld, &layout, alpha, beta, out, tr, ws)?
            }
            _ => {
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let xs = unsafe { host("x", x as *const thor_kernels::half::bf16, n)? };
                let ws = c.ws(
                    "dim",
                    cpu::accumulate_workspace_size::<thor_kernels::half::bf16>(&layout),
                )?;
                cpu::accumulate(xs, rows, ld, &layout, alpha, beta, out, tr, ws)?
            }
        }
        Ok(())
    })
}

/// The factor set of `n_factors` factors of dimensions `dims` (a host array) at block `b`,
/// every value checked and named as the C arguments are.
fn factor_set(b: usize, n_factors: i64, dims: *const i64) -> Result<FactorSet> {
    let n = checks::factors("n_factors", n_factors)?;
    // SAFETY: the caller's pointer contract: `dims` addresses `n_factors` int64.
    let dims = unsafe { host("dims", dims, n)? };
    let mut d = Vec::new();
    d.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        arg: "n_factors",
        bytes: n * 8,
    })?;
    for (f, &v) in dims.iter().enumerate() {
        d.push(
            checks::dim("dims", v).map_err(|_| {
                Error::invalid("dims", format!("factor {f}: must be >= 1, got {v}"))
            })?,
        );
    }
    FactorSet::new(b, &d)
}

/// The arguments of a dense factor and its blocks (split, merge): the layout, the row
/// stride and the elements the dense matrix spans.
fn dense_args(dim: i64, ld: i64, block: i32) -> Result<(BlockLayout, usize, usize)> {
    let (d, ld, b) = (
        checks::dim("dim", dim)?,
        checks::dim("ld", ld)?,
        checks::block(block)?,
    );
    let layout = BlockLayout::new(d, b)?;
    Ok((layout, ld, span("ld", d, ld, d)?))
}

pub(crate) fn dtype_of(dtype: i32) -> Result<DType> {
    match dtype {
        0 => Ok(DType::F32),
        1 => Ok(DType::F16),
        2 => Ok(DType::BF16),
        other => Err(Error::invalid(
            "dtype",
            format!("unknown dtype {other} (0 f32, 1 f16, 2 bf16)"),
        )),
    }
}

/// Math of the grouped accumulation.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThorAccumulateMode {
    /// f32 fused multiply-adds on every input type (the accuracy baseline).
    F32 = 0,
    /// Tensor cores: TF32 on f32 input, f16 / bf16 products on 16-bit input (CUDA; the
    /// CPU computes in f32 either way).
    TensorCore = 1,
}

/// A planned grouped accumulation: a factor set and the rows of each factor's input, fixed
/// at creation; on a CUDA context also its device tables and workspace.
pub struct ThorAccumulatePlan {
    set: FactorSet,
    rows: Vec<usize>,
    dtype: DType,
    device: Option<DeviceAccumulate>,
}

/// Plans the grouped accumulation of `n_factors` factors of dimensions `dims` (split at
/// `block`; their blocks back to back in one buffer, factor 0 first), factor `f` from inputs
/// of `rows[f]` rows of element type `dtype`, with math `mode` (`ThorAccumulateMode`).
/// Release with `thor_v1_accumulate_plan_destroy`. The plan belongs to `ctx`. `*out` is
/// written on success only.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `n_factors` outside
/// 1..=`THOR_MAX_FACTORS`, a `dims` entry < 1, a `rows` entry < 1 or above 2^30, a bad
/// `block`, `dtype` or `mode`); `OUT_OF_MEMORY`; on a CUDA context `KERNEL_LOAD`, `DRIVER`.
///
/// # Safety
/// `dims` and `rows` must address `n_factors` int64 each; `out` one pointer.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_accumulate_plan_create(
    ctx: *mut ThorContext,
    block: i32,
    n_factors: i64,
    dims: *const i64,
    rows: *const i64,
    dtype: i32,
    mode: i32,
    out: *mut *mut ThorAccumulatePlan,
) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const *mut ThorAccumulatePlan)?;
        // SAFETY: the pointer contract of this function; checked first.
        let c = unsafe { ctx_mut(ctx)? };
        let b = checks::block(block)?;
        let set = factor_set(b, n_factors, dims)?;
        // SAFETY: as above.
        let r = unsafe { host("rows", rows, set.len())? };
        let r: Vec<usize> = r
            .iter()
            .enumerate()
            .map(|(f, &v)| {
                checks::dim("rows", v).map_err(|_| {
                    Error::invalid("rows", format!("factor {f}: must be >= 1, got {v}"))
                })
            })
            .collect::<Result<_>>()?;
        Regions::new()
            .read("dims", dims, set.len())
            .read("rows", rows, set.len())
            .write("out", out as *const *mut ThorAccumulatePlan, 1)
            .check()?;
        let dt = dtype_of(dtype)?;
        let mode = match mode {
            0 => AccumulateMode::F32,
            1 => AccumulateMode::TensorCore,
            other => {
                return Err(Error::invalid(
                    "mode",
                    format!("unknown mode {other} (0 f32, 1 tensor cores)"),
                )
                .into())
            }
        };
        let device = match &c.device {
            AnyBackend::Cpu(_) => {
                thor_kernels::cuda::accumulate::AccumulatePlan::new(&set, &r, dt, mode, 1)?;
                None
            }
            AnyBackend::Cuda(dev) => Some(dev.plan_accumulate(&set, &r, dt, mode)?),
        };
        let plan = Box::new(ThorAccumulatePlan {
            set,
            rows: r,
            dtype: dt,
            device,
        });
        // SAFETY: checked non-null and aligned above.
        unsafe { *out = Box::into_raw(plan) };
        Ok(())
    })
}

/// Releases a plan (null is ignored). On a CUDA context, call it after the work that uses
/// the plan has completed (`thor_v1_context_synchronize`).
///
/// # Safety
/// `plan` must come from `thor_v1_accumulate_plan_create` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_accumulate_plan_destroy(plan: *mut ThorAccumulatePlan) {
    if !plan.is_null() {
        // SAFETY: made by Box::into_raw in thor_v1_accumulate_plan_create.
        drop(unsafe { Box::from_raw(plan) });
    }
}

/// Grouped covariance accumulation of every factor of `plan`: factor `f` from `xs[f]`
/// (`rows[f] x dims[f]` row-major, row stride `lds[f]`, the planned element type), `S <-
/// betas[f] * S + alphas[f] * X^T X` on its diagonal blocks in `blocks` (the set's
/// `[total_blocks, block, block]` f32), identity padding, then `block_traces` (one per
/// block) and `factor_traces` (one per factor). `status[f]` (int32) becomes 1 when factor
/// `f`'s input held a NaN or Inf (the factor is left unchanged), else 0. On a CUDA context
/// this queues three launches on the context's stream and returns without waiting; every
/// pointer is a device pointer.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `xs[f]` null, an output
/// overlapping another output or an input, `lds[f]` < 1 or a span that overflows,
/// `alphas[f]` or `betas[f]` not finite, a plan made on another kind of context; the
/// message names the factor); `SHAPE` (`lds[f]` < `dims[f]`); `OUT_OF_MEMORY` (CPU
/// scratch); on a CUDA context `DRIVER`. Non-finite input is not an error: it is reported
/// in `status`.
///
/// # Safety
/// `xs`, `lds`, `alphas`, `betas` are host arrays of one entry per factor; the rest address
/// what the description gives (host memory on a CPU context, device memory on a CUDA
/// context), outputs not overlapping inputs, valid until the queued work completes.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_accumulate_grouped(
    ctx: *mut ThorContext,
    plan: *mut ThorAccumulatePlan,
    xs: *const *const c_void,
    lds: *const i64,
    alphas: *const f32,
    betas: *const f32,
    blocks: *mut f32,
    block_traces: *mut f32,
    factor_traces: *mut f32,
    status: *mut i32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function; checked first.
        let c = unsafe { ctx_mut(ctx)? };
        check_ptr("plan", plan as *const ThorAccumulatePlan)?;
        // SAFETY: a live plan made by this library.
        let p = unsafe { &mut *plan };
        let n = p.set.len();
        // SAFETY: host arrays of n entries, checked for null first.
        let (xs, lds, alphas, betas) = unsafe {
            (
                host("xs", xs, n)?,
                host("lds", lds, n)?,
                host("alphas", alphas, n)?,
                host("betas", betas, n)?,
            )
        };
        let size = p.dtype.size();
        let (nb, len) = (p.set.total_blocks(), p.set.buffer_len());
        let mut regions = Regions::new()
            .read("xs", xs.as_ptr(), n)
            .read("lds", lds.as_ptr(), n)
            .read("alphas", alphas.as_ptr(), n)
            .read("betas", betas.as_ptr(), n)
            .write("blocks", blocks as *const f32, len)
            .write("block_traces", block_traces as *const f32, nb)
            .write("factor_traces", factor_traces as *const f32, n)
            .write("status", status as *const i32, n);
        let mut spans = Vec::new();
        spans.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
            arg: "plan",
            bytes: n * 8,
        })?;
        for f in 0..n {
            let at = |e: Error| e.in_context(format_args!("factor {f}"));
            let ld = checks::dim("lds", lds[f]).map_err(at)?;
            let dim = p.set.entries()[f].layout.dim();
            spans.push(span("lds", p.rows[f], ld, dim).map_err(at)?);
            checks::finite("alphas", alphas[f] as f64).map_err(at)?;
            checks::finite("betas", betas[f] as f64).map_err(at)?;
            if xs[f].is_null() {
                return Err(at(Error::invalid("xs", "null pointer")).into());
            }
            regions = regions.read_bytes("xs", xs[f], spans[f] * size, size);
        }
        regions.check()?;
        let lds: Vec<usize> = lds.iter().map(|&v| v as usize).collect();
        match (&c.device, p.device.as_mut()) {
            (AnyBackend::Cuda(dev), Some(acc)) => {
                acc.check_device(dev)?;
                let inputs: Vec<DevInput> = (0..n)
                    .map(|f| DevInput {
                        x: xs[f] as u64,
                        layout: thor_kernels::InputLayout::matrix(p.rows[f], lds[f]),
                        alpha: alphas[f],
                        beta: betas[f],
                    })
                    .collect();
                // SAFETY: the pointer contract of this function.
                unsafe {
                    acc.launch_raw(
                        dev,
                        &inputs,
                        blocks as u64,
                        block_traces as u64,
                        factor_traces as u64,
                        status as u64,
                    )?
                };
            }
            (AnyBackend::Cpu(_), None) => {
                // SAFETY: the pointer contract of this function; checked for null and
                // alignment above.
                let (out, bt, ft, st) = unsafe {
                    (
                        host_mut("blocks", blocks, len)?,
                        host_mut("block_traces", block_traces, nb)?,
                        host_mut("factor_traces", factor_traces, n)?,
                        host_mut("status", status, n)?,
                    )
                };
                let need = |f: usize| spans[f];
                macro_rules! run {
                    ($t:ty) => {{
                        let mut inputs = Vec::with_capacity(n);
                        for f in 0..n {
                            // SAFETY: the pointer contract of this function.
                            let x = unsafe { host("xs", xs[f] as *const $t, need(f))? };
                            inputs.push(cpu::FactorInput {
                                x,
                                layout: thor_kernels::InputLayout::matrix(p.rows[f], lds[f]),
                                alpha: alphas[f],
                                beta: betas[f],
                            });
                        }
                        let ws = c.ws("plan", cpu::accumulate_set_workspace_size::<$t>(&p.set))?;
                        cpu::accumulate_set(&p.set, &inputs, None, None, out, bt, ft, st, ws)?;
                    }};
                }
                match p.dtype {
                    DType::F32 => run!(f32),
                    DType::F16 => run!(thor_kernels::half::f16),
                    DType::BF16 => run!(thor_kernels::half::bf16),
                }
            }
            _ => {
                return Err(Error::invalid("plan", "made on another kind of context").into());
            }
        }
        Ok(())
    })
}

/// Failure policy of `thor_v1_invert`: `max_retries` 0 reports only; otherwise failed blocks
/// are refactored with damping `max(l, floor) * factor` up to `max_retries` times.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ThorInvertPolicy {
    /// Retries after the first attempt (0: report only).
    pub max_retries: u32,
    /// Damping multiplier per retry (> 1).
    pub factor: f32,
    /// Damping a retry starts from (> 0).
    pub floor: f32,
}

/// Batched damped Cholesky inversion of `n_blocks` blocks of `block x block`: `output_j =
/// (input_j + l_j I)^-1` with `l_j = damping[j]` (or `damping_all` when `damping` is null).
/// `input` may equal `output` (in place); no buffer the call writes (`output`, `info`,
/// `damping_used`) may otherwise overlap another argument. `mask` (nullable,
/// one byte per block, 0 skips), `info` (one i32 per block: 0, failing pivot, -1 skipped,
/// -2 bad damping), `damping_used` (nullable). `policy` null reports only.
///
/// Returns `OK` (blocks that are not positive definite are reported in `info`, not as an
/// error); `INVALID_ARGUMENT` (a required pointer null, a pointer misaligned, a forbidden
/// overlap, `n_blocks` < 1, sizes that overflow, a bad `block`, `damping_all` negative or
/// not finite while `damping` is null, a `policy` with `factor` <= 1, `floor` <= 0 or more
/// than 64 retries); `OUT_OF_MEMORY` (CPU scratch); on a CUDA context `KERNEL_LOAD`,
/// `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_invert(
    ctx: *mut ThorContext,
    block: i32,
    n_blocks: i64,
    input: *const f32,
    output: *mut f32,
    damping: *const f32,
    damping_all: f32,
    mask: *const u8,
    policy: *const ThorInvertPolicy,
    info: *mut i32,
    damping_used: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let b = checks::block(block)?;
        let nb = checks::dim("n_blocks", n_blocks)?;
        let len = count("n_blocks", &[nb, b, b])?;
        let in_place = std::ptr::eq(input, output);
        // In place, `input` and `output` are one buffer, written.
        let regions = if in_place {
            Regions::new()
        } else {
            Regions::new().read("input", input, len)
        };
        regions
            .write("output", output as *const f32, len)
            .read_opt("damping", damping, nb)
            .read_opt("mask", mask, nb)
            .write("info", info as *const i32, nb)
            .write_opt("damping_used", damping_used as *const f32, nb)
            .read_opt("policy", policy, 1)
            .check()?;
        if damping.is_null() && !(damping_all >= 0.0 && damping_all.is_finite()) {
            return Err(Error::invalid(
                "damping_all",
                format!("must be finite and >= 0, got {damping_all}"),
            )
            .into());
        }
        let policy = if policy.is_null() {
            FailurePolicy::Report
        } else {
            check_ptr("policy", policy)?;
            // SAFETY: checked non-null and aligned.
            let p = unsafe { *policy };
            if p.max_retries == 0 {
                FailurePolicy::Report
            } else {
                FailurePolicy::Retry {
                    factor: p.factor,
                    max_retries: p.max_retries,
                    floor: p.floor,
                }
            }
        };
        match &c.device {
            AnyBackend::Cpu(_) => {
                let damp = if damping.is_null() {
                    Damping::Uniform(damping_all)
                } else {
                    // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                    Damping::PerBlock(unsafe { host("damping", damping, nb)? })
                };
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let mask = if mask.is_null() {
                    None
                } else {
                    Some(unsafe { host("mask", mask, nb)? })
                };
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let used = if damping_used.is_null() {
                    None
                } else {
                    Some(unsafe { host_mut("damping_used", damping_used, nb)? })
                };
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                let info = unsafe { host_mut("info", info, nb)? };
                let opts = InvertOptions {
                    damping: damp,
                    mask,
                    policy,
                };
                let ws_len = cpu::invert_workspace_size(b, nb);
                let ws = c.ws("n_blocks", ws_len)?;
                if in_place {
                    // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                    let blocks = unsafe { host_mut("output", output, len)? };
                    cpu::invert_in_place(b, blocks, info, used, &opts, ws)?;
                } else {
                    // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                    let (i, o) =
                        unsafe { (host("input", input, len)?, host_mut("output", output, len)?) };
                    cpu::invert(b, i, o, info, used, &opts, ws)?;
                }
            }
            AnyBackend::Cuda(dev) => {
                let args = raw::InvertArgs {
                    b,
                    blocks: nb,
                    damping: damping as u64,
                    damping_all,
                    mask: mask as u64,
                    policy,
                    info: info as u64,
                    damping_used: damping_used as u64,
                };
                // SAFETY: device pointers checked non-null (where required), aligned and
                // disjoint; sizes as documented.
                // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
                unsafe { raw::invert_chol_f32(dev, input as u64, output as u64, &args)? };
            }
        }
        Ok(())
    })
}

/// The preconditioner apply for one layer: `out = scale * blockdiag(G^-1) grad blockdiag(A^-1)`
/// with `grad`, `out` row-major `[g_dim, a_dim]`; `g_inv` / `a_inv` the inverse blocks
/// (`ceil(dim / block)` blocks each, symmetric as `thor_v1_invert` writes them), either null
/// for identity. `grad` and `out` must not overlap. On a CUDA context the call waits for the
/// result.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a required pointer null, a pointer misaligned, `out`
/// overlapping another argument, `g_dim` or `a_dim` < 1, sizes that overflow, a bad
/// `block`, `scale` not finite); `OUT_OF_MEMORY` (CPU scratch); on a CUDA context
/// `KERNEL_LOAD`, `DRIVER`.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_apply(
    ctx: *mut ThorContext,
    block: i32,
    g_inv: *const f32,
    g_dim: i64,
    grad: *const f32,
    a_inv: *const f32,
    a_dim: i64,
    scale: f32,
    out: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let c = unsafe { ctx_mut(ctx)? };
        let (gd, ad) = (checks::dim("g_dim", g_dim)?, checks::dim("a_dim", a_dim)?);
        let b = checks::block(block)?;
        let gl = BlockLayout::new(gd, b).map_err(rename("dim", "g_dim"))?;
        let al = BlockLayout::new(ad, b).map_err(rename("dim", "a_dim"))?;
        let n = count("g_dim", &[gd, ad])?;
        checks::finite("scale", scale as f64)?;
        Regions::new()
            .read_opt("g_inv", g_inv, gl.buffer_len())
            .read("grad", grad, n)
            .read_opt("a_inv", a_inv, al.buffer_len())
            .write("out", out as *const f32, n)
            .check()?;
        if let AnyBackend::Cuda(dev) = &c.device {
            // One layer: factor 0 is G, factor 1 is A (a set for the plan's shapes only;
            // the blocks stay where the caller has them).
            let set = FactorSet::new(b, &[gd, ad])?;
            let layer = thor_kernels::cuda::apply::ApplyLayer {
                out_dim: gd,
                in_dim: ad,
                g_factor: (!g_inv.is_null()).then_some(0),
                a_factor: (!a_inv.is_null()).then_some(1),
            };
            let mut plan = dev.plan_apply(&set, &[layer], DType::F32)?;
            let table = plan.plan().layer_table_at(
                &[(g_inv as u64, a_inv as u64)],
                &[thor_kernels::cuda::apply::LayerBuffers {
                    grad: grad as u64,
                    out: out as u64,
                    scale,
                }],
            )?;
            // SAFETY: the pointer contract of this function; the plan's tables live until
            // the synchronization below.
            unsafe { plan.launch_table(dev, &table)? };
            dev.synchronize()?;
            return Ok(());
        }
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let g = if g_inv.is_null() {
            None
        } else {
            Some((&gl, unsafe { host("g_inv", g_inv, gl.buffer_len())? }))
        };
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let a = if a_inv.is_null() {
            None
        } else {
            Some((&al, unsafe { host("a_inv", a_inv, al.buffer_len())? }))
        };
        let ws_len = cpu::apply_workspace_size(g.map(|_| b), gd, ad);
        let ws = c.ws("a_dim", ws_len)?;
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let (gs, os) = unsafe { (host("grad", grad, n)?, host_mut("out", out, n)?) };
        cpu::apply(g, gs, a, gd, ad, scale, os, ws)?;
        Ok(())
    })
}

/// THOR's trace rule: `*decision` = 0 update, 1 reuse, 2 freeze (a `ThorDecision`), for the
/// relative change of the trace from `prev` to `cur` against finite thresholds
/// `w1 >= w2 >= 0` (others are refused, as by `thor_v1_optimizer_create`).
///
/// Returns `OK`; `INVALID_ARGUMENT` (`decision` null or misaligned, `prev` or `cur` not
/// finite, thresholds not finite with `w1 >= w2 >= 0`).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_trace_rule(
    prev: f64,
    cur: f64,
    w1: f64,
    w2: f64,
    decision: *mut i32,
) -> ThorStatus {
    guard(|| {
        check_ptr("decision", decision as *const i32)?;
        checks::finite("prev", prev)?;
        checks::finite("cur", cur)?;
        let t = Thresholds { w1, w2 };
        t.validate().map_err(rename("thresholds", "w1"))?;
        // SAFETY: checked.
        unsafe { *decision = thor_kernels::rule::trace_rule(prev, cur, t).code() };
        Ok(())
    })
}
