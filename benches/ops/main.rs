//! Criterion benchmarks: each kernel against the library calls a user would otherwise make,
//! in the same run. GPU groups time with device events and are skipped, with a printed
//! reason, where there is no GPU.
//!
//!     cargo bench --bench ops                      # everything
//!     cargo bench --bench ops -- gpu/              # GPU groups only
//!     cargo bench --bench ops -- --quick           # short run

mod accumulate;
mod apply;
mod conv;
mod host;
mod invert;
mod layout;

use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use cudarc::cublas::{sys as cublas_sys, CudaBlas};
use cudarc::driver::{sys as drv, CudaSlice, DevicePtr, DevicePtrMut};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use thor_kernels::cpu::{self, InvertOptions, Workspace};
use thor_kernels::cuda::CudaDevice;
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::shapes;

fn normal(seed: u64, n: usize) -> Vec<f32> {
    let mut r = StdRng::seed_from_u64(seed);
    (0..n).map(|_| r.sample::<f32, _>(StandardNormal)).collect()
}

fn resnet_dims() -> Vec<usize> {
    shapes::resnet50()
        .iter()
        .flat_map(|l| [l.d_a, l.d_g])
        .collect()
}

/// Diagonal-block-dominant SPD blocks: `X^T X / n + I` per block.
fn spd_blocks(b: usize, nb: usize, seed: u64) -> Vec<f32> {
    let layout = BlockLayout::new(nb * b, b).unwrap();
    let n = 2 * b;
    let x = normal(seed, n * nb * b);
    let mut s = vec![0.0; layout.buffer_len()];
    let mut t = vec![0.0; nb];
    cpu::accumulate(
        &x,
        n,
        nb * b,
        &layout,
        1.0 / n as f32,
        0.0,
        &mut s,
        &mut t,
        &mut Workspace::new(0),
    )
    .unwrap();
    s
}

/// Device time of `iters` runs of `f`, measured with events around the whole batch.
fn device_time(dev: &CudaDevice, iters: u64, mut f: impl FnMut()) -> Duration {
    let ctx = dev.context_handle();
    let start = ctx
        .new_event(Some(drv::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    let end = ctx
        .new_event(Some(drv::CUevent_flags::CU_EVENT_DEFAULT))
        .unwrap();
    start.record(dev.stream()).unwrap();
    for _ in 0..iters {
        f();
    }
    end.record(dev.stream()).unwrap();
    end.synchronize().unwrap();
    Duration::from_secs_f64(start.elapsed_ms(&end).unwrap() as f64 / 1e3)
}

/// Device 0 and a cuBLAS handle on its stream, or None (the group is skipped, with the
/// reason printed) where there is no usable GPU.
fn gpu(what: &str) -> Option<(CudaDevice, CudaBlas)> {
    match CudaDevice::new(0) {
        Ok(dev) => {
            let blas = CudaBlas::new(dev.stream().clone()).expect("cuBLAS");
            Some((dev, blas))
        }
        Err(e) => {
            println!("SKIPPED {what}: no usable GPU ({e})");
            None
        }
    }
}

criterion_group!(
    benches,
    host::cpu_benches,
    conv::cpu_conv_benches,
    layout::gpu_benches,
    invert::gpu_invert_benches,
    accumulate::gpu_accumulate_benches,
    apply::gpu_apply_benches
);
criterion_main!(benches);
