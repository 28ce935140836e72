//! Between candle tensors and the THOR engine: on the CPU through host slices, on CUDA
//! through candle's device buffers, read and written in place on candle's stream.

use candle_core::{DType, Device, Tensor};
use thor_kernels::backend::{AnyBackend, CpuBackend};
use thor_kernels::thor::{LayerId, Thor, ThorConfig};
use thor_kernels::Patches;

use crate::error::{Error, Result};

/// The engine for variables on `device`: the CPU backend, or the library's CUDA backend on
/// candle's stream of that device.
pub(crate) fn engine(device: &Device, cfg: ThorConfig) -> Result<Thor> {
    let backend = match device {
        Device::Cpu => AnyBackend::Cpu(CpuBackend),
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            let dev = thor_kernels::cuda::CudaDevice::from_stream(d.cuda_stream())?;
            AnyBackend::Cuda(Box::new(dev))
        }
        #[allow(unreachable_patterns)]
        other => {
            return Err(Error::Device {
                var: "<variables>".into(),
                reason: format!(
                    "THOR runs on the CPU{}; the variables are on {other:?}",
                    if cfg!(feature = "cuda") {
                        " and CUDA"
                    } else {
                        " (build thor-candle with its `cuda` feature for CUDA)"
                    }
                ),
            })
        }
    };
    Ok(Thor::with_backend(cfg, backend)?)
}

/// `t` as contiguous f32.
#[cfg(feature = "cuda")]
fn f32_contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(t.to_dtype(DType::F32)?.contiguous()?)
}

/// Host copy of `t` as f32 (row-major).
fn host(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// Hands a linear layer's statistics to the engine: `acts` `[rows, inputs]`, `grads`
/// `[rows, d_g]` (the summed loss's output gradients).
pub(crate) fn observe_matrix(
    thor: &mut Thor,
    id: LayerId,
    acts: &Tensor,
    grads: &Tensor,
) -> Result<()> {
    let (rows, _) = acts.dims2()?;
    match acts.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (inputs, d_g) = (acts.dims()[1], grads.dims2()?.1);
            let (a, g) = (f32_contiguous(acts)?, f32_contiguous(grads)?);
            cuda::with_view(&a, |av| {
                cuda::with_view(&g, |gv| thor.observe_device(id, av, inputs, gv, d_g, rows))
            })???;
        }
        _ => {
            thor.observe(id, &host(acts)?, &host(grads)?, rows)?;
        }
    }
    Ok(())
}

/// Hands a conv layer's statistics to the engine: its NCHW input and output gradient,
/// described by `input_view` and `grad_view` for contiguous tensors.
pub(crate) fn observe_conv(
    thor: &mut Thor,
    id: LayerId,
    input: &Tensor,
    input_view: Patches,
    grad: &Tensor,
    grad_view: Patches,
) -> Result<()> {
    match input.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let (a, g) = (f32_contiguous(input)?, f32_contiguous(grad)?);
            cuda::with_view(&a, |av| {
                cuda::with_view(&g, |gv| {
                    thor.observe_conv_device(id, av, input_view, gv, grad_view)
                })
            })???;
        }
        _ => {
            thor.observe_conv(id, &host(input)?, input_view, &host(grad)?, grad_view)?;
        }
    }
    Ok(())
}

/// The preconditioned gradient of layer `id`: `grad` `[d_g, d_a]` in, f32 `[d_g, d_a]` out,
/// on `grad`'s device.
pub(crate) fn precondition(thor: &mut Thor, id: LayerId, grad: &Tensor) -> Result<Tensor> {
    let (d_g, d_a) = grad.dims2()?;
    match grad.device() {
        #[cfg(feature = "cuda")]
        Device::Cuda(dev) => {
            let g = f32_contiguous(grad)?;
            let stream = dev.cuda_stream();
            let mut out = stream
                .alloc_zeros::<f32>(d_g * d_a)
                .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
            cuda::with_view(&g, |gv| {
                thor.precondition_device(id, gv, &mut out.as_view_mut())
            })??;
            Ok(cuda::wrap(out, dev.clone(), (d_g, d_a)))
        }
        device => {
            let mut out = vec![0.0f32; d_g * d_a];
            thor.precondition(id, &host(grad)?, &mut out)?;
            Ok(Tensor::from_vec(out, (d_g, d_a), device)?)
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::{CudaDevice, CudaStorage};
    use candle_core::op::BackpropOp;
    use candle_core::{Shape, Storage, Tensor};
    use thor_kernels::cudarc::driver::{CudaSlice, CudaView};

    use crate::error::{Error, Result};

    /// Calls `f` with a view of contiguous f32 CUDA tensor `t`'s elements.
    pub(super) fn with_view<R>(t: &Tensor, f: impl FnOnce(&CudaView<'_, f32>) -> R) -> Result<R> {
        let (storage, layout) = t.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            return Err(Error::Device {
                var: "<tensor>".into(),
                reason: "expected a CUDA tensor".into(),
            });
        };
        let slice = s.as_cuda_slice::<f32>()?;
        let start = layout.start_offset();
        let view = slice.slice(start..start + t.elem_count());
        Ok(f(&view))
    }

    /// A candle tensor owning `slice`.
    pub(super) fn wrap(slice: CudaSlice<f32>, dev: CudaDevice, shape: impl Into<Shape>) -> Tensor {
        let storage = CudaStorage::wrap_cuda_slice(slice, dev);
        Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false)
    }
}
