//! What the whole-model factor step is, whichever backend runs it: its settings and the
//! math of its accumulation. The CPU step is [`crate::cpu::step::CpuThorStep`], the device
//! step `crate::cuda::step::DeviceThorStep`; both follow [`crate::thor::Thor::observe`] for
//! every layer at once.

use crate::error::{Error, Result};
use crate::invert::FailurePolicy;
use crate::rule::{RuleState, Thresholds};
use crate::thor::LayerCounters;

/// How the products are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AccumulateMode {
    /// f32-level accuracy on every input type, the accuracy baseline (error against the f64
    /// reference below 1e-5): SIMT fused multiply-adds in f32 on the CPU and in the device's
    /// tile kernels; on the device's block kernels (b = 64, 128, where chosen for the card,
    /// see [`crate::choice`]) 3xTF32 tensor-core products on f32 input and 16-bit products,
    /// exact in f32, on f16 / bf16 input. The kernel family changes the rounding, not the
    /// accuracy class; `THOR_CHOICES=off` keeps the tile kernels everywhere.
    #[default]
    F32,
    /// Tensor cores: TF32 products on f32 input, f16 / bf16 products on 16-bit input;
    /// accumulation is f32 in both.
    TensorCore,
}

/// Settings of a whole-model factor step, on the device ([`crate::cuda::step`]) or the CPU
/// ([`crate::cpu::step`]), named as in [`crate::thor::ThorConfig`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepConfig {
    /// Math of the accumulation (on the device; the CPU computes in f32 either way).
    pub mode: AccumulateMode,
    /// Statistics decay: 0 replaces the statistics each step, else an exponential moving
    /// average `S <- stat_decay S + (1 - stat_decay) X^T X / N`.
    pub stat_decay: f32,
    /// Trace-rule thresholds.
    pub thresholds: Thresholds,
    /// What the inversion does with a block that is not positive definite.
    pub policy: FailurePolicy,
    /// Statistics steps of decisions the rule keeps for the host.
    pub history: usize,
}

impl Default for StepConfig {
    fn default() -> Self {
        StepConfig {
            mode: AccumulateMode::F32,
            stat_decay: 0.0,
            thresholds: Thresholds::THOR,
            policy: FailurePolicy::retry(),
            history: 64,
        }
    }
}

impl StepConfig {
    /// Checks the settings: `stat_decay` in [0, 1), thresholds, policy.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..1.0).contains(&self.stat_decay) {
            return Err(Error::invalid(
                "stat_decay",
                format!("must be in [0, 1), got {}", self.stat_decay),
            ));
        }
        self.thresholds.validate()?;
        self.policy.params()?;
        Ok(())
    }
}

/// A whole-model step's state, brought to the host (to save it) or handed back (to load
/// it): everything a step keeps from one statistics step to the next.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StepSnapshot {
    /// Statistics, `[total_blocks, b, b]`.
    pub(crate) stats: Vec<f32>,
    /// Inverses, `[total_blocks, b, b]`.
    pub(crate) inverses: Vec<f32>,
    /// Per factor: [`crate::rule::FACTOR_HAS_STATS`], [`crate::rule::FACTOR_FROZEN`].
    pub(crate) factor_state: Vec<u8>,
    /// Per layer, the rule's state.
    pub(crate) rule: Vec<RuleState>,
    /// Per layer, the counters.
    pub(crate) counters: Vec<LayerCounters>,
}

impl StepSnapshot {
    /// Checks the snapshot's sizes against a step of `buffer_len` block elements,
    /// `n_factors` factors and `n_layers` layers.
    pub(crate) fn check(&self, buffer_len: usize, n_factors: usize, n_layers: usize) -> Result<()> {
        use crate::error::check_len;
        check_len("stats", buffer_len, self.stats.len())?;
        check_len("inverses", buffer_len, self.inverses.len())?;
        check_len("factor_state", n_factors, self.factor_state.len())?;
        check_len("rule", n_layers, self.rule.len())?;
        check_len("counters", n_layers, self.counters.len())
    }
}

/// A step's damping: finite and `>= 0`, else an error naming `damping`.
pub(crate) fn check_damping(damping: f32) -> Result<()> {
    if damping >= 0.0 && damping.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(
            "damping",
            format!("must be finite and >= 0, got {damping}"),
        ))
    }
}
