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

mod check;
mod gpu;
mod host;
mod model;
mod report;

use std::time::Instant;

use check::*;
use gpu::run_cuda;
use host::run_cpu;
use model::*;
use report::*;

use thor_kernels::cpu::step::{CpuThorStep, HostStepInput};
use thor_kernels::cpu::{self, Damping, InvertOptions, Workspace};
use thor_kernels::layout::FactorSet;
use thor_kernels::reference;
use thor_kernels::rule::{Decision, RuleLayer};
use thor_kernels::shapes::{self, LayerShape};
use thor_kernels::step::StepConfig;
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
        "ResNet-50 v1.5 shape set: {} layers, {} factors, {} blocks of {b} x {b}, batch {batch}, precision {:?}",
        m.layers.len(),
        m.set.len(),
        m.set.total_blocks(),
        a.precision,
        b = a.block,
    );
    println!(
        "factor inputs: {:.1} MB of NCHW tensors read in place (implicit im2col); patch matrices and transposed gradients would take {:.1} MB (f32)",
        4.0 * m.input_elems() as f64 / 1e6,
        4.0 * m.explicit_elems() as f64 / 1e6,
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
