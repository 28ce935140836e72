//! [`ThorOptimizer`]: THOR's factor step and preconditioner over candle variables.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use thor_kernels::thor::{Decision, LayerCounters, LayerId, LayerKind, Thor, ThorConfig};
use thor_kernels::{Conv2dGeometry, Patches, TensorLayout};

use crate::bridge;
use crate::error::{Error, Result};
use crate::layers::{LayerInfo, Record, ThorLayerId, ThorLayers};
use crate::sgd::{MomentumSgd, ParamsMomentumSgd};

/// Format version of [`ThorOptimizer::save`]'s files.
const STATE_VERSION: u32 = 1;

/// What the training loss averages over: the recorded output gradients are scaled by that
/// count to give the gradients of the summed loss, which THOR's factor G is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LossMean {
    /// A mean over the batch, dim 0 of each layer's input (candle-nn's losses on
    /// `[batch, classes]` outputs, a per-sample loss summed over pixels then averaged).
    #[default]
    Batch,
    /// A mean over every row a layer sees: all leading dims of a linear layer's input (the
    /// `B * T` tokens of `[B, T, features]` under a per-token mean), the `N * ho * wo`
    /// positions of a conv layer's output.
    Rows,
    /// A sum: the output gradients are taken as they are.
    Sum,
}

/// The settings of [`ThorOptimizer`]: the momentum-SGD update and THOR's engine.
#[derive(Debug, Clone, PartialEq)]
pub struct ThorParams {
    /// Learning rate, momentum and weight decay of the update (every variable; the THOR
    /// layers' weight decay is added to their gradient before it is preconditioned).
    pub sgd: ParamsMomentumSgd,
    /// THOR's block size, damping and interval schedules, trace-rule thresholds, KL clip
    /// and factor normalisation. `backend` is not read: THOR runs where the variables are.
    pub thor: ThorConfig,
    /// What the loss averages over ([`LossMean::Batch`] by default).
    pub loss_mean: LossMean,
}

impl ThorParams {
    /// Learning rate `lr`, momentum 0.9, no weight decay, [`ThorConfig::thor`].
    pub fn new(lr: f64) -> Self {
        Self {
            sgd: ParamsMomentumSgd::new(lr),
            thor: ThorConfig::thor(),
            loss_mean: LossMean::Batch,
        }
    }
}

/// A THOR layer as the optimizer knows it.
#[derive(Debug)]
struct Known {
    info: LayerInfo,
    id: LayerId,
    weight: usize,
    bias: Option<usize>,
}

/// THOR over a candle `VarMap`: on statistics steps, the recorded statistics of every
/// [`ThorLayers`] layer go to the engine (factor update, trace rule, inversion); at every
/// step each layer's gradient (weight decay included, bias as the last column) is
/// preconditioned, `G^-1 grad A^-1`, scaled by K-FAC's KL clip when one is set, and goes
/// through the momentum-SGD update; every other variable gets that update with its plain
/// gradient.
///
/// The checks at the start of a step leave the variables, the momentum buffers and the
/// engine as they were when they fail: a non-finite gradient, a layer the optimizer does not
/// know (made after it), a gradient on another device, invalid settings. A failure past them
/// (the device out of memory, say) can leave the step partly applied.
///
/// The output gradients are scaled to the summed loss's as [`ThorParams::loss_mean`] says:
/// by default by dim 0 of each layer's input (a loss averaged over the batch). A loss
/// averaged over the `B * T` tokens of `[B, T, features]` inputs needs [`LossMean::Rows`]
/// (with the default, G would come out `T^2` times too small against the damping).
#[derive(Debug)]
pub struct ThorOptimizer {
    thor: Thor,
    layers: ThorLayers,
    known: Vec<Known>,
    sgd: MomentumSgd,
    names: Vec<String>,
    device: Device,
    loss_mean: LossMean,
    last_kl_clip_factor: f32,
    preconditioner_time: Duration,
}

impl ThorOptimizer {
    /// The optimizer over every variable of `varmap`, with the THOR layers of `layers`
    /// (their weights and biases must be variables of `varmap`; every variable on one
    /// device, f32 for the THOR layers). One optimizer drives a [`ThorLayers`] at a time
    /// (dropping it frees the layers for another).
    pub fn new(varmap: &VarMap, layers: &ThorLayers, params: ThorParams) -> Result<Self> {
        params.sgd.validate()?;
        let mut vars: Vec<(String, Var)> = varmap
            .data()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let device = match vars.first() {
            Some((_, v)) => v.device().clone(),
            None => {
                return Err(Error::Invalid {
                    arg: "varmap",
                    reason: "has no variables: make the model first".into(),
                })
            }
        };
        for (name, v) in &vars {
            if !v.device().same_device(&device) {
                return Err(Error::Device {
                    var: name.clone(),
                    reason: format!(
                        "on {:?}, the other variables on {:?}",
                        v.device().location(),
                        device.location()
                    ),
                });
            }
        }
        let mut thor = bridge::engine(&device, params.thor)?;
        let mut reg = layers.lock();
        if reg.owned {
            return Err(Error::Invalid {
                arg: "layers",
                reason: "another ThorOptimizer drives these layers: drop it first".into(),
            });
        }
        let find = |t: &Tensor| vars.iter().position(|(_, v)| v.as_tensor().id() == t.id());
        let mut known = Vec::with_capacity(reg.layers.len());
        for info in &reg.layers {
            let missing = |what: &str| Error::UnknownLayer {
                layer: info.name.clone(),
                reason: format!("its {what} is not a variable of the optimizer's VarMap"),
            };
            let weight = find(&info.weight).ok_or_else(|| missing("weight"))?;
            let bias = match &info.bias {
                Some(b) => Some(find(b).ok_or_else(|| missing("bias"))?),
                None => None,
            };
            for i in std::iter::once(weight).chain(bias) {
                if vars[i].1.dtype() != DType::F32 {
                    return Err(Error::Device {
                        var: vars[i].0.clone(),
                        reason: format!(
                            "THOR layers need f32 variables, this one is {:?}",
                            vars[i].1.dtype()
                        ),
                    });
                }
            }
            let tied = known.iter().find(|k: &&Known| {
                std::iter::once(k.weight)
                    .chain(k.bias)
                    .any(|i| i == weight || Some(i) == bias)
            });
            if let Some(other) = tied {
                return Err(Error::UnknownLayer {
                    layer: info.name.clone(),
                    reason: format!(
                        "shares a variable with THOR layer `{}` (tied weights are not supported)",
                        other.info.name
                    ),
                });
            }
            let id = thor.add_layer(info.kind)?;
            known.push(Known {
                info: info.clone(),
                id,
                weight,
                bias,
            });
        }
        let (names, vars): (Vec<String>, Vec<Var>) = vars.into_iter().unzip();
        let sgd = MomentumSgd::with_params(vars, params.sgd)?;
        reg.owned = true;
        reg.recording = thor.needs_statistics();
        reg.records.clear();
        drop(reg);
        Ok(Self {
            thor,
            layers: layers.clone(),
            known,
            sgd,
            names,
            device,
            loss_mean: params.loss_mean,
            last_kl_clip_factor: 1.0,
            preconditioner_time: Duration::ZERO,
        })
    }

    /// The engine: schedules, counters, decisions ([`Thor::counters`], [`Thor::damping`],
    /// [`Thor::step`], ...).
    pub fn thor(&self) -> &Thor {
        &self.thor
    }

    /// The momentum-SGD settings.
    pub fn params(&self) -> ParamsMomentumSgd {
        self.sgd.params()
    }

    /// Replaces the momentum-SGD settings (checked; on an error nothing changes).
    pub fn set_params(&mut self, params: ParamsMomentumSgd) -> Result<()> {
        self.sgd.set_params(params)
    }

    /// The learning rate.
    pub fn learning_rate(&self) -> f64 {
        self.sgd.params().lr
    }

    /// Sets the learning rate (finite, >= 0; on an error nothing changes).
    pub fn set_learning_rate(&mut self, lr: f64) -> Result<()> {
        self.sgd.set_params(ParamsMomentumSgd {
            lr,
            ..self.sgd.params()
        })
    }

    /// Sets the training position (fractional epochs) that the damping and interval
    /// schedules read.
    pub fn set_epoch(&mut self, epoch: f64) {
        self.thor.set_epoch(epoch);
    }

    /// The variables' names, in the optimizer's order (sorted).
    pub fn var_names(&self) -> &[String] {
        &self.names
    }

    /// The counters of THOR layer `id`.
    pub fn counters(&self, id: ThorLayerId) -> Result<LayerCounters> {
        Ok(self.thor.counters(self.known(id)?.id)?)
    }

    /// The trace rule's last decision for THOR layer `id`.
    pub fn last_decision(&self, id: ThorLayerId) -> Result<Decision> {
        Ok(self.thor.last_decision(self.known(id)?.id)?)
    }

    /// The KL clip factor of the last step (1 without a clip).
    pub fn last_kl_clip_factor(&self) -> f32 {
        self.last_kl_clip_factor
    }

    /// Time spent in THOR's statistics and preconditioning so far (host time: on CUDA the
    /// work is queued and this measures the queueing unless the caller synchronises).
    pub fn preconditioner_time(&self) -> Duration {
        self.preconditioner_time
    }

    fn known(&self, id: ThorLayerId) -> Result<&Known> {
        self.known.get(id.0).ok_or_else(|| Error::UnknownLayer {
            layer: self.layers.name(id).unwrap_or_else(|| format!("#{}", id.0)),
            reason: "made after the optimizer: make the optimizer after the model".into(),
        })
    }

    /// `loss.backward()` and [`ThorOptimizer::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = match loss.backward() {
            Ok(g) => g,
            Err(e) => {
                self.layers.lock().records.clear();
                return Err(e.into());
            }
        };
        self.step(&grads)
    }

    /// The preconditioned gradient of THOR layer `id` for `grad` `[d_g, d_a]` (the weight
    /// gradient flattened to `[outputs, inputs]`, the bias gradient as the last column),
    /// with the layer's current inverses: what a step applies before the KL clip.
    pub fn precondition(&mut self, id: ThorLayerId, grad: &Tensor) -> Result<Tensor> {
        let layer = self.known(id)?.id;
        bridge::precondition(&mut self.thor, layer, grad)
    }

    /// One step from the gradients of `loss.backward()`: statistics (on statistics steps),
    /// preconditioning, the update. The recorded statistics are used or dropped either way.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let records = std::mem::take(&mut self.layers.lock().records);
        self.check(grads)?;
        let t0 = Instant::now();
        if self.thor.needs_statistics() {
            self.observe(grads, records)?;
        }
        let updates = self.preconditioned(grads)?;
        self.preconditioner_time += t0.elapsed();
        // Every new value first, then the variables: a failure leaves them as they were.
        let mut planned = Vec::new();
        for i in 0..self.sgd.vars().len() {
            let d = match updates.get(&i) {
                Some(d) => d.clone(),
                None => match grads.get(self.sgd.vars()[i].as_tensor()) {
                    Some(g) => self.sgd.decayed(i, g)?,
                    None => continue,
                },
            };
            planned.push(self.sgd.plan(i, d)?);
        }
        self.sgd.commit(planned)?;
        self.thor.finish_step();
        self.layers.lock().recording = self.thor.needs_statistics();
        Ok(())
    }

    /// Before anything changes: every layer known, settings valid, every gradient finite and
    /// on the optimizer's device.
    fn check(&self, grads: &GradStore) -> Result<()> {
        let n = self.layers.len();
        if n > self.known.len() {
            return Err(self.known(ThorLayerId(self.known.len())).unwrap_err());
        }
        self.sgd.params().validate()?;
        let mut sums = Vec::new();
        let mut which = Vec::new();
        for (i, v) in self.sgd.vars().iter().enumerate() {
            if let Some(g) = grads.get(v.as_tensor()) {
                if !g.device().same_device(&self.device) || g.dims() != v.dims() {
                    return Err(Error::Device {
                        var: self.names[i].clone(),
                        reason: format!(
                            "gradient of shape {:?} on {:?}, the variable {:?} on {:?}",
                            g.dims(),
                            g.device().location(),
                            v.dims(),
                            self.device.location()
                        ),
                    });
                }
                // NaN and infinities survive a sum; one transfer for all variables.
                sums.push(g.to_dtype(DType::F64)?.sum_all()?);
                which.push(i);
            }
        }
        if sums.is_empty() {
            return Ok(());
        }
        let sums = Tensor::stack(&sums, 0)?.to_vec1::<f64>()?;
        for (k, _) in sums.iter().enumerate().filter(|(_, s)| !s.is_finite()) {
            // A sum can overflow with every element finite: look at the elements.
            let g = grads.get(self.sgd.vars()[which[k]].as_tensor()).unwrap();
            let host = g.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
            if host.iter().any(|x| !x.is_finite()) {
                return Err(Error::NonFinite {
                    var: self.names[which[k]].clone(),
                });
            }
        }
        Ok(())
    }

    /// Hands each layer's recorded statistics (the passes whose output got a gradient) to
    /// the engine.
    fn observe(&mut self, grads: &GradStore, records: Vec<Record>) -> Result<()> {
        let mut by_layer: Vec<Vec<(Tensor, Tensor)>> = vec![Vec::new(); self.known.len()];
        for r in records {
            if let Some(g) = grads.get(r.probe.as_tensor()) {
                // The gradient of the summed loss: the mean's times the count.
                let count = match self.loss_mean {
                    LossMean::Batch => r.input.dims().first().copied().unwrap_or(1),
                    LossMean::Rows => g.elem_count() / self.known[r.layer].info.kind.d_g(),
                    LossMean::Sum => 1,
                };
                by_layer[r.layer].push((r.input, (g * count as f64)?));
            }
        }
        for (k, passes) in by_layer.into_iter().enumerate() {
            if passes.is_empty() {
                continue;
            }
            let l = &self.known[k];
            match l.info.kind {
                LayerKind::Linear {
                    inputs, outputs, ..
                } => {
                    let mut acts = Vec::with_capacity(passes.len());
                    let mut outs = Vec::with_capacity(passes.len());
                    for (x, g) in &passes {
                        acts.push(x.reshape(((), inputs))?);
                        outs.push(g.reshape(((), outputs))?);
                    }
                    let (a, g) = (Tensor::cat(&acts, 0)?, Tensor::cat(&outs, 0)?);
                    bridge::observe_matrix(&mut self.thor, l.id, &a, &g)?;
                }
                LayerKind::Conv2d {
                    c_in,
                    c_out,
                    kh,
                    kw,
                    ..
                } => {
                    let spec = l.info.conv.expect("conv layers carry their geometry");
                    // Passes over inputs of one size are one batch; the engine takes one
                    // statistics call per layer and step.
                    let first = passes[0].0.dims().to_vec();
                    if passes.iter().any(|(x, _)| x.dims()[1..] != first[1..]) {
                        return Err(Error::Invalid {
                            arg: "input",
                            reason: format!(
                                "conv layer `{}` was called on inputs of different sizes in one \
                                 statistics step",
                                l.info.name
                            ),
                        });
                    }
                    let xs: Vec<Tensor> = passes.iter().map(|p| p.0.clone()).collect();
                    let gs: Vec<Tensor> = passes.iter().map(|p| p.1.clone()).collect();
                    let (x, g) = (Tensor::cat(&xs, 0)?, Tensor::cat(&gs, 0)?);
                    let (n, _, h, w) = x.dims4()?;
                    let (_, _, ho, wo) = g.dims4()?;
                    let geometry = Conv2dGeometry::new(c_in, h, w, [kh, kw])
                        .with_stride([spec.stride; 2])
                        .with_padding([spec.padding; 2])
                        .with_dilation([spec.dilation; 2]);
                    let a_view = Patches::new(geometry, n, TensorLayout::Nchw);
                    let g_view = Patches::positions(c_out, ho, wo, n, TensorLayout::Nchw);
                    bridge::observe_conv(&mut self.thor, l.id, &x, a_view, &g, g_view)?;
                }
            }
        }
        Ok(())
    }

    /// The THOR layers' updates (preconditioned, KL-clipped), by variable index.
    fn preconditioned(&mut self, grads: &GradStore) -> Result<HashMap<usize, Tensor>> {
        let mut done = Vec::new();
        for l in &self.known {
            let w = self.sgd.vars()[l.weight].as_tensor();
            let Some(gw) = grads.get(w) else { continue };
            let d_g = l.info.kind.d_g();
            let mut full = self.sgd.decayed(l.weight, gw)?.reshape((d_g, ()))?;
            // A bias without a gradient (frozen) is a zero column, and is not updated.
            let mut bias = None;
            if let Some(bi) = l.bias {
                let b = self.sgd.vars()[bi].as_tensor();
                let gb = match grads.get(b) {
                    Some(gb) => {
                        bias = Some(bi);
                        self.sgd.decayed(bi, gb)?
                    }
                    None => b.zeros_like()?,
                };
                full = Tensor::cat(&[full, gb.reshape((d_g, 1))?], 1)?;
            }
            let u = bridge::precondition(&mut self.thor, l.id, &full)?;
            done.push((l.weight, bias, full, u));
        }
        let factor = if self.thor.config().kl_clip.is_some() && !done.is_empty() {
            let dots: Vec<Tensor> = done
                .iter()
                .map(|(_, _, g, u)| g.mul(u)?.sum_all()?.to_dtype(DType::F64))
                .collect::<candle_core::Result<_>>()?;
            let dot: f64 = Tensor::stack(&dots, 0)?.to_vec1::<f64>()?.iter().sum();
            self.thor
                .kl_clip_factor_from_dot(self.sgd.params().lr as f32, dot)
        } else {
            1.0
        };
        let mut out = HashMap::new();
        for (wi, bi, _, u) in done {
            let u = if factor != 1.0 {
                (u * factor as f64)?
            } else {
                u
            };
            let w = self.sgd.vars()[wi].as_tensor();
            let n_w = w.elem_count() / w.dims()[0];
            out.insert(wi, u.narrow(1, 0, n_w)?.reshape(w.shape())?);
            if let Some(bi) = bi {
                out.insert(bi, u.narrow(1, n_w, 1)?.flatten_all()?);
            }
        }
        self.last_kl_clip_factor = factor;
        Ok(out)
    }

    /// Saves the optimizer's state (the engine's, the momentum buffers, the settings) as a
    /// safetensors file; the variables themselves are the `VarMap`'s to save.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let mut map: HashMap<String, Tensor> = HashMap::new();
        let bytes = self.thor.to_bytes()?;
        let n = bytes.len();
        map.insert(
            "thor.engine".into(),
            Tensor::from_vec(bytes, n, &Device::Cpu)?,
        );
        map.insert(
            "thor.version".into(),
            Tensor::new(&[STATE_VERSION], &Device::Cpu)?,
        );
        let p = self.sgd.params();
        map.insert(
            "sgd.params".into(),
            Tensor::new(&[p.lr, p.momentum, p.weight_decay], &Device::Cpu)?,
        );
        for (i, name) in self.names.iter().enumerate() {
            if let Some(b) = self.sgd.buffer(i) {
                map.insert(format!("momentum.{name}"), b.clone());
            }
        }
        candle_core::safetensors::save(&map, path)?;
        Ok(())
    }

    /// Loads a state written by [`ThorOptimizer::save`] for the same model (variable names
    /// and shapes, THOR layers, block size). The THOR configuration is not part of the
    /// state (as for [`Thor::load_bytes`]): make the optimizer with the one it was saved
    /// with. On any error nothing changes.
    pub fn load(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let map = candle_core::safetensors::load(path, &self.device)?;
        let get = |k: &str| {
            map.get(k).ok_or_else(|| {
                Error::State(format!("`{k}` is missing (not a THOR optimizer state)"))
            })
        };
        let version = get("thor.version")?.to_vec1::<u32>()?;
        if version != [STATE_VERSION] {
            return Err(Error::State(format!(
                "format version {version:?}; this build reads version {STATE_VERSION}"
            )));
        }
        let p = get("sgd.params")?.to_vec1::<f64>()?;
        let [lr, momentum, weight_decay] = p[..] else {
            return Err(Error::State(format!(
                "`sgd.params` has {} values, not 3",
                p.len()
            )));
        };
        let params = ParamsMomentumSgd {
            lr,
            momentum,
            weight_decay,
        };
        params
            .validate()
            .map_err(|e| Error::State(format!("`sgd.params`: {e}")))?;
        let mut buffers = vec![None; self.names.len()];
        for (k, t) in &map {
            let Some(name) = k.strip_prefix("momentum.") else {
                if !matches!(k.as_str(), "thor.engine" | "thor.version" | "sgd.params") {
                    return Err(Error::State(format!("unknown entry `{k}`")));
                }
                continue;
            };
            let i = self.names.iter().position(|n| n == name).ok_or_else(|| {
                Error::State(format!("momentum of `{name}`, not a variable here"))
            })?;
            let v = &self.sgd.vars()[i];
            if t.dims() != v.dims() || t.dtype() != v.dtype() {
                return Err(Error::State(format!(
                    "momentum of `{name}` is {:?} {:?}, the variable {:?} {:?}",
                    t.dtype(),
                    t.dims(),
                    v.dtype(),
                    v.dims()
                )));
            }
            buffers[i] = Some(t.clone());
        }
        let bytes = get("thor.engine")?.to_vec1::<u8>()?;
        self.thor
            .load_bytes(&bytes)
            .map_err(|e| Error::State(format!("THOR engine: {e}")))?;
        // Nothing below fails.
        self.sgd.set_params(params)?;
        for (i, b) in buffers.into_iter().enumerate() {
            self.sgd.set_buffer(i, b);
        }
        let mut reg = self.layers.lock();
        reg.recording = self.thor.needs_statistics();
        reg.records.clear();
        Ok(())
    }
}

impl Drop for ThorOptimizer {
    /// Frees the layers for another optimizer; they stop recording.
    fn drop(&mut self) {
        let mut reg = self.layers.lock();
        reg.owned = false;
        reg.recording = false;
        reg.records.clear();
    }
}
