//! THOR's trace rule on the device: decisions, the block mask the inversion reads, and a
//! history ring the host reads whenever it likes, with no host synchronization in the step.

use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::raw;
use super::CudaDevice;
use crate::error::{check_len, Error, Result};
use crate::layout::FactorSet;
pub use crate::rule::RuleLayer;
use crate::rule::{Decision, RuleState, Thresholds};

/// A decision code the device rule wrote, checked (anything else is a device fault).
pub(crate) fn decision_of(code: i32) -> Result<Decision> {
    Decision::from_code(code)
        .ok_or_else(|| Error::Driver(format!("the device rule wrote decision code {code}")))
}

/// The device rule's per-layer state flags (as in kernels/rule.cu).
const RULE_HAS_PREV: u8 = 1;
const RULE_IS_FROZEN: u8 = 2;

/// What the rule keeps for THOR's whole step besides its own state (raw device addresses):
/// the per-factor state the accumulation reads (`n_factors` bytes), the layers' counters
/// (`6 * n_layers` u64) and the inversion's `info` (one i32 per block) that the tally after
/// the inversion reads.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RuleTally {
    pub(crate) factor_state: u64,
    pub(crate) counters: u64,
    pub(crate) info: u64,
    /// One f32 the damping is read from (a captured step follows the schedule).
    pub(crate) damping_at: u64,
    /// One f32 per block: the inversion's per-block damping, written by the rule.
    pub(crate) block_damping: u64,
}

/// The device-resident state of the rule for a set of layers.
#[derive(Debug)]
pub struct DeviceTraceRule {
    layers: CudaSlice<i32>,
    n_layers: usize,
    n_factors: usize,
    total_blocks: usize,
    prev: CudaSlice<f64>,
    state: CudaSlice<u8>,
    history: CudaSlice<i32>,
    capacity: usize,
    step: CudaSlice<u64>,
}

impl DeviceTraceRule {
    /// The rule's launch for one statistics step on raw buffers (see
    /// [`CudaDevice::trace_rule`]), with, given `tally`, the launch that completes the
    /// counters after the inversion, the guards of the rule's own buffers (keep them until
    /// the launches are queued) and the address of its step counter (one u64). `factor_status` (one i32 per factor, or 0) skips the
    /// layers whose statistics were not updated.
    ///
    /// The plan addresses raw buffers: launching it is sound only while `factor_traces`
    /// (and `factor_status` when non-zero) address one element per factor of the set, `mask`
    /// one byte per block, `decisions` one i32 per layer, `tally`'s buffers as
    /// [`RuleTally`] says, all of `dev`'s context, valid until the queued work completes.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn plan<'a>(
        &'a mut self,
        s: &'a CudaStream,
        factor_traces: u64,
        factor_status: u64,
        damping: f32,
        thresholds: Thresholds,
        mask: u64,
        decisions: u64,
        tally: Option<RuleTally>,
    ) -> Result<(
        raw::LaunchPlan,
        Option<raw::LaunchPlan>,
        Vec<SyncOnDrop<'a>>,
        u64,
    )> {
        let (lp, a) = self.layers.device_ptr(s);
        let (pp, b) = self.prev.device_ptr_mut(s);
        let (sp, c) = self.state.device_ptr_mut(s);
        let (hp, d) = self.history.device_ptr_mut(s);
        let (cp, e) = self.step.device_ptr_mut(s);
        let t = tally.unwrap_or(RuleTally {
            factor_state: 0,
            counters: 0,
            info: 0,
            damping_at: 0,
            block_damping: 0,
        });
        let plan = raw::plan_trace_rule_f32(&raw::TraceRuleArgs {
            factor_traces,
            factor_status,
            layers: lp,
            n_layers: self.n_layers,
            damping,
            thresholds,
            prev: pp,
            state: sp,
            mask,
            decisions,
            history: hp,
            history_capacity: self.capacity,
            step: cp,
            factor_state: t.factor_state,
            counters: t.counters,
            damping_at: t.damping_at,
            block_damping: t.block_damping,
        })?;
        let after = match tally {
            Some(t) => Some(raw::plan_rule_tally_f32(
                lp,
                self.n_layers,
                decisions,
                t.info,
                t.counters,
            )?),
            None => None,
        };
        Ok((plan, after, vec![a, b, c, d, e], cp))
    }

    /// The rule's per-layer state (waits for queued work on `dev`'s stream).
    pub(crate) fn download_state(&self, dev: &CudaDevice) -> Result<Vec<RuleState>> {
        dev.check_same_context("rule", &self.prev)?;
        let (prev, state) = (dev.download(&self.prev)?, dev.download(&self.state)?);
        Ok(prev
            .iter()
            .zip(&state)
            .map(|(&p, &st)| RuleState {
                prev: (st & RULE_HAS_PREV != 0).then_some(p),
                frozen: st & RULE_IS_FROZEN != 0,
            })
            .collect())
    }

    /// Sets the rule's per-layer state (queued on `dev`'s stream).
    pub(crate) fn upload_state(&mut self, dev: &CudaDevice, rule: &[RuleState]) -> Result<()> {
        check_len("rule", self.n_layers, rule.len())?;
        dev.check_same_context("rule", &self.prev)?;
        let prev: Vec<f64> = rule.iter().map(|r| r.prev.unwrap_or(0.0)).collect();
        let state: Vec<u8> = rule
            .iter()
            .map(|r| {
                ((r.prev.is_some() as u8) * RULE_HAS_PREV) | ((r.frozen as u8) * RULE_IS_FROZEN)
            })
            .collect();
        dev.stream().memcpy_htod(&prev, &mut self.prev)?;
        dev.stream().memcpy_htod(&state, &mut self.state)?;
        Ok(())
    }

    /// Number of blocks of the set the rule masks.
    pub fn total_blocks(&self) -> usize {
        self.total_blocks
    }

    /// Number of layers.
    pub fn layers(&self) -> usize {
        self.n_layers
    }

    /// Reads the decision history (waits for queued work): the number of statistics steps
    /// run so far and the decisions of the last `min(steps, capacity)` of them, oldest first,
    /// one [`Decision::code`](crate::rule::Decision::code) per layer.
    pub fn history(&self, dev: &CudaDevice) -> Result<(u64, Vec<Vec<Decision>>)> {
        dev.check_same_context("rule", &self.step)?;
        let steps = dev.download(&self.step)?[0];
        let ring = dev.download(&self.history)?;
        let kept = (steps as usize).min(self.capacity);
        let rows = (steps as usize - kept..steps as usize)
            .map(|s| {
                let r = s % self.capacity;
                ring[r * self.n_layers..(r + 1) * self.n_layers]
                    .iter()
                    .map(|&c| decision_of(c))
                    .collect()
            })
            .collect::<Result<_>>()?;
        Ok((steps, rows))
    }
}

impl CudaDevice {
    /// Sets up the device rule for `layers` of `set`, keeping the last `history_capacity`
    /// decisions (at least 1).
    pub fn new_trace_rule(
        &self,
        set: &FactorSet,
        layers: &[RuleLayer],
        history_capacity: usize,
    ) -> Result<DeviceTraceRule> {
        if layers.is_empty() {
            return Err(Error::invalid("layers", "at least one layer is needed"));
        }
        if history_capacity == 0 {
            return Err(Error::invalid("history_capacity", "must be at least 1"));
        }
        let table = RuleLayer::table(set, layers)?;
        let n = layers.len();
        Ok(DeviceTraceRule {
            layers: self.upload(&table)?,
            n_layers: n,
            n_factors: set.len(),
            total_blocks: set.total_blocks(),
            prev: self.zeros(n)?,
            state: self.zeros(n)?,
            history: self.upload(&vec![-1i32; history_capacity * n])?,
            capacity: history_capacity,
            step: self.zeros(1)?,
        })
    }

    /// One statistics step of the rule: from this step's `factor_traces` (one per factor of
    /// the set, as [`CudaDevice::traces`] writes them) and `damping`, writes `decisions` (one
    /// per layer) and `mask` (one byte per block of the set: 1 where the layer updates; blocks
    /// of no layer are left as they were), and appends to the history. One launch, no sync.
    #[allow(clippy::too_many_arguments)]
    pub fn trace_rule(
        &self,
        rule: &mut DeviceTraceRule,
        factor_traces: &CudaSlice<f32>,
        damping: f32,
        thresholds: Thresholds,
        mask: &mut CudaSlice<u8>,
        decisions: &mut CudaSlice<i32>,
    ) -> Result<()> {
        // Thresholds and damping are checked by the launch plan, before anything is queued.
        check_len("factor_traces", rule.n_factors, factor_traces.len())?;
        check_len("mask", rule.total_blocks, mask.len())?;
        check_len("decisions", rule.n_layers, decisions.len())?;
        self.check_same_context("factor_traces", factor_traces)?;
        self.check_same_context("mask", mask)?;
        self.check_same_context("decisions", decisions)?;
        self.check_same_context("rule", &rule.layers)?;
        let s = &self.stream;
        let (tp, _a) = factor_traces.device_ptr(s);
        let (mp, _e) = mask.device_ptr_mut(s);
        let (dp, _f) = decisions.device_ptr_mut(s);
        let (plan, _, _guards, _) = rule.plan(s, tp, 0, damping, thresholds, mp, dp, None)?;
        // SAFETY: every buffer belongs to this device and was sized from the same set and
        // layer table.
        unsafe { raw::launch(self, &plan) }?;
        Ok(())
    }
}
