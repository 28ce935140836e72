//! Raw launchers on device pointers, for callers that own their memory (another
//! framework's tensors, through the C ABI). Each validates every scalar argument before
//! launching and checks the launch error; pointer validity is the caller's contract.
//!
//! Every launcher first builds a [`LaunchPlan`] (kernel, grid, block, shared memory and the
//! argument list), a plain value that [`launch`] queues on a device. The `plan_*` functions
//! are public so that the same launches can be recorded elsewhere (a graph, a host
//! emulation of the kernels in the tests) with exactly the arguments the launchers use.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaStream, LaunchConfig, PushKernelArg};
use std::sync::Arc;

use super::tuning::{SPLIT_ROWS, SPLIT_TILE, TRACE_WARPS};
use super::{CudaDevice, KernelId};
use crate::error::{Error, Result};
use crate::layout::BlockLayout;

/// Every kernel the launchers use, in one place.
pub mod kernels {
    use super::KernelId;

    const fn id(module: &'static str, name: &'static str) -> KernelId {
        KernelId { module, name }
    }

    /// Dense factor into padded blocks, f32.
    pub const SPLIT_BLOCKS_F32: KernelId = id("split", "split_blocks_f32");
    /// Padded blocks back into a dense factor, f32.
    pub const MERGE_BLOCKS_F32: KernelId = id("split", "merge_blocks_f32");
    /// Block and factor traces of a whole set, f32.
    pub const TRACE_SET_F32: KernelId = id("trace", "trace_set_f32");
    /// Batched damped Cholesky inversion, b = 32, f32.
    pub const INVERT_CHOL_B32_F32: KernelId = id("invert", "invert_chol_b32_f32");
    /// Batched damped Cholesky inversion, b = 64, f32.
    pub const INVERT_CHOL_B64_F32: KernelId = id("invert", "invert_chol_b64_f32");
    /// Batched damped Cholesky inversion, b = 128, f32.
    pub const INVERT_CHOL_B128_F32: KernelId = id("invert", "invert_chol_b128_f32");
    /// Batched damped Cholesky inversion, b = 256, f32.
    pub const INVERT_CHOL_B256_F32: KernelId = id("invert", "invert_chol_b256_f32");
    /// Batched damped Cholesky inversion, b = 128, f32, registers capped for two thread
    /// blocks per SM.
    pub const INVERT_CHOL_B128X2_F32: KernelId = id("invert", "invert_chol_b128x2_f32");
    /// Batched damped Cholesky inversion, blocked by panels, b = 32, f32.
    pub const INVERT_BLOCKED_B32_F32: KernelId = id("invert", "invert_blocked_b32_f32");
    /// Batched damped Cholesky inversion, blocked by panels, b = 64, f32.
    pub const INVERT_BLOCKED_B64_F32: KernelId = id("invert", "invert_blocked_b64_f32");
    /// Batched damped Cholesky inversion, blocked by panels, b = 128, f32.
    pub const INVERT_BLOCKED_B128_F32: KernelId = id("invert", "invert_blocked_b128_f32");

    /// Accumulation partial products, whole diagonal blocks of 128, f32 input as TF32, tensor cores.
    pub const ACC_BLOCK_B128_TF32: KernelId = id("accumulate", "acc_block_b128_tf32");
    /// Accumulation partial products, whole diagonal blocks of 64, f32 input as TF32, tensor cores.
    pub const ACC_BLOCK_B64_TF32: KernelId = id("accumulate", "acc_block_b64_tf32");
    /// Accumulation partial products, whole diagonal blocks of 128, f32 input as 3xTF32 (f32-level error), tensor cores.
    pub const ACC_BLOCK_B128_F32X3: KernelId = id("accumulate", "acc_block_b128_f32x3");
    /// Accumulation partial products, whole diagonal blocks of 64, f32 input as 3xTF32 (f32-level error), tensor cores.
    pub const ACC_BLOCK_B64_F32X3: KernelId = id("accumulate", "acc_block_b64_f32x3");
    /// Accumulation partial products, whole diagonal blocks of 128, f16 input, tensor cores.
    pub const ACC_BLOCK_B128_F16: KernelId = id("accumulate", "acc_block_b128_f16");
    /// Accumulation partial products, whole diagonal blocks of 64, f16 input, tensor cores.
    pub const ACC_BLOCK_B64_F16: KernelId = id("accumulate", "acc_block_b64_f16");
    /// Accumulation partial products, whole diagonal blocks of 128, bf16 input, tensor cores.
    pub const ACC_BLOCK_B128_BF16: KernelId = id("accumulate", "acc_block_b128_bf16");
    /// Accumulation partial products, whole diagonal blocks of 64, bf16 input, tensor cores.
    pub const ACC_BLOCK_B64_BF16: KernelId = id("accumulate", "acc_block_b64_bf16");
    /// Accumulation partial products, 64 x 64 tiles, f32 input, SIMT f32.
    pub const ACC_PARTIAL_T64_F32: KernelId = id("accumulate", "acc_partial_t64_f32");
    /// Accumulation partial products, 32 x 32 tiles, f32 input, SIMT f32.
    pub const ACC_PARTIAL_T32_F32: KernelId = id("accumulate", "acc_partial_t32_f32");
    /// Accumulation partial products, 64 x 64 tiles, f16 input widened, SIMT f32.
    pub const ACC_PARTIAL_T64_F16_SIMT: KernelId = id("accumulate", "acc_partial_t64_f16_simt");
    /// Accumulation partial products, 32 x 32 tiles, f16 input widened, SIMT f32.
    pub const ACC_PARTIAL_T32_F16_SIMT: KernelId = id("accumulate", "acc_partial_t32_f16_simt");
    /// Accumulation partial products, 64 x 64 tiles, bf16 input widened, SIMT f32.
    pub const ACC_PARTIAL_T64_BF16_SIMT: KernelId = id("accumulate", "acc_partial_t64_bf16_simt");
    /// Accumulation partial products, 32 x 32 tiles, bf16 input widened, SIMT f32.
    pub const ACC_PARTIAL_T32_BF16_SIMT: KernelId = id("accumulate", "acc_partial_t32_bf16_simt");
    /// Accumulation partial products, 64 x 64 tiles, f32 input, TF32 tensor cores.
    pub const ACC_PARTIAL_T64_TF32: KernelId = id("accumulate", "acc_partial_t64_tf32");
    /// Accumulation partial products, 32 x 32 tiles, f32 input, TF32 tensor cores.
    pub const ACC_PARTIAL_T32_TF32: KernelId = id("accumulate", "acc_partial_t32_tf32");
    /// Accumulation partial products, 64 x 64 tiles, f16 input, tensor cores.
    pub const ACC_PARTIAL_T64_F16: KernelId = id("accumulate", "acc_partial_t64_f16");
    /// Accumulation partial products, 32 x 32 tiles, f16 input, tensor cores.
    pub const ACC_PARTIAL_T32_F16: KernelId = id("accumulate", "acc_partial_t32_f16");
    /// Accumulation partial products, 64 x 64 tiles, bf16 input, tensor cores.
    pub const ACC_PARTIAL_T64_BF16: KernelId = id("accumulate", "acc_partial_t64_bf16");
    /// Accumulation partial products, 32 x 32 tiles, bf16 input, tensor cores.
    pub const ACC_PARTIAL_T32_BF16: KernelId = id("accumulate", "acc_partial_t32_bf16");
    /// Accumulation finalize (sum, scale, mirror, padding), 64 x 64 tiles.
    pub const ACC_FINALIZE_T64_F32: KernelId = id("accumulate", "acc_finalize_t64_f32");
    /// Accumulation finalize, 32 x 32 tiles.
    pub const ACC_FINALIZE_T32_F32: KernelId = id("accumulate", "acc_finalize_t32_f32");

    /// Preconditioner apply, b = 32, f32 gradients.
    pub const APPLY_B32_F32: KernelId = id("apply", "apply_b32_f32");
    /// Preconditioner apply, b = 64, f32 gradients.
    pub const APPLY_B64_F32: KernelId = id("apply", "apply_b64_f32");
    /// Preconditioner apply, b = 128, f32 gradients.
    pub const APPLY_B128_F32: KernelId = id("apply", "apply_b128_f32");
    /// Preconditioner apply, b = 256, f32 gradients.
    pub const APPLY_B256_F32: KernelId = id("apply", "apply_b256_f32");
    /// Preconditioner apply, b = 32, bf16 gradients.
    pub const APPLY_B32_BF16: KernelId = id("apply", "apply_b32_bf16");
    /// Preconditioner apply, b = 64, bf16 gradients.
    pub const APPLY_B64_BF16: KernelId = id("apply", "apply_b64_bf16");
    /// Preconditioner apply, b = 128, bf16 gradients.
    pub const APPLY_B128_BF16: KernelId = id("apply", "apply_b128_bf16");
    /// Preconditioner apply, b = 256, bf16 gradients.
    pub const APPLY_B256_BF16: KernelId = id("apply", "apply_b256_bf16");

    /// The apply kernel for block size `b` and gradient type (bf16 or f32).
    pub fn apply(b: usize, bf16: bool) -> KernelId {
        match (b, bf16) {
            (32, false) => APPLY_B32_F32,
            (64, false) => APPLY_B64_F32,
            (128, false) => APPLY_B128_F32,
            (_, false) => APPLY_B256_F32,
            (32, true) => APPLY_B32_BF16,
            (64, true) => APPLY_B64_BF16,
            (128, true) => APPLY_B128_BF16,
            (_, true) => APPLY_B256_BF16,
        }
    }

    /// THOR's trace rule on the device.
    pub const TRACE_RULE_F32: KernelId = id("rule", "trace_rule_f32");
    /// The rule's counters after the inversion (updates and failed inversions).
    pub const RULE_TALLY_F32: KernelId = id("rule", "rule_tally_f32");

    /// Distributed step: blocks' lower triangles packed for a collective.
    pub const DIST_PACK_F32: KernelId = id("dist", "dist_pack_f32");
    /// Distributed step: packed lower triangles back into symmetric blocks.
    pub const DIST_UNPACK_F32: KernelId = id("dist", "dist_unpack_f32");
    /// Distributed step: this rank's flags, samples and owned traces for the all-reduce.
    pub const DIST_META_F32: KernelId = id("dist", "dist_meta_f32");
    /// Distributed step: statuses and traces from the summed metadata.
    pub const DIST_RESOLVE_F32: KernelId = id("dist", "dist_resolve_f32");
    /// Distributed step: the EMA of the owned blocks from the received sums.
    pub const DIST_EMA_F32: KernelId = id("dist", "dist_ema_f32");
    /// Distributed step: the rule's mask on the owned blocks.
    pub const DIST_OWN_MASK_F32: KernelId = id("dist", "dist_own_mask_f32");

    /// Preconditioner apply, b = 64, f32 gradients, conflict-free operand loads.
    pub const APPLY_B64_F32_CF: KernelId = id("apply", "apply_b64_f32_cf");
    /// Preconditioner apply, b = 64, bf16 gradients, conflict-free operand loads.
    pub const APPLY_B64_BF16_CF: KernelId = id("apply", "apply_b64_bf16_cf");
    /// Preconditioner apply, b = 128, f32 gradients, conflict-free operand loads.
    pub const APPLY_B128_F32_CF: KernelId = id("apply", "apply_b128_f32_cf");
    /// Preconditioner apply, b = 128, bf16 gradients, conflict-free operand loads.
    pub const APPLY_B128_BF16_CF: KernelId = id("apply", "apply_b128_bf16_cf");
    /// The inversion kernel for block size `b` (one of the supported sizes).
    pub fn invert_chol_f32(b: usize) -> KernelId {
        match b {
            32 => INVERT_CHOL_B32_F32,
            64 => INVERT_CHOL_B64_F32,
            128 => INVERT_CHOL_B128_F32,
            _ => INVERT_CHOL_B256_F32,
        }
    }

    /// Every kernel above, for checks against the sources.
    pub const ALL: [KernelId; 53] = [
        TRACE_RULE_F32,
        RULE_TALLY_F32,
        APPLY_B32_F32,
        APPLY_B64_F32,
        APPLY_B128_F32,
        APPLY_B256_F32,
        APPLY_B32_BF16,
        APPLY_B64_BF16,
        APPLY_B128_BF16,
        APPLY_B256_BF16,
        ACC_PARTIAL_T64_F32,
        ACC_PARTIAL_T32_F32,
        ACC_PARTIAL_T64_F16_SIMT,
        ACC_PARTIAL_T32_F16_SIMT,
        ACC_PARTIAL_T64_BF16_SIMT,
        ACC_PARTIAL_T32_BF16_SIMT,
        ACC_PARTIAL_T64_TF32,
        ACC_PARTIAL_T32_TF32,
        ACC_PARTIAL_T64_F16,
        ACC_PARTIAL_T32_F16,
        ACC_PARTIAL_T64_BF16,
        ACC_PARTIAL_T32_BF16,
        ACC_FINALIZE_T64_F32,
        ACC_FINALIZE_T32_F32,
        ACC_BLOCK_B128_TF32,
        ACC_BLOCK_B64_TF32,
        ACC_BLOCK_B128_F32X3,
        ACC_BLOCK_B64_F32X3,
        ACC_BLOCK_B128_F16,
        ACC_BLOCK_B64_F16,
        ACC_BLOCK_B128_BF16,
        ACC_BLOCK_B64_BF16,
        SPLIT_BLOCKS_F32,
        MERGE_BLOCKS_F32,
        TRACE_SET_F32,
        INVERT_CHOL_B32_F32,
        INVERT_CHOL_B64_F32,
        INVERT_CHOL_B128_F32,
        INVERT_CHOL_B256_F32,
        INVERT_CHOL_B128X2_F32,
        INVERT_BLOCKED_B32_F32,
        INVERT_BLOCKED_B64_F32,
        INVERT_BLOCKED_B128_F32,
        APPLY_B64_F32_CF,
        APPLY_B128_F32_CF,
        APPLY_B64_BF16_CF,
        APPLY_B128_BF16_CF,
        DIST_PACK_F32,
        DIST_UNPACK_F32,
        DIST_META_F32,
        DIST_RESOLVE_F32,
        DIST_EMA_F32,
        DIST_OWN_MASK_F32,
    ];
}

/// One kernel argument, by value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelArg {
    /// A device pointer (0 for null).
    Ptr(CUdeviceptr),
    /// A C `int`.
    I32(i32),
    /// A C `long long`.
    I64(i64),
    /// A C `unsigned long long`.
    U64(u64),
    /// A C `float`.
    F32(f32),
    /// A C `double`.
    F64(f64),
}

/// One kernel launch, fully described: what [`launch`] queues.
#[derive(Debug, Clone, PartialEq)]
pub struct LaunchPlan {
    /// The kernel.
    pub kernel: KernelId,
    /// Grid dimensions in thread blocks.
    pub grid: (u32, u32, u32),
    /// Thread block dimensions.
    pub block: (u32, u32, u32),
    /// Dynamic shared memory per thread block, bytes.
    pub smem: u32,
    /// The arguments, in the kernel's parameter order.
    pub args: Vec<KernelArg>,
}

/// Queues `plan` on `dev`'s stream, opting into large shared memory where it needs it.
///
/// # Safety
/// The plan's pointers must satisfy the contract of the `plan_*` function that built it
/// and stay valid until the queued work completes.
pub unsafe fn launch(dev: &CudaDevice, plan: &LaunchPlan) -> Result<()> {
    // SAFETY: the caller's contract, on the device's own stream.
    unsafe { launch_on(dev, dev.stream(), plan) }
}

/// [`launch`] on `stream`, a stream of `dev`'s context other than its own (a capture stream).
///
/// # Safety
/// As for [`launch`]; `stream` must belong to `dev`'s context.
pub(crate) unsafe fn launch_on(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    plan: &LaunchPlan,
) -> Result<()> {
    let f = dev.function_with_smem(plan.kernel, plan.smem as usize)?;
    let mut l = stream.launch_builder(&f);
    for a in &plan.args {
        match a {
            KernelArg::Ptr(v) | KernelArg::U64(v) => l.arg(v),
            KernelArg::I32(v) => l.arg(v),
            KernelArg::I64(v) => l.arg(v),
            KernelArg::F32(v) => l.arg(v),
            KernelArg::F64(v) => l.arg(v),
        };
    }
    let cfg = LaunchConfig {
        grid_dim: plan.grid,
        block_dim: plan.block,
        shared_mem_bytes: plan.smem,
    };
    // SAFETY: the plan's argument list follows the kernel's signature (built by its plan_*
    // function); pointer validity is the caller's contract; the shared memory size was
    // allowed for the function above.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

pub(crate) fn check_ptr(arg: &'static str, p: CUdeviceptr, align: u64) -> Result<()> {
    if p == 0 {
        return Err(Error::invalid(arg, "null device pointer"));
    }
    if p % align != 0 {
        return Err(Error::invalid(
            arg,
            format!("device pointer {p:#x} is not {align}-byte aligned"),
        ));
    }
    Ok(())
}

pub(crate) fn grid_u32(arg: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n)
        .ok()
        .filter(|&g| g <= i32::MAX as u32)
        .ok_or_else(|| {
            Error::invalid(
                arg,
                format!("needs {n} thread blocks, more than a launch allows"),
            )
        })
}

fn check_ld(ld: usize, layout: &BlockLayout) -> Result<i64> {
    layout.dense_len(ld)?;
    i64::try_from(ld).map_err(|_| Error::invalid("ld", "too large"))
}

/// The launch of `split_blocks_f32`: the dense row-major `d x d` factor at `dense` (row
/// stride `ld` elements) into `[nb, b, b]` padded blocks at `blocks`.
pub fn plan_split_blocks_f32(
    dense: CUdeviceptr,
    ld: usize,
    layout: &BlockLayout,
    blocks: CUdeviceptr,
) -> Result<LaunchPlan> {
    check_ptr("dense", dense, 4)?;
    check_ptr("blocks", blocks, 4)?;
    let ld = check_ld(ld, layout)?;
    let tiles = (layout.block() / SPLIT_TILE as usize).pow(2);
    let grid = grid_u32("dim", layout.blocks() * tiles)?;
    let (d, b) = (layout.dim() as i32, layout.block() as i32);
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: kernels::SPLIT_BLOCKS_F32,
        grid: (grid, 1, 1),
        block: (SPLIT_TILE, SPLIT_ROWS, 1),
        smem: 0,
        args: vec![Ptr(dense), I64(ld), I32(d), I32(b), Ptr(blocks)],
    })
}

/// Launches `split_blocks_f32` ([`plan_split_blocks_f32`]).
///
/// # Safety
/// `dense` must address at least `(d - 1) * ld + d` f32 and `blocks` `layout.buffer_len()`
/// f32 of `dev`'s context, the two must not overlap, and both must stay valid until the
/// work queued on `dev.stream()` completes.
pub unsafe fn split_blocks_f32(
    dev: &CudaDevice,
    dense: CUdeviceptr,
    ld: usize,
    layout: &BlockLayout,
    blocks: CUdeviceptr,
) -> Result<()> {
    let plan = plan_split_blocks_f32(dense, ld, layout, blocks)?;
    // SAFETY: the caller's contract above.
    unsafe { launch(dev, &plan) }
}

/// The launch of `merge_blocks_f32`: `[nb, b, b]` blocks at `blocks` into the dense
/// row-major `d x d` matrix at `dense` (row stride `ld`), zero off the block diagonal.
pub fn plan_merge_blocks_f32(
    blocks: CUdeviceptr,
    layout: &BlockLayout,
    dense: CUdeviceptr,
    ld: usize,
) -> Result<LaunchPlan> {
    check_ptr("blocks", blocks, 4)?;
    check_ptr("dense", dense, 4)?;
    let ld = check_ld(ld, layout)?;
    let tiles = layout.dim().div_ceil(SPLIT_TILE as usize);
    let grid = grid_u32("dim", tiles * tiles)?;
    let (d, b) = (layout.dim() as i32, layout.block() as i32);
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: kernels::MERGE_BLOCKS_F32,
        grid: (grid, 1, 1),
        block: (SPLIT_TILE, SPLIT_ROWS, 1),
        smem: 0,
        args: vec![Ptr(blocks), I32(d), I32(b), Ptr(dense), I64(ld)],
    })
}

/// Launches `merge_blocks_f32` ([`plan_merge_blocks_f32`]).
///
/// # Safety
/// As for [`split_blocks_f32`], with `dense` written.
pub unsafe fn merge_blocks_f32(
    dev: &CudaDevice,
    blocks: CUdeviceptr,
    layout: &BlockLayout,
    dense: CUdeviceptr,
    ld: usize,
) -> Result<()> {
    let plan = plan_merge_blocks_f32(blocks, layout, dense, ld)?;
    // SAFETY: the caller's contract above.
    unsafe { launch(dev, &plan) }
}

/// The launch of `trace_set_f32` over `factors` factors described at `desc` (3 i32 per
/// factor: first block, block count, dimension), writing one trace per block to
/// `block_traces` and one per factor to `factor_traces`.
pub fn plan_trace_set_f32(
    blocks: CUdeviceptr,
    b: usize,
    desc: CUdeviceptr,
    factors: usize,
    block_traces: CUdeviceptr,
    factor_traces: CUdeviceptr,
) -> Result<LaunchPlan> {
    crate::layout::check_block_size(b)?;
    check_ptr("blocks", blocks, 4)?;
    check_ptr("desc", desc, 4)?;
    check_ptr("block_traces", block_traces, 4)?;
    check_ptr("factor_traces", factor_traces, 4)?;
    if factors == 0 {
        return Err(Error::invalid("factors", "at least one factor is needed"));
    }
    let grid = grid_u32("factors", factors)?;
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: kernels::TRACE_SET_F32,
        grid: (grid, 1, 1),
        block: (TRACE_WARPS * 32, 1, 1),
        smem: 0,
        args: vec![
            Ptr(blocks),
            I32(b as i32),
            Ptr(desc),
            Ptr(block_traces),
            Ptr(factor_traces),
        ],
    })
}

/// Launches `trace_set_f32` ([`plan_trace_set_f32`]).
///
/// # Safety
/// `blocks` must address every block `desc` names (`b * b` f32 each), `desc` `3 * factors`
/// i32 consistent with the blocks, `block_traces` one f32 per block and `factor_traces`
/// `factors` f32, all of `dev`'s context, outputs not overlapping inputs, valid until the
/// queued work completes.
pub unsafe fn trace_set_f32(
    dev: &CudaDevice,
    blocks: CUdeviceptr,
    b: usize,
    desc: CUdeviceptr,
    factors: usize,
    block_traces: CUdeviceptr,
    factor_traces: CUdeviceptr,
) -> Result<()> {
    let plan = plan_trace_set_f32(blocks, b, desc, factors, block_traces, factor_traces)?;
    // SAFETY: the caller's contract above.
    unsafe { launch(dev, &plan) }
}

/// Which kernel runs a batched inversion. Every kernel computes the same thing in the same
/// order; they differ in how they use the multiprocessor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum InvertKernel {
    /// One thread block per matrix, at the kernel's natural register count (every block
    /// size; at b = 128 one thread block per SM).
    Standard,
    /// b = 128 only: the same kernel with registers capped at 128 so that two thread
    /// blocks share an SM, each filling the other's barrier waits.
    TwoPerSm,
    /// b <= 128: the factorization and the triangular inverse a panel of columns at a time
    /// (8 columns at b = 32 and 64, 16 at b = 128): about 5 b / panel block-wide barriers
    /// per matrix instead of 2 b. Its Cholesky factor takes the standard kernel's
    /// operations in the same order, so failing pivots, retries and damping are the same;
    /// its inverse differs from the standard one by rounding.
    Blocked,
}

impl InvertKernel {
    /// Every inversion kernel, the baseline first.
    pub const ALL: [InvertKernel; 3] = [
        InvertKernel::Standard,
        InvertKernel::TwoPerSm,
        InvertKernel::Blocked,
    ];

    /// Whether this kernel exists for block size `b`.
    pub fn supports(self, b: usize) -> bool {
        match self {
            InvertKernel::Standard => true,
            InvertKernel::TwoPerSm => b == 128,
            InvertKernel::Blocked => matches!(b, 32 | 64 | 128),
        }
    }

    /// A short stable name ("standard", "two_per_sm", "blocked"), as choices are recorded.
    pub fn name(self) -> &'static str {
        match self {
            InvertKernel::Standard => "standard",
            InvertKernel::TwoPerSm => "two_per_sm",
            InvertKernel::Blocked => "blocked",
        }
    }

    /// Whether this kernel's output is the standard kernel's bit for bit (the same
    /// arithmetic in the same order, only another use of the multiprocessor).
    pub fn same_bits_as_standard(self) -> bool {
        !matches!(self, InvertKernel::Blocked)
    }
}

/// Arguments of [`invert_chol_f32`] besides the matrices.
#[derive(Debug, Clone, Copy)]
pub struct InvertArgs {
    /// Block size, one of 32, 64, 128, 256.
    pub b: usize,
    /// Number of blocks.
    pub blocks: usize,
    /// Per-block damping (`blocks` f32), or 0 to use `damping_all` for every block.
    pub damping: CUdeviceptr,
    /// Damping for every block when `damping` is 0.
    pub damping_all: f32,
    /// One byte per block, 0 skips the block; or 0 for no mask.
    pub mask: CUdeviceptr,
    /// The failure policy.
    pub policy: crate::invert::FailurePolicy,
    /// `blocks` i32: the per-block info codes.
    pub info: CUdeviceptr,
    /// `blocks` f32 for the damping of each block's last attempt, or 0.
    pub damping_used: CUdeviceptr,
}

/// The launch of the batched damped Cholesky inversion (`invert_chol_b<b>_f32`): for every
/// block `j`, `out_j = (in_j + l_j I)^-1`, one thread block per matrix. `input` may equal
/// `output` (in place). See [`crate::invert`] for the info codes.
pub fn plan_invert_chol_f32(
    input: CUdeviceptr,
    output: CUdeviceptr,
    args: &InvertArgs,
) -> Result<LaunchPlan> {
    plan_invert_chol_f32_with(input, output, args, InvertKernel::Standard)
}

/// [`plan_invert_chol_f32`] with the inversion run by `kernel`; an error naming `kernel`
/// when it has no kernel for the block size.
pub fn plan_invert_chol_f32_with(
    input: CUdeviceptr,
    output: CUdeviceptr,
    args: &InvertArgs,
    kernel: InvertKernel,
) -> Result<LaunchPlan> {
    crate::layout::check_block_size(args.b)?;
    if !kernel.supports(args.b) {
        return Err(Error::invalid(
            "kernel",
            format!(
                "the {} inversion has no block size {}",
                kernel.name(),
                args.b
            ),
        ));
    }
    check_ptr("input", input, 4)?;
    check_ptr("output", output, 4)?;
    check_ptr("info", args.info, 4)?;
    for (name, p) in [
        ("damping", args.damping),
        ("damping_used", args.damping_used),
    ] {
        if p != 0 {
            check_ptr(name, p, 4)?;
        }
    }
    if args.damping == 0 && !(args.damping_all >= 0.0 && args.damping_all.is_finite()) {
        return Err(Error::invalid(
            "damping",
            format!("must be finite and >= 0, got {}", args.damping_all),
        ));
    }
    if args.blocks == 0 {
        return Err(Error::invalid("blocks", "at least one block is needed"));
    }
    let (max_retries, factor, floor) = args.policy.params()?;
    let grid = grid_u32("blocks", args.blocks)?;
    let smem = super::tuning::invert_smem_bytes(args.b, kernel);
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: match (kernel, args.b) {
            (InvertKernel::TwoPerSm, _) => kernels::INVERT_CHOL_B128X2_F32,
            (InvertKernel::Blocked, 32) => kernels::INVERT_BLOCKED_B32_F32,
            (InvertKernel::Blocked, 64) => kernels::INVERT_BLOCKED_B64_F32,
            (InvertKernel::Blocked, 128) => kernels::INVERT_BLOCKED_B128_F32,
            (InvertKernel::Blocked, b) => unreachable!("supports() refused b = {b}"),
            (InvertKernel::Standard, b) => kernels::invert_chol_f32(b),
        },
        grid: (grid, 1, 1),
        block: (super::tuning::invert_threads(args.b), 1, 1),
        smem: smem as u32,
        args: vec![
            Ptr(input),
            Ptr(output),
            I32(args.blocks as i32),
            Ptr(args.damping),
            F32(args.damping_all),
            Ptr(args.mask),
            I32(max_retries as i32),
            F32(factor),
            F32(floor),
            Ptr(args.info),
            Ptr(args.damping_used),
        ],
    })
}

/// Launches the batched damped Cholesky inversion ([`plan_invert_chol_f32`]).
///
/// # Safety
/// `input` and `output` must address `blocks * b * b` f32 each (the same allocation, or
/// non-overlapping ones), and every non-zero pointer of `args` the element count its
/// documentation gives, all of `dev`'s context and valid until the queued work completes.
pub unsafe fn invert_chol_f32(
    dev: &CudaDevice,
    input: CUdeviceptr,
    output: CUdeviceptr,
    args: &InvertArgs,
) -> Result<()> {
    let plan = plan_invert_chol_f32(input, output, args)?;
    // SAFETY: the caller's contract above.
    unsafe { launch(dev, &plan) }
}

/// Arguments of [`plan_trace_rule_f32`]: THOR's trace rule on the device (see
/// [`crate::cuda::DeviceTraceRule`] for the safe form).
#[derive(Debug, Clone, Copy)]
pub struct TraceRuleArgs {
    /// One f32 trace per factor of the set.
    pub factor_traces: CUdeviceptr,
    /// One i32 per factor, non-zero where the factor's statistics were not updated (the
    /// accumulation's status), or 0 for none: such layers are skipped (decision 4).
    pub factor_status: CUdeviceptr,
    /// The layer table, `6 * n_layers` i32 ([`crate::cuda::RuleLayer::table`]).
    pub layers: CUdeviceptr,
    /// Number of layers.
    pub n_layers: usize,
    /// The damping in the layer traces.
    pub damping: f32,
    /// The rule's thresholds (checked here).
    pub thresholds: crate::rule::Thresholds,
    /// `n_layers` f64: each layer's previous trace (state).
    pub prev: CUdeviceptr,
    /// `n_layers` bytes of state flags (zero initially).
    pub state: CUdeviceptr,
    /// One byte per block of the set: 1 where the layer updates.
    pub mask: CUdeviceptr,
    /// `n_layers` i32: this step's decisions.
    pub decisions: CUdeviceptr,
    /// `history_capacity * n_layers` i32: the decision ring.
    pub history: CUdeviceptr,
    /// Rows in the ring (at least 1).
    pub history_capacity: usize,
    /// One u64: statistics steps so far (state).
    pub step: CUdeviceptr,
    /// One byte per factor of the set that the accumulation reads (state: holds statistics,
    /// frozen; zero initially), or 0 for none.
    pub factor_state: CUdeviceptr,
    /// `6 * n_layers` u64 counters (`thor::LayerCounters` order, zero initially), or 0 for
    /// none; [`plan_rule_tally_f32`] completes them after the inversion.
    pub counters: CUdeviceptr,
    /// One f32 the kernel reads the damping from instead of `damping` (so that a captured
    /// step follows a schedule), or 0.
    pub damping_at: CUdeviceptr,
    /// One f32 per block of the set: every layer's blocks get `sqrt(damping)`, for the
    /// inversion's per-block damping; or 0.
    pub block_damping: CUdeviceptr,
}

/// The launch of `trace_rule_f32`: one thread block, a thread per layer.
pub fn plan_trace_rule_f32(a: &TraceRuleArgs) -> Result<LaunchPlan> {
    a.thresholds.validate()?;
    crate::error::check_finite("damping", a.damping as f64)?;
    if a.n_layers == 0 || a.n_layers > i32::MAX as usize {
        return Err(Error::invalid("n_layers", "at least one layer is needed"));
    }
    if a.history_capacity == 0 || a.history_capacity > i32::MAX as usize {
        return Err(Error::invalid("history_capacity", "must be at least 1"));
    }
    for (name, p, align) in [
        ("factor_status", a.factor_status, 4),
        ("factor_state", a.factor_state, 1),
        ("counters", a.counters, 8),
        ("damping_at", a.damping_at, 4),
        ("block_damping", a.block_damping, 4),
    ] {
        if p != 0 {
            check_ptr(name, p, align)?;
        }
    }
    for (name, p, align) in [
        ("factor_traces", a.factor_traces, 4),
        ("layers", a.layers, 4),
        ("prev", a.prev, 8),
        ("state", a.state, 1),
        ("mask", a.mask, 1),
        ("decisions", a.decisions, 4),
        ("history", a.history, 4),
        ("step", a.step, 8),
    ] {
        check_ptr(name, p, align)?;
    }
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: kernels::TRACE_RULE_F32,
        grid: (1, 1, 1),
        block: (256, 1, 1),
        smem: 0,
        args: vec![
            Ptr(a.factor_traces),
            Ptr(a.factor_status),
            Ptr(a.layers),
            I32(a.n_layers as i32),
            F32(a.damping),
            F64(a.thresholds.w1),
            F64(a.thresholds.w2),
            Ptr(a.prev),
            Ptr(a.state),
            Ptr(a.mask),
            Ptr(a.decisions),
            Ptr(a.history),
            I32(a.history_capacity as i32),
            Ptr(a.step),
            Ptr(a.factor_state),
            Ptr(a.counters),
            Ptr(a.damping_at),
            Ptr(a.block_damping),
        ],
    })
}

/// The launch of `rule_tally_f32`, after the masked inversion of a step: each layer
/// `decisions` says updated counts an update in `counters`, or a failed inversion when
/// `info` reports a failed block of the layer (`layers` as for [`plan_trace_rule_f32`]).
pub fn plan_rule_tally_f32(
    layers: CUdeviceptr,
    n_layers: usize,
    decisions: CUdeviceptr,
    info: CUdeviceptr,
    counters: CUdeviceptr,
) -> Result<LaunchPlan> {
    if n_layers == 0 || n_layers > i32::MAX as usize {
        return Err(Error::invalid("n_layers", "at least one layer is needed"));
    }
    for (name, p, align) in [
        ("layers", layers, 4),
        ("decisions", decisions, 4),
        ("info", info, 4),
        ("counters", counters, 8),
    ] {
        check_ptr(name, p, align)?;
    }
    use KernelArg::*;
    Ok(LaunchPlan {
        kernel: kernels::RULE_TALLY_F32,
        grid: (1, 1, 1),
        block: (256, 1, 1),
        smem: 0,
        args: vec![
            Ptr(layers),
            I32(n_layers as i32),
            Ptr(decisions),
            Ptr(info),
            Ptr(counters),
        ],
    })
}
