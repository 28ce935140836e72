//! GPU split and traces against cuBLAS geam / dot per block.

use super::*;

pub(crate) fn gpu_benches(c: &mut Criterion) {
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
