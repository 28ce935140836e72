//! The THOR optimizer, independent of any framework: per-layer Kronecker factors split into
//! blocks, THOR's trace rule deciding per layer whether to recompute, reuse or freeze the
//! inverses, and the preconditioned gradient. The learning rate, momentum and weight decay
//! stay the framework's.
//!
//! Wiring it into a training loop:
//!
//! ```no_run
//! use thor_kernels::thor::{LayerKind, Thor, ThorConfig};
//! # fn forward_backward() -> (Vec<f32>, Vec<f32>, Vec<f32>) { unimplemented!() }
//! let mut thor = Thor::new(ThorConfig::thor())?;
//! let fc = thor.add_layer(LayerKind::Linear { inputs: 64, outputs: 10, bias: true })?;
//! for step in 0..100 {
//!     thor.set_epoch(step as f64 / 50.0);
//!     // Forward and backward in your framework: the layer's inputs a [N, 64], the
//!     // per-example gradients of its outputs g [N, 10], and its gradient [10, 64 + 1]
//!     // (weight gradient with the bias gradient as the last column).
//!     let (a, g, grad) = forward_backward();
//!     if thor.needs_statistics() {
//!         thor.observe(fc, &a, &g, 32)?;
//!     }
//!     let mut update = vec![0.0; grad.len()];
//!     thor.precondition(fc, &grad, &mut update)?;
//!     // ... apply `update` with your optimizer (lr, momentum, weight decay) ...
//!     thor.finish_step();
//! }
//! # Ok::<(), thor_kernels::Error>(())
//! ```

mod compute;
mod schedule;
mod state;

pub use schedule::{lr_poly, DampingSchedule, IntervalSchedule};

use crate::backend::{AnyBackend, BackendKind};
use crate::cpu::InvertOptions;
use crate::error::{check_len, product, try_resize, try_vec, Error, Result};
use crate::invert::FailurePolicy;
use crate::layout::{check_block_size, BlockLayout};
use crate::rule::{self, fisher_trace, RuleState};
pub use crate::rule::{Decision, Thresholds};

/// The shape of a layer THOR preconditions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// A fully connected layer `y = W x (+ b)`, W of `[outputs, inputs]`.
    Linear {
        /// Input features.
        inputs: usize,
        /// Output features.
        outputs: usize,
        /// Whether the layer has a bias; THOR then appends a ones column to the activations
        /// and expects the bias gradient as the last column of the gradient.
        bias: bool,
    },
    /// A 2-d convolution, weights flattened to `[c_out, c_in * kh * kw]`; the caller supplies
    /// im2col'd activations, one row per output position.
    Conv2d {
        /// Input channels.
        c_in: usize,
        /// Output channels.
        c_out: usize,
        /// Kernel height.
        kh: usize,
        /// Kernel width.
        kw: usize,
        /// Whether the layer has a bias (as for [`LayerKind::Linear`]).
        bias: bool,
    },
}

impl LayerKind {
    fn bias(&self) -> bool {
        match *self {
            LayerKind::Linear { bias, .. } | LayerKind::Conv2d { bias, .. } => bias,
        }
    }

    /// Activation columns as the caller passes them (without the ones column).
    ///
    /// Saturates instead of overflowing: a layer too large to count is refused when it is
    /// registered ([`Thor::add_layer`]).
    pub fn inputs(&self) -> usize {
        match *self {
            LayerKind::Linear { inputs, .. } => inputs,
            LayerKind::Conv2d { c_in, kh, kw, .. } => c_in.saturating_mul(kh).saturating_mul(kw),
        }
    }

    /// Dimension of the input-side factor A (inputs, +1 with a bias).
    pub fn d_a(&self) -> usize {
        self.inputs().saturating_add(self.bias() as usize)
    }

    /// Dimension of the output-side factor G.
    pub fn d_g(&self) -> usize {
        match *self {
            LayerKind::Linear { outputs, .. } => outputs,
            LayerKind::Conv2d { c_out, .. } => c_out,
        }
    }

    fn validate(&self) -> Result<()> {
        let dims: &[usize] = match self {
            LayerKind::Linear {
                inputs, outputs, ..
            } => &[*inputs, *outputs],
            LayerKind::Conv2d {
                c_in,
                c_out,
                kh,
                kw,
                ..
            } => &[*c_in, *c_out, *kh, *kw],
        };
        if dims.contains(&0) {
            return Err(Error::invalid(
                "layer",
                format!("{self:?} has a zero dimension"),
            ));
        }
        // d_A = c_in kh kw (+ 1) and the gradient's d_G x d_A elements must be countable:
        // every later size is computed from them unchecked.
        let d_a = match *self {
            LayerKind::Linear { inputs, .. } => Some(inputs),
            LayerKind::Conv2d { c_in, kh, kw, .. } => {
                c_in.checked_mul(kh).and_then(|v| v.checked_mul(kw))
            }
        }
        .and_then(|v| v.checked_add(self.bias() as usize));
        let fits = d_a
            .and_then(|a| a.checked_mul(self.d_g()))
            .is_some_and(|n| n <= isize::MAX as usize / 4);
        if !fits {
            return Err(Error::invalid(
                "layer",
                format!("{self:?} is too large: its gradient's element count overflows"),
            ));
        }
        Ok(())
    }
}

/// The optimizer's configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ThorConfig {
    /// Block size of the factors: 32, 64, 128 or 256.
    pub block: usize,
    /// Statistics decay: 0 keeps per-batch statistics (THOR's reference code), otherwise an
    /// exponential moving average `S <- decay S + (1 - decay) X^T X / N`.
    pub stat_decay: f32,
    /// Damping schedule; `sqrt(l)` is added to each factor.
    pub damping: DampingSchedule,
    /// Steps between statistics (and inverse) refreshes.
    pub interval: IntervalSchedule,
    /// Trace-rule thresholds.
    pub thresholds: Thresholds,
    /// Where the accumulation, inversion and apply run: `Cpu`, `Cuda` (device 0; an error
    /// when there is none) or `Auto` (the GPU when one is usable). The optimizer's state
    /// stays in host memory either way.
    pub backend: BackendKind,
    /// Non-SPD blocks: retry with more damping by default.
    pub policy: FailurePolicy,
    /// K-FAC's KL clip: when set, [`Thor::kl_clip_factor`] scales updates so that
    /// `lr^2 * sum(g . dW)` stays under this bound.
    pub kl_clip: Option<f32>,
}

impl ThorConfig {
    /// THOR's recipe at toy scale: b = 128, per-batch statistics, damping 0.03 x 0.87^(e/10),
    /// statistics every 20 steps, thresholds (0.01, 0), non-SPD retry.
    pub fn thor() -> Self {
        Self {
            block: 128,
            stat_decay: 0.0,
            damping: DampingSchedule::Decay {
                l0: 0.03,
                decay: 0.87,
                every: 10.0,
            },
            interval: IntervalSchedule::Fixed(20),
            thresholds: Thresholds::THOR,
            backend: BackendKind::Auto,
            policy: FailurePolicy::retry(),
            kl_clip: None,
        }
    }

    fn validate(&self) -> Result<()> {
        check_block_size(self.block)?;
        if !(self.stat_decay >= 0.0 && self.stat_decay < 1.0) {
            return Err(Error::invalid(
                "stat_decay",
                format!("must be in [0, 1), got {}", self.stat_decay),
            ));
        }
        self.damping.validate()?;
        self.interval.validate()?;
        self.thresholds.validate()?;
        self.policy.params()?;
        if let Some(k) = self.kl_clip {
            if !(k.is_finite() && k > 0.0) {
                return Err(Error::invalid(
                    "kl_clip",
                    format!("must be finite and > 0, got {k}"),
                ));
            }
        }
        Ok(())
    }
}

/// A registered layer's index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LayerId(pub usize);

/// Per-layer counters, readable at any time (also the C ABI's `ThorCounters`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerCounters {
    /// Statistics steps whose statistics were accepted.
    pub statistics: u64,
    /// Statistics steps that recomputed the inverses.
    pub updates: u64,
    /// Statistics steps that kept the previous inverses.
    pub reuses: u64,
    /// 1 once the layer froze (it stays frozen).
    pub freezes: u64,
    /// Statistics steps skipped because activations or gradients were not finite.
    pub skipped: u64,
    /// Inversions that failed even after retries (previous inverses kept).
    pub failed_inversions: u64,
}

#[derive(Debug, Clone)]
struct LayerState {
    kind: LayerKind,
    a: BlockLayout,
    g: BlockLayout,
    a_stats: Vec<f32>,
    g_stats: Vec<f32>,
    a_inv: Vec<f32>,
    g_inv: Vec<f32>,
    has_stats: bool,
    /// The trace rule's state: last finite layer trace, frozen flag.
    rule: RuleState,
    counters: LayerCounters,
}

/// The THOR optimizer state.
#[derive(Debug)]
pub struct Thor {
    cfg: ThorConfig,
    layers: Vec<LayerState>,
    step: u64,
    epoch: f64,
    next_stats: u64,
    // Where the heavy operations run (its scratch sized as layers are added).
    compute: Box<dyn compute::Compute>,
    ones_buf: Vec<f32>,
    traces_buf: Vec<f32>,
    info_buf: Vec<i32>,
}

impl Thor {
    /// A new optimizer; errors on an invalid configuration or an unavailable backend.
    pub fn new(cfg: ThorConfig) -> Result<Self> {
        cfg.validate()?;
        let (backend, _) = AnyBackend::select(cfg.backend)?;
        let compute = compute::on(backend);
        Ok(Self {
            cfg,
            layers: Vec::new(),
            step: 0,
            epoch: 0.0,
            next_stats: 0,
            compute,
            ones_buf: Vec::new(),
            traces_buf: Vec::new(),
            info_buf: Vec::new(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &ThorConfig {
        &self.cfg
    }

    /// Registers a layer; its factors start empty (identity inverses until the first
    /// statistics).
    pub fn add_layer(&mut self, kind: LayerKind) -> Result<LayerId> {
        kind.validate()?;
        let b = self.cfg.block;
        // The layer's own sizes are what the caller passed: errors name `layer`.
        let layout = |d: usize, side: &str| {
            BlockLayout::new(d, b).map_err(|e| match e {
                Error::InvalidArgument { reason, .. } => {
                    Error::invalid("layer", format!("{kind:?}: factor {side}: {reason}"))
                }
                other => other,
            })
        };
        let a = layout(kind.d_a(), "A")?;
        let g = layout(kind.d_g(), "G")?;
        // Every buffer is sized by the caller's layer: allocated fallibly, so that a layer
        // too large for memory is an error rather than an abort (and nothing changes).
        let eye = |arg: &'static str, l: &BlockLayout| -> Result<Vec<f32>> {
            let mut v = try_vec(arg, l.buffer_len(), 0.0f32)?;
            for j in 0..l.blocks() {
                for i in 0..b {
                    v[j * b * b + i * b + i] = 1.0;
                }
            }
            Ok(v)
        };
        let state = LayerState {
            kind,
            a,
            g,
            a_stats: try_vec("layer", a.buffer_len(), 0.0)?,
            g_stats: try_vec("layer", g.buffer_len(), 0.0)?,
            a_inv: eye("layer", &a)?,
            g_inv: eye("layer", &g)?,
            has_stats: false,
            rule: RuleState::default(),
            counters: LayerCounters::default(),
        };
        let blocks = a.blocks().max(g.blocks());
        self.compute.reserve(b, blocks, kind.d_g(), kind.d_a())?;
        if self.traces_buf.len() < blocks {
            try_resize("layer", &mut self.traces_buf, blocks, 0.0)?;
            try_resize("layer", &mut self.info_buf, blocks, 0)?;
        }
        self.layers.try_reserve(1).map_err(|_| Error::OutOfMemory {
            arg: "layer",
            bytes: std::mem::size_of::<LayerState>(),
        })?;
        self.layers.push(state);
        Ok(LayerId(self.layers.len() - 1))
    }

    /// Number of registered layers.
    pub fn layers(&self) -> usize {
        self.layers.len()
    }

    /// Sets the training position (fractional epochs) that the schedules read.
    pub fn set_epoch(&mut self, epoch: f64) {
        if epoch.is_finite() && epoch >= 0.0 {
            self.epoch = epoch;
        }
    }

    /// The current training position in epochs.
    pub fn epoch(&self) -> f64 {
        self.epoch
    }

    /// Steps finished so far.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The damping at the current epoch.
    pub fn damping(&self) -> f32 {
        self.cfg.damping.at(self.epoch)
    }

    /// Whether this step is a statistics step: hand every layer's activations and output
    /// gradients to [`Thor::observe`] before preconditioning.
    pub fn needs_statistics(&self) -> bool {
        self.step >= self.next_stats
    }

    fn layer(&self, id: LayerId) -> Result<&LayerState> {
        self.layers.get(id.0).ok_or_else(|| {
            Error::invalid(
                "layer",
                format!("no layer {} (have {})", id.0, self.layers.len()),
            )
        })
    }

    /// The shape of layer `id`.
    pub fn layer_kind(&self, id: LayerId) -> Result<LayerKind> {
        Ok(self.layer(id)?.kind)
    }

    /// The counters of layer `id`.
    pub fn counters(&self, id: LayerId) -> Result<LayerCounters> {
        Ok(self.layer(id)?.counters)
    }

    /// Whether layer `id` is frozen.
    pub fn is_frozen(&self, id: LayerId) -> Result<bool> {
        Ok(self.layer(id)?.rule.frozen)
    }

    /// Hands over layer `id`'s statistics: activations `acts` `[rows, inputs]` (im2col rows
    /// for a conv layer, no ones column) and per-example output gradients `out_grads`
    /// `[rows, d_g]` (the gradient of the summed loss, i.e. the mean loss's gradient times the
    /// batch size). Updates the factors, applies the trace rule and, when it says so,
    /// recomputes the layer's inverses.
    ///
    /// Returns the rule's [`Decision`]: [`Decision::Frozen`] for a frozen layer (nothing
    /// done), [`Decision::Skipped`] when a value anywhere is not finite (counted; nothing
    /// changes). Shape errors are typed errors.
    pub fn observe(
        &mut self,
        id: LayerId,
        acts: &[f32],
        out_grads: &[f32],
        rows: usize,
    ) -> Result<Decision> {
        let (b, stat_decay, thresholds, policy) = (
            self.cfg.block,
            self.cfg.stat_decay,
            self.cfg.thresholds,
            self.cfg.policy,
        );
        let damping = self.damping();
        let l = self
            .layers
            .get_mut(id.0)
            .ok_or_else(|| Error::invalid("layer", format!("no layer {}", id.0)))?;
        if rows == 0 {
            return Err(Error::invalid("rows", "at least one row is needed"));
        }
        let (inputs, d_a, d_g) = (l.kind.inputs(), l.kind.d_a(), l.kind.d_g());
        check_len("acts", product("rows", rows, inputs)?, acts.len())?;
        check_len("out_grads", product("rows", rows, d_g)?, out_grads.len())?;
        if l.rule.frozen {
            return Ok(Decision::Frozen);
        }
        if acts.iter().chain(out_grads).any(|v| !v.is_finite()) {
            l.counters.skipped += 1;
            return Ok(Decision::Skipped);
        }
        let (alpha, beta) = if l.has_stats && stat_decay > 0.0 {
            ((1.0 - stat_decay) / rows as f32, stat_decay)
        } else {
            (1.0 / rows as f32, 0.0)
        };
        let x_a: &[f32] = if l.kind.bias() {
            try_resize("rows", &mut self.ones_buf, product("rows", rows, d_a)?, 1.0)?;
            for (dst, src) in self
                .ones_buf
                .chunks_exact_mut(d_a)
                .zip(acts.chunks_exact(inputs))
            {
                dst[..inputs].copy_from_slice(src);
                dst[inputs] = 1.0;
            }
            &self.ones_buf
        } else {
            acts
        };
        let tr = &mut self.traces_buf;
        self.compute.accumulate(
            x_a,
            rows,
            &l.a,
            alpha,
            beta,
            &mut l.a_stats,
            &mut tr[..l.a.blocks()],
        )?;
        self.compute.accumulate(
            out_grads,
            rows,
            &l.g,
            alpha,
            beta,
            &mut l.g_stats,
            &mut tr[..l.g.blocks()],
        )?;
        l.has_stats = true;
        l.counters.statistics += 1;
        let tr_a = real_trace(&l.a, &l.a_stats);
        let tr_g = real_trace(&l.g, &l.g_stats);
        let cur = fisher_trace(tr_a, d_a, tr_g, d_g, damping as f64);
        let decision = rule::step(&mut l.rule, cur, thresholds);
        match decision {
            Decision::Update => {
                let opts = InvertOptions {
                    policy,
                    ..InvertOptions::uniform(damping.sqrt())
                };
                let info = &mut self.info_buf;
                let mut ok = true;
                for (layout, stats, inv) in [
                    (&l.a, &l.a_stats, &mut l.a_inv),
                    (&l.g, &l.g_stats, &mut l.g_inv),
                ] {
                    let nb = layout.blocks();
                    self.compute.invert(b, stats, inv, &mut info[..nb], &opts)?;
                    ok &= info[..nb].iter().all(|&i| i == 0);
                }
                // A block that failed keeps its previous inverse (the kernel leaves it as it was).
                if ok {
                    l.counters.updates += 1;
                } else {
                    l.counters.failed_inversions += 1;
                }
            }
            Decision::Reuse => l.counters.reuses += 1,
            Decision::Freeze => l.counters.freezes = 1,
            Decision::Frozen | Decision::Skipped => {}
        }
        Ok(decision)
    }

    /// The preconditioned gradient of layer `id`: `out = G^-1 grad A^-1` with the layer's
    /// current block inverses; `grad` and `out` are `[d_g, d_a]` (bias gradient as the last
    /// column for a layer with bias). Before the first statistics the inverses are identity.
    pub fn precondition(&mut self, id: LayerId, grad: &[f32], out: &mut [f32]) -> Result<()> {
        let l = self
            .layers
            .get(id.0)
            .ok_or_else(|| Error::invalid("layer", format!("no layer {}", id.0)))?;
        let (d_a, d_g) = (l.kind.d_a(), l.kind.d_g());
        check_len("grad", d_g * d_a, grad.len())?;
        check_len("out", d_g * d_a, out.len())?;
        self.compute
            .apply((&l.g, &l.g_inv), grad, (&l.a, &l.a_inv), d_g, d_a, out)
    }

    /// Where the accumulation, inversion and apply run (`cpu (N threads)` or `cuda:<name>`).
    pub fn backend_name(&self) -> String {
        self.compute.name()
    }

    /// K-FAC's KL clip factor for this step: `min(1, sqrt(kl_clip / (lr^2 * sum g . dW)))`
    /// over every layer's gradient and preconditioned gradient; 1 when no clip is set.
    pub fn kl_clip_factor<'a>(
        &self,
        lr: f32,
        pairs: impl IntoIterator<Item = (&'a [f32], &'a [f32])>,
    ) -> f32 {
        let Some(k) = self.cfg.kl_clip else {
            return 1.0;
        };
        let vg: f64 = pairs
            .into_iter()
            .map(|(g, d)| {
                g.iter()
                    .zip(d)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
            .sum::<f64>()
            * (lr as f64).powi(2);
        if vg > 0.0 && vg.is_finite() {
            ((k as f64 / vg).sqrt().min(1.0)) as f32
        } else {
            1.0
        }
    }

    /// Ends the step: on a statistics step, schedules the next one.
    pub fn finish_step(&mut self) {
        if self.step >= self.next_stats {
            self.next_stats = self.step + self.cfg.interval.at(self.epoch);
        }
        self.step += 1;
    }
}

/// Sum of the real (unpadded) diagonal of a factor.
fn real_trace(layout: &BlockLayout, blocks: &[f32]) -> f64 {
    let b = layout.block();
    (0..layout.dim())
        .map(|i| blocks[(i / b) * b * b + (i % b) * b + i % b] as f64)
        .sum()
}
