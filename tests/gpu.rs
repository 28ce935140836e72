//! GPU kernels against the f64 reference. Skipped, with the reason printed, where there is
//! no GPU; a failure under THOR_REQUIRE_GPU=1.
#![cfg(feature = "cuda")]

mod common;

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
            (*g as f64 - w).abs() < 1e-5 * b as f64,
            "block {k}: {g} vs {w}"
        );
    }
    for (f, (g, w)) in ft.iter().zip(&wf).enumerate() {
        let d = set.entries()[f].layout.dim() as f64;
        assert!(
            (*g as f64 - w).abs() < 1e-5 * d.max(1.0),
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

use thor_kernels::cuda::{DeviceDamping, DeviceInvertOptions};

/// Runs the GPU inversion on `input` with the output pre-filled by `out_init`; returns
/// (output, info, damping used).
fn gpu_invert(
    dev: &CudaDevice,
    b: usize,
    input: &[f32],
    out_init: &[f32],
    opts: &DeviceInvertOptions<'_>,
) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let nb = input.len() / (b * b);
    let din = dev.upload(input).unwrap();
    let mut dout = dev.upload(out_init).unwrap();
    let mut info = dev.upload(&vec![i32::MIN; nb]).unwrap();
    let mut used = dev.upload(&vec![f32::NAN; nb]).unwrap();
    dev.invert(b, &din, &mut dout, &mut info, Some(&mut used), opts)
        .unwrap();
    (
        dev.download(&dout).unwrap(),
        dev.download(&info).unwrap(),
        dev.download(&used).unwrap(),
    )
}

#[test]
fn gpu_invert_odd_batches_every_block_size() {
    let Some(dev) = gpu_or_skip("gpu_invert_odd_batches_every_block_size") else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        for nb in [1usize, 3, batch(1000)] {
            let mut r = rng((b * 10_000 + nb) as u64);
            let conds = [1.0, 1e2, 1e4];
            let input = spd_batch(&mut r, b, nb, &conds);
            let (out, info, used) = gpu_invert(
                &dev,
                b,
                &input,
                &poisoned(nb * b * b),
                &DeviceInvertOptions::uniform(1e-3),
            );
            assert!(
                info.iter().all(|&i| i == 0),
                "b={b} nb={nb}: {:?}",
                &info[..info.len().min(8)]
            );
            assert!(used.iter().all(|&u| u == 1e-3));
            assert!(
                out.iter().all(|v| v.is_finite()),
                "b={b} nb={nb}: unwritten or non-finite output"
            );
            for j in (0..nb).step_by(nb.div_ceil(7)) {
                let res = block_residual(&input, &out, b, j, 1e-3);
                let tol = inverse_tolerance(conds[j % 3]);
                assert!(res < tol, "b={b} nb={nb} block {j}: residual {res:e}");
                assert!(
                    bitwise_symmetric(&out, b, j),
                    "b={b} block {j} not bitwise symmetric"
                );
            }
        }
    }
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

/// Regression: reloading the kernels (another source) must drop the shared-memory opt-ins
/// with the functions, or the b = 256 inversion (over 48 KiB) fails to launch afterwards.
#[test]
fn gpu_kernel_reload_keeps_large_shared_memory_kernels_launchable() {
    let Some(mut dev) =
        gpu_or_skip("gpu_kernel_reload_keeps_large_shared_memory_kernels_launchable")
    else {
        return;
    };
    let b = 256;
    let mut r = rng(256);
    let input = spd_batch(&mut r, b, 2, &[1.0, 1e2]);
    let opts = DeviceInvertOptions::uniform(1e-3);
    let (first, info, _) = gpu_invert(&dev, b, &input, &poisoned(2 * b * b), &opts);
    assert_eq!(info, [0, 0]);
    let (loaded, opted) = dev.loaded_kernels().unwrap();
    assert!(
        loaded >= 1 && opted >= 1,
        "b = 256 opts in: {loaded} {opted}"
    );
    let source = dev.kernel_source();
    dev.set_kernel_source(source);
    assert_eq!(
        dev.loaded_kernels().unwrap(),
        (0, 0),
        "reload drops everything"
    );
    let (again, info, _) = gpu_invert(&dev, b, &input, &poisoned(2 * b * b), &opts);
    assert_eq!(info, [0, 0]);
    assert_eq!(first, again, "same kernel, same result after the reload");
}

#[test]
fn gpu_invert_resnet50_factor_set() {
    let Some(dev) = gpu_or_skip("gpu_invert_resnet50_factor_set") else {
        return;
    };
    let dims: Vec<usize> = shapes::resnet50()
        .iter()
        .flat_map(|l| [l.d_a, l.d_g])
        .collect();
    let dims = &dims[..batch(dims.len())];
    let set = FactorSet::new(128, dims).unwrap();
    let mut r = rng(654);
    let input = spd_batch(&mut r, 128, set.total_blocks(), &[10.0, 1e3]);
    let per_factor: Vec<f32> = (0..set.len()).map(|i| 1e-3 * (1 + i % 3) as f32).collect();
    let per_block = set.damping_per_block(&per_factor).unwrap();
    let dd = dev.upload(&per_block).unwrap();
    let opts = DeviceInvertOptions {
        damping: DeviceDamping::PerBlock(&dd),
        ..DeviceInvertOptions::uniform(0.0)
    };
    let (out, info, used) = gpu_invert(&dev, 128, &input, &poisoned(input.len()), &opts);
    assert_eq!(info, vec![0; set.total_blocks()]);
    assert_eq!(used, per_block);
    for j in (0..set.total_blocks()).step_by(97) {
        assert!(
            block_residual(&input, &out, 128, j, per_block[j] as f64) < 1e-4,
            "block {j}"
        );
    }
}

#[test]
fn gpu_trace_rule_matches_the_reference_and_keeps_history() {
    use thor_kernels::cuda::RuleLayer;
    use thor_kernels::rule::{self, Decision, RuleState, Thresholds};
    let Some(dev) = gpu_or_skip("gpu_trace_rule_matches_the_reference_and_keeps_history") else {
        return;
    };
    // Three layers, A and G each; b = 32.
    let dims = [40usize, 10, 64, 3, 100, 33];
    let set = FactorSet::new(32, &dims).unwrap();
    let layers = RuleLayer::pairs(&set);
    let mut rule = dev.new_trace_rule(&set, &layers, 4).unwrap();
    let (th, damping) = (Thresholds::THOR_STOP, 0.04f32);
    // Scripted factor traces per step: layer 0 drifts (update, reuse, freeze), layer 1 gets a
    // NaN, layer 2 jumps.
    let steps: [[f32; 6]; 6] = [
        [10.0, 5.0, 20.0, 2.0, 30.0, 3.0],
        [10.1, 5.0, f32::NAN, 2.0, 60.0, 3.0],
        [10.2, 5.0, 20.0, 2.0, 60.0, 3.0],
        [10.2001, 5.0, 20.0, 2.0, 60.0, 3.0],
        [50.0, 5.0, 20.0, 2.0, 60.0, 9.0],
        [f32::NAN, 5.0, 21.0, 2.0, 60.0, 9.0],
    ];
    let mut states = [RuleState::default(); 3];
    let mut want_history = Vec::new();
    let mut mask = dev.upload(&vec![9u8; set.total_blocks()]).unwrap();
    let mut decisions = dev.zeros::<i32>(3).unwrap();
    for tr in &steps {
        let dtr = dev.upload(tr).unwrap();
        dev.trace_rule(&mut rule, &dtr, damping, th, &mut mask, &mut decisions)
            .unwrap();
        let got = dev.download(&decisions).unwrap();
        let s = (damping as f64).sqrt();
        let want: Vec<i32> = (0..3)
            .map(|l| {
                let cur = (tr[2 * l] as f64 + s * dims[2 * l] as f64)
                    * (tr[2 * l + 1] as f64 + s * dims[2 * l + 1] as f64);
                rule::step(&mut states[l], cur, th).code()
            })
            .collect();
        assert_eq!(got, want, "traces {tr:?}");
        let m = dev.download(&mask).unwrap();
        for (l, lay) in layers.iter().enumerate() {
            let expect = (want[l] == 0) as u8;
            assert!(
                m[lay.first_block..lay.first_block + lay.blocks]
                    .iter()
                    .all(|&v| v == expect),
                "mask of layer {l}"
            );
        }
        want_history.push(
            want.iter()
                .map(|&c| Decision::from_code(c).unwrap())
                .collect::<Vec<_>>(),
        );
    }
    let (n, hist) = rule.history(&dev).unwrap();
    assert_eq!(n, 6);
    assert_eq!(
        hist,
        want_history[2..].to_vec(),
        "the last 4 steps, oldest first"
    );
    // Layer 0 froze at step 4 and stays frozen through a NaN and a jump.
    assert_eq!(want_history[3][0], Decision::Freeze);
    assert_eq!(
        (want_history[4][0], want_history[5][0]),
        (Decision::Frozen, Decision::Frozen)
    );
}

mod gpu_accumulate {
    use super::*;
    use thor_kernels::cuda::accumulate::{AccumulateMode, DeviceElement, DeviceInput};

    /// Runs the device accumulation of `set` from inputs `(x, rows, ld)` with `alpha = 1 /
    /// rows`, `beta`, starting from `init`; checks against the reference with `tol` and
    /// returns the status per factor.
    #[allow(clippy::too_many_arguments)]
    fn case<E: DeviceElement>(
        dev: &CudaDevice,
        set: &FactorSet,
        rows: &[usize],
        beta: f32,
        mode: AccumulateMode,
        tol: f64,
        seed: u64,
        nan_in: Option<usize>,
    ) -> Vec<i32> {
        let mut r = rng(seed);
        let mut xs = Vec::new();
        let mut lds = Vec::new();
        for (f, (e, &n)) in set.entries().iter().zip(rows).enumerate() {
            let d = e.layout.dim();
            let ld = d + (f % 2) * 3;
            let mut x: Vec<E> = normal(&mut r, (n - 1) * ld + d)
                .into_iter()
                .map(E::from_f32)
                .collect();
            if nan_in == Some(f) {
                x[(n - 1) * ld] = E::from_f32(f32::NAN);
            }
            xs.push(x);
            lds.push(ld);
        }
        let init: Vec<f32> = if beta == 0.0 {
            poisoned(set.buffer_len())
        } else {
            // Symmetric previous statistics.
            let b = set.block();
            let mut v = normal(&mut r, set.buffer_len());
            for k in 0..set.total_blocks() {
                for i in 0..b {
                    for j in 0..i {
                        v[k * b * b + j * b + i] = v[k * b * b + i * b + j];
                    }
                }
            }
            v
        };
        let mut acc = dev.plan_accumulate(set, rows, E::DTYPE, mode).unwrap();
        let dxs: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
        let inputs: Vec<DeviceInput<'_, E>> = dxs
            .iter()
            .zip(&lds)
            .zip(rows)
            .map(|((x, &ld), &n)| DeviceInput {
                x: x.as_view(),
                ld,
                alpha: 1.0 / n as f32,
                beta,
            })
            .collect();
        let mut blocks = dev.upload(&init).unwrap();
        let mut bt = dev.upload(&poisoned(set.total_blocks())).unwrap();
        let mut ft = dev.upload(&poisoned(set.len())).unwrap();
        let mut status = dev.upload(&vec![-7i32; set.len()]).unwrap();
        dev.accumulate(
            &mut acc,
            &inputs,
            &mut blocks,
            &mut bt,
            &mut ft,
            &mut status,
        )
        .unwrap();
        let got = dev.download(&blocks).unwrap();
        let (bt, st) = (dev.download(&bt).unwrap(), dev.download(&status).unwrap());
        let b = set.block();
        for (f, e) in set.entries().iter().enumerate() {
            let range = e.offset()..e.offset() + e.layout.buffer_len();
            if nan_in == Some(f) {
                assert_eq!(st[f], 1);
                assert!(got[range.clone()]
                    .iter()
                    .zip(&init[range])
                    .all(|(a, c)| a.to_bits() == c.to_bits()));
                continue;
            }
            assert_eq!(st[f], 0);
            let x: Vec<f64> = xs[f].iter().map(|v| v.to_f32() as f64).collect();
            let mut want = f64s(&init[range.clone()]);
            reference::accumulate(
                &x,
                rows[f],
                lds[f],
                &e.layout,
                1.0 / rows[f] as f64,
                beta as f64,
                &mut want,
            )
            .unwrap();
            let err = rel_err(&got[range.clone()], &want);
            assert!(err < tol, "{mode:?} {:?} factor {f}: {err:e}", E::DTYPE);
            for k in 0..e.layout.blocks() {
                assert!(bitwise_symmetric(&got, b, e.first_block + k));
                let w: f64 = (0..b).map(|i| want[k * b * b + i * b + i]).sum();
                let g = bt[e.first_block + k] as f64;
                assert!(
                    (g - w).abs() <= 4.0 * tol * w.abs().max(1.0),
                    "trace {g} vs {w}"
                );
            }
        }
        st
    }

    #[test]
    fn gpu_accumulate_grouped_every_mode_and_block_size() {
        let Some(dev) = gpu_or_skip("gpu_accumulate_grouped_every_mode_and_block_size") else {
            return;
        };
        for b in SUPPORTED_BLOCK_SIZES {
            let dims = [1, b - 1, b, b + 1, 3 * b + 5];
            let set = FactorSet::new(b, &dims).unwrap();
            let rows = [1usize, 7, batch(1000), batch(65537), 7];
            for beta in [0.0f32, 0.95] {
                let seed = b as u64 + (beta > 0.0) as u64;
                case::<f32>(
                    &dev,
                    &set,
                    &rows,
                    beta,
                    AccumulateMode::F32,
                    1e-5,
                    seed,
                    None,
                );
                case::<f32>(
                    &dev,
                    &set,
                    &rows,
                    beta,
                    AccumulateMode::TensorCore,
                    5e-4,
                    seed,
                    None,
                );
                for mode in [AccumulateMode::F32, AccumulateMode::TensorCore] {
                    case::<half::f16>(&dev, &set, &rows, beta, mode, 1e-2, seed, None);
                    case::<half::bf16>(&dev, &set, &rows, beta, mode, 1e-2, seed, None);
                }
            }
        }
    }

    #[test]
    fn gpu_accumulate_non_finite_input_leaves_the_factor_unchanged() {
        let Some(dev) = gpu_or_skip("gpu_accumulate_non_finite_input_leaves_the_factor_unchanged")
        else {
            return;
        };
        let set = FactorSet::new(128, &[200, 64, 300]).unwrap();
        for mode in [AccumulateMode::F32, AccumulateMode::TensorCore] {
            let st = case::<f32>(&dev, &set, &[500, 900, 64], 0.95, mode, 5e-4, 5, Some(1));
            assert_eq!(st, vec![0, 1, 0]);
            let st = case::<half::bf16>(&dev, &set, &[500, 900, 64], 0.0, mode, 1e-2, 6, Some(2));
            assert_eq!(st, vec![0, 0, 1]);
        }
        // Inputs that do not match the plan are refused before anything is queued.
        let mut acc = dev
            .plan_accumulate(
                &set,
                &[500, 900, 64],
                thor_kernels::DType::F32,
                AccumulateMode::F32,
            )
            .unwrap();
        let x = dev.zeros::<f32>(10).unwrap();
        let inp = DeviceInput {
            x: x.as_view(),
            ld: 200,
            alpha: 1.0,
            beta: 0.0,
        };
        let mut blocks = dev.zeros::<f32>(set.buffer_len()).unwrap();
        let mut bt = dev.zeros::<f32>(set.total_blocks()).unwrap();
        let mut ft = dev.zeros::<f32>(3).unwrap();
        let mut st = dev.zeros::<i32>(3).unwrap();
        let e = dev
            .accumulate(
                &mut acc,
                &[inp.clone(), inp.clone(), inp],
                &mut blocks,
                &mut bt,
                &mut ft,
                &mut st,
            )
            .unwrap_err();
        assert!(matches!(e, Error::Shape { .. }), "{e}");
    }

    #[test]
    fn gpu_accumulate_dense_syrk_matches_reference() {
        let Some(dev) = gpu_or_skip("gpu_accumulate_dense_syrk_matches_reference") else {
            return;
        };
        let k = DenseCase::new(4);
        let dx = dev.upload(&k.x).unwrap();
        let mut dc = dev.upload(&k.c0).unwrap();
        dev.accumulate_dense(&dx, k.n, k.ld, k.d, 0.5, 0.9, &mut dc, k.ldc)
            .unwrap();
        k.check(
            &dev.download(&dc).unwrap(),
            0.5,
            0.9,
            1e-4 * (k.n as f64).sqrt() * 2.0,
        );
    }
}

#[test]
fn gpu_apply_matches_reference_odd_shapes_in_and_out_of_place() {
    let Some(dev) = gpu_or_skip("gpu_apply_matches_reference_odd_shapes_in_and_out_of_place")
    else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        let (set, layers) = apply_cases::odd_layers(b, &apply_cases::odd_shapes(b));
        let inv = apply_cases::sym_blocks(&set, b as u64);
        let mut r = rng(b as u64 + 1);
        let grads: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| normal(&mut r, l.out_dim * l.in_dim))
            .collect();
        let scales: Vec<f32> = (0..layers.len()).map(|l| 1.0 / (l + 1) as f32).collect();
        let dinv = dev.upload(&inv).unwrap();
        // Every gradient a view into one buffer (as a framework's parameters may be), every
        // output a view at an offset into its own buffer, whose head must stay untouched.
        let all: Vec<f32> = grads.iter().flatten().copied().collect();
        let dall = dev.upload(&all).unwrap();
        let offsets: Vec<usize> = grads
            .iter()
            .scan(0, |o, g| {
                *o += g.len();
                Some(*o - g.len())
            })
            .collect();
        let views: Vec<_> = grads
            .iter()
            .zip(&offsets)
            .map(|(g, &o)| dall.slice(o..o + g.len()))
            .collect();
        let pad = 7;
        let mut out_bufs: Vec<_> = grads
            .iter()
            .map(|g| dev.upload(&vec![-3.0f32; pad + g.len()]).unwrap())
            .collect();
        let mut plan = dev
            .plan_apply(&set, &layers, thor_kernels::DType::F32)
            .unwrap();
        {
            let mut outs: Vec<_> = out_bufs.iter_mut().map(|o| o.slice_mut(pad..)).collect();
            dev.apply(&mut plan, &dinv, &views, &mut outs, &scales)
                .unwrap();
        }
        let mut inplace: Vec<_> = grads.iter().map(|g| dev.upload(g).unwrap()).collect();
        let in_place = {
            let mut v: Vec<_> = inplace.iter_mut().map(|g| g.as_view_mut()).collect();
            dev.apply_in_place(&mut plan, &dinv, &mut v, &scales)
        };
        for (l, lay) in layers.iter().enumerate() {
            let want = apply_cases::reference_layer(&set, &inv, lay, &grads[l], scales[l]);
            let got = dev.download(&out_bufs[l]).unwrap();
            assert!(
                got[..pad].iter().all(|&v| v == -3.0),
                "b={b} layer {l}: head written"
            );
            assert!(rel_err(&got[pad..], &want) < 1e-5, "b={b} layer {l}");
            if b <= 128 {
                let got = dev.download(&inplace[l]).unwrap();
                assert!(rel_err(&got, &want) < 1e-5, "b={b} layer {l} in place");
            }
        }
        if b == 256 {
            assert!(in_place.is_err());
        } else {
            in_place.unwrap();
        }
    }
}

#[test]
fn gpu_thor_step_pipeline_rule_skip_and_graph_replay() {
    use thor_kernels::cuda::step::{DeviceThorStep, StepConfig, StepInput};
    use thor_kernels::cuda::RuleLayer;
    use thor_kernels::rule::{self, RuleState};
    let Some(dev) = gpu_or_skip("gpu_thor_step_pipeline_rule_skip_and_graph_replay") else {
        return;
    };
    let b = 64;
    let dims = [100usize, 20, 64, 70, 7, 3];
    let rows = [256usize, 256, 90, 90, 33, 33];
    let set = FactorSet::new(b, &dims).unwrap();
    let layers = RuleLayer::pairs(&set);
    let cfg = StepConfig {
        thresholds: thor_kernels::rule::Thresholds::THOR_STOP,
        ..StepConfig::default()
    };
    let mut step = dev
        .new_thor_step(&set, &rows, thor_kernels::DType::F32, &layers, cfg)
        .unwrap();
    let mut r = rng(12);
    let mut xs: Vec<_> = dims
        .iter()
        .zip(&rows)
        .map(|(&d, &n)| dev.upload(&normal(&mut r, n * d)).unwrap())
        .collect();
    fn inputs<'a>(
        xs: &'a [cudarc::driver::CudaSlice<f32>],
        dims: &[usize],
    ) -> Vec<StepInput<'a, f32>> {
        xs.iter()
            .zip(dims)
            .map(|(x, &ld)| StepInput { x: x.as_view(), ld })
            .collect()
    }
    let damping = 0.01f32;
    let mut states = [RuleState::default(); 3];
    let host_inputs = |xs: &Vec<cudarc::driver::CudaSlice<f32>>| -> Vec<Vec<f32>> {
        xs.iter().map(|x| dev.download(x).unwrap()).collect()
    };
    for k in 0..3 {
        if k == 2 {
            // A NaN in layer 1's G input: the layer is skipped, its statistics and inverses kept.
            let mut h = dev.download(&xs[3]).unwrap();
            h[5] = f32::NAN;
            dev.stream().memcpy_htod(&h, &mut xs[3]).unwrap();
        }
        let before_stats = dev.download(step.stats()).unwrap();
        let before_inv = dev.download(step.inverses()).unwrap();
        step.run(&dev, &inputs(&xs, &dims), damping).unwrap();
        let stats = dev.download(step.stats()).unwrap();
        let inv = dev.download(step.inverses()).unwrap();
        let dec = dev.download(step.decisions()).unwrap();
        let status = dev.download(step.status()).unwrap();
        let hx = host_inputs(&xs);
        let mut want_dec = Vec::new();
        for (l, lay) in layers.iter().enumerate() {
            let (fa, fg) = (2 * l, 2 * l + 1);
            if k == 2 && l == 1 {
                assert_eq!((status[fa], status[fg]), (2, 1));
                want_dec.push(4);
                let range = lay.first_block * b * b..(lay.first_block + lay.blocks) * b * b;
                assert_eq!(stats[range.clone()], before_stats[range.clone()]);
                assert_eq!(inv[range.clone()], before_inv[range]);
                continue;
            }
            // Statistics: the mean of X^T X (decay 0).
            let mut tr = [0.0f64; 2];
            for (t, f) in [fa, fg].into_iter().enumerate() {
                let e = &set.entries()[f];
                let mut want = vec![0.0; e.layout.buffer_len()];
                reference::accumulate(
                    &f64s(&hx[f]),
                    rows[f],
                    dims[f],
                    &e.layout,
                    1.0 / rows[f] as f64,
                    0.0,
                    &mut want,
                )
                .unwrap();
                let got = &stats[e.offset()..e.offset() + e.layout.buffer_len()];
                assert!(rel_err(got, &want) < 1e-5, "step {k} factor {f}");
                tr[t] = (0..dims[f])
                    .map(|i| want[(i / b) * b * b + (i % b) * b + i % b])
                    .sum();
            }
            let s = (damping as f64).sqrt();
            let cur = (tr[0] + s * dims[fa] as f64) * (tr[1] + s * dims[fg] as f64);
            want_dec.push(rule::step(&mut states[l], cur, cfg.thresholds).code());
        }
        assert_eq!(dec, want_dec, "step {k}");
        // Updated layers: inverses of the new statistics with sqrt(damping).
        for (l, lay) in layers.iter().enumerate() {
            for j in lay.first_block..lay.first_block + lay.blocks {
                if want_dec[l] == 0 {
                    let res = block_residual(&stats, &inv, b, j, (damping as f64).sqrt());
                    assert!(res < 1e-4, "step {k} layer {l} block {j}: {res:e}");
                }
            }
        }
        dev.stream()
            .memcpy_htod(&normal(&mut r, rows[0] * dims[0]), &mut xs[0])
            .unwrap();
    }
    // Graph: capture the step and replay it; the same launches give the same result.
    let h = dev.download(&xs[3]).unwrap();
    let clean: Vec<f32> = h
        .iter()
        .map(|v| if v.is_finite() { *v } else { 0.5 })
        .collect();
    dev.stream().memcpy_htod(&clean, &mut xs[3]).unwrap();
    step.run(&dev, &inputs(&xs, &dims), damping).unwrap();
    let before = dev.download(step.stats()).unwrap();
    // The first call captures and launches, the second replays; both recompute the same
    // statistics. Then the inputs move to new buffers: the graph reads them through the
    // factor table, so the replay sees the new data.
    for _ in 0..2 {
        step.run_graph(&dev, &inputs(&xs, &dims), damping).unwrap();
        assert_eq!(dev.download(step.stats()).unwrap(), before, "graph step");
    }
    let moved: Vec<_> = xs
        .iter()
        .map(|x| dev.upload(&dev.download(x).unwrap()).unwrap())
        .collect();
    drop(xs);
    step.run_graph(&dev, &inputs(&moved, &dims), damping)
        .unwrap();
    assert_eq!(dev.download(step.stats()).unwrap(), before, "moved inputs");
    // Wrong inputs are refused before anything is queued.
    let err = step
        .run(&dev, &inputs(&moved[..5], &dims), damping)
        .unwrap_err();
    assert!(matches!(err, Error::Shape { arg: "inputs", .. }), "{err}");
    assert_eq!(DeviceThorStep::LAUNCHES, 5);
    let (n, _) = step.history(&dev).unwrap();
    assert_eq!(n, 7, "3 runs + 1 run + 3 graph steps");
}

#[test]
fn gpu_thor_optimizer_on_cuda_matches_the_cpu_backend() {
    use thor_kernels::thor::{DampingSchedule, IntervalSchedule, LayerKind, Thor, ThorConfig};
    use thor_kernels::BackendKind;
    if gpu_or_skip("gpu_thor_optimizer_on_cuda_matches_the_cpu_backend").is_none() {
        return;
    }
    let cfg = |backend| ThorConfig {
        block: 32,
        damping: DampingSchedule::Constant(1e-2),
        interval: IntervalSchedule::Fixed(1),
        stat_decay: 0.5,
        backend,
        ..ThorConfig::thor()
    };
    let mut cpu = Thor::new(cfg(BackendKind::Cpu)).unwrap();
    let mut gpu = Thor::new(cfg(BackendKind::Cuda)).unwrap();
    assert!(gpu.backend_name().starts_with("cuda:"));
    let kind = LayerKind::Linear {
        inputs: 40,
        outputs: 70,
        bias: true,
    };
    let (lc, lg) = (cpu.add_layer(kind).unwrap(), gpu.add_layer(kind).unwrap());
    let mut r = rng(33);
    let rows = 50;
    for step in 0..3 {
        let acts = normal(&mut r, rows * 40);
        let grads = normal(&mut r, rows * 70);
        let g = normal(&mut r, 70 * 41);
        let oc = cpu.observe(lc, &acts, &grads, rows).unwrap();
        let og = gpu.observe(lg, &acts, &grads, rows).unwrap();
        assert_eq!(oc, og, "step {step}");
        let (mut uc, mut ug) = (vec![0.0; g.len()], vec![0.0; g.len()]);
        cpu.precondition(lc, &g, &mut uc).unwrap();
        gpu.precondition(lg, &g, &mut ug).unwrap();
        assert!(rel_err(&ug, &f64s(&uc)) < 1e-4, "step {step}");
        cpu.finish_step();
        gpu.finish_step();
    }
    assert_eq!(cpu.counters(lc).unwrap(), gpu.counters(lg).unwrap());
}

/// The GPU as an [`invert_cases::Inverter`].
struct GpuInverter<'a>(&'a CudaDevice);

impl invert_cases::Inverter for GpuInverter<'_> {
    fn invert(
        &self,
        b: usize,
        input: &[f32],
        c: invert_cases::InvertCall<'_>,
    ) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
        let dev = self.0;
        let nb = input.len() / (b * b);
        let dmask = c.mask.map(|m| dev.upload(m).unwrap());
        let ddamp = c.damping.map(|d| dev.upload(d).unwrap());
        let opts = DeviceInvertOptions {
            damping: match &ddamp {
                Some(d) => DeviceDamping::PerBlock(d),
                None => DeviceDamping::Uniform(c.damping_all),
            },
            mask: dmask.as_ref(),
            policy: c.policy,
        };
        let mut info = dev.upload(&vec![i32::MIN; nb]).unwrap();
        let mut used = dev.upload(&vec![f32::NAN; nb]).unwrap();
        let out = match c.out_init {
            Some(init) => {
                let din = dev.upload(input).unwrap();
                let mut dout = dev.upload(init).unwrap();
                dev.invert(b, &din, &mut dout, &mut info, Some(&mut used), &opts)
                    .unwrap();
                dev.download(&dout).unwrap()
            }
            None => {
                let mut blocks = dev.upload(input).unwrap();
                dev.invert_in_place(b, &mut blocks, &mut info, Some(&mut used), &opts)
                    .unwrap();
                dev.download(&blocks).unwrap()
            }
        };
        (
            out,
            dev.download(&info).unwrap(),
            dev.download(&used).unwrap(),
        )
    }
}

#[test]
fn gpu_invert_reports_exactly_the_bad_blocks() {
    let Some(dev) = gpu_or_skip("gpu_invert_reports_exactly_the_bad_blocks") else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        invert_cases::bad_blocks(&GpuInverter(&dev), b);
    }
}

#[test]
fn gpu_invert_mask_retry_and_device_damping() {
    let Some(dev) = gpu_or_skip("gpu_invert_mask_retry_and_device_damping") else {
        return;
    };
    invert_cases::mask_retry_damping(&GpuInverter(&dev), 64);
}

#[test]
fn gpu_invert_residual_bound_up_to_cond_1e7() {
    let Some(dev) = gpu_or_skip("gpu_invert_residual_bound_up_to_cond_1e7") else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        invert_cases::residual_bound(&GpuInverter(&dev), b, "gpu");
    }
}
