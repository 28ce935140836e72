//! THOR's whole factor step and the preconditioner apply on the ResNet-50 v1.5 shape set
//! (54 layers, 108 factors), with random activations, on the chosen backend.
//!
//!     cargo run --release --example resnet50_step -- [--backend auto|cpu|cuda] [--batch N]
//!         [--block 64|128|256] [--precision f32|tf32|bf16] [--reps N]
//!
//! Prints per stage: time (median of --reps), achieved GFLOP/s and GB/s, on the GPU the
//! floor (the larger of flops / peak and bytes / bandwidth, with the H200 rates measured in
//! DESIGN.md section 5), the error against the f64 reference on sampled layers, and the
//! launch count of the step (constant: it does not grow with the number of layers).
//!
//! How the step is wired, for a training loop of your own: plan once
//! (`CudaDevice::new_thor_step` with the factor set, rows per factor and the rule's layers),
//! then each statistics step hand it the activation buffers and call
//! `run(dev, inputs, damping)` (or `run_graph`, which captures the step once and replays it;
//! writing new activations into the same buffers costs no host-device copy); the inverses
//! are in `inverses()`, and `apply` preconditions the gradients of every layer in one
//! launch.

use std::time::Instant;

use thor_kernels::cpu::{self, Damping, InvertOptions, Workspace};
use thor_kernels::layout::FactorSet;
use thor_kernels::reference;
use thor_kernels::rule::{self, Decision, RuleState, Thresholds};
use thor_kernels::shapes::{self, LayerShape};
use thor_kernels::{BackendKind, DType, Error, Result};

/// Accumulation precision.
#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
enum Precision {
    /// f32 inputs, f32 math on SIMT cores.
    F32,
    /// f32 inputs, TF32 tensor cores.
    Tf32,
    /// bf16 inputs, tensor cores.
    Bf16,
}

/// THOR's whole factor step and the apply on the ResNet-50 v1.5 shape set.
#[derive(clap::Parser)]
#[command(name = "resnet50_step")]
struct Args {
    /// Where to run: auto (the GPU when one is usable), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Batch size (default 32 on the GPU, 1 on the CPU).
    #[arg(long)]
    batch: Option<usize>,
    /// Block size: 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// Accumulation precision.
    #[arg(long, value_enum, default_value_t = Precision::F32)]
    precision: Precision,
    /// Timed repetitions (the median is printed).
    #[arg(long, default_value_t = 5)]
    reps: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let a = <Args as clap::Parser>::parse();
    if a.batch == Some(0) || a.reps == 0 {
        return Err("--batch and --reps must be at least 1".into());
    }
    if ![64, 128, 256].contains(&a.block) {
        return Err(format!("--block must be 64, 128 or 256, got {}", a.block));
    }
    Ok(a)
}

/// The workload: factor `2l` is layer `l`'s A, `2l + 1` its G.
struct Model {
    layers: Vec<LayerShape>,
    set: FactorSet,
    rows: Vec<usize>,
    dims: Vec<usize>,
}

impl Model {
    fn new(batch: usize, block: usize) -> Result<Self> {
        let layers = shapes::resnet50();
        let dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
        let rows: Vec<usize> = layers
            .iter()
            .flat_map(|l| [l.rows(batch), l.rows(batch)])
            .collect();
        Ok(Model {
            set: FactorSet::new(block, &dims)?,
            layers,
            rows,
            dims,
        })
    }

    /// Elements of all inputs.
    fn input_elems(&self) -> usize {
        self.rows.iter().zip(&self.dims).map(|(n, d)| n * d).sum()
    }

    /// Flops of the accumulation as counted for rates: 2 N d b per factor (the diagonal
    /// blocks; symmetry lets the kernels do a little more than half of it).
    fn acc_flops(&self) -> f64 {
        let b = self.set.block() as f64;
        self.rows
            .iter()
            .zip(&self.dims)
            .map(|(&n, &d)| 2.0 * n as f64 * d as f64 * b)
            .sum()
    }

    /// Flops of the apply: 2 b per gradient element and side.
    fn apply_flops(&self) -> f64 {
        let b = self.set.block() as f64;
        self.layers
            .iter()
            .map(|l| 4.0 * b * (l.d_a * l.d_g) as f64)
            .sum()
    }
}

/// Input `f`: a fixed normal sample repeated (gigabytes are filled in seconds), offset per
/// factor. The values only need to be finite and varied.
fn fill(pattern: &[f32], n: usize, f: usize) -> Vec<f32> {
    (0..n)
        .map(|i| pattern[(i + 7919 * f) % pattern.len()])
        .collect()
}

struct Stage {
    name: String,
    ms: f64,
    flops: f64,
    bytes: f64,
    floor_ms: Option<f64>,
    err: String,
}

fn print_table(title: &str, stages: &[Stage]) {
    println!("\n{title}");
    println!(
        "{:<34} {:>10} {:>12} {:>10} {:>10}  error vs f64 reference",
        "stage", "time ms", "GFLOP/s", "GB/s", "floor ms"
    );
    for s in stages {
        let floor = s.floor_ms.map_or("-".into(), |f| format!("{f:.3}"));
        println!(
            "{:<34} {:>10.3} {:>12.1} {:>10.1} {:>10}  {}",
            s.name,
            s.ms,
            s.flops / s.ms / 1e6,
            s.bytes / s.ms / 1e6,
            floor,
            s.err
        );
    }
}

fn rel_err(out: &[f32], r: &[f64]) -> f64 {
    let (mut n, mut d) = (0.0f64, 0.0f64);
    for (&o, &w) in out.iter().zip(r) {
        if !o.is_finite() {
            return f64::INFINITY;
        }
        n += (o as f64 - w).powi(2);
        d += w * w;
    }
    (n / d.max(1e-300)).sqrt()
}

/// Layers whose results are checked against the reference: the fc layer (A split into 17
/// blocks at b = 128, a padded last block) and the first bottleneck conv (many rows). The
/// reference is plain f64 loops, so larger layers would take minutes.
fn sampled(m: &Model) -> Vec<usize> {
    vec![m.layers.len() - 1, 1]
}

/// A layer's results to check: the set's statistics and inverses, its gradient and output.
struct Results<'a> {
    stats: &'a [f32],
    inv: &'a [f32],
    grad: &'a [f32],
    out: &'a [f32],
}

/// Errors of layer `l`'s statistics, inverses and apply against the reference.
fn check_layer(
    m: &Model,
    l: usize,
    inputs: &[Vec<f32>],
    r: Results<'_>,
    damping: f32,
) -> Result<(f64, f64, f64)> {
    let Results {
        stats,
        inv,
        grad,
        out,
    } = r;
    let b = m.set.block();
    let mut acc_err = 0.0f64;
    for f in [2 * l, 2 * l + 1] {
        let e = &m.set.entries()[f];
        let x: Vec<f64> = inputs[f].iter().map(|&v| v as f64).collect();
        let mut want = vec![0.0; e.layout.buffer_len()];
        let n = m.rows[f];
        reference::accumulate(&x, n, m.dims[f], &e.layout, 1.0 / n as f64, 0.0, &mut want)?;
        acc_err = acc_err.max(rel_err(
            &stats[e.offset()..e.offset() + e.layout.buffer_len()],
            &want,
        ));
    }
    let mut res = 0.0f64;
    let e0 = &m.set.entries()[2 * l];
    let e1 = &m.set.entries()[2 * l + 1];
    for k in e0.first_block..e1.first_block + e1.layout.blocks() {
        let s: Vec<f64> = stats[k * b * b..(k + 1) * b * b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let x: Vec<f64> = inv[k * b * b..(k + 1) * b * b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        res = res.max(reference::inverse_residual(
            &s,
            &x,
            b,
            (damping as f64).sqrt(),
        ));
    }
    let side = |e: &thor_kernels::FactorEntry| -> Vec<f64> {
        inv[e.offset()..e.offset() + e.layout.buffer_len()]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let (ga, aa) = (side(e1), side(e0));
    let g64: Vec<f64> = grad.iter().map(|&v| v as f64).collect();
    let lay = &m.layers[l];
    let scale = 1.0 / lay.positions as f64;
    let want: Vec<f64> = reference::apply(
        Some((&e1.layout, &ga)),
        &g64,
        Some((&e0.layout, &aa)),
        lay.d_g,
        lay.d_a,
    )?
    .into_iter()
    .map(|v| v * scale)
    .collect();
    Ok((acc_err, res, rel_err(out, &want)))
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e} (try --help)");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("resnet50_step failed: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<()> {
    let dev = match a.backend {
        BackendKind::Cpu => None,
        BackendKind::Cuda => Some(thor_kernels::cuda::CudaDevice::new(0)?),
        BackendKind::Auto => match thor_kernels::cuda::CudaDevice::new(0) {
            Ok(d) => Some(d),
            Err(e) => {
                println!("no GPU ({e}): running on the CPU backend");
                None
            }
        },
    };
    let batch = a.batch.unwrap_or(if dev.is_some() { 32 } else { 1 });
    let m = Model::new(batch, a.block)?;
    println!(
        "ResNet-50 v1.5 shape set: {} layers, {} factors, {} blocks of {b} x {b}, batch {batch}, {:.2} G input elements, precision {:?}",
        m.layers.len(),
        m.set.len(),
        m.set.total_blocks(),
        m.input_elems() as f64 / 1e9,
        a.precision,
        b = a.block,
    );
    match dev {
        Some(d) => run_cuda(a, &m, &d),
        None => {
            if a.precision != Precision::F32 {
                println!(
                    "the CPU backend computes in f32; --precision {:?} applies on the GPU only",
                    a.precision
                );
            }
            run_cpu(a, &m)
        }
    }
}

fn pattern() -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(50);
    (0..(1 << 20) + 3)
        .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}

fn median(mut t: Vec<f64>) -> f64 {
    t.sort_by(|a, b| a.total_cmp(b));
    t[t.len() / 2]
}

fn run_cpu(a: &Args, m: &Model) -> Result<()> {
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

fn run_cuda(a: &Args, m: &Model, dev: &thor_kernels::cuda::CudaDevice) -> Result<()> {
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
        .map(|f| fill(&p, m.rows[f] * m.dims[f], f))
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
        .zip(&m.dims)
        .map(|(x, &ld)| StepInput { x: x.as_view(), ld })
        .collect();
    let in16: Vec<StepInput<'_, half::bf16>> = x16
        .iter()
        .zip(&m.dims)
        .map(|(x, &ld)| StepInput { x: x.as_view(), ld })
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
