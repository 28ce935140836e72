//! Errors of sampled layers against the f64 reference.

use super::*;

/// Layers whose results are checked against the reference: the fc layer (A split into 17
/// blocks at b = 128, a padded last block) and the first bottleneck conv (many rows). The
/// reference is plain f64 loops, so larger layers would take minutes.
pub(crate) fn sampled(m: &Model) -> Vec<usize> {
    vec![m.layers.len() - 1, 1]
}

/// A layer's results to check: the set's statistics and inverses, its gradient and output.
pub(crate) struct Results<'a> {
    pub(crate) stats: &'a [f32],
    pub(crate) inv: &'a [f32],
    pub(crate) grad: &'a [f32],
    pub(crate) out: &'a [f32],
}

/// Errors of layer `l`'s statistics, inverses and apply against the reference.
pub(crate) fn check_layer(
    m: &Model,
    l: usize,
    inputs: &[Vec<f32>],
    r: Results<'_>,
    damping: f32,
) -> Result<(f64, f64, f64)> {
    let Results {
        stats,
        inv,
        grad,
        out,
    } = r;
    let b = m.set.block();
    let mut acc_err = 0.0f64;
    for f in [2 * l, 2 * l + 1] {
        let e = &m.set.entries()[f];
        let x: Vec<f64> = inputs[f].iter().map(|&v| v as f64).collect();
        let x = m.explicit(f, &x)?;
        let mut want = vec![0.0; e.layout.buffer_len()];
        let n = m.rows[f];
        reference::accumulate(&x, n, m.dims[f], &e.layout, 1.0 / n as f64, 0.0, &mut want)?;
        acc_err = acc_err.max(rel_err(
            &stats[e.offset()..e.offset() + e.layout.buffer_len()],
            &want,
        ));
    }
    let mut res = 0.0f64;
    let e0 = &m.set.entries()[2 * l];
    let e1 = &m.set.entries()[2 * l + 1];
    for k in e0.first_block..e1.first_block + e1.layout.blocks() {
        let s: Vec<f64> = stats[k * b * b..(k + 1) * b * b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        let x: Vec<f64> = inv[k * b * b..(k + 1) * b * b]
            .iter()
            .map(|&v| v as f64)
            .collect();
        res = res.max(reference::inverse_residual(
            &s,
            &x,
            b,
            (damping as f64).sqrt(),
        ));
    }
    let side = |e: &thor_kernels::FactorEntry| -> Vec<f64> {
        inv[e.offset()..e.offset() + e.layout.buffer_len()]
            .iter()
            .map(|&v| v as f64)
            .collect()
    };
    let (ga, aa) = (side(e1), side(e0));
    let g64: Vec<f64> = grad.iter().map(|&v| v as f64).collect();
    let lay = &m.layers[l];
    let scale = 1.0 / lay.positions as f64;
    let want: Vec<f64> = reference::apply(
        Some((&e1.layout, &ga)),
        &g64,
        Some((&e0.layout, &aa)),
        lay.d_g,
        lay.d_a,
    )?
    .into_iter()
    .map(|v| v * scale)
    .collect();
    Ok((acc_err, res, rel_err(out, &want)))
}
