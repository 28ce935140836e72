//! THOR for [candle](https://github.com/huggingface/candle): drop-in `Linear` and `Conv2d`
//! layers that record what THOR's Kronecker factors need, and [`ThorOptimizer`], which runs
//! THOR's factor step and trace rule ([`thor_kernels::thor::Thor`]) and preconditions those
//! layers' gradients before a momentum-SGD update; every other variable gets the plain
//! momentum-SGD update ([`MomentumSgd`]).
//!
//! ```no_run
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use thor_candle::{ThorLayers, ThorOptimizer, ThorParams};
//!
//! # fn batches() -> Vec<(Tensor, Tensor)> { unimplemented!() }
//! let dev = Device::Cpu;
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
//! let layers = ThorLayers::new();
//! let fc1 = thor_candle::linear(784, 256, vb.pp("fc1"), &layers)?;
//! let fc2 = thor_candle::linear(256, 10, vb.pp("fc2"), &layers)?;
//! let mut opt = ThorOptimizer::new(&varmap, &layers, ThorParams::new(0.05))?;
//! for (step, (x, y)) in batches().into_iter().enumerate() {
//!     opt.set_epoch(step as f64 / 60.0);
//!     let logits = fc2.forward(&fc1.forward(&x)?.relu()?)?;
//!     let loss = candle_nn::loss::cross_entropy(&logits, &y)?;
//!     opt.backward_step(&loss)?;
//! }
//! # Ok::<(), thor_candle::Error>(())
//! ```
//!
//! # How the statistics are obtained
//!
//! On a statistics step (every `interval` steps, [`Thor::needs_statistics`]) each THOR layer
//! keeps its input and adds a zero variable to its output: candle's backward pass then
//! gives the gradient of the loss with respect to the output, with no hook and no second
//! pass. Between statistics steps the layers are exactly candle-nn's. The loss is taken to
//! be a mean over the batch (candle-nn's losses are): the output gradients are multiplied by
//! the batch size (dim 0 of the layer's input) to give the gradients of the summed loss that
//! the factors expect ([`LossMean`] for a mean over tokens or a sum).
//!
//! Forward passes whose output never reaches the loss (evaluation between steps) leave no
//! statistics: only outputs that received a gradient count, and whatever was recorded is
//! dropped at the next step. After [`ThorLayers::set_training`]`(false)` the layers record
//! nothing at all.
//!
//! # Devices
//!
//! On `Device::Cpu` the library's CPU backend runs the factor step and the apply. With the
//! `cuda` feature, on `Device::Cuda` the library's kernels run on candle's stream, reading
//! candle's buffers in place: nothing goes through the host except the finiteness check's
//! and the KL clip's scalars.

mod bridge;
mod error;
mod layers;
mod optimizer;
mod sgd;

pub use error::{Error, Result};
pub use layers::{
    conv2d, conv2d_no_bias, linear, linear_b, linear_no_bias, ThorConv2d, ThorLayer, ThorLayerId,
    ThorLayers, ThorLinear,
};
pub use optimizer::{LossMean, ThorOptimizer, ThorParams};
pub use sgd::{MomentumSgd, ParamsMomentumSgd};
/// The optimizer engine and its configuration, re-exported.
pub use thor_kernels::thor::{
    ConvNorm, DampingSchedule, Decision, IntervalSchedule, LayerCounters, Thor, ThorConfig,
    Thresholds,
};
