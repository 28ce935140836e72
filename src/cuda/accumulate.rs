//! Grouped covariance accumulation on the device: the host planner and its launches.
//!
//! An [`AccumulatePlan`] fixes, from the shapes alone, how the work of a whole
//! [`FactorSet`] is cut: lower `T x T` tiles of every diagonal block (`T = 64`, or 32 at
//! `b = 32`), and the rows of every factor's input split into ranges so that small and large
//! factors together fill the device. Its tables go to device memory once; each call then
//! needs only the per-factor table (input addresses, strides, alpha, beta, 64 bytes per
//! factor) and three launches: partial products, finalize (sum, alpha / beta, mirror,
//! padding, non-finite check) and the set's traces. The launch count does not grow with the
//! number of factors.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, SyncOnDrop};

use super::raw::{self, kernels, KernelArg, LaunchPlan};
use super::{CudaDevice, KernelId};
use crate::dtype::DType;
use crate::error::{check_finite, check_len, Error, Result};
use crate::layout::{strided_len, FactorSet};
use crate::patches::{InputLayout, Patches};

pub use crate::step::AccumulateMode;

/// Rows of input per thread block at the least: below this the partial sums cost more to
/// combine than they save in parallelism.
pub const MIN_SPLIT_ROWS: usize = 256;

/// Thread blocks per multiprocessor the planner aims for.
pub const TARGET_BLOCKS_PER_SM: usize = 4;

/// Bytes of one factor's entry in the per-call factor table.
pub const FACTOR_ENTRY_BYTES: usize = 128;

/// u64 words of one factor's entry in the per-call factor table.
const ENTRY_WORDS: usize = FACTOR_ENTRY_BYTES / 8;

/// Rows per partial thread block. `weights[f]` lists the thread blocks each range of factor
/// `f`'s rows makes, by the tiles each computes (the tile kernels: one per live tile, weight
/// 1; the block kernels: one per diagonal block, weighted by its live tiles); `rows[f]` is
/// the factor's rows, and the device runs `target` thread blocks at once. Among the multiples
/// of 32 from the one-wave figure (at least [`MIN_SPLIT_ROWS`]) to twice it, the one whose
/// thread blocks (each as long as its rows times its weight) finish first when handed
/// longest-first to the least-loaded of `target` slots; the smallest on a tie. So a plan does
/// not end with a nearly empty second wave of full-length blocks, and short factors' blocks
/// count for their own rows. N = 8192, d = 4608, b = 128 on 132 SMs (528 slots), tile
/// kernels: the one-wave figure, 1696 rows, makes 540 blocks whose last 12 (1408 rows) run
/// after a full one: 2816 rows per slot; 1824 rows make 432 blocks of 1824 and 108 of 896,
/// 12 of which follow another short one: 1824 (one wave of 2048-row blocks would take 2048).
fn best_split(weights: &[Vec<usize>], rows: &[usize], target: usize) -> usize {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    let target = target.max(1);
    let work: usize = weights.iter().zip(rows).map(|(w, &n)| w.len() * n).sum();
    let per0 = work
        .div_ceil(target)
        .max(MIN_SPLIT_ROWS)
        .next_multiple_of(32);
    let mut lengths = Vec::new();
    let mut makespan = |per: usize| -> usize {
        lengths.clear();
        for (w, &n) in weights.iter().zip(rows) {
            let splits = n.div_ceil(per);
            for s in 0..splits {
                let len = per.min(n - s * per);
                lengths.extend(w.iter().map(|&k| k * len));
            }
        }
        lengths.sort_unstable_by(|a, b| b.cmp(a));
        let mut slots: BinaryHeap<Reverse<usize>> =
            std::iter::repeat_n(Reverse(0), target.min(lengths.len())).collect();
        for &len in &lengths {
            let Reverse(load) = slots.pop().unwrap_or(Reverse(0));
            slots.push(Reverse(load + len));
        }
        slots.into_iter().map(|Reverse(l)| l).max().unwrap_or(0)
    };
    // At most 256 candidates between per0 and 2 per0.
    let step = (per0 / 256).next_multiple_of(32).max(32);
    let mut best = (usize::MAX, per0);
    let mut per = per0;
    while per <= 2 * per0 {
        let m = makespan(per);
        if m < best.0 {
            best = (m, per);
        }
        per += step;
    }
    best.1
}

/// The tile edge the kernels use for block size `b`.
pub fn tile_for(b: usize) -> usize {
    if b >= 64 {
        64
    } else {
        32
    }
}

/// Which kernels compute a plan's partial products. Both write the same workspace slots,
/// summed by the same finalize, so they agree to rounding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccumulateKernel {
    /// One thread block per lower `T x T` tile of a diagonal block and range of rows (every
    /// block size, every mode; f32 input on SIMT cores in F32 mode).
    Tiles,
    /// One thread block per diagonal block and range of rows, the block's lower part on
    /// tensor cores from a multi-stage `cp.async` pipeline with `ldmatrix` fragments, each
    /// column of the input read once (block sizes 64 and 128, sm_80 and later). f32 input
    /// in F32 mode runs as 3xTF32 (split-precision products, f32-level error); 16-bit
    /// inputs' products are exact in f32 in either mode.
    Blocks,
}

impl AccumulateKernel {
    /// Every kernel family, in the order a choice lists them.
    pub const ALL: [AccumulateKernel; 2] = [AccumulateKernel::Tiles, AccumulateKernel::Blocks];

    /// Whether this family has kernels for block size `b`.
    pub fn supports(self, b: usize) -> bool {
        match self {
            AccumulateKernel::Tiles => true,
            AccumulateKernel::Blocks => b == 64 || b == 128,
        }
    }

    /// A short stable name ("tiles", "blocks"), as choices are recorded.
    pub fn name(self) -> &'static str {
        match self {
            AccumulateKernel::Tiles => "tiles",
            AccumulateKernel::Blocks => "blocks",
        }
    }
}

/// Thread blocks per multiprocessor the planner aims for with the block kernels (192
/// threads each) at block size `b`: 2 at b = 128 (126-149 registers, 37 KiB of shared
/// memory: two fit by registers), 4 at b = 64 (48-60 registers, 19.5 KiB).
pub fn target_block_kernels_per_sm(b: usize) -> usize {
    if b == 128 {
        2
    } else {
        4
    }
}

/// The cut of a grouped accumulation: which thread block does what. Depends on the set,
/// the rows of each factor's input, the element type, the mode, the kernel family and the
/// device size only.
#[derive(Debug, Clone, PartialEq)]
pub struct AccumulatePlan {
    set: FactorSet,
    rows: Vec<usize>,
    dtype: DType,
    mode: AccumulateMode,
    kernel: AccumulateKernel,
    tile: usize,
    items: Vec<i32>,
    /// Block kernels only: the same work as tile-kernel items on the same slots, for calls
    /// whose inputs the block kernels' cp.async path cannot read.
    fallback: Vec<i32>,
    finals: Vec<i32>,
    slots: usize,
    factor_slots: Vec<(usize, usize)>,
    rows_per_split: usize,
    partners: Vec<i32>,
}

/// One factor's input for a call: where X is and how to scale.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FactorInput {
    /// Device address of X's elements.
    pub x: CUdeviceptr,
    /// How X lies there: a row-major `rows x d` matrix, or a convolution's patches read
    /// from its tensor (rows as planned either way).
    pub layout: InputLayout,
    /// Scale of the new product (`1 / rows` for a mean).
    pub alpha: f32,
    /// Scale of the old statistics (0: replace; EMA decay otherwise).
    pub beta: f32,
}

/// Device addresses for [`AccumulatePlan::launches`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccumulateBuffers {
    /// The factor table ([`AccumulatePlan::factor_table`]), 16-byte aligned.
    pub factors: CUdeviceptr,
    /// The plan's partial work items ([`AccumulatePlan::items`]).
    pub items: CUdeviceptr,
    /// The plan's finalize items ([`AccumulatePlan::finals`]).
    pub finals: CUdeviceptr,
    /// Workspace: [`AccumulatePlan::workspace_len`] f32.
    pub workspace: CUdeviceptr,
    /// One i32 per slot ([`AccumulatePlan::slots`]).
    pub flags: CUdeviceptr,
    /// The set's blocks, `[total_blocks, b, b]` f32, updated in place.
    pub blocks: CUdeviceptr,
    /// One i32 per factor: 0; 1 when its input held a NaN or Inf; 2 when its partner's did
    /// (1 and 2: the factor is unchanged).
    pub status: CUdeviceptr,
    /// The set's trace table ([`FactorSet::trace_table`]).
    pub trace_desc: CUdeviceptr,
    /// One f32 per block of the set.
    pub block_traces: CUdeviceptr,
    /// One f32 per factor.
    pub factor_traces: CUdeviceptr,
    /// One byte per factor kept by THOR's trace rule (bit 0: holds statistics, else this
    /// step replaces them with `X^T X / N`; bit 1: frozen, not accumulated, status 3), or 0:
    /// every factor holds statistics and takes its own alpha and beta.
    pub factor_state: CUdeviceptr,
}

impl AccumulatePlan {
    /// Plans the accumulation of every factor of `set`, factor `f` from an input of
    /// `rows[f]` rows, for a device with `sms` multiprocessors, with the tile kernels
    /// ([`AccumulateKernel::Tiles`]).
    pub fn new(
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
        sms: usize,
    ) -> Result<Self> {
        Self::with_kernel(set, rows, dtype, mode, sms, AccumulateKernel::Tiles)
    }

    /// [`AccumulatePlan::new`] with the partial products computed by `kernel`; an error
    /// naming `kernel` when that family has no kernels for the set's block size.
    pub fn with_kernel(
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
        sms: usize,
        kernel: AccumulateKernel,
    ) -> Result<Self> {
        if !kernel.supports(set.block()) {
            return Err(Error::invalid(
                "kernel",
                format!(
                    "the {} kernels have no block size {} (64 and 128 only)",
                    kernel.name(),
                    set.block()
                ),
            ));
        }
        check_len("rows", set.len(), rows.len())?;
        if let Some(f) = rows.iter().position(|&n| n == 0) {
            return Err(Error::invalid(
                "rows",
                format!("factor {f}: at least one row is needed"),
            ));
        }
        if let Some(f) = rows.iter().position(|&n| n > MAX_ROWS) {
            return Err(Error::invalid(
                "rows",
                format!("factor {f}: {} rows, at most {MAX_ROWS} (2^30)", rows[f]),
            ));
        }
        let b = set.block();
        let tile = tile_for(b);
        let tb = b / tile;
        let tiles: Vec<(usize, usize)> = (0..tb)
            .flat_map(|r| (0..=r).map(move |c| (r * tile, c * tile)))
            .collect();
        // Tiles wholly in a block's padding (rows past the factor's dimension) have no
        // partial products: their finalize writes the identity from no slot at all.
        let live = |e: &crate::layout::FactorEntry, j: usize, tr: usize| tr < e.layout.valid(j);
        let live_in = |e: &crate::layout::FactorEntry, j: usize| {
            tiles.iter().filter(|&&(tr, _)| live(e, j, tr)).count()
        };
        // The thread blocks of one range of rows, weighted by the tiles each computes.
        let blocks_kernel = kernel == AccumulateKernel::Blocks;
        let weights: Vec<Vec<usize>> = set
            .entries()
            .iter()
            .map(|e| {
                let per_block = (0..e.layout.blocks()).map(|j| live_in(e, j));
                if blocks_kernel {
                    per_block.collect()
                } else {
                    vec![1; per_block.sum()]
                }
            })
            .collect();
        let per_sm = if blocks_kernel {
            target_block_kernels_per_sm(b)
        } else {
            TARGET_BLOCKS_PER_SM
        };
        let per = best_split(&weights, rows, per_sm * sms.max(1));
        let (mut items, mut fallback, mut finals) = (Vec::new(), Vec::new(), Vec::new());
        let mut slot = 0usize;
        let mut factor_slots = Vec::with_capacity(set.len());
        for (f, (e, &n)) in set.entries().iter().zip(rows).enumerate() {
            let splits = n.div_ceil(per);
            let first = slot;
            for j in 0..e.layout.blocks() {
                if blocks_kernel {
                    // One item per range for the whole block: its live tiles (a prefix of
                    // `tiles`) take slots slot + k * splits + s.
                    for s in 0..splits {
                        let n0 = s * per;
                        let n1 = (n0 + per).min(n);
                        items.extend([
                            f as i32,
                            j as i32,
                            n0 as i32,
                            n1 as i32,
                            (slot + s) as i32,
                            splits as i32,
                            0,
                            0,
                        ]);
                    }
                }
                for (k, &(tr, tc)) in tiles.iter().enumerate() {
                    let splits = if live(e, j, tr) { splits } else { 0 };
                    finals.extend([
                        f as i32,
                        j as i32,
                        tr as i32,
                        tc as i32,
                        slot as i32,
                        splits as i32,
                        (j == 0 && k == 0) as i32,
                        0,
                    ]);
                    for s in 0..splits {
                        let n0 = s * per;
                        let n1 = (n0 + per).min(n);
                        let tile_items = if blocks_kernel {
                            &mut fallback
                        } else {
                            &mut items
                        };
                        {
                            tile_items.extend([
                                f as i32,
                                j as i32,
                                tr as i32,
                                tc as i32,
                                n0 as i32,
                                n1 as i32,
                                slot as i32,
                                0,
                            ]);
                        }
                        slot += 1;
                    }
                }
            }
            factor_slots.push((first, slot - first));
        }
        if slot > i32::MAX as usize / (tile * tile) {
            return Err(Error::invalid("set", "too much work for one launch"));
        }
        Ok(AccumulatePlan {
            set: set.clone(),
            rows: rows.to_vec(),
            dtype,
            mode,
            kernel,
            tile,
            items,
            fallback,
            finals,
            slots: slot,
            factor_slots,
            rows_per_split: per,
            partners: vec![-1; set.len()],
        })
    }

    /// Ties factors together: `partners[f] = Some(g)` keeps factor `f` unchanged (status 2)
    /// whenever factor `g`'s input is not finite, so that the A and G of a layer always
    /// describe the same batches. Usually symmetric (A with G and G with A).
    pub fn set_partners(&mut self, partners: &[Option<usize>]) -> Result<()> {
        check_len("partners", self.set.len(), partners.len())?;
        for (f, p) in partners.iter().enumerate() {
            if let Some(p) = *p {
                if p == f || p >= self.set.len() {
                    return Err(Error::invalid(
                        "partners",
                        format!("factor {f}: partner {p} is itself or not in the set"),
                    ));
                }
            }
        }
        self.partners = partners
            .iter()
            .map(|p| p.map_or(-1, |p| p as i32))
            .collect();
        Ok(())
    }

    /// The set.
    pub fn set(&self) -> &FactorSet {
        &self.set
    }

    /// Input rows of each factor.
    pub fn rows(&self) -> &[usize] {
        &self.rows
    }

    /// The element type of the inputs.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The kernel family computing the partial products.
    pub fn kernel(&self) -> AccumulateKernel {
        self.kernel
    }

    /// The tile edge.
    pub fn tile(&self) -> usize {
        self.tile
    }

    /// Rows of input per partial thread block (the last range of a factor may be shorter).
    pub fn rows_per_split(&self) -> usize {
        self.rows_per_split
    }

    /// Partial work items, 8 i32 each (one thread block each).
    pub fn items(&self) -> &[i32] {
        &self.items
    }

    /// Tile-kernel items on the same slots as [`AccumulatePlan::items`], for a block-kernel
    /// plan's calls with inputs [`AccumulatePlan::blocks_can_read`] refuses (empty for a
    /// tile-kernel plan).
    pub fn fallback_items(&self) -> &[i32] {
        &self.fallback
    }

    /// Whether the plan's block kernels take `inputs` on their fast path: every input a
    /// matrix whose address and row stride in bytes are multiples of 16. Otherwise a
    /// block-kernel plan runs its tile-kernel items (the families were timed against each
    /// other on such matrices only). False for a tile-kernel plan.
    pub fn blocks_can_read(&self, inputs: &[FactorInput]) -> bool {
        let elem = self.dtype.size() as u64;
        self.kernel == AccumulateKernel::Blocks
            && inputs.iter().all(|i| match i.layout {
                InputLayout::Matrix { ld, .. } => i.x % 16 == 0 && (ld as u64 * elem) % 16 == 0,
                InputLayout::Patches(_) => false,
            })
    }

    /// Finalize items, 8 i32 each (one thread block each).
    pub fn finals(&self) -> &[i32] {
        &self.finals
    }

    /// Workspace slots (one `tile x tile` partial each).
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// f32 elements of workspace the launches need.
    pub fn workspace_len(&self) -> usize {
        self.slots * self.tile * self.tile
    }

    /// The per-call factor table, 16 u64 per factor ([`FACTOR_ENTRY_BYTES`]): checks every
    /// input against the plan (rows, stride or geometry, scales).
    pub fn factor_table(&self, inputs: &[FactorInput]) -> Result<Vec<u64>> {
        check_len("inputs", self.set.len(), inputs.len())?;
        let mut t = Vec::with_capacity(ENTRY_WORDS * inputs.len());
        for (f, (inp, e)) in inputs.iter().zip(self.set.entries()).enumerate() {
            let d = e.layout.dim();
            let n = self.rows[f];
            inp.layout
                .check(d)
                .map_err(|e| e.in_context(format_args!("factor {f}")))?;
            if inp.layout.rows() != n {
                return Err(Error::shape(
                    "rows",
                    format!("factor {f}: {n} (as planned)"),
                    inp.layout.rows(),
                ));
            }
            if inp.x == 0 {
                return Err(Error::invalid("x", format!("factor {f}: null pointer")));
            }
            if inp.x % self.dtype.size() as u64 != 0 {
                return Err(Error::invalid(
                    "x",
                    format!("factor {f}: not aligned to its element size"),
                ));
            }
            check_finite("alpha", inp.alpha as f64)?;
            check_finite("beta", inp.beta as f64)?;
            let (first, count) = self.factor_slots[f];
            let pair = |lo: usize, hi: usize| (lo as u32 as u64) | ((hi as u32 as u64) << 32);
            let (ld, kind, ones) = match inp.layout {
                InputLayout::Matrix { ld, .. } => (ld, 0, false),
                InputLayout::Patches(p) => (0, 1, p.ones),
            };
            t.extend([
                inp.x,
                ld as u64,
                n as u64,
                pair(d, e.first_block),
                pair(first, count),
                (inp.alpha.to_bits() as u64) | ((inp.beta.to_bits() as u64) << 32),
                (self.partners[f] as u32 as u64) | ((kind as u64) << 32),
                // ones, and the alpha of a factor's first statistics (they replace the
                // initial ones): 1 / rows, or 1 / batch for patches normalised per sample.
                ones as u64 | (((1.0 / inp.layout.samples() as f32).to_bits() as u64) << 32),
            ]);
            match inp.layout {
                InputLayout::Matrix { .. } => t.extend([0; ENTRY_WORDS - 8]),
                InputLayout::Patches(p) => t.extend(patch_words(&p)),
            }
        }
        Ok(t)
    }

    fn partial_kernel(&self, kernel: AccumulateKernel) -> KernelId {
        use AccumulateMode::*;
        if kernel == AccumulateKernel::Blocks {
            let b128 = self.set.block() == 128;
            return match (self.dtype, self.mode, b128) {
                (DType::F32, F32, true) => kernels::ACC_BLOCK_B128_F32X3,
                (DType::F32, F32, false) => kernels::ACC_BLOCK_B64_F32X3,
                (DType::F32, TensorCore, true) => kernels::ACC_BLOCK_B128_TF32,
                (DType::F32, TensorCore, false) => kernels::ACC_BLOCK_B64_TF32,
                (DType::F16, _, true) => kernels::ACC_BLOCK_B128_F16,
                (DType::F16, _, false) => kernels::ACC_BLOCK_B64_F16,
                (DType::BF16, _, true) => kernels::ACC_BLOCK_B128_BF16,
                (DType::BF16, _, false) => kernels::ACC_BLOCK_B64_BF16,
            };
        }
        let t64 = self.tile == 64;
        match (self.dtype, self.mode, t64) {
            (DType::F32, F32, true) => kernels::ACC_PARTIAL_T64_F32,
            (DType::F32, F32, false) => kernels::ACC_PARTIAL_T32_F32,
            (DType::F16, F32, true) => kernels::ACC_PARTIAL_T64_F16_SIMT,
            (DType::F16, F32, false) => kernels::ACC_PARTIAL_T32_F16_SIMT,
            (DType::BF16, F32, true) => kernels::ACC_PARTIAL_T64_BF16_SIMT,
            (DType::BF16, F32, false) => kernels::ACC_PARTIAL_T32_BF16_SIMT,
            (DType::F32, TensorCore, true) => kernels::ACC_PARTIAL_T64_TF32,
            (DType::F32, TensorCore, false) => kernels::ACC_PARTIAL_T32_TF32,
            (DType::F16, TensorCore, true) => kernels::ACC_PARTIAL_T64_F16,
            (DType::F16, TensorCore, false) => kernels::ACC_PARTIAL_T32_F16,
            (DType::BF16, TensorCore, true) => kernels::ACC_PARTIAL_T64_BF16,
            (DType::BF16, TensorCore, false) => kernels::ACC_PARTIAL_T32_BF16,
        }
    }

    fn partial_threads(&self, kernel: AccumulateKernel) -> u32 {
        if kernel == AccumulateKernel::Blocks {
            return 192;
        }
        match (self.mode, self.tile) {
            (AccumulateMode::TensorCore, _) => 128,
            (AccumulateMode::F32, 64) => 128,
            (AccumulateMode::F32, _) => 64,
        }
    }

    /// The three launches (partial products, finalize, traces) on buffers `buf`, `buf.items`
    /// holding [`AccumulatePlan::items`].
    pub fn launches(&self, buf: &AccumulateBuffers) -> Result<Vec<LaunchPlan>> {
        self.launches_with(buf, false)
    }

    /// [`AccumulatePlan::launches`], or with `fallback` the tile kernels on
    /// [`AccumulatePlan::fallback_items`] (which `buf.items` then holds; a block-kernel plan
    /// only).
    pub fn launches_with(
        &self,
        buf: &AccumulateBuffers,
        fallback: bool,
    ) -> Result<Vec<LaunchPlan>> {
        if fallback && self.kernel != AccumulateKernel::Blocks {
            return Err(Error::invalid(
                "fallback",
                "only a block-kernel plan has fallback items",
            ));
        }
        let (kernel, items) = if fallback {
            (AccumulateKernel::Tiles, &self.fallback)
        } else {
            (self.kernel, &self.items)
        };
        for (name, p, align) in [
            ("factors", buf.factors, 16),
            ("items", buf.items, 4),
            ("finals", buf.finals, 4),
            ("workspace", buf.workspace, 4),
            ("flags", buf.flags, 4),
            ("blocks", buf.blocks, 4),
            ("status", buf.status, 4),
        ] {
            raw::check_ptr(name, p, align)?;
        }
        let b = self.set.block() as i32;
        let parts = raw::grid_u32("items", items.len() / 8)?;
        let fins = raw::grid_u32("finals", self.finals.len() / 8)?;
        use KernelArg::*;
        let partial = LaunchPlan {
            kernel: self.partial_kernel(kernel),
            grid: (parts, 1, 1),
            block: (self.partial_threads(kernel), 1, 1),
            smem: 0,
            args: vec![
                Ptr(buf.factors),
                Ptr(buf.items),
                I32(b),
                Ptr(buf.workspace),
                Ptr(buf.flags),
                Ptr(buf.factor_state),
            ],
        };
        let finalize = LaunchPlan {
            kernel: if self.tile == 64 {
                kernels::ACC_FINALIZE_T64_F32
            } else {
                kernels::ACC_FINALIZE_T32_F32
            },
            grid: (fins, 1, 1),
            block: (256, 1, 1),
            smem: 0,
            args: vec![
                Ptr(buf.factors),
                Ptr(buf.finals),
                I32(b),
                Ptr(buf.workspace),
                Ptr(buf.flags),
                Ptr(buf.factor_state),
                Ptr(buf.blocks),
                Ptr(buf.status),
            ],
        };
        let traces = raw::plan_trace_set_f32(
            buf.blocks,
            self.set.block(),
            buf.trace_desc,
            self.set.len(),
            buf.block_traces,
            buf.factor_traces,
        )?;
        Ok(vec![partial, finalize, traces])
    }
}

/// A planned grouped accumulation on a device: the plan's tables, the workspace and the
/// per-call factor table, allocated once and reused by every call.
#[derive(Debug)]
pub struct DeviceAccumulate {
    plan: AccumulatePlan,
    items: CudaSlice<i32>,
    /// The plan's fallback items (block-kernel plans), and whether the inputs of the factor
    /// table last set need them.
    fallback: Option<CudaSlice<i32>>,
    use_fallback: bool,
    finals: CudaSlice<i32>,
    factors: CudaSlice<u64>,
    workspace: CudaSlice<f32>,
    flags: CudaSlice<i32>,
    trace_desc: CudaSlice<i32>,
}

impl DeviceAccumulate {
    /// An error naming `plan` unless this plan's buffers belong to `dev`'s context (a plan
    /// made on one device cannot run on another).
    pub fn check_device(&self, dev: &CudaDevice) -> Result<()> {
        dev.check_same_context("plan", &self.items)
    }

    /// The plan.
    pub fn plan(&self) -> &AccumulatePlan {
        &self.plan
    }

    /// Ties factors together ([`AccumulatePlan::set_partners`]); takes effect at the next
    /// factor table upload.
    pub fn set_partners(&mut self, partners: &[Option<usize>]) -> Result<()> {
        self.plan.set_partners(partners)
    }

    /// Queues the accumulation on raw device pointers (for the C ABI and other callers that
    /// own their memory): uploads the factor table (stream-ordered), then the three
    /// launches. See [`CudaDevice::accumulate`] for what is computed.
    ///
    /// # Safety
    /// Every `inputs[f].x` must address the elements its layout reads
    /// ([`InputLayout::check`]: `(rows_f - 1) * ld_f + d_f` for a matrix, the tensor's span
    /// for patches) of the planned type, `blocks` the set's `buffer_len()` f32, `block_traces` one f32 per block,
    /// `factor_traces` and `status` one f32 / i32 per factor, all of `dev`'s context (the one
    /// this plan was made on), outputs not overlapping inputs, valid until the queued work
    /// completes.
    pub unsafe fn launch_raw(
        &mut self,
        dev: &CudaDevice,
        inputs: &[FactorInput],
        blocks: CUdeviceptr,
        block_traces: CUdeviceptr,
        factor_traces: CUdeviceptr,
        status: CUdeviceptr,
    ) -> Result<()> {
        self.set_factor_table(dev, inputs)?;
        let (plans, _guards) =
            self.bound_launches(dev.stream(), blocks, block_traces, factor_traces, status, 0)?;
        for l in &plans {
            // SAFETY: the plan's own buffers are owned by `self` and their guards live until
            // the launches are queued; the rest is the caller's contract above.
            unsafe { raw::launch(dev, l) }?;
        }
        Ok(())
    }

    /// Uploads the factor table for `inputs` (stream-ordered): later launches read the
    /// inputs at these addresses.
    /// A block-kernel plan runs its tile-kernel items for inputs its block kernels cannot
    /// read on their fast path ([`AccumulatePlan::blocks_can_read`]).
    pub fn set_factor_table(&mut self, dev: &CudaDevice, inputs: &[FactorInput]) -> Result<()> {
        let table = self.plan.factor_table(inputs)?;
        dev.stream().memcpy_htod(&table, &mut self.factors)?;
        self.use_fallback = self.fallback.is_some() && !self.plan.blocks_can_read(inputs);
        Ok(())
    }

    /// The kernel family the next launches run: the plan's, or the tile kernels when the
    /// factor table last set holds inputs a block-kernel plan's fast path cannot read.
    pub fn running_kernel(&self) -> AccumulateKernel {
        if self.use_fallback {
            AccumulateKernel::Tiles
        } else {
            self.plan.kernel()
        }
    }

    /// The three launches on the factor table last set and the given outputs (and the
    /// rule's per-factor state, or 0), with the guards of the plan's own buffers: keep them
    /// until the launches are queued, so that cudarc's stream events cover the kernels.
    pub(crate) fn bound_launches<'a>(
        &'a mut self,
        s: &'a CudaStream,
        blocks: CUdeviceptr,
        block_traces: CUdeviceptr,
        factor_traces: CUdeviceptr,
        status: CUdeviceptr,
        factor_state: CUdeviceptr,
    ) -> Result<(Vec<LaunchPlan>, Vec<SyncOnDrop<'a>>)> {
        let (fp, a) = self.factors.device_ptr(s);
        let fallback = self.use_fallback;
        let items = match (&self.fallback, fallback) {
            (Some(f), true) => f,
            _ => &self.items,
        };
        let (ip, b) = items.device_ptr(s);
        let (np, c) = self.finals.device_ptr(s);
        let (wp, d) = self.workspace.device_ptr_mut(s);
        let (gp, e) = self.flags.device_ptr_mut(s);
        let (tp, f) = self.trace_desc.device_ptr(s);
        let plans = self.plan.launches_with(
            &AccumulateBuffers {
                factors: fp,
                items: ip,
                finals: np,
                workspace: wp,
                flags: gp,
                blocks,
                status,
                trace_desc: tp,
                block_traces,
                factor_traces,
                factor_state,
            },
            fallback,
        )?;
        Ok((plans, vec![a, b, c, d, e, f]))
    }
}

/// The most rows one factor's input may have on the device: the kernels count rows in
/// `int` and step past the last row by up to a stage, so the cap leaves that headroom
/// below 2^31.
pub const MAX_ROWS: usize = crate::patches::MAX_PATCH_ROWS;

/// The words 8..16 of a patch factor's table entry (a checked geometry: every size fits
/// the kernel's 16- and 32-bit fields).
fn patch_words(p: &Patches) -> [u64; ENTRY_WORDS - 8] {
    let g = &p.geometry;
    let [_, wo] = g.output_unchecked_or_zero();
    let half = |v: [usize; 2]| (v[0] as u16 as u64) | ((v[1] as u16 as u64) << 16);
    let pair = |lo: usize, hi: usize| (lo as u32 as u64) | ((hi as u32 as u64) << 32);
    let s = p.strides.map(|v| v as u64);
    [
        s[0],
        s[1],
        s[2],
        s[3],
        pair(g.h, g.w),
        pair(wo, p.rows() / p.batch),
        half(g.kernel) | (half(g.stride) << 32),
        half(g.padding) | (half(g.dilation) << 32),
    ]
}

/// One factor's input for [`CudaDevice::accumulate`].
#[derive(Debug)]
pub struct DeviceInput<'a, E> {
    /// X's elements (rows as planned): a whole buffer (`slice.as_view()`) or part of one
    /// (`slice.slice(a..b)`), e.g. a framework tensor's storage at an offset.
    pub x: CudaView<'a, E>,
    /// How X lies in `x`: a row-major matrix, or a convolution's patches (implicit im2col).
    pub layout: InputLayout,
    /// Scale of the new product (`1 / rows` for a mean).
    pub alpha: f32,
    /// Scale of the old statistics: 0 replaces them (they are not read), otherwise EMA.
    pub beta: f32,
}

impl<E> Clone for DeviceInput<'_, E> {
    fn clone(&self) -> Self {
        DeviceInput {
            x: self.x.slice(..),
            ..*self
        }
    }
}

/// Element types the device accumulation reads.
pub trait DeviceElement: crate::Element + cudarc::driver::DeviceRepr {}
impl DeviceElement for f32 {}
impl DeviceElement for half::f16 {}
impl DeviceElement for half::bf16 {}

impl CudaDevice {
    /// Number of multiprocessors.
    pub fn sm_count(&self) -> Result<usize> {
        use cudarc::driver::sys::CUdevice_attribute;
        let n = self
            .context_handle()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        Ok(n.max(1) as usize)
    }

    /// Plans the grouped accumulation of every factor of `set` (factor `f` from inputs of
    /// `rows[f]` rows of type `dtype`) for this device, and allocates its tables and
    /// workspace once. The kernel family is the one chosen for this card and these shapes
    /// ([`CudaDevice::choose_accumulate_kernel`]: on first use both families are timed on
    /// synthetic inputs of these sizes and checked against each other, which waits for the
    /// device; the choice is remembered, see [`crate::choice`]).
    pub fn plan_accumulate(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
    ) -> Result<DeviceAccumulate> {
        let (kernel, _) = self.choose_accumulate_kernel(set, rows, dtype, mode)?;
        self.plan_accumulate_with(set, rows, dtype, mode, kernel)
    }

    /// [`CudaDevice::plan_accumulate`] with the partial products computed by `kernel`
    /// ([`AccumulatePlan::with_kernel`]).
    pub fn plan_accumulate_with(
        &self,
        set: &FactorSet,
        rows: &[usize],
        dtype: DType,
        mode: AccumulateMode,
        kernel: AccumulateKernel,
    ) -> Result<DeviceAccumulate> {
        let sms = self.sm_count()?;
        let plan = AccumulatePlan::with_kernel(set, rows, dtype, mode, sms, kernel)?;
        Ok(DeviceAccumulate {
            items: self.upload(plan.items())?,
            fallback: if plan.fallback_items().is_empty() {
                None
            } else {
                Some(self.upload(plan.fallback_items())?)
            },
            use_fallback: false,
            finals: self.upload(plan.finals())?,
            factors: self.zeros(ENTRY_WORDS * set.len())?,
            workspace: self.zeros(plan.workspace_len())?,
            flags: self.zeros(plan.slots())?,
            trace_desc: self.upload(&set.trace_table())?,
            plan,
        })
    }

    /// Grouped covariance accumulation, three launches for the whole set, no host
    /// synchronization: for every factor `f` and block `j`,
    /// `S_j <- beta_f * S_j + alpha_f * X_j^T X_j` in `blocks` (the set's `[total, b, b]`
    /// buffer), identity in the padding, then the traces of every block and factor.
    ///
    /// `status[f]` becomes 1 when factor `f`'s input held a NaN or Inf: that factor's
    /// blocks are left as they were (its traces are those of the kept blocks); 0 otherwise.
    /// Errors (nothing launched) on inputs that do not match the plan.
    pub fn accumulate<E: DeviceElement>(
        &self,
        acc: &mut DeviceAccumulate,
        inputs: &[DeviceInput<'_, E>],
        blocks: &mut CudaSlice<f32>,
        block_traces: &mut CudaSlice<f32>,
        factor_traces: &mut CudaSlice<f32>,
        status: &mut CudaSlice<i32>,
    ) -> Result<()> {
        let set = &acc.plan.set;
        if E::DTYPE != acc.plan.dtype {
            return Err(Error::invalid(
                "inputs",
                format!(
                    "planned for {:?} input, given {:?}",
                    acc.plan.dtype,
                    E::DTYPE
                ),
            ));
        }
        check_len("inputs", set.len(), inputs.len())?;
        check_len("blocks", set.buffer_len(), blocks.len())?;
        check_len("block_traces", set.total_blocks(), block_traces.len())?;
        check_len("factor_traces", set.len(), factor_traces.len())?;
        check_len("status", set.len(), status.len())?;
        self.check_same_context("acc", &acc.items)?;
        self.check_same_context("blocks", blocks)?;
        self.check_same_context("block_traces", block_traces)?;
        self.check_same_context("factor_traces", factor_traces)?;
        self.check_same_context("status", status)?;
        let s = self.stream().clone();
        let mut host = Vec::with_capacity(inputs.len());
        let mut guards = Vec::with_capacity(inputs.len());
        for (f, (inp, e)) in inputs.iter().zip(set.entries()).enumerate() {
            self.check_same_context("inputs", &inp.x)?;
            let d = e.layout.dim();
            let need = inp.layout.check(d)?;
            if inp.x.len() < need {
                return Err(Error::shape(
                    "inputs",
                    format!("factor {f}: at least {need} elements"),
                    inp.x.len(),
                ));
            }
            let (p, g) = inp.x.device_ptr(&s);
            guards.push(g);
            host.push(FactorInput {
                x: p,
                layout: inp.layout,
                alpha: inp.alpha,
                beta: inp.beta,
            });
        }
        let (bp, _g) = blocks.device_ptr_mut(&s);
        let (sp, _h) = status.device_ptr_mut(&s);
        let (btp, _i) = block_traces.device_ptr_mut(&s);
        let (ftp, _j) = factor_traces.device_ptr_mut(&s);
        // SAFETY: every buffer belongs to this device and was checked against the plan
        // above; the borrows live until the launches are queued.
        unsafe { acc.launch_raw(self, &host, bp, btp, ftp, sp) }?;
        drop(guards);
        Ok(())
    }

    /// Dense covariance accumulation for users who keep whole factors: the lower triangle
    /// (row-major) of the `d x d` matrix `c` (row stride `ldc`) becomes
    /// `beta * C + alpha * X^T X`, X `rows x d` row-major with row stride `ld`, through
    /// cuBLAS SYRK. The strict upper triangle is not touched (SYRK's contract).
    #[allow(clippy::too_many_arguments)]
    pub fn accumulate_dense(
        &self,
        x: &CudaSlice<f32>,
        rows: usize,
        ld: usize,
        d: usize,
        alpha: f32,
        beta: f32,
        c: &mut CudaSlice<f32>,
        ldc: usize,
    ) -> Result<()> {
        if rows == 0 || d == 0 {
            return Err(Error::invalid("rows/d", "must be at least 1"));
        }
        if ld < d || ldc < d {
            return Err(Error::shape("ld/ldc", format!(">= {d}"), ld.min(ldc)));
        }
        check_finite("alpha", alpha as f64)?;
        check_finite("beta", beta as f64)?;
        let big = |v: usize| v > i32::MAX as usize;
        if big(rows) || big(ld) || big(ldc) || big(d) {
            return Err(Error::invalid("rows/ld", "above 2^31 - 1"));
        }
        crate::error::check_min_len("x", strided_len("ld", rows, ld, d)?, x.len())?;
        crate::error::check_min_len("c", strided_len("ldc", d, ldc, d)?, c.len())?;
        let blas = self.cublas()?;
        let s = self.stream().clone();
        let (xp, _a) = x.device_ptr(&s);
        let (cp, _b) = c.device_ptr_mut(&s);
        use cudarc::cublas::sys as cb;
        // Row-major X (rows x d, ld) is column-major X^T (d x rows, ld): C = X^T X is
        // SYRK with op N on it. Row-major lower of C is column-major upper.
        // SAFETY: sizes checked above; both buffers belong to this device's stream.
        let st = unsafe {
            cb::cublasSsyrk_v2(
                *blas.handle(),
                cb::cublasFillMode_t::CUBLAS_FILL_MODE_UPPER,
                cb::cublasOperation_t::CUBLAS_OP_N,
                d as i32,
                rows as i32,
                &alpha,
                xp as *const f32,
                ld as i32,
                &beta,
                cp as *mut f32,
                ldc as i32,
            )
        };
        if st != cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::invalid(
                "cublas",
                format!("cublasSsyrk failed: {st:?}"),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_nearly_empty_second_wave() {
        // N = 8192, d = 4608, b = 128 on 132 SMs: 36 blocks x 3 tiles = 108 tile jobs; see
        // `best_split` for the three candidates' finishing times (2816, 1824, 2048 rows).
        let set = FactorSet::new(128, &[4608]).unwrap();
        let p = AccumulatePlan::new(&set, &[8192], DType::F32, AccumulateMode::F32, 132).unwrap();
        assert_eq!(p.rows_per_split(), 1824);
        assert_eq!(p.items().len() / 8, 108 * 5);
        // Short factors' items count for their own rows: a few tiny items beside a long
        // factor do not push the long one to twice its rows per block.
        assert_eq!(
            best_split(
                &[vec![1; 108], vec![1; 6], vec![1; 108]],
                &[256, 64, 50176],
                432
            ),
            {
                let work = 108 * 256 + 6 * 64 + 108 * 50176;
                (work as usize).div_ceil(432).next_multiple_of(32)
            }
        );
        // A larger device or fewer rows never get fewer rows than the floor.
        let p = AccumulatePlan::new(&set, &[300], DType::F32, AccumulateMode::F32, 132).unwrap();
        assert!(p.rows_per_split() >= MIN_SPLIT_ROWS);
    }

    #[test]
    fn tiles_in_the_padding_have_no_partial_products() {
        // d = 129 at b = 128: the second block holds one real row; of its three 64 x 64
        // tiles, (64, 0) and (64, 64) are all padding.
        let set = FactorSet::new(128, &[129]).unwrap();
        let p = AccumulatePlan::new(&set, &[1000], DType::F32, AccumulateMode::F32, 2).unwrap();
        let splits = 1000usize.div_ceil(p.rows_per_split());
        let finals: Vec<&[i32]> = p.finals().chunks(8).collect();
        assert_eq!(finals.len(), 6, "every tile is finalized");
        let live: Vec<bool> = finals.iter().map(|f| f[5] > 0).collect();
        assert_eq!(live, [true, true, true, true, false, false]);
        assert_eq!(p.items().len() / 8, 4 * splits);
        assert!(p.items().chunks(8).all(|it| !(it[1] == 1 && it[2] == 64)));
    }

    #[test]
    fn block_kernel_items_cover_every_slot_once() {
        // Mixed factors (dead tiles in the last blocks of 129 and 60 at b = 128), many rows.
        for (b, dims, rows) in [
            (128, vec![4608, 129, 60], vec![8192, 1000, 40]),
            (64, vec![1, 65, 200], vec![7, 5000, 300]),
        ] {
            let set = FactorSet::new(b, &dims).unwrap();
            let mode = AccumulateMode::TensorCore;
            let k = AccumulateKernel::Blocks;
            let p = AccumulatePlan::with_kernel(&set, &rows, DType::BF16, mode, 132, k).unwrap();
            let tiles = AccumulatePlan::new(&set, &rows, DType::BF16, mode, 132).unwrap();
            assert_eq!(p.finals().len(), tiles.finals().len(), "same finalize");
            let mut hits = vec![0u32; p.slots()];
            for it in p.items().chunks(8) {
                let (f, j) = (it[0] as usize, it[1] as usize);
                let valid = set.entries()[f].layout.valid(j);
                let live = if valid > 64 {
                    b / 64 * (b / 64 + 1) / 2
                } else {
                    1
                };
                assert!(it[2] < it[3] && it[3] as usize <= rows[f]);
                for t in 0..live {
                    hits[it[4] as usize + t * it[5] as usize] += 1;
                }
            }
            assert!(hits.iter().all(|&h| h == 1), "b={b}: {hits:?}");
            // Each block's items cover its factor's rows once.
            for fi in p.finals().chunks(8).filter(|fi| fi[2] == 0) {
                let rows_f = rows[fi[0] as usize];
                let covered: usize = p
                    .items()
                    .chunks(8)
                    .filter(|it| it[0] == fi[0] && it[1] == fi[1])
                    .map(|it| (it[3] - it[2]) as usize)
                    .sum();
                assert_eq!(covered, rows_f, "b={b} {fi:?}");
            }
        }
        // N = 8192, d = 4608, b = 128 on 132 SMs: one item per block and range.
        let set = FactorSet::new(128, &[4608]).unwrap();
        let k = AccumulateKernel::Blocks;
        let p = AccumulatePlan::with_kernel(&set, &[8192], DType::F32, AccumulateMode::F32, 132, k)
            .unwrap();
        let splits = 8192usize.div_ceil(p.rows_per_split());
        assert_eq!(p.items().len() / 8, 36 * splits);
        assert_eq!(p.kernel(), k);
    }

    #[test]
    fn block_plans_fall_back_to_tiles_off_the_fast_path() {
        let set = FactorSet::new(128, &[300, 200]).unwrap();
        let rows = [1000, 64];
        let mode = AccumulateMode::TensorCore;
        let k = AccumulateKernel::Blocks;
        let p = AccumulatePlan::with_kernel(&set, &rows, DType::F32, mode, 132, k).unwrap();
        let input = |x: u64, ld: usize, n: usize| FactorInput {
            x,
            layout: InputLayout::matrix(n, ld),
            alpha: 1.0,
            beta: 0.0,
        };
        let aligned = [input(256, 300, 1000), input(1024, 200, 64)];
        assert!(p.blocks_can_read(&aligned));
        assert!(
            !p.blocks_can_read(&[input(256, 301, 1000), aligned[1]]),
            "ld"
        );
        assert!(
            !p.blocks_can_read(&[input(260, 300, 1000), aligned[1]]),
            "address"
        );
        // The fallback items are the tile plan's work on the same slots.
        let fb: Vec<&[i32]> = p.fallback_items().chunks(8).collect();
        assert!(fb.iter().all(|it| (it[6] as usize) < p.slots()));
        let mut seen = vec![false; p.slots()];
        for it in &fb {
            assert!(!seen[it[6] as usize]);
            seen[it[6] as usize] = true;
        }
        assert!(seen.iter().all(|&v| v), "every slot once");
        // A tile plan has none and never reads as block-ready.
        let t = AccumulatePlan::new(&set, &rows, DType::F32, mode, 132).unwrap();
        assert!(t.fallback_items().is_empty() && !t.blocks_can_read(&aligned));
    }
}
