//! The primitive probes of kernels/probe.cu: their launches and the results the PTX ISA
//! gives, shared by the emulator tests and the GPU tests (so the emulator's model of
//! cp.async and ldmatrix is held to the hardware's wherever there is a GPU).
#![allow(dead_code)]

use thor_kernels::cuda::raw::{KernelArg, LaunchPlan};
use thor_kernels::cuda::KernelId;

/// Tiles of the cp.async probe, floats per tile, threads.
pub const CP_TILES: usize = 5;
pub const CP_TILE: usize = 256;
pub const CP_THREADS: u32 = 64;

/// The cp.async probe's input: distinct values.
pub fn cp_input() -> Vec<f32> {
    (0..CP_TILES * CP_TILE).map(|i| i as f32 + 0.5).collect()
}

/// The cp.async probe's launch; `wait` 1 waits before each read (the only mode with a
/// defined result on a GPU), 0 leaves the wait out, 2 reads the stage still in flight.
pub fn cp_plan(input: u64, out: u64, wait: i32) -> LaunchPlan {
    plan(
        "probe_cp_async_f32",
        CP_THREADS,
        vec![
            KernelArg::Ptr(input),
            KernelArg::Ptr(out),
            KernelArg::I32(CP_TILES as i32),
            KernelArg::I32(wait),
        ],
    )
}

/// What the cp.async probe with `wait` 1 writes: tile t's floats rotated by 5.
pub fn cp_expected(input: &[f32]) -> Vec<f32> {
    (0..CP_TILES * CP_TILE)
        .map(|k| {
            let (t, j) = (k / CP_TILE, k % CP_TILE);
            input[t * CP_TILE + (j + 5) % CP_TILE]
        })
        .collect()
}

/// The ldmatrix probe's 16 x 16 tile: distinct 16-bit values.
pub fn ld_tile() -> Vec<u16> {
    (0..256u16)
        .map(|k| k.wrapping_mul(7).wrapping_add(3))
        .collect()
}

/// The ldmatrix probe's launch (one warp).
pub fn ld_plan(tile: u64, out: u64, trans: bool) -> LaunchPlan {
    plan(
        "probe_ldmatrix_b16",
        32,
        vec![
            KernelArg::Ptr(tile),
            KernelArg::Ptr(out),
            KernelArg::I32(trans as i32),
        ],
    )
}

/// ldmatrix.x4 by the PTX ISA: register i of lane l holds elements (l / 4, 2 (l % 4) + h)
/// of matrix i (with .trans (2 (l % 4) + h, l / 4)), h = 0 in the low half; the probe's
/// matrices are the tile's quarters top-left, bottom-left, top-right, bottom-right.
pub fn ld_expected(tile: &[u16], trans: bool) -> Vec<u32> {
    let mut out = vec![0u32; 128];
    for l in 0..32usize {
        for i in 0..4usize {
            let (r0, c0) = (8 * (i % 2), 8 * (i / 2));
            let e = |h: usize| {
                let (r, c) = if trans {
                    (2 * (l % 4) + h, l / 4)
                } else {
                    (l / 4, 2 * (l % 4) + h)
                };
                tile[(r0 + r) * 16 + c0 + c] as u32
            };
            out[4 * l + i] = e(0) | (e(1) << 16);
        }
    }
    out
}

fn plan(name: &'static str, threads: u32, args: Vec<KernelArg>) -> LaunchPlan {
    LaunchPlan {
        kernel: KernelId {
            module: "probe",
            name,
        },
        grid: (1, 1, 1),
        block: (threads, 1, 1),
        smem: 0,
        args,
    }
}
