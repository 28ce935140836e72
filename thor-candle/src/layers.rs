//! THOR's layers: candle-nn's `Linear` and `Conv2d` that record their inputs and output
//! gradients on statistics steps, and the registry that ties them to the optimizer.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{Tensor, Var};
use candle_nn::{Conv2dConfig, Module, VarBuilder};
use thor_kernels::thor::LayerKind;

use crate::error::{Error, Result};

/// The index of a THOR layer in its [`ThorLayers`] (and in its optimizer), in the order the
/// layers were made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ThorLayerId(pub usize);

/// The strides, padding and dilation of a THOR conv layer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConvSpec {
    pub stride: usize,
    pub padding: usize,
    pub dilation: usize,
}

/// What the optimizer needs to know of a layer.
#[derive(Debug, Clone)]
pub(crate) struct LayerInfo {
    pub name: String,
    pub kind: LayerKind,
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub conv: Option<ConvSpec>,
}

/// One forward pass of a layer on a statistics step: its input and the zero variable added
/// to its output, whose gradient is the output's.
#[derive(Debug)]
pub(crate) struct Record {
    pub layer: usize,
    pub input: Tensor,
    pub probe: Var,
}

#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub layers: Vec<LayerInfo>,
    /// Whether forward passes record (set by the optimizer: a statistics step is next).
    pub recording: bool,
    pub records: Vec<Record>,
    /// Whether an optimizer drives these layers.
    pub owned: bool,
    /// Whether forward passes are training passes ([`ThorLayers::set_training`]).
    pub evaluating: bool,
}

/// The THOR layers of a model: every [`ThorLinear`] and [`ThorConv2d`] is made with one,
/// and the [`ThorOptimizer`](crate::ThorOptimizer) made from it preconditions them. A cheap
/// handle (clones share the same layers); one optimizer at a time drives it.
#[derive(Debug, Clone, Default)]
pub struct ThorLayers {
    inner: Arc<Mutex<Registry>>,
}

impl ThorLayers {
    /// An empty set of layers. They record only while a
    /// [`ThorOptimizer`](crate::ThorOptimizer) drives them (from its making: its first step
    /// is a statistics step); without one they are exactly candle-nn's.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of layers made with this handle.
    pub fn len(&self) -> usize {
        self.lock().layers.len()
    }

    /// Whether no layer was made with this handle.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The name (`VarBuilder` prefix) of layer `id`, if there is one.
    pub fn name(&self, id: ThorLayerId) -> Option<String> {
        self.lock().layers.get(id.0).map(|l| l.name.clone())
    }

    /// Whether the next forward passes record statistics: training passes before a
    /// statistics step.
    pub fn is_recording(&self) -> bool {
        let reg = self.lock();
        reg.recording && !reg.evaluating
    }

    /// Training (the default) or evaluation passes: in evaluation the layers are exactly
    /// candle-nn's and record nothing, as PyTorch's `model.eval()`. (Passes that record but
    /// never reach a loss cost memory until the next step, and are dropped there.)
    pub fn set_training(&self, training: bool) {
        self.lock().evaluating = !training;
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Registry> {
        // A panic while the lock was held cannot leave the registry half-updated: every
        // mutation is a single push, clear or assignment.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn register(&self, info: LayerInfo) -> ThorLayerId {
        let mut reg = self.lock();
        reg.layers.push(info);
        ThorLayerId(reg.layers.len() - 1)
    }

    /// `y`, or `y` plus a recorded zero variable on a statistics step.
    fn record(&self, layer: usize, x: &Tensor, y: Tensor) -> candle_core::Result<Tensor> {
        if !self.is_recording() {
            return Ok(y);
        }
        let probe = Var::zeros(y.shape(), y.dtype(), y.device())?;
        let out = y.add(probe.as_tensor())?;
        self.lock().records.push(Record {
            layer,
            input: x.detach(),
            probe,
        });
        Ok(out)
    }
}

/// A candle-nn layer preconditioned by THOR: the same forward pass (and the same output),
/// plus the statistics THOR needs on statistics steps. Made as [`ThorLinear`] or
/// [`ThorConv2d`].
#[derive(Debug, Clone)]
pub struct ThorLayer<M> {
    inner: M,
    layers: ThorLayers,
    id: ThorLayerId,
}

/// candle-nn's [`candle_nn::Linear`] preconditioned by THOR.
pub type ThorLinear = ThorLayer<candle_nn::Linear>;

/// candle-nn's [`candle_nn::Conv2d`] preconditioned by THOR (groups = 1); its statistics are
/// read from the NCHW input and output gradient without a patch matrix.
pub type ThorConv2d = ThorLayer<candle_nn::Conv2d>;

impl<M> ThorLayer<M> {
    /// The layer's index in its [`ThorLayers`].
    pub fn id(&self) -> ThorLayerId {
        self.id
    }

    /// The wrapped candle-nn layer.
    pub fn inner(&self) -> &M {
        &self.inner
    }

    fn registered(inner: M, info: LayerInfo, layers: &ThorLayers) -> Self {
        let id = layers.register(info);
        Self {
            inner,
            layers: layers.clone(),
            id,
        }
    }
}

impl<M: Module> Module for ThorLayer<M> {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let y = self.inner.forward(x)?;
        self.layers.record(self.id.0, x, y)
    }
}

impl ThorLayer<candle_nn::Linear> {
    /// Wraps a linear layer (weight `[outputs, inputs]`, optional bias `[outputs]`, f32, both
    /// variables of the `VarMap` the optimizer is made from) as THOR layer `name`.
    pub fn new(inner: candle_nn::Linear, name: &str, layers: &ThorLayers) -> Result<Self> {
        let (outputs, inputs) = inner.weight().dims2()?;
        if let Some(b) = inner.bias() {
            check_bias(name, b, outputs)?;
        }
        let info = LayerInfo {
            name: name.to_string(),
            kind: LayerKind::Linear {
                inputs,
                outputs,
                bias: inner.bias().is_some(),
            },
            weight: inner.weight().clone(),
            bias: inner.bias().cloned(),
            conv: None,
        };
        Ok(Self::registered(inner, info, layers))
    }
}

impl ThorLayer<candle_nn::Conv2d> {
    /// Wraps a conv layer (weight `[c_out, c_in, kh, kw]`, optional bias `[c_out]`, f32, both
    /// variables of the optimizer's `VarMap`) as THOR layer `name`. Grouped convolutions are
    /// refused: their weight is not one Kronecker product (use candle-nn's layer, which then
    /// gets the plain momentum-SGD update).
    pub fn new(inner: candle_nn::Conv2d, name: &str, layers: &ThorLayers) -> Result<Self> {
        let cfg = *inner.config();
        if cfg.groups != 1 {
            return Err(Error::Invalid {
                arg: "groups",
                reason: format!(
                    "layer `{name}` has {} groups: THOR's conv layers need groups = 1",
                    cfg.groups
                ),
            });
        }
        let (c_out, c_in, kh, kw) = inner.weight().dims4()?;
        if let Some(b) = inner.bias() {
            check_bias(name, b, c_out)?;
        }
        let info = LayerInfo {
            name: name.to_string(),
            kind: LayerKind::Conv2d {
                c_in,
                c_out,
                kh,
                kw,
                bias: inner.bias().is_some(),
            },
            weight: inner.weight().clone(),
            bias: inner.bias().cloned(),
            conv: Some(ConvSpec {
                stride: cfg.stride,
                padding: cfg.padding,
                dilation: cfg.dilation,
            }),
        };
        Ok(Self::registered(inner, info, layers))
    }
}

fn check_bias(name: &str, b: &Tensor, outputs: usize) -> Result<()> {
    if b.dims() != [outputs] {
        return Err(Error::Invalid {
            arg: "bias",
            reason: format!(
                "layer `{name}`: bias of shape {:?}, the layer has {outputs} outputs",
                b.dims()
            ),
        });
    }
    Ok(())
}

/// [`candle_nn::linear`](fn@candle_nn::linear) as a THOR layer named after `vb`'s prefix.
pub fn linear(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    layers: &ThorLayers,
) -> Result<ThorLinear> {
    let name = vb.prefix();
    ThorLinear::new(candle_nn::linear(in_dim, out_dim, vb)?, &name, layers)
}

/// [`candle_nn::linear_no_bias`](fn@candle_nn::linear_no_bias) as a THOR layer named after `vb`'s prefix.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
    layers: &ThorLayers,
) -> Result<ThorLinear> {
    let name = vb.prefix();
    ThorLinear::new(
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?,
        &name,
        layers,
    )
}

/// [`candle_nn::linear_b`](fn@candle_nn::linear_b) as a THOR layer named after `vb`'s prefix.
pub fn linear_b(
    in_dim: usize,
    out_dim: usize,
    bias: bool,
    vb: VarBuilder,
    layers: &ThorLayers,
) -> Result<ThorLinear> {
    let name = vb.prefix();
    ThorLinear::new(
        candle_nn::linear_b(in_dim, out_dim, bias, vb)?,
        &name,
        layers,
    )
}

/// [`candle_nn::conv2d`](fn@candle_nn::conv2d) as a THOR layer named after `vb`'s prefix.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
    layers: &ThorLayers,
) -> Result<ThorConv2d> {
    let name = vb.prefix();
    let inner = candle_nn::conv2d(in_channels, out_channels, kernel_size, cfg, vb)?;
    ThorConv2d::new(inner, &name, layers)
}

/// [`candle_nn::conv2d_no_bias`](fn@candle_nn::conv2d_no_bias) as a THOR layer named after `vb`'s prefix.
pub fn conv2d_no_bias(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: Conv2dConfig,
    vb: VarBuilder,
    layers: &ThorLayers,
) -> Result<ThorConv2d> {
    let name = vb.prefix();
    let inner = candle_nn::conv2d_no_bias(in_channels, out_channels, kernel_size, cfg, vb)?;
    ThorConv2d::new(inner, &name, layers)
}
