//! Trains two models on the bundled 8x8 digits with SGD + momentum, Adam and THOR, on the
//! same epochs and the same batches, and compares them.
//!
//!     cargo run --release --example train_digits -- [--epochs N] [--batch N] [--task autoencoder|classifier|both]
//!         [--backend cpu|cuda|auto] [--data MNIST_DIR] [--out DIR] [--sweep]
//!
//! `--backend` chooses where THOR's preconditioner (factor accumulation, inversion, apply)
//! runs: the CPU (default), CUDA device 0, or the GPU when there is one (`auto`).
//!
//! Tasks: a deep autoencoder 64-256-128-16-128-256-64 (ReLU, sigmoid outputs, binary
//! cross-entropy), the classic benchmark on which K-FAC-type methods beat first-order ones;
//! and a classifier 64-512-512-10 (ReLU, softmax cross-entropy) whose layers split into
//! several blocks. Prints per-epoch losses with a progress bar, a final table, and writes SVG
//! plots of the training loss against epochs and against seconds.
//!
//! How THOR is wired into a training loop is all in `train` below: register each layer once,
//! then per step hand over activations and output gradients when `needs_statistics()` says
//! so, precondition each layer's gradient, and update with your usual optimizer.

mod data;
mod mlp;
mod plot;

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mlp::{Act, FirstOrder, Loss, Mlp, Tape, Targets};
use thor_kernels::thor::{
    DampingSchedule, IntervalSchedule, LayerId, LayerKind, Thor, ThorConfig, Thresholds,
};
use thor_kernels::BackendKind;

/// THOR against SGD with momentum and Adam on the bundled 8x8 digits (or MNIST).
#[derive(clap::Parser)]
#[command(name = "train_digits")]
struct Args {
    /// Epochs per run (default: per task).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Which task: autoencoder, classifier or both.
    #[arg(long, default_value = "both", value_parser = ["autoencoder", "classifier", "both"])]
    task: String,
    /// Where THOR's accumulation, inversion and apply run: cpu, cuda or auto.
    #[arg(long, default_value = "cpu")]
    backend: BackendKind,
    /// A folder with the MNIST IDX files (gzipped or not) instead of the bundled digits.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Where the plots go.
    #[arg(long, default_value = "target/train_digits")]
    out: PathBuf,
    /// Each optimizer at three learning rates.
    #[arg(long)]
    sweep: bool,
    /// THOR's learning rate.
    #[arg(long)]
    thor_lr: Option<f32>,
    /// THOR's initial damping l0.
    #[arg(long)]
    thor_damping: Option<f32>,
    /// Steps between THOR's statistics.
    #[arg(long)]
    thor_interval: Option<u64>,
    /// K-FAC's KL clip bound for THOR's updates.
    #[arg(long)]
    kl_clip: Option<f32>,
}

fn parse_args() -> Result<Args, String> {
    let a = <Args as clap::Parser>::parse();
    if a.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    Ok(a)
}

struct Task {
    name: &'static str,
    sizes: Vec<usize>,
    loss: Loss,
    epochs: usize,
    train: data::Dataset,
    test: data::Dataset,
}

impl Task {
    fn targets<'a>(&self, d: &'a data::Dataset) -> Targets<'a> {
        match self.loss {
            Loss::SigmoidBce => Targets::Pixels(&d.x),
            Loss::SoftmaxCe => Targets::Labels(&d.y),
        }
    }
}

#[derive(Clone)]
enum Method {
    Sgd { lr: f32 },
    Adam { lr: f32 },
    Thor { lr: f32, cfg: ThorConfig },
}

impl Method {
    fn name(&self) -> &'static str {
        match self {
            Method::Sgd { .. } => "SGD+momentum",
            Method::Adam { .. } => "Adam",
            Method::Thor { .. } => "THOR",
        }
    }
    fn lr(&self) -> f32 {
        match *self {
            Method::Sgd { lr } | Method::Adam { lr } | Method::Thor { lr, .. } => lr,
        }
    }
    fn with_lr(&self, lr: f32) -> Method {
        match self {
            Method::Sgd { .. } => Method::Sgd { lr },
            Method::Adam { .. } => Method::Adam { lr },
            Method::Thor { cfg, .. } => Method::Thor {
                lr,
                cfg: cfg.clone(),
            },
        }
    }
}

struct EpochLog {
    epoch: usize,
    seconds: f64,
    train_loss: f64,
    test_loss: f64,
    test_acc: f64,
}

struct Run {
    task: &'static str,
    method: &'static str,
    lr: f32,
    logs: Vec<EpochLog>,
    steps: u64,
    train_secs: f64,
    precond_secs: f64,
    diverged: Option<String>,
}

/// Trains `task` with `method` for its epoch budget; the batches depend only on the epoch.
fn train(
    task: &Task,
    method: &Method,
    batch: usize,
    backend: BackendKind,
    pb: &ProgressBar,
) -> Result<Run, String> {
    let mut model = Mlp::new(&task.sizes, Act::Relu, task.loss, 7);
    let momentum = 0.9;
    let mut opt = match method {
        Method::Sgd { lr } | Method::Thor { lr, .. } => FirstOrder::sgd(&model, *lr, momentum),
        Method::Adam { lr } => FirstOrder::adam(&model, *lr),
    };
    // THOR: register every layer once. Weights are [outputs, inputs + 1], bias last, which is
    // the gradient layout Thor::precondition takes for a layer with a bias.
    let mut thor = match method {
        Method::Thor { cfg, .. } => Some(
            Thor::new(ThorConfig {
                backend,
                ..cfg.clone()
            })
            .map_err(|e| e.to_string())?,
        ),
        _ => None,
    };
    if let Some(t) = &thor {
        pb.println(format!(
            "{}: THOR's preconditioner runs on {}",
            task.name,
            t.backend_name()
        ));
    }
    let ids: Vec<LayerId> = match thor.as_mut() {
        Some(t) => model
            .layers
            .iter()
            .map(|d| {
                t.add_layer(LayerKind::Linear {
                    inputs: d.inputs,
                    outputs: d.outputs,
                    bias: true,
                })
            })
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?,
        None => Vec::new(),
    };
    let n_train = task.train.len();
    let f = task.train.features;
    let steps_per_epoch = n_train.div_ceil(batch);
    let mut tape = Tape::default();
    let mut pre: Vec<Vec<f32>> = model.layers.iter().map(|d| vec![0.0; d.w.len()]).collect();
    let mut out_grads = Vec::new();
    let mut run = Run {
        task: task.name,
        method: method.name(),
        lr: method.lr(),
        logs: Vec::new(),
        steps: 0,
        train_secs: 0.0,
        precond_secs: 0.0,
        diverged: None,
    };
    let (mut xb, mut tb) = (Vec::new(), Vec::new());
    for epoch in 0..task.epochs {
        let mut order: Vec<usize> = (0..n_train).collect();
        data::shuffle(&mut order, 1000 + epoch as u64);
        let t0 = Instant::now();
        for (s, idx) in order.chunks(batch).enumerate() {
            let n = idx.len();
            xb.clear();
            idx.iter()
                .for_each(|&i| xb.extend_from_slice(&task.train.x[i * f..(i + 1) * f]));
            let targets = match task.loss {
                Loss::SigmoidBce => Targets::Pixels(&xb),
                Loss::SoftmaxCe => {
                    tb.clear();
                    tb.extend(idx.iter().map(|&i| task.train.y[i]));
                    Targets::Labels(&tb)
                }
            };
            let loss = model.train_step(&xb, n, &targets, &mut tape);
            if !loss.is_finite() || tape.grads.iter().flatten().any(|g| !g.is_finite()) {
                run.diverged = Some(format!(
                    "loss {loss} or a gradient became non-finite at epoch {}, step {s}",
                    epoch + 1
                ));
                break;
            }
            opt.begin();
            if let Some(thor) = thor.as_mut() {
                let tp = Instant::now();
                thor.set_epoch(epoch as f64 + s as f64 / steps_per_epoch as f64);
                if thor.needs_statistics() {
                    for (l, &id) in ids.iter().enumerate() {
                        // Per-example output gradients: the mean loss's gradient times n.
                        out_grads.clear();
                        out_grads.extend(tape.dz[l].iter().map(|g| g * n as f32));
                        thor.observe(id, &tape.inputs[l], &out_grads, n)
                            .map_err(|e| e.to_string())?;
                    }
                }
                for (l, &id) in ids.iter().enumerate() {
                    thor.precondition(id, &tape.grads[l], &mut pre[l])
                        .map_err(|e| e.to_string())?;
                }
                let clip = thor.kl_clip_factor(
                    method.lr(),
                    tape.grads
                        .iter()
                        .map(|g| &g[..])
                        .zip(pre.iter().map(|p| &p[..])),
                );
                if clip < 1.0 {
                    pre.iter_mut()
                        .for_each(|p| p.iter_mut().for_each(|v| *v *= clip));
                }
                thor.finish_step();
                run.precond_secs += tp.elapsed().as_secs_f64();
                for (l, d) in model.layers.iter_mut().enumerate() {
                    opt.update(l, &mut d.w, &pre[l]);
                }
            } else {
                for (l, d) in model.layers.iter_mut().enumerate() {
                    opt.update(l, &mut d.w, &tape.grads[l]);
                }
            }
            run.steps += 1;
            pb.inc(1);
        }
        run.train_secs += t0.elapsed().as_secs_f64();
        let (train_loss, _) = model.evaluate(&task.train.x, n_train, &task.targets(&task.train));
        let (test_loss, test_acc) =
            model.evaluate(&task.test.x, task.test.len(), &task.targets(&task.test));
        let acc = if test_acc.is_nan() {
            String::new()
        } else {
            format!(", test acc {:.2}%", 100.0 * test_acc)
        };
        say(
            pb,
            format!(
                "{:<11} {:<12} epoch {:>3}  train loss {:.5}  test loss {:.5}{acc}  ({:.1} s)",
                task.name,
                method.name(),
                epoch + 1,
                train_loss,
                test_loss,
                run.train_secs
            ),
        );
        run.logs.push(EpochLog {
            epoch: epoch + 1,
            seconds: run.train_secs,
            train_loss,
            test_loss,
            test_acc,
        });
        if run.diverged.is_some() || !train_loss.is_finite() {
            run.diverged.get_or_insert_with(|| {
                format!("training loss became {train_loss} at epoch {}", epoch + 1)
            });
            say(
                pb,
                format!(
                    "{} {}: diverged: {}",
                    task.name,
                    method.name(),
                    run.diverged.as_deref().unwrap()
                ),
            );
            break;
        }
    }
    if let Some(t) = thor.as_ref() {
        for (l, &id) in ids.iter().enumerate() {
            let c = t.counters(id).map_err(|e| e.to_string())?;
            say(pb, format!(
                "    THOR layer {l}: {} statistics, {} updates, {} reuses, {} frozen, {} skipped, {} failed inversions",
                c.statistics, c.updates, c.reuses, c.freezes, c.skipped, c.failed_inversions
            ));
        }
    }
    Ok(run)
}

/// THOR's settings for these small models, chosen by the sweep recorded in docs/TRAINING.md.
fn thor_config() -> ThorConfig {
    ThorConfig {
        block: 128,
        stat_decay: 0.0,
        damping: DampingSchedule::Decay {
            l0: 0.1,
            decay: 0.87,
            every: 10.0,
        },
        interval: IntervalSchedule::Fixed(10),
        thresholds: Thresholds::THOR,
        kl_clip: Some(1e-3),
        ..ThorConfig::thor()
    }
}

fn methods(task: &str) -> Vec<Method> {
    // Learning rates from the sweep in docs/TRAINING.md.
    match task {
        "autoencoder" => vec![
            Method::Sgd { lr: 0.01 },
            Method::Adam { lr: 1e-3 },
            Method::Thor {
                lr: 0.03,
                cfg: thor_config(),
            },
        ],
        _ => vec![
            Method::Sgd { lr: 0.09 },
            Method::Adam { lr: 3e-3 },
            Method::Thor {
                lr: 0.03,
                cfg: thor_config(),
            },
        ],
    }
}

/// Prints above the progress bar, or plainly when the bar is hidden (output not a terminal).
fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        println!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn first_reaching(logs: &[EpochLog], pred: impl Fn(&EpochLog) -> bool) -> Option<&EpochLog> {
    logs.iter().find(|l| pred(l))
}

fn fmt_reach(e: Option<&EpochLog>) -> String {
    e.map(|l| format!("{:>3} / {:>6.2} s", l.epoch, l.seconds))
        .unwrap_or_else(|| "  never       ".into())
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Result<(), String> {
    let (train_set, test_set, source) = match &args.data {
        Some(dir) => {
            let (tr, te) = data::load_mnist_dir(dir)?;
            (tr, te, format!("MNIST IDX from {}", dir.display()))
        }
        None => {
            let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/digits/digits.csv.gz");
            let all = data::load_digits(&path)?;
            let (tr, te) = all.split(0.8, 42);
            (
                tr,
                te,
                "bundled 8x8 digits (UCI, via scikit-learn), fixed-seed 80/20 split".into(),
            )
        }
    };
    let f = train_set.features;
    let classes = train_set.classes;
    println!(
        "data: {source}: {} train, {} test images of {f} pixels",
        train_set.len(),
        test_set.len()
    );
    let mut tasks = Vec::new();
    if args.task != "classifier" {
        tasks.push(Task {
            name: "autoencoder",
            sizes: vec![f, 256, 128, 16, 128, 256, f],
            loss: Loss::SigmoidBce,
            epochs: args.epochs.unwrap_or(30),
            train: train_set.clone(),
            test: test_set.clone(),
        });
    }
    if args.task != "autoencoder" {
        tasks.push(Task {
            name: "classifier",
            sizes: vec![f, 512, 512, classes],
            loss: Loss::SoftmaxCe,
            epochs: args.epochs.unwrap_or(20),
            train: train_set,
            test: test_set,
        });
    }
    std::fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let mut runs = Vec::new();
    for task in &tasks {
        let mut list = methods(task.name);
        for m in &mut list {
            if let Method::Thor { lr, cfg } = m {
                *lr = args.thor_lr.unwrap_or(*lr);
                if let Some(l0) = args.thor_damping {
                    cfg.damping = DampingSchedule::Decay {
                        l0,
                        decay: 0.87,
                        every: 10.0,
                    };
                }
                if let Some(n) = args.thor_interval {
                    cfg.interval = IntervalSchedule::Fixed(n);
                }
                cfg.kl_clip = args.kl_clip.or(cfg.kl_clip);
            }
        }
        if args.sweep {
            // A small sweep: each method at its learning rate x {1/3, 1, 3}.
            list = list
                .iter()
                .flat_map(|m| [m.with_lr(m.lr() / 3.0), m.clone(), m.with_lr(m.lr() * 3.0)])
                .collect();
        }
        let steps = (task.epochs * task.train.len().div_ceil(args.batch) * list.len()) as u64;
        let pb = ProgressBar::new(steps);
        pb.set_style(
            ProgressStyle::with_template(
                "{prefix:>11} [{bar:40}] {pos}/{len} steps, {elapsed} elapsed, eta {eta}",
            )
            .unwrap()
            .progress_chars("=> "),
        );
        pb.set_prefix(task.name);
        for m in &list {
            runs.push(train(task, m, args.batch, args.backend, &pb)?);
        }
        pb.finish_and_clear();
    }

    // The final table.
    println!();
    println!(
        "{:<11} {:<12} {:>7} {:>10} {:>10} {:>8}  {:<16} {:<16} {:>8} {:>9}",
        "task",
        "optimizer",
        "lr",
        "train loss",
        "test loss",
        "test acc",
        "to best 1st-order",
        "to 97% test acc",
        "ms/step",
        "precond"
    );
    for task in &tasks {
        let mine: Vec<&Run> = runs.iter().filter(|r| r.task == task.name).collect();
        let target = mine
            .iter()
            .filter(|r| r.method != "THOR" && r.diverged.is_none())
            .filter_map(|r| r.logs.last().map(|l| l.train_loss))
            .fold(f64::INFINITY, f64::min);
        for r in &mine {
            let last = r.logs.last();
            let reach = fmt_reach(first_reaching(&r.logs, |l| l.train_loss <= target));
            let acc97 = if task.loss == Loss::SoftmaxCe {
                fmt_reach(first_reaching(&r.logs, |l| l.test_acc >= 0.97))
            } else {
                "  n/a".into()
            };
            println!(
                "{:<11} {:<12} {:>7.0e} {:>10.5} {:>10.5} {:>8} {:<17} {:<16} {:>8.3} {:>9}{}",
                r.task,
                r.method,
                r.lr,
                last.map(|l| l.train_loss).unwrap_or(f64::NAN),
                last.map(|l| l.test_loss).unwrap_or(f64::NAN),
                last.filter(|l| !l.test_acc.is_nan())
                    .map(|l| format!("{:.2}%", 100.0 * l.test_acc))
                    .unwrap_or_else(|| "-".into()),
                reach,
                acc97,
                1e3 * r.train_secs / r.steps.max(1) as f64,
                if r.method == "THOR" {
                    format!("{:.3}", 1e3 * r.precond_secs / r.steps.max(1) as f64)
                } else {
                    "-".into()
                },
                r.diverged
                    .as_deref()
                    .map(|d| format!("  DIVERGED: {d}"))
                    .unwrap_or_default(),
            );
        }
        // Plots: training loss against epochs and against seconds.
        let series = |by_time: bool| -> Vec<(String, Vec<(f64, f64)>)> {
            mine.iter()
                .map(|r| {
                    let name = if args.sweep {
                        format!("{} lr {:.0e}", r.method, r.lr)
                    } else {
                        r.method.to_string()
                    };
                    (
                        name,
                        r.logs
                            .iter()
                            .map(|l| {
                                (
                                    if by_time { l.seconds } else { l.epoch as f64 },
                                    l.train_loss,
                                )
                            })
                            .collect(),
                    )
                })
                .collect()
        };
        for (by_time, suffix, xl) in [
            (false, "epochs", "epoch"),
            (true, "seconds", "training seconds"),
        ] {
            let path = args.out.join(format!("{}_loss_vs_{suffix}.svg", task.name));
            plot::line_chart(
                &path,
                &format!("{}: training loss", task.name),
                xl,
                "train loss",
                &series(by_time),
            )
            .map_err(|e| format!("{}: {e}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    println!("\n'to best 1st-order': epochs / seconds until the training loss reaches the best final training loss of SGD+momentum and Adam; ms/step and precond are per training step (precond: THOR's statistics, inverses and preconditioning).");
    Ok(())
}
