//! Safe operations on device buffers: every shape is checked against the buffers before a
//! launcher in [`super::raw`] is called.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{raw, CudaDevice};
use crate::error::{check_len, check_min_len, Result};
use crate::layout::{BlockLayout, FactorSet};

/// Damping for [`CudaDevice::invert`]: one value for all blocks, or one per block in device
/// memory (checked by the kernel: a negative or non-finite value gives that block
/// [`crate::invert::INFO_BAD_DAMPING`]).
#[derive(Debug, Clone, Copy)]
pub enum DeviceDamping<'a> {
    /// The same damping for every block.
    Uniform(f32),
    /// `damping[j]` for block `j`.
    PerBlock(&'a CudaSlice<f32>),
}

/// Options of [`CudaDevice::invert`].
#[derive(Debug, Clone, Copy)]
pub struct DeviceInvertOptions<'a> {
    /// Damping added to the diagonal before factoring.
    pub damping: DeviceDamping<'a>,
    /// One byte per block in device memory: 0 skips the block (THOR's trace rule writes it
    /// on the device, so skipping needs no host round trip).
    pub mask: Option<&'a CudaSlice<u8>>,
    /// What to do with blocks that are not positive definite.
    pub policy: crate::invert::FailurePolicy,
}

impl DeviceInvertOptions<'_> {
    /// Uniform damping, no mask, report failures.
    pub fn uniform(damping: f32) -> Self {
        Self {
            damping: DeviceDamping::Uniform(damping),
            mask: None,
            policy: crate::invert::FailurePolicy::Report,
        }
    }
}

/// A [`FactorSet`] with its layer table uploaded once, ready for set-wide launches.
#[derive(Debug)]
pub struct DeviceFactorSet {
    set: FactorSet,
    desc: CudaSlice<i32>,
}

impl DeviceFactorSet {
    /// The host description.
    pub fn set(&self) -> &FactorSet {
        &self.set
    }

    /// The device address of the layer table (3 i32 per factor), for raw launchers.
    pub fn table_ptr(&self, dev: &CudaDevice) -> u64 {
        self.desc.device_ptr(dev.stream()).0
    }
}

impl CudaDevice {
    /// Uploads a set's layer table, once, for [`CudaDevice::traces`].
    pub fn prepare_set(&self, set: &FactorSet) -> Result<DeviceFactorSet> {
        let table = set.trace_table();
        Ok(DeviceFactorSet {
            set: set.clone(),
            desc: self.upload(&table)?,
        })
    }

    /// Splits a dense row-major `d x d` factor (row stride `ld`) into padded blocks.
    /// A pure copy: non-finite values are copied, not reported.
    pub fn split(
        &self,
        dense: &CudaSlice<f32>,
        ld: usize,
        layout: &BlockLayout,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        check_min_len("dense", layout.dense_len(ld)?, dense.len())?;
        check_len("out", layout.buffer_len(), out.len())?;
        self.check_same_context("dense", dense)?;
        self.check_same_context("out", out)?;
        let (dp, _r) = dense.device_ptr(&self.stream);
        let (op, _w) = out.device_ptr_mut(&self.stream);
        // SAFETY: both buffers belong to this context and their lengths were checked
        // against the layout; distinct CudaSlices never overlap.
        unsafe { raw::split_blocks_f32(self, dp, ld, layout, op) }
    }

    /// Merges padded blocks back into a dense row-major `d x d` matrix (row stride `ld`),
    /// zero off the block diagonal.
    pub fn merge(
        &self,
        blocks: &CudaSlice<f32>,
        layout: &BlockLayout,
        dense: &mut CudaSlice<f32>,
        ld: usize,
    ) -> Result<()> {
        check_len("blocks", layout.buffer_len(), blocks.len())?;
        check_min_len("dense", layout.dense_len(ld)?, dense.len())?;
        self.check_same_context("blocks", blocks)?;
        self.check_same_context("dense", dense)?;
        let (bp, _r) = blocks.device_ptr(&self.stream);
        let (dp, _w) = dense.device_ptr_mut(&self.stream);
        // SAFETY: as in split.
        unsafe { raw::merge_blocks_f32(self, bp, layout, dp, ld) }
    }

    /// Traces of every block (padding included) and every factor (real diagonal only) of a
    /// set, in one launch.
    pub fn traces(
        &self,
        set: &DeviceFactorSet,
        blocks: &CudaSlice<f32>,
        block_traces: &mut CudaSlice<f32>,
        factor_traces: &mut CudaSlice<f32>,
    ) -> Result<()> {
        let s = &set.set;
        check_len("blocks", s.buffer_len(), blocks.len())?;
        check_len("block_traces", s.total_blocks(), block_traces.len())?;
        check_len("factor_traces", s.len(), factor_traces.len())?;
        self.check_same_context("blocks", blocks)?;
        self.check_same_context("set", &set.desc)?;
        let (bp, _r1) = blocks.device_ptr(&self.stream);
        let (dp, _r2) = set.desc.device_ptr(&self.stream);
        let (tp, _w1) = block_traces.device_ptr_mut(&self.stream);
        let (fp, _w2) = factor_traces.device_ptr_mut(&self.stream);
        // SAFETY: the table was built from the same set whose lengths were checked above.
        unsafe { raw::trace_set_f32(self, bp, s.block(), dp, s.len(), tp, fp) }
    }
}

impl CudaDevice {
    /// Batched damped Cholesky inversion of `info.len()` blocks of `b x b` in one launch, no
    /// host synchronization: `out_j = (in_j + l_j I)^-1`, full symmetric (mirrored bit for
    /// bit), lower triangle of the input read. `info` receives per block 0, the failing
    /// 1-based pivot, or a negative code ([`crate::invert`]); failed and skipped blocks keep
    /// their output. `damping_used`, when given, receives each attempted block's final damping.
    ///
    /// The kernel is the one chosen for this card and block count
    /// ([`CudaDevice::choose_invert_kernel`]): the first call for a new block count (at
    /// b <= 128, where there is more than one kernel) may time the kernels on synthetic
    /// blocks and wait for the device, so make it before capturing a CUDA graph (or set
    /// `THOR_CHOICES=off`, or force one with `THOR_FORCE_INVERT`). The blocked kernel's
    /// inverses differ from the standard one's by rounding: see [`crate::choice`].
    pub fn invert(
        &self,
        b: usize,
        input: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        info: &mut CudaSlice<i32>,
        damping_used: Option<&mut CudaSlice<f32>>,
        opts: &DeviceInvertOptions<'_>,
    ) -> Result<()> {
        self.invert_out_of_place(None, b, input, out, info, damping_used, opts)
    }

    /// [`CudaDevice::invert`] in place: failed and skipped blocks keep their input values.
    pub fn invert_in_place(
        &self,
        b: usize,
        blocks: &mut CudaSlice<f32>,
        info: &mut CudaSlice<i32>,
        damping_used: Option<&mut CudaSlice<f32>>,
        opts: &DeviceInvertOptions<'_>,
    ) -> Result<()> {
        crate::layout::check_block_size(b)?;
        check_len("blocks", info.len() * b * b, blocks.len())?;
        self.check_same_context("blocks", blocks)?;
        let kernel = self.invert_kernel_for(b, info.len())?;
        let (p, _w) = blocks.device_ptr_mut(&self.stream);
        self.invert_launch(kernel, b, p, p, info, damping_used, opts)
    }

    #[allow(clippy::too_many_arguments)]
    fn invert_launch(
        &self,
        kernel: raw::InvertKernel,
        b: usize,
        input: u64,
        output: u64,
        info: &mut CudaSlice<i32>,
        damping_used: Option<&mut CudaSlice<f32>>,
        opts: &DeviceInvertOptions<'_>,
    ) -> Result<()> {
        let nb = info.len();
        self.check_same_context("info", info)?;
        let (damping, damping_all, _rd) = match opts.damping {
            DeviceDamping::Uniform(v) => (0, v, None),
            DeviceDamping::PerBlock(d) => {
                check_len("damping", nb, d.len())?;
                self.check_same_context("damping", d)?;
                let (p, g) = d.device_ptr(&self.stream);
                (p, 0.0, Some(g))
            }
        };
        let (mask, _rm) = match opts.mask {
            Some(m) => {
                check_len("mask", nb, m.len())?;
                self.check_same_context("mask", m)?;
                let (p, g) = m.device_ptr(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (used, _wu) = match damping_used {
            Some(u) => {
                check_len("damping_used", nb, u.len())?;
                self.check_same_context("damping_used", u)?;
                let (p, g) = u.device_ptr_mut(&self.stream);
                (p, Some(g))
            }
            None => (0, None),
        };
        let (info_p, _wi) = info.device_ptr_mut(&self.stream);
        let args = raw::InvertArgs {
            b,
            blocks: nb,
            damping,
            damping_all,
            mask,
            policy: opts.policy,
            info: info_p,
            damping_used: used,
        };
        let plan = raw::plan_invert_chol_f32_with(input, output, &args, kernel)?;
        // SAFETY: every buffer belongs to this context and was checked against nb and b;
        // input and output are one allocation (in place) or two distinct CudaSlices.
        unsafe { raw::launch(self, &plan) }
    }

    /// [`CudaDevice::invert`] with the inversion run by `kernel` rather than the one chosen
    /// for this card.
    pub fn invert_with(
        &self,
        kernel: raw::InvertKernel,
        b: usize,
        input: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        info: &mut CudaSlice<i32>,
        opts: &DeviceInvertOptions<'_>,
    ) -> Result<()> {
        self.invert_out_of_place(Some(kernel), b, input, out, info, None, opts)
    }

    /// [`CudaDevice::invert`] by `kernel`, or by the one chosen for this card when `None`.
    #[allow(clippy::too_many_arguments)]
    fn invert_out_of_place(
        &self,
        kernel: Option<raw::InvertKernel>,
        b: usize,
        input: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        info: &mut CudaSlice<i32>,
        damping_used: Option<&mut CudaSlice<f32>>,
        opts: &DeviceInvertOptions<'_>,
    ) -> Result<()> {
        crate::layout::check_block_size(b)?;
        let nb = info.len();
        check_len("input", nb * b * b, input.len())?;
        check_len("out", nb * b * b, out.len())?;
        self.check_same_context("input", input)?;
        self.check_same_context("out", out)?;
        let kernel = match kernel {
            Some(k) => k,
            None => self.invert_kernel_for(b, nb)?,
        };
        let (ip, _r) = input.device_ptr(&self.stream);
        let (op, _w) = out.device_ptr_mut(&self.stream);
        self.invert_launch(kernel, b, ip, op, info, damping_used, opts)
    }
}
