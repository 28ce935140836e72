//! One trait over the CPU and CUDA backends, and run-time selection between them.
//!
//! Code written against [`Backend`] runs unchanged on either device: buffers are the
//! backend's own (`Vec<f32>` on the CPU, device memory on the GPU), moved with
//! [`Backend::upload`] / [`Backend::download`].

#[cfg(feature = "cuda")]
use cudarc::driver::CudaSlice;

use crate::cpu;
#[cfg(feature = "cuda")]
use crate::cuda::{CudaDevice, DeviceFactorSet};
use crate::error::{check_len, Error, Result};
use crate::layout::{BlockLayout, FactorSet};

/// Which backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendKind {
    /// The GPU when one is usable, the CPU otherwise.
    #[default]
    Auto,
    /// The CPU backend.
    Cpu,
    /// CUDA device 0; an error when there is none.
    Cuda,
}

impl std::str::FromStr for BackendKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(BackendKind::Auto),
            "cpu" => Ok(BackendKind::Cpu),
            "cuda" | "gpu" => Ok(BackendKind::Cuda),
            other => Err(Error::invalid(
                "backend",
                format!("expected auto, cpu or cuda, got {other:?}"),
            )),
        }
    }
}

/// The operations every backend provides, on its own f32 buffers.
pub trait Backend {
    /// An f32 buffer on this backend.
    type Buffer;
    /// A [`FactorSet`] prepared for set-wide operations on this backend.
    type Set;

    /// A short name for reports (`cpu`, `cuda:NVIDIA H100 ...`).
    fn name(&self) -> String;
    /// A zero-filled buffer of `len` elements.
    fn zeros(&self, len: usize) -> Result<Self::Buffer>;
    /// A buffer holding a copy of `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buffer>;
    /// Copies `buf` into `host` (same length), waiting for queued work.
    fn download(&self, buf: &Self::Buffer, host: &mut [f32]) -> Result<()>;
    /// Waits for all queued work.
    fn synchronize(&self) -> Result<()>;
    /// Prepares `set` for [`Backend::traces`] (uploads tables once).
    fn prepare_set(&self, set: &FactorSet) -> Result<Self::Set>;
    /// Splits a dense `d x d` factor (row stride `ld`) into padded diagonal blocks.
    fn split(
        &self,
        dense: &Self::Buffer,
        ld: usize,
        layout: &BlockLayout,
        out: &mut Self::Buffer,
    ) -> Result<()>;
    /// Merges diagonal blocks into a dense `d x d` matrix (row stride `ld`).
    fn merge(
        &self,
        blocks: &Self::Buffer,
        layout: &BlockLayout,
        dense: &mut Self::Buffer,
        ld: usize,
    ) -> Result<()>;
    /// Traces of every block and every factor of a set.
    fn traces(
        &self,
        set: &Self::Set,
        blocks: &Self::Buffer,
        block_traces: &mut Self::Buffer,
        factor_traces: &mut Self::Buffer,
    ) -> Result<()>;
}

/// The CPU backend as a [`Backend`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuBackend;

impl Backend for CpuBackend {
    type Buffer = Vec<f32>;
    type Set = FactorSet;

    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<f32>> {
        Ok(host.to_vec())
    }
    fn download(&self, buf: &Vec<f32>, host: &mut [f32]) -> Result<()> {
        check_len("host", buf.len(), host.len())?;
        host.copy_from_slice(buf);
        Ok(())
    }
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    fn prepare_set(&self, set: &FactorSet) -> Result<FactorSet> {
        Ok(set.clone())
    }
    fn split(
        &self,
        dense: &Vec<f32>,
        ld: usize,
        layout: &BlockLayout,
        out: &mut Vec<f32>,
    ) -> Result<()> {
        cpu::split(dense, ld, layout, out)
    }
    fn merge(
        &self,
        blocks: &Vec<f32>,
        layout: &BlockLayout,
        dense: &mut Vec<f32>,
        ld: usize,
    ) -> Result<()> {
        cpu::merge(blocks, layout, dense, ld)
    }
    fn traces(
        &self,
        set: &FactorSet,
        blocks: &Vec<f32>,
        block_traces: &mut Vec<f32>,
        factor_traces: &mut Vec<f32>,
    ) -> Result<()> {
        cpu::traces(set, blocks, block_traces, factor_traces)
    }
}

#[cfg(feature = "cuda")]
impl Backend for CudaDevice {
    type Buffer = CudaSlice<f32>;
    type Set = DeviceFactorSet;

    fn name(&self) -> String {
        format!(
            "cuda:{}",
            CudaDevice::name(self).unwrap_or_else(|_| "?".into())
        )
    }
    fn zeros(&self, len: usize) -> Result<CudaSlice<f32>> {
        CudaDevice::zeros(self, len)
    }
    fn upload(&self, host: &[f32]) -> Result<CudaSlice<f32>> {
        CudaDevice::upload(self, host)
    }
    fn download(&self, buf: &CudaSlice<f32>, host: &mut [f32]) -> Result<()> {
        self.download_into(buf, host)
    }
    fn synchronize(&self) -> Result<()> {
        CudaDevice::synchronize(self)
    }
    fn prepare_set(&self, set: &FactorSet) -> Result<DeviceFactorSet> {
        CudaDevice::prepare_set(self, set)
    }
    fn split(
        &self,
        dense: &CudaSlice<f32>,
        ld: usize,
        layout: &BlockLayout,
        out: &mut CudaSlice<f32>,
    ) -> Result<()> {
        CudaDevice::split(self, dense, ld, layout, out)
    }
    fn merge(
        &self,
        blocks: &CudaSlice<f32>,
        layout: &BlockLayout,
        dense: &mut CudaSlice<f32>,
        ld: usize,
    ) -> Result<()> {
        CudaDevice::merge(self, blocks, layout, dense, ld)
    }
    fn traces(
        &self,
        set: &DeviceFactorSet,
        blocks: &CudaSlice<f32>,
        block_traces: &mut CudaSlice<f32>,
        factor_traces: &mut CudaSlice<f32>,
    ) -> Result<()> {
        CudaDevice::traces(self, set, blocks, block_traces, factor_traces)
    }
}

/// A backend chosen at run time.
#[derive(Debug)]
pub enum AnyBackend {
    /// The CPU backend.
    Cpu(CpuBackend),
    /// A CUDA device.
    #[cfg(feature = "cuda")]
    Cuda(Box<CudaDevice>),
}

impl AnyBackend {
    /// Selects a backend: `Cuda` requires device 0, `Cpu` never touches CUDA, and `Auto`
    /// takes the GPU when one is usable and the CPU otherwise (the reason is returned too).
    ///
    /// This is the one place a backend is chosen: the optimizer, the examples and the
    /// benches all go through it.
    pub fn select(kind: BackendKind) -> Result<(AnyBackend, Option<String>)> {
        match kind {
            BackendKind::Cpu => Ok((AnyBackend::Cpu(CpuBackend), None)),
            BackendKind::Cuda => Ok((AnyBackend::cuda(0)?, None)),
            BackendKind::Auto => match AnyBackend::cuda(0) {
                Ok(d) => Ok((d, None)),
                Err(e) => Ok((AnyBackend::Cpu(CpuBackend), Some(e.to_string()))),
            },
        }
    }

    /// CUDA device `ordinal`; [`Error::NoDevice`] when there is none, or when the crate was
    /// built without its `cuda` feature.
    pub fn cuda(ordinal: usize) -> Result<AnyBackend> {
        #[cfg(feature = "cuda")]
        {
            Ok(AnyBackend::Cuda(Box::new(CudaDevice::new(ordinal)?)))
        }
        #[cfg(not(feature = "cuda"))]
        {
            Err(Error::NoDevice(format!(
                "device {ordinal} requested, but this build has no CUDA support (the `cuda` feature is off)"
            )))
        }
    }

    /// A short name for reports (`cpu (N threads)`, `cuda:<device name>`).
    pub fn name(&self) -> String {
        match self {
            AnyBackend::Cpu(c) => c.name(),
            #[cfg(feature = "cuda")]
            AnyBackend::Cuda(d) => Backend::name(d.as_ref()),
        }
    }
}
