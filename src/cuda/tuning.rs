//! Launch shapes of every kernel, in one place. Each choice carries the measurement that
//! chose it; none has been measured on a GPU yet, so these are the reasoned first picks.
//!
//! Must agree with the `#define`s of the matching `kernels/*.cu`.

/// split / merge: one 32 x 32 tile per thread block (SPLIT_TILE), 32 x 8 threads
/// (SPLIT_ROWS): each warp moves 128 contiguous bytes per row, 4 rows per thread.
/// Not yet measured on a GPU.
pub const SPLIT_TILE: u32 = 32;
/// Rows of threads per split / merge thread block.
pub const SPLIT_ROWS: u32 = 8;

/// trace: 8 warps per factor (TRACE_WARPS), one factor per thread block.
/// Not yet measured on a GPU (the whole ResNet-50 set is 654 x 128 diagonal loads).
pub const TRACE_WARPS: u32 = 8;

/// invert: threads per matrix (one matrix per thread block) for b = 32, 64, 128, 256.
/// b <= 128 (v2): a P x P grid of threads holding the matrix in registers, cyclically
/// (8 x 8 threads at b = 32 and 64, 16 x 16 at b = 128: 16, 64 and 64 elements each).
/// b = 256 (v1): 16 warps over the packed triangle in shared memory.
/// Not yet measured on a GPU.
pub fn invert_threads(b: usize) -> u32 {
    match b {
        32 | 64 => 64,
        128 => 256,
        _ => 512,
    }
}

/// invert: dynamic shared memory per matrix for `kernel`. b <= 128: the matrix with
/// padded rows (b + 1 floats; L, then L^-1, then X) and two published rows or columns; the
/// blocked kernel instead one block column's products (b - p) x p for panels of p columns
/// ([`invert_panel`]), b reciprocal pivots and a status word. b = 256: the packed lower
/// triangle plus one column.
pub fn invert_smem_bytes(b: usize, kernel: super::raw::InvertKernel) -> usize {
    if b > 128 {
        (b * (b + 1) / 2 + b) * 4
    } else if kernel == super::raw::InvertKernel::Blocked {
        let p = invert_panel(b);
        (b * (b + 1) + (b - p) * p + b + 1) * 4
    } else {
        (b * (b + 1) + 2 * b) * 4
    }
}

/// invert, blocked kernel: the panel width, the side of its thread grid (8 at b = 32 and
/// 64, 16 at b = 128; `THOR_INVERT_BLOCKED_KERNEL` in kernels/invert.cu).
pub fn invert_panel(b: usize) -> usize {
    match b {
        128 => 16,
        _ => 8,
    }
}
