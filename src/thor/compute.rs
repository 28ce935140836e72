//! Where the optimizer's three heavy operations run: the CPU backend, or a CUDA device. The
//! optimizer's state (statistics, inverses, traces, counters) stays in host memory in both
//! cases, so that saving, loading and the trace rule do not depend on the device; on the GPU
//! each operation uploads its inputs, runs the kernels and downloads its outputs.

use crate::backend::AnyBackend;
use crate::cpu::{self, InvertOptions, Workspace};
#[cfg(feature = "cuda")]
use crate::cuda::CudaDevice;
#[cfg(feature = "cuda")]
use crate::dtype::DType;
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
use crate::layout::BlockLayout;
#[cfg(feature = "cuda")]
use crate::layout::FactorSet;

/// The operations the optimizer needs, on host buffers.
pub(crate) trait Compute: std::fmt::Debug {
    /// A short name for reports.
    fn name(&self) -> String;
    /// Makes room for a layer of this size (the CPU workspace); [`Error::OutOfMemory`] when
    /// it cannot.
    ///
    /// [`Error::OutOfMemory`]: crate::error::Error::OutOfMemory
    fn reserve(&mut self, b: usize, blocks: usize, d_g: usize, d_a: usize) -> Result<()>;
    /// `stats <- beta * stats + alpha * X^T X` on the diagonal blocks (see
    /// [`cpu::accumulate`]); `traces` gets one trace per block.
    #[allow(clippy::too_many_arguments)]
    fn accumulate(
        &mut self,
        x: &[f32],
        rows: usize,
        layout: &BlockLayout,
        alpha: f32,
        beta: f32,
        stats: &mut [f32],
        traces: &mut [f32],
    ) -> Result<()>;
    /// Damped inversion of every block of `stats` into `inv` (failed blocks keep `inv`).
    fn invert(
        &mut self,
        b: usize,
        stats: &[f32],
        inv: &mut [f32],
        info: &mut [i32],
        opts: &InvertOptions<'_>,
    ) -> Result<()>;
    /// `out = blockdiag(G^-1) grad blockdiag(A^-1)`.
    #[allow(clippy::too_many_arguments)]
    fn apply(
        &mut self,
        g: (&BlockLayout, &[f32]),
        grad: &[f32],
        a: (&BlockLayout, &[f32]),
        d_g: usize,
        d_a: usize,
        out: &mut [f32],
    ) -> Result<()>;
}

/// The operations on the chosen backend.
pub(crate) fn on(backend: AnyBackend) -> Box<dyn Compute> {
    match backend {
        AnyBackend::Cpu(_) => Box::new(CpuCompute::new()),
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(d) => Box::new(CudaCompute::new(*d)),
    }
}

/// The CPU backend, with one workspace sized for the largest layer.
#[derive(Debug)]
pub(crate) struct CpuCompute {
    ws: Workspace,
}

impl CpuCompute {
    pub(crate) fn new() -> Self {
        CpuCompute {
            ws: Workspace::new(0),
        }
    }
}

impl Compute for CpuCompute {
    fn name(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
    fn reserve(&mut self, b: usize, blocks: usize, d_g: usize, d_a: usize) -> Result<()> {
        let need =
            cpu::invert_workspace_size(b, blocks).max(cpu::apply_workspace_size(Some(b), d_g, d_a));
        if self.ws.len() < need {
            self.ws = Workspace::try_new(need)?;
        }
        Ok(())
    }
    fn accumulate(
        &mut self,
        x: &[f32],
        rows: usize,
        layout: &BlockLayout,
        alpha: f32,
        beta: f32,
        stats: &mut [f32],
        traces: &mut [f32],
    ) -> Result<()> {
        let d = layout.dim();
        cpu::accumulate(x, rows, d, layout, alpha, beta, stats, traces, &mut self.ws)
    }
    fn invert(
        &mut self,
        b: usize,
        stats: &[f32],
        inv: &mut [f32],
        info: &mut [i32],
        opts: &InvertOptions<'_>,
    ) -> Result<()> {
        cpu::invert(b, stats, inv, info, None, opts, &mut self.ws)
    }
    fn apply(
        &mut self,
        g: (&BlockLayout, &[f32]),
        grad: &[f32],
        a: (&BlockLayout, &[f32]),
        d_g: usize,
        d_a: usize,
        out: &mut [f32],
    ) -> Result<()> {
        cpu::apply(Some(g), grad, Some(a), d_g, d_a, 1.0, out, &mut self.ws)
    }
}

/// A CUDA device: each call uploads, runs the kernels on the device's stream and waits for
/// its outputs.
#[cfg(feature = "cuda")]
#[derive(Debug)]
pub(crate) struct CudaCompute {
    dev: CudaDevice,
}

#[cfg(feature = "cuda")]
impl CudaCompute {
    pub(crate) fn new(dev: CudaDevice) -> Self {
        CudaCompute { dev }
    }
}

#[cfg(feature = "cuda")]
impl Compute for CudaCompute {
    fn name(&self) -> String {
        format!("cuda:{}", self.dev.name().unwrap_or_else(|_| "?".into()))
    }
    fn reserve(&mut self, _b: usize, _blocks: usize, _d_g: usize, _d_a: usize) -> Result<()> {
        Ok(())
    }
    fn accumulate(
        &mut self,
        x: &[f32],
        rows: usize,
        layout: &BlockLayout,
        alpha: f32,
        beta: f32,
        stats: &mut [f32],
        traces: &mut [f32],
    ) -> Result<()> {
        use crate::cuda::accumulate::{AccumulateMode, DeviceInput};
        let d = layout.dim();
        let set = FactorSet::new(layout.block(), &[d])?;
        let mut plan = self
            .dev
            .plan_accumulate(&set, &[rows], DType::F32, AccumulateMode::F32)?;
        let dx = self.dev.upload(x)?;
        let mut blocks = self.dev.upload(stats)?;
        let mut bt = self.dev.zeros::<f32>(layout.blocks())?;
        let mut ft = self.dev.zeros::<f32>(1)?;
        let mut status = self.dev.zeros::<i32>(1)?;
        let input = DeviceInput {
            x: dx.as_view(),
            ld: d,
            alpha,
            beta,
        };
        self.dev.accumulate(
            &mut plan,
            &[input],
            &mut blocks,
            &mut bt,
            &mut ft,
            &mut status,
        )?;
        if self.dev.download(&status)?[0] != 0 {
            return Err(Error::invalid("x", "non-finite value in the input"));
        }
        self.dev.download_into(&blocks, stats)?;
        self.dev.download_into(&bt, traces)
    }
    fn invert(
        &mut self,
        b: usize,
        stats: &[f32],
        inv: &mut [f32],
        info: &mut [i32],
        opts: &InvertOptions<'_>,
    ) -> Result<()> {
        use crate::cpu::Damping;
        use crate::cuda::{DeviceDamping, DeviceInvertOptions};
        let input = self.dev.upload(stats)?;
        let mut out = self.dev.upload(inv)?;
        let mut dinfo = self.dev.zeros::<i32>(info.len())?;
        let per_block;
        let damping = match opts.damping {
            Damping::Uniform(l) => DeviceDamping::Uniform(l),
            Damping::PerBlock(v) => {
                per_block = self.dev.upload(v)?;
                DeviceDamping::PerBlock(&per_block)
            }
        };
        let mask;
        let dopts = DeviceInvertOptions {
            damping,
            mask: match opts.mask {
                Some(m) => {
                    mask = self.dev.upload(m)?;
                    Some(&mask)
                }
                None => None,
            },
            policy: opts.policy,
        };
        self.dev
            .invert(b, &input, &mut out, &mut dinfo, None, &dopts)?;
        self.dev.download_into(&out, inv)?;
        self.dev.download_into(&dinfo, info)
    }
    fn apply(
        &mut self,
        g: (&BlockLayout, &[f32]),
        grad: &[f32],
        a: (&BlockLayout, &[f32]),
        d_g: usize,
        d_a: usize,
        out: &mut [f32],
    ) -> Result<()> {
        use crate::cuda::apply::ApplyLayer;
        let set = FactorSet::new(g.0.block(), &[d_g, d_a])?;
        let mut inv = Vec::with_capacity(set.buffer_len());
        inv.extend_from_slice(g.1);
        inv.extend_from_slice(a.1);
        let layer = ApplyLayer {
            out_dim: d_g,
            in_dim: d_a,
            g_factor: Some(0),
            a_factor: Some(1),
        };
        let mut plan = self.dev.plan_apply(&set, &[layer], DType::F32)?;
        let dinv = self.dev.upload(&inv)?;
        let dgrad = self.dev.upload(grad)?;
        let mut dout = self.dev.zeros::<f32>(out.len())?;
        self.dev.apply(
            &mut plan,
            &dinv,
            &[dgrad.as_view()],
            &mut [dout.as_view_mut()],
            &[1.0],
        )?;
        self.dev.download_into(&dout, out)
    }
}
