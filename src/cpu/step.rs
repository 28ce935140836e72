//! THOR's whole-model factor step on the CPU, the twin of the device step
//! (`crate::cuda::step::DeviceThorStep`): one grouped accumulation of every factor with
//! traces and a per-factor status, the trace rule for every layer, the masked damped
//! inversion and the counters, with the semantics of [`crate::thor::Thor::observe`] for
//! every layer at once (a layer's first accepted statistics replace the initial identity,
//! then the EMA; a frozen layer is not accumulated; a layer with a NaN or Inf in either
//! input is skipped whole; an update whose inversion fails in a block keeps that block's
//! previous inverse and counts a failed inversion). All memory is allocated by
//! [`CpuThorStep::new`]; a step allocates nothing.

use super::{
    accumulate_set_with, invert, mirror_and_pad, Damping, FactorInput, InvertOptions, Workspace,
};
use crate::dist::{pack_lower, tri_len, unpack_lower, CommCounters, Communicator, OwnershipPlan};
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
    dist: Option<Box<Dist>>,
}

impl Dist {
    /// An error once a collective of this step, or of another step sharing its
    /// communicator, has failed.
    fn check_usable(&self) -> Result<()> {
        let why = if self.broken {
            Some("an earlier collective of this step failed".to_string())
        } else {
            self.comm
                .failed()
                .map(|w| format!("an earlier collective of the group failed ({w})"))
        };
        match why {
            Some(w) => Err(Error::Communication(format!(
                "{w}; the state may differ from the other ranks' (restore a saved state into a new step on a new group)"
            ))),
            None => Ok(()),
        }
    }
}

/// Values of the small all-reduce that every rank checks against its own: the damping, the
/// steps run and the plan's fingerprint.
const CHECKS: usize = 3;

/// The state a distributed step adds: its rank's plan and communicator, and the buffers the
/// collectives move, allocated once.
#[derive(Debug)]
struct Dist {
    plan: OwnershipPlan,
    comm: Box<dyn Communicator>,
    /// This rank's raw products `X^T X` of every block, `[total_blocks, b, b]`.
    local: Vec<f32>,
    /// The factor state the local accumulation sees: every factor "has statistics" (so
    /// alpha 1, beta 0), frozen ones frozen.
    local_state: Vec<u8>,
    /// Packed lower triangles of every block in the plan's order.
    send: Vec<f32>,
    /// This rank's segment of the reduce-scatter: the sums of its blocks.
    recv: Vec<f32>,
    scatter_counts: Vec<usize>,
    gather_counts: Vec<usize>,
    /// This rank's refreshed inverses (packed) and their info words.
    gather_send: Vec<f32>,
    /// Every rank's refreshed inverses and info words.
    gather_recv: Vec<f32>,
    /// The all-reduced values: per factor a non-finite flag, per factor its samples, per
    /// block the trace of its old statistics and of its new sum (owners only; 0 elsewhere).
    meta: Vec<f64>,
    /// Per block: owned by this rank and masked for inversion.
    owned_mask: Vec<u8>,
    block_factor: Vec<usize>,
    /// A stage failed after the first collective: the state may differ between ranks.
    broken: bool,
    /// The current step has reached its collectives.
    in_collectives: bool,
    /// Every block's statistics are here (until the next step; see `gather_statistics`).
    stats_whole: bool,
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
            dist: None,
        })
    }

    /// The step of one rank of a data-parallel group ([`crate::dist`]): `comm` is this
    /// rank's end of the group; every rank makes its step with the same `set`, `layers` and
    /// `cfg` and runs it on its own local batch. Each [`CpuThorStep::run`] then gives every
    /// rank the decisions, counters and inverses that one rank would compute from the union
    /// of the batches (sums in another order: equal to rounding), the statistics of the
    /// blocks this rank owns ([`CpuThorStep::plan`]; the others' stay as they were), and
    /// the same layer skipped on every rank when any rank's input is not finite.
    ///
    /// After a failed collective ([`Error::Communication`]) the step refuses to run again:
    /// its state may differ from the other ranks'.
    pub fn new_distributed<E: Element>(
        set: &FactorSet,
        layers: &[RuleLayer],
        cfg: StepConfig,
        comm: Box<dyn Communicator>,
    ) -> Result<Self> {
        let plan = OwnershipPlan::new(set, comm.world())?;
        Self::new_distributed_with_plan::<E>(set, layers, cfg, comm, plan)
    }

    /// [`CpuThorStep::new_distributed`] with the block ownership given (every rank must
    /// pass the same plan): for example [`OwnershipPlan::rotated`], so that the steps of a
    /// model's layers spread their blocks over all ranks. Errors when the plan's world or
    /// block count does not match `comm` and `set`.
    pub fn new_distributed_with_plan<E: Element>(
        set: &FactorSet,
        layers: &[RuleLayer],
        cfg: StepConfig,
        comm: Box<dyn Communicator>,
        plan: OwnershipPlan,
    ) -> Result<Self> {
        check_len("plan", set.total_blocks(), plan.blocks())?;
        if plan.world() != comm.world() || comm.rank() >= comm.world() {
            return Err(Error::shape(
                "plan",
                format!("a world of {} ranks (the communicator's)", comm.world()),
                format!("{} ranks (rank {})", plan.world(), comm.rank()),
            ));
        }
        let mut step = Self::new::<E>(set, layers, cfg)?;
        let (nb, nf, b) = (set.total_blocks(), set.len(), set.block());
        let tri = tri_len(b);
        let rank = comm.rank();
        let owned = plan.owned(rank).len();
        let scatter_counts = vec![0; plan.world()];
        // The scratch buffers start as NaN, so that an element a stage reads before it is
        // written shows in the results.
        step.dist = Some(Box::new(Dist {
            local: try_vec("set", set.buffer_len(), f32::NAN)?,
            local_state: vec![0; nf],
            send: try_vec("set", nb * tri, f32::NAN)?,
            recv: try_vec("set", owned * tri, f32::NAN)?,
            scatter_counts,
            gather_counts: vec![0; plan.world()],
            gather_send: try_vec("set", owned * (tri + 1), f32::NAN)?,
            gather_recv: try_vec("set", nb * (tri + 1), f32::NAN)?,
            meta: vec![0.0; 2 * (nf + nb) + CHECKS],
            owned_mask: vec![0; nb],
            block_factor: set.block_factor(),
            broken: false,
            in_collectives: false,
            stats_whole: true,
            plan,
            comm,
        }));
        Ok(step)
    }

    /// Gives every rank the statistics of every block (a collective: every rank of the
    /// group calls it), so that any rank's saved state is complete and loads into a group of
    /// any size. Nothing to do on one rank.
    pub fn gather_statistics(&mut self) -> Result<()> {
        if self.dist.is_none() {
            return Ok(());
        }
        self.with_dist(|st, dist| {
            let out = st.gather_statistics_on(dist);
            match out {
                Ok(()) => dist.stats_whole = true,
                Err(Error::Communication(_)) => dist.broken = true,
                Err(_) => {}
            }
            out
        })
    }

    /// Runs `f` on the step and its group part, taken out for the call and put back
    /// afterwards, also when `f` panics: the part is then marked broken (a collective may
    /// be half done) and the group aborted before the panic goes on, so that the step never
    /// runs again as a single-rank step nor as a whole rank of its group.
    fn with_dist<T>(&mut self, f: impl FnOnce(&mut Self, &mut Dist) -> Result<T>) -> Result<T> {
        let mut dist = self
            .dist
            .take()
            .ok_or_else(|| Error::invalid("step", "not a distributed step"))?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self, &mut dist)));
        if out.is_err() {
            dist.broken = true;
            dist.stats_whole = false;
            dist.comm
                .abort(&format!("rank {}: a panic inside a step", dist.comm.rank()));
        }
        self.dist = Some(dist);
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// On a distributed step, an error when a collective of it (or of its group) failed:
    /// its inverses may then differ from the other ranks'.
    pub fn check_usable(&self) -> Result<()> {
        self.dist.as_ref().map_or(Ok(()), |d| d.check_usable())
    }

    fn gather_statistics_on(&mut self, dist: &mut Dist) -> Result<()> {
        dist.check_usable()?;
        let b = self.set.block();
        let (bb, tri) = (b * b, tri_len(b));
        let rank = dist.comm.rank();
        // The packed inverses' buffers have room for this (one more word per block).
        dist.plan.counts(tri, |_| true, &mut dist.gather_counts);
        let mut at = 0;
        for &k in dist.plan.owned(rank) {
            pack_lower(
                &self.stats[k * bb..(k + 1) * bb],
                b,
                &mut dist.gather_send[at..at + tri],
            );
            at += tri;
        }
        let total: usize = dist.gather_counts.iter().sum();
        dist.comm.all_gather(
            &dist.gather_send[..at],
            &dist.gather_counts,
            &mut dist.gather_recv[..total],
        )?;
        for (i, &k) in dist.plan.order().iter().enumerate() {
            unpack_lower(
                &dist.gather_recv[i * tri..(i + 1) * tri],
                b,
                &mut self.stats[k * bb..(k + 1) * bb],
            );
        }
        Ok(())
    }

    /// This rank in its group (`None` on one rank).
    pub fn comm_rank(&self) -> Option<usize> {
        self.dist.as_ref().map(|d| d.comm.rank())
    }

    /// The block ownership of a distributed step (`None` on one rank).
    pub fn plan(&self) -> Option<&OwnershipPlan> {
        self.dist.as_ref().map(|d| &d.plan)
    }

    /// What a distributed step's communicator has moved so far (`None` on one rank).
    pub fn comm_counters(&self) -> Option<CommCounters> {
        self.dist.as_ref().map(|d| d.comm.counters())
    }

    /// The factor set.
    pub fn set(&self) -> &FactorSet {
        &self.set
    }

    /// Runs one factor step on `inputs` (`inputs[f]` feeds factor `f`) with damping
    /// `damping` (`sqrt(damping)` is added to every factor before inversion, and enters the
    /// layer traces of the rule). Bad arguments are refused before anything changes. On a
    /// distributed step ([`CpuThorStep::new_distributed`]) every rank of the group calls it
    /// with its own inputs.
    pub fn run<E: Element>(&mut self, inputs: &[HostStepInput<'_, E>], damping: f32) -> Result<()> {
        check_damping(damping)?;
        check_len("inputs", self.set.len(), inputs.len())?;
        if self.dist.is_some() {
            return self.run_distributed(inputs, damping);
        }
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
        self.decide(damping);
        self.invert(damping, None)?;
        self.tally();
        Ok(())
    }

    /// [`CpuThorStep::run`] on one rank of a group, in three collectives: local products
    /// reduce-scattered to their owners (packed lower triangles); one small all-reduce of
    /// the statuses, sample counts and the owners' traces, after which every rank computes
    /// the same new traces and decisions; EMA and inversion on the owners; the refreshed
    /// inverses all-gathered.
    fn run_distributed<E: Element>(
        &mut self,
        inputs: &[HostStepInput<'_, E>],
        damping: f32,
    ) -> Result<()> {
        self.with_dist(|st, dist| {
            dist.in_collectives = false;
            let out = st.distributed_stages(dist, inputs, damping);
            // Any failure once the collectives started leaves this rank out of step with
            // the others (they may have gone on, or be waiting for it).
            if let Err(e) = &out {
                if dist.in_collectives {
                    dist.broken = true;
                    // The other ranks may be waiting in this step's next collective.
                    dist.comm.abort(&format!("rank {}: {e}", dist.comm.rank()));
                }
            }
            out
        })
    }

    fn distributed_stages<E: Element>(
        &mut self,
        dist: &mut Dist,
        inputs: &[HostStepInput<'_, E>],
        damping: f32,
    ) -> Result<()> {
        dist.check_usable()?;
        let (b, nf) = (self.set.block(), self.set.len());
        let (bb, tri) = (b * b, tri_len(b));
        let rank = dist.comm.rank();
        // 1. This rank's raw products (alpha 1, beta 0) and non-finite statuses; argument
        // errors return here, before anything changes.
        for (s, &f) in dist.local_state.iter_mut().zip(&self.factor_state) {
            *s = (f & FACTOR_FROZEN) | FACTOR_HAS_STATS;
        }
        accumulate_set_with(
            &self.set,
            |f| FactorInput {
                x: inputs[f].x,
                layout: inputs[f].layout,
                alpha: 1.0,
                beta: 0.0,
            },
            Some(&self.partners),
            Some(&dist.local_state),
            &mut dist.local,
            &mut self.block_traces,
            &mut self.factor_traces,
            &mut self.status,
            &mut self.ws,
        )?;
        dist.in_collectives = true;
        if dist.plan.world() > 1 {
            dist.stats_whole = false;
        }
        // 2. Every block's sum to its owner, as a packed lower triangle; frozen factors'
        // blocks (the same on every rank) are not sent.
        let fstate = &self.factor_state;
        let active = |k: usize| fstate[dist.block_factor[k]] & FACTOR_FROZEN == 0;
        dist.plan.counts(tri, active, &mut dist.scatter_counts);
        let mut sent = 0;
        for &k in dist.plan.order().iter().filter(|&&k| active(k)) {
            pack_lower(
                &dist.local[k * bb..(k + 1) * bb],
                b,
                &mut dist.send[sent..sent + tri],
            );
            sent += tri;
        }
        let own = dist.scatter_counts[rank];
        if sent > 0 {
            dist.comm.reduce_scatter(
                &dist.send[..sent],
                &dist.scatter_counts,
                &mut dist.recv[..own],
            )?;
        }
        // Where each of this rank's blocks lies in `recv` (frozen ones nowhere).
        let recv_at = |nth_active: usize| nth_active * tri..(nth_active + 1) * tri;
        // 3. One small all-reduce for what every rank needs to decide: per factor, whether
        // any rank could not read its input and the samples of the union; per block (from
        // its owner), the traces of the old statistics and of the new sum, from which every
        // rank computes the new traces itself (the EMA is linear).
        let nb = self.set.total_blocks();
        let (flags, rest) = dist.meta.split_at_mut(nf);
        let (samples, rest) = rest.split_at_mut(nf);
        let (tr_old, rest) = rest.split_at_mut(nb);
        let (tr_sum, checks) = rest.split_at_mut(nb);
        // What every rank must agree on: the damping and the steps run so far.
        let plan_id = dist.plan.fingerprint() as f64;
        checks.copy_from_slice(&[damping as f64, self.steps as f64, plan_id]);
        for (f, inp) in inputs.iter().enumerate() {
            flags[f] = f64::from(u8::from(self.status[f] == 1));
            samples[f] = inp.layout.samples() as f64;
        }
        tr_old.fill(0.0);
        tr_sum.fill(0.0);
        let diag = |r: usize| r * (r + 1) / 2 + r;
        let mut nth = 0;
        for &k in dist.plan.owned(rank) {
            let e = &self.set.entries()[dist.block_factor[k]];
            let valid = e.layout.valid(k - e.first_block);
            tr_old[k] = (0..valid)
                .map(|r| self.stats[k * bb + r * b + r] as f64)
                .sum();
            if self.factor_state[dist.block_factor[k]] & FACTOR_FROZEN == 0 {
                let sum = &dist.recv[recv_at(nth)];
                tr_sum[k] = (0..valid).map(|r| sum[diag(r)] as f64).sum();
                nth += 1;
            }
        }
        dist.comm.all_reduce(&mut dist.meta)?;
        let (flags, rest) = dist.meta.split_at(nf);
        let (samples, rest) = rest.split_at(nf);
        let (tr_old, rest) = rest.split_at(nb);
        let (tr_sum, checks) = rest.split_at(nb);
        // Equal values summed over the ranks are exact: any other sum means a rank differs
        // (every rank sees it, so every rank fails here).
        let world = dist.plan.world() as f64;
        for (what, mine, sum) in [
            ("damping", damping as f64, checks[0]),
            ("steps run", self.steps as f64, checks[1]),
            ("block ownership", plan_id, checks[2]),
        ] {
            if sum != mine * world {
                return Err(Error::Communication(format!(
                    "the ranks disagree on the {what} (this rank: {mine}, the mean: {})",
                    sum / world
                )));
            }
        }
        for ((st, &fs), &flag) in self.status.iter_mut().zip(&self.factor_state).zip(flags) {
            *st = if fs & FACTOR_FROZEN != 0 {
                3
            } else if flag > 0.0 {
                1
            } else {
                0
            };
        }
        for f in 0..nf {
            if self.status[f] == 0 && self.partners[f].is_some_and(|q| self.status[q] == 1) {
                self.status[f] = 2;
            }
        }
        // The EMA's scales per factor: the first accepted statistics replace the identity.
        let d = self.cfg.stat_decay;
        let scales = |f: usize| {
            let n = samples[f] as f32;
            if self.factor_state[f] & FACTOR_HAS_STATS == 0 {
                (1.0 / n, 0.0)
            } else {
                ((1.0 - d) / n, d)
            }
        };
        for (f, e) in self.set.entries().iter().enumerate() {
            let (alpha, beta) = scales(f);
            let mut total = 0.0f64;
            for k in e.first_block..e.first_block + e.layout.blocks() {
                let t = if self.status[f] == 0 {
                    // As the EMA: with beta 0 the old statistics are not read.
                    let old = if beta == 0.0 {
                        0.0
                    } else {
                        beta as f64 * tr_old[k]
                    };
                    old + alpha as f64 * tr_sum[k]
                } else {
                    tr_old[k]
                };
                let pad = b - e.layout.valid(k - e.first_block);
                self.block_traces[k] = (t + pad as f64) as f32;
                total += t;
            }
            self.factor_traces[f] = total as f32;
        }
        // 4. Owners: the EMA of their blocks (a frozen factor has status 3: not here).
        let mut nth = 0;
        for &k in dist.plan.owned(rank) {
            let f = dist.block_factor[k];
            let frozen = self.factor_state[f] & FACTOR_FROZEN != 0;
            let at = nth;
            nth += usize::from(!frozen);
            if self.status[f] != 0 {
                continue;
            }
            let (alpha, beta) = scales(f);
            let e = &self.set.entries()[f];
            let s = &mut self.stats[k * bb..(k + 1) * bb];
            let sum = &dist.recv[recv_at(at)];
            let mut at = 0;
            for r in 0..b {
                for c in 0..=r {
                    let old = if beta == 0.0 {
                        0.0
                    } else {
                        beta * s[r * b + c]
                    };
                    s[r * b + c] = old + alpha * sum[at];
                    at += 1;
                }
            }
            mirror_and_pad(s, b, e.layout.valid(k - e.first_block));
        }
        self.decide(damping);
        // 6. Owners invert their blocks of the updated layers.
        for (k, m) in dist.owned_mask.iter_mut().enumerate() {
            *m = u8::from(self.mask[k] != 0 && dist.plan.owner(k) == rank);
        }
        self.invert(damping, Some(&dist.owned_mask))?;
        // 7. The refreshed inverses (packed, with their info words) to every rank.
        let mask = &self.mask;
        dist.plan
            .counts(tri + 1, |k| mask[k] != 0, &mut dist.gather_counts);
        let mut at = 0;
        for &k in dist.plan.owned(rank).iter().filter(|&&k| mask[k] != 0) {
            let out = &mut dist.gather_send[at..at + tri + 1];
            pack_lower(&self.inverses[k * bb..(k + 1) * bb], b, &mut out[..tri]);
            out[tri] = self.info[k] as f32;
            at += tri + 1;
        }
        let total: usize = dist.gather_counts.iter().sum();
        // Every rank knows the mask: when no layer updated, every rank skips the gather.
        if total > 0 {
            dist.comm.all_gather(
                &dist.gather_send[..at],
                &dist.gather_counts,
                &mut dist.gather_recv[..total],
            )?;
        }
        let mut at = 0;
        for r in 0..dist.plan.world() {
            for &k in dist.plan.owned(r).iter().filter(|&&k| mask[k] != 0) {
                let got = &dist.gather_recv[at..at + tri + 1];
                unpack_lower(&got[..tri], b, &mut self.inverses[k * bb..(k + 1) * bb]);
                self.info[k] = got[tri] as i32;
                at += tri + 1;
            }
        }
        self.tally();
        Ok(())
    }

    /// The trace rule for every layer, from the statuses and factor traces of the last
    /// accumulation: decisions, counters (but the inversions'), factor states and the
    /// inversion mask.
    fn decide(&mut self, damping: f32) {
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
    }

    /// The masked damped inversion (`mask`, else the rule's mask).
    fn invert(&mut self, damping: f32, mask: Option<&[u8]>) -> Result<()> {
        let opts = InvertOptions {
            damping: Damping::Uniform(damping.sqrt()),
            mask: Some(mask.unwrap_or(&self.mask)),
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
        )
    }

    /// Counts each update as one, or as a failed inversion, and keeps the decisions.
    fn tally(&mut self) {
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
    }

    /// The step's state, for saving. On a distributed step that has run since the last
    /// [`CpuThorStep::gather_statistics`], this rank lacks the other ranks' statistics:
    /// an error naming `gather_statistics` instead of a state that would load wrong.
    pub(crate) fn snapshot(&self) -> Result<StepSnapshot> {
        if let Some(d) = &self.dist {
            d.check_usable()?;
            if !d.stats_whole {
                return Err(Error::invalid(
                    "gather_statistics",
                    "this rank holds only the statistics of the blocks it owns: call gather_statistics on every rank before saving",
                ));
            }
        }
        Ok(StepSnapshot {
            stats: self.stats.clone(),
            inverses: self.inverses.clone(),
            factor_state: self.factor_state.clone(),
            rule: self.rule.clone(),
            counters: self.counters.clone(),
        })
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
        if let Some(d) = &mut self.dist {
            d.stats_whole = true;
        }
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
