//! THOR against momentum SGD and AdamW in candle, on the bundled 5,000-image MNIST subset
//! (a fixed stratified split: 400 train and 100 test images per class).
//!
//! Two models, each trained by every optimizer from the same initial weights on the same
//! batches:
//! - the K-FAC papers' deep autoencoder 784-1000-500-250-30-250-500-1000-784 (ReLU, sigmoid
//!   output, binary cross-entropy summed over pixels, mean over the batch);
//! - a small CNN: conv 5x5 (1 -> 16) + pool, conv 5x5 (16 -> 32) + pool, linear 1568 -> 128,
//!   linear 128 -> 10.
//!
//! Prints per-epoch losses, then a table (epochs and seconds to the best first-order final
//! training loss, to 97% test accuracy for the CNN, time per step and in THOR's
//! preconditioner) and writes SVG plots of the training loss against epochs and seconds to
//! `target/train_mnist/`.
//!
//! ```text
//! cargo run --release -p thor-candle --example train_mnist [-- --task cnn --epochs 5 --sweep]
//! cargo run --release -p thor-candle --features cuda --example train_mnist -- --device cuda
//! ```
//!
//! What THOR adds to a candle training loop (see `train_run`): layers made with
//! `thor_candle::linear` / `conv2d` and a `ThorLayers`, a `ThorOptimizer` over the `VarMap`,
//! `set_epoch` for its schedules, and `layers.set_training(false)` around evaluation.

mod data;
mod plot;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Conv2dConfig, Optimizer, VarBuilder, VarMap};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use thor_candle::{
    ConvNorm, DampingSchedule, IntervalSchedule, LossMean, MomentumSgd, ParamsMomentumSgd,
    ThorConfig, ThorLayers, ThorOptimizer, ThorParams,
};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

#[derive(Parser, Debug)]
#[command(about = "THOR against momentum SGD and AdamW in candle on MNIST (5,000 images)")]
struct Args {
    /// cpu or cuda (cuda needs the crate's `cuda` feature).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// autoencoder, cnn or both.
    #[arg(long, default_value = "both")]
    task: String,
    /// Epochs per run (default: 10 for the autoencoder, 6 for the CNN).
    #[arg(long)]
    epochs: Option<usize>,
    /// Batch size.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Each optimizer at three learning rates (its default divided by 3, the default, times 3).
    #[arg(long)]
    sweep: bool,
    /// THOR's learning rate (default: the task's).
    #[arg(long)]
    thor_lr: Option<f64>,
    /// THOR's initial damping (default: the task's).
    #[arg(long)]
    thor_damping: Option<f32>,
    /// Steps between THOR's statistics (default: the task's).
    #[arg(long)]
    thor_interval: Option<u64>,
    /// Steps between THOR's statistics by epoch, as `epoch:interval` pairs in increasing
    /// epoch order ("0:1,0.5:5": every step for half an epoch, then every 5); overrides
    /// `--thor-interval`.
    #[arg(long)]
    thor_intervals: Option<String>,
    /// THOR's KL clip (0: none; default: the task's).
    #[arg(long)]
    kl_clip: Option<f32>,
    /// THOR's learning-rate warm-up in epochs (linear from 0; default 0: none).
    #[arg(long, default_value_t = 0.0)]
    thor_warmup: f64,
    /// THOR's statistics decay (default: the task's).
    #[arg(long)]
    stat_decay: Option<f32>,
    /// Seed of the initial weights and of the batch order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only these optimizers (comma-separated: sgd, adamw, thor).
    #[arg(long, default_value = "sgd,adamw,thor")]
    only: String,
    /// The data file.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../data/mnist5k/mnist_5k.csv.gz"))]
    data: PathBuf,
    /// Where the plots go ("" for none).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/train_mnist"))]
    out: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Task {
    Autoencoder,
    Cnn,
}

impl Task {
    fn name(self) -> &'static str {
        match self {
            Task::Autoencoder => "autoencoder",
            Task::Cnn => "cnn",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sgd,
    AdamW,
    Thor,
}

#[derive(Clone, Debug)]
struct Method {
    kind: Kind,
    lr: f64,
}

impl Method {
    fn label(&self) -> String {
        let k = match self.kind {
            Kind::Sgd => "SGD",
            Kind::AdamW => "AdamW",
            Kind::Thor => "THOR",
        };
        format!("{k} lr {}", self.lr)
    }
}

/// `--thor-intervals` parsed (`epoch:interval` pairs; `main` refuses a malformed list).
fn intervals(args: &Args) -> Option<Vec<(f64, u64)>> {
    let text = args.thor_intervals.as_deref()?;
    text.split(',')
        .map(|p| {
            let (e, n) = p.trim().split_once(':')?;
            let (e, n): (f64, u64) = (e.trim().parse().ok()?, n.trim().parse().ok()?);
            (e.is_finite() && e >= 0.0 && n >= 1).then_some((e, n))
        })
        .collect()
}

/// THOR's settings per task (the levers for the autoencoder are discussed in
/// docs/TRAINING.md).
fn thor_settings(task: Task, args: &Args) -> (f64, ThorConfig) {
    // The autoencoder takes statistics at every step of its first epoch (the network moves
    // fastest there) and keeps a shorter memory of them (decay 0.8).
    let (lr, damping, interval, kl, decay, first_epoch_every_step) = match task {
        Task::Autoencoder => (0.1, 0.3, 5, 3e-2, 0.8, true),
        Task::Cnn => (0.2, 0.03, 5, 1e-3, 0.95, false),
    };
    let damping = args.thor_damping.unwrap_or(damping);
    let kl = args.kl_clip.unwrap_or(kl);
    let cfg = ThorConfig {
        block: 128,
        stat_decay: args.stat_decay.unwrap_or(decay),
        damping: DampingSchedule::Decay {
            l0: damping,
            decay: 0.87,
            every: 10.0,
        },
        interval: match (intervals(args), args.thor_interval) {
            (Some(list), _) => IntervalSchedule::Stepwise(list),
            (None, Some(n)) => IntervalSchedule::Fixed(n),
            (None, None) if first_epoch_every_step => {
                IntervalSchedule::Stepwise(vec![(0.0, 1), (1.0, interval)])
            }
            (None, None) => IntervalSchedule::Fixed(interval),
        },
        kl_clip: (kl > 0.0).then_some(kl),
        // KFC's conv factors (THOR's 1 / (ho wo) scale of conv layers): per-position
        // factors make a conv layer's step ho * wo times larger.
        conv_norm: ConvNorm::Kfc,
        ..ThorConfig::thor()
    };
    (args.thor_lr.unwrap_or(lr), cfg)
}

fn methods(task: Task, args: &Args) -> Vec<Method> {
    let (thor_lr, _) = thor_settings(task, args);
    let base = match task {
        Task::Autoencoder => [
            (Kind::Sgd, 1e-3),
            (Kind::AdamW, 1e-3),
            (Kind::Thor, thor_lr),
        ],
        Task::Cnn => [
            (Kind::Sgd, 0.05),
            (Kind::AdamW, 1e-3),
            (Kind::Thor, thor_lr),
        ],
    };
    let scales: &[f64] = if args.sweep {
        &[1.0 / 3.0, 1.0, 3.0]
    } else {
        &[1.0]
    };
    let wanted = |k: Kind| {
        let name = match k {
            Kind::Sgd => "sgd",
            Kind::AdamW => "adamw",
            Kind::Thor => "thor",
        };
        args.only.split(',').any(|w| w.trim() == name)
    };
    base.iter()
        .filter(|(k, _)| wanted(*k))
        .flat_map(|&(kind, lr)| {
            scales.iter().map(move |s| Method {
                kind,
                lr: (lr * s * 1e6).round() / 1e6,
            })
        })
        .collect()
}

/// A model of either task over THOR layers.
enum Model {
    Autoencoder(Vec<thor_candle::ThorLinear>),
    Cnn {
        c1: thor_candle::ThorConv2d,
        c2: thor_candle::ThorConv2d,
        f1: thor_candle::ThorLinear,
        f2: thor_candle::ThorLinear,
    },
}

const AE_SIZES: [usize; 9] = [784, 1000, 500, 250, 30, 250, 500, 1000, 784];

impl Model {
    fn new(task: Task, vb: VarBuilder, layers: &ThorLayers) -> thor_candle::Result<Self> {
        Ok(match task {
            Task::Autoencoder => Model::Autoencoder(
                AE_SIZES
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| thor_candle::linear(w[0], w[1], vb.pp(format!("l{i}")), layers))
                    .collect::<thor_candle::Result<_>>()?,
            ),
            Task::Cnn => {
                let cfg = Conv2dConfig {
                    padding: 2,
                    ..Default::default()
                };
                Model::Cnn {
                    c1: thor_candle::conv2d(1, 16, 5, cfg, vb.pp("c1"), layers)?,
                    c2: thor_candle::conv2d(16, 32, 5, cfg, vb.pp("c2"), layers)?,
                    f1: thor_candle::linear(32 * 7 * 7, 128, vb.pp("f1"), layers)?,
                    f2: thor_candle::linear(128, 10, vb.pp("f2"), layers)?,
                }
            }
        })
    }

    /// Logits: the reconstruction's (before the sigmoid) or the classes'.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Model::Autoencoder(ls) => {
                let mut h = x.clone();
                for (i, l) in ls.iter().enumerate() {
                    h = l.forward(&h)?;
                    if i + 1 < ls.len() {
                        h = h.relu()?;
                    }
                }
                Ok(h)
            }
            Model::Cnn { c1, c2, f1, f2 } => {
                let x = x.reshape(((), 1, 28, 28))?;
                let h = c1.forward(&x)?.relu()?.max_pool2d(2)?;
                let h = c2.forward(&h)?.relu()?.max_pool2d(2)?;
                let h = f1.forward(&h.flatten_from(1)?)?.relu()?;
                f2.forward(&h)
            }
        }
    }

    /// The batch's mean loss.
    fn loss(&self, task: Task, x: &Tensor, y: &Tensor) -> candle_core::Result<Tensor> {
        let z = self.forward(x)?;
        match task {
            // Binary cross-entropy of sigmoid(z) against the pixels, summed over pixels:
            // softplus(z) - x z, written stably.
            Task::Autoencoder => {
                let softplus = (z.relu()? + (z.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
                (softplus - (x * &z)?)?.sum(D::Minus1)?.mean_all()
            }
            Task::Cnn => candle_nn::loss::cross_entropy(&z, y),
        }
    }
}

enum Opt {
    Sgd(MomentumSgd),
    AdamW(candle_nn::AdamW),
    Thor(Box<ThorOptimizer>),
}

impl Opt {
    fn backward_step(&mut self, loss: &Tensor) -> Res<()> {
        match self {
            Opt::Sgd(o) => o.backward_step(loss)?,
            Opt::AdamW(o) => o.backward_step(loss)?,
            Opt::Thor(o) => o.backward_step(loss)?,
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
struct EpochLog {
    epoch: usize,
    seconds: f64,
    train_loss: f64,
    test_loss: f64,
    test_acc: f64,
}

struct RunLog {
    label: String,
    kind: Kind,
    epochs: Vec<EpochLog>,
    step_time: Duration,
    thor_time: Duration,
    steps: usize,
}

struct Setup<'a> {
    task: Task,
    dev: &'a Device,
    train: &'a data::Split,
    test: &'a data::Split,
    init: &'a HashMap<String, Tensor>,
    orders: &'a [Vec<usize>],
    batch: usize,
}

fn train_run(s: &Setup, m: &Method, args: &Args, pb: &ProgressBar) -> Res<RunLog> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, s.dev);
    let layers = ThorLayers::new();
    let model = Model::new(s.task, vb, &layers)?;
    for (name, t) in s.init {
        varmap.data().lock().unwrap()[name].set(t)?;
    }
    let vars = varmap.all_vars();
    let steps_per_epoch = s.train.len() / s.batch;
    let mut opt = match m.kind {
        Kind::Sgd => Opt::Sgd(MomentumSgd::with_params(
            vars,
            ParamsMomentumSgd::new(m.lr),
        )?),
        Kind::AdamW => Opt::AdamW(candle_nn::AdamW::new(
            vars,
            candle_nn::ParamsAdamW {
                lr: m.lr,
                weight_decay: 0.0,
                ..Default::default()
            },
        )?),
        Kind::Thor => {
            let (_, cfg) = thor_settings(s.task, args);
            let p = ThorParams {
                sgd: ParamsMomentumSgd::new(m.lr),
                thor: cfg,
                loss_mean: LossMean::Batch,
            };
            Opt::Thor(Box::new(ThorOptimizer::new(&varmap, &layers, p)?))
        }
    };
    let mut log = RunLog {
        label: m.label(),
        kind: m.kind,
        epochs: Vec::new(),
        step_time: Duration::ZERO,
        thor_time: Duration::ZERO,
        steps: 0,
    };
    let mut seconds = 0.0;
    for (epoch, order) in s.orders.iter().enumerate() {
        let t0 = Instant::now();
        let mut sum = 0.0;
        for step in 0..steps_per_epoch {
            let idx = &order[step * s.batch..(step + 1) * s.batch];
            let (x, y) = s.train.batch(idx, s.dev)?;
            let ts = Instant::now();
            if let Opt::Thor(o) = &mut opt {
                let at = epoch as f64 + step as f64 / steps_per_epoch as f64;
                o.set_epoch(at);
                if args.thor_warmup > 0.0 {
                    o.set_learning_rate(m.lr * (at / args.thor_warmup).min(1.0))?;
                }
            }
            let loss = model.loss(s.task, &x, &y)?;
            opt.backward_step(&loss)
                .map_err(|e| format!("{}: epoch {}: {e}", m.label(), epoch + 1))?;
            let l = loss.to_scalar::<f32>()? as f64;
            log.step_time += ts.elapsed();
            log.steps += 1;
            if !l.is_finite() {
                return Err(
                    format!("{}: the loss diverged at epoch {}", m.label(), epoch + 1).into(),
                );
            }
            sum += l;
            pb.inc(1);
        }
        seconds += t0.elapsed().as_secs_f64();
        layers.set_training(false);
        let (test_loss, test_acc) = evaluate(&model, s)?;
        layers.set_training(true);
        let e = EpochLog {
            epoch: epoch + 1,
            seconds,
            train_loss: sum / steps_per_epoch as f64,
            test_loss,
            test_acc,
        };
        say(
            pb,
            format!(
                "  {:<18} epoch {:>2}  train {:>9.4}  test {:>9.4}{}  {:>6.1} s",
                m.label(),
                e.epoch,
                e.train_loss,
                e.test_loss,
                if s.task == Task::Cnn {
                    format!("  acc {:>5.1}%", 100.0 * e.test_acc)
                } else {
                    String::new()
                },
                e.seconds
            ),
        );
        log.epochs.push(e);
    }
    if let Opt::Thor(o) = &opt {
        log.thor_time = o.preconditioner_time();
    }
    Ok(log)
}

/// A line above the progress bar (or plainly when there is no terminal).
fn say(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        println!("{msg}");
    } else {
        pb.println(msg);
    }
}

fn evaluate(model: &Model, s: &Setup) -> Res<(f64, f64)> {
    let idx: Vec<usize> = (0..s.test.len()).collect();
    let (mut loss, mut correct) = (0.0, 0usize);
    for chunk in idx.chunks(500) {
        let (x, y) = s.test.batch(chunk, s.dev)?;
        loss += model.loss(s.task, &x, &y)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        if s.task == Task::Cnn {
            let pred = model.forward(&x)?.argmax(D::Minus1)?;
            correct += pred
                .eq(&y)?
                .to_dtype(DType::F32)?
                .sum_all()?
                .to_scalar::<f32>()? as usize;
        }
    }
    let n = s.test.len() as f64;
    Ok((loss / n, correct as f64 / n))
}

/// The initial weights every optimizer starts from, drawn with `seed` as candle-nn draws
/// them (Kaiming normal weights for ReLU, biases uniform in +-1/sqrt(fan_in)): candle's CPU
/// generator cannot be seeded, and runs should be repeatable.
fn initial_weights(task: Task, dev: &Device, seed: u64) -> Res<HashMap<String, Tensor>> {
    use rand::{Rng, SeedableRng};
    use rand_distr::{Distribution, Normal};
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, dev);
    Model::new(task, vb, &ThorLayers::new())?;
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = HashMap::new();
    for name in names {
        let dims = data[name].dims().to_vec();
        let n: usize = dims.iter().product();
        // A weight's fan-in is its elements per output; a bias takes its layer weight's.
        let weight = name.replace(".bias", ".weight");
        let wd = data
            .get(&weight)
            .ok_or_else(|| format!("no weight for `{name}`"))?
            .dims()
            .to_vec();
        let fan_in = wd.iter().skip(1).product::<usize>() as f64;
        let v: Vec<f32> = if name.ends_with(".bias") {
            let b = 1.0 / fan_in.sqrt();
            (0..n).map(|_| rng.random_range(-b..b) as f32).collect()
        } else {
            let normal = Normal::new(0.0, (2.0 / fan_in).sqrt())?;
            (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
        };
        out.insert(name.clone(), Tensor::from_vec(v, dims, dev)?);
    }
    Ok(out)
}

fn device(name: &str) -> Res<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => Ok(Device::new_cuda(0)?),
        other => Err(format!("--device must be cpu or cuda, got `{other}`").into()),
    }
}

fn main() {
    let args = Args::parse();
    if let (Some(text), None) = (&args.thor_intervals, intervals(&args)) {
        eprintln!("error: --thor-intervals {text:?}: expected epoch:interval pairs (epoch >= 0, interval >= 1)");
        std::process::exit(2);
    }
    if let Err(e) = run(&args) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

fn run(args: &Args) -> Res<()> {
    let dev = device(&args.device)?;
    let tasks: Vec<Task> = match args.task.as_str() {
        "autoencoder" => vec![Task::Autoencoder],
        "cnn" => vec![Task::Cnn],
        "both" => vec![Task::Autoencoder, Task::Cnn],
        other => {
            return Err(format!("--task must be autoencoder, cnn or both, got `{other}`").into())
        }
    };
    if args.batch == 0 {
        return Err("--batch must be at least 1".into());
    }
    let all = data::load(&args.data)?;
    let (train, test) = all.split(400, 0);
    println!(
        "MNIST subset: {} train / {} test images (stratified, seed 0); device {:?}; batch {}; \
         seed {}",
        train.len(),
        test.len(),
        dev.location(),
        args.batch,
        args.seed
    );
    for task in tasks {
        let epochs = args.epochs.unwrap_or(match task {
            Task::Autoencoder => 10,
            Task::Cnn => 6,
        });
        let orders: Vec<Vec<usize>> = (0..epochs)
            .map(|e| data::permutation(train.len(), args.seed * 1_000_003 + 1000 + e as u64))
            .collect();
        // The initial weights every optimizer starts from.
        let init = initial_weights(task, &dev, args.seed)?;
        let setup = Setup {
            task,
            dev: &dev,
            train: &train,
            test: &test,
            init: &init,
            orders: &orders,
            batch: args.batch,
        };
        let methods = methods(task, args);
        let steps = (train.len() / args.batch * epochs * methods.len()) as u64;
        println!(
            "\n== {}: {} epochs, {} runs",
            task.name(),
            epochs,
            methods.len()
        );
        let pb = ProgressBar::new(steps);
        pb.set_style(
            ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps, {elapsed} elapsed, eta {eta}",
            )
            .unwrap(),
        );
        let mut logs = Vec::new();
        for m in &methods {
            match train_run(&setup, m, args, &pb) {
                Ok(l) => logs.push(l),
                Err(e) => say(&pb, format!("  {e}")),
            }
        }
        pb.finish_and_clear();
        report(task, &logs);
        if !args.out.is_empty() {
            let dir = PathBuf::from(&args.out);
            std::fs::create_dir_all(&dir)?;
            for (x_label, by_time) in [("epoch", false), ("seconds", true)] {
                let series: Vec<(String, Vec<(f64, f64)>)> = logs
                    .iter()
                    .map(|l| {
                        let pts = l
                            .epochs
                            .iter()
                            .map(|e| {
                                (
                                    if by_time { e.seconds } else { e.epoch as f64 },
                                    e.train_loss,
                                )
                            })
                            .collect();
                        (l.label.clone(), pts)
                    })
                    .collect();
                let path = dir.join(format!("{}_loss_vs_{x_label}.svg", task.name()));
                plot::chart(
                    &path,
                    &format!("MNIST {}: training loss", task.name()),
                    x_label,
                    &series,
                )?;
                println!("plot: {}", path.display());
            }
        }
    }
    Ok(())
}

fn report(task: Task, logs: &[RunLog]) {
    let best_first_order = logs
        .iter()
        .filter(|l| l.kind != Kind::Thor)
        .filter_map(|l| l.epochs.last().map(|e| e.train_loss))
        .fold(f64::INFINITY, f64::min);
    if best_first_order.is_finite() {
        println!(
            "\n{}: best first-order final training loss {:.4}",
            task.name(),
            best_first_order
        );
    } else {
        println!("\n{}: no first-order run to compare with", task.name());
    }
    let reach = |l: &RunLog, pred: &dyn Fn(&EpochLog) -> bool| {
        l.epochs
            .iter()
            .find(|e| pred(e))
            .map(|e| format!("{:>3} / {:>6.1} s", e.epoch, e.seconds))
            .unwrap_or_else(|| "  never      ".into())
    };
    print!(
        "{:<18} {:>11} {:>9} {:>16}",
        "optimizer", "final loss", "best acc", "to best 1st-order"
    );
    if task == Task::Cnn {
        print!(" {:>16}", "to 97% test acc");
    }
    println!(" {:>10} {:>12}", "ms/step", "THOR ms/step");
    for l in logs {
        let last = l.epochs.last();
        let best_acc = l.epochs.iter().map(|e| e.test_acc).fold(0.0, f64::max);
        let acc = if task == Task::Cnn {
            format!("{:.1}%", 100.0 * best_acc)
        } else {
            "-".into()
        };
        print!(
            "{:<18} {:>11.4} {:>9} {:>16}",
            l.label,
            last.map_or(f64::NAN, |e| e.train_loss),
            acc,
            if best_first_order.is_finite() {
                reach(l, &|e| e.train_loss <= best_first_order)
            } else {
                "-".into()
            }
        );
        if task == Task::Cnn {
            print!(" {:>16}", reach(l, &|e| e.test_acc >= 0.97));
        }
        let per = |d: Duration| 1e3 * d.as_secs_f64() / l.steps.max(1) as f64;
        println!(
            " {:>10.2} {:>12}",
            per(l.step_time),
            if l.kind == Kind::Thor {
                format!("{:.2}", per(l.thor_time))
            } else {
                "-".into()
            }
        );
    }
}
