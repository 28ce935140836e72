//! A scaling model of THOR's distributed statistics step on the ResNet-50 v1.5 shape set:
//! per rank and statistics step, the bytes sent and received, the blocks inverted and a
//! predicted step time, for world sizes 1 to 256, beside the same figures for the scheme of
//! THOR's MindSpore code and KAISA (all-reduce of whole factors, inversion owned by whole
//! layers, inverses gathered from the layer owners).
//!
//!     cargo run --release --example thor_scaling -- [--batch 32] [--block 128]
//!         [--link cluster|nvlink|ib] [--bandwidth GB/s] [--latency-us US]
//!         [--rates h200-predicted|measure] [--acc-gflops X] [--inv-block-us X]
//!
//! The byte and block counts are exact for the library's plan (`thor_kernels::dist`); the
//! times are a model: stages one after another (no overlap), every layer updated (the
//! all-gather's worst case), a ring collective of `w` ranks costing `(w - 1)` latencies plus
//! the bytes a rank sends over the link bandwidth, the accumulation of the local batch at a
//! fixed rate, the inversion in waves of `--wave` blocks (a GPU runs one wave of blocks at
//! a time) or, with `--rates measure`, at the rate measured on this machine's CPU.

use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use thor_kernels::cpu::{self, InvertOptions, Workspace};
use thor_kernels::dist::{even_counts, ring_bytes, tri_len, Collective, OwnershipPlan};
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::shapes::{self, LayerShape};

/// How the ranks are linked.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Link {
    /// NVLink within a node of 8 GPUs, InfiniBand between nodes: NVLink's figures up to
    /// 8 ranks, InfiniBand's beyond (a ring across nodes runs at its slowest link).
    Cluster,
    /// NVLink 4 (H100 / H200 SXM): 400 GB/s per direction reached by a ring, 3 us per step.
    Nvlink,
    /// InfiniBand NDR, one 400 Gb/s NIC per GPU: 50 GB/s, 8 us per step.
    Ib,
}

/// Where the stage rates come from.
#[derive(Debug, Clone, Copy, PartialEq, ValueEnum)]
enum Rates {
    /// The predictions of docs/PERF.md for an H200 (no GPU has measured them): accumulation
    /// of the ResNet-50 set at batch 32 in F32 mode 6.5 ms (scaled by the batch), inversion
    /// of 132 blocks of 128 (one wave: one block per SM) 44 us.
    H200Predicted,
    /// Measured here on the CPU backend: the accumulation's flop rate on one large factor,
    /// the inversion's time per block on a batch of blocks.
    Measure,
}

/// The scaling model of THOR's distributed statistics step.
#[derive(Parser)]
#[command(name = "thor_scaling")]
struct Args {
    /// Local batch per rank (data-parallel: the global batch grows with the world).
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Block size: 32, 64, 128 or 256.
    #[arg(long, default_value_t = 128)]
    block: usize,
    /// The link between ranks.
    #[arg(long, value_enum, default_value_t = Link::Cluster)]
    link: Link,
    /// Override the link's bandwidth (GB/s per rank and direction).
    #[arg(long)]
    bandwidth: Option<f64>,
    /// Override the link's latency per ring step (microseconds).
    #[arg(long)]
    latency_us: Option<f64>,
    /// Where the stage rates come from.
    #[arg(long, value_enum, default_value_t = Rates::H200Predicted)]
    rates: Rates,
    /// Override the accumulation rate (GFLOP/s, at 2 N d b flops per factor).
    #[arg(long)]
    acc_gflops: Option<f64>,
    /// Override the inversion's time per wave (microseconds).
    #[arg(long)]
    inv_wave_us: Option<f64>,
    /// Blocks inverted at once (one wave): the SM count for a GPU at one block per SM.
    #[arg(long, default_value_t = 132)]
    wave: usize,
    /// World sizes (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "1,2,4,8,16,32,64,128,256"
    )]
    worlds: Vec<usize>,
}

/// Stage rates of the model.
struct Model {
    /// Accumulation, flop/s.
    acc_flops: f64,
    /// Seconds per wave of inversions.
    inv_wave: f64,
    /// Blocks per wave.
    wave: usize,
    bandwidth_nvlink: f64,
    latency_nvlink: f64,
    bandwidth_ib: f64,
    latency_ib: f64,
    link: Link,
}

impl Model {
    /// (bytes per second, seconds per ring step) at world `w`.
    fn link(&self, w: usize) -> (f64, f64) {
        let nv = (self.bandwidth_nvlink, self.latency_nvlink);
        let ib = (self.bandwidth_ib, self.latency_ib);
        match self.link {
            Link::Nvlink => nv,
            Link::Ib => ib,
            Link::Cluster if w <= 8 => nv,
            Link::Cluster => ib,
        }
    }

    fn invert(&self, blocks: usize) -> f64 {
        blocks.div_ceil(self.wave) as f64 * self.inv_wave
    }
}

/// How a collective's latency grows with the world.
#[derive(Clone, Copy)]
enum Stage {
    /// A ring reduce-scatter or all-gather: `w - 1` steps.
    Ring,
    /// A ring all-reduce: `2 (w - 1)` steps.
    Ring2,
    /// A small all-reduce on a tree (NCCL picks trees for small messages): `2 log2 w` steps.
    Tree,
}

/// One scheme's figures for one world size: the busiest rank's bytes and blocks, and per
/// stage the slowest rank's time (a collective waits for every rank).
#[derive(Default)]
struct Row {
    /// Bytes the busiest rank sends in the device step's fixed-size collectives (every
    /// rank's segment padded to the most blocks any rank owns); 0 for the layer-wise scheme.
    padded_sent: u64,
    sent: u64,
    received: u64,
    blocks: usize,
    comm: f64,
    invert: f64,
}

impl Row {
    /// Adds a collective whose `(sent, received)` bytes on rank `r` are `bytes(r)`.
    fn add_stage(
        &mut self,
        w: usize,
        m: &Model,
        stage: Stage,
        bytes: impl Fn(usize) -> (u64, u64),
    ) {
        let (mut sent, mut recv) = (0u64, 0u64);
        for r in 0..w {
            let (s, rv) = bytes(r);
            sent = sent.max(s);
            recv = recv.max(rv);
        }
        self.sent += sent;
        self.received += recv;
        if w > 1 {
            let (bw, lat) = m.link(w);
            let steps = match stage {
                Stage::Ring => (w - 1) as f64,
                Stage::Ring2 => 2.0 * (w - 1) as f64,
                Stage::Tree => 2.0 * (w as f64).log2().ceil(),
            };
            self.comm += steps * lat + sent as f64 / bw;
        }
    }
}

fn main() {
    let a = Args::parse();
    if let Err(e) = run(&a) {
        eprintln!("thor_scaling: {e}");
        std::process::exit(2);
    }
}

fn run(a: &Args) -> Result<(), String> {
    if a.batch == 0 || a.wave == 0 || a.worlds.contains(&0) {
        return Err("--batch, --wave and every world size must be at least 1".into());
    }
    thor_kernels::layout::check_block_size(a.block).map_err(|e| e.to_string())?;
    let layers = shapes::resnet50();
    let dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
    let set = FactorSet::new(a.block, &dims).map_err(|e| e.to_string())?;
    let b = a.block;
    let nb = set.total_blocks();
    // Accumulation flops of the local batch: 2 N d b per factor.
    let flops: f64 = layers
        .iter()
        .map(|l: &LayerShape| 2.0 * (l.rows(a.batch) * (l.d_a + l.d_g) * b) as f64)
        .sum();
    let mut m = Model {
        acc_flops: 0.0,
        inv_wave: 0.0,
        wave: a.wave,
        bandwidth_nvlink: 400e9,
        latency_nvlink: 3e-6,
        bandwidth_ib: 50e9,
        latency_ib: 8e-6,
        link: a.link,
    };
    match a.rates {
        Rates::H200Predicted => {
            // docs/PERF.md: 6.5 ms for the set at batch 32 (F32 mode), 0.22 ms for 654
            // blocks of 128 in 5 waves of 132.
            let flops32: f64 = layers
                .iter()
                .map(|l| 2.0 * (l.rows(32) * (l.d_a + l.d_g) * b) as f64)
                .sum();
            m.acc_flops = flops32 / 6.5e-3;
            m.inv_wave = 44e-6 * (b as f64 / 128.0).powi(3);
        }
        Rates::Measure => {
            let (acc, per_block) = measure(b).map_err(|e| e.to_string())?;
            m.acc_flops = acc;
            // The CPU inverts block after block over its cores: one block per "wave".
            m.wave = 1;
            m.inv_wave = per_block;
        }
    }
    if let Some(g) = a.acc_gflops {
        m.acc_flops = g * 1e9;
    }
    if let Some(us) = a.inv_wave_us {
        m.inv_wave = us * 1e-6;
    }
    if let Some(bw) = a.bandwidth {
        m.bandwidth_nvlink = bw * 1e9;
        m.bandwidth_ib = bw * 1e9;
    }
    if let Some(l) = a.latency_us {
        m.latency_nvlink = l * 1e-6;
        m.latency_ib = l * 1e-6;
    }
    if !(m.acc_flops > 0.0 && m.inv_wave > 0.0 && m.bandwidth_ib > 0.0 && m.latency_ib >= 0.0) {
        return Err("rates, bandwidth and latency must be positive".into());
    }
    let t_acc = flops / m.acc_flops;
    let tri = tri_len(b);
    println!(
        "ResNet-50 v1.5: {} layers, {} factors, {nb} blocks of {b}; local batch {}; \
         packed factors {:.1} MB, whole blocks {:.1} MB",
        layers.len(),
        set.len(),
        a.batch,
        (nb * tri * 4) as f64 / 1e6,
        (nb * b * b * 4) as f64 / 1e6
    );
    println!(
        "rates ({:?}): accumulation {:.1} TFLOP/s ({:.2} ms for the local batch), inversion {:.1} us per wave of {} blocks; link {:?}",
        a.rates,
        m.acc_flops / 1e12,
        t_acc * 1e3,
        m.inv_wave * 1e6,
        m.wave,
        a.link
    );
    println!();
    println!(
        "{:>5} | {:>24} {:>7} {:>7} {:>9} | {:>24} {:>7} {:>9} | {:>6}",
        "world",
        "blocks: sent/recv MB",
        "GPU MB",
        "inverts",
        "step ms",
        "layers: sent/recv MB",
        "inverts",
        "step ms",
        "speed"
    );
    for &w in &a.worlds {
        let ours = blocks_scheme(&set, w, &m).map_err(|e| e.to_string())?;
        let theirs = layers_scheme(&set, w, &m).map_err(|e| e.to_string())?;
        let t_ours = t_acc + ours.comm + ours.invert;
        let t_theirs = t_acc + theirs.comm + theirs.invert;
        println!(
            "{w:>5} | {:>11.1} / {:>10.1} {:>7.1} {:>7} {:>9.3} | {:>11.1} / {:>10.1} {:>7} {:>9.3} | {:>5.2}x",
            ours.sent as f64 / 1e6,
            ours.received as f64 / 1e6,
            ours.padded_sent as f64 / 1e6,
            ours.blocks,
            t_ours * 1e3,
            theirs.sent as f64 / 1e6,
            theirs.received as f64 / 1e6,
            theirs.blocks,
            t_theirs * 1e3,
            t_theirs / t_ours
        );
    }
    println!();
    println!(
        "blocks: the library's plan (packed triangles reduce-scattered to the block owners, \
         one small all-reduce of statuses and traces, packed inverses all-gathered); GPU MB: \
         the device step's reduce-scatter and all-gather sent, every rank's segment padded to \
         the most blocks a rank owns (NCCL takes one count for all); layers: \
         all-reduce of the whole blocks, each layer inverted by one rank \
         (longest-processing-time over layers), the owners' inverses all-gathered. Bytes and \
         inversions of the busiest rank; per stage the slowest rank's time; every layer \
         updated; stages not overlapped; ring latency (w - 1) steps per reduce-scatter or \
         all-gather, 2 (w - 1) per large all-reduce, 2 log2(w) per small (tree) all-reduce; \
         the apply (local on every rank, the same in both) left out."
    );
    Ok(())
}

/// The library's scheme at world `w`: per stage the slowest rank (collectives make every
/// rank wait for it), bytes and blocks of the busiest rank.
fn blocks_scheme(set: &FactorSet, w: usize, m: &Model) -> thor_kernels::Result<Row> {
    let plan = OwnershipPlan::new(set, w)?;
    let (b, nb, nf) = (set.block(), set.total_blocks(), set.len());
    let tri = tri_len(b);
    let mut row = Row::default();
    let mut counts = vec![0usize; w];
    // The reduce-scatter of every block's packed triangle.
    plan.counts(tri, |_| true, &mut counts);
    row.add_stage(w, m, Stage::Ring, |r| {
        ring_bytes(Collective::ReduceScatter, &counts, r, 4)
    });
    // One small all-reduce: a flag and the samples per factor, two traces per block, the
    // damping, the step count and the plan's fingerprint every rank checks.
    let mut small = vec![0usize; w];
    even_counts(2 * (nf + nb) + 3, w, &mut small);
    row.add_stage(w, m, Stage::Tree, |r| {
        ring_bytes(Collective::AllReduce, &small, r, 8)
    });
    // The owners' inversions, then the all-gather of the packed inverses and info words.
    row.blocks = (0..w).map(|r| plan.owned(r).len()).max().unwrap_or(0);
    row.invert = m.invert(row.blocks);
    plan.counts(tri + 1, |_| true, &mut counts);
    row.add_stage(w, m, Stage::Ring, |r| {
        ring_bytes(Collective::AllGather, &counts, r, 4)
    });
    // The device step: the same collectives on segments of `row.blocks` blocks each.
    let padded = |per_block: usize, op| ring_bytes(op, &vec![row.blocks * per_block; w], 0, 4).0;
    row.padded_sent =
        padded(tri, Collective::ReduceScatter) + padded(tri + 1, Collective::AllGather);
    Ok(row)
}

/// The layer-wise scheme at world `w`: every factor's blocks all-reduced whole, each layer
/// inverted by one rank, its inverses all-gathered from there.
fn layers_scheme(set: &FactorSet, w: usize, m: &Model) -> thor_kernels::Result<Row> {
    let b = set.block();
    let layer_blocks: Vec<usize> = set
        .entries()
        .chunks(2)
        .map(|e| e.iter().map(|x| x.layout.blocks()).sum())
        .collect();
    let costs: Vec<f64> = layer_blocks.iter().map(|&n| n as f64).collect();
    let plan = OwnershipPlan::balanced(&costs, w)?;
    let mut row = Row::default();
    let mut counts = vec![0usize; w];
    even_counts(set.total_blocks() * b * b, w, &mut counts);
    row.add_stage(w, m, Stage::Ring2, |r| {
        ring_bytes(Collective::AllReduce, &counts, r, 4)
    });
    let owned = |q: usize| {
        plan.owned(q)
            .iter()
            .map(|&l| layer_blocks[l])
            .sum::<usize>()
    };
    row.blocks = (0..w).map(owned).max().unwrap_or(0);
    row.invert = m.invert(row.blocks);
    for (q, c) in counts.iter_mut().enumerate() {
        *c = owned(q) * b * b;
    }
    row.add_stage(w, m, Stage::Ring, |r| {
        ring_bytes(Collective::AllGather, &counts, r, 4)
    });
    Ok(row)
}

/// The CPU backend's accumulation rate (flop/s, 2 N d b) on a 4096 x 1152 factor and its
/// inversion time per block (seconds) on 64 blocks, each the best of 3.
fn measure(b: usize) -> thor_kernels::Result<(f64, f64)> {
    let (n, d) = (4096usize, 1152usize);
    let layout = BlockLayout::new(d, b)?;
    // A fixed, non-trivial input: no random-number crate needed.
    let x: Vec<f32> = (0..n * d)
        .map(|i| ((i * 2654435761usize) % 1000) as f32 / 1000.0 - 0.5)
        .collect();
    let mut blocks = vec![0.0f32; layout.buffer_len()];
    let mut traces = vec![0.0f32; layout.blocks()];
    let mut ws = Workspace::new(cpu::accumulate_workspace_size::<f32>(&layout));
    let best = |f: &mut dyn FnMut() -> thor_kernels::Result<()>| -> thor_kernels::Result<Duration> {
        let mut t = Duration::MAX;
        for _ in 0..3 {
            let s = Instant::now();
            f()?;
            t = t.min(s.elapsed());
        }
        Ok(t)
    };
    let t_acc = best(&mut || {
        cpu::accumulate(
            &x,
            n,
            d,
            &layout,
            1.0 / n as f32,
            0.0,
            &mut blocks,
            &mut traces,
            &mut ws,
        )
    })?;
    let acc = 2.0 * (n * d * b) as f64 / t_acc.as_secs_f64();
    let nb = 64;
    let stats: Vec<f32> = (0..nb)
        .flat_map(|j| blocks[(j % layout.blocks()) * b * b..][..b * b].to_vec())
        .collect();
    let mut out = vec![0.0f32; nb * b * b];
    let mut info = vec![0i32; nb];
    let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
    let opts = InvertOptions::uniform(1e-3);
    let t_inv = best(&mut || cpu::invert(b, &stats, &mut out, &mut info, None, &opts, &mut ws))?;
    Ok((acc, t_inv.as_secs_f64() / nb as f64))
}
