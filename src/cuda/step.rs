//! THOR's factor step on the device as one pipeline: accumulate every factor (with traces
//! and a per-factor non-finite status), the trace rule (update / reuse / freeze / skip per
//! layer, and the block mask), and the masked damped inversion, in a fixed number of
//! launches on one stream ([`DeviceThorStep::LAUNCHES`], however many layers), with no host
//! synchronization inside; capturable as a CUDA graph and replayed as one.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, DevicePtr, DevicePtrMut};

use super::accumulate::{
    AccumulateMode, DeviceAccumulate, DeviceElement, DeviceInput, FactorInput,
};
use super::raw::{self, InvertArgs, LaunchPlan};
use super::rule::{DeviceTraceRule, RuleLayer};
use super::CudaDevice;
use crate::dtype::DType;
use crate::error::{check_len, Error, Result};
use crate::invert::FailurePolicy;
use crate::layout::FactorSet;

/// Settings of a device factor step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    /// Math of the accumulation.
    pub mode: AccumulateMode,
    /// Statistics decay: 0 replaces the statistics each step, else EMA with this weight on
    /// the old ones (the new product weighted `1 - decay`).
    pub decay: f32,
    /// Trace-rule update threshold.
    pub w1: f64,
    /// Trace-rule freeze threshold.
    pub w2: f64,
    /// What the inversion does with a block that is not positive definite.
    pub policy: FailurePolicy,
    /// Statistics steps of decisions the rule keeps for the host.
    pub history: usize,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            mode: AccumulateMode::F32,
            decay: 0.0,
            w1: 0.01,
            w2: 0.0,
            policy: FailurePolicy::retry(),
            history: 64,
        }
    }
}

/// The device state of THOR's factor step for a model: statistics, inverses, traces, the
/// rule's state and the tables of every launch, allocated once.
#[derive(Debug)]
pub struct DeviceThorStep {
    cfg: StepConfig,
    acc: DeviceAccumulate,
    rule: DeviceTraceRule,
    stats: CudaSlice<f32>,
    inverses: CudaSlice<f32>,
    block_traces: CudaSlice<f32>,
    factor_traces: CudaSlice<f32>,
    status: CudaSlice<i32>,
    mask: CudaSlice<u8>,
    decisions: CudaSlice<i32>,
    info: CudaSlice<i32>,
    damping_used: CudaSlice<f32>,
    bound: bool,
}

/// A captured factor step, replayed with [`ThorStepGraph::replay`].
pub struct ThorStepGraph {
    graph: CudaGraph,
}

impl std::fmt::Debug for ThorStepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ThorStepGraph")
    }
}

impl ThorStepGraph {
    /// Queues the captured step (same inputs, same damping) on the stream it was captured on.
    pub fn replay(&self) -> Result<()> {
        Ok(self.graph.launch()?)
    }
}

impl CudaDevice {
    /// Sets up the factor step for `layers` whose factors form `set`, factor `f` fed with
    /// `rows[f]` rows of `dtype` per step. Statistics start at the identity.
    pub fn new_thor_step(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        layers: &[RuleLayer],
        cfg: StepConfig,
    ) -> Result<DeviceThorStep> {
        if !(0.0..1.0).contains(&cfg.decay) {
            return Err(Error::invalid(
                "decay",
                format!("must be in [0, 1), got {}", cfg.decay),
            ));
        }
        cfg.policy.params()?;
        let mut acc = self.plan_accumulate(set, rows, dtype, cfg.mode)?;
        // A layer's A and G are kept or updated together.
        let mut partners = vec![None; set.len()];
        for l in layers {
            if let (Some(a), Some(g)) = (l.a_factor, l.g_factor) {
                if a < set.len() && g < set.len() {
                    partners[a] = Some(g);
                    partners[g] = Some(a);
                }
            }
        }
        acc.set_partners(&partners)?;
        let rule = self.new_trace_rule(set, layers, cfg.history.max(1))?;
        let (b, nb) = (set.block(), set.total_blocks());
        let mut eye = vec![0.0f32; set.buffer_len()];
        for k in 0..nb {
            for i in 0..b {
                eye[k * b * b + i * b + i] = 1.0;
            }
        }
        Ok(DeviceThorStep {
            cfg,
            acc,
            rule,
            stats: self.upload(&eye)?,
            inverses: self.upload(&eye)?,
            block_traces: self.zeros(nb)?,
            factor_traces: self.zeros(set.len())?,
            status: self.zeros(set.len())?,
            mask: self.zeros(nb)?,
            decisions: self.zeros(layers.len())?,
            info: self.zeros(nb)?,
            damping_used: self.zeros(nb)?,
            bound: false,
        })
    }
}

impl DeviceThorStep {
    /// Launches per factor step: accumulate (partial products, finalize, traces), trace
    /// rule, inversion.
    pub const LAUNCHES: usize = 5;

    /// The factor set.
    pub fn set(&self) -> &FactorSet {
        self.acc.plan().set()
    }

    /// Binds the step's inputs: `inputs[f]` feeds factor `f` (planned rows, stride `ld`;
    /// its alpha and beta are replaced by the step's: `1 / rows` scaled by `1 - decay`, and
    /// `decay`). The buffers must stay valid, at the same addresses, for every later
    /// [`DeviceThorStep::run`] and graph replay; write new activations into them in place.
    pub fn bind_inputs<E: DeviceElement>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[DeviceInput<'_, E>],
    ) -> Result<()> {
        let set = self.set().clone();
        check_len("inputs", set.len(), inputs.len())?;
        let rows = self.acc.plan().rows().to_vec();
        let s = dev.stream().clone();
        let mut host = Vec::with_capacity(inputs.len());
        for (f, (inp, e)) in inputs.iter().zip(set.entries()).enumerate() {
            let need = (rows[f] - 1) * inp.ld + e.layout.dim();
            if inp.ld < e.layout.dim() || inp.x.len() < need {
                return Err(Error::shape(
                    "inputs",
                    format!("factor {f}: ld >= {} and {need} elements", e.layout.dim()),
                    format!("ld {} and {} elements", inp.ld, inp.x.len()),
                ));
            }
            host.push(FactorInput {
                x: inp.x.device_ptr(&s).0,
                ld: inp.ld,
                alpha: (1.0 - self.cfg.decay) / rows[f] as f32,
                beta: self.cfg.decay,
            });
        }
        if E::DTYPE != host_dtype(&self.acc) {
            return Err(Error::invalid(
                "inputs",
                "element type differs from the plan",
            ));
        }
        self.acc.set_factor_table(dev, &host)?;
        self.bound = true;
        Ok(())
    }

    /// The launches of one factor step with damping `damping` (`sqrt(damping)` is added to
    /// every factor before inversion, and enters the layer traces of the rule).
    pub fn launches(&mut self, dev: &CudaDevice, damping: f32) -> Result<Vec<LaunchPlan>> {
        if !self.bound {
            return Err(Error::invalid("inputs", "bind_inputs first"));
        }
        if !(damping >= 0.0 && damping.is_finite()) {
            return Err(Error::invalid(
                "damping",
                format!("must be finite and >= 0, got {damping}"),
            ));
        }
        let (b, nb) = (self.set().block(), self.set().total_blocks());
        let s = dev.stream().clone();
        let (bp, _a) = self.stats.device_ptr_mut(&s);
        let (ip, _b) = self.inverses.device_ptr_mut(&s);
        let (btp, _c) = self.block_traces.device_ptr_mut(&s);
        let (ftp, _d) = self.factor_traces.device_ptr_mut(&s);
        let (stp, _e) = self.status.device_ptr_mut(&s);
        let (mp, _f) = self.mask.device_ptr_mut(&s);
        let (dp, _g) = self.decisions.device_ptr_mut(&s);
        let (infp, _h) = self.info.device_ptr_mut(&s);
        let (up, _i) = self.damping_used.device_ptr_mut(&s);
        let mut plans = self.acc.bound_launches(dev, bp, btp, ftp, stp)?;
        // SAFETY: every pointer is one of this step's buffers, sized from the same set.
        plans.push(unsafe {
            self.rule
                .plan(dev, ftp, stp, damping, self.cfg.w1, self.cfg.w2, mp, dp)?
        });
        plans.push(raw::plan_invert_chol_f32(
            bp,
            ip,
            &InvertArgs {
                b,
                blocks: nb,
                damping: 0,
                damping_all: damping.sqrt(),
                mask: mp,
                policy: self.cfg.policy,
                info: infp,
                damping_used: up,
            },
        )?);
        debug_assert_eq!(plans.len(), Self::LAUNCHES);
        Ok(plans)
    }

    /// Queues one factor step ([`DeviceThorStep::LAUNCHES`] launches, no synchronization).
    pub fn run(&mut self, dev: &CudaDevice, damping: f32) -> Result<()> {
        for p in self.launches(dev, damping)? {
            // SAFETY: the plans address this step's buffers and the bound inputs, which
            // the caller keeps valid (bind_inputs' contract).
            unsafe { raw::launch(dev, &p) }?;
        }
        Ok(())
    }

    /// Captures one factor step as a CUDA graph on the device's stream (the step's launches
    /// with this `damping`; capture again when the damping changes). Run the step once
    /// before, so that every kernel is loaded.
    pub fn capture(&mut self, dev: &CudaDevice, damping: f32) -> Result<ThorStepGraph> {
        let plans = self.launches(dev, damping)?;
        for p in &plans {
            dev.function_with_smem(p.kernel, p.smem as usize)?;
        }
        let s = dev.stream().clone();
        s.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
        let mut failed = None;
        for p in &plans {
            // SAFETY: as in `run`.
            if let Err(e) = unsafe { raw::launch(dev, p) } {
                failed = Some(e);
                break;
            }
        }
        let graph = s.end_capture(CUgraphInstantiate_flags(0));
        if let Some(e) = failed {
            return Err(e);
        }
        let graph =
            graph?.ok_or_else(|| Error::Driver("stream capture produced no graph".into()))?;
        Ok(ThorStepGraph { graph })
    }

    /// The statistics (the set's blocks).
    pub fn stats(&self) -> &CudaSlice<f32> {
        &self.stats
    }

    /// The inverses (the set's blocks): updated where the rule said so.
    pub fn inverses(&self) -> &CudaSlice<f32> {
        &self.inverses
    }

    /// Per factor: 1 when its last input held a NaN or Inf, 2 when the other factor of its
    /// layer's did (statistics kept in both cases), else 0.
    pub fn status(&self) -> &CudaSlice<i32> {
        &self.status
    }

    /// Per layer: the last decision (0 update, 1 reuse, 2 freeze, 3 frozen, 4 skipped).
    pub fn decisions(&self) -> &CudaSlice<i32> {
        &self.decisions
    }

    /// Per block: the inversion's info of the last step (-1 where the mask skipped it).
    pub fn info(&self) -> &CudaSlice<i32> {
        &self.info
    }

    /// Per block: the block traces of the last step's statistics.
    pub fn block_traces(&self) -> &CudaSlice<f32> {
        &self.block_traces
    }

    /// Per factor: the traces of the last step's statistics.
    pub fn factor_traces(&self) -> &CudaSlice<f32> {
        &self.factor_traces
    }

    /// The rule's decision history (waits for queued work).
    pub fn history(&self, dev: &CudaDevice) -> Result<(u64, Vec<Vec<i32>>)> {
        self.rule.history(dev)
    }
}

fn host_dtype(acc: &DeviceAccumulate) -> DType {
    acc.plan().dtype()
}
