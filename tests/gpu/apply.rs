//! The preconditioner apply: odd shapes, views, in and out of place.

use super::*;

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
        // Every kernel for this block size, each against the reference.
        for kernel in thor_kernels::cuda::apply::ApplyKernel::ALL {
            if !kernel.supports(b) {
                continue;
            }
            let mut plan = dev
                .plan_apply_with(&set, &layers, thor_kernels::DType::F32, kernel)
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
                assert!(
                    rel_err(&got[pad..], &want) < 1e-5,
                    "{kernel:?} b={b} layer {l}"
                );
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
}

#[test]
fn gpu_apply_kernel_choice_times_every_kernel() {
    use thor_kernels::choice::{ChoiceSettings, ChoiceSource, Chooser};
    let Some(dev) = gpu_or_skip("gpu_apply_kernel_choice_times_every_kernel") else {
        return;
    };
    let mut chooser = Chooser::new(ChoiceSettings::default(), "test");
    let (set, layers) = apply_cases::odd_layers(128, &apply_cases::odd_shapes(128));
    for dtype in [thor_kernels::DType::F32, thor_kernels::DType::BF16] {
        let (kernel, d) = dev
            .choose_apply_kernel_in(&mut chooser, &set, &layers, dtype)
            .unwrap();
        assert_eq!(d.source, ChoiceSource::Measured);
        for t in &d.trials {
            assert!(t.rejected.is_none(), "{dtype:?}: {t:?}");
            println!(
                "apply choice {dtype:?} {}: {:.1} us",
                t.variant,
                t.seconds.unwrap() * 1e6
            );
        }
        println!("apply choice {dtype:?}: {kernel:?}");
    }
    assert!(chooser.warnings().is_empty(), "{:?}", chooser.warnings());
}
