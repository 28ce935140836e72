//! Criterion benchmarks: each kernel against the library calls a user would otherwise make,
//! in the same run. GPU groups time with device events and are skipped, with a printed
//! reason, where there is no GPU.
//!
//!     cargo bench --bench ops                      # everything
//!     cargo bench --bench ops -- gpu/              # GPU groups only
//!     cargo bench --bench ops -- --quick           # short run

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

fn cpu_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);

    let set = FactorSet::new(128, &resnet_dims()).unwrap();
    let blocks = normal(1, set.buffer_len());
    let (mut bt, mut ft) = (vec![0.0; set.total_blocks()], vec![0.0; set.len()]);
    g.throughput(Throughput::Bytes((set.total_blocks() * 128 * 4) as u64));
    g.bench_function("trace/resnet50_b128", |bch| {
        bch.iter(|| cpu::traces(&set, &blocks, &mut bt, &mut ft).unwrap())
    });

    let layout = BlockLayout::new(2304, 128).unwrap();
    let dense = normal(2, 2304 * 2304);
    let mut out = vec![0.0; layout.buffer_len()];
    g.throughput(Throughput::Bytes((2 * 4 * layout.buffer_len()) as u64));
    g.bench_function("split/d2304_b128", |bch| {
        bch.iter(|| cpu::split(&dense, 2304, &layout, &mut out).unwrap())
    });

    for (n, d) in [(8192usize, 576usize), (4096, 4608)] {
        let layout = BlockLayout::new(d, 128).unwrap();
        let x = normal(3, n * d);
        let mut s = vec![0.0; layout.buffer_len()];
        let mut t = vec![0.0; layout.blocks()];
        let mut ws = Workspace::new(0);
        g.throughput(Throughput::Elements(
            (2 * n * layout.blocks() * 128 * 128) as u64,
        ));
        g.bench_function(
            BenchmarkId::new("accumulate_f32", format!("n{n}_d{d}_b128")),
            |bch| {
                bch.iter(|| {
                    cpu::accumulate(&x, n, d, &layout, 1.0, 0.0, &mut s, &mut t, &mut ws).unwrap()
                })
            },
        );
    }

    for (b, nb) in [(128usize, 654usize), (64, 512)] {
        let s = spd_blocks(b, nb, 4);
        let mut out = vec![0.0; s.len()];
        let mut info = vec![0; nb];
        let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
        g.throughput(Throughput::Elements((nb * b * b * b) as u64));
        g.bench_function(BenchmarkId::new("invert", format!("b{b}_x{nb}")), |bch| {
            bch.iter(|| {
                cpu::invert(
                    b,
                    &s,
                    &mut out,
                    &mut info,
                    None,
                    &InvertOptions::uniform(0.03),
                    &mut ws,
                )
                .unwrap()
            })
        });
    }

    let (o, i, b) = (512usize, 4608usize, 128usize);
    let (gl, al) = (
        BlockLayout::new(o, b).unwrap(),
        BlockLayout::new(i, b).unwrap(),
    );
    let (gi, ai) = (spd_blocks(b, gl.blocks(), 5), spd_blocks(b, al.blocks(), 6));
    let grad = normal(7, o * i);
    let mut out = vec![0.0; o * i];
    let mut ws = Workspace::new(cpu::apply_workspace_size(Some(b), o, i));
    g.throughput(Throughput::Elements((2 * o * i * 2 * b) as u64));
    g.bench_function("apply/512x4608_b128", |bch| {
        bch.iter(|| {
            cpu::apply(
                Some((&gl, &gi)),
                &grad,
                Some((&al, &ai)),
                o,
                i,
                1.0,
                &mut out,
                &mut ws,
            )
            .unwrap()
        })
    });
    g.finish();
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

fn gpu_benches(c: &mut Criterion) {
    let Some((dev, blas)) = gpu("gpu benches") else {
        return;
    };
    let h = *blas.handle();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(20);
    println!("gpu benches on {}", dev.name().unwrap_or_default());

    // Split of every ResNet-50 factor with d <= 2304 (dense factors of all 108 would be 615 MB),
    // against a user's route: per block, cuBLAS geam copying the w x w diagonal block.
    let dims: Vec<usize> = resnet_dims().into_iter().filter(|&d| d <= 2304).collect();
    let layouts: Vec<BlockLayout> = dims
        .iter()
        .map(|&d| BlockLayout::new(d, 128).unwrap())
        .collect();
    let dense: Vec<CudaSlice<f32>> = dims
        .iter()
        .map(|&d| dev.upload(&normal(d as u64, d * d)).unwrap())
        .collect();
    let mut blocks: Vec<CudaSlice<f32>> = layouts
        .iter()
        .map(|l| dev.zeros(l.buffer_len()).unwrap())
        .collect();
    let bytes: usize = layouts.iter().map(|l| 2 * 4 * l.buffer_len()).sum();
    g.throughput(Throughput::Bytes(bytes as u64));
    g.bench_function("split/resnet50_d_le_2304_b128/thor", |bch| {
        bch.iter_custom(|iters| {
            device_time(&dev, iters, || {
                for ((d, l), o) in dense.iter().zip(&layouts).zip(blocks.iter_mut()) {
                    dev.split(d, l.dim(), l, o).unwrap();
                }
            })
        })
    });
    g.bench_function(
        "split/resnet50_d_le_2304_b128/cublas_geam_per_block",
        |bch| {
            bch.iter_custom(|iters| {
                device_time(&dev, iters, || {
                    for ((d, l), o) in dense.iter().zip(&layouts).zip(blocks.iter_mut()) {
                        let (dp, _r) = d.device_ptr(dev.stream());
                        let (op, _w) = o.device_ptr_mut(dev.stream());
                        let (one, zero) = (1.0f32, 0.0f32);
                        for j in 0..l.blocks() {
                            let w = l.valid(j) as i32;
                            let src = dp + 4 * (j * 128 * l.dim() + j * 128) as u64;
                            let dst = op + 4 * (j * 128 * 128) as u64;
                            // SAFETY: pointers address live allocations sized for these copies.
                            let st = unsafe {
                                cublas_sys::cublasSgeam(
                                    h,
                                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                                    w,
                                    w,
                                    &one,
                                    src as *const f32,
                                    l.dim() as i32,
                                    &zero,
                                    dst as *const f32,
                                    128,
                                    dst as *mut f32,
                                    128,
                                )
                            };
                            assert_eq!(st, cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
                        }
                    }
                })
            })
        },
    );

    // Traces of the whole ResNet-50 set (654 blocks, 108 factors) in one launch, against a
    // user's route: one cuBLAS dot of each block's diagonal with a ones vector.
    let set = FactorSet::new(128, &resnet_dims()).unwrap();
    let dset = dev.prepare_set(&set).unwrap();
    let dblocks = dev.upload(&normal(9, set.buffer_len())).unwrap();
    let mut bt = dev.zeros::<f32>(set.total_blocks()).unwrap();
    let mut ft = dev.zeros::<f32>(set.len()).unwrap();
    let ones = dev.upload(&vec![1.0f32; 128]).unwrap();
    g.throughput(Throughput::Bytes((set.total_blocks() * 128 * 4) as u64));
    g.bench_function("trace/resnet50_b128/thor", |bch| {
        bch.iter_custom(|iters| {
            device_time(&dev, iters, || {
                dev.traces(&dset, &dblocks, &mut bt, &mut ft).unwrap()
            })
        })
    });
    // SAFETY: valid handle; results go to device memory from here on.
    unsafe {
        cublas_sys::cublasSetPointerMode_v2(
            h,
            cublas_sys::cublasPointerMode_t::CUBLAS_POINTER_MODE_DEVICE,
        )
    };
    g.bench_function("trace/resnet50_b128/cublas_dot_per_block", |bch| {
        bch.iter_custom(|iters| {
            device_time(&dev, iters, || {
                let (bp, _r) = dblocks.device_ptr(dev.stream());
                let (op, _o) = ones.device_ptr(dev.stream());
                let (tp, _w) = bt.device_ptr_mut(dev.stream());
                for k in 0..set.total_blocks() {
                    // SAFETY: block k and trace slot k exist; the ones vector has 128 entries.
                    let st = unsafe {
                        cublas_sys::cublasSdot_v2(
                            h,
                            128,
                            (bp + 4 * (k * 128 * 128) as u64) as *const f32,
                            129,
                            op as *const f32,
                            1,
                            (tp + 4 * k as u64) as *mut f32,
                        )
                    };
                    assert_eq!(st, cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
                }
            })
        })
    });
    g.finish();
}

/// The route THOR's reference GPU code takes, with everything prepared outside the timed
/// region except what the route itself must do each time: copy S (potrf works in place),
/// reset the right-hand sides to I, potrfBatched, trsmBatched (L Y = I), then
/// gemmStridedBatched (X = Y^T Y).
struct CusolverRoute {
    solver: cudarc::cusolver::safe::DnHandle,
    work: CudaSlice<f32>,
    y: CudaSlice<f32>,
    eye: CudaSlice<f32>,
    x: CudaSlice<f32>,
    a_ptrs: CudaSlice<u64>,
    y_ptrs: CudaSlice<u64>,
    info: CudaSlice<i32>,
}

impl CusolverRoute {
    fn new(dev: &CudaDevice, b: usize, nb: usize) -> Self {
        let solver = cudarc::cusolver::safe::DnHandle::new(dev.stream().clone()).expect("cuSOLVER");
        let work = dev.zeros::<f32>(nb * b * b).unwrap();
        let y = dev.zeros::<f32>(nb * b * b).unwrap();
        let mut eye_h = vec![0.0f32; nb * b * b];
        for j in 0..nb {
            for i in 0..b {
                eye_h[j * b * b + i * b + i] = 1.0;
            }
        }
        let eye = dev.upload(&eye_h).unwrap();
        let x = dev.zeros::<f32>(nb * b * b).unwrap();
        let base = |s: &CudaSlice<f32>| s.device_ptr(dev.stream()).0;
        let (wb, yb) = (base(&work), base(&y));
        let stride = (4 * b * b) as u64;
        let a_ptrs = dev
            .upload(&(0..nb as u64).map(|j| wb + j * stride).collect::<Vec<_>>())
            .unwrap();
        let y_ptrs = dev
            .upload(&(0..nb as u64).map(|j| yb + j * stride).collect::<Vec<_>>())
            .unwrap();
        let info = dev.zeros::<i32>(nb).unwrap();
        Self {
            solver,
            work,
            y,
            eye,
            x,
            a_ptrs,
            y_ptrs,
            info,
        }
    }

    /// Queues the route once; false when a library call refused the problem.
    fn run(
        &mut self,
        dev: &CudaDevice,
        blas: cublas_sys::cublasHandle_t,
        input: &CudaSlice<f32>,
        b: usize,
        nb: usize,
    ) -> bool {
        use cudarc::cusolver::sys as sol;
        let s = dev.stream();
        let bytes = 4 * nb * b * b;
        let (ip, _a) = input.device_ptr(s);
        let (wp, _b) = self.work.device_ptr_mut(s);
        let (yp, _c) = self.y.device_ptr_mut(s);
        let (ep, _d) = self.eye.device_ptr(s);
        let (xp, _e) = self.x.device_ptr_mut(s);
        let (ap, _f) = self.a_ptrs.device_ptr(s);
        let (pp, _g) = self.y_ptrs.device_ptr(s);
        let (fp, _h) = self.info.device_ptr_mut(s);
        let (one, zero) = (1.0f32, 0.0f32);
        let n = b as i32;
        // SAFETY: every pointer addresses a live allocation sized for nb blocks of b x b.
        unsafe {
            drv::cuMemcpyDtoDAsync_v2(wp, ip, bytes, s.cu_stream())
                .result()
                .expect("copy S");
            drv::cuMemcpyDtoDAsync_v2(yp, ep, bytes, s.cu_stream())
                .result()
                .expect("copy I");
            let st = sol::cusolverDnSpotrfBatched(
                self.solver.cu(),
                sol::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                n,
                ap as *mut *mut f32,
                n,
                fp as *mut i32,
                nb as i32,
            );
            if st != sol::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
                return false;
            }
            let st = cublas_sys::cublasStrsmBatched(
                blas,
                cublas_sys::cublasSideMode_t::CUBLAS_SIDE_LEFT,
                cublas_sys::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                cublas_sys::cublasDiagType_t::CUBLAS_DIAG_NON_UNIT,
                n,
                n,
                &one,
                ap as *const *const f32,
                n,
                pp as *const *mut f32,
                n,
                nb as i32,
            );
            if st != cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
                return false;
            }
            let stride = (b * b) as i64;
            let st = cublas_sys::cublasSgemmStridedBatched(
                blas,
                cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                n,
                n,
                &one,
                yp as *const f32,
                n,
                stride,
                yp as *const f32,
                n,
                stride,
                &zero,
                xp as *mut f32,
                n,
                stride,
                nb as i32,
            );
            st == cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS
        }
    }
}

fn gpu_invert_benches(c: &mut Criterion) {
    let Some((dev, blas)) = gpu("gpu invert benches") else {
        return;
    };
    let h = *blas.handle();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(20);
    let resnet_blocks = FactorSet::new(128, &resnet_dims()).unwrap().total_blocks();
    for (b, nb) in [
        (128usize, 2048usize),
        (128, 64),
        (64, 2048),
        (256, 512),
        (32, 4096),
        (128, resnet_blocks),
    ] {
        let input = dev.upload(&spd_blocks(b, nb, 11)).unwrap();
        let mut out = dev.zeros::<f32>(nb * b * b).unwrap();
        let mut info = dev.zeros::<i32>(nb).unwrap();
        let opts = thor_kernels::cuda::DeviceInvertOptions::uniform(0.03);
        // Effective rate: b^3 flops per block.
        g.throughput(Throughput::Elements((nb * b * b * b) as u64));
        let id = format!("invert/b{b}_x{nb}");
        g.bench_function(format!("{id}/thor"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&dev, iters, || {
                    dev.invert(b, &input, &mut out, &mut info, None, &opts)
                        .unwrap()
                })
            })
        });
        let mut route = CusolverRoute::new(&dev, b, nb);
        if !route.run(&dev, h, &input, b, nb) {
            println!("SKIPPED {id}/cusolver_potrf_trsm_gemm: a library call refused b = {b}");
            continue;
        }
        g.bench_function(format!("{id}/cusolver_potrf_trsm_gemm"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&dev, iters, || {
                    route.run(&dev, h, &input, b, nb);
                })
            })
        });
    }
    g.finish();
}

/// One grouped accumulation of `xs` (row stride = dimension, alpha 1, beta 0).
#[allow(clippy::too_many_arguments)]
fn acc_call<E: thor_kernels::cuda::accumulate::DeviceElement>(
    dev: &CudaDevice,
    acc: &mut thor_kernels::cuda::accumulate::DeviceAccumulate,
    xs: &[CudaSlice<E>],
    dims: &[usize],
    blocks: &mut CudaSlice<f32>,
    bt: &mut CudaSlice<f32>,
    ft: &mut CudaSlice<f32>,
    status: &mut CudaSlice<i32>,
) {
    use thor_kernels::cuda::accumulate::DeviceInput;
    let inp: Vec<DeviceInput<'_, E>> = xs
        .iter()
        .zip(dims)
        .map(|(x, &d)| DeviceInput {
            x: x.as_view(),
            ld: d,
            alpha: 1.0,
            beta: 0.0,
        })
        .collect();
    dev.accumulate(acc, &inp, blocks, bt, ft, status).unwrap();
}

/// One grouped accumulation workload on the device: inputs, plan and outputs.
struct AccCase {
    set: FactorSet,
    rows: Vec<usize>,
    xs32: Vec<CudaSlice<f32>>,
    xs16: Vec<CudaSlice<half::bf16>>,
    blocks: CudaSlice<f32>,
    bt: CudaSlice<f32>,
    ft: CudaSlice<f32>,
    status: CudaSlice<i32>,
}

/// `n` values cycling through a fixed normal sample (gigabytes of input are filled in
/// seconds; the values do not matter for timing).
fn filler(pattern: &[f32], n: usize, offset: usize) -> Vec<f32> {
    (0..n)
        .map(|i| pattern[(i + offset) % pattern.len()])
        .collect()
}

impl AccCase {
    fn new(dev: &CudaDevice, b: usize, dims: &[usize], rows: &[usize]) -> Self {
        let set = FactorSet::new(b, dims).unwrap();
        let pattern = normal(3, (1 << 20) + 7);
        let xs32: Vec<CudaSlice<f32>> = dims
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(i, (&d, &n))| dev.upload(&filler(&pattern, n * d, 977 * i)).unwrap())
            .collect();
        let xs16 = dims
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(i, (&d, &n))| {
                let v: Vec<half::bf16> = filler(&pattern, n * d, 977 * i)
                    .into_iter()
                    .map(half::bf16::from_f32)
                    .collect();
                dev.upload(&v).unwrap()
            })
            .collect();
        AccCase {
            blocks: dev.zeros(set.buffer_len()).unwrap(),
            bt: dev.zeros(set.total_blocks()).unwrap(),
            ft: dev.zeros(set.len()).unwrap(),
            status: dev.zeros(set.len()).unwrap(),
            rows: rows.to_vec(),
            set,
            xs32,
            xs16,
        }
    }

    /// Bytes of f32 input read once.
    fn input_bytes(&self, elem: usize) -> u64 {
        self.set
            .entries()
            .iter()
            .zip(&self.rows)
            .map(|(e, &n)| (n * e.layout.dim() * elem) as u64)
            .sum()
    }

    fn bench(
        &mut self,
        dev: &CudaDevice,
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        id: &str,
    ) {
        use thor_kernels::cuda::accumulate::AccumulateMode;
        for (label, mode, bf16) in [
            ("thor_f32", AccumulateMode::F32, false),
            ("thor_tf32", AccumulateMode::TensorCore, false),
            ("thor_bf16_input", AccumulateMode::TensorCore, true),
        ] {
            let dtype = if bf16 {
                thor_kernels::DType::BF16
            } else {
                thor_kernels::DType::F32
            };
            let mut acc = dev
                .plan_accumulate(&self.set, &self.rows, dtype, mode)
                .unwrap();
            g.throughput(Throughput::Bytes(self.input_bytes(if bf16 {
                2
            } else {
                4
            })));
            let Self {
                set,
                xs32,
                xs16,
                blocks,
                bt,
                ft,
                status,
                ..
            } = self;
            let dims: Vec<usize> = set.entries().iter().map(|e| e.layout.dim()).collect();
            g.bench_function(format!("{id}/{label}"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(dev, iters, || {
                        if bf16 {
                            acc_call(dev, &mut acc, xs16, &dims, blocks, bt, ft, status);
                        } else {
                            acc_call(dev, &mut acc, xs32, &dims, blocks, bt, ft, status);
                        }
                    })
                })
            });
        }
    }

    /// The user's route: per factor, cuBLAS strided-batched GEMM over the diagonal column
    /// slices of X (A_j = X + j b, leading dimension d; no copies), f32 or TF32 math.
    fn bench_cublas(
        &mut self,
        dev: &CudaDevice,
        h: cublas_sys::cublasHandle_t,
        g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        id: &str,
    ) {
        let b = self.set.block();
        // Full blocks only (the baseline has no padding logic): floor(d / b) slices.
        let mut outs: Vec<CudaSlice<f32>> = self
            .set
            .entries()
            .iter()
            .map(|e| dev.zeros((e.layout.dim() / b).max(1) * b * b).unwrap())
            .collect();
        g.throughput(Throughput::Bytes(self.input_bytes(4)));
        for (label, compute) in [
            (
                "cublas_gemm_strided_batched_f32",
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ),
            (
                "cublas_gemm_strided_batched_tf32",
                cublas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            ),
        ] {
            let s = dev.stream().clone();
            let ptrs: Vec<(u64, usize, usize)> = self
                .xs32
                .iter()
                .zip(self.set.entries())
                .zip(&self.rows)
                .map(|((x, e), &n)| (x.device_ptr(&s).0, e.layout.dim(), n))
                .collect();
            let optrs: Vec<u64> = outs.iter_mut().map(|o| o.device_ptr_mut(&s).0).collect();
            g.bench_function(format!("{id}/{label}"), |bch| {
                bch.iter_custom(|iters| {
                    device_time(dev, iters, || {
                        for (&(xp, d, n), &op) in ptrs.iter().zip(&optrs) {
                            let nb = d / b;
                            if nb == 0 {
                                continue;
                            }
                            let (one, zero) = (1.0f32, 0.0f32);
                            // SAFETY: X is n x d row-major (column-major d x n, ld d); slice j
                            // is b rows of that at offset j b; outputs b x b each.
                            let st = unsafe {
                                cublas_sys::cublasGemmStridedBatchedEx(
                                    h,
                                    cublas_sys::cublasOperation_t::CUBLAS_OP_N,
                                    cublas_sys::cublasOperation_t::CUBLAS_OP_T,
                                    b as i32,
                                    b as i32,
                                    n as i32,
                                    &one as *const f32 as *const _,
                                    xp as *const _,
                                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                                    d as i32,
                                    b as i64,
                                    xp as *const _,
                                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                                    d as i32,
                                    b as i64,
                                    &zero as *const f32 as *const _,
                                    op as *mut _,
                                    cublas_sys::cudaDataType_t::CUDA_R_32F,
                                    b as i32,
                                    (b * b) as i64,
                                    nb as i32,
                                    compute,
                                    cublas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                                )
                            };
                            assert_eq!(st, cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
                        }
                    })
                })
            });
        }
    }
}

fn gpu_accumulate_benches(c: &mut Criterion) {
    let Some((dev, blas)) = gpu("gpu accumulate benches") else {
        return;
    };
    let h = *blas.handle();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(10);
    // One large factor: N = 8192, d = 4608, b = 128.
    let mut big = AccCase::new(&dev, 128, &[4608], &[8192]);
    big.bench(&dev, &mut g, "accumulate/n8192_d4608_b128");
    big.bench_cublas(&dev, h, &mut g, "accumulate/n8192_d4608_b128");
    // The same as a dense SYRK (whole factor, the dense mode).
    let mut dense = dev.zeros::<f32>(4608 * 4608).unwrap();
    g.throughput(Throughput::Bytes(big.input_bytes(4)));
    g.bench_function("accumulate/n8192_d4608_b128/cublas_ssyrk_dense", |bch| {
        bch.iter_custom(|iters| {
            device_time(&dev, iters, || {
                dev.accumulate_dense(&big.xs32[0], 8192, 4608, 4608, 1.0, 0.0, &mut dense, 4608)
                    .unwrap()
            })
        })
    });
    drop(big);
    drop(dense);
    // A ResNet-50 3x3 conv A factor at batch 32.
    let mut conv = AccCase::new(&dev, 128, &[576], &[100_352]);
    conv.bench(&dev, &mut g, "accumulate/n100352_d576_b128");
    conv.bench_cublas(&dev, h, &mut g, "accumulate/n100352_d576_b128");
    drop(conv);
    // All 108 factors of ResNet-50 at batch 32 in one grouped call.
    let layers = shapes::resnet50();
    let dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
    let rows: Vec<usize> = layers
        .iter()
        .flat_map(|l| [l.rows(32), l.rows(32)])
        .collect();
    let mut rn = AccCase::new(&dev, 128, &dims, &rows);
    rn.bench(&dev, &mut g, "accumulate/resnet50_108_factors_b128");
    rn.bench_cublas(&dev, h, &mut g, "accumulate/resnet50_108_factors_b128");
    g.finish();
}

/// 2D device copy of `height` rows of `width` f32 between pitched buffers (elements).
fn copy2d(
    dev: &CudaDevice,
    src: u64,
    src_pitch: usize,
    dst: u64,
    dst_pitch: usize,
    width: usize,
    height: usize,
) {
    // SAFETY: plain-old-data descriptor; the caller's buffers hold the rows described.
    let mut c: drv::CUDA_MEMCPY2D = unsafe { std::mem::zeroed() };
    c.srcMemoryType = drv::CUmemorytype::CU_MEMORYTYPE_DEVICE;
    c.srcDevice = src;
    c.srcPitch = src_pitch * 4;
    c.dstMemoryType = drv::CUmemorytype::CU_MEMORYTYPE_DEVICE;
    c.dstDevice = dst;
    c.dstPitch = dst_pitch * 4;
    c.WidthInBytes = width * 4;
    c.Height = height;
    // SAFETY: as above; queued on the device's stream.
    let r = unsafe { drv::cuMemcpy2DAsync_v2(&c, dev.stream().cu_stream()) };
    assert_eq!(r, drv::CUresult::CUDA_SUCCESS);
}

/// The user's route for one layer: pad the gradient into a zeroed `[nbo b, nba b]` buffer,
/// `T = blockdiag(Ginv) P` and `O = T blockdiag(Ainv)` as two strided-batched GEMMs, crop.
#[allow(clippy::too_many_arguments)]
fn apply_baseline_layer(
    dev: &CudaDevice,
    h: cublas_sys::cublasHandle_t,
    b: usize,
    (out_dim, in_dim): (usize, usize),
    (ginv, ainv): (u64, u64),
    grad: u64,
    (pad, tmp, outp): (u64, u64, u64),
    out: u64,
    scale: f32,
) {
    let (po, pi) = (out_dim.div_ceil(b) * b, in_dim.div_ceil(b) * b);
    // SAFETY: `pad` holds po * pi f32.
    let r = unsafe { drv::cuMemsetD32Async(pad, 0, po * pi, dev.stream().cu_stream()) };
    assert_eq!(r, drv::CUresult::CUDA_SUCCESS);
    copy2d(dev, grad, in_dim, pad, pi, in_dim, out_dim);
    let zero = 0.0f32;
    let one = 1.0f32;
    // Column-major view: P^T is pi x po (ld pi). T_i^T = P_i^T Ginv_i (Ginv symmetric).
    // SAFETY: sizes as described; all buffers on this device.
    let st = unsafe {
        cublas_sys::cublasSgemmStridedBatched(
            h,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            pi as i32,
            b as i32,
            b as i32,
            &scale,
            pad as *const f32,
            pi as i32,
            (b * pi) as i64,
            ginv as *const f32,
            b as i32,
            (b * b) as i64,
            &zero,
            tmp as *mut f32,
            pi as i32,
            (b * pi) as i64,
            (po / b) as i32,
        )
    };
    assert_eq!(st, cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    // O^T rows j b .. (column block j of O): O^T_j = Ainv_j T^T_j, b x po, ld pi.
    // SAFETY: as above.
    let st = unsafe {
        cublas_sys::cublasSgemmStridedBatched(
            h,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            cublas_sys::cublasOperation_t::CUBLAS_OP_N,
            b as i32,
            po as i32,
            b as i32,
            &one,
            ainv as *const f32,
            b as i32,
            (b * b) as i64,
            tmp as *const f32,
            pi as i32,
            b as i64,
            &zero,
            outp as *mut f32,
            pi as i32,
            b as i64,
            (pi / b) as i32,
        )
    };
    assert_eq!(st, cublas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS);
    copy2d(dev, outp, pi, out, in_dim, in_dim, out_dim);
}

fn gpu_apply_benches(c: &mut Criterion) {
    use thor_kernels::cuda::apply::ApplyLayer;
    let Some((dev, blas)) = gpu("gpu apply benches") else {
        return;
    };
    let h = *blas.handle();
    let mut g = c.benchmark_group("gpu");
    g.sample_size(20);
    let b = 128;
    let shapes = shapes::resnet50();
    let dims: Vec<usize> = shapes.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
    let set = FactorSet::new(b, &dims).unwrap();
    let layers: Vec<ApplyLayer> = shapes
        .iter()
        .enumerate()
        .map(|(l, s)| ApplyLayer {
            out_dim: s.d_g,
            in_dim: s.d_a,
            g_factor: Some(2 * l + 1),
            a_factor: Some(2 * l),
        })
        .collect();
    let inv = dev.upload(&spd_blocks(b, set.total_blocks(), 5)).unwrap();
    let grads: Vec<CudaSlice<f32>> = layers
        .iter()
        .enumerate()
        .map(|(l, x)| dev.upload(&normal(l as u64, x.out_dim * x.in_dim)).unwrap())
        .collect();
    let mut outs: Vec<CudaSlice<f32>> = layers
        .iter()
        .map(|x| dev.zeros(x.out_dim * x.in_dim).unwrap())
        .collect();
    let scales = vec![1.0f32; layers.len()];
    let mut plan = dev
        .plan_apply(&set, &layers, thor_kernels::DType::F32)
        .unwrap();
    // Effective rate: 2 b flops per gradient element and side.
    let flops: usize = layers.iter().map(|x| 4 * b * x.out_dim * x.in_dim).sum();
    g.throughput(Throughput::Elements(flops as u64));
    let views: Vec<_> = grads.iter().map(|g| g.as_view()).collect();
    let mut apply = |outs: &mut [CudaSlice<f32>]| {
        let mut ov: Vec<_> = outs.iter_mut().map(|o| o.as_view_mut()).collect();
        dev.apply(&mut plan, &inv, &views, &mut ov, &scales)
            .unwrap()
    };
    g.bench_function("apply/resnet50_54_layers_b128/thor", |bch| {
        bch.iter_custom(|iters| device_time(&dev, iters, || apply(&mut outs)))
    });
    // Baseline buffers (padded gradient, intermediate, padded output) per layer.
    let s = dev.stream().clone();
    let pads: Vec<[CudaSlice<f32>; 3]> = layers
        .iter()
        .map(|x| {
            let n = x.out_dim.div_ceil(b) * b * x.in_dim.div_ceil(b) * b;
            [
                dev.zeros(n).unwrap(),
                dev.zeros(n).unwrap(),
                dev.zeros(n).unwrap(),
            ]
        })
        .collect();
    let mut base_outs: Vec<CudaSlice<f32>> = layers
        .iter()
        .map(|x| dev.zeros(x.out_dim * x.in_dim).unwrap())
        .collect();
    let (ip, _i) = inv.device_ptr(&s);
    let ptrs: Vec<_> = layers
        .iter()
        .zip(&grads)
        .zip(&pads)
        .zip(base_outs.iter_mut())
        .enumerate()
        .map(|(l, (((x, gr), p), o))| {
            let e = |f: usize| ip + (set.entries()[f].first_block * b * b * 4) as u64;
            (
                (x.out_dim, x.in_dim),
                (e(2 * l + 1), e(2 * l)),
                gr.device_ptr(&s).0,
                (
                    p[0].device_ptr(&s).0,
                    p[1].device_ptr(&s).0,
                    p[2].device_ptr(&s).0,
                ),
                o.device_ptr_mut(&s).0,
            )
        })
        .collect();
    let run_base = || {
        for &(shape, sides, gp, bufs, op) in &ptrs {
            apply_baseline_layer(&dev, h, b, shape, sides, gp, bufs, op, 1.0);
        }
    };
    // The baseline computes the same thing: check once before timing.
    run_base();
    apply(&mut outs);
    for l in [0, layers.len() / 2, layers.len() - 1] {
        let (a, c2) = (
            dev.download(&outs[l]).unwrap(),
            dev.download(&base_outs[l]).unwrap(),
        );
        let num: f64 = a
            .iter()
            .zip(&c2)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum();
        let den: f64 = c2.iter().map(|y| (*y as f64).powi(2)).sum();
        assert!(
            (num / den).sqrt() < 1e-4,
            "baseline and kernel disagree on layer {l}"
        );
    }
    g.bench_function(
        "apply/resnet50_54_layers_b128/cublas_pad_gemm_strided_batched_crop",
        |bch| bch.iter_custom(|iters| device_time(&dev, iters, run_base)),
    );
    g.finish();
}

criterion_group!(
    benches,
    cpu_benches,
    gpu_benches,
    gpu_invert_benches,
    gpu_accumulate_benches,
    gpu_apply_benches
);
criterion_main!(benches);
