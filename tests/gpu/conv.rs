//! Convolution factors from their tensors on the device (implicit im2col): the grouped
//! accumulation against the f64 reference, and the optimizer on device tensors against the
//! CPU one.

use super::*;

use common::conv_cases::{conv_cases, position_cases};
use thor_kernels::cuda::accumulate::{AccumulateMode, DeviceInput};
use thor_kernels::{InputLayout, Patches};

#[test]
fn gpu_accumulate_conv_patches_matches_reference() {
    let Some(dev) = gpu_or_skip("gpu_accumulate_conv_patches_matches_reference") else {
        return;
    };
    let cases: Vec<_> = conv_cases().into_iter().chain(position_cases()).collect();
    for b in [32usize, 64] {
        let mine: Vec<_> = cases.iter().filter(|c| c.b == b).collect();
        let dims: Vec<usize> = mine.iter().map(|c| c.patches.dim()).collect();
        let rows: Vec<usize> = mine.iter().map(|c| c.patches.rows()).collect();
        let set = FactorSet::new(b, &dims).unwrap();
        let xs: Vec<Vec<f32>> = mine
            .iter()
            .enumerate()
            .map(|(f, c)| c.tensor(&mut rng(900 + f as u64)))
            .collect();
        for (mode, tol) in [
            (AccumulateMode::F32, 1e-5),
            (AccumulateMode::TensorCore, 5e-4),
        ] {
            let mut acc = dev
                .plan_accumulate(&set, &rows, thor_kernels::DType::F32, mode)
                .unwrap();
            let dxs: Vec<_> = xs.iter().map(|x| dev.upload(x).unwrap()).collect();
            let inputs: Vec<DeviceInput<'_, f32>> = dxs
                .iter()
                .zip(&mine)
                .map(|(x, c)| DeviceInput {
                    x: x.as_view(),
                    layout: InputLayout::Patches(c.patches),
                    alpha: 1.0 / c.patches.rows() as f32,
                    beta: 0.0,
                })
                .collect();
            let mut blocks = dev.upload(&poisoned(set.buffer_len())).unwrap();
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
            assert!(dev.download(&status).unwrap().iter().all(|&s| s == 0));
            for (f, (e, c)) in set.entries().iter().zip(&mine).enumerate() {
                let x = reference::im2col(&f64s(&xs[f]), &c.patches).unwrap();
                let mut want = vec![0.0; e.layout.buffer_len()];
                let n = c.patches.rows();
                reference::accumulate(
                    &x,
                    n,
                    e.layout.dim(),
                    &e.layout,
                    1.0 / n as f64,
                    0.0,
                    &mut want,
                )
                .unwrap();
                let range = e.offset()..e.offset() + e.layout.buffer_len();
                let err = rel_err(&got[range], &want);
                assert!(err < tol, "{} {mode:?}: {err:e}", c.name);
            }
        }
    }
}

#[test]
fn gpu_thor_observe_conv_device_matches_the_cpu_optimizer() {
    use thor_kernels::thor::ConvNorm;
    if gpu_or_skip("gpu_thor_observe_conv_device_matches_the_cpu_optimizer").is_none() {
        return;
    }
    // Both normalisations: KFC's reads the first-statistics alpha 1 / batch on the device.
    for norm in [ConvNorm::PerPosition, ConvNorm::Kfc] {
        observe_conv_case(norm);
    }
}

fn observe_conv_case(norm: thor_kernels::thor::ConvNorm) {
    use thor_kernels::thor::{DampingSchedule, IntervalSchedule, LayerKind, Thor, ThorConfig};
    use thor_kernels::{BackendKind, Conv2dGeometry, TensorLayout};
    let cfg = |backend| ThorConfig {
        block: 64,
        damping: DampingSchedule::Constant(1e-2),
        interval: IntervalSchedule::Fixed(1),
        stat_decay: 0.5,
        backend,
        conv_norm: norm,
        ..ThorConfig::thor()
    };
    let dev = CudaDevice::new(0).unwrap();
    let stream = dev.stream().clone();
    let mut gpu = Thor::with_backend(
        cfg(BackendKind::Cuda),
        thor_kernels::backend::AnyBackend::Cuda(Box::new(CudaDevice::from_stream(stream).unwrap())),
    )
    .unwrap();
    let mut cpu = Thor::new(cfg(BackendKind::Cpu)).unwrap();
    let g = Conv2dGeometry::new(16, 12, 10, [3, 3])
        .with_stride([2, 2])
        .with_padding([1, 1]);
    let (c_out, n) = (40, 3);
    let kind = LayerKind::Conv2d {
        c_in: 16,
        c_out,
        kh: 3,
        kw: 3,
        bias: true,
    };
    let (lc, lg) = (cpu.add_layer(kind).unwrap(), gpu.add_layer(kind).unwrap());
    let [ho, wo] = g.output().unwrap();
    let a_view = Patches::new(g, n, TensorLayout::Nhwc);
    let g_view = Patches::positions(c_out, ho, wo, n, TensorLayout::Nchw);
    let d = kind.d_a() * kind.d_g();
    for step in 0..4 {
        let mut r = rng(60 + step);
        let input = normal(&mut r, a_view.span().unwrap());
        let grad = normal(&mut r, g_view.span().unwrap());
        let want = cpu.observe_conv(lc, &input, a_view, &grad, g_view).unwrap();
        let (di, dg) = (dev.upload(&input).unwrap(), dev.upload(&grad).unwrap());
        gpu.observe_conv_device(lg, &di.as_view(), a_view, &dg.as_view(), g_view)
            .unwrap();
        assert_eq!(gpu.last_decision(lg).unwrap(), want, "{norm:?} step {step}");
        let gw = normal(&mut r, d);
        let (mut oc, mut og) = (poisoned(d), poisoned(d));
        cpu.precondition(lc, &gw, &mut oc).unwrap();
        gpu.precondition(lg, &gw, &mut og).unwrap();
        let err = rel_err(&og, &f64s(&oc));
        assert!(err < 1e-4, "{norm:?} step {step}: {err:e}");
        cpu.finish_step();
        gpu.finish_step();
    }
    assert_eq!(cpu.counters(lc).unwrap(), gpu.counters(lg).unwrap());
}
