//! GPU batched inversion against cuSOLVER potrfBatched + cuBLAS trsmBatched + gemmStridedBatched.

use super::*;

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

pub(crate) fn gpu_invert_benches(c: &mut Criterion) {
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
        // The kernel chosen for this card ("thor"), and every kernel for this b by name.
        g.bench_function(format!("{id}/thor"), |bch| {
            bch.iter_custom(|iters| {
                device_time(&dev, iters, || {
                    dev.invert(b, &input, &mut out, &mut info, None, &opts)
                        .unwrap()
                })
            })
        });
        for k in thor_kernels::cuda::raw::InvertKernel::ALL {
            if !k.supports(b) {
                continue;
            }
            g.bench_function(format!("{id}/thor_{}", k.name()), |bch| {
                bch.iter_custom(|iters| {
                    device_time(&dev, iters, || {
                        dev.invert_with(k, b, &input, &mut out, &mut info, &opts)
                            .unwrap()
                    })
                })
            });
        }
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
