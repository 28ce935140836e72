//! THOR's trace rule, the one vocabulary every backend and entry point shares: the
//! [`Decision`] a statistics step takes for a layer, the [`Thresholds`] it compares against,
//! and the per-layer [`RuleState`]. The host optimizer runs [`step`]; the device rule
//! (`kernels/rule.cu`) runs the same state machine and writes the same [`Decision::code`]s.

use crate::error::{Error, Result};

/// What a statistics step decided for a layer. The discriminants are the codes the device
/// rule writes and the C ABI returns.
#[repr(i32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// The Fisher block moved by more than `w1` (or this is the layer's first finite
    /// trace): the inverses were recomputed.
    Update = 0,
    /// The change lies in `[w2, w1]`, or could not be measured: the previous inverses stay.
    Reuse = 1,
    /// The change fell below `w2`: the layer is frozen from now on.
    Freeze = 2,
    /// The layer was already frozen: nothing was done.
    Frozen = 3,
    /// The layer's activations or output gradients were not finite: its statistics and
    /// inverses were left as they were.
    Skipped = 4,
}

impl Decision {
    /// The decision's code: 0 update, 1 reuse, 2 freeze, 3 frozen, 4 skipped.
    pub const fn code(self) -> i32 {
        self as i32
    }

    /// The decision with code `code`, if any.
    pub const fn from_code(code: i32) -> Option<Decision> {
        Some(match code {
            0 => Decision::Update,
            1 => Decision::Reuse,
            2 => Decision::Freeze,
            3 => Decision::Frozen,
            4 => Decision::Skipped,
            _ => return None,
        })
    }
}

/// The trace-rule thresholds `(w1, w2)`, `w1 >= w2 >= 0`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Above `w1` the inverses are recomputed.
    pub w1: f64,
    /// Below `w2` the layer is frozen; in between the inverses are reused.
    pub w2: f64,
}

impl Thresholds {
    /// THOR's default: (0.01, 0): never freeze.
    pub const THOR: Thresholds = Thresholds { w1: 0.01, w2: 0.0 };
    /// THOR-stop: (0.01, 0.001).
    pub const THOR_STOP: Thresholds = Thresholds {
        w1: 0.01,
        w2: 0.001,
    };
    /// Recompute at every statistics step (unless the trace did not move at all).
    pub const EVERY_TIME: Thresholds = Thresholds { w1: 0.0, w2: 0.0 };

    /// An error naming `thresholds` unless both are finite and `w1 >= w2 >= 0`.
    pub fn validate(&self) -> Result<()> {
        let Thresholds { w1, w2 } = *self;
        if w1.is_finite() && w2.is_finite() && w2 >= 0.0 && w1 >= w2 {
            Ok(())
        } else {
            Err(Error::invalid(
                "thresholds",
                format!("need finite w1 >= w2 >= 0, got ({w1}, {w2})"),
            ))
        }
    }
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds::THOR
    }
}

/// One layer's rule state across statistics steps (the device rule keeps the same).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RuleState {
    /// The last finite layer trace, if any.
    pub prev: Option<f64>,
    /// Frozen for good.
    pub frozen: bool,
}

/// THOR's trace of a layer's damped Fisher block:
/// `tr(A + sqrt(l) I) * tr(G + sqrt(l) I)` from the factors' traces and dimensions.
pub fn fisher_trace(tr_a: f64, dim_a: usize, tr_g: f64, dim_g: usize, damping: f64) -> f64 {
    let s = damping.max(0.0).sqrt();
    (tr_a + s * dim_a as f64) * (tr_g + s * dim_g as f64)
}

/// THOR's rule on two traces: with `delta = |cur - prev| / prev`, `delta > w1` updates,
/// `w2 <= delta <= w1` reuses and `delta < w2` freezes.
///
/// A non-finite trace (either one) never counts as an update: it reuses. A previous trace
/// that is not positive gives no scale to measure against and updates.
pub fn trace_rule(prev: f64, cur: f64, t: Thresholds) -> Decision {
    if !prev.is_finite() || !cur.is_finite() {
        return Decision::Reuse;
    }
    if prev <= 0.0 {
        return Decision::Update;
    }
    let delta = (cur - prev).abs() / prev;
    if delta > t.w1 {
        Decision::Update
    } else if delta >= t.w2 {
        Decision::Reuse
    } else {
        Decision::Freeze
    }
}

/// One statistics step of the rule for a layer whose trace is now `cur`: [`trace_rule`]
/// against the previous finite trace (the first finite trace updates), then `state` moves
/// on. A non-finite trace reuses and keeps the previous trace; a frozen layer stays
/// [`Decision::Frozen`]. Never returns [`Decision::Skipped`]: that is the caller's word for
/// statistics it did not accept.
pub fn step(state: &mut RuleState, cur: f64, t: Thresholds) -> Decision {
    if state.frozen {
        return Decision::Frozen;
    }
    if !cur.is_finite() {
        return Decision::Reuse;
    }
    let d = match state.prev {
        None => Decision::Update,
        Some(prev) => trace_rule(prev, cur, t),
    };
    state.prev = Some(cur);
    state.frozen = d == Decision::Freeze;
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_sequence() {
        let mut s = RuleState::default();
        let seq = [1.0, f64::NAN, 2.0, 2.01, 2.0101, 5.0];
        let got: Vec<_> = seq
            .iter()
            .map(|&t| step(&mut s, t, Thresholds::THOR_STOP))
            .collect();
        use Decision::*;
        assert_eq!(got, vec![Update, Reuse, Update, Reuse, Freeze, Frozen]);
        assert_eq!(s.prev, Some(2.0101));
    }

    #[test]
    fn trace_rule_regions() {
        let t = Thresholds::THOR_STOP;
        assert_eq!(trace_rule(1.0, 1.5, t), Decision::Update);
        assert_eq!(trace_rule(1.0, 1.005, t), Decision::Reuse);
        assert_eq!(trace_rule(1.0, 1.0001, t), Decision::Freeze);
        assert_eq!(trace_rule(1.0, f64::NAN, t), Decision::Reuse);
        assert_eq!(trace_rule(f64::INFINITY, 1.0, t), Decision::Reuse);
        assert_eq!(trace_rule(0.0, 1.0, t), Decision::Update);
        assert_eq!(
            trace_rule(1.0, 1.0, Thresholds::EVERY_TIME),
            Decision::Reuse
        );
        assert_eq!(fisher_trace(2.0, 2, 3.0, 1, 4.0), (2.0 + 4.0) * (3.0 + 2.0));
    }

    #[test]
    fn codes_round_trip_and_thresholds_are_checked() {
        for c in 0..5 {
            assert_eq!(Decision::from_code(c).unwrap().code(), c);
        }
        assert_eq!(Decision::from_code(5), None);
        assert_eq!(Decision::from_code(-1), None);
        for (w1, w2) in [
            (0.001, 0.01),
            (f64::NAN, 0.0),
            (0.01, -1.0),
            (f64::INFINITY, 0.0),
        ] {
            let e = Thresholds { w1, w2 }.validate().unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidArgument {
                        arg: "thresholds",
                        ..
                    }
                ),
                "{e}"
            );
        }
        Thresholds::THOR_STOP.validate().unwrap();
    }
}
