//! THOR's factor step on the device as one pipeline: accumulate every factor (with traces
//! and a per-factor non-finite status), the trace rule (update / reuse / freeze / skip per
//! layer, and the block mask), the masked damped inversion and the counters, in a fixed
//! number of launches on one stream ([`DeviceThorStep::LAUNCHES`], however many layers),
//! with no host synchronization inside; or, through [`DeviceThorStep::run_graph`], one CUDA
//! graph launch.
//!
//! Its semantics are those of [`crate::thor::Thor::observe`] for every layer at once: a
//! layer's first accepted statistics replace the initial ones (later ones follow the EMA),
//! a frozen layer is not accumulated, a layer with a NaN or Inf in either input is skipped
//! whole, an update whose inversion fails in any block keeps the previous inverses of the
//! failed blocks and counts a failed inversion; the counters match
//! [`crate::thor::LayerCounters`] field for field.

use cudarc::driver::sys::{CUgraphInstantiate_flags, CUstreamCaptureMode};
use cudarc::driver::{
    CudaFunction, CudaGraph, CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, SyncOnDrop,
};

use super::accumulate::{DeviceAccumulate, DeviceElement, FactorInput};
use super::dist::{DeviceCommunicator, DistBuffers, DistLayout};
use super::raw::{self, InvertArgs, LaunchPlan};
use super::rule::{DeviceTraceRule, RuleLayer, RuleTally};
use super::{CudaDevice, KernelId};
use crate::dist::OwnershipPlan;
use crate::dtype::DType;
use crate::error::{check_len, Error, Result};
use crate::layout::FactorSet;
use crate::patches::InputLayout;
use std::sync::Arc;

pub use crate::step::StepConfig;
use crate::step::{check_damping, StepSnapshot};

/// Checks factor `f`'s input layout against the plan (`rows` rows, dimension `d`) and
/// returns the elements it reads.
fn check_input(f: usize, layout: &InputLayout, rows: usize, d: usize) -> Result<usize> {
    let need = layout.check(d)?;
    if layout.rows() != rows {
        return Err(Error::shape(
            "rows",
            format!("factor {f}: {rows} (as planned)"),
            layout.rows(),
        ));
    }
    Ok(need)
}

/// The device's six counters per layer as [`crate::thor::LayerCounters`].
fn counters_of(c: &[u64]) -> Vec<crate::thor::LayerCounters> {
    c.chunks_exact(6)
        .map(|v| crate::thor::LayerCounters::from_array([v[0], v[1], v[2], v[3], v[4], v[5]]))
        .collect()
}

/// One factor's input to [`DeviceThorStep::run`]: X's elements and how X lies in them (a
/// row-major matrix or a convolution's patches; rows as planned). The step weights it
/// itself (`(1 - stat_decay) / n`, `n` the rows or, for patches normalised per sample, the
/// samples: [`InputLayout::samples`]).
#[derive(Debug)]
pub struct StepInput<'a, E> {
    /// The activations (or output gradients) of the factor: a whole buffer
    /// (`slice.as_view()`) or part of one (`slice.slice(a..b)`).
    pub x: CudaView<'a, E>,
    /// How X lies in `x`.
    pub layout: InputLayout,
}

impl<'a, E> StepInput<'a, E> {
    /// X as a row-major `rows x d` matrix with row stride `ld`.
    pub fn matrix(x: CudaView<'a, E>, rows: usize, ld: usize) -> Self {
        StepInput {
            x,
            layout: InputLayout::matrix(rows, ld),
        }
    }
}

impl<E> Clone for StepInput<'_, E> {
    fn clone(&self) -> Self {
        StepInput {
            x: self.x.slice(..),
            layout: self.layout,
        }
    }
}

/// The device state of THOR's factor step for a model: statistics, inverses, traces, the
/// rule's state, the tables of every launch and, once [`DeviceThorStep::run_graph`] has
/// run, the captured step, all allocated once.
///
/// Inputs are borrowed for each call, never kept: the factor table on the device is
/// re-uploaded only when their addresses or strides change, so a training loop that writes
/// new activations into the same buffers makes no host-device copy per step.
#[derive(Debug)]
pub struct DeviceThorStep {
    cfg: StepConfig,
    dtype: DType,
    partners: Vec<Option<usize>>,
    acc: DeviceAccumulate,
    /// The inversion kernel chosen for this card and the set's block count.
    invert: raw::InvertKernel,
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
    /// The step's damping, set on the stream before each step (a memset, not a copy), so
    /// that a captured step follows the schedule.
    damping_at: CudaSlice<f32>,
    /// Per block: `sqrt(damping)`, written by the rule, read by the inversion.
    block_damping: CudaSlice<f32>,
    /// Per factor: holds statistics (bit 0), frozen (bit 1); kept by the rule, read by the
    /// accumulation.
    factor_state: CudaSlice<u8>,
    /// Per layer, the six counters of [`crate::thor::LayerCounters`].
    counters: CudaSlice<u64>,
    /// The (address, layout) of each input the factor table on the device holds.
    bound: Vec<(u64, InputLayout)>,
    /// A stream of the step's own, in the device's context, that graphs are captured on:
    /// nothing another thread queues on the caller's stream can slip into a capture.
    capture_stream: Option<Arc<CudaStream>>,
    graph: Option<StepGraph>,
    traffic: StepTraffic,
    /// On one rank of a group: the distributed step's tables, buffers and communicator.
    dist: Option<Box<StepDist>>,
}

/// What a distributed step adds ([`CudaDevice::new_distributed_thor_step`]).
#[derive(Debug)]
struct StepDist {
    comm: Box<dyn DeviceCommunicator>,
    layout: DistLayout,
    local: CudaSlice<f32>,
    send: CudaSlice<f32>,
    recv: CudaSlice<f32>,
    meta: CudaSlice<f64>,
    gather_send: CudaSlice<f32>,
    gather_recv: CudaSlice<f32>,
    send_list: CudaSlice<i32>,
    own_list: CudaSlice<i32>,
    blocks_tab: CudaSlice<i32>,
    factors_tab: CudaSlice<i32>,
    samples: CudaSlice<f64>,
    own_mask: CudaSlice<u8>,
    fault: CudaSlice<i32>,
    /// Why the step is out of step with its group (a failure once its collectives began).
    broken: Option<String>,
    /// Whether every block's statistics are this rank's (false after a step on more than
    /// one rank, until [`DeviceThorStep::gather_statistics`]).
    stats_whole: bool,
    /// Whether the all-gather carries the updated inverses only (the step waits for the
    /// rule's mask) rather than every owned one.
    updated_only: bool,
    /// Blocks per rank in this step's all-gather.
    gather_blocks: usize,
    /// The updated-only lists on the device ([`DistLayout::updated_lists`]) and their
    /// host staging, with the mask's.
    upd_own: CudaSlice<i32>,
    upd_all: CudaSlice<i32>,
    host_own: Vec<i32>,
    host_all: Vec<i32>,
    host_mask: Vec<u8>,
}

/// What the step has queued so far: kernel launches (a graph launch counts one), graph
/// captures, host-to-device copies (factor table uploads) and host synchronizations. In a
/// training loop's steady state only `launches` grows (on a distributed step gathering the
/// updated inverses only, also one synchronization and two uploads per step: the rule's
/// mask down, the gather's lists up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepTraffic {
    /// Kernel launches and graph launches.
    pub launches: u64,
    /// Graph captures (the first `run_graph`, and the first after a change of rows).
    pub captures: u64,
    /// Host-to-device copies: the factor table, when the inputs moved.
    pub uploads: u64,
    /// Host synchronizations (reading the history).
    pub syncs: u64,
}

/// A captured step: its launches address only the step's own buffers (the inputs are read
/// through the factor table, the damping from device memory), so it stays valid as long as
/// the step and its plan. It holds the functions it launches, and so their modules: a
/// kernel reload or a dropped device handle cannot unload code the graph still runs.
struct StepGraph {
    graph: CudaGraph,
    _functions: Vec<CudaFunction>,
    /// The kernels of the launches captured, in order: a step whose launches name other
    /// kernels (the accumulation switching between its block kernels and their tile-kernel
    /// fallback as the inputs change) captures anew.
    kernels: Vec<KernelId>,
}

// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised;
// the step only touches it through `&mut self`.
unsafe impl Send for StepGraph {}

// A step can move to another thread (a training loop's worker), graph and all.
const _: fn() = || {
    fn is_send<T: Send>() {}
    is_send::<DeviceThorStep>();
};

impl std::fmt::Debug for StepGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepGraph").finish_non_exhaustive()
    }
}

impl CudaDevice {
    /// Sets up the factor step for `layers` whose factors form `set`, factor `f` fed with
    /// `rows[f]` rows of `dtype` per step. Statistics and inverses start at the identity;
    /// a layer's first accepted statistics replace it.
    pub fn new_thor_step(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        layers: &[RuleLayer],
        cfg: StepConfig,
    ) -> Result<DeviceThorStep> {
        cfg.validate()?;
        // Each factor belongs to one layer at most: the rule writes a factor's state from
        // its layer's thread, and a layer's statistics step is one decision.
        RuleLayer::check_step_layers(set, layers)?;
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
        let partners_kept = partners.clone();
        let rule = self.new_trace_rule(set, layers, cfg.history.max(1))?;
        let (b, nb) = (set.block(), set.total_blocks());
        let mut eye = vec![0.0f32; set.buffer_len()];
        for k in 0..nb {
            for i in 0..b {
                eye[k * b * b + i * b + i] = 1.0;
            }
        }
        let (invert, _) = self.choose_invert_kernel(set.block(), nb)?;
        Ok(DeviceThorStep {
            cfg,
            dtype,
            partners: partners_kept,
            acc,
            invert,
            rule,
            stats: self.upload(&eye)?,
            inverses: self.upload(&eye)?,
            block_traces: self.zeros(nb)?,
            factor_traces: self.zeros(set.len())?,
            status: self.zeros(set.len())?,
            mask: self.zeros(nb)?,
            // Before the first step every layer reads as skipped, as on the CPU.
            decisions: self.upload(&vec![crate::rule::Decision::Skipped.code(); layers.len()])?,
            info: self.zeros(nb)?,
            damping_used: self.zeros(nb)?,
            damping_at: self.zeros(1)?,
            block_damping: self.zeros(nb)?,
            factor_state: self.zeros(set.len())?,
            counters: self.zeros(6 * layers.len())?,
            bound: Vec::new(),
            capture_stream: None,
            graph: None,
            traffic: StepTraffic::default(),
            dist: None,
        })
    }

    /// [`CudaDevice::new_thor_step`] for one rank of a data-parallel group ([`crate::dist`]
    /// on the device): every rank calls it with the same set, layers and configuration, and
    /// its own `rows` (local batches may differ) and communicator (`comm.rank()` of
    /// `comm.world()`). Each block is owned by one rank ([`OwnershipPlan::new`]); see
    /// [`crate::cuda::dist`] for the step's launches and collectives.
    ///
    /// A distributed step runs eagerly ([`DeviceThorStep::run_graph`] queues the same
    /// launches and collectives, without a graph) and counts
    /// [`DeviceThorStep::DIST_LAUNCHES`] launches per step. Its statistics are whole on a
    /// rank only after [`DeviceThorStep::gather_statistics`].
    #[allow(clippy::too_many_arguments)]
    pub fn new_distributed_thor_step(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        layers: &[RuleLayer],
        cfg: StepConfig,
        comm: Box<dyn DeviceCommunicator>,
    ) -> Result<DeviceThorStep> {
        let (rank, world) = (comm.rank(), comm.world());
        if world == 0 || rank >= world {
            return Err(Error::invalid(
                "comm",
                format!("rank {rank} of a world of {world}"),
            ));
        }
        let plan = OwnershipPlan::new(set, world)?;
        self.new_distributed_thor_step_with_plan(set, rows, dtype, layers, cfg, comm, plan)
    }

    /// [`CudaDevice::new_distributed_thor_step`] with the block ownership given (every rank
    /// must pass the same plan): an error when its world or block count does not match
    /// `comm` and `set`.
    #[allow(clippy::too_many_arguments)]
    pub fn new_distributed_thor_step_with_plan(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        layers: &[RuleLayer],
        cfg: StepConfig,
        comm: Box<dyn DeviceCommunicator>,
        plan: OwnershipPlan,
    ) -> Result<DeviceThorStep> {
        let (rank, world) = (comm.rank(), comm.world());
        if plan.world() != world || rank >= world {
            return Err(Error::shape(
                "plan",
                format!("a world of {world} ranks (the communicator's)"),
                plan.world(),
            ));
        }
        comm.check_device(self)?;
        let mut step = self.new_thor_step(set, rows, dtype, layers, cfg)?;
        let layout = DistLayout::new(set, &plan, rank, &step.partners)?;
        let nan = |n: usize| self.upload(&vec![f32::NAN; n]);
        step.dist = Some(Box::new(StepDist {
            local: nan(set.buffer_len())?,
            send: nan(layout.send_len())?,
            recv: nan(layout.recv_len())?,
            meta: self.upload(&vec![f64::NAN; layout.meta_len()])?,
            gather_send: nan(layout.gather_send_len())?,
            gather_recv: nan(layout.gather_recv_len())?,
            send_list: self.upload(layout.send_list())?,
            own_list: self.upload(layout.own_list())?,
            blocks_tab: self.upload(layout.blocks_table())?,
            factors_tab: self.upload(layout.factors_table())?,
            samples: self.zeros(set.len())?,
            own_mask: self.zeros(set.total_blocks())?,
            fault: self.zeros(1)?,
            upd_own: self.zeros(layout.per_rank())?,
            upd_all: self.zeros(layout.send_list().len())?,
            host_own: vec![0; layout.per_rank()],
            host_all: vec![0; layout.send_list().len()],
            host_mask: vec![0; set.total_blocks()],
            gather_blocks: layout.per_rank(),
            updated_only: false,
            comm,
            layout,
            broken: None,
            stats_whole: true,
        }));
        Ok(step)
    }
}

impl DeviceThorStep {
    /// Launches per factor step: accumulate (partial products, finalize, traces), trace
    /// rule, inversion, the counters' tally.
    pub const LAUNCHES: usize = 6;

    /// Launches per factor step of a distributed step: the step's, the accumulation's
    /// packing, the metadata, resolve, EMA, owned mask, the inverses' packing and unpacking
    /// ([`DistLayout::step_plans`]).
    pub const DIST_LAUNCHES: usize = DistLayout::LAUNCHES;

    /// The factor set.
    pub fn set(&self) -> &FactorSet {
        self.acc.plan().set()
    }

    /// The rows of each factor's input the step is planned for.
    pub fn rows(&self) -> &[usize] {
        self.acc.plan().rows()
    }

    /// Plans the accumulation for inputs of `rows[f]` rows from now on (the state stays;
    /// the captured graph and the factor table are dropped, so the next step uploads the
    /// table and, through [`DeviceThorStep::run_graph`], captures anew).
    pub fn set_rows(&mut self, dev: &CudaDevice, rows: &[usize]) -> Result<()> {
        if rows == self.rows() {
            return Ok(());
        }
        dev.check_same_context("step", &self.stats)?;
        let set = self.set().clone();
        let mut acc = dev.plan_accumulate(&set, rows, self.dtype, self.cfg.mode)?;
        acc.set_partners(&self.partners)?;
        self.acc = acc;
        self.bound.clear();
        self.graph = None;
        Ok(())
    }

    /// The step's state on the host (waits for queued work on `dev`'s stream).
    pub(crate) fn snapshot(&self, dev: &CudaDevice) -> Result<StepSnapshot> {
        dev.check_same_context("step", &self.stats)?;
        if let Some(why) = self.dist.as_ref().and_then(|d| d.broken.as_ref()) {
            return Err(Error::Communication(format!(
                "an earlier distributed step failed ({why}): its state is not saved"
            )));
        }
        if self.dist.as_ref().is_some_and(|d| !d.stats_whole) {
            return Err(Error::invalid(
                "gather_statistics",
                "a distributed step's statistics are spread over its ranks: gather them first",
            ));
        }
        let c = dev.download(&self.counters)?;
        Ok(StepSnapshot {
            stats: dev.download(&self.stats)?,
            inverses: dev.download(&self.inverses)?,
            factor_state: dev.download(&self.factor_state)?,
            rule: self.rule.download_state(dev)?,
            counters: counters_of(&c),
        })
    }

    /// Takes over a saved state (sizes checked first; queued on `dev`'s stream).
    pub(crate) fn restore(&mut self, dev: &CudaDevice, s: &StepSnapshot) -> Result<()> {
        s.check(
            self.set().buffer_len(),
            self.set().len(),
            self.rule.layers(),
        )?;
        dev.check_same_context("step", &self.stats)?;
        let st = dev.stream();
        st.memcpy_htod(&s.stats, &mut self.stats)?;
        st.memcpy_htod(&s.inverses, &mut self.inverses)?;
        st.memcpy_htod(&s.factor_state, &mut self.factor_state)?;
        let c: Vec<u64> = s.counters.iter().flat_map(|c| c.to_array()).collect();
        st.memcpy_htod(&c, &mut self.counters)?;
        // No step has run on the loaded state yet.
        let none = vec![crate::rule::Decision::Skipped.code(); self.rule.layers()];
        st.memcpy_htod(&none, &mut self.decisions)?;
        self.rule.upload_state(dev, &s.rule)?;
        // A saved state is whole: on a rank of a group, every block's statistics are now
        // this rank's (every rank loads the same state).
        if let Some(d) = &mut self.dist {
            d.stats_whole = true;
        }
        Ok(())
    }

    /// Checks `inputs` against the plan and hands their addresses and layouts to `f` while
    /// they are borrowed (cudarc's guards live until `f` has queued its work, so the stream
    /// events cover the kernels that read them).
    fn with_input_ptrs<E: DeviceElement, R>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[StepInput<'_, E>],
        damping: f32,
        f: impl FnOnce(&mut Self, &[(u64, InputLayout)]) -> Result<R>,
    ) -> Result<R> {
        self.check_views(dev, inputs, damping)?;
        let s: &CudaStream = dev.stream();
        let mut in_guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(inputs.len());
        let mut ptrs: Vec<(u64, InputLayout)> = Vec::with_capacity(inputs.len());
        for inp in inputs {
            let (p, g) = inp.x.device_ptr(s);
            in_guards.push(g);
            ptrs.push((p, inp.layout));
        }
        let r = f(self, &ptrs);
        drop(in_guards);
        r
    }

    /// Checks `inputs` and `damping` against the plan, before anything is queued.
    fn check_views<E: DeviceElement>(
        &self,
        dev: &CudaDevice,
        inputs: &[StepInput<'_, E>],
        damping: f32,
    ) -> Result<()> {
        check_damping(damping)?;
        let plan = self.acc.plan();
        if E::DTYPE != plan.dtype() {
            return Err(Error::invalid(
                "inputs",
                format!("planned for {:?} input, given {:?}", plan.dtype(), E::DTYPE),
            ));
        }
        check_len("inputs", plan.set().len(), inputs.len())?;
        dev.check_same_context("step", &self.stats)?;
        for (f, (inp, e)) in inputs.iter().zip(plan.set().entries()).enumerate() {
            dev.check_same_context("inputs", &inp.x)?;
            let need = check_input(f, &inp.layout, plan.rows()[f], e.layout.dim())?;
            if inp.x.len() < need {
                return Err(Error::shape(
                    "inputs",
                    format!("factor {f}: at least {need} elements"),
                    inp.x.len(),
                ));
            }
        }
        Ok(())
    }

    /// [`DeviceThorStep::with_launches`] on raw input addresses (checked against the plan
    /// by the caller: the elements their layouts read, of the planned type, of `dev`'s
    /// context, valid until the queued work completes).
    ///
    /// With `dist` (the step's distributed part, taken out of it), the launches are those
    /// of a distributed step ([`DeviceThorStep::DIST_LAUNCHES`], in
    /// [`StepDist`]'s order): the accumulation's raw products to its own buffer, the
    /// inversion of owned blocks, the kernels between the collectives.
    fn with_raw_launches<R>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(u64, InputLayout)],
        damping: f32,
        mut dist: Option<&mut StepDist>,
        f: impl FnOnce(&[LaunchPlan]) -> Result<R>,
    ) -> Result<R> {
        let s: &CudaStream = dev.stream();
        let mut guards: Vec<SyncOnDrop<'_>> = Vec::with_capacity(20);
        // The bound addresses are updated in place: a steady-state step compares, it does
        // not rebuild.
        let mut moved = self.bound.len() != inputs.len();
        self.bound
            .resize(inputs.len(), (0, InputLayout::matrix(0, 0)));
        for (&(p, layout), bound) in inputs.iter().zip(&mut self.bound) {
            if *bound != (p, layout) {
                *bound = (p, layout);
                moved = true;
            }
        }
        if moved {
            let rows = self.acc.plan().rows();
            let table: Vec<FactorInput> = self
                .bound
                .iter()
                .zip(rows)
                .map(|(&(x, layout), _)| FactorInput {
                    x,
                    layout,
                    // A rank of a group accumulates raw products; the EMA follows the sum.
                    alpha: if dist.is_some() {
                        1.0
                    } else {
                        (1.0 - self.cfg.stat_decay) / layout.samples() as f32
                    },
                    beta: if dist.is_some() {
                        0.0
                    } else {
                        self.cfg.stat_decay
                    },
                })
                .collect();
            let mut uploaded = self.acc.set_factor_table(dev, &table);
            if let (Ok(()), Some(d)) = (&uploaded, dist.as_deref_mut()) {
                let samples: Vec<f64> =
                    self.bound.iter().map(|(_, l)| l.samples() as f64).collect();
                uploaded = dev
                    .stream()
                    .memcpy_htod(&samples, &mut d.samples)
                    .map_err(Error::from);
            }
            if let Err(e) = uploaded {
                // Nothing valid is on the device: the next call must upload again.
                self.bound.clear();
                return Err(e);
            }
            self.traffic.uploads += 1;
        }
        let (b, nb) = (self.set().block(), self.set().total_blocks());
        let (bp, g) = self.stats.device_ptr_mut(s);
        guards.push(g);
        let (ip, g) = self.inverses.device_ptr_mut(s);
        guards.push(g);
        let (btp, g) = self.block_traces.device_ptr_mut(s);
        guards.push(g);
        let (ftp, g) = self.factor_traces.device_ptr_mut(s);
        guards.push(g);
        let (stp, g) = self.status.device_ptr_mut(s);
        guards.push(g);
        let (mp, g) = self.mask.device_ptr_mut(s);
        guards.push(g);
        let (dp, g) = self.decisions.device_ptr_mut(s);
        guards.push(g);
        let (infp, g) = self.info.device_ptr_mut(s);
        guards.push(g);
        let (up, g) = self.damping_used.device_ptr_mut(s);
        guards.push(g);
        let (dap, g) = self.damping_at.device_ptr_mut(s);
        guards.push(g);
        let (bdp, g) = self.block_damping.device_ptr_mut(s);
        guards.push(g);
        // The damping goes to the device ahead of the step's launches (or graph): a memset
        // on the stream, not a host copy.
        // SAFETY: `damping_at` holds one f32 of this context, guarded until queued.
        unsafe {
            cudarc::driver::sys::cuMemsetD32Async(dap, damping.to_bits(), 1, s.cu_stream())
                .result()?;
        }
        let (fsp, g) = self.factor_state.device_ptr_mut(s);
        guards.push(g);
        let (cp, g) = self.counters.device_ptr_mut(s);
        guards.push(g);
        // A rank of a group: its buffers' addresses (the rest filled in below).
        let mut dbuf = None;
        if let Some(d) = dist {
            let (local, g1) = d.local.device_ptr_mut(s);
            let (send, g2) = d.send.device_ptr_mut(s);
            let (recv, g3) = d.recv.device_ptr_mut(s);
            let (gather_send, g4) = d.gather_send.device_ptr_mut(s);
            let (gather_recv, g5) = d.gather_recv.device_ptr_mut(s);
            guards.extend([g1, g2, g3, g4, g5]);
            let (meta, g) = d.meta.device_ptr_mut(s);
            guards.push(g);
            let (send_list, g1) = d.send_list.device_ptr(s);
            let (own_list, g2) = d.own_list.device_ptr(s);
            // The inverses' all-gather: every owned block, or this step's updated ones.
            let (gather_all, gather_own) = if d.updated_only {
                let (all, ga) = d.upd_all.device_ptr(s);
                let (own, go) = d.upd_own.device_ptr(s);
                guards.extend([ga, go]);
                (all, own)
            } else {
                (send_list, own_list)
            };
            let (blocks_tab, g3) = d.blocks_tab.device_ptr(s);
            let (factors_tab, g4) = d.factors_tab.device_ptr(s);
            let (fault, g5) = d.fault.device_ptr_mut(s);
            guards.extend([g1, g2, g3, g4, g5]);
            let (samples, g) = d.samples.device_ptr_mut(s);
            guards.push(g);
            let (own_mask, g) = d.own_mask.device_ptr_mut(s);
            guards.push(g);
            let buf = DistBuffers {
                local,
                send,
                recv,
                meta,
                gather_send,
                gather_recv,
                send_list,
                own_list,
                gather_own,
                gather_all,
                blocks_tab,
                factors_tab,
                samples,
                own_mask,
                fault,
                ..DistBuffers::default()
            };
            dbuf = Some((buf, &d.layout, d.gather_blocks.max(1)));
        }
        // A rank of a group: raw products to its own buffer, every factor accumulated (the
        // resolve marks the frozen ones after the all-reduce).
        let (acc_out, acc_state) = match &dbuf {
            Some((b, _, _)) => (b.local, 0),
            None => (bp, fsp),
        };
        let (mut plans, g) = self
            .acc
            .bound_launches(s, acc_out, btp, ftp, stp, acc_state)?;
        guards.extend(g);
        let tally = RuleTally {
            factor_state: fsp,
            counters: cp,
            info: infp,
            damping_at: dap,
            block_damping: bdp,
        };
        let (rule, tally, g, step_counter) = self.rule.plan(
            s,
            ftp,
            stp,
            damping,
            self.cfg.thresholds,
            mp,
            dp,
            Some(tally),
        )?;
        guards.extend(g);
        let own_mask = dbuf.as_ref().map_or(mp, |(b, _, _)| b.own_mask);
        plans.push(rule);
        plans.push(raw::plan_invert_chol_f32_with(
            bp,
            ip,
            &InvertArgs {
                b,
                blocks: nb,
                // Per block, as the rule wrote it from `damping_at`.
                damping: bdp,
                damping_all: 0.0,
                mask: own_mask,
                policy: self.cfg.policy,
                info: infp,
                damping_used: up,
            },
            self.invert,
        )?);
        plans.extend(tally);
        debug_assert_eq!(plans.len(), Self::LAUNCHES);
        if let Some((part, l, gathered)) = dbuf {
            let buf = DistBuffers {
                stats: bp,
                inverses: ip,
                info: infp,
                status: stp,
                factor_state: fsp,
                mask: mp,
                block_traces: btp,
                factor_traces: ftp,
                damping_at: dap,
                step: step_counter,
                ..part
            };
            plans = l.step_plans(&buf, self.cfg.stat_decay, plans, gathered)?;
        }
        let r = f(&plans);
        drop(guards);
        r
    }

    /// Queues one factor step on `inputs` (`inputs[f]` feeds factor `f`) with damping
    /// `damping` (`sqrt(damping)` is added to every factor before inversion, and enters the
    /// layer traces of the rule): [`DeviceThorStep::LAUNCHES`] launches, no synchronization.
    ///
    /// On a distributed step ([`CudaDevice::new_distributed_thor_step`]) every rank of the
    /// group calls it with its own inputs: [`DeviceThorStep::DIST_LAUNCHES`] launches and
    /// three collectives.
    pub fn run<E: DeviceElement>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[StepInput<'_, E>],
        damping: f32,
    ) -> Result<()> {
        if self.dist.is_some() {
            return self.with_input_ptrs(dev, inputs, damping, |st, ptrs| {
                st.dist_step(dev, ptrs, damping)
            });
        }
        self.run_launches(dev, inputs, damping, 0..Self::LAUNCHES)
    }

    /// [`DeviceThorStep::run`] on raw device addresses of f32 inputs (`inputs[f]` = address
    /// and layout of factor `f`'s X): for the C ABI, whose callers hand over device
    /// pointers.
    ///
    /// # Safety
    /// Each address must point to the f32 its layout reads ([`InputLayout::check`]) of
    /// `dev`'s context (rows as planned), valid and not written by other work until the
    /// step completes.
    pub unsafe fn run_raw(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(u64, InputLayout)],
        damping: f32,
    ) -> Result<()> {
        check_damping(damping)?;
        let plan = self.acc.plan();
        if plan.dtype() != DType::F32 {
            return Err(Error::invalid(
                "inputs",
                format!("planned for {:?} input, given f32", plan.dtype()),
            ));
        }
        check_len("inputs", plan.set().len(), inputs.len())?;
        dev.check_same_context("step", &self.stats)?;
        for (f, (&(p, layout), e)) in inputs.iter().zip(plan.set().entries()).enumerate() {
            check_input(f, &layout, plan.rows()[f], e.layout.dim())?;
            if p == 0 || p % 4 != 0 {
                return Err(Error::invalid(
                    "inputs",
                    format!("factor {f}: null or misaligned address {p:#x}"),
                ));
            }
        }
        if self.dist.is_some() {
            return self.dist_step(dev, inputs, damping);
        }
        self.graph_step(dev, inputs, damping)
    }

    /// One step of a distributed step on checked raw inputs: the launches of each of
    /// [`StepDist::PHASES`], each followed by its collective. A failure once the first
    /// collective may have started leaves this rank out of step with its group: the step
    /// then refuses to run, and the communicator is told.
    fn dist_step(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(u64, InputLayout)],
        damping: f32,
    ) -> Result<()> {
        self.with_dist(|st, d| {
            if let Some(why) = &d.broken {
                return Err(Error::Communication(format!(
                    "an earlier distributed step failed ({why})"
                )));
            }
            d.comm.check_device(dev)?;
            // From here on the other ranks go into the collectives: any failure leaves this
            // rank out of step with them, and its statistics are no longer whole.
            d.stats_whole &= d.comm.world() == 1;
            let out = st.dist_phases(dev, inputs, damping, d);
            if let Err(e) = &out {
                d.broken = Some(e.to_string());
                d.comm.abort(&format!("rank {}: {e}", d.comm.rank()));
            }
            out
        })
    }

    /// Runs `f` on the step and its distributed part, taken out for the call and put back
    /// afterwards, also when `f` panics: the part is then marked broken (its collectives
    /// may be half done) and the group aborted before the panic goes on, so that the step
    /// never runs again as if it were a single-device one, nor as a whole rank.
    fn with_dist<T>(&mut self, f: impl FnOnce(&mut Self, &mut StepDist) -> Result<T>) -> Result<T> {
        let mut d = self
            .dist
            .take()
            .ok_or_else(|| Error::invalid("step", "not a distributed step"))?;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(self, &mut d)));
        if out.is_err() {
            d.broken = Some("a panic inside a distributed step".into());
            d.stats_whole = false;
            d.comm
                .abort(&format!("rank {}: a panic inside a step", d.comm.rank()));
        }
        self.dist = Some(d);
        out.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }

    /// The launches and collectives of [`DeviceThorStep::dist_step`].
    fn dist_phases(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(u64, InputLayout)],
        damping: f32,
        d: &mut StepDist,
    ) -> Result<()> {
        use DistLayout as P;
        let launch = |st: &mut Self, d: &mut StepDist, range: std::ops::Range<usize>| {
            let n = range.len() as u64;
            st.with_raw_launches(dev, inputs, damping, Some(d), |plans| {
                for p in &plans[range] {
                    // SAFETY: the plans address the step's buffers and the inputs, checked
                    // by the callers and borrowed until the launches are queued.
                    unsafe { raw::launch(dev, p) }?;
                }
                Ok(())
            })?;
            st.traffic.launches += n;
            Ok::<(), Error>(())
        };
        d.gather_blocks = d.layout.per_rank();
        launch(self, d, 0..P::PACK_SUMS + 1)?;
        d.comm
            .reduce_scatter(dev, &d.send.as_view(), &mut d.recv.as_view_mut())?;
        launch(self, d, P::META..P::META + 1)?;
        d.comm.all_reduce(dev, &mut d.meta.as_view_mut())?;
        if d.updated_only {
            launch(self, d, P::META + 1..P::RULE + 1)?;
            // The rule's mask (the same on every rank) says which inverses to gather.
            dev.download_into(&self.mask, &mut d.host_mask)?;
            self.traffic.syncs += 1;
            d.gather_blocks =
                d.layout
                    .updated_lists(&d.host_mask, &mut d.host_own, &mut d.host_all)?;
            let s = dev.stream();
            s.memcpy_htod(&d.host_own, &mut d.upd_own)?;
            s.memcpy_htod(&d.host_all, &mut d.upd_all)?;
            self.traffic.uploads += 2;
            if d.gather_blocks == 0 {
                // No layer updated (every rank knows): the inversion masks every block out
                // (its info words say so, as in every step), no all-gather.
                launch(self, d, P::RULE + 1..P::PACK_INVERSES)?;
                return launch(self, d, P::UNPACK + 1..P::LAUNCHES);
            }
            launch(self, d, P::RULE + 1..P::PACK_INVERSES + 1)?;
        } else {
            launch(self, d, P::META + 1..P::PACK_INVERSES + 1)?;
        }
        let n = d.layout.gather_len(d.gather_blocks);
        d.comm.all_gather(
            dev,
            &d.gather_send.slice(0..n),
            &mut d.gather_recv.slice_mut(0..n * d.comm.world()),
        )?;
        launch(self, d, P::UNPACK..P::LAUNCHES)
    }

    /// On a distributed step, whether the all-gather of the inverses carries only the
    /// blocks the rule updated (`true`: the step waits once for the rule's mask, a few
    /// bytes, and sends (world - 1) / world of the updated inverses, nothing when no layer
    /// updated) or every owned block (`false`, the default: no host synchronization in the
    /// step, the all-gather's size fixed). Every rank must choose the same. An error on a
    /// single-device step.
    pub fn set_gather_updated_only(&mut self, updated_only: bool) -> Result<()> {
        match &mut self.dist {
            Some(d) => {
                d.updated_only = updated_only;
                Ok(())
            }
            None => Err(Error::invalid("updated_only", "not a distributed step")),
        }
    }

    /// On a distributed step, every rank's statistics to every rank (an all-gather of the
    /// owned blocks): afterwards [`DeviceThorStep::stats`] holds the whole state on every
    /// rank, as the step's save needs. Every rank of the group calls it. A no-op on a
    /// single-device step.
    pub fn gather_statistics(&mut self, dev: &CudaDevice) -> Result<()> {
        if self.dist.is_none() {
            return Ok(());
        }
        self.with_dist(|st, d| {
            let out = st.gather_statistics_of(dev, d);
            if let Err(e) = &out {
                d.broken.get_or_insert_with(|| e.to_string());
                d.comm.abort(&format!("rank {}: {e}", d.comm.rank()));
            }
            out
        })
    }

    fn gather_statistics_of(&mut self, dev: &CudaDevice, d: &mut StepDist) -> Result<()> {
        if let Some(why) = &d.broken {
            return Err(Error::Communication(format!(
                "an earlier distributed step failed ({why})"
            )));
        }
        dev.check_same_context("step", &self.stats)?;
        let s: &CudaStream = dev.stream();
        let buffers = |st: &mut CudaSlice<f32>, d: &mut StepDist, pack: bool| -> Result<()> {
            let (stats, g1) = st.device_ptr_mut(s);
            let (own_list, g2) = d.own_list.device_ptr(s);
            let (send_list, g3) = d.send_list.device_ptr(s);
            let (gather_send, g4) = d.gather_send.device_ptr_mut(s);
            let (gather_recv, g5) = d.gather_recv.device_ptr_mut(s);
            let buf = DistBuffers {
                stats,
                own_list,
                send_list,
                gather_send,
                gather_recv,
                ..DistBuffers::default()
            };
            let plan = if pack {
                d.layout.plan_pack_statistics(&buf)?
            } else {
                d.layout.plan_unpack_statistics(&buf)?
            };
            // SAFETY: the plan addresses the step's own buffers, guarded until queued.
            unsafe { raw::launch(dev, &plan) }?;
            drop((g1, g2, g3, g4, g5));
            Ok(())
        };
        buffers(&mut self.stats, d, true)?;
        d.comm.all_gather(
            dev,
            &d.gather_send.as_view(),
            &mut d.gather_recv.as_view_mut(),
        )?;
        buffers(&mut self.stats, d, false)?;
        self.traffic.launches += 2;
        d.stats_whole = true;
        Ok(())
    }

    /// On a distributed step, an error when the ranks disagreed on the damping or the
    /// steps run (every layer was then skipped, on every rank) or a step failed; waits for
    /// the queued work. `Ok` on a single-device step.
    pub fn check_group(&mut self, dev: &CudaDevice) -> Result<()> {
        if self.dist.is_some() {
            self.traffic.syncs += 1;
        }
        let out = self.read_group_fault(dev);
        if let (Err(e), Some(d)) = (&out, self.dist.as_mut()) {
            // As on the CPU: the group is broken (here after a step that skipped every
            // layer on every rank).
            if d.broken.is_none() {
                d.broken = Some(e.to_string());
                d.comm.abort(&e.to_string());
            }
        }
        out
    }

    /// [`DeviceThorStep::check_group`] without marking the step (for readers that hold it
    /// shared): the error, if any, and a wait for the queued work.
    pub(crate) fn read_group_fault(&self, dev: &CudaDevice) -> Result<()> {
        let Some(d) = &self.dist else {
            return Ok(());
        };
        if let Some(why) = &d.broken {
            return Err(Error::Communication(format!(
                "an earlier distributed step failed ({why})"
            )));
        }
        if dev.download(&d.fault)?[0] != 0 {
            return Err(Error::Communication(
                "the ranks disagree on the damping or on the steps run: every layer was skipped"
                    .into(),
            ));
        }
        Ok(())
    }

    /// On a distributed step, the blocks this rank owns (`None` on a single device).
    pub fn owned_blocks(&self) -> Option<usize> {
        let d = self.dist.as_ref()?;
        Some(d.layout.own_list().iter().filter(|&&k| k >= 0).count())
    }

    /// On a distributed step, its communicator's counters (`None` on a single device).
    pub fn comm_counters(&self) -> Option<crate::dist::CommCounters> {
        self.dist.as_ref().map(|d| d.comm.counters())
    }

    /// The last step's decision per layer (waits for queued work on `dev`'s stream).
    pub fn decisions_now(&mut self, dev: &CudaDevice) -> Result<Vec<crate::rule::Decision>> {
        self.traffic.syncs += 1;
        self.read_decisions(dev)
    }

    /// [`DeviceThorStep::decisions_now`] without counting the synchronization.
    pub(crate) fn read_decisions(&self, dev: &CudaDevice) -> Result<Vec<crate::rule::Decision>> {
        dev.check_same_context("step", &self.decisions)?;
        dev.download(&self.decisions)?
            .into_iter()
            .map(super::rule::decision_of)
            .collect()
    }

    /// Queues only the launches `range` of the step (0..3 accumulate, 3 the trace rule, 4
    /// the inversion, 5 the counters), for timing a stage alone; [`DeviceThorStep::run`]
    /// queues them all.
    pub fn run_launches<E: DeviceElement>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[StepInput<'_, E>],
        damping: f32,
        range: std::ops::Range<usize>,
    ) -> Result<()> {
        if range.start > range.end || range.end > Self::LAUNCHES {
            return Err(Error::invalid(
                "range",
                format!("{range:?} is not inside 0..{}", Self::LAUNCHES),
            ));
        }
        if self.dist.is_some() {
            return Err(Error::invalid(
                "range",
                "a distributed step runs whole: call run",
            ));
        }
        let n = range.len() as u64;
        self.with_input_ptrs(dev, inputs, damping, |st, ptrs| {
            st.with_raw_launches(dev, ptrs, damping, None, |plans| {
                for p in &plans[range] {
                    // SAFETY: the plans address the step's buffers and `inputs`, all
                    // checked against the plan and borrowed until the launches are queued.
                    unsafe { raw::launch(dev, p) }?;
                }
                Ok(())
            })
        })?;
        self.traffic.launches += n;
        Ok(())
    }

    /// [`DeviceThorStep::run`] through a CUDA graph: the first call captures the step's
    /// launches and keeps the graph in the step; later calls replay it, one launch of the
    /// graph instead of [`DeviceThorStep::LAUNCHES`]. Inputs may move between calls (their
    /// addresses are read through the factor table) and the damping may change (it is read
    /// from device memory, set by a memset before each step): neither is baked in. A change
    /// of rows ([`DeviceThorStep::set_rows`]) drops the graph.
    pub fn run_graph<E: DeviceElement>(
        &mut self,
        dev: &CudaDevice,
        inputs: &[StepInput<'_, E>],
        damping: f32,
    ) -> Result<()> {
        if self.dist.is_some() {
            return self.run(dev, inputs, damping);
        }
        self.with_input_ptrs(dev, inputs, damping, |st, ptrs| {
            st.graph_step(dev, ptrs, damping)
        })
    }

    /// One step through the step's graph (captured on first use) on checked raw inputs.
    fn graph_step(
        &mut self,
        dev: &CudaDevice,
        inputs: &[(u64, InputLayout)],
        damping: f32,
    ) -> Result<()> {
        // The damping is read from device memory: one capture serves every damping.
        let cached = self.graph.take();
        let mut captures = 0u64;
        let capture_stream = match &self.capture_stream {
            Some(s) => s.clone(),
            None => {
                let s = self.stats.context().new_stream()?;
                self.capture_stream = Some(s.clone());
                s
            }
        };
        let graph = self.with_raw_launches(dev, inputs, damping, None, |plans| {
            let kernels: Vec<KernelId> = plans.iter().map(|p| p.kernel).collect();
            let graph = match cached {
                Some(g) if g.kernels == kernels => g,
                _ => {
                    captures = 1;
                    let (graph, functions) = capture(dev, &capture_stream, plans)?;
                    StepGraph {
                        graph,
                        _functions: functions,
                        kernels,
                    }
                }
            };
            // On the caller's stream (not the capture stream the graph remembers), after the
            // factor table upload and the damping's memset, within the buffers' guards.
            // SAFETY: the exec is alive (owned by `graph`), the stream is the device's, and
            // both belong to the step's context (checked by the callers).
            unsafe {
                cudarc::driver::result::graph::launch(
                    graph.graph.cu_graph_exec(),
                    dev.stream().cu_stream(),
                )
            }?;
            Ok(graph)
        })?;
        self.graph = Some(graph);
        self.traffic.launches += 1;
        self.traffic.captures += captures;
        Ok(())
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

    /// Per layer: the last decision's [`Decision::code`](crate::rule::Decision::code).
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

    /// Each layer's counters, as [`crate::thor::Thor::counters`] keeps them (waits for
    /// queued work on `dev`'s stream).
    pub fn counters(&mut self, dev: &CudaDevice) -> Result<Vec<crate::thor::LayerCounters>> {
        dev.check_same_context("step", &self.counters)?;
        self.traffic.syncs += 1;
        self.read_counters(dev)
    }

    /// [`DeviceThorStep::counters`] without counting the synchronization.
    pub(crate) fn read_counters(
        &self,
        dev: &CudaDevice,
    ) -> Result<Vec<crate::thor::LayerCounters>> {
        dev.check_same_context("step", &self.counters)?;
        Ok(counters_of(&dev.download(&self.counters)?))
    }

    /// The rule's decision history (waits for queued work on `dev`'s stream).
    pub fn history(&mut self, dev: &CudaDevice) -> Result<(u64, Vec<Vec<crate::rule::Decision>>)> {
        self.traffic.syncs += 1;
        self.rule.history(dev)
    }

    /// What the step has queued so far (launches, captures, copies, synchronizations).
    pub fn traffic(&self) -> StepTraffic {
        self.traffic
    }
}

/// Captures `plans` on `stream` (the step's own capture stream, in the device's context) as
/// one instantiated graph, and returns it with the functions it launches. The plans carry
/// raw addresses only, so no cudarc stream event is recorded or waited on during the
/// capture; the caller holds the guards of every buffer across the capture and the graph's
/// launch.
fn capture(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    plans: &[LaunchPlan],
) -> Result<(CudaGraph, Vec<CudaFunction>)> {
    // Load every kernel (and its shared-memory opt-in) before capturing.
    let functions = plans
        .iter()
        .map(|p| dev.function_with_smem(p.kernel, p.smem as usize))
        .collect::<Result<Vec<_>>>()?;
    stream.begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let mut failed = None;
    for p in plans {
        // SAFETY: the caller holds every buffer the plans address until the graph's
        // launches are queued; capturing queues nothing yet; `stream` is of the device's
        // context.
        if let Err(e) = unsafe { raw::launch_on(dev, stream, p) } {
            failed = Some(e);
            break;
        }
    }
    let graph = stream.end_capture(CUgraphInstantiate_flags(0));
    if let Some(e) = failed {
        return Err(e);
    }
    let graph = graph?.ok_or_else(|| Error::Driver("stream capture produced no graph".into()))?;
    Ok((graph, functions))
}
