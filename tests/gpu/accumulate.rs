//! The grouped covariance accumulation: every mode, dtype and block size, non-finite input,
//! the dense SYRK.

use super::*;

use thor_kernels::cuda::accumulate::{
    AccumulateKernel, AccumulateMode, DeviceElement, DeviceInput,
};

/// Runs the device accumulation of `set` from inputs `(x, rows, ld)` with `alpha = 1 /
/// rows`, `beta`, starting from `init`, with the tile kernels and (b = 64, 128) the block
/// kernels; checks each against the reference with `tol` and returns the status per factor.
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
    let mut st = Vec::new();
    for kernel in AccumulateKernel::ALL {
        if kernel.supports(set.block()) {
            st = case_with::<E>(dev, set, rows, beta, mode, tol, seed, nan_in, kernel);
        }
    }
    st
}

#[allow(clippy::too_many_arguments)]
fn case_with<E: DeviceElement>(
    dev: &CudaDevice,
    set: &FactorSet,
    rows: &[usize],
    beta: f32,
    mode: AccumulateMode,
    tol: f64,
    seed: u64,
    nan_in: Option<usize>,
    kernel: AccumulateKernel,
) -> Vec<i32> {
    let mut r = rng(seed);
    let mut xs = Vec::new();
    let mut lds = Vec::new();
    for (f, (e, &n)) in set.entries().iter().zip(rows).enumerate() {
        let d = e.layout.dim();
        // Odd factors' rows are not 16-byte aligned (the block kernels' element path).
        let ld = if f % 2 == 0 {
            d.next_multiple_of(8)
        } else {
            d + 3
        };
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
    let mut acc = dev
        .plan_accumulate_with(set, rows, E::DTYPE, mode, kernel)
        .unwrap();
    let dxs: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
    let inputs: Vec<DeviceInput<'_, E>> = dxs
        .iter()
        .zip(&lds)
        .zip(rows)
        .map(|((x, &ld), &n)| DeviceInput {
            x: x.as_view(),
            layout: thor_kernels::InputLayout::matrix(n, ld),
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
        assert!(
            err < tol,
            "{mode:?} {kernel:?} {:?} factor {f}: {err:e}",
            E::DTYPE
        );
        for k in 0..e.layout.blocks() {
            assert!(bitwise_symmetric(&got, b, e.first_block + k));
            let w: f64 = (0..b).map(|i| want[k * b * b + i * b + i]).sum();
            let g = bt[e.first_block + k] as f64;
            assert!(
                approx::relative_eq!(g, w, epsilon = 4.0 * tol, max_relative = 4.0 * tol),
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
        layout: thor_kernels::InputLayout::matrix(500, 200),
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

#[test]
fn gpu_accumulate_kernel_choice_times_both_families() {
    use thor_kernels::choice::{ChoiceSettings, ChoiceSource, Chooser};
    let Some(dev) = gpu_or_skip("gpu_accumulate_kernel_choice_times_both_families") else {
        return;
    };
    // This process's own chooser: nothing read from or written to the user's file.
    let mut chooser = Chooser::new(ChoiceSettings::default(), "test");
    let set = FactorSet::new(128, &[4608, 1153, 60]).unwrap();
    let rows = [batch(8192), batch(8192), batch(300)];
    for (dtype, mode) in [
        (thor_kernels::DType::F32, AccumulateMode::F32),
        (thor_kernels::DType::F32, AccumulateMode::TensorCore),
        (thor_kernels::DType::BF16, AccumulateMode::TensorCore),
    ] {
        let (kernel, d) = dev
            .choose_accumulate_kernel_in(&mut chooser, &set, &rows, dtype, mode)
            .unwrap();
        assert_eq!(d.source, ChoiceSource::Measured);
        assert_eq!(d.trials.len(), 2);
        for t in &d.trials {
            assert!(t.rejected.is_none(), "{dtype:?} {mode:?}: {t:?}");
            println!(
                "choice {dtype:?} {mode:?} {}: {:.1} us",
                t.variant,
                t.seconds.unwrap() * 1e6
            );
        }
        println!("choice {dtype:?} {mode:?}: {kernel:?}");
        // Asked again: remembered, nothing timed.
        let (again, d) = dev
            .choose_accumulate_kernel_in(&mut chooser, &set, &rows, dtype, mode)
            .unwrap();
        assert_eq!((again, d.source), (kernel, ChoiceSource::Remembered));
    }
    // b = 32: only the tile kernels, nothing timed.
    let small = FactorSet::new(32, &[100]).unwrap();
    let (k, d) = dev
        .choose_accumulate_kernel_in(
            &mut chooser,
            &small,
            &[64],
            thor_kernels::DType::F32,
            AccumulateMode::F32,
        )
        .unwrap();
    assert_eq!(
        (k, d.source),
        (AccumulateKernel::Tiles, ChoiceSource::Baseline)
    );
    assert!(chooser.warnings().is_empty(), "{:?}", chooser.warnings());
}
