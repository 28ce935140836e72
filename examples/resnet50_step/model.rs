//! The workload: the ResNet-50 v1.5 factor set, rows per factor, the input pattern.

use super::*;

/// The workload: factor `2l` is layer `l`'s A, `2l + 1` its G.
pub(crate) struct Model {
    pub(crate) layers: Vec<LayerShape>,
    pub(crate) set: FactorSet,
    pub(crate) rows: Vec<usize>,
    pub(crate) dims: Vec<usize>,
}

impl Model {
    pub(crate) fn new(batch: usize, block: usize) -> Result<Self> {
        let layers = shapes::resnet50();
        let dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
        let rows: Vec<usize> = layers
            .iter()
            .flat_map(|l| [l.rows(batch), l.rows(batch)])
            .collect();
        Ok(Model {
            set: FactorSet::new(block, &dims)?,
            layers,
            rows,
            dims,
        })
    }

    /// Elements of all inputs.
    pub(crate) fn input_elems(&self) -> usize {
        self.rows.iter().zip(&self.dims).map(|(n, d)| n * d).sum()
    }

    /// Flops of the accumulation as counted for rates: 2 N d b per factor (the diagonal
    /// blocks; symmetry lets the kernels do a little more than half of it).
    pub(crate) fn acc_flops(&self) -> f64 {
        let b = self.set.block() as f64;
        self.rows
            .iter()
            .zip(&self.dims)
            .map(|(&n, &d)| 2.0 * n as f64 * d as f64 * b)
            .sum()
    }

    /// Flops of the apply: 2 b per gradient element and side.
    pub(crate) fn apply_flops(&self) -> f64 {
        let b = self.set.block() as f64;
        self.layers
            .iter()
            .map(|l| 4.0 * b * (l.d_a * l.d_g) as f64)
            .sum()
    }
}

/// Input `f`: a fixed normal sample repeated (gigabytes are filled in seconds), offset per
/// factor. The values only need to be finite and varied.
pub(crate) fn fill(pattern: &[f32], n: usize, f: usize) -> Vec<f32> {
    (0..n)
        .map(|i| pattern[(i + 7919 * f) % pattern.len()])
        .collect()
}

pub(crate) fn pattern() -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut r = rand::rngs::StdRng::seed_from_u64(50);
    (0..(1 << 20) + 3)
        .map(|_| r.sample::<f32, _>(rand_distr::StandardNormal))
        .collect()
}
