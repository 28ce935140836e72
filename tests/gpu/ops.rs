//! Split, merge, traces, raw launchers on borrowed streams, shape checks, stream adoption.

use super::*;

fn run_split_merge(dev: &CudaDevice, label: &str) {
    for b in SUPPORTED_BLOCK_SIZES {
        for d in [1, b - 1, b, b + 1, 3 * b + 5] {
            let mut r = rng((b * 7 + d) as u64);
            let layout = BlockLayout::new(d, b).unwrap();
            let ld = d + 5;
            let dense = normal(&mut r, d * ld);
            let tight: Vec<f32> = (0..d * d).map(|k| dense[(k / d) * ld + k % d]).collect();
            let want = reference::split(&f64s(&tight), &layout).unwrap();
            let ddense = dev.upload(&dense).unwrap();
            let mut dblocks = dev.upload(&poisoned(layout.buffer_len())).unwrap();
            dev.split(&ddense, ld, &layout, &mut dblocks).unwrap();
            let got = dev.download(&dblocks).unwrap();
            assert_eq!(rel_err(&got, &want), 0.0, "{label} split b={b} d={d}");
            let mut dmerged = dev.upload(&poisoned(d * ld)).unwrap();
            dev.merge(&dblocks, &layout, &mut dmerged, ld).unwrap();
            let merged = dev.download(&dmerged).unwrap();
            let merged_tight: Vec<f32> = (0..d * d).map(|k| merged[(k / d) * ld + k % d]).collect();
            let want = reference::merge(&want, &layout).unwrap();
            assert_eq!(
                rel_err(&merged_tight, &want),
                0.0,
                "{label} merge b={b} d={d}"
            );
            // Elements past each row's d were not ours to write: still NaN.
            assert!(
                (0..d).all(|row| merged[row * ld + d..row * ld + ld.min(d + 5)]
                    .iter()
                    .all(|v| v.is_nan()))
            );
        }
    }
}

#[test]
fn gpu_split_and_merge_match_reference() {
    let Some(dev) = gpu_or_skip("gpu_split_and_merge_match_reference") else {
        return;
    };
    run_split_merge(&dev, "fatbin/auto");
}

#[test]
fn gpu_nvrtc_kernels_match_reference() {
    let Some(mut dev) = gpu_or_skip("gpu_nvrtc_kernels_match_reference") else {
        return;
    };
    if !thor_kernels::cuda::nvrtc_present() {
        if std::env::var("THOR_REQUIRE_NVRTC").is_ok_and(|v| v == "1") {
            panic!("THOR_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded");
        }
        skip_note!("SKIPPED gpu_nvrtc_kernels_match_reference: libnvrtc not found");
        return;
    }
    dev.set_kernel_source(KernelSource::Nvrtc);
    run_split_merge(&dev, "nvrtc");
    run_traces(&dev, 64, &[1, 63, 64, 65, 197]);
}

fn run_traces(dev: &CudaDevice, b: usize, dims: &[usize]) {
    let set = FactorSet::new(b, dims).unwrap();
    let mut r = rng(b as u64 + dims.len() as u64);
    let blocks = normal(&mut r, set.buffer_len());
    let dset = dev.prepare_set(&set).unwrap();
    let dblocks = dev.upload(&blocks).unwrap();
    let mut bt = dev.upload(&poisoned(set.total_blocks())).unwrap();
    let mut ft = dev.upload(&poisoned(set.len())).unwrap();
    dev.traces(&dset, &dblocks, &mut bt, &mut ft).unwrap();
    let (bt, ft) = (dev.download(&bt).unwrap(), dev.download(&ft).unwrap());
    let wb = reference::block_traces(&f64s(&blocks), b).unwrap();
    let wf = reference::factor_traces(&set, &f64s(&blocks)).unwrap();
    // Sums of standard normals: absolute error at f32 resolution of the magnitudes summed.
    for (k, (g, w)) in bt.iter().zip(&wb).enumerate() {
        assert!(
            approx::abs_diff_eq!(*g as f64, *w, epsilon = 1e-5 * b as f64),
            "block {k}: {g} vs {w}"
        );
    }
    for (f, (g, w)) in ft.iter().zip(&wf).enumerate() {
        let d = set.entries()[f].layout.dim() as f64;
        assert!(
            approx::abs_diff_eq!(*g as f64, *w, epsilon = 1e-5 * d.max(1.0)),
            "factor {f}: {g} vs {w}"
        );
    }
}

#[test]
fn gpu_traces_match_reference() {
    let Some(dev) = gpu_or_skip("gpu_traces_match_reference") else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        run_traces(&dev, b, &[1, b - 1, b, b + 1, 3 * b + 5]);
    }
    // The ResNet-50 shape set: 108 factors, 654 blocks at b = 128, one launch.
    let dims: Vec<usize> = shapes::resnet50()
        .iter()
        .flat_map(|l| [l.d_a, l.d_g])
        .collect();
    run_traces(&dev, 128, &dims);
}

#[test]
fn gpu_borrowed_stream_and_raw_pointers() {
    let Some(owner) = gpu_or_skip("gpu_borrowed_stream_and_raw_pointers") else {
        return;
    };
    // Another framework's stream, in the same primary context.
    let foreign = owner.context_handle().new_stream().unwrap();
    // SAFETY: `foreign` is a live stream of device 0's primary context and outlives `dev`.
    let dev = unsafe { CudaDevice::wrap_borrowed_stream(0, foreign.cu_stream()) }.unwrap();
    let layout = BlockLayout::new(100, 64).unwrap();
    let mut r = rng(5);
    let dense = normal(&mut r, 100 * 100);
    let want = reference::split(&f64s(&dense), &layout).unwrap();
    let ddense = foreign.clone_htod(&dense).unwrap();
    let mut dblocks = foreign.clone_htod(&poisoned(layout.buffer_len())).unwrap();
    {
        let (dp, _r) = ddense.device_ptr(&foreign);
        let (bp, _w) = dblocks.device_ptr_mut(&foreign);
        // SAFETY: both allocations are live, sized for the layout and distinct.
        unsafe { raw::split_blocks_f32(&dev, dp, 100, &layout, bp) }.unwrap();
        // Null and misaligned pointers are errors, not launches.
        // SAFETY: the launcher rejects these before any launch.
        let e = unsafe { raw::split_blocks_f32(&dev, 0, 100, &layout, bp) }.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "dense", .. }),
            "{e}"
        );
        // SAFETY: as above.
        let e = unsafe { raw::split_blocks_f32(&dev, dp + 2, 100, &layout, bp) }.unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "dense", .. }),
            "{e}"
        );
    }
    foreign.synchronize().unwrap();
    let got = foreign.clone_dtoh(&dblocks).unwrap();
    assert_eq!(rel_err(&got, &want), 0.0);
}

#[test]
fn gpu_rejects_bad_shapes_before_launch() {
    let Some(dev) = gpu_or_skip("gpu_rejects_bad_shapes_before_launch") else {
        return;
    };
    let layout = BlockLayout::new(40, 32).unwrap();
    let dense = dev.upload(&vec![1.0f32; 40 * 40 - 1]).unwrap();
    let mut out = dev.upload(&vec![3.0f32; layout.buffer_len()]).unwrap();
    assert!(matches!(
        dev.split(&dense, 40, &layout, &mut out),
        Err(Error::Shape { arg: "dense", .. })
    ));
    let dense = dev.upload(&vec![1.0f32; 40 * 40]).unwrap();
    assert!(matches!(
        dev.split(&dense, 39, &layout, &mut out),
        Err(Error::Shape { arg: "ld", .. })
    ));
    let set = FactorSet::new(32, &[40]).unwrap();
    let dset = dev.prepare_set(&set).unwrap();
    let mut bt = dev.zeros::<f32>(1).unwrap();
    let mut ft = dev.zeros::<f32>(1).unwrap();
    assert!(matches!(
        dev.traces(&dset, &out, &mut bt, &mut ft),
        Err(Error::Shape {
            arg: "block_traces",
            ..
        })
    ));
    assert!(dev.download(&out).unwrap().iter().all(|&v| v == 3.0));
}

/// A framework's stream adopted with `from_stream`: buffers it allocated are used by the
/// library's ops on that same stream, in order, with no copy; a buffer of another context is
/// refused.
#[test]
fn gpu_from_stream_shares_a_framework_stream() {
    let Some(owner) = gpu_or_skip("gpu_from_stream_shares_a_framework_stream") else {
        return;
    };
    let framework = owner.context_handle().new_stream().unwrap();
    let dev = CudaDevice::from_stream(framework.clone()).unwrap();
    assert!(std::sync::Arc::ptr_eq(dev.stream(), &framework));
    let (d, b) = (70usize, 32usize);
    let layout = BlockLayout::new(d, b).unwrap();
    let mut r = rng(77);
    let dense = normal(&mut r, d * d);
    // Allocated and filled by the framework on its stream; consumed by the library there.
    let x = framework.clone_htod(&dense).unwrap();
    let mut out = framework
        .clone_htod(&poisoned(layout.buffer_len()))
        .unwrap();
    dev.split(&x, d, &layout, &mut out).unwrap();
    let got = framework.clone_dtoh(&out).unwrap();
    let want = reference::split(&f64s(&dense), &layout).unwrap();
    assert_eq!(rel_err(&got, &want), 0.0);
}
