//! The THOR optimizer as an opaque handle.

#[allow(unused_imports)]
use super::*;

/// The optimizer's configuration (see `thor::ThorConfig`); fill it with
/// `thor_v1_optimizer_config_default` and change what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ThorOptimizerConfig {
    /// Block size: 32, 64, 128 or 256.
    pub block: i32,
    /// Statistics decay in [0, 1): 0 per-batch statistics, else EMA.
    pub stat_decay: f32,
    /// Damping `l0 * decay^(epoch / every)`; `decay` 1 keeps it constant.
    pub damping_l0: f32,
    /// See `damping_l0`.
    pub damping_decay: f32,
    /// See `damping_l0`.
    pub damping_every: f32,
    /// Steps between statistics.
    pub interval: u64,
    /// Trace-rule thresholds.
    pub w1: f64,
    /// See `w1`.
    pub w2: f64,
    /// KL clip bound, or <= 0 for none.
    pub kl_clip: f32,
    /// Non-SPD retry (1) or report only (0).
    pub retry: i32,
}

/// Fills `*cfg` with THOR's defaults.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`cfg` null or misaligned).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_config_default(
    cfg: *mut ThorOptimizerConfig,
) -> ThorStatus {
    guard(|| {
        check_ptr("cfg", cfg as *const ThorOptimizerConfig)?;
        let d = ThorConfig::thor();
        let (l0, decay, every) = match d.damping {
            DampingSchedule::Decay { l0, decay, every } => (l0, decay, every),
            DampingSchedule::Constant(l) => (l, 1.0, 1.0),
        };
        let c = ThorOptimizerConfig {
            block: d.block as i32,
            stat_decay: d.stat_decay,
            damping_l0: l0,
            damping_decay: decay,
            damping_every: every,
            interval: d.interval.at(0.0),
            w1: d.thresholds.w1,
            w2: d.thresholds.w2,
            kl_clip: d.kl_clip.unwrap_or(0.0),
            retry: 1,
        };
        // SAFETY: checked.
        unsafe { *cfg = c };
        Ok(())
    })
}

/// An optimizer handle: on the CPU (host pointers) or resident on a CUDA device (device
/// pointers, work queued on the context's stream).
pub struct ThorOptimizer {
    pub(crate) thor: Thor,
    pub(crate) device: bool,
}

/// The library's configuration from the C one, every field checked by the name the header
/// gives it (the block size, decay, thresholds and the rest when the optimizer is made).
pub(crate) fn config_of(c: ThorOptimizerConfig) -> Result<ThorConfig> {
    if !(c.damping_l0.is_finite() && c.damping_l0 >= 0.0) {
        return Err(Error::invalid(
            "damping_l0",
            format!("must be finite and >= 0, got {}", c.damping_l0),
        ));
    }
    if !(c.damping_decay > 0.0 && c.damping_decay <= 1.0) {
        return Err(Error::invalid(
            "damping_decay",
            format!("must be in (0, 1], got {}", c.damping_decay),
        ));
    }
    if !(c.damping_every.is_finite() && c.damping_every > 0.0) {
        return Err(Error::invalid(
            "damping_every",
            format!("must be finite and > 0, got {}", c.damping_every),
        ));
    }
    if c.kl_clip.is_nan() {
        return Err(Error::invalid(
            "kl_clip",
            "must be a number (<= 0 for none)",
        ));
    }
    Ok(ThorConfig {
        block: c.block.max(0) as usize,
        stat_decay: c.stat_decay,
        damping: DampingSchedule::Decay {
            l0: c.damping_l0,
            decay: c.damping_decay,
            every: c.damping_every,
        },
        interval: IntervalSchedule::Fixed(c.interval),
        thresholds: Thresholds { w1: c.w1, w2: c.w2 },
        backend: thor_kernels::BackendKind::Cpu,
        policy: if c.retry != 0 {
            FailurePolicy::retry()
        } else {
            FailurePolicy::Report
        },
        kl_clip: (c.kl_clip > 0.0).then_some(c.kl_clip),
        conv_norm: ConvNorm::PerPosition,
    })
}

/// Sets how `thor_v1_optimizer_observe_conv` normalises conv factors from now on: 0 per
/// position (A and G divided by `N * ho * wo` rows, the default), 1 KFC (A divided by the
/// `N` samples, so that a conv layer's update is the default's times `1 / (ho * wo)`).
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` null or misaligned, `conv_norm` not 0 or 1).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_set_conv_norm(
    opt: *mut ThorOptimizer,
    conv_norm: i32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        let norm = match conv_norm {
            0 => ConvNorm::PerPosition,
            1 => ConvNorm::Kfc,
            v => {
                return Err(Error::invalid(
                    "conv_norm",
                    format!("must be 0 (per position) or 1 (KFC), got {v}"),
                )
                .into())
            }
        };
        t.set_conv_norm(norm);
        Ok(())
    })
}

/// Creates an optimizer in `*out` (CPU backend). Release with `thor_v1_optimizer_destroy`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, or a field of `cfg` out
/// of range: the message names it).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_create(
    cfg: *const ThorOptimizerConfig,
    out: *mut *mut ThorOptimizer,
) -> ThorStatus {
    guard(|| {
        check_ptr("cfg", cfg)?;
        check_ptr("out", out as *const *mut ThorOptimizer)?;
        // SAFETY: checked.
        let config = config_of(unsafe { *cfg })?;
        let thor = Thor::new(config).map_err(rename("thresholds", "w1"))?;
        // SAFETY: checked.
        unsafe {
            *out = Box::into_raw(Box::new(ThorOptimizer {
                thor,
                device: false,
            }))
        };
        Ok(())
    })
}

/// Creates an optimizer in `*out` on the context `ctx`: on a CPU context as
/// `thor_v1_optimizer_create`; on a CUDA context resident on its device, with its work
/// queued on the context's stream, and every array the optimizer functions take
/// (activations, gradients, outputs) is device memory of that device. The optimizer keeps
/// its own handle on the device and stream: the context may be destroyed first, the stream
/// must outlive both. Release with `thor_v1_optimizer_destroy`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, or a field of `cfg` out
/// of range: the message names it); on a CUDA context `DRIVER`.
///
/// # Safety
/// `ctx` must come from this library; `cfg` and `out` address one value each.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_create_on(
    ctx: *mut ThorContext,
    cfg: *const ThorOptimizerConfig,
    out: *mut *mut ThorOptimizer,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function; checked first.
        let c = unsafe { ctx_mut(ctx)? };
        check_ptr("cfg", cfg)?;
        check_ptr("out", out as *const *mut ThorOptimizer)?;
        // SAFETY: checked.
        let config = config_of(unsafe { *cfg })?;
        let (backend, device) = match &c.device {
            AnyBackend::Cpu(_) => (AnyBackend::Cpu(CpuBackend), false),
            AnyBackend::Cuda(dev) => (
                AnyBackend::Cuda(Box::new(CudaDevice::from_stream(dev.stream().clone())?)),
                true,
            ),
        };
        let thor = Thor::with_backend(config, backend).map_err(rename("thresholds", "w1"))?;
        // SAFETY: checked.
        unsafe { *out = Box::into_raw(Box::new(ThorOptimizer { thor, device })) };
        Ok(())
    })
}

/// Destroys an optimizer (null is ignored).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_destroy(opt: *mut ThorOptimizer) {
    // SAFETY: the caller passes an optimizer made by this library, not destroyed before.
    unsafe { destroy(opt) }
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn opt_mut<'a>(opt: *mut ThorOptimizer) -> Result<&'a mut Thor> {
    check_ptr("opt", opt as *const ThorOptimizer)?;
    // SAFETY: a live optimizer made by this library, used by one thread at a time.
    Ok(unsafe { &mut (*opt).thor })
}

/// Whether the optimizer takes device pointers.
///
/// # Safety
/// `opt` is null or a live optimizer made by this library.
pub(crate) unsafe fn on_device(opt: *mut ThorOptimizer) -> bool {
    // SAFETY: the caller's contract; null is false.
    !opt.is_null() && unsafe { (*opt).device }
}

/// Registers `kind`; a layer too large to count or to allocate is an error naming
/// `size_arg`, the C argument its size comes from first.
pub(crate) fn add_layer(
    opt: *mut ThorOptimizer,
    kind: LayerKind,
    size_arg: &'static str,
    id: *mut i32,
) -> R {
    check_ptr("id", id as *const i32)?;
    // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
    let t = unsafe { opt_mut(opt)? };
    if t.layers() >= i32::MAX as usize {
        return Err(Error::invalid("opt", "2^31 - 1 layers registered already").into());
    }
    let l = t.add_layer(kind).map_err(rename("layer", size_arg))?;
    // SAFETY: checked.
    unsafe { *id = l.0 as i32 };
    Ok(())
}

pub(crate) fn size(arg: &'static str, v: i64) -> Result<usize> {
    usize::try_from(v).map_err(|_| Error::invalid(arg, format!("must be >= 0, got {v}")))
}

/// Registers a linear layer (`bias` 0 or 1); its index goes to `*id`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` or `id` null or misaligned, `inputs` or
/// `outputs` < 1, a layer whose sizes overflow); `OUT_OF_MEMORY` (its statistics and
/// inverses do not fit; nothing registered).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_add_linear(
    opt: *mut ThorOptimizer,
    inputs: i64,
    outputs: i64,
    bias: i32,
    id: *mut i32,
) -> ThorStatus {
    guard(|| {
        add_layer(
            opt,
            LayerKind::Linear {
                inputs: checks::dim("inputs", inputs)?,
                outputs: checks::dim("outputs", outputs)?,
                bias: bias != 0,
            },
            "inputs",
            id,
        )
    })
}

/// Registers a conv layer (im2col activations); its index goes to `*id`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` or `id` null or misaligned, a size < 1, `c_in *
/// kh * kw` or the gradient's size overflowing); `OUT_OF_MEMORY` (its statistics and
/// inverses do not fit; nothing registered).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_add_conv2d(
    opt: *mut ThorOptimizer,
    c_in: i64,
    c_out: i64,
    kh: i64,
    kw: i64,
    bias: i32,
    id: *mut i32,
) -> ThorStatus {
    guard(|| {
        let kind = LayerKind::Conv2d {
            c_in: checks::dim("c_in", c_in)?,
            c_out: checks::dim("c_out", c_out)?,
            kh: checks::dim("kh", kh)?,
            kw: checks::dim("kw", kw)?,
            bias: bias != 0,
        };
        add_layer(opt, kind, "c_in", id)
    })
}

/// Sets the training position in (fractional) epochs.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` null or misaligned, `epoch` negative or not
/// finite).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_set_epoch(
    opt: *mut ThorOptimizer,
    epoch: f64,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        if !(epoch.is_finite() && epoch >= 0.0) {
            return Err(
                Error::invalid("epoch", format!("must be finite and >= 0, got {epoch}")).into(),
            );
        }
        t.set_epoch(epoch);
        Ok(())
    })
}

/// `*out` = 1 when this step needs every layer's statistics (`thor_v1_optimizer_observe`).
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` or `out` null or misaligned).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_needs_statistics(
    opt: *mut ThorOptimizer,
    out: *mut i32,
) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const i32)?;
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        // SAFETY: checked.
        unsafe { *out = t.needs_statistics() as i32 };
        Ok(())
    })
}

/// Hands over layer `layer`'s activations `[rows, inputs]` and per-example output gradients
/// `[rows, outputs]` (row-major, dense; host memory, or device memory for an optimizer made
/// on a CUDA context, where the step is queued on its stream). `*observation` (host
/// memory): the rule's decision, a `ThorDecision` (0 update, 1 reuse, 2 freeze, 3 frozen:
/// nothing done, 4 skipped: non-finite input). `observation` may be null; on a CUDA
/// optimizer a non-null `observation` makes the call wait for the step, a null one does not
/// (read it later with `thor_v1_optimizer_last_decision`).
///
/// Returns `OK` (non-finite input too: the decision is then 4, skipped); `INVALID_ARGUMENT`
/// (a required pointer null, a pointer misaligned, `observation` overlapping the inputs, an
/// unknown `layer`, `rows` < 1 or overflowing); `OUT_OF_MEMORY`. On failure no state
/// changes and `*observation` is not written, except after `DRIVER` on a CUDA optimizer (a
/// failed wait for the queued step: the device's state is then unknown).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_observe(
    opt: *mut ThorOptimizer,
    layer: i32,
    acts: *const f32,
    out_grads: *const f32,
    rows: i64,
    observation: *mut i32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        let step = ThorLayerStep {
            layer,
            acts,
            out_grads,
            rows,
            conv: std::ptr::null(),
        };
        // SAFETY: `opt` was checked above; the pointer contract of this function.
        unsafe { observe_one(opt, t, step, observation)? };
        Ok(())
    })
}

/// One layer's statistics step from its checked `step`, its decision written to
/// `observation` (null: none; on a CUDA optimizer a null one does not wait for the step).
///
/// # Safety
/// `opt` checked and `t` its optimizer; the pointers of `step` and `observation` as the
/// single-layer calls' contract gives them.
unsafe fn observe_one(
    opt: *mut ThorOptimizer,
    t: &mut Thor,
    step: ThorLayerStep,
    observation: *mut i32,
) -> Result<()> {
    let o = (
        observation as *const i32,
        usize::from(!observation.is_null()),
    );
    // SAFETY: the caller's contract.
    let checked = unsafe { step.check(t, o)? };
    // SAFETY: `opt` was checked by the caller.
    let decision = if unsafe { on_device(opt) } {
        // SAFETY: the caller's contract, checked above.
        unsafe { checked.queue(t)? };
        if observation.is_null() {
            return Ok(());
        }
        t.last_decision(checked.id)?
    } else {
        // SAFETY: the caller's contract, checked above.
        match unsafe { checked.host()? } {
            (
                id,
                LayerInputs::Dense {
                    acts,
                    out_grads,
                    rows,
                },
            ) => t.observe(id, acts, out_grads, rows)?,
            (
                id,
                LayerInputs::Conv {
                    input,
                    input_view,
                    out_grad,
                    grad_view,
                },
            ) => t.observe_conv(id, input, input_view, out_grad, grad_view)?,
        }
    };
    if !observation.is_null() {
        // SAFETY: checked above, before anything changed.
        unsafe { *observation = decision.code() };
    }
    Ok(())
}

/// One layer's inputs for `thor_v1_optimizer_observe_layers`: a dense layer's activations
/// `[rows, inputs]` and output gradients `[rows, outputs]` as for
/// `thor_v1_optimizer_observe` (`conv` null), or a conv layer's input and output-gradient
/// tensors as `*conv` describes them, as for `thor_v1_optimizer_observe_conv` (`acts` the
/// input, `out_grads` the output gradient, `rows` ignored).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ThorLayerStep {
    /// The layer.
    pub layer: i32,
    /// Activations (dense) or the input tensor (conv).
    pub acts: *const f32,
    /// Output gradients (dense) or the output-gradient tensor (conv).
    pub out_grads: *const f32,
    /// Rows of a dense layer's inputs.
    pub rows: i64,
    /// A conv layer's geometry and strides, or null for a dense layer.
    pub conv: *const ThorConvTensors,
}

/// A [`ThorLayerStep`] checked against its layer: the two inputs' lengths, and their
/// layouts.
struct CheckedStep {
    id: LayerId,
    acts: *const f32,
    out_grads: *const f32,
    na: usize,
    ng: usize,
    /// `None` for a dense layer (its rows and widths), else the conv views.
    layout: std::result::Result<(usize, usize, usize), (Patches, Patches)>,
}

impl ThorLayerStep {
    /// Checks the step against its layer in `t`, the pointers with `out` (a region the call
    /// writes, `(null, 0)` for none): nothing is read but `*conv`.
    ///
    /// # Safety
    /// `conv`, when not null, must address a `ThorConvTensors`.
    unsafe fn check(&self, t: &Thor, out: (*const i32, usize)) -> Result<CheckedStep> {
        let id = LayerId(size("layer", self.layer as i64)?);
        let kind = t.layer_kind(id)?;
        if self.conv.is_null() {
            let rows = checks::dim("rows", self.rows)?;
            let (na, ng) = (
                count("rows", &[rows, kind.inputs()])?,
                count("rows", &[rows, kind.d_g()])?,
            );
            Regions::new()
                .read("acts", self.acts, na)
                .read("out_grads", self.out_grads, ng)
                .write_opt("observation", out.0, out.1)
                .check()?;
            return Ok(CheckedStep {
                id,
                acts: self.acts,
                out_grads: self.out_grads,
                na,
                ng,
                layout: Ok((rows, kind.inputs(), kind.d_g())),
            });
        }
        check_ptr("tensors", self.conv)?;
        // SAFETY: checked for null and alignment; a plain-data struct of the caller's.
        let c = unsafe { *self.conv };
        // Errors in the geometry or the strides name `tensors` and the field.
        let in_tensors = |e: Error| match e {
            Error::InvalidArgument { arg, reason } if arg != "layer" => {
                Error::invalid("tensors", format!("{arg}: {reason}"))
            }
            Error::Shape {
                arg,
                expected,
                actual,
            } => Error::shape("tensors", format!("{arg}: {expected}"), actual),
            other => other,
        };
        let (a, g, na, ng) = (|| {
            let (a, g) = conv_views(kind, &c)?;
            a.validate().map_err(rename("strides", "input_strides"))?;
            g.validate().map_err(rename("strides", "grad_strides"))?;
            let (na, ng) = (
                a.span().map_err(rename("strides", "input_strides"))?,
                g.span().map_err(rename("strides", "grad_strides"))?,
            );
            Ok((a, g, na, ng))
        })()
        .map_err(in_tensors)?;
        Regions::new()
            .read("input", self.acts, na)
            .read("out_grad", self.out_grads, ng)
            .read("tensors", self.conv, 1)
            .write_opt("observation", out.0, out.1)
            .check()?;
        Ok(CheckedStep {
            id,
            acts: self.acts,
            out_grads: self.out_grads,
            na,
            ng,
            layout: Err((a, g)),
        })
    }
}

impl CheckedStep {
    /// The step's host inputs.
    ///
    /// # Safety
    /// The checked pointers address host memory holding the lengths checked, valid for
    /// the returned lifetime.
    unsafe fn host(&self) -> Result<(LayerId, LayerInputs<'_>)> {
        let (an, gn) = match self.layout {
            Ok(_) => ("acts", "out_grads"),
            Err(_) => ("input", "out_grad"),
        };
        // SAFETY: the caller's contract.
        let (a, g) = unsafe {
            (
                host(an, self.acts, self.na)?,
                host(gn, self.out_grads, self.ng)?,
            )
        };
        let item = match self.layout {
            Ok((rows, _, _)) => LayerInputs::Dense {
                acts: a,
                out_grads: g,
                rows,
            },
            Err((input_view, grad_view)) => LayerInputs::Conv {
                input: a,
                input_view,
                out_grad: g,
                grad_view,
            },
        };
        Ok((self.id, item))
    }

    /// Queues the step of a CUDA optimizer on its stream.
    ///
    /// # Safety
    /// The checked pointers address device memory of the optimizer's context holding the
    /// lengths checked, valid until the queued work completes.
    unsafe fn queue(&self, t: &mut Thor) -> Result<()> {
        match self.layout {
            // SAFETY: the caller's contract; rows dense.
            Ok((rows, inputs, d_g)) => unsafe {
                t.observe_device_raw(
                    self.id,
                    self.acts as u64,
                    inputs,
                    self.out_grads as u64,
                    d_g,
                    rows,
                )
            },
            // SAFETY: the caller's contract.
            Err((a, g)) => unsafe {
                t.observe_conv_device_raw(self.id, self.acts as u64, a, self.out_grads as u64, g)
            },
        }
    }
}

/// The statistics steps of `n` layers at once: `steps[i]` as `thor_v1_optimizer_observe`
/// (or `_observe_conv`) would take it; `observations[i]` (host memory, may be null)
/// receives layer `steps[i].layer`'s decision. On a rank of a group
/// (`thor_v1_optimizer_create_distributed` and its variants, on a CPU context) the layers'
/// collectives are joined: three per call instead of three per layer (every rank passes
/// the same layers, in any order), run on the calling thread while each layer's step runs
/// on a thread of the library's. On a CUDA optimizer the steps are queued one after the
/// other on its stream (a non-null `observations` waits for them).
///
/// Returns `OK`; `INVALID_ARGUMENT` (as for the single-layer calls, naming the field;
/// `steps` null or `n` negative, a layer given twice, `observations` overlapping an
/// input); `OUT_OF_MEMORY`; `COMMUNICATION`. On an argument error nothing changes; after
/// another error on a CUDA optimizer, the steps before the failing one may have been
/// queued.
///
/// # Safety
/// `steps` must address `n` `ThorLayerStep`s and every pointer in them the elements their
/// descriptions give (host memory on a CPU context, device memory on a CUDA context),
/// `observations` `n` i32 or be null; all valid for the call and, on a CUDA context, until
/// the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_observe_layers(
    opt: *mut ThorOptimizer,
    n: i64,
    steps: *const ThorLayerStep,
    observations: *mut i32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        let n = size("n", n)?;
        Regions::new()
            .read("steps", steps, n)
            .write_opt("observations", observations as *const i32, n)
            .check()?;
        // SAFETY: checked just above; plain-data structs of the caller's.
        let steps = unsafe { host("steps", steps, n)? };
        let out = (
            observations as *const i32,
            if observations.is_null() { 0 } else { n },
        );
        let checked = steps
            .iter()
            .enumerate()
            // SAFETY: the pointer contract of this function.
            .map(|(i, s)| unsafe { s.check(t, out) }.map_err(|e| in_step(i, e)))
            .collect::<Result<Vec<_>>>()?;
        // SAFETY: `opt` was checked above.
        let decisions = if unsafe { on_device(opt) } {
            let mut seen = vec![false; t.layers()];
            for c in &checked {
                if std::mem::replace(&mut seen[c.id.0], true) {
                    return Err(Error::invalid(
                        "steps",
                        format!("layer {} is given twice", c.id.0),
                    )
                    .into());
                }
            }
            for c in &checked {
                // SAFETY: the pointer contract of this function, checked above.
                unsafe { c.queue(t)? };
            }
            if observations.is_null() {
                return Ok(());
            }
            checked
                .iter()
                .map(|c| t.last_decision(c.id))
                .collect::<Result<Vec<_>>>()?
        } else {
            let items = checked
                .iter()
                // SAFETY: the pointer contract of this function, checked above.
                .map(|c| unsafe { c.host() })
                .collect::<Result<Vec<_>>>()?;
            t.observe_layers(&items).map_err(|e| match e {
                Error::InvalidArgument {
                    arg: "layers",
                    reason,
                } => Error::InvalidArgument {
                    arg: "steps",
                    reason,
                },
                other => other,
            })?
        };
        if !observations.is_null() {
            // SAFETY: checked above: `n` i32, overlapping no input.
            let o = unsafe { std::slice::from_raw_parts_mut(observations, n) };
            for (o, d) in o.iter_mut().zip(decisions) {
                *o = d.code();
            }
        }
        Ok(())
    })
}

/// `e` about step `i` of a call: its reason says which step, and a conv step's fields are
/// named as `ThorLayerStep` names them.
fn in_step(i: usize, e: Error) -> Error {
    let field = |arg: &'static str| match arg {
        "input" => "acts",
        "out_grad" => "out_grads",
        "tensors" => "conv",
        other => other,
    };
    match e {
        Error::InvalidArgument { arg, reason } => Error::InvalidArgument {
            arg: field(arg),
            reason: format!("steps[{i}]: {reason}"),
        },
        Error::Shape {
            arg,
            expected,
            actual,
        } => Error::Shape {
            arg: field(arg),
            expected: format!("steps[{i}]: {expected}"),
            actual,
        },
        other => other,
    }
}

/// The preconditioned gradient of layer `layer`: `grad` and `out` are `[outputs, d_a]`
/// arrays (bias gradient as the last column for a layer with bias; host memory, or device
/// memory for an optimizer made on a CUDA context, where the apply is queued on its stream
/// and the call does not wait); `out` may equal `grad`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `out` overlapping `grad`
/// without being equal, an unknown `layer`); `OUT_OF_MEMORY` (the copy an in-place call
/// makes).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_precondition(
    opt: *mut ThorOptimizer,
    layer: i32,
    grad: *const f32,
    out: *mut f32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        let id = LayerId(size("layer", layer as i64)?);
        let kind = t.layer_kind(id)?;
        let n = count("layer", &[kind.d_g(), kind.d_a()])?;
        let in_place = std::ptr::eq(grad, out);
        // In place, `grad` and `out` are one buffer, written.
        let regions = if in_place {
            Regions::new()
        } else {
            Regions::new().read("grad", grad, n)
        };
        regions.write("out", out as *const f32, n).check()?;
        // SAFETY: `opt` was checked above.
        if unsafe { on_device(opt) } {
            // SAFETY: device pointers to `n` f32 (the pointer contract); in place is allowed.
            unsafe { t.precondition_device_raw(id, grad as u64, out as u64)? };
            return Ok(());
        }
        if in_place {
            let mut g = Vec::new();
            g.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
                arg: "grad",
                bytes: n * 4,
            })?;
            // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
            g.extend_from_slice(unsafe { host("grad", grad, n)? });
            // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
            t.precondition(id, &g, unsafe { host_mut("out", out, n)? })?;
        } else {
            // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
            t.precondition(id, unsafe { host("grad", grad, n)? }, unsafe {
                host_mut("out", out, n)?
            })?;
        }
        Ok(())
    })
}

/// K-FAC's KL clip factor for this step (`thor::Thor::kl_clip_factor`):
/// `min(1, sqrt(kl_clip / (lr^2 * sum_l grads[l] . updates[l])))` over the `n_layers` layers
/// `layers[i]`, with `grads[i]` and `updates[i]` host arrays of that layer's
/// `[outputs, d_a]` gradient and preconditioned gradient. `*factor` is 1 when the optimizer
/// has no KL clip. Multiply every preconditioned gradient by it before the update. Each
/// layer may appear once; the arrays must be non-null even when `n_layers` is 0.
/// On a CUDA optimizer the arrays are device memory; they are copied to the host (the call
/// waits).
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, `lr` negative or not
/// finite, `n_layers` negative or above the layer count, an unknown or repeated layer).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_kl_clip_factor(
    opt: *mut ThorOptimizer,
    lr: f32,
    n_layers: i64,
    layers: *const i32,
    grads: *const *const f32,
    updates: *const *const f32,
    factor: *mut f32,
) -> ThorStatus {
    guard(|| {
        check_ptr("factor", factor as *const f32)?;
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        if !(lr.is_finite() && lr >= 0.0) {
            return Err(Error::invalid("lr", format!("must be finite and >= 0, got {lr}")).into());
        }
        let n = size("n_layers", n_layers)?;
        if n > t.layers() {
            return Err(Error::invalid(
                "n_layers",
                format!("{n} layers given, the optimizer has {}", t.layers()),
            )
            .into());
        }
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let (ids, gp, up) = unsafe {
            (
                host("layers", layers, n)?,
                host("grads", grads, n)?,
                host("updates", updates, n)?,
            )
        };
        let mut regions = Regions::new()
            .read("layers", layers, n)
            .read("grads", grads, n)
            .read("updates", updates, n)
            .write("factor", factor as *const f32, 1);
        let mut lens = Vec::with_capacity(n);
        let mut seen = vec![false; t.layers()];
        for i in 0..n {
            let id = size("layers", ids[i] as i64)?;
            let kind = t
                .layer_kind(LayerId(id))
                .map_err(rename("layer", "layers"))?;
            if std::mem::replace(&mut seen[id], true) {
                return Err(Error::invalid(
                    "layers",
                    format!("layer {id} appears twice (its product would count twice)"),
                )
                .into());
            }
            let len = count("layers", &[kind.d_g(), kind.d_a()])?;
            regions = regions
                .read("grads", gp[i], len)
                .read("updates", up[i], len);
            lens.push(len);
        }
        regions.check()?;
        // On a CUDA optimizer the arrays are device memory: they come down first.
        let mut copies: Vec<(Vec<f32>, Vec<f32>)> = Vec::new();
        // SAFETY: `opt` was checked above.
        if unsafe { on_device(opt) } {
            let AnyBackend::Cuda(dev) = t.backend() else {
                return Err(Error::invalid("opt", "a device optimizer without a device").into());
            };
            let s = dev.stream();
            for i in 0..n {
                let (mut g, mut u) = (host_vec(lens[i])?, host_vec(lens[i])?);
                // SAFETY: device pointers to `lens[i]` f32 (the pointer contract); the
                // host vectors live until the synchronization below.
                unsafe {
                    thor_kernels::cudarc::driver::result::memcpy_dtoh_async(
                        &mut g,
                        gp[i] as u64,
                        s.cu_stream(),
                    )
                    .map_err(Error::from)?;
                    thor_kernels::cudarc::driver::result::memcpy_dtoh_async(
                        &mut u,
                        up[i] as u64,
                        s.cu_stream(),
                    )
                    .map_err(Error::from)?;
                }
                copies.push((g, u));
            }
            dev.synchronize()?;
        }
        let mut pairs = Vec::with_capacity(n);
        for i in 0..n {
            if let Some((g, u)) = copies.get(i) {
                pairs.push((&g[..], &u[..]));
                continue;
            }
            // SAFETY: the pointer contract of this function (module docs); checked above.
            pairs.push(unsafe {
                (
                    host("grads", gp[i], lens[i])?,
                    host("updates", up[i], lens[i])?,
                )
            });
        }
        let f = t.kl_clip_factor(lr, pairs);
        // SAFETY: checked.
        unsafe { *factor = f };
        Ok(())
    })
}

/// A zeroed host vector of `n` f32, or an out-of-memory error.
fn host_vec(n: usize) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory {
        arg: "layers",
        bytes: n * 4,
    })?;
    v.resize(n, 0.0);
    Ok(v)
}

/// The decision of layer `layer`'s last statistics step into `*out` (a `ThorDecision`;
/// 4, skipped, before the first). On a CUDA optimizer the call waits for the step.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, an unknown `layer`); on a
/// CUDA optimizer `DRIVER`.
///
/// # Safety
/// `opt` must come from this library; `out` addresses one int32 of host memory.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_last_decision(
    opt: *mut ThorOptimizer,
    layer: i32,
    out: *mut i32,
) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const i32)?;
        // SAFETY: the pointer contract of this function; checked first.
        let t = unsafe { opt_mut(opt)? };
        let d = t.last_decision(LayerId(size("layer", layer as i64)?))?;
        // SAFETY: checked.
        unsafe { *out = d.code() };
        Ok(())
    })
}

/// Ends the step.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` null or misaligned).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_finish_step(opt: *mut ThorOptimizer) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        unsafe { opt_mut(opt)? }.finish_step();
        Ok(())
    })
}

/// Per-layer counters (`thor::LayerCounters`, field for field).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThorCounters {
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

impl From<thor_kernels::thor::LayerCounters> for ThorCounters {
    fn from(c: thor_kernels::thor::LayerCounters) -> Self {
        let thor_kernels::thor::LayerCounters {
            statistics,
            updates,
            reuses,
            freezes,
            skipped,
            failed_inversions,
        } = c;
        ThorCounters {
            statistics,
            updates,
            reuses,
            freezes,
            skipped,
            failed_inversions,
        }
    }
}

/// Copies layer `layer`'s counters to `*out`.
///
/// Returns `OK`; `INVALID_ARGUMENT` (a pointer null or misaligned, an unknown `layer`).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_counters(
    opt: *mut ThorOptimizer,
    layer: i32,
    out: *mut ThorCounters,
) -> ThorStatus {
    guard(|| {
        check_ptr("out", out as *const ThorCounters)?;
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        let c = t.counters(LayerId(size("layer", layer as i64)?))?;
        // SAFETY: checked.
        unsafe { *out = c.into() };
        Ok(())
    })
}

/// # Safety
/// The caller's pointer contract: a non-null pointer addresses what its name says, for the
/// lengths given, valid for the call.
pub(crate) unsafe fn path_arg(path: *const c_char) -> Result<std::path::PathBuf> {
    check_ptr("path", path)?;
    // SAFETY: a NUL-terminated string per the contract.
    let s = unsafe { CStr::from_ptr(path) }
        .to_str()
        .map_err(|_| Error::invalid("path", "not UTF-8"))?;
    Ok(std::path::PathBuf::from(s))
}

/// Saves the optimizer state to the file `path` (atomically).
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` or `path` null, `path` not UTF-8 or not
/// writable: the message says why; the old file stays and no temporary file is left).
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_save(
    opt: *mut ThorOptimizer,
    path: *const c_char,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        t.save(&unsafe { path_arg(path)? })?;
        Ok(())
    })
}

/// Loads a state saved by `thor_v1_optimizer_save` for the same layers; on error nothing
/// changes.
///
/// Returns `OK`; `INVALID_ARGUMENT` (`opt` or `path` null, `path` unreadable, or not a
/// valid state file for this optimizer's layers: damaged, truncated, another version,
/// non-finite or inconsistent values; the message says which). On failure the optimizer is
/// unchanged.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_load(
    opt: *mut ThorOptimizer,
    path: *const c_char,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        t.load(&unsafe { path_arg(path)? })
            .map_err(rename("state", "path"))?;
        Ok(())
    })
}

/// The geometry of one conv layer's statistics step and the strides of its two tensors,
/// for `thor_v1_optimizer_observe_conv`. The layer's `c_in`, `c_out` and kernel come from
/// its registration.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ThorConvTensors {
    /// Samples in the batch.
    pub batch: i64,
    /// Input height.
    pub h: i64,
    /// Input width.
    pub w: i64,
    /// Stride `[sh, sw]`, at least 1.
    pub stride: [i64; 2],
    /// Zero padding `[ph, pw]` on each side.
    pub padding: [i64; 2],
    /// Dilation `[dh, dw]`, at least 1.
    pub dilation: [i64; 2],
    /// Element strides of the input tensor's logical `[n, c_in, h, w]` dimensions, as
    /// PyTorch's `input.stride()` gives them (contiguous NCHW: `[c_in*h*w, h*w, w, 1]`;
    /// channels last: `[h*w*c_in, 1, w*c_in, c_in]`).
    pub input_strides: [i64; 4],
    /// Element strides of the output gradient's `[n, c_out, ho, wo]`, likewise.
    pub grad_strides: [i64; 4],
}

/// The A and G views of a conv step described by `c` for layer `kind`.
fn conv_views(kind: LayerKind, c: &ThorConvTensors) -> Result<(Patches, Patches)> {
    let LayerKind::Conv2d {
        c_in,
        c_out,
        kh,
        kw,
        ..
    } = kind
    else {
        return Err(Error::invalid(
            "layer",
            format!("observe_conv needs a conv layer, this one is {kind:?}"),
        ));
    };
    let pair =
        |arg, v: [i64; 2]| -> Result<[usize; 2]> { Ok([size(arg, v[0])?, size(arg, v[1])?]) };
    let quad = |arg, v: [i64; 4]| -> Result<[usize; 4]> {
        Ok([
            size(arg, v[0])?,
            size(arg, v[1])?,
            size(arg, v[2])?,
            size(arg, v[3])?,
        ])
    };
    let geometry = Conv2dGeometry {
        c_in,
        h: size("h", c.h)?,
        w: size("w", c.w)?,
        kernel: [kh, kw],
        stride: pair("stride", c.stride)?,
        padding: pair("padding", c.padding)?,
        dilation: pair("dilation", c.dilation)?,
    };
    let batch = size("batch", c.batch)?;
    let input = Patches::new(geometry, batch, TensorLayout::Nchw)
        .with_strides(quad("input_strides", c.input_strides)?);
    let [ho, wo] = geometry.output()?;
    let grad = Patches::positions(c_out, ho, wo, batch, TensorLayout::Nchw)
        .with_strides(quad("grad_strides", c.grad_strides)?);
    Ok((input, grad))
}

/// Hands over conv layer `layer`'s statistics from its raw tensors, without patch matrices
/// (implicit im2col): `input` is the layer's input `[batch, c_in, h, w]` and `out_grad`
/// the gradient of its summed loss with respect to its output `[batch, c_out, ho, wo]`,
/// each read through the strides in `*tensors` (any layout: NCHW, channels last, a strided
/// view); host memory, or device memory for an optimizer made on a CUDA context (then
/// queued on its stream, read in place). `*observation` (host memory, may be null): as for
/// `thor_v1_optimizer_observe`. The factors see `batch * ho * wo` rows, normalised as
/// `thor_v1_optimizer_set_conv_norm` says (per position by default).
///
/// Returns `OK` (non-finite input too: the decision is then 4, skipped); `INVALID_ARGUMENT`
/// (a required pointer null or misaligned, `observation` overlapping the inputs, an unknown
/// or non-conv `layer`, a field of `*tensors` out of range or a kernel larger than the
/// padded input: the message names `tensors` and the field); `OUT_OF_MEMORY`. On failure no state
/// changes and `*observation` is not written, except after `DRIVER` on a CUDA optimizer.
///
/// # Safety
/// Every non-null pointer must address the elements the description above gives (host
/// memory on a CPU context, device memory on a CUDA context), valid for the call and, on a
/// CUDA context, until the queued work completes; handles must come from this library.
#[no_mangle]
pub unsafe extern "C" fn thor_v1_optimizer_observe_conv(
    opt: *mut ThorOptimizer,
    layer: i32,
    input: *const f32,
    out_grad: *const f32,
    tensors: *const ThorConvTensors,
    observation: *mut i32,
) -> ThorStatus {
    guard(|| {
        // SAFETY: the pointer contract of this function (module docs); checked for null and alignment first.
        let t = unsafe { opt_mut(opt)? };
        check_ptr("tensors", tensors)?;
        let step = ThorLayerStep {
            layer,
            acts: input,
            out_grads: out_grad,
            rows: 0,
            conv: tensors,
        };
        // SAFETY: `opt` was checked above; the pointer contract of this function.
        unsafe { observe_one(opt, t, step, observation)? };
        Ok(())
    })
}
