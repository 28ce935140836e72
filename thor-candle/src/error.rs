//! The crate's error type.

/// What can go wrong in the layers and the optimizer. Errors of the checks (every kind but
/// `Candle` and `Thor` failures past them) leave the optimizer's state and the variables as
/// they were.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A candle operation failed (its own error, shape or device mismatches in a forward
    /// pass included).
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The THOR engine refused an argument or failed (see [`thor_kernels::Error`]).
    #[error(transparent)]
    Thor(#[from] thor_kernels::Error),
    /// A THOR layer the optimizer does not know: made after the optimizer, or its weight is
    /// not a variable of the optimizer's `VarMap`.
    #[error("THOR layer `{layer}`: {reason}")]
    UnknownLayer {
        /// The layer's name (its `VarBuilder` prefix).
        layer: String,
        /// Why it is unknown.
        reason: String,
    },
    /// A gradient holds a NaN or an infinity: the step was not taken.
    #[error("the gradient of `{var}` is not finite (NaN or infinite): step not taken")]
    NonFinite {
        /// The variable's name in the `VarMap`.
        var: String,
    },
    /// A variable or a gradient is on another device than the optimizer, or in a dtype it
    /// cannot update.
    #[error("`{var}`: {reason}")]
    Device {
        /// The variable's name.
        var: String,
        /// What does not match.
        reason: String,
    },
    /// An invalid setting (a negative learning rate, a `ThorLayers` already driven by
    /// another optimizer, ...).
    #[error("invalid `{arg}`: {reason}")]
    Invalid {
        /// The setting.
        arg: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A saved optimizer state that does not fit this optimizer (another model, another
    /// version, damaged); nothing was loaded.
    #[error("optimizer state: {0}")]
    State(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
