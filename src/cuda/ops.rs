//! Safe operations on device buffers: every shape is checked against the buffers before a
//! launcher in [`super::raw`] is called.

use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut};

use super::{raw, CudaDevice};
use crate::error::{check_len, check_min_len, Error, Result};
use crate::layout::{BlockLayout, FactorSet};

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
}

impl CudaDevice {
    fn check_same_context<T>(&self, arg: &'static str, s: &CudaSlice<T>) -> Result<()> {
        if s.context().cu_ctx() == self.ctx.cu_ctx() {
            Ok(())
        } else {
            Err(Error::invalid(
                arg,
                "buffer belongs to another device or context",
            ))
        }
    }

    /// Uploads a set's layer table, once, for [`CudaDevice::traces`].
    pub fn prepare_set(&self, set: &FactorSet) -> Result<DeviceFactorSet> {
        let table: Vec<i32> = set
            .entries()
            .iter()
            .flat_map(|e| {
                [
                    e.first_block as i32,
                    e.layout.blocks() as i32,
                    e.layout.dim() as i32,
                ]
            })
            .collect();
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
        let d = layout.dim();
        if ld < d {
            return Err(Error::shape("ld", format!(">= {d}"), ld));
        }
        check_min_len("dense", (d - 1) * ld + d, dense.len())?;
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
        let d = layout.dim();
        if ld < d {
            return Err(Error::shape("ld", format!(">= {d}"), ld));
        }
        check_len("blocks", layout.buffer_len(), blocks.len())?;
        check_min_len("dense", (d - 1) * ld + d, dense.len())?;
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
