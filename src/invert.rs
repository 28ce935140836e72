//! What the batched damped inversion shares across backends: the failure policy and the
//! meaning of the per-block `info` codes.

use crate::error::{Error, Result};

/// `info` code of a block the mask skipped (its output is untouched).
pub const INFO_SKIPPED: i32 = -1;
/// `info` code of a block whose per-block damping was negative or not finite (the block is
/// left as it was), on both backends; a bad uniform damping is an error instead.
pub const INFO_BAD_DAMPING: i32 = -2;

/// What to do with a block whose damped matrix is not positive definite.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum FailurePolicy {
    /// Report the failing pivot in `info` and leave the block's output as it was.
    #[default]
    Report,
    /// Refactor the block with damping `max(l, floor) * factor`, up to `max_retries` times,
    /// then report as [`FailurePolicy::Report`] if it still fails. The damping finally used
    /// is reported per block.
    Retry {
        /// Damping multiplier per retry (> 1).
        factor: f32,
        /// Retries after the first attempt.
        max_retries: u32,
        /// Damping a retry starts from when the block's damping is smaller (> 0), so that
        /// undamped blocks can be retried too.
        floor: f32,
    },
}

impl FailurePolicy {
    /// Retry with the usual settings: damping x 10, at most 3 times, from at least 1e-6.
    pub fn retry() -> Self {
        FailurePolicy::Retry {
            factor: 10.0,
            max_retries: 3,
            floor: 1e-6,
        }
    }

    /// Checks the retry settings; returns (max_retries, factor, floor) for the kernels.
    pub(crate) fn params(&self) -> Result<(u32, f32, f32)> {
        match *self {
            FailurePolicy::Report => Ok((0, 1.0, 0.0)),
            FailurePolicy::Retry {
                factor,
                max_retries,
                floor,
            } => {
                if !(factor > 1.0 && factor.is_finite()) {
                    return Err(Error::invalid(
                        "policy.factor",
                        format!("must be finite and > 1, got {factor}"),
                    ));
                }
                if !(floor > 0.0 && floor.is_finite()) {
                    return Err(Error::invalid(
                        "policy.floor",
                        format!("must be finite and > 0, got {floor}"),
                    ));
                }
                if max_retries > 64 {
                    return Err(Error::invalid(
                        "policy.max_retries",
                        format!("at most 64, got {max_retries}"),
                    ));
                }
                Ok((max_retries, factor, floor))
            }
        }
    }
}

/// Turns the first failed block of an `info` array into an error:
/// [`Error::NotPositiveDefinite`] for a failed pivot, [`Error::InvalidArgument`] for bad
/// per-block damping. Skipped blocks are not failures.
pub fn check_info(info: &[i32]) -> Result<()> {
    match info.iter().position(|&p| p > 0 || p == INFO_BAD_DAMPING) {
        Some(block) if info[block] > 0 => Err(Error::NotPositiveDefinite {
            block,
            pivot: info[block] as usize,
        }),
        Some(block) => Err(Error::invalid(
            "damping",
            format!("block {block}: damping negative or not finite"),
        )),
        None => Ok(()),
    }
}
