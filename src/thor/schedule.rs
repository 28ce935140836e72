//! THOR's schedules: damping, statistics interval and learning rate, as functions of the
//! (fractional) epoch.

use crate::error::{Error, Result};

/// The damping `l` added (as `sqrt(l)`) to each factor before inversion.
#[derive(Debug, Clone, PartialEq)]
pub enum DampingSchedule {
    /// The same damping throughout.
    Constant(f32),
    /// `l0 * decay^(epoch / every)`: THOR's ResNet-50 recipe is `l0 = 0.03`, `decay = 0.87`,
    /// `every = 10`.
    Decay {
        /// Damping at epoch 0.
        l0: f32,
        /// Factor per `every` epochs, in (0, 1].
        decay: f32,
        /// Epochs per decay step (> 0).
        every: f32,
    },
}

impl DampingSchedule {
    /// The damping at `epoch`.
    pub fn at(&self, epoch: f64) -> f32 {
        match *self {
            DampingSchedule::Constant(l) => l,
            DampingSchedule::Decay { l0, decay, every } => {
                (l0 as f64 * (decay as f64).powf(epoch / every as f64)) as f32
            }
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |r: String| Err(Error::invalid("damping", r));
        match *self {
            DampingSchedule::Constant(l) if !(l.is_finite() && l >= 0.0) => {
                bad(format!("must be finite and >= 0, got {l}"))
            }
            DampingSchedule::Decay { l0, decay, every }
                if !(l0.is_finite()
                    && l0 >= 0.0
                    && decay > 0.0
                    && decay <= 1.0
                    && every.is_finite()
                    && every > 0.0) =>
            {
                bad(format!(
                    "need l0 >= 0, 0 < decay <= 1, every > 0; got l0 {l0}, decay {decay}, every {every}"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// How many steps apart statistics (and inverses) are refreshed.
#[derive(Debug, Clone, PartialEq)]
pub enum IntervalSchedule {
    /// Every `n` steps (MindSpore's ResNet-50 recipe uses 834).
    Fixed(u64),
    /// `(from_epoch, interval)` pairs in increasing epoch order: the last pair whose epoch has
    /// been reached applies.
    Stepwise(Vec<(f64, u64)>),
    /// `initial * factor^epoch`, rounded down, capped at `max`: the interval grows over
    /// training, as in the paper.
    Geometric {
        /// Interval at epoch 0.
        initial: u64,
        /// Growth per epoch (>= 1).
        factor: f64,
        /// Largest interval.
        max: u64,
    },
}

impl IntervalSchedule {
    /// The interval at `epoch`, at least 1.
    pub fn at(&self, epoch: f64) -> u64 {
        let v = match self {
            IntervalSchedule::Fixed(n) => *n,
            IntervalSchedule::Stepwise(list) => list
                .iter()
                .rev()
                .find(|(e, _)| epoch >= *e)
                .or(list.first())
                .map(|&(_, n)| n)
                .unwrap_or(1),
            IntervalSchedule::Geometric {
                initial,
                factor,
                max,
            } => ((*initial as f64) * factor.powf(epoch)).min(*max as f64) as u64,
        };
        v.max(1)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |r: String| Err(Error::invalid("interval", r));
        match self {
            IntervalSchedule::Fixed(0) => bad("must be at least 1".into()),
            IntervalSchedule::Stepwise(l) if l.is_empty() => bad("stepwise list is empty".into()),
            IntervalSchedule::Stepwise(l)
                if l.windows(2)
                    .any(|w| w[0].0.partial_cmp(&w[1].0) != Some(std::cmp::Ordering::Less))
                    || l.iter().any(|p| p.1 == 0 || !p.0.is_finite()) =>
            {
                bad("stepwise epochs must increase and intervals be >= 1".into())
            }
            IntervalSchedule::Geometric {
                initial,
                factor,
                max,
            } if *initial == 0 || !(*factor >= 1.0 && factor.is_finite()) || max < initial => {
                bad(format!(
                "need initial >= 1, factor >= 1, max >= initial; got {initial}, {factor}, {max}"
            ))
            }
            _ => Ok(()),
        }
    }
}

/// THOR's learning rate: `lr0 * (1 - epoch / end)^power`, 0 from `end` on.
pub fn lr_poly(lr0: f32, epoch: f64, end: f64, power: f64) -> f32 {
    if epoch >= end || end <= 0.0 {
        return 0.0;
    }
    (lr0 as f64 * (1.0 - epoch / end).powf(power)) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules() {
        let d = DampingSchedule::Decay {
            l0: 0.03,
            decay: 0.87,
            every: 10.0,
        };
        assert_eq!(d.at(0.0), 0.03);
        assert!((d.at(10.0) - 0.03 * 0.87).abs() < 1e-8);
        assert!((d.at(25.0) as f64 - 0.03 * 0.87f64.powf(2.5)).abs() < 1e-8);
        let s = IntervalSchedule::Stepwise(vec![(0.0, 10), (2.0, 50), (5.0, 100)]);
        assert_eq!(
            (s.at(0.0), s.at(1.9), s.at(2.0), s.at(7.0)),
            (10, 10, 50, 100)
        );
        let g = IntervalSchedule::Geometric {
            initial: 10,
            factor: 2.0,
            max: 60,
        };
        assert_eq!(
            (g.at(0.0), g.at(1.0), g.at(2.5), g.at(9.0)),
            (10, 20, 56, 60)
        );
        assert_eq!(IntervalSchedule::Fixed(7).at(3.0), 7);
        assert!(IntervalSchedule::Fixed(0).validate().is_err());
        assert!(IntervalSchedule::Stepwise(vec![(1.0, 5), (1.0, 6)])
            .validate()
            .is_err());
        assert!(DampingSchedule::Constant(-1.0).validate().is_err());
        assert_eq!(lr_poly(0.1, 0.0, 10.0, 2.0), 0.1);
        assert!((lr_poly(0.1, 5.0, 10.0, 2.0) - 0.025).abs() < 1e-8);
        assert_eq!(lr_poly(0.1, 12.0, 10.0, 2.0), 0.0);
    }
}
