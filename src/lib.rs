//! # thor-kernels
//!
//! Kernels for THOR (Chen et al., "THOR, Trace-Based Hardware-Driven Layer-Oriented Natural
//! Gradient Descent Computation", AAAI 2021): block-diagonal Fisher factors, their fused
//! accumulation and traces, batched damped Cholesky inversion, and the preconditioner apply,
//! on CUDA GPUs (kernels in `kernels/`, loaded through `cudarc`) and on the CPU.
//!
//! Layers, from the bottom: [`layout`] (sizes, offsets, padding), [`reference`](mod@reference) (f64 oracle),
//! [`cpu`] (the CPU backend), [`cuda`] (device, module loading, kernels), and [`backend`]
//! (one trait over both, chosen at run time).

#![warn(missing_docs)]

pub mod backend;
pub mod choice;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dist;
pub mod dtype;
pub mod error;
pub mod invert;
pub mod layout;
pub mod patches;
pub mod reference;
pub mod rule;
pub mod shapes;
pub mod step;
pub mod thor;

/// The cudarc version this crate is built against (0.19), for sharing streams and buffers
/// with it (`CudaDevice::from_stream`) without a version mismatch.
#[cfg(feature = "cuda")]
pub use cudarc;
/// The `half` crate whose `f16` / `bf16` the element types are.
pub use half;

pub use backend::{Backend, BackendKind};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use layout::{BlockLayout, FactorEntry, FactorSet, SUPPORTED_BLOCK_SIZES};
pub use patches::{Conv2dGeometry, InputLayout, Patches, TensorLayout};
