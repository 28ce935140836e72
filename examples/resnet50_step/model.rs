//! The workload: the ResNet-50 v1.5 factor set, rows per factor, the input pattern.

use super::*;
use thor_kernels::{InputLayout, Patches, TensorLayout};

/// The workload: factor `2l` is layer `l`'s A, `2l + 1` its G. A conv layer's factors read
/// its NCHW tensors (the input `[N, C_in, H, W]`, the output gradient `[N, C_out, Ho, Wo]`)
/// through implicit im2col: no patch matrix, no transpose; the fc layer's are matrices.
pub(crate) struct Model {
    pub(crate) layers: Vec<LayerShape>,
    pub(crate) set: FactorSet,
    pub(crate) rows: Vec<usize>,
    pub(crate) dims: Vec<usize>,
    /// How each factor's input lies in its buffer.
    pub(crate) inputs: Vec<InputLayout>,
}

impl Model {
    pub(crate) fn new(batch: usize, block: usize) -> Result<Self> {
        let layers = shapes::resnet50();
        let dims: Vec<usize> = layers.iter().flat_map(|l| [l.d_a, l.d_g]).collect();
        let rows: Vec<usize> = layers
            .iter()
            .flat_map(|l| [l.rows(batch), l.rows(batch)])
            .collect();
        let mut inputs = Vec::with_capacity(dims.len());
        for l in &layers {
            match l.conv {
                Some(g) => {
                    let [ho, wo] = g.output()?;
                    inputs.push(InputLayout::Patches(Patches::new(
                        g,
                        batch,
                        TensorLayout::Nchw,
                    )));
                    inputs.push(InputLayout::Patches(Patches::positions(
                        l.d_g,
                        ho,
                        wo,
                        batch,
                        TensorLayout::Nchw,
                    )));
                }
                None => {
                    inputs.push(InputLayout::matrix(batch, l.d_a));
                    inputs.push(InputLayout::matrix(batch, l.d_g));
                }
            }
        }
        Ok(Model {
            set: FactorSet::new(block, &dims)?,
            layers,
            rows,
            dims,
            inputs,
        })
    }

    /// Elements of factor `f`'s input buffer (a tensor for a conv layer).
    pub(crate) fn input_len(&self, f: usize) -> usize {
        self.inputs[f]
            .check(self.dims[f])
            .expect("a checked layout")
    }

    /// Elements of all input buffers (what the implicit path reads).
    pub(crate) fn input_elems(&self) -> usize {
        (0..self.set.len()).map(|f| self.input_len(f)).sum()
    }

    /// Elements of the explicit path's inputs: every conv layer's patch matrix
    /// `[N Ho Wo, C_in kh kw]` and transposed output gradient `[N Ho Wo, C_out]`.
    pub(crate) fn explicit_elems(&self) -> usize {
        self.rows.iter().zip(&self.dims).map(|(n, d)| n * d).sum()
    }

    /// Factor `f`'s input as the explicit path would have it (rows x d, row-major), for
    /// the reference.
    pub(crate) fn explicit(&self, f: usize, x: &[f64]) -> Result<Vec<f64>> {
        match &self.inputs[f] {
            InputLayout::Patches(p) => reference::im2col(x, p),
            InputLayout::Matrix { .. } => Ok(x.to_vec()),
        }
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
