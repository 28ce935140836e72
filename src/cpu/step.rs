//! THOR's whole-model factor step on the CPU, the twin of the device step
//! (`crate::cuda::step::DeviceThorStep`): one grouped accumulation of every factor with
//! traces and a per-factor status, the trace rule for every layer, the masked damped
//! inversion and the counters, with the semantics of [`crate::thor::Thor::observe`] for
//! every layer at once (a layer's first accepted statistics replace the initial identity,
//! then the EMA; a frozen layer is not accumulated; a layer with a NaN or Inf in either
//! input is skipped whole; an update whose inversion fails in a block keeps that block's
//! previous inverse and counts a failed inversion). All memory is allocated by
//! [`CpuThorStep::new`]; a step allocates nothing.

use super::{accumulate_set_with, invert, Damping, FactorInput, InvertOptions, Workspace};
use crate::dtype::Element;
use crate::error::{check_len, try_vec, Error, Result};
use crate::layout::FactorSet;
use crate::patches::InputLayout;
use crate::rule::{
    self, fisher_trace, Decision, RuleLayer, RuleState, FACTOR_FROZEN, FACTOR_HAS_STATS,
};
use crate::step::{check_damping, StepConfig, StepSnapshot};
use crate::thor::LayerCounters;

/// One factor's input to [`CpuThorStep::run`]: the elements of X and how X lies in them
/// (a row-major matrix, or a convolution's patches read from its tensor).
#[derive(Debug, Clone, Copy)]
pub struct HostStepInput<'a, E> {
    /// The activations (or output gradients) of the factor.
    pub x: &'a [E],
    /// How X lies in `x` (at least one row).
    pub layout: InputLayout,
}

impl<'a, E> HostStepInput<'a, E> {
    /// X as a row-major `rows x d` matrix with row stride `ld`.
    pub fn matrix(x: &'a [E], rows: usize, ld: usize) -> Self {
        Self {
            x,
            layout: InputLayout::matrix(rows, ld),
        }
    }
}

/// The state of THOR's factor step for a model on the CPU: statistics, inverses, traces,
/// the rule's state, counters and decision history, allocated once.
#[derive(Debug)]
pub struct CpuThorStep {
    cfg: StepConfig,
    set: FactorSet,
    layers: Vec<RuleLayer>,
    partners: Vec<Option<usize>>,
    stats: Vec<f32>,
    inverses: Vec<f32>,
    block_traces: Vec<f32>,
    factor_traces: Vec<f32>,
    status: Vec<i32>,
    mask: Vec<u8>,
    info: Vec<i32>,
    factor_state: Vec<u8>,
    rule: Vec<RuleState>,
    decisions: Vec<Decision>,
    counters: Vec<LayerCounters>,
    history: Vec<Decision>,
    steps: u64,
    ws: Workspace,
}

impl CpuThorStep {
    /// Sets up the factor step for `layers` whose factors form `set`, fed with inputs of
    /// element type `E` (it sizes the workspace). Statistics and inverses start at the
    /// identity; a layer's first accepted statistics replace it. Every buffer is allocated
    /// here, fallibly ([`Error::OutOfMemory`] naming `set`).
    pub fn new<E: Element>(set: &FactorSet, layers: &[RuleLayer], cfg: StepConfig) -> Result<Self> {
        cfg.validate()?;
        if layers.is_empty() {
            return Err(Error::invalid("layers", "at least one layer is needed"));
        }
        RuleLayer::check_step_layers(set, layers)?;
        RuleLayer::table(set, layers)?;
        let mut partners = vec![None; set.len()];
        for l in layers {
            if let (Some(a), Some(g)) = (l.a_factor, l.g_factor) {
                partners[a] = Some(g);
                partners[g] = Some(a);
            }
        }
        let (b, nb, n) = (set.block(), set.total_blocks(), layers.len());
        let mut eye = try_vec("set", set.buffer_len(), 0.0f32)?;
        for k in 0..nb {
            for i in 0..b {
                eye[k * b * b + i * b + i] = 1.0;
            }
        }
        let inverses = try_vec("set", set.buffer_len(), 0.0f32).map(|mut v| {
            v.copy_from_slice(&eye);
            v
        })?;
        let ws_len =
            super::accumulate_set_workspace_size::<E>(set).max(super::invert_workspace_size(b, nb));
        Ok(CpuThorStep {
            cfg,
            set: set.clone(),
            layers: layers.to_vec(),
            partners,
            stats: eye,
            inverses,
            block_traces: vec![0.0; nb],
            factor_traces: vec![0.0; set.len()],
            status: vec![0; set.len()],
            mask: vec![0; nb],
            info: vec![0; nb],
            factor_state: vec![0; set.len()],
            rule: vec![RuleState::default(); n],
            decisions: vec![Decision::Skipped; n],
            counters: vec![LayerCounters::default(); n],
            history: Vec::with_capacity(cfg.history.max(1) * n),
            steps: 0,
            ws: Workspace::try_new(ws_len)?,
        })
    }

    /// The factor set.
    pub fn set(&self) -> &FactorSet {
        &self.set
    }

    /// Runs one factor step on `inputs` (`inputs[f]` feeds factor `f`) with damping
    /// `damping` (`sqrt(damping)` is added to every factor before inversion, and enters the
    /// layer traces of the rule). Bad arguments are refused before anything changes.
    pub fn run<E: Element>(&mut self, inputs: &[HostStepInput<'_, E>], damping: f32) -> Result<()> {
        check_damping(damping)?;
        check_len("inputs", self.set.len(), inputs.len())?;
        let d = self.cfg.stat_decay;
        accumulate_set_with(
            &self.set,
            |f| {
                let x = inputs[f];
                FactorInput {
                    x: x.x,
                    layout: x.layout,
                    alpha: (1.0 - d) / x.layout.samples().max(1) as f32,
                    beta: d,
                }
            },
            Some(&self.partners),
            Some(&self.factor_state),
            &mut self.stats,
            &mut self.block_traces,
            &mut self.factor_traces,
            &mut self.status,
            &mut self.ws,
        )?;
        // The rule, layer by layer, as the device kernel runs it.
        let sets = self.set.entries();
        for (l, lay) in self.layers.iter().enumerate() {
            let factors = [lay.a_factor, lay.g_factor];
            let skipped = factors
                .iter()
                .flatten()
                .any(|&f| self.status[f] == 1 || self.status[f] == 2);
            let decision = if self.rule[l].frozen {
                Decision::Frozen
            } else if skipped {
                Decision::Skipped
            } else {
                // A missing factor contributes 1 (trace 1, dimension 0).
                let side = |f: Option<usize>| {
                    f.map_or((1.0, 0), |f| {
                        (self.factor_traces[f] as f64, sets[f].layout.dim())
                    })
                };
                let ((ta, da), (tg, dg)) = (side(lay.a_factor), side(lay.g_factor));
                let cur = fisher_trace(ta, da, tg, dg, damping as f64);
                rule::step(&mut self.rule[l], cur, self.cfg.thresholds)
            };
            let accepted = !matches!(decision, Decision::Frozen | Decision::Skipped);
            if accepted {
                let add = FACTOR_HAS_STATS
                    | if decision == Decision::Freeze {
                        FACTOR_FROZEN
                    } else {
                        0
                    };
                for f in factors.iter().flatten() {
                    self.factor_state[*f] |= add;
                }
            }
            let c = &mut self.counters[l];
            match decision {
                Decision::Skipped => c.skipped += 1,
                Decision::Reuse => c.reuses += 1,
                Decision::Freeze => c.freezes = 1,
                Decision::Update | Decision::Frozen => {}
            }
            if accepted {
                c.statistics += 1;
            }
            self.decisions[l] = decision;
            self.mask[lay.first_block..lay.first_block + lay.blocks]
                .fill((decision == Decision::Update) as u8);
        }
        let opts = InvertOptions {
            damping: Damping::Uniform(damping.sqrt()),
            mask: Some(&self.mask),
            policy: self.cfg.policy,
        };
        invert(
            self.set.block(),
            &self.stats,
            &mut self.inverses,
            &mut self.info,
            None,
            &opts,
            &mut self.ws,
        )?;
        // The tally: an update counts as one, or as a failed inversion.
        for (l, lay) in self.layers.iter().enumerate() {
            if self.decisions[l] == Decision::Update {
                let info = &self.info[lay.first_block..lay.first_block + lay.blocks];
                if info.iter().any(|&i| i != 0) {
                    self.counters[l].failed_inversions += 1;
                } else {
                    self.counters[l].updates += 1;
                }
            }
        }
        let cap = self.cfg.history.max(1);
        let n = self.layers.len();
        if self.history.len() < cap * n {
            self.history.extend_from_slice(&self.decisions);
        } else {
            let r = (self.steps as usize % cap) * n;
            self.history[r..r + n].copy_from_slice(&self.decisions);
        }
        self.steps += 1;
        Ok(())
    }

    /// The step's state, for saving.
    pub(crate) fn snapshot(&self) -> StepSnapshot {
        StepSnapshot {
            stats: self.stats.clone(),
            inverses: self.inverses.clone(),
            factor_state: self.factor_state.clone(),
            rule: self.rule.clone(),
            counters: self.counters.clone(),
        }
    }

    /// Takes over a saved state (sizes checked first; nothing changes on error).
    pub(crate) fn restore(&mut self, s: &StepSnapshot) -> Result<()> {
        s.check(self.set.buffer_len(), self.set.len(), self.layers.len())?;
        self.stats.copy_from_slice(&s.stats);
        self.inverses.copy_from_slice(&s.inverses);
        self.factor_state.copy_from_slice(&s.factor_state);
        self.rule.copy_from_slice(&s.rule);
        self.counters.copy_from_slice(&s.counters);
        // No step has run on the loaded state yet.
        self.decisions.fill(Decision::Skipped);
        Ok(())
    }

    /// The statistics, `[total_blocks, b, b]`.
    pub fn stats(&self) -> &[f32] {
        &self.stats
    }

    /// The inverses, `[total_blocks, b, b]`.
    pub fn inverses(&self) -> &[f32] {
        &self.inverses
    }

    /// Per factor, the last accumulation's status: 0 updated, 1 non-finite input, 2 its
    /// partner's input was not finite, 3 frozen.
    pub fn status(&self) -> &[i32] {
        &self.status
    }

    /// The last step's decision per layer.
    pub fn decisions(&self) -> &[Decision] {
        &self.decisions
    }

    /// Each layer's counters, as [`crate::thor::Thor::counters`] keeps them.
    pub fn counters(&self) -> &[LayerCounters] {
        &self.counters
    }

    /// Steps run so far and the decisions of the last `min(steps, history)` of them,
    /// oldest first, one per layer (as the device step's history).
    pub fn history(&self) -> (u64, Vec<Vec<Decision>>) {
        let (n, cap) = (self.layers.len(), self.cfg.history.max(1));
        let kept = (self.steps as usize).min(cap);
        let rows = (self.steps as usize - kept..self.steps as usize)
            .map(|s| {
                let r = s % cap;
                self.history[r * n..(r + 1) * n].to_vec()
            })
            .collect();
        (self.steps, rows)
    }
}
