//! Raw launchers on device pointers, for callers that own their memory (another
//! framework's tensors, through the C ABI). Each validates every scalar argument before
//! launching and checks the launch error; pointer validity is the caller's contract.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{LaunchConfig, PushKernelArg};

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

    /// THOR's trace rule on the device.
    pub const TRACE_RULE_F32: KernelId = id("rule", "trace_rule_f32");

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
    pub const ALL: [KernelId; 8] = [
        TRACE_RULE_F32,
        SPLIT_BLOCKS_F32,
        MERGE_BLOCKS_F32,
        TRACE_SET_F32,
        INVERT_CHOL_B32_F32,
        INVERT_CHOL_B64_F32,
        INVERT_CHOL_B128_F32,
        INVERT_CHOL_B256_F32,
    ];
}

fn check_ptr(arg: &'static str, p: CUdeviceptr, align: u64) -> Result<()> {
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

fn grid_u32(arg: &'static str, n: usize) -> Result<u32> {
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

/// Launches `split_blocks_f32`: the dense row-major `d x d` factor at `dense` (row stride
/// `ld` elements) into `[nb, b, b]` padded blocks at `blocks`.
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
    check_ptr("dense", dense, 4)?;
    check_ptr("blocks", blocks, 4)?;
    let ld = check_ld(ld, layout)?;
    let tiles = (layout.block() / SPLIT_TILE as usize).pow(2);
    let grid = grid_u32("dim", layout.blocks() * tiles)?;
    let (d, b) = (layout.dim() as i32, layout.block() as i32);
    let f = dev.function(kernels::SPLIT_BLOCKS_F32)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&dense).arg(&ld).arg(&d).arg(&b).arg(&blocks);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (SPLIT_TILE, SPLIT_ROWS, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: argument types and order match the kernel's signature; pointer validity is
    // the caller's contract, every scalar was checked above.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Launches `merge_blocks_f32`: `[nb, b, b]` blocks at `blocks` into the dense row-major
/// `d x d` matrix at `dense` (row stride `ld`), zero off the block diagonal.
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
    check_ptr("blocks", blocks, 4)?;
    check_ptr("dense", dense, 4)?;
    let ld = check_ld(ld, layout)?;
    let tiles = layout.dim().div_ceil(SPLIT_TILE as usize);
    let grid = grid_u32("dim", tiles * tiles)?;
    let (d, b) = (layout.dim() as i32, layout.block() as i32);
    let f = dev.function(kernels::MERGE_BLOCKS_F32)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&blocks).arg(&d).arg(&b).arg(&dense).arg(&ld);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (SPLIT_TILE, SPLIT_ROWS, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as in split_blocks_f32.
    unsafe { l.launch(cfg) }?;
    Ok(())
}

/// Launches `trace_set_f32` over `factors` factors described at `desc` (3 i32 per factor:
/// first block, block count, dimension), writing one trace per block to `block_traces` and
/// one per factor to `factor_traces`.
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
    crate::layout::check_block_size(b)?;
    check_ptr("blocks", blocks, 4)?;
    check_ptr("desc", desc, 4)?;
    check_ptr("block_traces", block_traces, 4)?;
    check_ptr("factor_traces", factor_traces, 4)?;
    if factors == 0 {
        return Err(Error::invalid("factors", "at least one factor is needed"));
    }
    let grid = grid_u32("factors", factors)?;
    let b = b as i32;
    let f = dev.function(kernels::TRACE_SET_F32)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&blocks)
        .arg(&b)
        .arg(&desc)
        .arg(&block_traces)
        .arg(&factor_traces);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (TRACE_WARPS * 32, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: as in split_blocks_f32.
    unsafe { l.launch(cfg) }?;
    Ok(())
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

/// Launches the batched damped Cholesky inversion (`invert_chol_b<b>_f32`): for every block
/// `j`, `out_j = (in_j + l_j I)^-1`, one thread block per matrix. `input` may equal
/// `output` (in place). See [`crate::invert`] for the info codes.
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
    crate::layout::check_block_size(args.b)?;
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
    let smem = super::tuning::invert_smem_bytes(args.b);
    let f = dev.function_with_smem(kernels::invert_chol_f32(args.b), smem)?;
    let (nb, retries) = (args.blocks as i32, max_retries as i32);
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&input)
        .arg(&output)
        .arg(&nb)
        .arg(&args.damping)
        .arg(&args.damping_all)
        .arg(&args.mask)
        .arg(&retries)
        .arg(&factor)
        .arg(&floor)
        .arg(&args.info)
        .arg(&args.damping_used);
    let cfg = LaunchConfig {
        grid_dim: (grid, 1, 1),
        block_dim: (super::tuning::invert_threads(args.b), 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: as in split_blocks_f32; the shared memory size was allowed for the function.
    unsafe { l.launch(cfg) }?;
    Ok(())
}
