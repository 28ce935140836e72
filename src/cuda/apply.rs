//! The preconditioner apply on the device for every layer of a model in one launch:
//! `dW_l = scale_l * blockdiag(G_l^-1) * grad_l * blockdiag(A_l^-1)`.
//!
//! An [`ApplyPlan`] fixes, from the shapes alone, one thread block per (layer, row block,
//! column block, chunk of rows); each call then needs only the per-layer table (addresses of
//! the gradient, the output and the layer's inverse blocks, and its scale: 64 bytes per
//! layer) and one launch, however many layers there are.

use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut, DevicePtr, DevicePtrMut};

use super::raw::{self, kernels, KernelArg, LaunchPlan};
use super::{CudaDevice, KernelId};
use crate::dtype::DType;
use crate::error::{check_finite, check_len, Error, Result};
use crate::layout::FactorSet;

/// One layer of an apply: its gradient's shape and which factors of the inverse set are
/// its G (output side, dimension `out_dim`) and A (input side, dimension `in_dim`); a
/// missing side is the identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyLayer {
    /// Rows of the gradient (output features).
    pub out_dim: usize,
    /// Columns of the gradient (input features, times the kernel size for a conv).
    pub in_dim: usize,
    /// Index of the G factor in the inverse set.
    pub g_factor: Option<usize>,
    /// Index of the A factor in the inverse set.
    pub a_factor: Option<usize>,
}

/// Bytes of one layer's entry in the per-call layer table.
pub const LAYER_ENTRY_BYTES: usize = 64;

/// Rows of a row block that one thread block computes, for block size `b`.
pub fn rows_per_block(b: usize) -> usize {
    if b == 256 {
        64
    } else {
        b
    }
}

/// Threads per thread block for block size `b`.
pub fn threads(b: usize) -> u32 {
    if b == 32 {
        64
    } else {
        256
    }
}

/// Dynamic shared memory bytes for block size `b`: the intermediate `R x (b + 4)` and the
/// double-buffered operand chunks (2 x 16 rows of each operand).
pub fn smem_bytes(b: usize) -> usize {
    let r = rows_per_block(b);
    (r * (b + 4) + 2 * 16 * r + 2 * 16 * b) * 4
}

/// Which kernel runs an apply. Both compute the same products in the same order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApplyKernel {
    /// Every block size: each thread's operand columns side by side, read a word at a time.
    Standard,
    /// b = 64 and 128: each thread's operand columns in two runs read by vector loads, and
    /// the intermediate's row pitch b + 1, so that the operand and intermediate reads of both
    /// phases are free of shared-memory bank conflicts (the standard kernel has 4-way
    /// conflicts on the operand reads at b = 128, 2-way at b = 64, and 2-way on the
    /// intermediate's reads at b = 128); the intermediate's stores, once per tile, keep
    /// 4-way (b = 128) and 2-way (b = 64) conflicts.
    ConflictFree,
}

impl ApplyKernel {
    /// Every apply kernel, the baseline first.
    pub const ALL: [ApplyKernel; 2] = [ApplyKernel::Standard, ApplyKernel::ConflictFree];

    /// Whether this kernel exists for block size `b`.
    pub fn supports(self, b: usize) -> bool {
        match self {
            ApplyKernel::Standard => true,
            ApplyKernel::ConflictFree => b == 64 || b == 128,
        }
    }

    /// A short stable name ("standard", "conflict_free"), as choices are recorded.
    pub fn name(self) -> &'static str {
        match self {
            ApplyKernel::Standard => "standard",
            ApplyKernel::ConflictFree => "conflict_free",
        }
    }
}

/// The cut of an apply over layers: which thread block computes which tile.
#[derive(Debug, Clone, PartialEq)]
pub struct ApplyPlan {
    set: FactorSet,
    layers: Vec<ApplyLayer>,
    dtype: DType,
    kernel: ApplyKernel,
    items: Vec<i32>,
}

/// One layer's buffers for a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerBuffers {
    /// The gradient, `[out_dim, in_dim]` row-major, of the planned element type.
    pub grad: CUdeviceptr,
    /// The output, `[out_dim, in_dim]` row-major f32; may equal `grad` (f32, `b <= 128`).
    pub out: CUdeviceptr,
    /// The scale fused into the product (THOR scales conv layers by `1 / (Ho * Wo)`).
    pub scale: f32,
}

impl ApplyPlan {
    /// Plans the apply of `layers` whose inverse blocks live in a buffer laid out as `set`
    /// (all of one block size), gradients of element type `dtype` (f32 or bf16).
    pub fn new(set: &FactorSet, layers: &[ApplyLayer], dtype: DType) -> Result<Self> {
        Self::with_kernel(set, layers, dtype, ApplyKernel::Standard)
    }

    /// [`ApplyPlan::new`] run by `kernel`; an error naming `kernel` when it has none for
    /// the set's block size.
    pub fn with_kernel(
        set: &FactorSet,
        layers: &[ApplyLayer],
        dtype: DType,
        kernel: ApplyKernel,
    ) -> Result<Self> {
        if !kernel.supports(set.block()) {
            return Err(Error::invalid(
                "kernel",
                format!(
                    "the {} apply has no block size {}",
                    kernel.name(),
                    set.block()
                ),
            ));
        }
        if layers.is_empty() {
            return Err(Error::invalid("layers", "at least one layer is needed"));
        }
        if dtype == DType::F16 {
            return Err(Error::invalid("dtype", "gradients are f32 or bf16"));
        }
        let b = set.block();
        let rpb = rows_per_block(b);
        let mut items = Vec::new();
        for (l, lay) in layers.iter().enumerate() {
            if lay.out_dim == 0 || lay.in_dim == 0 {
                return Err(Error::invalid(
                    "layers",
                    format!("layer {l}: empty gradient"),
                ));
            }
            if lay.out_dim > i32::MAX as usize || lay.in_dim > i32::MAX as usize {
                return Err(Error::invalid("layers", format!("layer {l}: too large")));
            }
            for (side, f, dim) in [
                ("G", lay.g_factor, lay.out_dim),
                ("A", lay.a_factor, lay.in_dim),
            ] {
                if let Some(f) = f {
                    let e = set.entry(f).map_err(|_| {
                        Error::invalid(
                            "layers",
                            format!("layer {l}: {side} factor {f} not in the set"),
                        )
                    })?;
                    if e.layout.dim() != dim {
                        return Err(Error::shape(
                            "layers",
                            format!("layer {l}: {side} factor of dimension {dim}"),
                            format!("dimension {}", e.layout.dim()),
                        ));
                    }
                }
            }
            for i in 0..lay.out_dim.div_ceil(b) {
                let wi = b.min(lay.out_dim - i * b);
                for j in 0..lay.in_dim.div_ceil(b) {
                    for r0 in (0..wi).step_by(rpb) {
                        items.extend([l as i32, i as i32, j as i32, r0 as i32]);
                    }
                }
            }
        }
        raw::grid_u32("layers", items.len() / 4)?;
        Ok(ApplyPlan {
            set: set.clone(),
            layers: layers.to_vec(),
            dtype,
            kernel,
            items,
        })
    }

    /// The inverse set's layout.
    pub fn set(&self) -> &FactorSet {
        &self.set
    }

    /// The layers.
    pub fn layers(&self) -> &[ApplyLayer] {
        &self.layers
    }

    /// Work items, 4 i32 each (layer, row block, column block, first row).
    pub fn items(&self) -> &[i32] {
        &self.items
    }

    /// The per-call layer table, 8 u64 per layer ([`LAYER_ENTRY_BYTES`]), for inverse
    /// blocks at `inverses` (the set's buffer) and one [`LayerBuffers`] per layer.
    pub fn layer_table(&self, inverses: CUdeviceptr, bufs: &[LayerBuffers]) -> Result<Vec<u64>> {
        raw::check_ptr("inverses", inverses, 4)?;
        let b = self.set.block();
        let at = |f: Option<usize>| -> u64 {
            f.map_or(0, |f| {
                inverses + (self.set.entries()[f].first_block * b * b * 4) as u64
            })
        };
        let sides: Vec<(u64, u64)> = self
            .layers
            .iter()
            .map(|l| (at(l.g_factor), at(l.a_factor)))
            .collect();
        self.layer_table_at(&sides, bufs)
    }

    /// The per-call layer table with each layer's inverse blocks at explicit addresses:
    /// `sides[l] = (G blocks, A blocks)`, 0 exactly where the plan's layer has no such side.
    pub fn layer_table_at(&self, sides: &[(u64, u64)], bufs: &[LayerBuffers]) -> Result<Vec<u64>> {
        check_len("layers", self.layers.len(), bufs.len())?;
        check_len("sides", self.layers.len(), sides.len())?;
        let b = self.set.block();
        let mut t = Vec::with_capacity(8 * bufs.len());
        for (l, ((lay, buf), &(g, a))) in self.layers.iter().zip(bufs).zip(sides).enumerate() {
            raw::check_ptr("grad", buf.grad, self.dtype.size() as u64)?;
            raw::check_ptr("out", buf.out, 4)?;
            check_finite("scale", buf.scale as f64)?;
            for (name, p, planned) in [("g_inv", g, lay.g_factor), ("a_inv", a, lay.a_factor)] {
                match (p, planned) {
                    (0, None) => {}
                    (0, Some(_)) | (_, None) => {
                        return Err(Error::invalid(
                            name,
                            format!("layer {l}: given where the plan has none, or missing"),
                        ))
                    }
                    (p, Some(_)) => raw::check_ptr(name, p, 4)?,
                }
            }
            if buf.grad == buf.out && (self.dtype != DType::F32 || rows_per_block(b) != b) {
                return Err(Error::invalid(
                    "out",
                    format!(
                        "layer {l}: in place needs f32 gradients and b <= 128; pass a separate output"
                    ),
                ));
            }
            t.extend([
                buf.grad,
                buf.out,
                g,
                a,
                (lay.out_dim as u32 as u64) | ((lay.in_dim as u32 as u64) << 32),
                buf.scale.to_bits() as u64,
                0,
                0,
            ]);
        }
        Ok(t)
    }

    /// The kernel that runs the plan.
    pub fn kernel(&self) -> ApplyKernel {
        self.kernel
    }

    fn kernel_id(&self) -> KernelId {
        let bf16 = self.dtype == DType::BF16;
        match (self.kernel, self.set.block(), bf16) {
            (ApplyKernel::ConflictFree, 64, false) => kernels::APPLY_B64_F32_CF,
            (ApplyKernel::ConflictFree, 64, true) => kernels::APPLY_B64_BF16_CF,
            (ApplyKernel::ConflictFree, 128, false) => kernels::APPLY_B128_F32_CF,
            (ApplyKernel::ConflictFree, 128, true) => kernels::APPLY_B128_BF16_CF,
            (_, b, bf16) => kernels::apply(b, bf16),
        }
    }

    /// The launch, with the layer table at `layers` and the plan's items at `items`.
    pub fn launch(&self, layers: CUdeviceptr, items: CUdeviceptr) -> Result<LaunchPlan> {
        raw::check_ptr("layers", layers, 16)?;
        raw::check_ptr("items", items, 4)?;
        let b = self.set.block();
        Ok(LaunchPlan {
            kernel: self.kernel_id(),
            grid: (raw::grid_u32("layers", self.items.len() / 4)?, 1, 1),
            block: (threads(b), 1, 1),
            smem: smem_bytes(b) as u32,
            args: vec![KernelArg::Ptr(layers), KernelArg::Ptr(items)],
        })
    }
}

/// A planned apply on a device: its items and layer table, allocated once.
#[derive(Debug)]
pub struct DeviceApply {
    plan: ApplyPlan,
    items: CudaSlice<i32>,
    table: CudaSlice<u64>,
}

impl DeviceApply {
    /// The plan.
    pub fn plan(&self) -> &ApplyPlan {
        &self.plan
    }

    /// Queues the apply on raw device pointers: uploads the layer table (stream-ordered),
    /// then one launch.
    ///
    /// # Safety
    /// `inverses` must address the set's `buffer_len()` f32 and each layer's `grad` / `out`
    /// `out_dim * in_dim` elements (outputs not overlapping anything but, in place, their own
    /// gradient), all of `dev`'s context, valid until the queued work completes.
    pub unsafe fn launch_raw(
        &mut self,
        dev: &CudaDevice,
        inverses: CUdeviceptr,
        bufs: &[LayerBuffers],
    ) -> Result<()> {
        let table = self.plan.layer_table(inverses, bufs)?;
        // SAFETY: the caller's contract.
        unsafe { self.launch_table(dev, &table) }
    }

    /// Queues the apply with a layer table built by [`ApplyPlan::layer_table_at`].
    ///
    /// # Safety
    /// As for [`DeviceApply::launch_raw`], for the addresses in the table.
    pub unsafe fn launch_table(&mut self, dev: &CudaDevice, table: &[u64]) -> Result<()> {
        check_len("table", self.table.len(), table.len())?;
        let s = dev.stream().clone();
        s.memcpy_htod(table, &mut self.table)?;
        let (tp, _a) = self.table.device_ptr(&s);
        let (ip, _b) = self.items.device_ptr(&s);
        let l = self.plan.launch(tp, ip)?;
        // SAFETY: the table and items are owned by `self`; the rest is the caller's contract.
        unsafe { raw::launch(dev, &l) }
    }
}

impl CudaDevice {
    /// Plans the apply of `layers` with inverses laid out as `set`, gradients of type
    /// `dtype` (f32 or bf16), and allocates its tables once.
    ///
    /// The kernel is the one chosen for this card and these layers
    /// ([`CudaDevice::choose_apply_kernel`]: on first use every kernel for the block size is
    /// timed on synthetic gradients and inverses of these shapes, which waits for the device;
    /// see [`crate::choice`]).
    pub fn plan_apply(
        &self,
        set: &FactorSet,
        layers: &[ApplyLayer],
        dtype: DType,
    ) -> Result<DeviceApply> {
        let (kernel, _) = self.choose_apply_kernel(set, layers, dtype)?;
        self.plan_apply_with(set, layers, dtype, kernel)
    }

    /// [`CudaDevice::plan_apply`] run by `kernel` ([`ApplyPlan::with_kernel`]).
    pub fn plan_apply_with(
        &self,
        set: &FactorSet,
        layers: &[ApplyLayer],
        dtype: DType,
        kernel: ApplyKernel,
    ) -> Result<DeviceApply> {
        let plan = ApplyPlan::with_kernel(set, layers, dtype, kernel)?;
        Ok(DeviceApply {
            items: self.upload(plan.items())?,
            table: self.zeros(8 * layers.len())?,
            plan,
        })
    }

    /// The preconditioner apply of every planned layer, one launch, no synchronization:
    /// `outs[l] = scales[l] * blockdiag(G_l^-1) * grads[l] * blockdiag(A_l^-1)`, the inverse
    /// blocks (symmetric, as the inversion writes them) in `inverses`. Gradients and outputs
    /// are views (`slice.as_view()`, `slice.slice(a..b)`), so parameters that live in one
    /// framework allocation need no copy.
    pub fn apply<E: super::accumulate::DeviceElement>(
        &self,
        plan: &mut DeviceApply,
        inverses: &CudaSlice<f32>,
        grads: &[CudaView<'_, E>],
        outs: &mut [CudaViewMut<'_, f32>],
        scales: &[f32],
    ) -> Result<()> {
        if E::DTYPE != plan.plan.dtype {
            return Err(Error::invalid(
                "grads",
                format!("planned for {:?}, given {:?}", plan.plan.dtype, E::DTYPE),
            ));
        }
        let n = plan.plan.layers.len();
        check_len("grads", n, grads.len())?;
        check_len("outs", n, outs.len())?;
        check_len("scales", n, scales.len())?;
        check_len("inverses", plan.plan.set.buffer_len(), inverses.len())?;
        self.check_same_context("plan", &plan.items)?;
        self.check_same_context("inverses", inverses)?;
        for (g, o) in grads.iter().zip(outs.iter()) {
            self.check_same_context("grads", g)?;
            self.check_same_context("outs", o)?;
        }
        let s = self.stream().clone();
        let mut guards = Vec::with_capacity(2 * n);
        let mut bufs = Vec::with_capacity(n);
        for (l, ((g, o), lay)) in grads
            .iter()
            .zip(outs.iter_mut())
            .zip(&plan.plan.layers)
            .enumerate()
        {
            let len = lay.out_dim * lay.in_dim;
            if g.len() != len || o.len() != len {
                return Err(Error::shape(
                    "grads/outs",
                    format!(
                        "layer {l}: {} x {} = {len} elements",
                        lay.out_dim, lay.in_dim
                    ),
                    format!("{} and {}", g.len(), o.len()),
                ));
            }
            let (gp, ga) = g.device_ptr(&s);
            let (op, ob) = o.device_ptr_mut(&s);
            guards.push((ga, ob));
            bufs.push(LayerBuffers {
                grad: gp,
                out: op,
                scale: scales[l],
            });
        }
        let (ip, _i) = inverses.device_ptr(&s);
        // SAFETY: every buffer belongs to this device and was checked against the plan;
        // the borrows live until the launch is queued.
        unsafe { plan.launch_raw(self, ip, &bufs) }
    }

    /// [`CudaDevice::apply`] in place: each gradient (f32, `b <= 128`) is overwritten by its
    /// preconditioned value.
    pub fn apply_in_place(
        &self,
        plan: &mut DeviceApply,
        inverses: &CudaSlice<f32>,
        grads: &mut [CudaViewMut<'_, f32>],
        scales: &[f32],
    ) -> Result<()> {
        let n = plan.plan.layers.len();
        check_len("grads", n, grads.len())?;
        check_len("scales", n, scales.len())?;
        check_len("inverses", plan.plan.set.buffer_len(), inverses.len())?;
        self.check_same_context("plan", &plan.items)?;
        self.check_same_context("inverses", inverses)?;
        for g in grads.iter() {
            self.check_same_context("grads", g)?;
        }
        let s = self.stream().clone();
        let mut guards = Vec::with_capacity(n);
        let mut bufs = Vec::with_capacity(n);
        for (l, (g, lay)) in grads.iter_mut().zip(&plan.plan.layers).enumerate() {
            check_len("grads", lay.out_dim * lay.in_dim, g.len())?;
            let (gp, ga) = g.device_ptr_mut(&s);
            guards.push(ga);
            bufs.push(LayerBuffers {
                grad: gp,
                out: gp,
                scale: scales[l],
            });
        }
        let (ip, _i) = inverses.device_ptr(&s);
        // SAFETY: as in `apply`; in place is allowed by the kernel's row chunking (checked
        // by the layer table).
        unsafe { plan.launch_raw(self, ip, &bufs) }
    }
}
