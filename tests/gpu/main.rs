//! GPU kernels against the f64 reference, one module per operation. Skipped, with the
//! reason printed, where there is no GPU; a failure under THOR_REQUIRE_GPU=1.
#![cfg(feature = "cuda")]

#[path = "../common/mod.rs"]
mod common;

mod accumulate;
mod apply;
mod conv;
mod invert;
mod ops;
mod probe;
mod step;

use common::*;
use cudarc::driver::{DevicePtr, DevicePtrMut};
use thor_kernels::cuda::{raw, CudaDevice, KernelSource};
use thor_kernels::layout::{BlockLayout, FactorSet, SUPPORTED_BLOCK_SIZES};
use thor_kernels::shapes;
use thor_kernels::{reference, Error};

/// Batch sizes shrink under THOR_SANITIZER_QUICK=1, for runs under compute-sanitizer
/// (racecheck instruments every shared-memory access).
fn batch(n: usize) -> usize {
    if std::env::var("THOR_SANITIZER_QUICK").is_ok_and(|v| v == "1") {
        n.min(8)
    } else {
        n
    }
}
