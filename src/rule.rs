//! THOR's trace rule, the one vocabulary every backend and entry point shares: the
//! [`Decision`] a statistics step takes for a layer, the [`Thresholds`] it compares against,
//! and the per-layer [`RuleState`]. The host optimizer runs [`step`]; the device rule
//! (`kernels/rule.cu`) runs the same state machine and writes the same [`Decision::code`]s.

use crate::error::{Error, Result};
use crate::layout::FactorSet;

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

/// Per-factor state of a whole-model factor step, kept by its rule and read by its
/// accumulation: the factor holds statistics (else the next accepted ones replace the
/// initial identity).
pub const FACTOR_HAS_STATS: u8 = 1;
/// Per-factor state: the factor's layer froze; it is no longer accumulated.
pub const FACTOR_FROZEN: u8 = 2;

/// A layer of a whole-model factor step (the device step, the CPU step): which factors of the set are its A and G (either may be
/// absent), and the range of blocks its decision masks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleLayer {
    /// Index of the A factor in the set.
    pub a_factor: Option<usize>,
    /// Index of the G factor in the set.
    pub g_factor: Option<usize>,
    /// First block of the layer in the set.
    pub first_block: usize,
    /// Number of blocks the layer's decision applies to.
    pub blocks: usize,
}

impl RuleLayer {
    /// The usual layout: factors `2l` (A) and `2l + 1` (G) of a set built from
    /// `[d_A0, d_G0, d_A1, d_G1, ...]`, masking both factors' blocks.
    pub fn pairs(set: &FactorSet) -> Vec<RuleLayer> {
        set.entries()
            .chunks(2)
            .enumerate()
            .map(|(l, e)| RuleLayer {
                a_factor: Some(2 * l),
                g_factor: (e.len() == 2).then_some(2 * l + 1),
                first_block: e[0].first_block,
                blocks: e.iter().map(|x| x.layout.blocks()).sum(),
            })
            .collect()
    }

    /// Checks `layers` for a whole-model factor step over `set`: every factor of the set
    /// belongs to exactly one layer (a layer's A and G distinct), and each layer's block
    /// range is exactly its factors' blocks, which lie back to back. So the rule writes a
    /// factor's state and a block's mask from one layer's thread only, and a layer's
    /// update masks exactly the blocks whose inversion it counts.
    pub fn check_step_layers(set: &FactorSet, layers: &[RuleLayer]) -> Result<()> {
        let n = set.len();
        let mut owner = vec![None; n];
        for (i, l) in layers.iter().enumerate() {
            if l.a_factor.is_some() && l.a_factor == l.g_factor {
                return Err(Error::invalid(
                    "layers",
                    format!("layer {i}: its A and G are the same factor"),
                ));
            }
            let mut mine: Vec<usize> = Vec::with_capacity(2);
            for f in [l.a_factor, l.g_factor].into_iter().flatten() {
                match owner.get_mut(f) {
                    Some(Some(j)) => {
                        return Err(Error::invalid(
                            "layers",
                            format!("factor {f} belongs to layers {j} and {i}"),
                        ))
                    }
                    Some(o) => *o = Some(i),
                    None => {
                        return Err(Error::invalid(
                            "layers",
                            format!("layer {i}: factor {f} not in the set of {n}"),
                        ))
                    }
                }
                mine.push(f);
            }
            mine.sort_by_key(|&f| set.entries()[f].first_block);
            let mut end = mine.first().map(|&f| set.entries()[f].first_block);
            for &f in &mine {
                let e = &set.entries()[f];
                if end != Some(e.first_block) {
                    return Err(Error::invalid(
                        "layers",
                        format!("layer {i}: its factors' blocks are not back to back"),
                    ));
                }
                end = Some(e.first_block + e.layout.blocks());
            }
            let want = (
                mine.first().map_or(0, |&f| set.entries()[f].first_block),
                end.unwrap_or(0),
            );
            if (l.first_block, l.first_block.saturating_add(l.blocks)) != want {
                return Err(Error::invalid(
                    "layers",
                    format!(
                        "layer {i}: blocks {}..{} are not its factors' blocks {}..{}",
                        l.first_block,
                        l.first_block.saturating_add(l.blocks),
                        want.0,
                        want.1
                    ),
                ));
            }
        }
        if let Some(f) = owner.iter().position(|o| o.is_none()) {
            return Err(Error::invalid(
                "layers",
                format!("factor {f} belongs to no layer"),
            ));
        }
        Ok(())
    }

    /// The device table of `layers` (6 i32 per layer: A factor, G factor (-1 when absent),
    /// d_A, d_G, first block, block count), checked against `set`: every factor in the set,
    /// every block range inside it, every value representable as the kernel's `int`.
    pub fn table(set: &FactorSet, layers: &[RuleLayer]) -> Result<Vec<i32>> {
        let int = |i: usize, what: &str, v: usize| -> Result<i32> {
            i32::try_from(v).map_err(|_| {
                Error::invalid("layers", format!("layer {i}: {what} {v} above 2^31 - 1"))
            })
        };
        let mut table = Vec::with_capacity(6 * layers.len());
        for (i, l) in layers.iter().enumerate() {
            let dim = |f: Option<usize>| -> Result<(i32, i32)> {
                match f {
                    None => Ok((-1, 0)),
                    Some(k) => {
                        let e = set.entry(k).map_err(|_| {
                            Error::invalid(
                                "layers",
                                format!("layer {i}: factor {k} not in the set of {}", set.len()),
                            )
                        })?;
                        Ok((int(i, "factor", k)?, int(i, "dimension", e.layout.dim())?))
                    }
                }
            };
            let (a, da) = dim(l.a_factor)?;
            let (g, dg) = dim(l.g_factor)?;
            let end = l.first_block.checked_add(l.blocks);
            if end.is_none_or(|e| e > set.total_blocks()) {
                return Err(Error::invalid(
                    "layers",
                    format!(
                        "layer {i}: blocks {} + {} past the set's {}",
                        l.first_block,
                        l.blocks,
                        set.total_blocks()
                    ),
                ));
            }
            table.extend([
                a,
                g,
                da,
                dg,
                int(i, "first block", l.first_block)?,
                int(i, "block count", l.blocks)?,
            ]);
        }
        Ok(table)
    }
}
