//! The crate's one error type.

use std::fmt;

/// Every fallible operation of the crate returns this error.
///
/// Errors name the offending argument and, for shapes, the expected and actual
/// values, so that a caller can fix the call without reading the source.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An argument has an impossible value (a block size outside {32, 64, 128, 256},
    /// negative damping, a non-finite scalar or input element, an empty input, ...).
    #[error("invalid argument `{arg}`: {reason}")]
    InvalidArgument {
        /// The argument's name as it appears in the API.
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A buffer or dimension does not match what the other arguments imply.
    #[error("shape mismatch for `{arg}`: expected {expected}, got {actual}")]
    Shape {
        /// The argument's name as it appears in the API.
        arg: &'static str,
        /// What the other arguments imply.
        expected: String,
        /// What was passed.
        actual: String,
    },
    /// A damped block was not positive definite.
    #[error("block {block} is not positive definite (pivot {pivot} is not positive)")]
    NotPositiveDefinite {
        /// Index of the first failing block in the batch.
        block: usize,
        /// LAPACK-style 1-based index of the pivot that was not positive.
        pivot: usize,
    },
    /// No usable CUDA driver or device.
    #[error("no CUDA device: {0}")]
    NoDevice(String),
    /// A kernel module could not be compiled or loaded.
    #[error("kernel load failed: {0}")]
    KernelLoad(String),
    /// A CUDA driver call failed.
    #[error("CUDA driver error: {0}")]
    Driver(String),
    /// A collective of a distributed step failed: a rank left the group, did not arrive
    /// within the group's timeout, or called a different collective. The group is broken
    /// afterwards, and so is the state of every step that used it (see
    /// [`crate::dist`]).
    #[error("communication failed: {0}")]
    Communication(String),
    /// A host buffer whose size the caller chose could not be allocated.
    #[error("out of memory: `{arg}` needs {bytes} bytes")]
    OutOfMemory {
        /// The argument (or buffer) the size came from.
        arg: &'static str,
        /// The bytes asked for.
        bytes: usize,
    },
}

/// Shorthand for `Result<T, thor_kernels::Error>`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An [`Error::InvalidArgument`] for `arg`.
    pub fn invalid(arg: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            arg,
            reason: reason.into(),
        }
    }

    /// The same error with `context: ` in front of its reason (or expected shape), e.g.
    /// `factor 3` for an argument of one factor among many. Other kinds are unchanged.
    pub fn in_context(self, context: impl fmt::Display) -> Self {
        match self {
            Error::InvalidArgument { arg, reason } => {
                Error::invalid(arg, format!("{context}: {reason}"))
            }
            Error::Shape {
                arg,
                expected,
                actual,
            } => Error::Shape {
                arg,
                expected: format!("{context}: {expected}"),
                actual,
            },
            other => other,
        }
    }

    /// An [`Error::Shape`] for `arg`.
    pub fn shape(
        arg: &'static str,
        expected: impl fmt::Display,
        actual: impl fmt::Display,
    ) -> Self {
        Error::Shape {
            arg,
            expected: expected.to_string(),
            actual: actual.to_string(),
        }
    }
}

/// A vector of `len` copies of `value`, or [`Error::OutOfMemory`] naming `arg` when the
/// allocation fails (instead of aborting the process): for every buffer whose size a caller
/// chooses.
pub(crate) fn try_vec<T: Clone>(arg: &'static str, len: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    try_resize(arg, &mut v, len, value)?;
    Ok(v)
}

/// Resizes `v` to `len` elements (new ones `value`), or [`Error::OutOfMemory`] naming `arg`
/// when growing fails; `v` is unchanged on error.
pub(crate) fn try_resize<T: Clone>(
    arg: &'static str,
    v: &mut Vec<T>,
    len: usize,
    value: T,
) -> Result<()> {
    let oom = || Error::OutOfMemory {
        arg,
        bytes: len.saturating_mul(std::mem::size_of::<T>()),
    };
    if len > v.len() {
        v.try_reserve_exact(len - v.len()).map_err(|_| oom())?;
    }
    v.resize(len, value);
    Ok(())
}

/// `a * b` elements, or an error naming `arg` when the product overflows (or passes what a
/// buffer of 4-byte elements can hold).
pub(crate) fn product(arg: &'static str, a: usize, b: usize) -> Result<usize> {
    a.checked_mul(b)
        .filter(|&n| n <= isize::MAX as usize / 4)
        .ok_or_else(|| Error::invalid(arg, format!("{a} x {b} elements overflow")))
}

/// Checks that `buf_len == expected`, naming `arg` otherwise.
pub(crate) fn check_len(arg: &'static str, expected: usize, buf_len: usize) -> Result<()> {
    if buf_len == expected {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("{expected} elements"),
            format!("{buf_len} elements"),
        ))
    }
}

/// Checks that `buf_len >= needed`, naming `arg` otherwise.
pub(crate) fn check_min_len(arg: &'static str, needed: usize, buf_len: usize) -> Result<()> {
    if buf_len >= needed {
        Ok(())
    } else {
        Err(Error::shape(
            arg,
            format!("at least {needed} elements"),
            format!("{buf_len} elements"),
        ))
    }
}

/// Checks that a scalar is finite, naming `arg` otherwise.
pub(crate) fn check_finite(arg: &'static str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::invalid(arg, format!("must be finite, got {value}")))
    }
}
