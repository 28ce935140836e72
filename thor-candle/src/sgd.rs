//! Momentum SGD, PyTorch's update: the first-order baseline, and the update that
//! [`ThorOptimizer`](crate::ThorOptimizer) applies to every variable.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use crate::error::{Error, Result};

/// The settings of [`MomentumSgd`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ParamsMomentumSgd {
    /// Learning rate (finite, >= 0).
    pub lr: f64,
    /// Momentum in [0, 1).
    pub momentum: f64,
    /// L2 weight decay, added to the gradient (finite, >= 0).
    pub weight_decay: f64,
}

impl ParamsMomentumSgd {
    /// Learning rate `lr`, momentum 0.9, no weight decay.
    pub fn new(lr: f64) -> Self {
        Self {
            lr,
            momentum: 0.9,
            weight_decay: 0.0,
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |arg, v: f64, what: &str| {
            Err(Error::Invalid {
                arg,
                reason: format!("must be {what}, got {v}"),
            })
        };
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad("lr", self.lr, "finite and >= 0");
        }
        if !(self.momentum >= 0.0 && self.momentum < 1.0) {
            return bad("momentum", self.momentum, "in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay", self.weight_decay, "finite and >= 0");
        }
        Ok(())
    }
}

/// SGD with momentum and weight decay, as `torch.optim.SGD`: `d = g + wd * w`,
/// `buf = momentum * buf + d` (`buf = d` at the first step), `w -= lr * buf`. candle-nn's
/// `SGD` has no momentum; this one does, and implements [`candle_nn::Optimizer`].
#[derive(Debug)]
pub struct MomentumSgd {
    vars: Vec<Var>,
    buffers: Vec<Option<Tensor>>,
    params: ParamsMomentumSgd,
}

impl MomentumSgd {
    /// The optimizer over `vars` (any float dtype, any device).
    pub fn with_params(vars: Vec<Var>, params: ParamsMomentumSgd) -> Result<Self> {
        params.validate()?;
        let buffers = vec![None; vars.len()];
        Ok(Self {
            vars,
            buffers,
            params,
        })
    }

    /// The settings.
    pub fn params(&self) -> ParamsMomentumSgd {
        self.params
    }

    /// Replaces the settings (checked; on an error nothing changes).
    pub fn set_params(&mut self, params: ParamsMomentumSgd) -> Result<()> {
        params.validate()?;
        self.params = params;
        Ok(())
    }

    /// The variables, in the order the optimizer was given them.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The momentum buffer of variable `i` (none before its first update).
    pub fn buffer(&self, i: usize) -> Option<&Tensor> {
        self.buffers.get(i).and_then(|b| b.as_ref())
    }

    pub(crate) fn set_buffer(&mut self, i: usize, buf: Option<Tensor>) {
        self.buffers[i] = buf;
    }

    /// `d = g + wd * w` for variable `i`.
    pub(crate) fn decayed(&self, i: usize, g: &Tensor) -> candle_core::Result<Tensor> {
        if self.params.weight_decay == 0.0 {
            Ok(g.clone())
        } else {
            g.add(&(self.vars[i].as_tensor() * self.params.weight_decay)?)
        }
    }

    /// The momentum update of variable `i` with direction `d` (weight decay included), not
    /// yet applied: its new momentum buffer and value. Nothing changes.
    pub(crate) fn plan(&self, i: usize, d: Tensor) -> candle_core::Result<Planned> {
        let p = self.params;
        let (buf, dir) = if p.momentum == 0.0 {
            (None, d)
        } else {
            let buf = match &self.buffers[i] {
                None => d,
                Some(buf) => ((buf * p.momentum)? + d)?,
            };
            (Some(buf.clone()), buf)
        };
        let var = &self.vars[i];
        let value = var.as_tensor().sub(&(dir * p.lr)?)?;
        Ok(Planned { i, buf, value })
    }

    /// Applies planned updates: the values (same shapes as the variables, so `Var::set`
    /// cannot fail on them) and the buffers.
    pub(crate) fn commit(&mut self, planned: Vec<Planned>) -> candle_core::Result<()> {
        for p in planned {
            self.vars[p.i].set(&p.value)?;
            if p.buf.is_some() {
                self.buffers[p.i] = p.buf;
            }
        }
        Ok(())
    }

    /// One step from `grads` (variables without a gradient are left alone). Every new value
    /// is computed before any variable changes.
    pub fn step_grads(&mut self, grads: &GradStore) -> Result<()> {
        // The `candle_nn::Optimizer` setter cannot refuse a bad learning rate: checked here.
        self.params.validate()?;
        let mut planned = Vec::new();
        for i in 0..self.vars.len() {
            if let Some(g) = grads.get(self.vars[i].as_tensor()) {
                planned.push(self.plan(i, self.decayed(i, g)?)?);
            }
        }
        self.commit(planned)?;
        Ok(())
    }
}

/// A variable's computed update ([`MomentumSgd::plan`]).
pub(crate) struct Planned {
    i: usize,
    buf: Option<Tensor>,
    value: Tensor,
}

impl candle_nn::Optimizer for MomentumSgd {
    type Config = ParamsMomentumSgd;

    fn new(vars: Vec<Var>, config: Self::Config) -> candle_core::Result<Self> {
        Self::with_params(vars, config).map_err(candle_core::Error::wrap)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        self.step_grads(grads).map_err(candle_core::Error::wrap)
    }

    fn learning_rate(&self) -> f64 {
        self.params.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.params.lr = lr;
    }
}
