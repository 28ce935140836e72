//! THOR's factor step across ranks on the device ([`crate::dist`] on the GPU): the tables
//! and launches between the collectives, and the device-side collectives themselves.
//!
//! A distributed [`DeviceThorStep`](super::step::DeviceThorStep) runs, on every rank:
//!
//! 1. the accumulation of its local batch's raw products (alpha 1, beta 0) into a buffer
//!    of its own, then `dist_pack_f32`: every block as a packed lower triangle, rank by rank
//!    in the plan's order, each rank's segment padded to the most blocks any rank owns;
//! 2. a **reduce-scatter**: each rank receives the sums of the blocks it owns;
//! 3. `dist_meta_f32`: per factor a non-finite flag and the local samples, per owned block
//!    the traces of the old statistics and of the received sum, the damping and the step
//!    count; an **all-reduce** (f64) sums them;
//! 4. `dist_resolve_f32` (statuses and traces, the same on every rank), `dist_ema_f32` (the
//!    owned blocks' EMA), the trace rule, `dist_own_mask_f32` and the inversion of the
//!    updated blocks this rank owns, then `dist_pack_f32` of the owned inverses with their
//!    info words;
//! 5. an **all-gather**, then `dist_unpack_f32` writes the updated blocks' inverses on every
//!    rank, and the rule's tally counts them.
//!
//! Unlike the CPU step ([`crate::cpu::step::CpuThorStep::new_distributed`]), which sends
//! only what is needed, the device step's collectives have fixed sizes (the decisions live
//! on the device, and the host does not wait for them): frozen factors' blocks are sent in
//! the reduce-scatter and every owned inverse in the all-gather (the receivers keep only the
//! updated ones), so that the whole step is queued with no host synchronization.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaView, CudaViewMut};
use std::fmt;

use super::raw::{check_ptr, grid_u32, kernels, KernelArg, LaunchPlan};
use super::CudaDevice;
use crate::dist::{tri_len, CommCounters, Communicator, OwnershipPlan};
use crate::error::{check_len, Error, Result};
use crate::layout::FactorSet;

/// The tables of one rank's distributed device step, from the factor set, the block
/// ownership and the partners (A and G of a layer), with the launches between the
/// collectives on raw device buffers ([`DistBuffers`]).
#[derive(Debug, Clone, PartialEq)]
pub struct DistLayout {
    b: usize,
    nf: usize,
    nb: usize,
    rank: usize,
    world: usize,
    per: usize,
    blocks_tab: Vec<i32>,
    factors_tab: Vec<i32>,
    send_list: Vec<i32>,
    own_list: Vec<i32>,
    /// [`OwnershipPlan::fingerprint`], checked by every rank.
    plan_id: f64,
}

/// The device buffers of one rank's distributed step (raw addresses of the caller's
/// buffers, of the sizes [`DistLayout`] gives; see each launch for what it reads and writes).
#[derive(Debug, Clone, Copy, Default)]
pub struct DistBuffers {
    /// The local products, one `b x b` block per block of the set (f32).
    pub local: CUdeviceptr,
    /// [`DistLayout::send_len`] f32: the packed sums' segments, rank by rank.
    pub send: CUdeviceptr,
    /// [`DistLayout::recv_len`] f32: this rank's summed segment.
    pub recv: CUdeviceptr,
    /// [`DistLayout::meta_len`] f64.
    pub meta: CUdeviceptr,
    /// [`DistLayout::gather_send_len`] f32: the owned inverses with their info words.
    pub gather_send: CUdeviceptr,
    /// [`DistLayout::gather_recv_len`] f32: every rank's `gather_send`.
    pub gather_recv: CUdeviceptr,
    /// [`DistLayout::send_list`] on the device (i32).
    pub send_list: CUdeviceptr,
    /// [`DistLayout::own_list`] on the device (i32).
    pub own_list: CUdeviceptr,
    /// The blocks whose inverses this rank packs for the all-gather (i32):
    /// [`DistLayout::own_list`], or the `own` of [`DistLayout::updated_lists`].
    pub gather_own: CUdeviceptr,
    /// Every rank's blocks in the all-gather of the inverses, rank by rank (i32):
    /// [`DistLayout::send_list`], or the `all` of [`DistLayout::updated_lists`].
    pub gather_all: CUdeviceptr,
    /// [`DistLayout::blocks_table`] on the device (i32).
    pub blocks_tab: CUdeviceptr,
    /// [`DistLayout::factors_table`] on the device (i32).
    pub factors_tab: CUdeviceptr,
    /// One f64 per factor: the samples of this rank's local input.
    pub samples: CUdeviceptr,
    /// One byte per block: the inversion's mask (the rule's, on owned blocks).
    pub own_mask: CUdeviceptr,
    /// One i32, set to 1 when the ranks disagree on the damping or the step count.
    pub fault: CUdeviceptr,
    /// The step's statistics (f32 blocks).
    pub stats: CUdeviceptr,
    /// The step's inverses (f32 blocks).
    pub inverses: CUdeviceptr,
    /// One i32 per block: the inversion's info words.
    pub info: CUdeviceptr,
    /// One i32 per factor: the statuses (accumulation's, then resolved).
    pub status: CUdeviceptr,
    /// One byte per factor: the rule's factor state.
    pub factor_state: CUdeviceptr,
    /// One byte per block: the rule's mask.
    pub mask: CUdeviceptr,
    /// One f32 per block.
    pub block_traces: CUdeviceptr,
    /// One f32 per factor.
    pub factor_traces: CUdeviceptr,
    /// One f32: the step's damping.
    pub damping_at: CUdeviceptr,
    /// One u64: the rule's step counter (the steps run so far).
    pub step: CUdeviceptr,
}

impl DistLayout {
    /// Launches of a distributed step ([`DistLayout::step_plans`]).
    pub const LAUNCHES: usize = 13;
    /// Position of the local products' packing: the reduce-scatter follows it.
    pub const PACK_SUMS: usize = 3;
    /// Position of the metadata: the all-reduce follows it.
    pub const META: usize = 4;
    /// Position of the trace rule: the updated-only gather reads the mask after it.
    pub const RULE: usize = 7;
    /// Position of the inverses' packing: the all-gather follows it.
    pub const PACK_INVERSES: usize = 10;
    /// Position of the inverses' unpacking.
    pub const UNPACK: usize = 11;

    /// A distributed step's launches in order, from the single-device step's six
    /// (`step`: the accumulation's three, writing raw products to `buf.local` without the
    /// factor state; the rule; the inversion masked by `buf.own_mask`; the tally) and the
    /// kernels between the collectives, the inverses' all-gather of `gathered` blocks per
    /// rank: accumulation (0..3), [`Self::PACK_SUMS`], [`Self::META`], resolve, EMA,
    /// [`Self::RULE`], owned mask, inversion, [`Self::PACK_INVERSES`], [`Self::UNPACK`],
    /// tally.
    pub fn step_plans(
        &self,
        buf: &DistBuffers,
        decay: f32,
        step: Vec<LaunchPlan>,
        gathered: usize,
    ) -> Result<Vec<LaunchPlan>> {
        let [acc0, acc1, acc2, rule, invert, tally] = <[LaunchPlan; 6]>::try_from(step)
            .map_err(|_| Error::invalid("step", "not the step's six launches"))?;
        Ok(vec![
            acc0,
            acc1,
            acc2,
            self.plan_pack_sums(buf)?,
            self.plan_meta(buf)?,
            self.plan_resolve(buf, decay)?,
            self.plan_ema(buf, decay)?,
            rule,
            self.plan_own_mask(buf)?,
            invert,
            self.plan_pack_inverses(buf, gathered)?,
            self.plan_unpack_inverses(buf, gathered)?,
            tally,
        ])
    }

    /// The layout of rank `rank` of `plan.world()` for `set`, with `partners[f]` the other
    /// factor of `f`'s layer. Errors when the plan is not `set`'s, `rank` is out of range or
    /// a size does not fit the kernels' `int` arithmetic.
    pub fn new(
        set: &FactorSet,
        plan: &OwnershipPlan,
        rank: usize,
        partners: &[Option<usize>],
    ) -> Result<Self> {
        let (b, nf, nb, world) = (set.block(), set.len(), set.total_blocks(), plan.world());
        check_len("plan", nb, plan.order().len())?;
        check_len("partners", nf, partners.len())?;
        if rank >= world {
            return Err(Error::invalid(
                "rank",
                format!("{rank} is not below the world size {world}"),
            ));
        }
        let per = (0..world)
            .map(|r| plan.owned(r).len())
            .max()
            .unwrap_or(0)
            .max(1);
        let int = |what: &'static str, n: Option<usize>| -> Result<i32> {
            n.and_then(|n| i32::try_from(n).ok())
                .ok_or_else(|| Error::invalid(what, "too large for the kernels' 32-bit indices"))
        };
        int("set", world.checked_mul(per))?;
        int("set", per.checked_mul(tri_len(b) + 1))?;
        // The kernels index the tables and the metadata in `int`.
        int("set", nb.checked_mul(4))?;
        int("set", nf.checked_mul(3))?;
        int("set", nb.checked_add(nf).and_then(|n| n.checked_mul(2)))?;
        let mut blocks_tab = vec![0i32; 4 * nb];
        for (f, e) in set.entries().iter().enumerate() {
            for j in 0..e.layout.blocks() {
                let k = e.first_block + j;
                blocks_tab[4 * k] = f as i32;
                blocks_tab[4 * k + 1] = e.layout.valid(j) as i32;
            }
        }
        let mut send_list = vec![-1i32; world * per];
        for r in 0..world {
            for (i, &k) in plan.owned(r).iter().enumerate() {
                send_list[r * per + i] = k as i32;
                blocks_tab[4 * k + 2] = r as i32;
                blocks_tab[4 * k + 3] = i as i32;
            }
        }
        let mut factors_tab = Vec::with_capacity(3 * nf);
        for (e, p) in set.entries().iter().zip(partners) {
            let partner = match *p {
                Some(q) if q < nf => q as i32,
                Some(q) => {
                    return Err(Error::invalid(
                        "partners",
                        format!("factor {q} is not in the set of {nf}"),
                    ))
                }
                None => -1,
            };
            factors_tab.extend([e.first_block as i32, e.layout.blocks() as i32, partner]);
        }
        let own_list = send_list[rank * per..(rank + 1) * per].to_vec();
        Ok(DistLayout {
            plan_id: plan.fingerprint() as f64,
            b,
            nf,
            nb,
            rank,
            world,
            per,
            blocks_tab,
            factors_tab,
            send_list,
            own_list,
        })
    }

    /// The most blocks any rank owns: every rank's segment in the collectives holds this
    /// many (padded).
    pub fn per_rank(&self) -> usize {
        self.per
    }

    /// Elements of the reduce-scatter's send buffer: `world` segments of
    /// [`DistLayout::recv_len`].
    pub fn send_len(&self) -> usize {
        self.world * self.recv_len()
    }

    /// Elements of one rank's segment of the reduce-scatter.
    pub fn recv_len(&self) -> usize {
        self.per * tri_len(self.b)
    }

    /// Elements of the all-reduced metadata (f64).
    pub fn meta_len(&self) -> usize {
        2 * self.nf + 2 * self.nb + 3
    }

    /// Elements of one rank's segment of the all-gather (packed inverses and info words).
    pub fn gather_send_len(&self) -> usize {
        self.per * (tri_len(self.b) + 1)
    }

    /// Elements of the all-gather's receive buffer.
    pub fn gather_recv_len(&self) -> usize {
        self.world * self.gather_send_len()
    }

    /// The blocks of every rank's segment, rank by rank (`-1`: padding).
    pub fn send_list(&self) -> &[i32] {
        &self.send_list
    }

    /// The blocks this rank owns, padded to [`DistLayout::per_rank`] with `-1`.
    pub fn own_list(&self) -> &[i32] {
        &self.own_list
    }

    /// Per block: factor, valid rows, owner, position in the owner's list.
    pub fn blocks_table(&self) -> &[i32] {
        &self.blocks_tab
    }

    /// Per factor: first block, block count, partner (`-1`: none).
    pub fn factors_table(&self) -> &[i32] {
        &self.factors_tab
    }

    /// The packing of the local products for the reduce-scatter.
    pub fn plan_pack_sums(&self, buf: &DistBuffers) -> Result<LaunchPlan> {
        let blocks = self.world * self.per;
        pack(
            self.b,
            ("local", buf.local),
            buf.send_list,
            blocks,
            0,
            tri_len(self.b),
            buf.send,
        )
    }

    /// This rank's metadata for the all-reduce (reads the accumulation's statuses, the
    /// statistics of owned blocks and the received sums).
    pub fn plan_meta(&self, buf: &DistBuffers) -> Result<LaunchPlan> {
        use Arg::*;
        plan(
            kernels::DIST_META_F32,
            self.nb.div_ceil(256),
            &[
                P("status", buf.status, 4),
                P("samples", buf.samples, 8),
                I(self.nf),
                P("blocks_tab", buf.blocks_tab, 4),
                I(self.nb),
                I(self.rank),
                I(self.b),
                P("factor_state", buf.factor_state, 1),
                P("stats", buf.stats, 4),
                P("recv", buf.recv, 4),
                P("damping_at", buf.damping_at, 4),
                P("step", buf.step, 8),
                D(self.plan_id),
                P("meta", buf.meta, 8),
            ],
        )
    }

    /// Statuses, block and factor traces from the summed metadata (`decay`: the statistics'
    /// EMA decay).
    pub fn plan_resolve(&self, buf: &DistBuffers, decay: f32) -> Result<LaunchPlan> {
        check_decay(decay)?;
        use Arg::*;
        plan(
            kernels::DIST_RESOLVE_F32,
            1,
            &[
                P("meta", buf.meta, 8),
                I(self.nf),
                I(self.nb),
                P("factors_tab", buf.factors_tab, 4),
                P("blocks_tab", buf.blocks_tab, 4),
                I(self.b),
                P("factor_state", buf.factor_state, 1),
                F(decay),
                I(self.world),
                P("damping_at", buf.damping_at, 4),
                P("step", buf.step, 8),
                D(self.plan_id),
                P("status", buf.status, 4),
                P("block_traces", buf.block_traces, 4),
                P("factor_traces", buf.factor_traces, 4),
                P("fault", buf.fault, 4),
            ],
        )
    }

    /// The EMA of the owned blocks whose factor's status is 0, from the received sums.
    pub fn plan_ema(&self, buf: &DistBuffers, decay: f32) -> Result<LaunchPlan> {
        check_decay(decay)?;
        use Arg::*;
        plan(
            kernels::DIST_EMA_F32,
            self.per,
            &[
                P("recv", buf.recv, 4),
                P("own_list", buf.own_list, 4),
                P("blocks_tab", buf.blocks_tab, 4),
                P("status", buf.status, 4),
                P("factor_state", buf.factor_state, 1),
                P("meta", buf.meta, 8),
                I(self.nf),
                F(decay),
                I(self.b),
                P("stats", buf.stats, 4),
            ],
        )
    }

    /// The inversion's mask: the rule's on the blocks this rank owns.
    pub fn plan_own_mask(&self, buf: &DistBuffers) -> Result<LaunchPlan> {
        use Arg::*;
        plan(
            kernels::DIST_OWN_MASK_F32,
            self.nb.div_ceil(256),
            &[
                P("mask", buf.mask, 1),
                P("blocks_tab", buf.blocks_tab, 4),
                I(self.nb),
                I(self.rank),
                P("own_mask", buf.own_mask, 1),
            ],
        )
    }

    /// The inverses of the blocks of `buf.gather_own` (`blocks` of them: this rank's
    /// segment, [`DistLayout::own_list`] with [`DistLayout::per_rank`], or the updated ones
    /// of [`DistLayout::updated_lists`]) and their info words, packed for the all-gather.
    pub fn plan_pack_inverses(&self, buf: &DistBuffers, blocks: usize) -> Result<LaunchPlan> {
        check_ptr("info", buf.info, 4)?;
        self.check_segment(blocks)?;
        let stride = tri_len(self.b) + 1;
        let inverses = ("inverses", buf.inverses);
        pack(
            self.b,
            inverses,
            buf.gather_own,
            blocks,
            buf.info,
            stride,
            buf.gather_send,
        )
    }

    fn check_segment(&self, blocks: usize) -> Result<()> {
        if blocks == 0 || blocks > self.per {
            return Err(Error::invalid(
                "blocks",
                format!("{blocks} blocks per segment: 1 to {} here", self.per),
            ));
        }
        Ok(())
    }

    /// Elements of one rank's segment of an all-gather of `blocks` packed blocks with their
    /// info words ([`DistLayout::gather_send_len`] for [`DistLayout::per_rank`] blocks).
    pub fn gather_len(&self, blocks: usize) -> usize {
        blocks * (tri_len(self.b) + 1)
    }

    /// For an all-gather of the updated inverses only: from the rule's `mask` (one byte per
    /// block, the same on every rank), `own` (at least [`DistLayout::per_rank`] entries)
    /// receives the updated blocks this rank owns and `all` (at least `world` times that)
    /// every rank's, in segments of the returned count (the most any rank owns, 0 when no
    /// block updated), each padded with `-1`.
    pub fn updated_lists(&self, mask: &[u8], own: &mut [i32], all: &mut [i32]) -> Result<usize> {
        check_len("mask", self.nb, mask.len())?;
        crate::error::check_min_len("own", self.per, own.len())?;
        crate::error::check_min_len("all", self.world * self.per, all.len())?;
        let updated = |r: usize| {
            self.send_list[r * self.per..(r + 1) * self.per]
                .iter()
                .filter(|&&k| k >= 0 && mask[k as usize] != 0)
        };
        let n = (0..self.world)
            .map(|r| updated(r).count())
            .max()
            .unwrap_or(0);
        all.fill(-1);
        for r in 0..self.world {
            for (i, &k) in updated(r).enumerate() {
                all[r * n + i] = k;
            }
        }
        own.fill(-1);
        for (i, &k) in updated(self.rank).enumerate() {
            own[i] = k;
        }
        Ok(n)
    }

    /// The owned statistics, packed for the all-gather of
    /// [`DistLayout::plan_unpack_statistics`].
    pub fn plan_pack_statistics(&self, buf: &DistBuffers) -> Result<LaunchPlan> {
        let stride = tri_len(self.b) + 1;
        let stats = ("stats", buf.stats);
        pack(
            self.b,
            stats,
            buf.own_list,
            self.per,
            0,
            stride,
            buf.gather_send,
        )
    }

    /// Every rank's updated inverses (the rule's mask) and their info words, from the
    /// all-gather of segments of `blocks` blocks listed, rank by rank, in `buf.gather_all`
    /// ([`DistLayout::send_list`] with [`DistLayout::per_rank`], or the `all` of
    /// [`DistLayout::updated_lists`]).
    pub fn plan_unpack_inverses(&self, buf: &DistBuffers, blocks: usize) -> Result<LaunchPlan> {
        check_ptr("mask", buf.mask, 1)?;
        check_ptr("info", buf.info, 4)?;
        self.check_segment(blocks)?;
        let list = ("gather_all", buf.gather_all);
        unpack(
            self,
            blocks,
            list,
            buf.gather_recv,
            buf.mask,
            buf.inverses,
            buf.info,
        )
    }

    /// Every block's statistics from the all-gather of
    /// [`DistLayout::plan_pack_statistics`].
    pub fn plan_unpack_statistics(&self, buf: &DistBuffers) -> Result<LaunchPlan> {
        let list = ("send_list", buf.send_list);
        unpack(self, self.per, list, buf.gather_recv, 0, buf.stats, 0)
    }
}

fn check_decay(decay: f32) -> Result<()> {
    if !(0.0..1.0).contains(&decay) {
        return Err(Error::invalid("decay", format!("{decay} is not in [0, 1)")));
    }
    Ok(())
}

/// One kernel argument of the launches above: a device pointer checked (non-null, aligned)
/// under its name, one that may be null, a size (checked to fit `int` by
/// [`DistLayout::new`]), a float or a double.
enum Arg {
    P(&'static str, CUdeviceptr, u64),
    Nullable(CUdeviceptr),
    I(usize),
    F(f32),
    D(f64),
}

/// The launch of `kernel` over `blocks` thread blocks of 256 threads with `args`.
fn plan(kernel: super::KernelId, blocks: usize, args: &[Arg]) -> Result<LaunchPlan> {
    let mut out = Vec::with_capacity(args.len());
    for a in args {
        out.push(match *a {
            Arg::P(name, p, align) => {
                check_ptr(name, p, align)?;
                KernelArg::Ptr(p)
            }
            Arg::Nullable(p) => KernelArg::Ptr(p),
            Arg::I(v) => KernelArg::I32(v as i32),
            Arg::F(v) => KernelArg::F32(v),
            Arg::D(v) => KernelArg::F64(v),
        });
    }
    Ok(LaunchPlan {
        kernel,
        grid: (grid_u32("blocks", blocks)?, 1, 1),
        block: (256, 1, 1),
        smem: 0,
        args: out,
    })
}

/// `dist_pack_f32` of `count` segments of the blocks `list` names in `blocks`.
fn pack(
    b: usize,
    blocks: (&'static str, CUdeviceptr),
    list: CUdeviceptr,
    count: usize,
    info: CUdeviceptr,
    stride: usize,
    out: CUdeviceptr,
) -> Result<LaunchPlan> {
    use Arg::*;
    plan(
        kernels::DIST_PACK_F32,
        count,
        &[
            P(blocks.0, blocks.1, 4),
            I(b),
            P("list", list, 4),
            Nullable(info),
            I(stride),
            P("out", out, 4),
        ],
    )
}

/// `dist_unpack_f32` of `world * per` segments of `gathered` into `blocks` (and `info`),
/// the blocks `list` names, those set in `mask` (all when null).
fn unpack(
    l: &DistLayout,
    per: usize,
    list: (&'static str, CUdeviceptr),
    gathered: CUdeviceptr,
    mask: CUdeviceptr,
    blocks: CUdeviceptr,
    info: CUdeviceptr,
) -> Result<LaunchPlan> {
    use Arg::*;
    plan(
        kernels::DIST_UNPACK_F32,
        l.world * per,
        &[
            P("gather_recv", gathered, 4),
            I(l.b),
            P(list.0, list.1, 4),
            I(tri_len(l.b) + 1),
            Nullable(mask),
            P("blocks", blocks, 4),
            Nullable(info),
        ],
    )
}

/// One rank's end of a group, moving device buffers on the rank's [`CudaDevice`] stream:
/// the collectives of a distributed device step, with equal counts on every rank. Every
/// rank must call the same collectives in the same order with the same sizes; a failure is
/// [`Error::Communication`], after which the group is broken.
///
/// [`NcclComm`] queues them on the stream (no host synchronization);
/// [`HostStagedComm`] copies through the host and any [`Communicator`] (gloo through
/// PyTorch, the in-process [`crate::dist::LocalGroup`]), waiting for the stream.
pub trait DeviceCommunicator: Send + fmt::Debug {
    /// This rank, `0..world`.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn world(&self) -> usize;
    /// `recv` receives the sum over the ranks of segment `rank` of `send` (`world`
    /// segments of `recv.len()` elements back to back).
    fn reduce_scatter(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()>;
    /// `recv` receives every rank's `send`, rank 0's first (`world * send.len()` elements).
    fn all_gather(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()>;
    /// Sums `buf` over the ranks, in place.
    fn all_reduce(&mut self, dev: &CudaDevice, buf: &mut CudaViewMut<'_, f64>) -> Result<()>;
    /// What this rank has moved so far (ring model, as [`Communicator::counters`]).
    fn counters(&self) -> CommCounters;
    /// Tells the group this rank cannot go on (as [`Communicator::abort`]); the default
    /// does nothing.
    fn abort(&mut self, why: &str) {
        let _ = why;
    }
    /// An error when the collectives cannot run on `dev`'s stream (checked when a step is
    /// made and before each step, so that nothing is queued that a collective then
    /// refuses). The default accepts every device.
    fn check_device(&self, dev: &CudaDevice) -> Result<()> {
        let _ = dev;
        Ok(())
    }
    /// Whether each collective waits for the stream on the host (a host-staged transport):
    /// then a step loses nothing by waiting for the rule's mask too, and the optimizer
    /// gathers the updated inverses only. The default: false.
    fn waits_for_host(&self) -> bool {
        false
    }
}

/// One rank's device communicator shared by several steps (the layers of an optimizer,
/// each with its own step): clones hand every collective to the same communicator, one at a
/// time, in the order the steps call them. A failed collective through any clone breaks
/// them all (their later collectives fail at once), as [`crate::dist::SharedComm`] does
/// for host communicators.
#[derive(Debug, Clone)]
pub struct SharedDeviceComm(crate::dist::SharedCell<dyn DeviceCommunicator>);

impl SharedDeviceComm {
    /// Shares `comm`.
    pub fn new(comm: Box<dyn DeviceCommunicator>) -> Self {
        SharedDeviceComm(crate::dist::SharedCell::new(comm))
    }
}

impl DeviceCommunicator for SharedDeviceComm {
    fn rank(&self) -> usize {
        self.0.lock().comm.rank()
    }
    fn world(&self) -> usize {
        self.0.lock().comm.world()
    }
    fn reduce_scatter(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.0.run(|c| c.reduce_scatter(dev, send, recv))
    }
    fn all_gather(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.0.run(|c| c.all_gather(dev, send, recv))
    }
    fn all_reduce(&mut self, dev: &CudaDevice, buf: &mut CudaViewMut<'_, f64>) -> Result<()> {
        self.0.run(|c| c.all_reduce(dev, buf))
    }
    fn counters(&self) -> CommCounters {
        self.0.lock().comm.counters()
    }
    fn abort(&mut self, why: &str) {
        self.0.abort(why, |c, why| c.abort(why));
    }
    fn check_device(&self, dev: &CudaDevice) -> Result<()> {
        self.0.lock().comm.check_device(dev)
    }
    fn waits_for_host(&self) -> bool {
        self.0.lock().comm.waits_for_host()
    }
}

fn check_segments(world: usize, send: usize, recv: usize, gather: bool) -> Result<()> {
    let (seg, whole, name) = if gather {
        (send, recv, "recv")
    } else {
        (recv, send, "send")
    };
    if seg.checked_mul(world) != Some(whole) {
        return Err(Error::shape(
            name,
            format!("{world} segments of {seg} elements"),
            whole,
        ));
    }
    Ok(())
}

/// A [`DeviceCommunicator`] over any host [`Communicator`]: each collective downloads the
/// send buffer (waiting for the stream), runs the host collective and uploads the result.
/// For transports without device support (gloo, threads of one process); NCCL
/// ([`NcclComm`]) keeps everything on the stream.
#[derive(Debug)]
pub struct HostStagedComm {
    comm: Box<dyn Communicator>,
    counts: Vec<usize>,
    host_send: Vec<f32>,
    host_recv: Vec<f32>,
    host_meta: Vec<f64>,
}

impl HostStagedComm {
    /// Stages `comm`'s collectives through host memory.
    pub fn new(comm: Box<dyn Communicator>) -> Self {
        HostStagedComm {
            counts: vec![0; comm.world()],
            comm,
            host_send: Vec::new(),
            host_recv: Vec::new(),
            host_meta: Vec::new(),
        }
    }
}

impl HostStagedComm {
    /// The reduce-scatter (`gather` false) or all-gather of `send` into `recv` through host
    /// memory: down (waiting for the stream), the host collective, up.
    fn staged(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
        gather: bool,
    ) -> Result<()> {
        check_segments(self.comm.world(), send.len(), recv.len(), gather)?;
        self.counts
            .fill(if gather { send.len() } else { recv.len() });
        self.host_send.resize(send.len(), 0.0);
        self.host_recv.resize(recv.len(), 0.0);
        dev.stream().memcpy_dtoh(send, &mut self.host_send)?;
        dev.synchronize()?;
        let (s, c, r) = (&self.host_send, &self.counts, &mut self.host_recv);
        if gather {
            self.comm.all_gather(s, c, r)?;
        } else {
            self.comm.reduce_scatter(s, c, r)?;
        }
        dev.stream().memcpy_htod(&self.host_recv, recv)?;
        Ok(())
    }
}

impl DeviceCommunicator for HostStagedComm {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world(&self) -> usize {
        self.comm.world()
    }
    fn reduce_scatter(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.staged(dev, send, recv, false)
    }
    fn all_gather(
        &mut self,
        dev: &CudaDevice,
        send: &CudaView<'_, f32>,
        recv: &mut CudaViewMut<'_, f32>,
    ) -> Result<()> {
        self.staged(dev, send, recv, true)
    }
    fn all_reduce(&mut self, dev: &CudaDevice, buf: &mut CudaViewMut<'_, f64>) -> Result<()> {
        self.host_meta.resize(buf.len(), 0.0);
        dev.stream().memcpy_dtoh(buf, &mut self.host_meta)?;
        dev.synchronize()?;
        self.comm.all_reduce(&mut self.host_meta)?;
        dev.stream().memcpy_htod(&self.host_meta, buf)?;
        Ok(())
    }
    fn counters(&self) -> CommCounters {
        self.comm.counters()
    }
    fn abort(&mut self, why: &str) {
        self.comm.abort(why);
    }
    fn waits_for_host(&self) -> bool {
        true
    }
}

pub use nccl::{nccl_unique_id, NcclComm, NcclId};

mod nccl {
    use super::*;
    use crate::dist::{even_counts, ring_bytes, Collective};
    use cudarc::nccl::{Comm, Id, ReduceOp};

    /// The 128 bytes that identify an NCCL group: made once ([`nccl_unique_id`], on one
    /// rank) and handed to every rank (by the caller's own means: a file, a TCP store, an
    /// MPI broadcast) before [`NcclComm::new`].
    pub type NcclId = [std::ffi::c_char; 128];

    fn nccl_present() -> Result<()> {
        // SAFETY: only tries to load the NCCL library.
        #[cfg(not(feature = "link-cuda"))]
        if !unsafe { cudarc::nccl::sys::is_culib_present() } {
            return Err(Error::NoDevice(
                "the NCCL library cannot be loaded: install NCCL for multi-GPU steps (it is \
                 loaded as libnccl.so, the development package's link: with only libnccl.so.2, \
                 link libnccl.so to it in a directory on LD_LIBRARY_PATH)"
                    .into(),
            ));
        }
        Ok(())
    }

    fn nccl_err(what: &str, e: cudarc::nccl::result::NcclError) -> Error {
        Error::Communication(format!("NCCL {what} failed: {e:?}"))
    }

    /// A new NCCL group id (needs the NCCL library).
    pub fn nccl_unique_id() -> Result<NcclId> {
        nccl_present()?;
        Ok(*Id::new().map_err(|e| nccl_err("unique id", e))?.internal())
    }

    /// A [`DeviceCommunicator`] over NCCL: the collectives are queued on the device's
    /// stream, no host synchronization. Created collectively: every rank of `world` calls
    /// [`NcclComm::new`] with the same id (the call returns once all have joined).
    pub struct NcclComm {
        /// `None` once aborted.
        comm: Option<Comm>,
        rank: usize,
        world: usize,
        counters: CommCounters,
        counts: Vec<usize>,
    }

    // SAFETY: an NCCL communicator may be used from any thread as long as calls on it are
    // not concurrent; `NcclComm` is only used through `&mut self`.
    unsafe impl Send for NcclComm {}

    impl fmt::Debug for NcclComm {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("NcclComm")
                .field("rank", &self.rank)
                .field("world", &self.world)
                .field("aborted", &self.comm.is_none())
                .finish_non_exhaustive()
        }
    }

    impl NcclComm {
        /// Joins the group `id` as rank `rank` of `world`, queueing on `dev`'s stream.
        /// Errors when NCCL cannot be loaded, `rank` is not below `world`, or NCCL fails.
        pub fn new(dev: &CudaDevice, rank: usize, world: usize, id: &NcclId) -> Result<Self> {
            if world == 0 || rank >= world || i32::try_from(world).is_err() {
                return Err(Error::invalid(
                    "rank",
                    format!("rank {rank} of a world of {world}"),
                ));
            }
            nccl_present()?;
            // NCCL joins on the calling thread's current device: make it `dev`'s.
            dev.context_handle().bind_to_thread()?;
            let comm = Comm::from_rank(dev.stream().clone(), rank, world, Id::uninit(*id))
                .map_err(|e| nccl_err("initialisation", e))?;
            Ok(NcclComm {
                comm: Some(comm),
                rank,
                world,
                counters: CommCounters::default(),
                counts: vec![0; world],
            })
        }

        /// A group of one rank (a test of the path, or a single-GPU run of a
        /// distributed script).
        pub fn single(dev: &CudaDevice) -> Result<Self> {
            Self::new(dev, 0, 1, &nccl_unique_id()?)
        }

        /// The live communicator, checked against `dev`'s stream.
        fn comm(&self, dev: &CudaDevice) -> Result<&Comm> {
            let Some(comm) = &self.comm else {
                return Err(Error::Communication(
                    "the NCCL communicator was aborted".into(),
                ));
            };
            if !std::sync::Arc::ptr_eq(&comm.stream(), dev.stream()) {
                return Err(Error::invalid(
                    "dev",
                    "not the device (stream) the NCCL communicator was made on",
                ));
            }
            Ok(comm)
        }

        /// Counts a collective over segments of `seg` elements (`None`: an all-reduce of
        /// `elems`, split as a ring splits it) of `size` bytes.
        fn count(&mut self, c: Collective, seg: Option<usize>, elems: usize, size: usize) {
            let w = self.world;
            match seg {
                Some(n) => self.counts.fill(n),
                None => even_counts(elems, w, &mut self.counts),
            }
            let (s, r) = ring_bytes(c, &self.counts, self.rank, size);
            self.counters.collectives += 1;
            self.counters.bytes_sent += s;
            self.counters.bytes_received += r;
        }
    }

    impl DeviceCommunicator for NcclComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn world(&self) -> usize {
            self.world
        }
        fn reduce_scatter(
            &mut self,
            dev: &CudaDevice,
            send: &CudaView<'_, f32>,
            recv: &mut CudaViewMut<'_, f32>,
        ) -> Result<()> {
            check_segments(self.world, send.len(), recv.len(), false)?;
            self.comm(dev)?
                .reduce_scatter(send, recv, &ReduceOp::Sum)
                .map_err(|e| nccl_err("reduce-scatter", e))?;
            self.count(Collective::ReduceScatter, Some(recv.len()), 0, 4);
            Ok(())
        }
        fn all_gather(
            &mut self,
            dev: &CudaDevice,
            send: &CudaView<'_, f32>,
            recv: &mut CudaViewMut<'_, f32>,
        ) -> Result<()> {
            check_segments(self.world, send.len(), recv.len(), true)?;
            self.comm(dev)?
                .all_gather(send, recv)
                .map_err(|e| nccl_err("all-gather", e))?;
            self.count(Collective::AllGather, Some(send.len()), 0, 4);
            Ok(())
        }
        fn all_reduce(&mut self, dev: &CudaDevice, buf: &mut CudaViewMut<'_, f64>) -> Result<()> {
            self.comm(dev)?
                .all_reduce_in_place(buf, &ReduceOp::Sum)
                .map_err(|e| nccl_err("all-reduce", e))?;
            self.count(Collective::AllReduce, None, buf.len(), 8);
            Ok(())
        }
        fn counters(&self) -> CommCounters {
            self.counters
        }
        fn abort(&mut self, _why: &str) {
            // ncclCommAbort (cudarc's drop of the communicator): the other ranks' pending
            // collectives fail instead of waiting for this rank.
            if let Some(c) = self.comm.take() {
                drop_comm(c);
            }
        }
        fn check_device(&self, dev: &CudaDevice) -> Result<()> {
            self.comm(dev).map(|_| ())
        }
    }

    /// Drops an NCCL communicator (cudarc aborts it, and panics when that fails: on the
    /// error paths this runs on, the panic is contained and the communicator left as it is).
    fn drop_comm(c: Comm) {
        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c)));
    }

    impl Drop for NcclComm {
        fn drop(&mut self) {
            // The collectives queued on the stream complete before the communicator goes.
            if let Some(c) = self.comm.take() {
                let _ = c.stream().synchronize();
                drop_comm(c);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(world: usize, rank: usize) -> Result<DistLayout> {
        let set = FactorSet::new(32, &[40, 10, 70]).unwrap();
        let plan = OwnershipPlan::new(&set, world).unwrap();
        DistLayout::new(&set, &plan, rank, &[Some(1), Some(0), None])
    }

    #[test]
    fn layout_tables_pad_every_rank_to_the_most_blocks() {
        // 2 + 1 + 3 = 6 blocks on 4 ranks, round-robin: 2, 2, 1, 1.
        let l = layout(4, 2).unwrap();
        assert_eq!(l.per_rank(), 2);
        assert_eq!(l.send_list(), &[0, 4, 1, 5, 2, -1, 3, -1]);
        assert_eq!(l.own_list(), &[2, -1]);
        assert_eq!(l.send_len(), 4 * 2 * 528);
        assert_eq!(l.gather_recv_len(), 4 * l.gather_send_len());
        assert_eq!(l.meta_len(), 2 * 3 + 2 * 6 + 3);
        // Block 1 (factor 0's second: 8 valid rows) is rank 1's first; block 5 (factor
        // 2's last: 6 valid rows) rank 1's second.
        assert_eq!(&l.blocks_table()[4..8], &[0, 8, 1, 0]);
        assert_eq!(&l.blocks_table()[20..24], &[2, 6, 1, 1]);
        assert_eq!(l.factors_table(), &[0, 2, 1, 2, 1, 0, 3, 3, -1]);
    }

    #[test]
    fn updated_lists_pack_the_updated_blocks_of_every_rank() {
        // Owners 0 4 | 1 5 | 2 - | 3 -; blocks 1, 4 and 5 updated.
        let l = layout(4, 1).unwrap();
        let mask = [0u8, 1, 0, 0, 1, 1];
        let (mut own, mut all) = (vec![9; 2], vec![9; 8]);
        assert_eq!(l.updated_lists(&mask, &mut own, &mut all).unwrap(), 2);
        assert_eq!(own, [1, 5]);
        assert_eq!(all, [4, -1, 1, 5, -1, -1, -1, -1]);
        let n = l.updated_lists(&[0; 6], &mut own, &mut all).unwrap();
        assert_eq!((n, &own[..]), (0, &[-1, -1][..]));
        let e = l.updated_lists(&[0; 5], &mut own, &mut all).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "mask", .. }), "{e}");
        let e = l
            .plan_pack_inverses(&DistBuffers::default(), 1)
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "info", .. }),
            "{e}"
        );
        let buf = DistBuffers {
            info: 256,
            ..DistBuffers::default()
        };
        let e = l.plan_pack_inverses(&buf, 3).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "blocks", .. }),
            "{e}"
        );
        let buf = DistBuffers {
            info: 256,
            inverses: 256,
            gather_send: 256,
            own_list: 256,
            ..DistBuffers::default()
        };
        // The all-gather's list is its own (not the statistics' own_list).
        let e = l.plan_pack_inverses(&buf, 1).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "list", .. }),
            "{e}"
        );
    }

    #[test]
    fn layout_errors_name_the_argument() {
        let e = layout(3, 3).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "rank", .. }),
            "{e}"
        );
        let set = FactorSet::new(32, &[40, 10]).unwrap();
        let plan = OwnershipPlan::new(&set, 2).unwrap();
        let e = DistLayout::new(&set, &plan, 0, &[None]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Shape {
                    arg: "partners",
                    ..
                }
            ),
            "{e}"
        );
        let e = DistLayout::new(&set, &plan, 0, &[Some(5), None]).unwrap_err();
        assert!(
            matches!(
                e,
                Error::InvalidArgument {
                    arg: "partners",
                    ..
                }
            ),
            "{e}"
        );
        let other = OwnershipPlan::new(&FactorSet::new(32, &[40]).unwrap(), 2).unwrap();
        let e = DistLayout::new(&set, &other, 0, &[None, None]).unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "plan", .. }), "{e}");
        let l = layout(2, 0).unwrap();
        let buf = DistBuffers::default();
        let e = l.plan_resolve(&buf, 1.0).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "decay", .. }),
            "{e}"
        );
        let e = l.plan_meta(&buf).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "status", .. }),
            "{e}"
        );
    }

    #[test]
    fn nccl_without_the_library_is_a_clear_error() {
        // SAFETY: only tries to load the library.
        if unsafe { cudarc::nccl::sys::is_culib_present() } {
            assert!(nccl_unique_id().is_ok());
        } else {
            let e = nccl_unique_id().unwrap_err();
            assert!(
                matches!(&e, Error::NoDevice(m) if m.contains("NCCL")),
                "{e}"
            );
        }
    }
}
