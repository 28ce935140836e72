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

mod engine;
mod schedule;
mod state;

pub use schedule::{lr_poly, DampingSchedule, IntervalSchedule};

use crate::backend::{AnyBackend, BackendKind};
use crate::cpu::step::HostStepInput;
use crate::error::{check_len, check_min_len, product, try_resize, Error, Result};
use crate::invert::FailurePolicy;
use crate::layout::{check_block_size, BlockLayout};
use crate::patches::{Conv2dGeometry, InputLayout, Patches};
pub use crate::rule::{Decision, Thresholds};
use crate::step::{AccumulateMode, StepConfig};

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
    /// Where the layers' state lives and their operations run: `Cpu`, `Cuda` (device 0;
    /// an error when there is none) or `Auto` (the GPU when one is usable). On the GPU the
    /// statistics, inverses, rule state and counters stay in device memory; each call
    /// uploads its host inputs and brings back what it returns.
    pub backend: BackendKind,
    /// Non-SPD blocks: retry with more damping by default.
    pub policy: FailurePolicy,
    /// K-FAC's KL clip: when set, [`Thor::kl_clip_factor`] scales updates so that
    /// `lr^2 * sum(g . dW)` stays under this bound.
    pub kl_clip: Option<f32>,
    /// How [`Thor::observe_conv`] normalises a conv layer's factors.
    pub conv_norm: ConvNorm,
}

/// The normalisation of a conv layer's factors in [`Thor::observe_conv`] (see
/// [`crate::patches`] for the derivation). With `T = ho * wo` output positions per sample
/// and `N` samples, G is always `sum g g^T / (N T)` (`g` the summed loss's gradient at a
/// position); A is:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConvNorm {
    /// `sum a a^T / (N T)`: every row weighs the same, as for a linear layer (the default,
    /// and what [`Thor::observe`] on explicit patch rows computes). Without damping the
    /// preconditioned gradient is `T` times KFC's: THOR's MindSpore code scales conv layers
    /// by `1 / (ho * wo)` after the apply, which gives KFC's.
    #[default]
    PerPosition,
    /// `sum a a^T / N`, KFC's Omega (Grosse and Martens, 2016): A is `T` times
    /// `PerPosition`'s, so the preconditioned gradient is KFC's with no extra scale.
    Kfc,
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
            conv_norm: ConvNorm::PerPosition,
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

impl Drop for Thor {
    /// On a CUDA backend, waits for the work the optimizer queued (its kernels' modules go
    /// with it).
    fn drop(&mut self) {
        #[cfg(feature = "cuda")]
        if let AnyBackend::Cuda(dev) = &self.backend {
            let _ = dev.synchronize();
        }
    }
}

/// Layer `id` of `layers` (a free function, so that the optimizer's other fields stay
/// borrowable beside it).
fn layer_in(layers: &mut [LayerState], id: LayerId) -> Result<&mut LayerState> {
    let n = layers.len();
    layers
        .get_mut(id.0)
        .ok_or_else(|| Error::invalid("layer", format!("no layer {} (have {n})", id.0)))
}

/// Errors naming the first device address that is null or not aligned for f32.
#[cfg(feature = "cuda")]
fn check_f32_ptrs(ptrs: &[(&'static str, u64)]) -> Result<()> {
    match ptrs.iter().find(|&&(_, p)| p == 0 || p % 4 != 0) {
        Some(&(name, p)) => Err(Error::invalid(
            name,
            format!("null or misaligned address {p:#x}"),
        )),
        None => Ok(()),
    }
}

/// The A and G views of a conv layer's statistics step, checked against the layer and each
/// other: A with the layer's bias column and normalisation, G the positions of the output.
fn conv_views(
    kind: &LayerKind,
    input: Patches,
    grad: Patches,
    norm: ConvNorm,
) -> Result<(Patches, Patches)> {
    let LayerKind::Conv2d {
        c_in,
        c_out,
        kh,
        kw,
        bias,
    } = *kind
    else {
        return Err(Error::invalid(
            "layer",
            format!("observe_conv needs a Conv2d layer, this one is {kind:?}"),
        ));
    };
    // Errors name the geometry's field; a tensor's strides are named by the tensor.
    let named = |strides: &'static str| {
        move |e: Error| match e {
            Error::InvalidArgument {
                arg: "strides",
                reason,
            } => Error::invalid(strides, reason),
            other => other,
        }
    };
    input.validate().map_err(named("input_strides"))?;
    grad.validate().map_err(named("grad_strides"))?;
    let g = &input.geometry;
    if g.c_in != c_in || g.kernel != [kh, kw] {
        return Err(Error::shape(
            "input_view",
            format!("c_in {c_in}, kernel [{kh}, {kw}] (the layer's)"),
            format!("c_in {}, kernel {:?}", g.c_in, g.kernel),
        ));
    }
    let [ho, wo] = g.output()?;
    if grad.geometry != Conv2dGeometry::new(c_out, ho, wo, [1, 1]) || grad.batch != input.batch {
        return Err(Error::shape(
            "grad_view",
            format!(
                "the positions of [{}, {c_out}, {ho}, {wo}] (Patches::positions)",
                input.batch
            ),
            format!("{:?} over {} samples", grad.geometry, grad.batch),
        ));
    }
    Ok((
        input.with_ones(bias).with_per_sample(norm == ConvNorm::Kfc),
        grad.with_ones(false).with_per_sample(false),
    ))
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

impl LayerCounters {
    /// The six counters in field order (statistics, updates, reuses, freezes, skipped,
    /// failed inversions): the device's and the state file's order.
    pub fn to_array(&self) -> [u64; 6] {
        [
            self.statistics,
            self.updates,
            self.reuses,
            self.freezes,
            self.skipped,
            self.failed_inversions,
        ]
    }

    /// The counters from [`LayerCounters::to_array`]'s order.
    pub fn from_array(v: [u64; 6]) -> Self {
        let [statistics, updates, reuses, freezes, skipped, failed_inversions] = v;
        LayerCounters {
            statistics,
            updates,
            reuses,
            freezes,
            skipped,
            failed_inversions,
        }
    }
}

/// Whether `e` is a batch's "not run" (a layer cancelled with the batch).
fn not_run(e: &Error) -> bool {
    matches!(e, Error::Communication(m) if m.starts_with("not run"))
}

/// A registered layer: its shape, layouts and the engine that holds its state.
#[derive(Debug)]
struct LayerState {
    kind: LayerKind,
    a: BlockLayout,
    g: BlockLayout,
    engine: Box<dyn engine::LayerEngine>,
    /// On one rank of a group with host collectives: joins the layer's collectives to the
    /// others' in [`Thor::observe_layers`].
    slot: Option<crate::dist::BatchSlot>,
}

/// The inputs of one layer's statistics step, for [`Thor::observe_layers`].
// A short-lived descriptor passed in slices: the conv variant's two views are not worth a
// box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy)]
pub enum LayerInputs<'a> {
    /// As [`Thor::observe`]: activations `[rows, inputs]` (no ones column) and output
    /// gradients `[rows, d_g]`.
    Dense {
        /// The layer's input activations.
        acts: &'a [f32],
        /// The gradients of its output.
        out_grads: &'a [f32],
        /// Rows of both (at least one).
        rows: usize,
    },
    /// As [`Thor::observe_conv`]: a convolution's raw input and output-gradient tensors.
    Conv {
        /// The layer's input tensor.
        input: &'a [f32],
        /// How `input` is laid out.
        input_view: Patches,
        /// The gradient of its output.
        out_grad: &'a [f32],
        /// How `out_grad` is laid out.
        grad_view: Patches,
    },
}

/// The step inputs of layer `kind` from `item`: checked against the layer (nothing is
/// run on error); a dense layer with bias gets its ones column in `ones`.
fn step_inputs<'a>(
    kind: &LayerKind,
    item: LayerInputs<'a>,
    norm: ConvNorm,
    ones: &'a mut Vec<f32>,
) -> Result<(HostStepInput<'a, f32>, HostStepInput<'a, f32>)> {
    match item {
        LayerInputs::Dense {
            acts,
            out_grads,
            rows,
        } => {
            if rows == 0 {
                return Err(Error::invalid("rows", "at least one row is needed"));
            }
            let (inputs, d_a, d_g) = (kind.inputs(), kind.d_a(), kind.d_g());
            check_len("acts", product("rows", rows, inputs)?, acts.len())?;
            check_len("out_grads", product("rows", rows, d_g)?, out_grads.len())?;
            let x_a: &[f32] = if kind.bias() {
                try_resize("rows", ones, product("rows", rows, d_a)?, 1.0)?;
                for (dst, src) in ones.chunks_exact_mut(d_a).zip(acts.chunks_exact(inputs)) {
                    dst[..inputs].copy_from_slice(src);
                    dst[inputs] = 1.0;
                }
                ones
            } else {
                acts
            };
            Ok((
                HostStepInput::matrix(x_a, rows, d_a),
                HostStepInput::matrix(out_grads, rows, d_g),
            ))
        }
        LayerInputs::Conv {
            input,
            input_view,
            out_grad,
            grad_view,
        } => {
            let (a, g) = conv_views(kind, input_view, grad_view, norm)?;
            check_min_len("input", a.span()?, input.len())?;
            check_min_len("out_grad", g.span()?, out_grad.len())?;
            Ok((
                HostStepInput {
                    x: input,
                    layout: InputLayout::Patches(a),
                },
                HostStepInput {
                    x: out_grad,
                    layout: InputLayout::Patches(g),
                },
            ))
        }
    }
}

/// The THOR optimizer state.
#[derive(Debug)]
pub struct Thor {
    cfg: ThorConfig,
    layers: Vec<LayerState>,
    step: u64,
    epoch: f64,
    next_stats: u64,
    /// Where the layers' state lives and their operations run.
    backend: AnyBackend,
    /// The ones columns of dense layers with bias, one buffer per layer of a call.
    ones_bufs: Vec<Vec<f32>>,
    /// On one rank of a group: its communicator, and the blocks of the layers so far (the
    /// next layer's plan starts at the rank after them).
    dist: Option<(engine::ThorComm, usize)>,
}

impl Thor {
    /// A new optimizer; errors on an invalid configuration or an unavailable backend.
    pub fn new(cfg: ThorConfig) -> Result<Self> {
        cfg.validate()?;
        let (backend, _) = AnyBackend::select(cfg.backend)?;
        Self::with_backend(cfg, backend)
    }

    /// An optimizer on a backend the caller made (`cfg.backend` is not consulted): for
    /// instance a [`crate::cuda::CudaDevice`] on a framework's stream
    /// (`CudaDevice::from_stream`), so that the optimizer's work is ordered with the
    /// framework's.
    pub fn with_backend(cfg: ThorConfig, backend: AnyBackend) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            cfg,
            layers: Vec::new(),
            step: 0,
            epoch: 0.0,
            next_stats: 0,
            backend,
            ones_bufs: Vec::new(),
            dist: None,
        })
    }

    /// The optimizer of one rank of a data-parallel group ([`crate::dist`]): `comm` is this
    /// rank's end of the group. Every rank makes its optimizer with the same configuration,
    /// adds the same layers in the same order and calls [`Thor::observe`] (or
    /// [`Thor::observe_conv`]) for the same layers in the same order with its own local
    /// batch ([`Thor::observe_layers`] for several layers at once: three collectives for all
    /// of them); each such call is then three collectives, after which every rank holds the
    /// decision, counters and inverses one rank would compute from the union of the
    /// batches (a NaN on any rank skips the layer on all). The blocks of the model's layers
    /// are spread round-robin over the ranks: each rank accumulates its batch for every
    /// block, but applies the EMA to and inverts only the blocks it owns. Preconditioning is
    /// local.
    ///
    /// On the CPU backend with `cfg.backend` `Cpu` or `Auto`; with `Cuda`, on CUDA device 0
    /// (of those the process sees: `CUDA_VISIBLE_DEVICES` picks one per process), the
    /// collectives staged through host memory ([`crate::cuda::dist::HostStagedComm`]; for
    /// another device, or NCCL, [`Thor::with_device_communicator`]). Before saving ([`Thor::to_bytes`]), call
    /// [`Thor::gather_statistics`] on every rank: the saved state is then complete and
    /// loads into a group of any size, or into a single optimizer. After a failed
    /// collective ([`Error::Communication`]) every layer refuses further statistics steps,
    /// preconditioning and saving: restore a saved state into a new optimizer on a new group.
    pub fn with_communicator(
        cfg: ThorConfig,
        comm: Box<dyn crate::dist::Communicator>,
    ) -> Result<Self> {
        if cfg.backend == BackendKind::Cuda {
            #[cfg(feature = "cuda")]
            {
                cfg.validate()?;
                let dev = crate::cuda::CudaDevice::new(0)?;
                let staged = crate::cuda::dist::HostStagedComm::new(comm);
                return Self::with_device_communicator(cfg, dev, Box::new(staged));
            }
            #[cfg(not(feature = "cuda"))]
            return Err(Error::invalid(
                "backend",
                "this build has no CUDA backend (the `cuda` feature is off)",
            ));
        }
        let mut thor = Self::with_backend(cfg, AnyBackend::Cpu(crate::backend::CpuBackend))?;
        thor.dist = Some((
            engine::ThorComm::Host(crate::dist::SharedComm::new(comm)),
            0,
        ));
        Ok(thor)
    }

    /// The optimizer of one rank of a data-parallel group on the CUDA device `dev`, its
    /// collectives through `comm` on `dev`'s stream (for instance
    /// [`crate::cuda::dist::NcclComm`], made on `dev`): as [`Thor::with_communicator`], with
    /// every layer's statistics step resident on the device ([`CudaDevice::new_distributed_thor_step`]:
    /// a statistics step of a layer is its launches and three collectives on the stream).
    /// `cfg.backend` is not consulted.
    ///
    /// [`CudaDevice::new_distributed_thor_step`]: crate::cuda::CudaDevice::new_distributed_thor_step
    #[cfg(feature = "cuda")]
    pub fn with_device_communicator(
        cfg: ThorConfig,
        dev: crate::cuda::CudaDevice,
        comm: Box<dyn crate::cuda::dist::DeviceCommunicator>,
    ) -> Result<Self> {
        let mut thor = Self::with_backend(cfg, AnyBackend::Cuda(Box::new(dev)))?;
        thor.dist = Some((
            engine::ThorComm::Device(crate::cuda::dist::SharedDeviceComm::new(comm)),
            0,
        ));
        Ok(thor)
    }

    /// On one rank of a group ([`Thor::with_communicator`]): gives every rank the
    /// statistics of every block of every layer (a collective: every rank calls it), so
    /// that any rank's [`Thor::to_bytes`] saves the whole state. Nothing to do otherwise.
    pub fn gather_statistics(&mut self) -> Result<()> {
        for l in &mut self.layers {
            l.engine.gather_statistics(&self.backend)?;
        }
        Ok(())
    }

    /// On one rank of a group: the blocks of the model's factors this rank owns (keeps the
    /// statistics of and inverts); `None` otherwise.
    pub fn owned_blocks(&self) -> Option<usize> {
        self.dist.as_ref()?;
        Some(
            self.layers
                .iter()
                .filter_map(|l| l.engine.owned_blocks())
                .sum(),
        )
    }

    /// On one rank of a group: what its communicator has moved so far.
    pub fn comm_counters(&self) -> Option<crate::dist::CommCounters> {
        self.dist.as_ref().map(|(c, _)| c.counters())
    }

    /// The backend the optimizer runs on.
    pub fn backend(&self) -> &AnyBackend {
        &self.backend
    }

    /// The settings of each layer's factor step.
    fn step_config(&self) -> StepConfig {
        StepConfig {
            mode: AccumulateMode::F32,
            stat_decay: self.cfg.stat_decay,
            thresholds: self.cfg.thresholds,
            policy: self.cfg.policy,
            history: 1,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ThorConfig {
        &self.cfg
    }

    /// Sets how [`Thor::observe_conv`] normalises conv factors from the next call on
    /// ([`ThorConfig::conv_norm`]).
    pub fn set_conv_norm(&mut self, norm: ConvNorm) {
        self.cfg.conv_norm = norm;
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
        // too large for memory is an error naming it rather than an abort (and nothing
        // changes).
        let (engine, slot) = match &self.dist {
            None => {
                engine::new_engine(&self.backend, b, kind.d_a(), kind.d_g(), self.step_config())
                    .map(|e| (e, None))
            }
            Some((comm, first)) => engine::new_distributed_engine(
                &self.backend,
                b,
                kind.d_a(),
                kind.d_g(),
                self.step_config(),
                comm,
                *first,
            ),
        }
        .map_err(|e| match e {
            Error::OutOfMemory { bytes, .. } => Error::OutOfMemory {
                arg: "layer",
                bytes,
            },
            other => other,
        })?;
        self.layers.try_reserve(1).map_err(|_| Error::OutOfMemory {
            arg: "layer",
            bytes: std::mem::size_of::<LayerState>(),
        })?;
        if let Some((_, first)) = &mut self.dist {
            *first += a.blocks() + g.blocks();
        }
        self.layers.push(LayerState {
            kind,
            a,
            g,
            engine,
            slot,
        });
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

    /// The CUDA device of an optimizer on the CUDA backend; for device buffers, an error
    /// on the CPU backend.
    #[cfg(feature = "cuda")]
    fn device(&self) -> Result<&crate::cuda::CudaDevice> {
        match &self.backend {
            AnyBackend::Cuda(dev) => Ok(dev),
            AnyBackend::Cpu(_) => Err(Error::invalid(
                "backend",
                "device buffers need the CUDA backend (this optimizer runs on the CPU)",
            )),
        }
    }

    /// The shape of layer `id`.
    pub fn layer_kind(&self, id: LayerId) -> Result<LayerKind> {
        Ok(self.layer(id)?.kind)
    }

    /// The counters of layer `id` (on a CUDA backend, read from the device).
    pub fn counters(&self, id: LayerId) -> Result<LayerCounters> {
        self.layer(id)?.engine.counters(&self.backend)
    }

    /// The decision of layer `id`'s last statistics step ([`Decision::Skipped`] before the
    /// first); on a CUDA backend it waits for the step.
    pub fn last_decision(&self, id: LayerId) -> Result<Decision> {
        self.layer(id)?.engine.last_decision(&self.backend)
    }

    /// Whether layer `id` is frozen.
    pub fn is_frozen(&self, id: LayerId) -> Result<bool> {
        Ok(self.counters(id)?.freezes == 1)
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
        let item = LayerInputs::Dense {
            acts,
            out_grads,
            rows,
        };
        self.observe_one(id, item)
    }

    /// One layer's statistics step (no allocation once the ones column is sized).
    fn observe_one(&mut self, id: LayerId, item: LayerInputs<'_>) -> Result<Decision> {
        let damping = self.damping();
        let norm = self.cfg.conv_norm;
        let l = layer_in(&mut self.layers, id)?;
        if self.ones_bufs.is_empty() {
            self.ones_bufs.push(Vec::new());
        }
        let (a, g) = step_inputs(&l.kind, item, norm, &mut self.ones_bufs[0])?;
        l.engine.observe(&self.backend, a, g, damping)
    }

    /// [`Thor::observe`] for a [`LayerKind::Conv2d`] layer from its raw tensors, without
    /// patch matrices (implicit im2col): `input` is the layer's input tensor as `input_view`
    /// describes it (geometry with the layer's `c_in` and kernel, batch, strides: NCHW,
    /// NHWC or a strided view), `out_grad` the gradient of its output, described by
    /// `grad_view` ([`Patches::positions`] of `[batch, c_out, ho, wo]` in any layout, or
    /// [`Conv2dGeometry::output`]'s sizes; a matrix of `batch * ho * wo` rows of `c_out`
    /// works too through [`Thor::observe`]). The layer's bias column is added by the
    /// optimizer (`input_view.ones` is ignored).
    ///
    /// The factors see `batch * ho * wo` rows (one per output position), normalised as
    /// [`ThorConfig::conv_norm`] says. Errors (nothing changes) when a view does not match
    /// the layer or the other view, or a tensor is too short.
    pub fn observe_conv(
        &mut self,
        id: LayerId,
        input: &[f32],
        input_view: Patches,
        out_grad: &[f32],
        grad_view: Patches,
    ) -> Result<Decision> {
        let item = LayerInputs::Conv {
            input,
            input_view,
            out_grad,
            grad_view,
        };
        self.observe_one(id, item)
    }

    /// The statistics steps of several layers at once, each as [`Thor::observe`] or
    /// [`Thor::observe_conv`] would run it; their decisions, in the order given. Every
    /// input is checked against its layer first: on an argument error (a layer given twice,
    /// a shape that does not match) no layer changes.
    ///
    /// On one rank of a group with host collectives ([`Thor::with_communicator`] on the
    /// CPU), the layers' steps run on threads of their own and their collectives are
    /// joined: three collectives for all the layers instead of three per layer (every rank
    /// must pass the same layers, in any order), run by the communicator on the calling
    /// thread. One thread per layer, all at once (a layer's step may wait in a collective
    /// for the others): their work runs on rayon's global pool, not on a pool the caller
    /// installed; a thread that cannot start fails the call before any step runs. A step
    /// that fails breaks the group (the other ranks' joined collectives would not line
    /// up). Elsewhere, and with one layer, they run one after the other, and an error in a
    /// layer's step (other than an argument error) comes after the layers before it have
    /// taken theirs. Unlike [`Thor::observe`], a call with several layers allocates (its
    /// lists, and the threads of a joined call).
    pub fn observe_layers(
        &mut self,
        items: &[(LayerId, LayerInputs<'_>)],
    ) -> Result<Vec<Decision>> {
        if let [(id, item)] = items {
            return Ok(vec![self.observe_one(*id, *item)?]);
        }
        let damping = self.damping();
        let norm = self.cfg.conv_norm;
        // Each layer once; the inputs checked before anything runs.
        let mut pick: Vec<Option<usize>> = vec![None; self.layers.len()];
        for (i, (id, _)) in items.iter().enumerate() {
            self.layer(*id)?;
            if pick[id.0].replace(i).is_some() {
                return Err(Error::invalid(
                    "layers",
                    format!("layer {} is given twice", id.0),
                ));
            }
        }
        if self.ones_bufs.len() < items.len() {
            self.ones_bufs.resize_with(items.len(), Vec::new);
        }
        let mut inputs = Vec::with_capacity(items.len());
        for ((id, item), ones) in items.iter().zip(self.ones_bufs.iter_mut()) {
            inputs.push(step_inputs(&self.layers[id.0].kind, *item, norm, ones)?);
        }
        // The layers' engines in the order given.
        let mut steps: Vec<Option<&mut LayerState>> = (0..items.len()).map(|_| None).collect();
        for (l, p) in self.layers.iter_mut().zip(&pick) {
            if let Some(i) = p {
                steps[*i] = Some(l);
            }
        }
        let steps: Vec<&mut LayerState> = steps.into_iter().flatten().collect();
        let be = &self.backend;
        let batch = match &self.dist {
            Some((engine::ThorComm::Host(c), _)) if items.len() > 1 => Some(c),
            _ => None,
        };
        let Some(shared) = batch else {
            return steps
                .into_iter()
                .zip(inputs)
                .map(|(l, (a, g))| l.engine.observe(be, a, g, damping))
                .collect();
        };
        // Participants in layer order, whatever order the caller gave (every rank must
        // pass the same layers, not necessarily in the same order).
        let mut order: Vec<usize> = (0..items.len()).collect();
        order.sort_by_key(|&i| items[i].0 .0);
        let mut participant = vec![0usize; items.len()];
        for (p, &i) in order.iter().enumerate() {
            participant[i] = p;
        }
        let slots = steps
            .iter()
            .map(|l| l.slot.clone())
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| Error::invalid("layers", "a layer without host collectives"))?;
        let batch = crate::dist::Batch::new(shared.clone(), items.len());
        // The layers' steps on threads of their own, started together once every thread
        // runs (a thread that cannot start cancels the batch: nothing is sent, the group
        // stays whole); their joined collectives on this thread.
        let outs: Vec<std::thread::Result<Result<Decision>>> = std::thread::scope(|scope| {
            let handles: Vec<_> = steps
                .into_iter()
                .zip(inputs)
                .zip(slots)
                .enumerate()
                .map(|(i, ((l, (a, g)), slot))| {
                    let batch = &batch;
                    let p = participant[i];
                    std::thread::Builder::new()
                        .name(format!("thor-layer-{}", items[i].0 .0))
                        .spawn_scoped(scope, move || {
                            if !batch.wait_open() {
                                batch.leave(p, None);
                                return Ok(Err(Error::Communication(
                                    "not run: the batch was cancelled".into(),
                                )));
                            }
                            let _joined = slot.join(batch, p);
                            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                                l.engine.observe(be, a, g, damping)
                            }));
                            match &r {
                                Ok(Ok(_)) => batch.leave(p, None),
                                Ok(Err(e)) => batch.leave(p, Some(&e.to_string())),
                                Err(_) => batch.leave(p, Some("a panic")),
                            }
                            r
                        })
                        .map_err(|e| {
                            batch.leave(p, None);
                            Error::invalid(
                                "layers",
                                format!(
                                    "could not start a thread per layer ({e}): nothing was run; \
                                     observe fewer layers at once"
                                ),
                            )
                        })
                })
                .collect();
            batch.open(handles.iter().all(Result::is_ok));
            batch.drive();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(Err),
                    Err(e) => Ok(Err(e)),
                })
                .collect()
        });
        if self.ones_bufs.len() > 1 {
            self.ones_bufs.truncate(1);
        }
        let mut decisions = Vec::with_capacity(outs.len());
        let mut first_err = None;
        for out in outs {
            match out {
                Ok(Ok(d)) => decisions.push(d),
                // The layer's own error (or why its thread did not start) before the
                // batch's "not run".
                Ok(Err(e)) => {
                    if first_err
                        .as_ref()
                        .is_none_or(|f| not_run(f) && !not_run(&e))
                    {
                        first_err = Some(e);
                    }
                }
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(decisions),
        }
    }

    /// The preconditioned gradient of layer `id`: `out = G^-1 grad A^-1` with the layer's
    /// current block inverses; `grad` and `out` are `[d_g, d_a]` (bias gradient as the last
    /// column for a layer with bias). Before the first statistics the inverses are identity.
    pub fn precondition(&mut self, id: LayerId, grad: &[f32], out: &mut [f32]) -> Result<()> {
        let l = layer_in(&mut self.layers, id)?;
        let (d_a, d_g) = (l.kind.d_a(), l.kind.d_g());
        check_len("grad", d_g * d_a, grad.len())?;
        check_len("out", d_g * d_a, out.len())?;
        l.engine.precondition(&self.backend, grad, out)
    }

    /// [`Thor::observe`] from device memory, on the CUDA backend: `acts` `[rows, inputs]`
    /// with row stride `acts_ld` (no ones column: it is added on the device for a layer
    /// with bias), `out_grads` `[rows, d_g]` with row stride `grads_ld`, both f32 of the
    /// optimizer's device. Queues the layer's factor step on the device's stream and returns
    /// without waiting: read the decision with [`Thor::last_decision`] when needed. Without
    /// a bias the inputs are read in place (no copy).
    #[cfg(feature = "cuda")]
    pub fn observe_device(
        &mut self,
        id: LayerId,
        acts: &cudarc::driver::CudaView<'_, f32>,
        acts_ld: usize,
        out_grads: &cudarc::driver::CudaView<'_, f32>,
        grads_ld: usize,
        rows: usize,
    ) -> Result<()> {
        use cudarc::driver::DevicePtr;
        let dev = self.device()?;
        let l = self.layer(id)?;
        let (inputs, d_g) = (l.kind.inputs(), l.kind.d_g());
        if rows == 0 {
            return Err(Error::invalid("rows", "at least one row is needed"));
        }
        dev.check_same_context("acts", acts)?;
        dev.check_same_context("out_grads", out_grads)?;
        let na = crate::layout::strided_len("acts_ld", rows, acts_ld, inputs)?;
        let ng = crate::layout::strided_len("grads_ld", rows, grads_ld, d_g)?;
        crate::error::check_min_len("acts", na, acts.len())?;
        crate::error::check_min_len("out_grads", ng, out_grads.len())?;
        let s = dev.stream().clone();
        let (ap, _a) = acts.device_ptr(&s);
        let (gp, _g) = out_grads.device_ptr(&s);
        // SAFETY: both views hold at least the elements checked above, on this device;
        // their guards record the use on the stream when dropped after the queueing.
        unsafe { self.observe_device_raw(id, ap, acts_ld, gp, grads_ld, rows) }
    }

    /// [`Thor::observe_device`] on raw device addresses (for the C ABI).
    ///
    /// # Safety
    /// `acts` points to `(rows - 1) * acts_ld + inputs` f32 and `out_grads` to
    /// `(rows - 1) * grads_ld + d_g` f32 of the optimizer's device, valid and unchanged
    /// until the queued work completes.
    #[cfg(feature = "cuda")]
    pub unsafe fn observe_device_raw(
        &mut self,
        id: LayerId,
        acts: u64,
        acts_ld: usize,
        out_grads: u64,
        grads_ld: usize,
        rows: usize,
    ) -> Result<()> {
        let damping = self.damping();
        let l = layer_in(&mut self.layers, id)?;
        if rows == 0 {
            return Err(Error::invalid("rows", "at least one row is needed"));
        }
        check_f32_ptrs(&[("acts", acts), ("out_grads", out_grads)])?;
        let bias = l.kind.bias();
        // SAFETY: this function's contract.
        unsafe {
            l.engine.observe_raw(
                &self.backend,
                (acts, InputLayout::matrix(rows, acts_ld)),
                bias,
                (out_grads, InputLayout::matrix(rows, grads_ld)),
                damping,
            )
        }
    }

    /// [`Thor::observe_conv`] from device memory, on the CUDA backend: the tensors are f32
    /// of the optimizer's device, read in place (no patch matrix, no copy). Queued, no
    /// wait: read the decision with [`Thor::last_decision`].
    #[cfg(feature = "cuda")]
    pub fn observe_conv_device(
        &mut self,
        id: LayerId,
        input: &cudarc::driver::CudaView<'_, f32>,
        input_view: Patches,
        out_grad: &cudarc::driver::CudaView<'_, f32>,
        grad_view: Patches,
    ) -> Result<()> {
        use cudarc::driver::DevicePtr;
        let dev = self.device()?;
        let (a, g) = conv_views(
            &self.layer(id)?.kind,
            input_view,
            grad_view,
            self.cfg.conv_norm,
        )?;
        dev.check_same_context("input", input)?;
        dev.check_same_context("out_grad", out_grad)?;
        check_min_len("input", a.span()?, input.len())?;
        check_min_len("out_grad", g.span()?, out_grad.len())?;
        let s = dev.stream().clone();
        let (ap, _a) = input.device_ptr(&s);
        let (gp, _g) = out_grad.device_ptr(&s);
        // SAFETY: both views hold the elements their layouts read, on this device; their
        // guards record the use on the stream when dropped after the queueing.
        unsafe { self.observe_conv_device_raw(id, ap, input_view, gp, grad_view) }
    }

    /// [`Thor::observe_conv_device`] on raw device addresses (for the C ABI).
    ///
    /// # Safety
    /// `input` and `out_grad` point to the f32 their views span ([`Patches::span`]) on the
    /// optimizer's device, valid and unchanged until the queued work completes.
    #[cfg(feature = "cuda")]
    pub unsafe fn observe_conv_device_raw(
        &mut self,
        id: LayerId,
        input: u64,
        input_view: Patches,
        out_grad: u64,
        grad_view: Patches,
    ) -> Result<()> {
        let damping = self.damping();
        let norm = self.cfg.conv_norm;
        let l = layer_in(&mut self.layers, id)?;
        let (a, g) = conv_views(&l.kind, input_view, grad_view, norm)?;
        check_f32_ptrs(&[("input", input), ("out_grad", out_grad)])?;
        // SAFETY: this function's contract.
        unsafe {
            l.engine.observe_raw(
                &self.backend,
                (input, InputLayout::Patches(a)),
                false,
                (out_grad, InputLayout::Patches(g)),
                damping,
            )
        }
    }

    /// [`Thor::precondition`] on device memory, on the CUDA backend: `grad` and `out`
    /// `[d_g, d_a]` f32 of the optimizer's device (disjoint). Queued, no wait.
    #[cfg(feature = "cuda")]
    pub fn precondition_device(
        &mut self,
        id: LayerId,
        grad: &cudarc::driver::CudaView<'_, f32>,
        out: &mut cudarc::driver::CudaViewMut<'_, f32>,
    ) -> Result<()> {
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let dev = self.device()?;
        let kind = self.layer(id)?.kind;
        let n = kind.d_g() * kind.d_a();
        dev.check_same_context("grad", grad)?;
        dev.check_same_context("out", out)?;
        check_len("grad", n, grad.len())?;
        check_len("out", n, out.len())?;
        let s = dev.stream().clone();
        let (gp, _g) = grad.device_ptr(&s);
        let (op, _o) = out.device_ptr_mut(&s);
        // SAFETY: both views hold `n` f32 of this device; `out` is borrowed mutably, so it
        // cannot be `grad`.
        unsafe { self.precondition_device_raw(id, gp, op) }
    }

    /// [`Thor::precondition_device`] on raw device addresses (for the C ABI); `out` may be
    /// `grad` (in place).
    ///
    /// # Safety
    /// `grad` and `out` point to `d_g * d_a` f32 of the optimizer's device, equal or
    /// disjoint, valid until the queued work completes.
    #[cfg(feature = "cuda")]
    pub unsafe fn precondition_device_raw(
        &mut self,
        id: LayerId,
        grad: u64,
        out: u64,
    ) -> Result<()> {
        let l = layer_in(&mut self.layers, id)?;
        // SAFETY: this function's contract.
        unsafe { l.engine.precondition_raw(&self.backend, grad, out) }
    }

    /// Where the accumulation, inversion and apply run (`cpu (N threads)` or `cuda:<name>`).
    pub fn backend_name(&self) -> String {
        self.backend.name()
    }

    /// K-FAC's KL clip factor for this step: `min(1, sqrt(kl_clip / (lr^2 * sum g . dW)))`
    /// over every layer's gradient and preconditioned gradient; 1 when no clip is set.
    pub fn kl_clip_factor<'a>(
        &self,
        lr: f32,
        pairs: impl IntoIterator<Item = (&'a [f32], &'a [f32])>,
    ) -> f32 {
        if self.cfg.kl_clip.is_none() {
            return 1.0;
        }
        let dot: f64 = pairs
            .into_iter()
            .map(|(g, d)| {
                g.iter()
                    .zip(d)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>()
            })
            .sum();
        self.kl_clip_factor_from_dot(lr, dot)
    }

    /// [`Thor::kl_clip_factor`] from the sum over layers of `g . dW` computed elsewhere (on
    /// the device, say): `min(1, sqrt(kl_clip / (lr^2 * dot)))`; 1 when no clip is set or
    /// the product is not positive and finite.
    pub fn kl_clip_factor_from_dot(&self, lr: f32, dot: f64) -> f32 {
        let Some(k) = self.cfg.kl_clip else {
            return 1.0;
        };
        let vg = dot * (lr as f64).powi(2);
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
