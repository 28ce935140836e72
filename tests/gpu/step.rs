//! The trace rule, the whole device factor step (graph replay included) and the optimizer on
//! CUDA.

use super::*;
use thor_kernels::cuda::step::StepInput;

/// The step's inputs: every factor's whole buffer, row stride its dimension.
fn inputs<'a>(xs: &'a [cudarc::driver::CudaSlice<f32>], dims: &[usize]) -> Vec<StepInput<'a, f32>> {
    xs.iter()
        .zip(dims)
        .map(|(x, &ld)| StepInput::matrix(x.as_view(), x.len() / ld, ld))
        .collect()
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

#[test]
fn gpu_thor_step_pipeline_rule_skip_and_graph_replay() {
    use thor_kernels::cuda::step::{DeviceThorStep, StepConfig};
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
    // THOR's thresholds (w2 = 0): layers 1 and 2 see the same batch every step, so their
    // traces do not move; with THOR-stop they would freeze at step 1, and a frozen layer is
    // neither accumulated nor skipped (the NaN case below needs layer 1 live).
    let cfg = StepConfig {
        thresholds: thor_kernels::rule::Thresholds::THOR,
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
    assert_eq!(DeviceThorStep::LAUNCHES, 6);
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

/// The captured step is launched on the caller's stream and keeps its kernels loaded: the
/// same step driven from a second handle on another stream, and after a kernel reload,
/// computes the same statistics as plain launches; another damping captures anew.
#[test]
fn gpu_thor_step_graph_follows_the_callers_stream_and_survives_a_reload() {
    use thor_kernels::cuda::step::StepConfig;
    use thor_kernels::cuda::RuleLayer;
    let Some(mut dev) =
        gpu_or_skip("gpu_thor_step_graph_follows_the_callers_stream_and_survives_a_reload")
    else {
        return;
    };
    let (b, dims, rows) = (32, [45usize, 9], [64usize, 64]);
    let set = FactorSet::new(b, &dims).unwrap();
    let layers = RuleLayer::pairs(&set);
    let mut step = dev
        .new_thor_step(
            &set,
            &rows,
            thor_kernels::DType::F32,
            &layers,
            StepConfig::default(),
        )
        .unwrap();
    let mut r = rng(21);
    let xs: Vec<_> = dims
        .iter()
        .zip(&rows)
        .map(|(&d, &n)| dev.upload(&normal(&mut r, n * d)).unwrap())
        .collect();
    step.run(&dev, &inputs(&xs, &dims), 0.01).unwrap();
    let want = dev.download(step.stats()).unwrap();
    step.run_graph(&dev, &inputs(&xs, &dims), 0.01).unwrap();
    assert_eq!(dev.download(step.stats()).unwrap(), want, "captured");
    // A second handle on another stream of the same context: the replay runs there.
    let other = CudaDevice::from_stream(dev.context_handle().new_stream().unwrap()).unwrap();
    step.run_graph(&other, &inputs(&xs, &dims), 0.01).unwrap();
    assert_eq!(other.download(step.stats()).unwrap(), want, "other stream");
    // A reload drops the device's modules; the graph keeps its own.
    let source = dev.kernel_source();
    dev.set_kernel_source(source);
    step.run_graph(&dev, &inputs(&xs, &dims), 0.01).unwrap();
    assert_eq!(dev.download(step.stats()).unwrap(), want, "after a reload");
    // Another damping: the same graph (the damping is read from device memory), the same
    // statistics, and inverses of the new damping.
    step.run_graph(&dev, &inputs(&xs, &dims), 0.02).unwrap();
    assert_eq!(dev.download(step.stats()).unwrap(), want, "another damping");
    let (n, _) = step.history(&dev).unwrap();
    assert_eq!(n, 5);
    // One table upload (the inputs never moved), one capture, one plain step's launches
    // and four graph launches, one sync (the history).
    let t = step.traffic();
    assert_eq!(
        (t.uploads, t.captures, t.launches, t.syncs),
        (
            1,
            1,
            thor_kernels::cuda::step::DeviceThorStep::LAUNCHES as u64 + 4,
            1
        ),
        "{t:?}"
    );
}

/// The device step against `Thor` on the CPU over the scenario of tests/common/step_cases.rs
/// (the emulator runs the same one): decisions, counters, statistics and inverses after every
/// step, plain launches on even steps and graph replays on odd ones; the inputs are rewritten
/// in place, so the steady state uploads nothing.
#[test]
fn gpu_device_step_matches_the_optimizer_over_several_steps() {
    use thor_kernels::cuda::step::StepConfig;
    use thor_kernels::cuda::RuleLayer;
    let Some(dev) = gpu_or_skip("gpu_device_step_matches_the_optimizer_over_several_steps") else {
        return;
    };
    let sc = step_cases::StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    let cfg = StepConfig {
        stat_decay: sc.decay,
        thresholds: sc.thresholds,
        history: step_cases::STEPS,
        ..StepConfig::default()
    };
    let mut step = dev
        .new_thor_step(
            &set,
            &vec![sc.rows; set.len()],
            thor_kernels::DType::F32,
            &layers,
            cfg,
        )
        .unwrap();
    let mut xs: Vec<_> = sc.batch(0).iter().map(|x| dev.upload(x).unwrap()).collect();
    let (mut thor, ids) = sc.thor();
    for k in 0..step_cases::STEPS {
        sc.observe(&mut thor, &ids, k);
        for (x, h) in xs.iter_mut().zip(sc.batch(k)) {
            dev.stream().memcpy_htod(&h, x).unwrap();
        }
        if k % 2 == 0 {
            step.run(&dev, &inputs(&xs, &dims), sc.damping).unwrap();
        } else {
            step.run_graph(&dev, &inputs(&xs, &dims), sc.damping)
                .unwrap();
        }
        let counters: Vec<u64> = step
            .counters(&dev)
            .unwrap()
            .iter()
            .flat_map(|c| c.to_array())
            .collect();
        sc.check(
            k,
            &thor,
            &ids,
            &dev.download(step.decisions()).unwrap(),
            &counters,
            &dev.download(step.stats()).unwrap(),
            &dev.download(step.inverses()).unwrap(),
            &dev.download(step.status()).unwrap(),
        );
    }
    let (n, hist) = step.history(&dev).unwrap();
    assert_eq!(n, step_cases::STEPS as u64);
    for (k, row) in hist.iter().enumerate() {
        for (l, d) in row.iter().enumerate() {
            assert_eq!(*d, sc.want[l][k], "history, layer {l} step {k}");
        }
    }
    // One factor table upload: the inputs never moved.
    assert_eq!(step.traffic().uploads, 1);
}

/// The optimizer resident on the device, fed from device memory (strided activations, a
/// layer with bias so the ones column is added on the device, one without so its inputs
/// are read in place), against the optimizer on the CPU fed the same batches: decisions,
/// counters and preconditioned gradients (applied on the device) over several steps.
#[test]
fn gpu_thor_device_inputs_match_the_cpu_optimizer() {
    use thor_kernels::backend::AnyBackend;
    use thor_kernels::rule::Decision;
    use thor_kernels::thor::{DampingSchedule, IntervalSchedule, LayerKind, Thor, ThorConfig};
    use thor_kernels::BackendKind;
    if gpu_or_skip("gpu_thor_device_inputs_match_the_cpu_optimizer").is_none() {
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
    let dev = CudaDevice::new(0).unwrap();
    let stream = dev.stream().clone();
    let mut gpu = Thor::with_backend(
        cfg(BackendKind::Cuda),
        AnyBackend::Cuda(Box::new(CudaDevice::from_stream(stream).unwrap())),
    )
    .unwrap();
    let mut cpu = Thor::new(cfg(BackendKind::Cpu)).unwrap();
    let kinds = [
        LayerKind::Linear {
            inputs: 40,
            outputs: 70,
            bias: true,
        },
        LayerKind::Linear {
            inputs: 33,
            outputs: 9,
            bias: false,
        },
    ];
    let ids: Vec<_> = kinds
        .iter()
        .map(|&k| (cpu.add_layer(k).unwrap(), gpu.add_layer(k).unwrap()))
        .collect();
    for &(c, g) in &ids {
        assert_eq!(
            cpu.last_decision(c).unwrap(),
            Decision::Skipped,
            "no step yet"
        );
        assert_eq!(
            gpu.last_decision(g).unwrap(),
            Decision::Skipped,
            "no step yet"
        );
    }
    let mut r = rng(44);
    let rows = 50;
    for step in 0..4 {
        for (l, k) in kinds.iter().enumerate() {
            let (inputs, d_g, d_a) = (k.inputs(), k.d_g(), k.d_a());
            // Activations with a row stride of inputs + 3 on the device.
            let ld = inputs + 3;
            let acts = normal(&mut r, rows * inputs);
            let mut strided = vec![0.0f32; rows * ld];
            for i in 0..rows {
                strided[i * ld..i * ld + inputs]
                    .copy_from_slice(&acts[i * inputs..(i + 1) * inputs]);
            }
            let mut grads = normal(&mut r, rows * d_g);
            if step == 2 && l == 1 {
                grads[3] = f32::NAN;
            }
            let (da, dg) = (dev.upload(&strided).unwrap(), dev.upload(&grads).unwrap());
            let want = cpu.observe(ids[l].0, &acts, &grads, rows).unwrap();
            gpu.observe_device(ids[l].1, &da.as_view(), ld, &dg.as_view(), d_g, rows)
                .unwrap();
            assert_eq!(
                gpu.last_decision(ids[l].1).unwrap(),
                want,
                "step {step} layer {l}"
            );
            assert_eq!(
                gpu.counters(ids[l].1).unwrap(),
                cpu.counters(ids[l].0).unwrap()
            );
            let g = normal(&mut r, d_g * d_a);
            let mut uc = vec![0.0; g.len()];
            cpu.precondition(ids[l].0, &g, &mut uc).unwrap();
            // In place through the raw form (as the C ABI calls it).
            let mut inplace = dev.upload(&g).unwrap();
            {
                use cudarc::driver::DevicePtrMut;
                let s = dev.stream().clone();
                let (p, _g) = inplace.device_ptr_mut(&s);
                // SAFETY: `inplace` holds the layer's d_g x d_a f32 on this device.
                unsafe { gpu.precondition_device_raw(ids[l].1, p, p).unwrap() };
            }
            assert!(
                rel_err(&dev.download(&inplace).unwrap(), &f64s(&uc)) < 1e-4,
                "in place, step {step} layer {l}"
            );
            let dgr = dev.upload(&g).unwrap();
            let mut dout = dev.zeros::<f32>(g.len()).unwrap();
            gpu.precondition_device(ids[l].1, &dgr.as_view(), &mut dout.as_view_mut())
                .unwrap();
            let ug = dev.download(&dout).unwrap();
            assert!(rel_err(&ug, &f64s(&uc)) < 1e-4, "step {step} layer {l}");
        }
        cpu.finish_step();
        gpu.finish_step();
    }
    // The state comes down bit for bit as the optimizer saves it, and goes back up.
    let saved = gpu.to_bytes().unwrap();
    let mut again = Thor::new(cfg(BackendKind::Cuda)).unwrap();
    for k in &kinds {
        again.add_layer(*k).unwrap();
    }
    again.load_bytes(&saved).unwrap();
    assert_eq!(again.to_bytes().unwrap(), saved);
}

/// What one rank of a distributed device step saw at each step: decisions, counters,
/// statistics (gathered), inverses and statuses.
type RankSteps = Vec<(Vec<i32>, Vec<u64>, Vec<f32>, Vec<f32>, Vec<i32>)>;

/// The scenario's steps on one rank of `world` (rows `splits[rank]..splits[rank + 1]` of
/// every batch), through `comm`; with `updated_only`, the all-gather of updated inverses.
fn distributed_rank(
    dev: &thor_kernels::cuda::CudaDevice,
    sc: &step_cases::StepScenario,
    splits: &[usize],
    comm: Box<dyn thor_kernels::cuda::dist::DeviceCommunicator>,
    updated_only: bool,
) -> RankSteps {
    use thor_kernels::cuda::step::StepConfig;
    use thor_kernels::cuda::RuleLayer;
    let rank = comm.rank();
    let set = sc.set();
    let dims = sc.flat_dims();
    let (lo, hi) = (splits[rank], splits[rank + 1]);
    let cfg = StepConfig {
        stat_decay: sc.decay,
        thresholds: sc.thresholds,
        history: step_cases::STEPS,
        ..StepConfig::default()
    };
    let mut step = dev
        .new_distributed_thor_step(
            &set,
            &vec![hi - lo; set.len()],
            thor_kernels::DType::F32,
            &RuleLayer::pairs(&set),
            cfg,
            comm,
        )
        .unwrap();
    step.set_gather_updated_only(updated_only).unwrap();
    let mut out = Vec::new();
    for k in 0..step_cases::STEPS {
        let xs: Vec<_> = sc
            .batch(k)
            .iter()
            .zip(&dims)
            .map(|(x, &d)| dev.upload(&x[lo * d..hi * d]).unwrap())
            .collect();
        // Every other step through run_graph: a distributed step runs it eagerly.
        if k % 2 == 0 {
            step.run(dev, &inputs(&xs, &dims), sc.damping).unwrap();
        } else {
            step.run_graph(dev, &inputs(&xs, &dims), sc.damping)
                .unwrap();
        }
        step.gather_statistics(dev).unwrap();
        step.check_group(dev).unwrap();
        let counters: Vec<u64> = step
            .counters(dev)
            .unwrap()
            .iter()
            .flat_map(|c| c.to_array())
            .collect();
        out.push((
            dev.download(step.decisions()).unwrap(),
            counters,
            dev.download(step.stats()).unwrap(),
            dev.download(step.inverses()).unwrap(),
            dev.download(step.status()).unwrap(),
        ));
    }
    assert_eq!(
        step.traffic().captures,
        0,
        "a distributed step is not captured"
    );
    out
}

/// Every rank's steps against `Thor` on the CPU fed the whole batches; the inverses
/// identical on every rank.
fn check_ranks(sc: &step_cases::StepScenario, ranks: &[RankSteps]) {
    let (mut thor, ids) = sc.thor();
    for k in 0..step_cases::STEPS {
        sc.observe(&mut thor, &ids, k);
        for (r, steps) in ranks.iter().enumerate() {
            let (d, c, s, i, st) = &steps[k];
            sc.check(k, &thor, &ids, d, c, s, i, st);
            assert!(
                i.iter()
                    .zip(&ranks[0][k].3)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "rank {r}'s inverses differ from rank 0's at step {k}"
            );
        }
    }
}

/// The distributed device step on 2 and 3 ranks (threads, each with its own device handle
/// on GPU 0, collectives staged through the host by the in-process group), uneven rows,
/// against the optimizer on the union of the batches.
#[test]
fn gpu_distributed_device_step_matches_the_optimizer_on_the_union() {
    use std::time::Duration;
    use thor_kernels::cuda::dist::HostStagedComm;
    use thor_kernels::cuda::CudaDevice;
    use thor_kernels::dist::LocalGroup;
    if gpu_or_skip("gpu_distributed_device_step_matches_the_optimizer_on_the_union").is_none() {
        return;
    }
    let sc = step_cases::StepScenario::new();
    for splits in [vec![0usize, 40, 64], vec![0, 30, 50, 64]] {
        let world = splits.len() - 1;
        let ranks = LocalGroup::run(world, Duration::from_secs(60), |c| {
            let dev = CudaDevice::new(0).unwrap();
            let comm = Box::new(HostStagedComm::new(Box::new(c)));
            distributed_rank(&dev, &sc, &splits, comm, world == 3)
        })
        .unwrap();
        check_ranks(&sc, &ranks);
    }
}

/// The distributed device step through NCCL on one rank (the collectives queued on the
/// stream), against the optimizer; skipped with a note where libnccl is not installed.
#[test]
fn gpu_distributed_device_step_over_nccl_world_1() {
    use thor_kernels::cuda::dist::NcclComm;
    let Some(dev) = gpu_or_skip("gpu_distributed_device_step_over_nccl_world_1") else {
        return;
    };
    let comm = match NcclComm::single(&dev) {
        Ok(c) => c,
        // A machine without libnccl: the path is not there to test (THOR_REQUIRE_GPU does
        // not ask for NCCL).
        Err(thor_kernels::Error::NoDevice(why)) => {
            skip_note!("SKIPPED gpu_distributed_device_step_over_nccl_world_1: {why}");
            return;
        }
        Err(e) => panic!("NCCL on one rank: {e}"),
    };
    let sc = step_cases::StepScenario::new();
    let ranks = vec![distributed_rank(
        &dev,
        &sc,
        &[0, sc.rows],
        Box::new(comm),
        false,
    )];
    check_ranks(&sc, &ranks);
}

/// `Thor` on CUDA on each rank of a group against one `Thor` on the CPU fed the union of
/// the batches: decisions, preconditioned gradients, and (after gathering) the same saved
/// state on every rank; a save before gathering is refused, naming `gather_statistics`.
/// Through the host-staged in-process group on 2 and 3 ranks, and through NCCL on one rank
/// where libnccl is installed.
#[test]
fn gpu_distributed_thor_on_cuda_matches_one_optimizer() {
    use std::time::Duration;
    use thor_kernels::dist::{Communicator, LocalGroup};
    use thor_kernels::rule::Decision;
    use thor_kernels::thor::{
        DampingSchedule, IntervalSchedule, LayerId, LayerKind, Thor, ThorConfig,
    };
    use thor_kernels::BackendKind;
    let Some(dev) = gpu_or_skip("gpu_distributed_thor_on_cuda_matches_one_optimizer") else {
        return;
    };
    const LAYERS: [(usize, usize, bool); 2] = [(70, 20, true), (20, 33, false)];
    const ROWS: usize = 48;
    let config = |backend| ThorConfig {
        block: 32,
        stat_decay: 0.8,
        damping: DampingSchedule::Constant(1e-2),
        interval: IntervalSchedule::Fixed(1),
        backend,
        ..ThorConfig::thor()
    };
    let add = |t: &mut Thor| {
        for (i, o, bias) in LAYERS {
            t.add_layer(LayerKind::Linear {
                inputs: i,
                outputs: o,
                bias,
            })
            .unwrap();
        }
    };
    let mut r = rng(9);
    let grads: Vec<Vec<f32>> = LAYERS
        .iter()
        .map(|&(i, o, bias)| normal(&mut r, o * (i + usize::from(bias))))
        .collect();
    // Every third step repeats the previous batch (the rule reuses).
    let batch = |k: usize| {
        let mut r = rng(100 + (k - usize::from(k % 3 == 2)) as u64);
        LAYERS
            .iter()
            .map(|&(i, o, _)| (normal(&mut r, ROWS * i), normal(&mut r, ROWS * o)))
            .collect::<Vec<_>>()
    };
    type Steps = Vec<(Vec<Decision>, Vec<Vec<f32>>)>;
    let run = |t: &mut Thor, rows: std::ops::Range<usize>| -> Steps {
        (0..5)
            .map(|k| {
                let b = batch(k);
                let d = LAYERS
                    .iter()
                    .zip(&b)
                    .enumerate()
                    .map(|(l, (&(i, o, _), (a, g)))| {
                        t.observe(
                            LayerId(l),
                            &a[rows.start * i..rows.end * i],
                            &g[rows.start * o..rows.end * o],
                            rows.len(),
                        )
                        .unwrap()
                    })
                    .collect();
                let p = grads
                    .iter()
                    .enumerate()
                    .map(|(l, g)| {
                        let mut out = poisoned(g.len());
                        t.precondition(LayerId(l), g, &mut out).unwrap();
                        out
                    })
                    .collect();
                t.finish_step();
                (d, p)
            })
            .collect()
    };
    let mut one = Thor::new(config(BackendKind::Cpu)).unwrap();
    add(&mut one);
    let want = run(&mut one, 0..ROWS);
    let check = |what: &str, got: &Steps| {
        for (k, ((d, p), (wd, wp))) in got.iter().zip(&want).enumerate() {
            assert_eq!(d, wd, "{what}: decisions at step {k}");
            for (l, (g, w)) in p.iter().zip(wp).enumerate() {
                let err = rel_err(g, &f64s(w));
                assert!(err <= 1e-4, "{what}: layer {l} step {k}: {err:e}");
            }
        }
    };
    for splits in [vec![0usize, 20, 48], vec![0, 10, 30, 48]] {
        let world = splits.len() - 1;
        let out = LocalGroup::run(world, Duration::from_secs(60), |comm| {
            let rank = comm.rank();
            let mut t = Thor::with_communicator(config(BackendKind::Cuda), Box::new(comm)).unwrap();
            add(&mut t);
            let steps = run(&mut t, splits[rank]..splits[rank + 1]);
            let refused = t.to_bytes().unwrap_err();
            t.gather_statistics().unwrap();
            (
                steps,
                refused,
                t.to_bytes().unwrap(),
                t.owned_blocks().unwrap(),
            )
        })
        .unwrap();
        let owned: usize = out.iter().map(|o| o.3).sum();
        assert_eq!(owned, 3 + 1 + 1 + 2, "every block owned once");
        for (rank, (steps, refused, bytes, _)) in out.iter().enumerate() {
            check(&format!("world {world} rank {rank}"), steps);
            assert!(
                matches!(
                    refused,
                    thor_kernels::Error::InvalidArgument {
                        arg: "gather_statistics",
                        ..
                    }
                ),
                "{refused}"
            );
            assert!(
                bytes == &out[0].2,
                "world {world} rank {rank}: saved state differs"
            );
        }
    }
    match thor_kernels::cuda::dist::NcclComm::single(&dev) {
        Ok(comm) => {
            let mut t =
                Thor::with_device_communicator(config(BackendKind::Cuda), dev, Box::new(comm))
                    .unwrap();
            add(&mut t);
            check("NCCL world 1", &run(&mut t, 0..ROWS));
        }
        Err(thor_kernels::Error::NoDevice(why)) => {
            skip_note!("SKIPPED the NCCL part of gpu_distributed_thor_on_cuda_matches_one_optimizer: {why}");
        }
        Err(e) => panic!("NCCL on one rank: {e}"),
    }
}
