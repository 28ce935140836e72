//! The batched damped inversion: every block size, bad blocks, masks, retries, the residual
//! bound, kernel reloads.

use super::*;

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
fn gpu_invert_late_failures_and_retries_at_every_size() {
    let Some(dev) = gpu_or_skip("gpu_invert_late_failures_and_retries_at_every_size") else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        invert_cases::late_failures(&GpuInverter(&dev), b);
    }
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

#[test]
fn gpu_invert_kernel_choice_times_every_kernel() {
    use thor_kernels::choice::{ChoiceSettings, ChoiceSource, Chooser};
    use thor_kernels::cuda::raw::InvertKernel;
    let Some(dev) = gpu_or_skip("gpu_invert_kernel_choice_times_every_kernel") else {
        return;
    };
    let mut chooser = Chooser::new(ChoiceSettings::default(), "test");
    for (b, nb) in [(128usize, 2048usize), (128, 64), (64, 4096), (32, 4096)] {
        let (kernel, d) = dev.choose_invert_kernel_in(&mut chooser, b, nb).unwrap();
        assert_eq!(d.source, ChoiceSource::Measured);
        let kernels = InvertKernel::ALL.iter().filter(|k| k.supports(b)).count();
        assert_eq!(d.trials.len(), kernels);
        for t in &d.trials {
            assert!(t.rejected.is_none(), "b={b} x{nb}: {t:?}");
            println!(
                "invert choice b={b} x{nb} {}: {:.1} us",
                t.variant,
                t.seconds.unwrap() * 1e6
            );
        }
        println!("invert choice b={b} x{nb}: {kernel:?}");
    }
    let (k, d) = dev.choose_invert_kernel_in(&mut chooser, 256, 100).unwrap();
    assert_eq!(
        (k, d.source),
        (InvertKernel::Standard, ChoiceSource::Baseline)
    );
    assert!(chooser.warnings().is_empty(), "{:?}", chooser.warnings());
}

#[test]
fn gpu_invert_every_kernel_reports_and_inverts_like_the_reference() {
    // Each kernel by name (not only the one chosen): good blocks of several conditions
    // within the residual bound, bad blocks reported with the reference's pivot and left
    // as they were.
    use thor_kernels::cuda::raw::InvertKernel;
    let Some(dev) = gpu_or_skip("gpu_invert_every_kernel_reports_and_inverts_like_the_reference")
    else {
        return;
    };
    for b in SUPPORTED_BLOCK_SIZES {
        let mut r = rng(90 + b as u64);
        let (mut bad, mut want) = mixed_bad_batch(&mut r, b);
        // A failure in the last panel of the blocked kernel too.
        let mut late = bad[..b * b].to_vec();
        late[(b - 5) * b + b - 5] = -100.0;
        bad.extend_from_slice(&late);
        want.push(b as i32 - 4);
        let conds = [1.0, 1e2, 1e4, 1e6];
        let good = spd_batch(&mut r, b, conds.len(), &conds);
        let input: Vec<f32> = bad.iter().chain(&good).copied().collect();
        let nb = input.len() / (b * b);
        for k in InvertKernel::ALL.into_iter().filter(|k| k.supports(b)) {
            let din = dev.upload(&input).unwrap();
            let init = poisoned(input.len());
            let mut dout = dev.upload(&init).unwrap();
            let mut info = dev.upload(&vec![i32::MIN; nb]).unwrap();
            dev.invert_with(
                k,
                b,
                &din,
                &mut dout,
                &mut info,
                &DeviceInvertOptions::uniform(0.0),
            )
            .unwrap();
            let (out, info) = (dev.download(&dout).unwrap(), dev.download(&info).unwrap());
            assert_eq!(info[..want.len()], want[..], "b={b} {k:?}");
            assert_eq!(info[want.len()..], vec![0; conds.len()][..], "b={b} {k:?}");
            for (j, &st) in info.iter().enumerate() {
                let blk = j * b * b..(j + 1) * b * b;
                if st != 0 {
                    let same = out[blk.clone()]
                        .iter()
                        .zip(&init[blk])
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "b={b} {k:?}: failed block {j} written");
                } else {
                    let res = block_residual(&input, &out, b, j, 0.0);
                    let c = if j < want.len() {
                        100.0
                    } else {
                        conds[j - want.len()]
                    };
                    assert!(
                        res < inverse_tolerance(c),
                        "b={b} {k:?} block {j}: residual {res:e}"
                    );
                }
            }
        }
    }
}
