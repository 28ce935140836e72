//! GPU grouped accumulation against cuBLAS gemmStridedBatched over the diagonal slices and SYRK.

use super::*;

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
            layout: thor_kernels::InputLayout::matrix(x.len() / d, d),
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
        use thor_kernels::cuda::accumulate::{AccumulateKernel, AccumulateMode};
        let cases = [
            ("thor_f32", AccumulateMode::F32, false),
            ("thor_tf32", AccumulateMode::TensorCore, false),
            ("thor_bf16_input", AccumulateMode::TensorCore, true),
        ];
        // Both kernel families side by side (the block kernels at b = 64 and 128 only;
        // their F32 mode is 3xTF32 on tensor cores).
        let b = self.set.block();
        for (kernel, (label, mode, bf16)) in AccumulateKernel::ALL
            .into_iter()
            .filter(|k| k.supports(b))
            .flat_map(|k| cases.map(|c| (k, c)))
        {
            let label = match kernel {
                AccumulateKernel::Tiles => label.to_string(),
                _ => format!("{label}_{}", kernel.name()),
            };
            let dtype = if bf16 {
                thor_kernels::DType::BF16
            } else {
                thor_kernels::DType::F32
            };
            let mut acc = dev
                .plan_accumulate_with(&self.set, &self.rows, dtype, mode, kernel)
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

pub(crate) fn gpu_accumulate_benches(c: &mut Criterion) {
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
    drop(rn);
    bench_conv_a(&dev, &mut g);
    g.finish();
}

/// The A factors of ResNet-50's 53 convolutions at batch 32 in one grouped call, read from
/// their NCHW input tensors (implicit im2col, no patch storage), against the same call on
/// patch matrices formed beforehand (what a user's unfold gives: 2.8 GB here).
fn bench_conv_a(
    dev: &CudaDevice,
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
) {
    use thor_kernels::cuda::accumulate::{AccumulateMode, DeviceInput};
    use thor_kernels::{InputLayout, Patches, TensorLayout};
    let views: Vec<Patches> = shapes::resnet50()
        .iter()
        .filter_map(|l| l.conv)
        .map(|geom| Patches::new(geom, 32, TensorLayout::Nchw))
        .collect();
    let dims: Vec<usize> = views.iter().map(|p| p.dim()).collect();
    let rows: Vec<usize> = views.iter().map(|p| p.rows()).collect();
    let set = FactorSet::new(128, &dims).unwrap();
    let pattern = normal(5, (1 << 20) + 7);
    let tensors: Vec<CudaSlice<f32>> = views
        .iter()
        .enumerate()
        .map(|(i, p)| {
            dev.upload(&filler(&pattern, p.span().unwrap(), 977 * i))
                .unwrap()
        })
        .collect();
    let tensor_bytes: u64 = views.iter().map(|p| 4 * p.span().unwrap() as u64).sum();
    let mut blocks = dev.zeros::<f32>(set.buffer_len()).unwrap();
    let mut bt = dev.zeros::<f32>(set.total_blocks()).unwrap();
    let mut ft = dev.zeros::<f32>(set.len()).unwrap();
    let mut status = dev.zeros::<i32>(set.len()).unwrap();
    let id = "accumulate/resnet50_53_conv_a_b128";
    g.throughput(Throughput::Bytes(tensor_bytes));
    for (label, mode) in [
        ("implicit_nchw_f32", AccumulateMode::F32),
        ("implicit_nchw_tf32", AccumulateMode::TensorCore),
    ] {
        let mut acc = dev
            .plan_accumulate(&set, &rows, thor_kernels::DType::F32, mode)
            .unwrap();
        let inputs: Vec<DeviceInput<'_, f32>> = tensors
            .iter()
            .zip(&views)
            .map(|(t, &p)| DeviceInput {
                x: t.as_view(),
                layout: InputLayout::Patches(p),
                alpha: 1.0,
                beta: 0.0,
            })
            .collect();
        g.bench_function(format!("{id}/{label}"), |bch| {
            bch.iter_custom(|iters| {
                device_time(dev, iters, || {
                    dev.accumulate(
                        &mut acc,
                        &inputs,
                        &mut blocks,
                        &mut bt,
                        &mut ft,
                        &mut status,
                    )
                    .unwrap()
                })
            })
        });
    }
    drop(tensors);
    // The same factors from patch matrices formed beforehand (thor_f32, thor_tf32, ...).
    let mut explicit = AccCase::new(dev, 128, &dims, &rows);
    explicit.bench(dev, g, &format!("{id}/on_patch_matrices"));
}
