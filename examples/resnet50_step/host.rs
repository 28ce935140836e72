//! The factor step and the apply on the CPU backend, stage by stage.

use super::*;

pub(crate) fn run_cpu(a: &Args, m: &Model) -> Result<()> {
    let p = pattern();
    let inputs: Vec<Vec<f32>> = (0..m.set.len())
        .map(|f| fill(&p, m.input_len(f), f))
        .collect();
    let grads: Vec<Vec<f32>> = m
        .layers
        .iter()
        .enumerate()
        .map(|(l, x)| fill(&p, x.d_a * x.d_g, 1000 + l))
        .collect();
    let damping = 0.03f32;
    // THOR's whole factor step on the CPU: the same semantics, buffers and layer table as
    // the device step (accumulate every factor, the rule, the masked inversion, counters).
    let layers = RuleLayer::pairs(&m.set);
    let cfg = StepConfig::default();
    let mut step = CpuThorStep::new::<f32>(&m.set, &layers, cfg)?;
    let host_inputs: Vec<HostStepInput<'_, f32>> = inputs
        .iter()
        .enumerate()
        .map(|(f, x)| HostStepInput {
            x,
            layout: m.inputs[f],
        })
        .collect();
    let nb = m.set.total_blocks();
    let (mut t_step, mut t_inv) = (Vec::new(), Vec::new());
    let mut inv_all = vec![0.0f32; m.set.buffer_len()];
    let mut info = vec![0i32; nb];
    let mut ws = Workspace::new(cpu::invert_workspace_size(m.set.block(), nb));
    for _ in 0..a.reps {
        let t0 = Instant::now();
        step.run(&host_inputs, damping)?;
        let t1 = Instant::now();
        // The inversion of every block (the rule skips reused layers; this is the full cost).
        let opts = InvertOptions {
            damping: Damping::Uniform(damping.sqrt()),
            mask: None,
            ..InvertOptions::uniform(0.0)
        };
        cpu::invert(
            m.set.block(),
            step.stats(),
            &mut inv_all,
            &mut info,
            None,
            &opts,
            &mut ws,
        )?;
        t_step.push((t1 - t0).as_secs_f64() * 1e3);
        t_inv.push(t1.elapsed().as_secs_f64() * 1e3);
    }
    let (steps, hist) = step.history();
    let count = |d: Decision| {
        hist.last()
            .map_or(0, |r| r.iter().filter(|&&x| x == d).count())
    };
    println!(
        "{steps} factor steps; the last: {} updates, {} reuses, {} skipped (no launches, copies or synchronizations on the CPU)",
        count(Decision::Update),
        count(Decision::Reuse),
        count(Decision::Skipped)
    );
    let (stats, inv) = (step.stats(), step.inverses());
    let mut outs: Vec<Vec<f32>> = grads.iter().map(|g| vec![0.0; g.len()]).collect();
    let mut t_apply = Vec::new();
    let b = m.set.block();
    for _ in 0..a.reps {
        let t0 = Instant::now();
        for (l, lay) in m.layers.iter().enumerate() {
            let (ea, eg) = (&m.set.entries()[2 * l], &m.set.entries()[2 * l + 1]);
            let mut aws = Workspace::new(cpu::apply_workspace_size(Some(b), lay.d_g, lay.d_a));
            cpu::apply(
                Some((
                    &eg.layout,
                    &inv[eg.offset()..eg.offset() + eg.layout.buffer_len()],
                )),
                &grads[l],
                Some((
                    &ea.layout,
                    &inv[ea.offset()..ea.offset() + ea.layout.buffer_len()],
                )),
                lay.d_g,
                lay.d_a,
                1.0 / lay.positions as f32,
                &mut outs[l],
                &mut aws,
            )?;
        }
        t_apply.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut errs = Vec::new();
    for l in sampled(m) {
        let r = Results {
            stats,
            inv,
            grad: &grads[l],
            out: &outs[l],
        };
        errs.push(check_layer(m, l, &inputs, r, damping)?);
    }
    let worst = |i: usize| errs.iter().map(|e| [e.0, e.1, e.2][i]).fold(0.0, f64::max);
    let in_bytes = 4.0 * m.input_elems() as f64;
    let blk_bytes = 4.0 * m.set.buffer_len() as f64;
    let stages = vec![
        Stage {
            name: "factor step (accumulate 108, rule 54, masked invert)".into(),
            ms: median(t_step),
            flops: m.acc_flops(),
            bytes: in_bytes + blk_bytes,
            floor_ms: None,
            err: format!("rel {:.1e}", worst(0)),
        },
        Stage {
            name: format!("invert all {} blocks", m.set.total_blocks()),
            ms: median(t_inv),
            flops: (m.set.total_blocks() * b * b * b) as f64,
            bytes: 2.0 * blk_bytes,
            floor_ms: None,
            err: format!("residual {:.1e}", worst(1)),
        },
        Stage {
            name: "apply (54 layers)".into(),
            ms: median(t_apply),
            flops: m.apply_flops(),
            bytes: 8.0 * m.layers.iter().map(|l| l.d_a * l.d_g).sum::<usize>() as f64 + blk_bytes,
            floor_ms: None,
            err: format!("rel {:.1e}", worst(2)),
        },
    ];
    print_table(
        &format!(
            "CPU backend ({} threads), median of {}",
            rayon::current_num_threads(),
            a.reps
        ),
        &stages,
    );
    println!("(on the CPU every stage is a sequence of parallel loops; the launch count applies to the GPU step)");
    Ok(())
}
