//! THOR's whole factor step, one scenario for every executor of the device step (the GPU in
//! tests/gpu/step.rs, the kernel emulator in tests/emulated.rs) against `Thor` on the CPU fed
//! the same batches: the same decisions (update, reuse, freeze, frozen, skipped), the same
//! counters, statistics (first ones replacing the initial identity, then the EMA) and
//! inverses within the DESIGN.md tolerances.

use super::*;
use thor_kernels::invert::FailurePolicy;
use thor_kernels::layout::FactorSet;
use thor_kernels::rule::{Decision, Thresholds};
use thor_kernels::thor::{DampingSchedule, IntervalSchedule, LayerId, LayerKind, Thor, ThorConfig};

/// Statistics steps of the scenario.
pub const STEPS: usize = 8;

/// Three layers (d_A, d_G); the A input of layer l at step k is `base * sqrt(scale2[l][k])`
/// (the G input stays), so a layer's trace follows the EMA of `scale2` and the decisions are
/// known with wide margins: layer 0 U U R S U R F -, layer 1 U F - - - - - -, layer 2
/// U U R U R U R U (S: a NaN in its G input at step 3; -: frozen).
pub struct StepScenario {
    pub b: usize,
    pub decay: f32,
    pub damping: f32,
    pub rows: usize,
    pub thresholds: Thresholds,
    pub dims: [(usize, usize); 3],
    scale2: [[f32; STEPS]; 3],
    nan_step: usize,
    pub want: [[Decision; STEPS]; 3],
    base: Vec<(Vec<f32>, Vec<f32>)>,
}

impl StepScenario {
    pub fn new() -> Self {
        use Decision::*;
        let dims = [(40usize, 10usize), (33, 5), (20, 8)];
        let rows = 64;
        let mut r = rng(77);
        let base = dims
            .iter()
            .map(|&(a, g)| (normal(&mut r, rows * a), normal(&mut r, rows * g)))
            .collect();
        StepScenario {
            b: 32,
            decay: 0.5,
            damping: 1e-6,
            rows,
            thresholds: Thresholds { w1: 0.5, w2: 0.1 },
            dims,
            scale2: [
                [1.0, 4.0, 4.2, 1.0, 9.0, 9.05, 7.6125, 7.6125],
                [1.0; STEPS],
                [1.0, 4.0, 1.0, 4.0, 1.0, 4.0, 1.0, 4.0],
            ],
            nan_step: 3,
            want: [
                [
                    Update, Update, Reuse, Skipped, Update, Reuse, Freeze, Frozen,
                ],
                [
                    Update, Freeze, Frozen, Frozen, Frozen, Frozen, Frozen, Frozen,
                ],
                [Update, Update, Reuse, Update, Reuse, Update, Reuse, Update],
            ],
            base,
        }
    }

    /// Factor dimensions in the set's order: A0, G0, A1, G1, ...
    pub fn flat_dims(&self) -> Vec<usize> {
        self.dims.iter().flat_map(|&(a, g)| [a, g]).collect()
    }

    /// The model's factor set.
    pub fn set(&self) -> FactorSet {
        FactorSet::new(self.b, &self.flat_dims()).unwrap()
    }

    /// Partners of the factors (a layer's A and G succeed or fail together).
    pub fn partners(&self) -> Vec<Option<usize>> {
        (0..2 * self.dims.len()).map(|f| Some(f ^ 1)).collect()
    }

    /// The optimizer on the CPU with the scenario's settings and layers.
    pub fn thor(&self) -> (Thor, Vec<LayerId>) {
        let mut thor = Thor::new(ThorConfig {
            block: self.b,
            stat_decay: self.decay,
            damping: DampingSchedule::Constant(self.damping),
            interval: IntervalSchedule::Fixed(1),
            thresholds: self.thresholds,
            backend: thor_kernels::BackendKind::Cpu,
            policy: FailurePolicy::retry(),
            kl_clip: None,
            conv_norm: thor_kernels::thor::ConvNorm::PerPosition,
        })
        .unwrap();
        let ids = self
            .dims
            .iter()
            .map(|&(a, g)| {
                thor.add_layer(LayerKind::Linear {
                    inputs: a,
                    outputs: g,
                    bias: false,
                })
                .unwrap()
            })
            .collect();
        (thor, ids)
    }

    /// The batch of step `k`, one input per factor (A0, G0, A1, ...), `rows x d` dense.
    pub fn batch(&self, k: usize) -> Vec<Vec<f32>> {
        let mut xs = Vec::new();
        for (l, (a, g)) in self.base.iter().enumerate() {
            let s = self.scale2[l][k].sqrt();
            xs.push(a.iter().map(|v| v * s).collect());
            let mut g = g.clone();
            if l == 0 && k == self.nan_step {
                g[5] = f32::NAN;
            }
            xs.push(g);
        }
        xs
    }

    /// Hands the batch of step `k` to the optimizer, checking its decisions against the
    /// scenario's.
    pub fn observe(&self, thor: &mut Thor, ids: &[LayerId], k: usize) -> Vec<Decision> {
        let xs = self.batch(k);
        let d: Vec<Decision> = ids
            .iter()
            .enumerate()
            .map(|(l, id)| {
                thor.observe(*id, &xs[2 * l], &xs[2 * l + 1], self.rows)
                    .unwrap()
            })
            .collect();
        for (l, got) in d.iter().enumerate() {
            assert_eq!(*got, self.want[l][k], "the optimizer, layer {l} step {k}");
        }
        d
    }

    /// The statistics after step `k` in f64, from the f64 reference alone (not from any
    /// backend): per factor, the first accepted batch replaces the identity, later accepted
    /// ones follow the EMA; skipped and frozen steps leave them.
    pub fn reference_stats(&self, k: usize) -> Vec<f64> {
        let set = self.set();
        let b = self.b;
        let mut s = vec![0.0f64; set.buffer_len()];
        for j in 0..set.total_blocks() {
            for i in 0..b {
                s[j * b * b + i * b + i] = 1.0;
            }
        }
        let mut has = vec![false; set.len()];
        for step in 0..=k {
            let xs = self.batch(step);
            for l in 0..self.dims.len() {
                if matches!(self.want[l][step], Decision::Skipped | Decision::Frozen) {
                    continue;
                }
                for f in [2 * l, 2 * l + 1] {
                    let e = &set.entries()[f];
                    let d = e.layout.dim();
                    let (alpha, beta) = if has[f] {
                        (
                            (1.0 - self.decay as f64) / self.rows as f64,
                            self.decay as f64,
                        )
                    } else {
                        (1.0 / self.rows as f64, 0.0)
                    };
                    let x: Vec<f64> = xs[f].iter().map(|&v| v as f64).collect();
                    let range = e.offset()..e.offset() + e.layout.buffer_len();
                    thor_kernels::reference::accumulate(
                        &x,
                        self.rows,
                        d,
                        &e.layout,
                        alpha,
                        beta,
                        &mut s[range],
                    )
                    .unwrap();
                    has[f] = true;
                }
            }
        }
        s
    }

    /// Checks a device step's results after step `k` against the optimizer: decisions (one
    /// code per layer), counters (six per layer), statistics and inverses (the set's
    /// buffers), the accumulation's status (3 for a frozen layer's factors).
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &self,
        k: usize,
        thor: &Thor,
        ids: &[LayerId],
        decisions: &[i32],
        counters: &[u64],
        stats: &[f32],
        inv: &[f32],
        status: &[i32],
    ) {
        let (set, b, nl) = (self.set(), self.b, self.dims.len());
        let want: Vec<i32> = (0..nl).map(|l| self.want[l][k].code()).collect();
        assert_eq!(decisions, want, "decisions at step {k}");
        for (l, id) in ids.iter().enumerate() {
            let want = thor.counters(*id).unwrap().to_array();
            assert_eq!(
                counters[6 * l..6 * l + 6],
                want,
                "counters of layer {l} at step {k}"
            );
            if self.want[l][k] == Decision::Frozen {
                assert_eq!(
                    status[2 * l..2 * l + 2],
                    [3, 3],
                    "frozen layer {l} at step {k}"
                );
            }
        }
        // Statistics against the f64 reference first (so that the backends are not only
        // compared with each other).
        let want_stats = self.reference_stats(k);
        let scale = want_stats.iter().fold(1f64, |m, v| m.max(v.abs()));
        let err = stats
            .iter()
            .zip(&want_stats)
            .fold(0f64, |m, (&a, &w)| m.max((a as f64 - w).abs()))
            / scale;
        assert!(
            err <= 1e-5,
            "statistics against the reference at step {k}: {err:e}"
        );
        let arrays = thor_arrays(&thor.to_bytes().unwrap(), nl);
        for (l, arr) in arrays.iter().enumerate() {
            for side in 0..2 {
                let f = 2 * l + side;
                let e = &set.entries()[f];
                let range = e.first_block * b * b..(e.first_block + e.layout.blocks()) * b * b;
                let max_err = |got: &[f32], want: &[f32]| {
                    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                    got.iter()
                        .zip(want)
                        .fold(0f32, |m, (a, c)| m.max((a - c).abs()))
                        / scale
                };
                let err = max_err(&stats[range.clone()], &arr[side]);
                assert!(err <= 1e-5, "statistics of factor {f} at step {k}: {err:e}");
                let err = max_err(&inv[range], &arr[2 + side]);
                assert!(err <= 1e-4, "inverses of factor {f} at step {k}: {err:e}");
            }
        }
    }
}

/// The optimizer's arrays per layer from its state bytes (see src/thor/state.rs):
/// A statistics, G statistics, A inverses, G inverses.
pub fn thor_arrays(bytes: &[u8], n_layers: usize) -> Vec<[Vec<f32>; 4]> {
    let u64_at = |p: usize| u64::from_le_bytes(bytes[p..p + 8].try_into().unwrap()) as usize;
    // magic 8, version 4, block, layers, step, next statistics step, epoch: 8 each.
    let mut p = 52;
    (0..n_layers)
        .map(|_| {
            // 6 shape words, flags, 6 counters, last trace.
            p += 14 * 8;
            std::array::from_fn(|_| {
                let n = u64_at(p);
                p += 8;
                let v = bytes[p..p + 4 * n]
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                p += 4 * n;
                v
            })
        })
        .collect()
}
