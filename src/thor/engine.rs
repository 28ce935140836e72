//! Where a layer's state lives and its heavy operations run: the optimizer's per-layer
//! engine is the whole-model factor step for the layer's two factors (A, G), on the CPU
//! ([`CpuThorStep`]) or resident on a CUDA device (`DeviceThorStep`: statistics, inverses,
//! the rule's state and the counters stay in device memory; only the caller's host inputs
//! go up and the decision and the preconditioned gradient come down), plus the apply. Both
//! follow one definition of a statistics step, checked against each other by the tests.

use crate::backend::AnyBackend;
use crate::cpu::step::{CpuThorStep, HostStepInput};
use crate::cpu::{self, Workspace};
#[cfg(feature = "cuda")]
use crate::cuda::{apply::DeviceApply, step::DeviceThorStep, CudaDevice};
#[cfg(feature = "cuda")]
use crate::error::Error;
use crate::error::Result;
use crate::layout::FactorSet;
#[cfg(feature = "cuda")]
use crate::patches::InputLayout;
use crate::rule::{Decision, RuleLayer};
use crate::step::{StepConfig, StepSnapshot};
use crate::thor::LayerCounters;
#[cfg(feature = "cuda")]
use cudarc::driver::CudaSlice;

/// One layer's engine. Every call takes the optimizer's backend (the device handle lives
/// there, once for all layers).
pub(crate) trait LayerEngine: std::fmt::Debug + Send {
    /// A statistics step from host inputs: A's input `a` (`d_a` columns, the ones column of
    /// a bias included) and G's `g` (`d_g` columns), the same rows, each a matrix or a
    /// convolution's patches; returns the rule's decision.
    fn observe(
        &mut self,
        be: &AnyBackend,
        a: HostStepInput<'_, f32>,
        g: HostStepInput<'_, f32>,
        damping: f32,
    ) -> Result<Decision>;
    /// `out = G^-1 grad A^-1` with the current inverses, `[d_g, d_a]` host arrays.
    fn precondition(&mut self, be: &AnyBackend, grad: &[f32], out: &mut [f32]) -> Result<()>;
    /// The layer's counters.
    fn counters(&self, be: &AnyBackend) -> Result<LayerCounters>;
    /// The layer's state on the host.
    fn snapshot(&self, be: &AnyBackend) -> Result<StepSnapshot>;
    /// Takes over a saved state (checked first; nothing changes on error).
    fn restore(&mut self, be: &AnyBackend, s: &StepSnapshot) -> Result<()>;
    /// The decision of the layer's last statistics step (on a device: waits for it).
    fn last_decision(&self, be: &AnyBackend) -> Result<Decision>;
    /// On one rank of a group: every rank's statistics of the layer's blocks (a
    /// collective); nothing to do otherwise.
    fn gather_statistics(&mut self, be: &AnyBackend) -> Result<()> {
        let _ = be;
        Ok(())
    }
    /// On one rank of a group: the layer's blocks this rank owns; `None` otherwise.
    fn owned_blocks(&self) -> Option<usize> {
        None
    }
    /// A statistics step from device inputs (CUDA only): A's f32 input at `a.0` as `a.1`
    /// describes it (with `append_ones`, a matrix of `d_a - 1` columns that a ones column
    /// is appended to), G's at `g.0`; the same rows. Queues the step and returns without
    /// waiting.
    ///
    /// # Safety
    /// The addresses point to the f32 their layouts read, of the backend's device, valid
    /// and unchanged until the queued work completes.
    #[cfg(feature = "cuda")]
    unsafe fn observe_raw(
        &mut self,
        be: &AnyBackend,
        a: (u64, InputLayout),
        append_ones: bool,
        g: (u64, InputLayout),
        damping: f32,
    ) -> Result<()>;
    /// `out = G^-1 grad A^-1` on device arrays `[d_g, d_a]` (CUDA only), queued; `out` may
    /// be `grad` (in place).
    ///
    /// # Safety
    /// `grad` and `out` point to `d_g * d_a` f32 of the backend's device, equal or
    /// disjoint, valid until the queued work completes.
    #[cfg(feature = "cuda")]
    unsafe fn precondition_raw(&mut self, be: &AnyBackend, grad: u64, out: u64) -> Result<()>;
}

/// The error of a device-input call on the CPU backend.
#[cfg(feature = "cuda")]
fn needs_device() -> crate::error::Error {
    crate::error::Error::invalid(
        "backend",
        "device pointers need an optimizer on a CUDA device (this one runs on the CPU)",
    )
}

/// The factor set of a layer (A first, then G) and its one rule layer.
fn layer_set(block: usize, d_a: usize, d_g: usize) -> Result<(FactorSet, Vec<RuleLayer>)> {
    let set = FactorSet::new(block, &[d_a, d_g])?;
    let layers = RuleLayer::pairs(&set);
    Ok((set, layers))
}

/// A new engine for a layer with factors of `d_a` and `d_g` on `be`.
pub(crate) fn new_engine(
    be: &AnyBackend,
    block: usize,
    d_a: usize,
    d_g: usize,
    cfg: StepConfig,
) -> Result<Box<dyn LayerEngine>> {
    let (set, layers) = layer_set(block, d_a, d_g)?;
    match be {
        AnyBackend::Cpu(_) => {
            let step = CpuThorStep::new::<f32>(&set, &layers, cfg)?;
            let ws = Workspace::try_new(cpu::apply_workspace_size(Some(block), d_g, d_a))?;
            Ok(Box::new(CpuLayer { step, ws, d_a, d_g }))
        }
        #[cfg(feature = "cuda")]
        AnyBackend::Cuda(dev) => Ok(Box::new(CudaLayer::new(dev, set, &layers, cfg, None)?)),
    }
}

/// One rank's end of a group, shared by the optimizer's layers: host collectives for the
/// CPU backend, device collectives for CUDA.
#[derive(Debug, Clone)]
pub(crate) enum ThorComm {
    /// Collectives on host buffers.
    Host(crate::dist::SharedComm),
    /// Collectives on device buffers, on the device's stream.
    #[cfg(feature = "cuda")]
    Device(crate::cuda::dist::SharedDeviceComm),
}

impl ThorComm {
    fn world(&self) -> usize {
        use crate::dist::Communicator;
        match self {
            ThorComm::Host(c) => c.world(),
            #[cfg(feature = "cuda")]
            ThorComm::Device(c) => crate::cuda::dist::DeviceCommunicator::world(c),
        }
    }

    /// What this rank has moved so far.
    pub(crate) fn counters(&self) -> crate::dist::CommCounters {
        use crate::dist::Communicator;
        match self {
            ThorComm::Host(c) => c.counters(),
            #[cfg(feature = "cuda")]
            ThorComm::Device(c) => crate::cuda::dist::DeviceCommunicator::counters(c),
        }
    }
}

/// A new engine on `be` for one rank of a group: the layer's blocks owned round-robin from
/// rank `first_rank` on, collectives through `comm` (shared by the model's layers); with
/// host collectives, also the slot that joins the layer's collectives to a batch
/// ([`crate::thor::Thor::observe_layers`]).
pub(crate) fn new_distributed_engine(
    be: &AnyBackend,
    block: usize,
    d_a: usize,
    d_g: usize,
    cfg: StepConfig,
    comm: &ThorComm,
    first_rank: usize,
) -> Result<(Box<dyn LayerEngine>, Option<crate::dist::BatchSlot>)> {
    use crate::dist::OwnershipPlan;
    let (set, layers) = layer_set(block, d_a, d_g)?;
    let plan = OwnershipPlan::new(&set, comm.world())?.rotated(first_rank);
    match (be, comm) {
        (AnyBackend::Cpu(_), ThorComm::Host(c)) => {
            let (part, slot) = crate::dist::Participant::new(c.clone());
            let step = CpuThorStep::new_distributed_with_plan::<f32>(
                &set,
                &layers,
                cfg,
                Box::new(part),
                plan,
            )?;
            let ws = Workspace::try_new(cpu::apply_workspace_size(Some(block), d_g, d_a))?;
            Ok((Box::new(CpuLayer { step, ws, d_a, d_g }), Some(slot)))
        }
        #[cfg(feature = "cuda")]
        (AnyBackend::Cuda(dev), ThorComm::Device(c)) => Ok((
            Box::new(CudaLayer::new(
                dev,
                set,
                &layers,
                cfg,
                Some((Box::new(c.clone()), plan)),
            )?),
            None,
        )),
        #[cfg(feature = "cuda")]
        _ => Err(Error::invalid(
            "backend",
            "the communicator does not move this backend's buffers",
        )),
    }
}

/// A layer on the CPU backend.
#[derive(Debug)]
struct CpuLayer {
    step: CpuThorStep,
    ws: Workspace,
    d_a: usize,
    d_g: usize,
}

impl LayerEngine for CpuLayer {
    fn observe(
        &mut self,
        _: &AnyBackend,
        a: HostStepInput<'_, f32>,
        g: HostStepInput<'_, f32>,
        damping: f32,
    ) -> Result<Decision> {
        self.step.run(&[a, g], damping)?;
        Ok(self.step.decisions()[0])
    }

    fn precondition(&mut self, _: &AnyBackend, grad: &[f32], out: &mut [f32]) -> Result<()> {
        // On a broken group this rank's inverses may differ from the others'.
        self.step.check_usable()?;
        let set = self.step.set();
        let (ea, eg) = (&set.entries()[0], &set.entries()[1]);
        let inv = self.step.inverses();
        cpu::apply(
            Some((
                &eg.layout,
                &inv[eg.offset()..eg.offset() + eg.layout.buffer_len()],
            )),
            grad,
            Some((
                &ea.layout,
                &inv[ea.offset()..ea.offset() + ea.layout.buffer_len()],
            )),
            self.d_g,
            self.d_a,
            1.0,
            out,
            &mut self.ws,
        )
    }

    fn counters(&self, _: &AnyBackend) -> Result<LayerCounters> {
        Ok(self.step.counters()[0])
    }

    fn snapshot(&self, _: &AnyBackend) -> Result<StepSnapshot> {
        self.step.snapshot()
    }

    fn restore(&mut self, _: &AnyBackend, s: &StepSnapshot) -> Result<()> {
        self.step.restore(s)
    }

    fn last_decision(&self, _: &AnyBackend) -> Result<Decision> {
        Ok(self.step.decisions()[0])
    }

    fn gather_statistics(&mut self, _: &AnyBackend) -> Result<()> {
        self.step.gather_statistics()
    }

    fn owned_blocks(&self) -> Option<usize> {
        let rank = self.step.comm_rank()?;
        self.step.plan().map(|p| p.owned(rank).len())
    }

    #[cfg(feature = "cuda")]
    unsafe fn observe_raw(
        &mut self,
        _: &AnyBackend,
        _: (u64, InputLayout),
        _: bool,
        _: (u64, InputLayout),
        _: f32,
    ) -> Result<()> {
        Err(needs_device())
    }

    #[cfg(feature = "cuda")]
    unsafe fn precondition_raw(&mut self, _: &AnyBackend, _: u64, _: u64) -> Result<()> {
        Err(needs_device())
    }
}

/// A layer resident on a CUDA device: its step, the staging buffers its host inputs go
/// through, and its apply plan, all allocated once (staging grows with the rows).
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct CudaLayer {
    step: DeviceThorStep,
    apply: DeviceApply,
    x_a: CudaSlice<f32>,
    x_g: CudaSlice<f32>,
    grad: CudaSlice<f32>,
    out: CudaSlice<f32>,
    d_a: usize,
    d_g: usize,
}

#[cfg(feature = "cuda")]
impl CudaLayer {
    /// The layer's engine; with `dist`, on one rank of a group (its communicator and the
    /// layer's block ownership).
    fn new(
        dev: &CudaDevice,
        set: FactorSet,
        layers: &[RuleLayer],
        cfg: StepConfig,
        dist: Option<(
            Box<dyn crate::cuda::dist::DeviceCommunicator>,
            crate::dist::OwnershipPlan,
        )>,
    ) -> Result<Self> {
        use crate::cuda::apply::ApplyLayer;
        let (d_a, d_g) = (set.entries()[0].layout.dim(), set.entries()[1].layout.dim());
        // Planned for one row; the first statistics step plans for its rows.
        let (rows, f32) = ([1, 1], crate::DType::F32);
        let step = match dist {
            None => dev.new_thor_step(&set, &rows, f32, layers, cfg)?,
            Some((comm, plan)) => {
                // A transport that waits for the stream at each collective loses nothing by
                // waiting for the rule's mask too: its all-gather carries the updated
                // inverses only. NCCL keeps the step free of waits (every owned inverse).
                let updated_only = comm.waits_for_host();
                let mut step = dev.new_distributed_thor_step_with_plan(
                    &set, &rows, f32, layers, cfg, comm, plan,
                )?;
                step.set_gather_updated_only(updated_only)?;
                step
            }
        };
        let apply = dev.plan_apply(
            &set,
            &[ApplyLayer {
                out_dim: d_g,
                in_dim: d_a,
                g_factor: Some(1),
                a_factor: Some(0),
            }],
            crate::DType::F32,
        )?;
        Ok(CudaLayer {
            step,
            apply,
            x_a: dev.zeros(d_a)?,
            x_g: dev.zeros(d_g)?,
            grad: dev.zeros(d_a * d_g)?,
            out: dev.zeros(d_a * d_g)?,
            d_a,
            d_g,
        })
    }

    fn dev(be: &AnyBackend) -> Result<&CudaDevice> {
        match be {
            AnyBackend::Cuda(d) => Ok(d),
            AnyBackend::Cpu(_) => Err(Error::invalid(
                "backend",
                "a device layer used with the CPU backend",
            )),
        }
    }
}

/// Grows `buf` to `len` elements at least (a new allocation only when it is too small).
#[cfg(feature = "cuda")]
fn ensure(dev: &CudaDevice, buf: &mut CudaSlice<f32>, len: usize) -> Result<()> {
    if buf.len() < len {
        *buf = dev.zeros(len)?;
    }
    Ok(())
}

#[cfg(feature = "cuda")]
impl LayerEngine for CudaLayer {
    fn observe(
        &mut self,
        be: &AnyBackend,
        a: HostStepInput<'_, f32>,
        g: HostStepInput<'_, f32>,
        damping: f32,
    ) -> Result<Decision> {
        use crate::cuda::step::StepInput;
        let dev = Self::dev(be)?;
        // The elements each layout reads (checked), uploaded as they are: a conv layer's
        // tensors go up without their patches.
        let na = a.layout.check(self.d_a)?;
        let ng = g.layout.check(self.d_g)?;
        crate::error::check_min_len("acts", na, a.x.len())?;
        crate::error::check_min_len("out_grads", ng, g.x.len())?;
        self.step
            .set_rows(dev, &[a.layout.rows(), g.layout.rows()])?;
        ensure(dev, &mut self.x_a, na)?;
        ensure(dev, &mut self.x_g, ng)?;
        let s = dev.stream();
        s.memcpy_htod(&a.x[..na], &mut self.x_a.slice_mut(0..na))?;
        s.memcpy_htod(&g.x[..ng], &mut self.x_g.slice_mut(0..ng))?;
        let inputs = [
            StepInput {
                x: self.x_a.slice(0..na),
                layout: a.layout,
            },
            StepInput {
                x: self.x_g.slice(0..ng),
                layout: g.layout,
            },
        ];
        // One graph launch per step once captured: the damping is read from device memory,
        // so the schedule does not recapture (a change of rows does).
        self.step.run_graph(dev, &inputs, damping)?;
        // On a rank of a group: the ranks agreed on the damping and the steps run (the
        // decision is read now anyway).
        self.step.check_group(dev)?;
        self.last_decision(be)
    }

    fn precondition(&mut self, be: &AnyBackend, grad: &[f32], out: &mut [f32]) -> Result<()> {
        let dev = Self::dev(be)?;
        let n = self.d_a * self.d_g;
        dev.stream()
            .memcpy_htod(&grad[..n], &mut self.grad.slice_mut(0..n))?;
        dev.apply(
            &mut self.apply,
            self.step.inverses(),
            &[self.grad.slice(0..n)],
            &mut [self.out.slice_mut(0..n)],
            &[1.0],
        )?;
        dev.stream()
            .memcpy_dtoh(&self.out.slice(0..n), &mut out[..n])?;
        dev.synchronize()
    }

    fn counters(&self, be: &AnyBackend) -> Result<LayerCounters> {
        Ok(self.step.read_counters(Self::dev(be)?)?[0])
    }

    fn snapshot(&self, be: &AnyBackend) -> Result<StepSnapshot> {
        self.step.snapshot(Self::dev(be)?)
    }

    fn restore(&mut self, be: &AnyBackend, s: &StepSnapshot) -> Result<()> {
        let dev = Self::dev(be)?;
        self.step.restore(dev, s)?;
        dev.synchronize()
    }

    fn last_decision(&self, be: &AnyBackend) -> Result<Decision> {
        let dev = Self::dev(be)?;
        // On a rank of a group: the ranks agreed (a wait, as the decision's read is).
        self.step.read_group_fault(dev)?;
        Ok(self.step.read_decisions(dev)?[0])
    }

    fn gather_statistics(&mut self, be: &AnyBackend) -> Result<()> {
        self.step.gather_statistics(Self::dev(be)?)
    }

    fn owned_blocks(&self) -> Option<usize> {
        self.step.owned_blocks()
    }

    unsafe fn observe_raw(
        &mut self,
        be: &AnyBackend,
        a: (u64, InputLayout),
        append_ones: bool,
        g: (u64, InputLayout),
        damping: f32,
    ) -> Result<()> {
        use cudarc::driver::sys;
        use cudarc::driver::DevicePtrMut;
        let dev = Self::dev(be)?;
        let rows = a.1.rows();
        g.1.check(self.d_g)?;
        if g.1.rows() != rows {
            return Err(Error::shape(
                "out_grads",
                format!("{rows} rows (as acts)"),
                g.1.rows(),
            ));
        }
        let (acts, acts_ld) = match (append_ones, a.1) {
            (false, layout) => {
                layout.check(self.d_a)?;
                self.step.set_rows(dev, &[rows, rows])?;
                // The caller's buffers are read in place: no copy.
                // SAFETY: this function's contract.
                return unsafe { self.step.run_raw(dev, &[a, g], damping) };
            }
            (true, InputLayout::Matrix { ld, .. }) => (a.0, ld),
            (true, InputLayout::Patches(_)) => {
                return Err(Error::invalid(
                    "acts",
                    "patches carry their own ones column (Patches::ones)",
                ))
            }
        };
        let inputs = self.d_a - 1;
        crate::layout::strided_len("acts_ld", rows, acts_ld, inputs)?;
        self.step.set_rows(dev, &[rows, rows])?;
        // With a bias, A's input is [acts 1]: the activations go to the staging buffer,
        // the ones column is set, both queued on the stream (no host copy, no wait).
        let na = rows * self.d_a;
        ensure(dev, &mut self.x_a, na)?;
        let s = dev.stream();
        let (xp, _guard) = self.x_a.device_ptr_mut(s);
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            srcHost: std::ptr::null(),
            srcDevice: acts,
            srcArray: std::ptr::null_mut(),
            srcPitch: acts_ld * 4,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_DEVICE,
            dstHost: std::ptr::null_mut(),
            dstDevice: xp,
            dstArray: std::ptr::null_mut(),
            dstPitch: self.d_a * 4,
            WidthInBytes: inputs * 4,
            Height: rows,
        };
        // SAFETY: the source is the caller's `rows x inputs` (stride acts_ld) f32 of this
        // device (the contract); the destination is the staging buffer of at least
        // `rows * d_a` f32, guarded until the step is queued.
        unsafe {
            sys::cuMemcpy2DAsync_v2(&copy, s.cu_stream()).result()?;
            sys::cuMemsetD2D32Async(
                xp + 4 * inputs as u64,
                self.d_a * 4,
                1.0f32.to_bits(),
                1,
                rows,
                s.cu_stream(),
            )
            .result()?;
            self.step.run_raw(
                dev,
                &[(xp, InputLayout::matrix(rows, self.d_a)), g],
                damping,
            )
        }
    }

    unsafe fn precondition_raw(&mut self, be: &AnyBackend, grad: u64, out: u64) -> Result<()> {
        use crate::cuda::apply::LayerBuffers;
        use cudarc::driver::DevicePtr;
        use cudarc::driver::DevicePtrMut;
        let dev = Self::dev(be)?;
        let s = dev.stream();
        let n = self.d_a * self.d_g;
        // In place, the gradient is read from a copy (the apply kernel supports in place at
        // some block sizes only).
        let (sp, _staged) = self.grad.device_ptr_mut(s);
        let src = if grad == out {
            // SAFETY: `grad` points to `n` f32 (this function's contract); the staging
            // buffer holds `n` f32 and is guarded until the apply is queued.
            unsafe {
                cudarc::driver::result::memcpy_dtod_async(sp, grad, n * 4, s.cu_stream())?;
            }
            sp
        } else {
            grad
        };
        let (ip, _guard) = self.step.inverses().device_ptr(s);
        // SAFETY: the inverses are the step's (guarded until queued); `src` and `out` are
        // disjoint device arrays of `n` f32 (the caller's, or the staging copy).
        unsafe {
            self.apply.launch_raw(
                dev,
                ip,
                &[LayerBuffers {
                    grad: src,
                    out,
                    scale: 1.0,
                }],
            )
        }
    }
}
