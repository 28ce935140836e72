//! The device factor step (launch by launch and as a CUDA graph) and the apply.

use super::*;

pub(crate) fn run_cuda(a: &Args, m: &Model, dev: &thor_kernels::cuda::CudaDevice) -> Result<()> {
    use thor_kernels::cuda::accumulate::AccumulateMode;
    use thor_kernels::cuda::apply::ApplyLayer;
    use thor_kernels::cuda::step::{DeviceThorStep, StepConfig, StepInput};
    use thor_kernels::cuda::{DeviceInvertOptions, RuleLayer};
    println!("device: {}", dev.name().unwrap_or_default());
    let (mode, dtype) = match a.precision {
        Precision::F32 => (AccumulateMode::F32, DType::F32),
        Precision::Tf32 => (AccumulateMode::TensorCore, DType::F32),
        Precision::Bf16 => (AccumulateMode::TensorCore, DType::BF16),
    };
    let p = pattern();
    let host: Vec<Vec<f32>> = (0..m.set.len())
        .map(|f| fill(&p, m.input_len(f), f))
        .collect();
    let layers = RuleLayer::pairs(&m.set);
    let cfg = StepConfig {
        mode,
        ..StepConfig::default()
    };
    let mut step = dev.new_thor_step(&m.set, &m.rows, dtype, &layers, cfg)?;
    let damping = 0.03f32;
    // Inputs: f32, or bf16 (the reference then sees the rounded values).
    let (x32, x16, used_inputs): (Vec<_>, Vec<_>, Vec<Vec<f32>>) = if dtype == DType::BF16 {
        let hb: Vec<Vec<half::bf16>> = host
            .iter()
            .map(|v| v.iter().map(|&x| half::bf16::from_f32(x)).collect())
            .collect();
        let rounded = hb
            .iter()
            .map(|v| v.iter().map(|x| x.to_f32()).collect())
            .collect();
        let d: Vec<_> = hb.iter().map(|v| dev.upload(v)).collect::<Result<_>>()?;
        (Vec::new(), d, rounded)
    } else {
        let d: Vec<_> = host.iter().map(|v| dev.upload(v)).collect::<Result<_>>()?;
        (d, Vec::new(), host.clone())
    };
    let in32: Vec<StepInput<'_, f32>> = x32
        .iter()
        .zip(&m.inputs)
        .map(|(x, &layout)| StepInput {
            x: x.as_view(),
            layout,
        })
        .collect();
    let in16: Vec<StepInput<'_, half::bf16>> = x16
        .iter()
        .zip(&m.inputs)
        .map(|(x, &layout)| StepInput {
            x: x.as_view(),
            layout,
        })
        .collect();
    // The step on this precision's inputs: all launches, a range of them, or the graph.
    let step_run = |step: &mut DeviceThorStep,
                    range: Option<std::ops::Range<usize>>,
                    graph: bool|
     -> Result<()> {
        let r = range.unwrap_or(0..DeviceThorStep::LAUNCHES);
        match (dtype == DType::BF16, graph) {
            (true, false) => step.run_launches(dev, &in16, damping, r),
            (true, true) => step.run_graph(dev, &in16, damping),
            (false, false) => step.run_launches(dev, &in32, damping, r),
            (false, true) => step.run_graph(dev, &in32, damping),
        }
    };
    let ctx = dev.context_handle();
    let time = |f: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
        f()?;
        dev.synchronize()?;
        let mut t = Vec::new();
        for _ in 0..a.reps {
            let s = ctx.new_event(None)?;
            let e = ctx.new_event(None)?;
            s.record(dev.stream())?;
            f()?;
            e.record(dev.stream())?;
            e.synchronize()?;
            t.push(s.elapsed_ms(&e)? as f64);
        }
        Ok(median(t))
    };
    // The whole step (rule-masked inversion), then each stage alone.
    let t_step = time(&mut || step_run(&mut step, None, false))?;
    println!(
        "factor step: {} launches for {} layers (3 accumulate, 1 trace rule, 1 inversion)",
        DeviceThorStep::LAUNCHES,
        m.layers.len(),
    );
    // Steady state, per step: what the step queues besides its kernels (after the warm-up
    // above the inputs are bound and the graph is captured).
    step_run(&mut step, None, true)?;
    for graph in [false, true] {
        let before = step.traffic();
        let n = 4;
        for _ in 0..n {
            step_run(&mut step, None, graph)?;
        }
        let t = step.traffic();
        println!(
            "steady state per step ({}): {} launches, {} host-device copies, {} syncs, {} captures",
            if graph { "graph" } else { "launches" },
            (t.launches - before.launches) / n,
            (t.uploads - before.uploads) / n,
            (t.syncs - before.syncs) / n,
            (t.captures - before.captures) / n,
        );
    }
    let t_acc = time(&mut || step_run(&mut step, Some(0..3), false))?;
    let t_rule = time(&mut || step_run(&mut step, Some(3..4), false))?;
    let b = m.set.block();
    let nb = m.set.total_blocks();
    let mut inv_all = dev.zeros::<f32>(m.set.buffer_len())?;
    let mut info = dev.zeros::<i32>(nb)?;
    let opts = DeviceInvertOptions::uniform(damping.sqrt());
    let t_inv = time(&mut || dev.invert(b, step.stats(), &mut inv_all, &mut info, None, &opts))?;
    // Apply to every layer's gradient, conv layers scaled by 1 / (Ho Wo).
    let apply_layers: Vec<ApplyLayer> = m
        .layers
        .iter()
        .enumerate()
        .map(|(l, x)| ApplyLayer {
            out_dim: x.d_g,
            in_dim: x.d_a,
            g_factor: Some(2 * l + 1),
            a_factor: Some(2 * l),
        })
        .collect();
    let mut aplan = dev.plan_apply(&m.set, &apply_layers, DType::F32)?;
    let grads_h: Vec<Vec<f32>> = m
        .layers
        .iter()
        .enumerate()
        .map(|(l, x)| fill(&p, x.d_a * x.d_g, 1000 + l))
        .collect();
    let grads: Vec<_> = grads_h
        .iter()
        .map(|g| dev.upload(g))
        .collect::<Result<_>>()?;
    let mut outs: Vec<_> = grads_h
        .iter()
        .map(|g| dev.zeros::<f32>(g.len()))
        .collect::<Result<_>>()?;
    let scales: Vec<f32> = m.layers.iter().map(|l| 1.0 / l.positions as f32).collect();
    let gviews: Vec<_> = grads.iter().map(|g| g.as_view()).collect();
    let t_apply = time(&mut || {
        let mut ov: Vec<_> = outs.iter_mut().map(|o| o.as_view_mut()).collect();
        dev.apply(&mut aplan, &inv_all, &gviews, &mut ov, &scales)
    })?;
    // Graph replay of the whole step.
    let t_graph = time(&mut || step_run(&mut step, None, true))?;
    // Errors on sampled layers: statistics, inverses (all blocks inverted) and the apply.
    let stats = dev.download(step.stats())?;
    let inv = dev.download(&inv_all)?;
    let mut errs = Vec::new();
    for l in sampled(m) {
        let out = dev.download(&outs[l])?;
        let r = Results {
            stats: &stats,
            inv: &inv,
            grad: &grads_h[l],
            out: &out,
        };
        errs.push(check_layer(m, l, &used_inputs, r, damping)?);
    }
    if errs
        .iter()
        .any(|e| !(e.0.is_finite() && e.1.is_finite() && e.2.is_finite()))
    {
        return Err(Error::invalid(
            "result",
            format!("non-finite error measure: {errs:?}"),
        ));
    }
    let worst = |i: usize| errs.iter().map(|e| [e.0, e.1, e.2][i]).fold(0.0, f64::max);
    // Floors from the H200 rates of DESIGN.md section 5.
    let (simt, tc, bw) = (51e12, 368e12, 4.27e12 / 2.0);
    let peak = if mode == AccumulateMode::F32 {
        simt
    } else {
        tc
    };
    let elem = if dtype == DType::BF16 { 2.0 } else { 4.0 };
    let in_bytes = elem * m.input_elems() as f64;
    let blk_bytes = 4.0 * m.set.buffer_len() as f64;
    let floor = |flops: f64, p: f64, bytes: f64| Some((flops / p).max(bytes / bw) * 1e3);
    let acc_flops_half = m.acc_flops() / 2.0;
    let inv_flops = (nb * b * b * b) as f64;
    let apply_bytes = 8.0 * m.layers.iter().map(|l| l.d_a * l.d_g).sum::<usize>() as f64;
    let stages = vec![
        Stage {
            name: "accumulate + traces (3 launches)".into(),
            ms: t_acc,
            flops: m.acc_flops(),
            bytes: in_bytes + blk_bytes,
            floor_ms: floor(acc_flops_half, peak, in_bytes + blk_bytes),
            err: format!("rel {:.1e}", worst(0)),
        },
        Stage {
            name: "trace rule (1 launch)".into(),
            ms: t_rule,
            flops: 0.0,
            bytes: 0.0,
            floor_ms: None,
            err: "-".into(),
        },
        Stage {
            name: format!("invert all {nb} blocks (1 launch)"),
            ms: t_inv,
            flops: inv_flops,
            bytes: 2.0 * blk_bytes,
            floor_ms: floor(inv_flops, simt, 2.0 * blk_bytes),
            err: format!("residual {:.1e}", worst(1)),
        },
        Stage {
            name: "factor step, rule-masked (5)".into(),
            ms: t_step,
            flops: m.acc_flops(),
            bytes: in_bytes + blk_bytes,
            floor_ms: None,
            err: "-".into(),
        },
        Stage {
            name: "factor step, graph replay".into(),
            ms: t_graph,
            flops: m.acc_flops(),
            bytes: in_bytes + blk_bytes,
            floor_ms: None,
            err: "-".into(),
        },
        Stage {
            name: "apply, 54 layers (1 launch)".into(),
            ms: t_apply,
            flops: m.apply_flops(),
            bytes: apply_bytes + blk_bytes,
            floor_ms: floor(m.apply_flops(), simt, apply_bytes + blk_bytes),
            err: format!("rel {:.1e}", worst(2)),
        },
    ];
    print_table(
        &format!("CUDA backend, median of {} (device events)", a.reps),
        &stages,
    );
    let dec = dev.download(step.decisions())?;
    let count = |c: i32| dec.iter().filter(|&&d| d == c).count();
    println!(
        "last rule decisions: {} update, {} reuse, {} freeze, {} frozen, {} skipped; step launches: {}",
        count(0),
        count(1),
        count(2),
        count(3),
        count(4),
        DeviceThorStep::LAUNCHES
    );
    Ok(())
}
