//! The factor step and the apply on the CPU backend, stage by stage.

use super::*;

pub(crate) fn run_cpu(a: &Args, m: &Model) -> Result<()> {
    let p = pattern();
    let inputs: Vec<Vec<f32>> = (0..m.set.len())
        .map(|f| fill(&p, m.rows[f] * m.dims[f], f))
        .collect();
    let grads: Vec<Vec<f32>> = m
        .layers
        .iter()
        .enumerate()
        .map(|(l, x)| fill(&p, x.d_a * x.d_g, 1000 + l))
        .collect();
    let damping = 0.03f32;
    let (nb, nf) = (m.set.total_blocks(), m.set.len());
    let mut stats = vec![0.0f32; m.set.buffer_len()];
    let mut inv = vec![0.0f32; m.set.buffer_len()];
    let (mut bt, mut ft, mut status) = (vec![0.0f32; nb], vec![0.0f32; nf], vec![0i32; nf]);
    let mut ws = Workspace::new(
        cpu::accumulate_set_workspace_size::<f32>(&m.set)
            .max(cpu::invert_workspace_size(m.set.block(), nb)),
    );
    let mut rule = vec![RuleState::default(); m.layers.len()];
    // A layer's A and G are kept or updated together (as the device step does).
    let partners: Vec<Option<usize>> = (0..m.set.len()).map(|f| Some(f ^ 1)).collect();
    let mut mask = vec![1u8; nb];
    let mut info = vec![0i32; nb];
    let (mut t_acc, mut t_rule, mut t_inv) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.reps {
        let t0 = Instant::now();
        let fi: Vec<cpu::FactorInput<'_, f32>> = inputs
            .iter()
            .enumerate()
            .map(|(f, x)| cpu::FactorInput {
                x,
                rows: m.rows[f],
                ld: m.dims[f],
                alpha: 1.0 / m.rows[f] as f32,
                beta: 0.0,
            })
            .collect();
        cpu::accumulate_set(
            &m.set,
            &fi,
            Some(&partners),
            &mut stats,
            &mut bt,
            &mut ft,
            &mut status,
            &mut ws,
        )?;
        let t1 = Instant::now();
        let s = (damping as f64).sqrt();
        for (l, st) in rule.iter_mut().enumerate() {
            let (fa, fg) = (2 * l, 2 * l + 1);
            let e = &m.set.entries()[fa];
            let blocks = e.layout.blocks() + m.set.entries()[fg].layout.blocks();
            if status[fa] != 0 || status[fg] != 0 {
                // Non-finite input: the layer is skipped, its inverses kept.
                mask[e.first_block..e.first_block + blocks].fill(0);
                continue;
            }
            let cur =
                (ft[fa] as f64 + s * m.dims[fa] as f64) * (ft[fg] as f64 + s * m.dims[fg] as f64);
            let d = rule::step(st, cur, Thresholds::THOR);
            mask[e.first_block..e.first_block + blocks].fill((d == Decision::Update) as u8);
        }
        let t2 = Instant::now();
        // Time the inversion of every block (the rule may skip some; this is the full cost).
        let opts = InvertOptions {
            damping: Damping::Uniform(damping.sqrt()),
            mask: None,
            ..InvertOptions::uniform(0.0)
        };
        cpu::invert(
            m.set.block(),
            &stats,
            &mut inv,
            &mut info,
            None,
            &opts,
            &mut ws,
        )?;
        let t3 = Instant::now();
        t_acc.push((t1 - t0).as_secs_f64() * 1e3);
        t_rule.push((t2 - t1).as_secs_f64() * 1e3);
        t_inv.push((t3 - t2).as_secs_f64() * 1e3);
    }
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
            stats: &stats,
            inv: &inv,
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
            name: "accumulate + traces (108 factors)".into(),
            ms: median(t_acc),
            flops: m.acc_flops(),
            bytes: in_bytes + blk_bytes,
            floor_ms: None,
            err: format!("rel {:.1e}", worst(0)),
        },
        Stage {
            name: "trace rule (54 layers)".into(),
            ms: median(t_rule),
            flops: 0.0,
            bytes: 0.0,
            floor_ms: None,
            err: "-".into(),
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
