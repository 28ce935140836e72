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
    /// Dense factor into padded blocks, f32.
    pub const SPLIT_BLOCKS_F32: KernelId = KernelId {
        module: "split",
        name: "split_blocks_f32",
    };
    /// Padded blocks back into a dense factor, f32.
    pub const MERGE_BLOCKS_F32: KernelId = KernelId {
        module: "split",
        name: "merge_blocks_f32",
    };
    /// Block and factor traces of a whole set, f32.
    pub const TRACE_SET_F32: KernelId = KernelId {
        module: "trace",
        name: "trace_set_f32",
    };
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

fn check_ld(ld: usize, d: usize) -> Result<i64> {
    if ld < d {
        return Err(Error::shape("ld", format!(">= {d}"), ld));
    }
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
    let ld = check_ld(ld, layout.dim())?;
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
    let ld = check_ld(ld, layout.dim())?;
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
