//! The apply's test inputs and reference, shared by the emulator and the GPU tests.

use super::*;
use thor_kernels::cuda::apply::ApplyLayer;
use thor_kernels::layout::FactorSet;
use thor_kernels::{reference, Element};

/// Gradient shapes (out, in) that miss tile boundaries for block size `b`: a layer larger
/// than a block, out = 1, in = 1, a layer smaller than one block, a tall one.
pub fn odd_shapes(b: usize) -> Vec<(usize, usize)> {
    vec![
        (b + 1, 2 * b + 3),
        (1, b - 1),
        (b - 1, 1),
        (10, 7),
        (3 * b, b),
    ]
}

/// Layers of `shapes` with their factors in one set: layer 2 has no G side, layer 3 no A
/// side (one-sided layers), the others both.
pub fn odd_layers(b: usize, shapes: &[(usize, usize)]) -> (FactorSet, Vec<ApplyLayer>) {
    let mut dims = Vec::new();
    let mut layers = Vec::new();
    for (k, &(o, i)) in shapes.iter().enumerate() {
        let g = (k != 2).then(|| {
            dims.push(o);
            dims.len() - 1
        });
        let a = (k != 3).then(|| {
            dims.push(i);
            dims.len() - 1
        });
        layers.push(ApplyLayer {
            out_dim: o,
            in_dim: i,
            g_factor: g,
            a_factor: a,
        });
    }
    (FactorSet::new(b, &dims).unwrap(), layers)
}

/// Symmetric blocks for every factor of `set`, identity in the padding (as the inversion
/// leaves them).
pub fn sym_blocks(set: &FactorSet, seed: u64) -> Vec<f32> {
    let b = set.block();
    let mut r = rng(seed);
    let mut v = normal(&mut r, set.buffer_len());
    for e in set.entries() {
        for j in 0..e.layout.blocks() {
            let k = e.first_block + j;
            let w = e.layout.valid(j);
            let m = &mut v[k * b * b..(k + 1) * b * b];
            for i in 0..b {
                for c in 0..b {
                    if i >= w || c >= w {
                        m[i * b + c] = (i == c) as u8 as f32;
                    } else if c > i {
                        m[i * b + c] = m[c * b + i];
                    }
                }
            }
        }
    }
    v
}

/// The reference output of layer `l`.
pub fn reference_layer<E: Element>(
    set: &FactorSet,
    inv: &[f32],
    lay: &ApplyLayer,
    grad: &[E],
    scale: f32,
) -> Vec<f64> {
    let side = |f: Option<usize>| {
        f.map(|f| {
            let e = &set.entries()[f];
            (
                e.layout,
                f64s(&inv[e.offset()..e.offset() + e.layout.buffer_len()]),
            )
        })
    };
    let (g, a) = (side(lay.g_factor), side(lay.a_factor));
    let grad: Vec<f64> = grad.iter().map(|v| v.to_f32() as f64).collect();
    let out = reference::apply(
        g.as_ref().map(|(l, v)| (l, &v[..])),
        &grad,
        a.as_ref().map(|(l, v)| (l, &v[..])),
        lay.out_dim,
        lay.in_dim,
    )
    .unwrap();
    out.into_iter().map(|v| v * scale as f64).collect()
}
