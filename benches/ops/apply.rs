//! GPU preconditioner apply against pad + two cuBLAS strided-batched GEMMs + crop per layer.

use super::*;

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

pub(crate) fn gpu_apply_benches(c: &mut Criterion) {
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
    // Every kernel by name beside the chosen one ("thor").
    for kernel in thor_kernels::cuda::apply::ApplyKernel::ALL {
        let mut kplan = dev
            .plan_apply_with(&set, &layers, thor_kernels::DType::F32, kernel)
            .unwrap();
        g.bench_function(
            format!("apply/resnet50_54_layers_b128/thor_{}", kernel.name()),
            |bch| {
                bch.iter_custom(|iters| {
                    device_time(&dev, iters, || {
                        let mut ov: Vec<_> = outs.iter_mut().map(|o| o.as_view_mut()).collect();
                        dev.apply(&mut kplan, &inv, &views, &mut ov, &scales)
                            .unwrap()
                    })
                })
            },
        );
    }
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
