//! The crate's operations on the ResNet-50 v1.5 shape set (54 layers, 108 factors; 654
//! blocks at b = 128), each timed and checked against the f64 reference on a sampled layer.
//!
//!     cargo run --release --example resnet50_ops -- [--backend auto|cpu|cuda] [--batch N]
//!         [--block 32|64|128|256] [--reps N]
//!
//! Split and trace run on the chosen backend (the GPU when one is usable, through the
//! [`Backend`] trait) and on the CPU; invert runs on the GPU when there is one and on the
//! CPU; accumulate and apply run on the CPU backend.
//! Prints a table: op, backend, work, time (median), rate, error against the reference.

use std::time::Instant;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use thor_kernels::backend::{AnyBackend, Backend, CpuBackend};
use thor_kernels::cpu::{self, InvertOptions, Workspace};
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::shapes::{self, LayerShape};
use thor_kernels::{reference, BackendKind, Result};

/// The kernel-level operations one by one on the ResNet-50 v1.5 shape set.
#[derive(clap::Parser)]
#[command(name = "resnet50_ops")]
struct Args {
    /// Where to run: auto (the GPU when one is usable), cpu or cuda.
    #[arg(long, default_value = "auto")]
    backend: BackendKind,
    /// Batch size (rows per conv factor = batch x output positions).
    #[arg(long, default_value_t = 4)]
    batch: usize,
    /// Block size: 32, 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// Timed repetitions (the median is printed).
    #[arg(long, default_value_t = 3)]
    reps: usize,
}

fn parse_args() -> std::result::Result<Args, String> {
    let a = <Args as clap::Parser>::parse();
    if a.batch == 0 || a.reps == 0 {
        return Err("--batch and --reps must be at least 1".into());
    }
    thor_kernels::layout::check_block_size(a.block).map_err(|e| e.to_string())?;
    Ok(a)
}

struct Row {
    op: &'static str,
    backend: String,
    work: String,
    ms: f64,
    rate: String,
    err: String,
}

fn normal(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| rng.sample::<f32, _>(StandardNormal))
        .collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

fn rel_err(out: &[f32], r: &[f64]) -> f64 {
    let (mut n, mut d) = (0.0, 0.0);
    for (&o, &w) in out.iter().zip(r) {
        n += (o as f64 - w).powi(2);
        d += w * w;
    }
    if out.iter().any(|v| !v.is_finite()) {
        f64::INFINITY
    } else {
        (n / d.max(f64::MIN_POSITIVE)).sqrt()
    }
}

/// Median wall time in ms of `reps` runs of `f` (after one warm-up run).
fn time_ms(reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let s = Instant::now();
            f().map(|_| s.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn gb_s(bytes: f64, ms: f64) -> String {
    format!("{:.1} GB/s", bytes / ms / 1e6)
}

fn gflop_s(flops: f64, ms: f64) -> String {
    format!("{:.1} GFLOP/s", flops / ms / 1e6)
}

/// Split, merge and traces through the [`Backend`] trait.
fn backend_ops<B: Backend>(
    be: &B,
    a: &Args,
    split_dims: &[usize],
    all_dims: &[usize],
    rows: &mut Vec<Row>,
) -> Result<()> {
    let name = be.name();
    let b = a.block;
    let mut rng = StdRng::seed_from_u64(11);
    // Split: every factor of dimension <= 2304 (all ResNet-50 factors would be 615 MB dense).
    eprintln!(
        "[{name}] split / merge of {} dense factors ...",
        split_dims.len()
    );
    let layouts: Vec<BlockLayout> = split_dims
        .iter()
        .map(|&d| BlockLayout::new(d, b))
        .collect::<Result<_>>()?;
    let dense_host: Vec<Vec<f32>> = split_dims
        .iter()
        .map(|&d| normal(&mut rng, d * d))
        .collect();
    let dense: Vec<B::Buffer> = dense_host
        .iter()
        .map(|h| be.upload(h))
        .collect::<Result<_>>()?;
    let mut blocks: Vec<B::Buffer> = layouts
        .iter()
        .map(|l| be.upload(&vec![f32::NAN; l.buffer_len()]))
        .collect::<Result<_>>()?;
    let ms = time_ms(a.reps, || {
        for ((d, l), o) in dense.iter().zip(&layouts).zip(blocks.iter_mut()) {
            be.split(d, l.dim(), l, o)?;
        }
        be.synchronize()
    })?;
    let bytes: f64 = layouts
        .iter()
        .map(|l| 2.0 * 4.0 * l.buffer_len() as f64)
        .sum();
    let k = layouts.len() / 2;
    let mut got = vec![0.0; layouts[k].buffer_len()];
    be.download(&blocks[k], &mut got)?;
    let want = reference::split(&f64s(&dense_host[k]), &layouts[k])?;
    rows.push(Row {
        op: "split",
        backend: name.clone(),
        work: format!("{} factors, {:.0} MB blocks", layouts.len(), bytes / 2e6),
        ms,
        rate: gb_s(bytes, ms),
        err: format!("{:.1e} (d={})", rel_err(&got, &want), layouts[k].dim()),
    });
    let mut merged: Vec<B::Buffer> = split_dims
        .iter()
        .map(|&d| be.zeros(d * d))
        .collect::<Result<_>>()?;
    let ms = time_ms(a.reps, || {
        for ((bl, l), o) in blocks.iter().zip(&layouts).zip(merged.iter_mut()) {
            be.merge(bl, l, o, l.dim())?;
        }
        be.synchronize()
    })?;
    let mbytes: f64 = layouts
        .iter()
        .map(|l| 4.0 * (l.buffer_len() + l.dim() * l.dim()) as f64)
        .sum();
    let mut got = vec![0.0; split_dims[k] * split_dims[k]];
    be.download(&merged[k], &mut got)?;
    let want = reference::merge(&want, &layouts[k])?;
    rows.push(Row {
        op: "merge",
        backend: name.clone(),
        work: format!("{} factors", layouts.len()),
        ms,
        rate: gb_s(mbytes, ms),
        err: format!("{:.1e} (d={})", rel_err(&got, &want), layouts[k].dim()),
    });

    eprintln!("[{name}] traces of the whole factor set ...");
    let set = FactorSet::new(b, all_dims)?;
    let host_blocks = normal(&mut rng, set.buffer_len());
    let prepared = be.prepare_set(&set)?;
    let dblocks = be.upload(&host_blocks)?;
    let mut bt = be.zeros(set.total_blocks())?;
    let mut ft = be.zeros(set.len())?;
    let ms = time_ms(a.reps.max(10), || {
        be.traces(&prepared, &dblocks, &mut bt, &mut ft)?;
        be.synchronize()
    })?;
    let mut got = vec![0.0; set.len()];
    be.download(&ft, &mut got)?;
    let want = reference::factor_traces(&set, &f64s(&host_blocks))?;
    let max_abs = got
        .iter()
        .zip(&want)
        .map(|(g, w)| (*g as f64 - w).abs())
        .fold(0.0, f64::max);
    rows.push(Row {
        op: "trace",
        backend: name,
        work: format!("{} factors, {} blocks", set.len(), set.total_blocks()),
        ms,
        rate: gb_s((set.total_blocks() * b * 4) as f64, ms),
        err: format!("{max_abs:.1e} abs (sums of N(0,1))"),
    });
    Ok(())
}

/// The batched inversion of every block of the set on the GPU.
fn gpu_invert(
    dev: &thor_kernels::cuda::CudaDevice,
    a: &Args,
    all_dims: &[usize],
    rows: &mut Vec<Row>,
) -> Result<()> {
    let b = a.block;
    eprintln!("[gpu] invert all blocks ...");
    let set = FactorSet::new(b, all_dims)?;
    let nb = set.total_blocks();
    // SPD blocks: X^T X / n + I per block, from 2b random rows.
    let layout = BlockLayout::new(nb * b, b)?;
    let mut rng = StdRng::seed_from_u64(5);
    let x = normal(&mut rng, 2 * b * nb * b);
    let mut host = vec![0.0; layout.buffer_len()];
    let mut tr = vec![0.0; nb];
    cpu::accumulate(
        &x,
        2 * b,
        nb * b,
        &layout,
        1.0 / (2 * b) as f32,
        0.0,
        &mut host,
        &mut tr,
        &mut Workspace::new(0),
    )?;
    let input = dev.upload(&host)?;
    let mut out = dev.upload(&vec![f32::NAN; host.len()])?;
    let mut info = dev.zeros::<i32>(nb)?;
    let opts = thor_kernels::cuda::DeviceInvertOptions::uniform(0.03);
    let ms = time_ms(a.reps.max(10), || {
        dev.invert(b, &input, &mut out, &mut info, None, &opts)?;
        dev.synchronize()
    })?;
    thor_kernels::invert::check_info(&dev.download(&info)?)?;
    let got = dev.download(&out)?;
    let j = nb / 2;
    let blk = |v: &[f32]| f64s(&v[j * b * b..(j + 1) * b * b]);
    let (want, _) = reference::invert_blocks(&blk(&host), b, &[0.03])?;
    let resid = reference::inverse_residual(&blk(&host), &blk(&got), b, 0.03);
    rows.push(Row {
        op: "invert",
        backend: Backend::name(dev),
        work: format!("{nb} blocks of {b}"),
        ms,
        rate: gflop_s((nb * b * b * b) as f64, ms),
        err: format!(
            "{:.1e}, residual {resid:.1e}",
            rel_err(&got[j * b * b..(j + 1) * b * b], &want)
        ),
    });
    Ok(())
}

fn cpu_only_ops(a: &Args, layers: &[LayerShape], rows: &mut Vec<Row>) -> Result<()> {
    let b = a.block;
    let mut rng = StdRng::seed_from_u64(7);
    let name = CpuBackend.name();

    // Accumulate every A and G factor: S <- 0.95 S + X^T X / N.
    eprintln!("[cpu] accumulate 108 factors at batch {} ...", a.batch);
    struct F {
        x: Vec<f32>,
        n: usize,
        layout: BlockLayout,
    }
    let factors: Vec<F> = layers
        .iter()
        .flat_map(|l| [l.d_a, l.d_g].map(|d| (d, l.rows(a.batch))))
        .map(|(d, n)| {
            Ok(F {
                x: normal(&mut rng, n * d),
                n,
                layout: BlockLayout::new(d, b)?,
            })
        })
        .collect::<Result<_>>()?;
    let mut stats: Vec<Vec<f32>> = factors
        .iter()
        .map(|f| vec![0.0; f.layout.buffer_len()])
        .collect();
    let mut traces: Vec<Vec<f32>> = factors
        .iter()
        .map(|f| vec![0.0; f.layout.blocks()])
        .collect();
    let mut ws = Workspace::new(0);
    let ms = time_ms(a.reps, || {
        for ((f, s), t) in factors.iter().zip(stats.iter_mut()).zip(traces.iter_mut()) {
            cpu::accumulate(
                &f.x,
                f.n,
                f.layout.dim(),
                &f.layout,
                1.0 / f.n as f32,
                0.0,
                s,
                t,
                &mut ws,
            )?;
        }
        Ok(())
    })?;
    let flops: f64 = factors
        .iter()
        .map(|f| 2.0 * f.n as f64 * (f.layout.blocks() * b * b) as f64)
        .sum();
    let xbytes: f64 = factors
        .iter()
        .map(|f| 4.0 * (f.n * f.layout.dim()) as f64)
        .sum();
    // Sampled: layer3.0.conv2's A factor.
    let k = 2 * layers
        .iter()
        .position(|l| l.name == "layer3.0.conv2")
        .unwrap_or(0);
    let f = &factors[k];
    let mut want = vec![0.0; f.layout.buffer_len()];
    reference::accumulate(
        &f64s(&f.x),
        f.n,
        f.layout.dim(),
        &f.layout,
        1.0 / f.n as f64,
        0.0,
        &mut want,
    )?;
    rows.push(Row {
        op: "accumulate",
        backend: name.clone(),
        work: format!("108 factors, X {:.2} GB", xbytes / 1e9),
        ms,
        rate: gflop_s(flops, ms),
        err: format!(
            "{:.1e} ({} A)",
            rel_err(&stats[k], &want),
            layers[k / 2].name
        ),
    });

    // Invert every block of every factor (one FactorSet), damping 0.03 per factor.
    eprintln!("[cpu] invert all blocks ...");
    let dims: Vec<usize> = factors.iter().map(|f| f.layout.dim()).collect();
    let set = FactorSet::new(b, &dims)?;
    let all: Vec<f32> = stats.concat();
    let damping = set.damping_per_block(&vec![0.03; set.len()])?;
    let mut inv = vec![0.0; set.buffer_len()];
    let mut info = vec![0; set.total_blocks()];
    let mut ws = Workspace::new(cpu::invert_workspace_size(b, set.total_blocks()));
    let ms = time_ms(a.reps, || {
        cpu::invert(
            b,
            &all,
            &mut inv,
            &mut info,
            None,
            &InvertOptions::per_block(&damping),
            &mut ws,
        )
    })?;
    cpu::check_info(&info)?;
    let j = set.entries()[k].first_block;
    let blk = |v: &[f32]| v[j * b * b..(j + 1) * b * b].to_vec();
    let (want, _) = reference::invert_blocks(&f64s(&blk(&all)), b, &[0.03])?;
    let resid = reference::inverse_residual(&f64s(&blk(&all)), &f64s(&blk(&inv)), b, 0.03);
    rows.push(Row {
        op: "invert",
        backend: name.clone(),
        work: format!("{} blocks of {b}", set.total_blocks()),
        ms,
        rate: gflop_s((set.total_blocks() * b * b * b) as f64, ms),
        err: format!("{:.1e}, residual {resid:.1e}", rel_err(&blk(&inv), &want)),
    });

    // Apply to every layer's gradient.
    eprintln!("[cpu] apply to all 54 layers ...");
    let grads: Vec<Vec<f32>> = layers
        .iter()
        .map(|l| normal(&mut rng, l.d_g * l.d_a))
        .collect();
    let mut outs: Vec<Vec<f32>> = layers.iter().map(|l| vec![0.0; l.d_g * l.d_a]).collect();
    let max_ws = layers
        .iter()
        .map(|l| cpu::apply_workspace_size(Some(b), l.d_g, l.d_a))
        .max()
        .unwrap_or(0);
    let mut ws = Workspace::new(max_ws);
    let inv_of = |i: usize| {
        let e = &set.entries()[i];
        (
            e.layout,
            &inv[e.offset()..e.offset() + e.layout.buffer_len()],
        )
    };
    let ms = time_ms(a.reps, || {
        for (li, (l, (g, o))) in layers
            .iter()
            .zip(grads.iter().zip(outs.iter_mut()))
            .enumerate()
        {
            let (al, ab) = inv_of(2 * li);
            let (gl, gb) = inv_of(2 * li + 1);
            cpu::apply(
                Some((&gl, gb)),
                g,
                Some((&al, ab)),
                l.d_g,
                l.d_a,
                1.0,
                o,
                &mut ws,
            )?;
        }
        Ok(())
    })?;
    let flops: f64 = layers
        .iter()
        .map(|l| 2.0 * (l.d_g * l.d_a) as f64 * (b.min(l.d_g) + b.min(l.d_a)) as f64)
        .sum();
    let li = layers
        .iter()
        .position(|l| l.name == "layer2.0.conv2")
        .unwrap_or(0);
    let (al, ab) = inv_of(2 * li);
    let (gl, gb) = inv_of(2 * li + 1);
    let want = reference::apply(
        Some((&gl, &f64s(gb))),
        &f64s(&grads[li]),
        Some((&al, &f64s(ab))),
        layers[li].d_g,
        layers[li].d_a,
    )?;
    rows.push(Row {
        op: "apply",
        backend: name,
        work: "54 layers".into(),
        ms,
        rate: gflop_s(flops, ms),
        err: format!("{:.1e} ({})", rel_err(&outs[li], &want), layers[li].name),
    });
    Ok(())
}

fn main() {
    let a = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&a) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(a: &Args) -> Result<()> {
    let layers = shapes::resnet50();
    let all_dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
    let split_dims: Vec<usize> = all_dims.iter().copied().filter(|&d| d <= 2304).collect();
    let (backend, why) = AnyBackend::select(a.backend)?;
    if let Some(why) = why {
        eprintln!("no GPU backend ({why}); running on the CPU");
    }
    println!(
        "ResNet-50 v1.5 shape set: {} layers, {} factors, block {}, batch {}, {} CPU threads",
        layers.len(),
        all_dims.len(),
        a.block,
        a.batch,
        rayon::current_num_threads()
    );
    let t0 = Instant::now();
    let mut rows = Vec::new();
    if let AnyBackend::Cuda(dev) = &backend {
        backend_ops(dev.as_ref(), a, &split_dims, &all_dims, &mut rows)?;
        gpu_invert(dev, a, &all_dims, &mut rows)?;
    }
    backend_ops(&CpuBackend, a, &split_dims, &all_dims, &mut rows)?;
    cpu_only_ops(a, &layers, &mut rows)?;
    println!();
    println!(
        "{:<11} {:<28} {:<30} {:>10} {:>16}  error vs f64 reference",
        "op", "backend", "work", "time", "rate"
    );
    for r in &rows {
        println!(
            "{:<11} {:<28} {:<30} {:>7.3} ms {:>16}  {}",
            r.op, r.backend, r.work, r.ms, r.rate, r.err
        );
    }
    println!("\ntotal wall time {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
