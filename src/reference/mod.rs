//! Plain, obviously-correct f64 implementations of every operation: the oracle of every test.
//!
//! Nothing here is fast. Each function is a direct transcription of the math in the design
//! notes, with plain loops, so that a reader can check it against the paper line by line.
//! Shapes are validated and reported as errors like everywhere else in the crate.

use crate::error::{check_len, check_min_len, Error, Result};
use crate::layout::{BlockLayout, FactorSet};

/// Splits a dense row-major `d x d` factor into its padded diagonal blocks `[nb, b, b]`.
pub fn split(dense: &[f64], layout: &BlockLayout) -> Result<Vec<f64>> {
    let (d, b) = (layout.dim(), layout.block());
    check_len("dense", d * d, dense.len())?;
    let mut out = vec![0.0; layout.buffer_len()];
    for j in 0..layout.blocks() {
        for r in 0..b {
            for c in 0..b {
                let (gr, gc) = (j * b + r, j * b + c);
                out[j * b * b + r * b + c] = if gr < d && gc < d {
                    dense[gr * d + gc]
                } else if r == c {
                    1.0
                } else {
                    0.0
                };
            }
        }
    }
    Ok(out)
}

/// Merges diagonal blocks back into a dense row-major `d x d` matrix: the block-diagonal
/// entries from the blocks, zero elsewhere; padding is dropped.
pub fn merge(blocks: &[f64], layout: &BlockLayout) -> Result<Vec<f64>> {
    let (d, b) = (layout.dim(), layout.block());
    check_len("blocks", layout.buffer_len(), blocks.len())?;
    let mut out = vec![0.0; d * d];
    for gr in 0..d {
        for gc in 0..d {
            if gr / b == gc / b {
                let j = gr / b;
                out[gr * d + gc] = blocks[j * b * b + (gr % b) * b + gc % b];
            }
        }
    }
    Ok(out)
}

/// Covariance accumulation into the block layout: for every diagonal block `j`,
/// `S_j <- beta * S_j + alpha * X_j^T X_j` with `X_j` the j-th column slice of the
/// row-major `rows x d` matrix `x` (row stride `ld >= d`); padding is set to identity.
/// With `beta == 0` the old blocks are not read (NaN there does not propagate).
pub fn accumulate(
    x: &[f64],
    rows: usize,
    ld: usize,
    layout: &BlockLayout,
    alpha: f64,
    beta: f64,
    blocks: &mut [f64],
) -> Result<()> {
    let (d, b) = (layout.dim(), layout.block());
    if ld < d {
        return Err(Error::shape("ld", format!(">= {d}"), ld));
    }
    if rows == 0 {
        return Err(Error::invalid("rows", "at least one row is needed"));
    }
    check_min_len("x", (rows - 1) * ld + d, x.len())?;
    check_len("blocks", layout.buffer_len(), blocks.len())?;
    for j in 0..layout.blocks() {
        let s = &mut blocks[j * b * b..(j + 1) * b * b];
        for r in 0..b {
            for c in 0..b {
                let (gr, gc) = (j * b + r, j * b + c);
                s[r * b + c] = if gr < d && gc < d {
                    let mut acc = 0.0;
                    for n in 0..rows {
                        acc += x[n * ld + gr] * x[n * ld + gc];
                    }
                    // beta = 0 replaces: the old contents are not read (BLAS convention).
                    let old = if beta == 0.0 {
                        0.0
                    } else {
                        beta * s[r * b + c]
                    };
                    old + alpha * acc
                } else if r == c {
                    1.0
                } else {
                    0.0
                };
            }
        }
    }
    Ok(())
}

/// The patch matrix of a convolution (im2col), written out from the definition: row
/// `(n, oh, ow)` (n slowest), column `(ci, ki, kj)` (kj fastest) holds input element
/// `(n, ci, oh * sh - ph + ki * dh, ow * sw - pw + kj * dw)`, 0 outside the input; with
/// `p.ones` a last column of ones. `x` is read through `p.strides`. Returns
/// `[rows, c_in * kh * kw (+ 1)]` row-major. The oracle of [`crate::patches`].
pub fn im2col(x: &[f64], p: &crate::patches::Patches) -> Result<Vec<f64>> {
    let g = &p.geometry;
    let [ho, wo] = g.output()?;
    check_min_len("x", p.span()?, x.len())?;
    let [kh, kw] = g.kernel;
    let d = g.c_in * kh * kw + p.ones as usize;
    let mut out = Vec::with_capacity(p.batch * ho * wo * d);
    for n in 0..p.batch {
        for oh in 0..ho {
            for ow in 0..wo {
                for ci in 0..g.c_in {
                    for ki in 0..kh {
                        for kj in 0..kw {
                            let h = (oh * g.stride[0] + ki * g.dilation[0]) as i64
                                - g.padding[0] as i64;
                            let w = (ow * g.stride[1] + kj * g.dilation[1]) as i64
                                - g.padding[1] as i64;
                            let inside =
                                h >= 0 && w >= 0 && (h as usize) < g.h && (w as usize) < g.w;
                            out.push(if inside {
                                let s = &p.strides;
                                x[n * s[0] + ci * s[1] + h as usize * s[2] + w as usize * s[3]]
                            } else {
                                0.0
                            });
                        }
                    }
                }
                if p.ones {
                    out.push(1.0);
                }
            }
        }
    }
    Ok(out)
}

/// Trace of every `b x b` block of a `[nb, b, b]` buffer, padding included.
pub fn block_traces(blocks: &[f64], block: usize) -> Result<Vec<f64>> {
    crate::layout::check_block_size(block)?;
    if blocks.len() % (block * block) != 0 {
        return Err(Error::shape(
            "blocks",
            format!("a multiple of {}", block * block),
            blocks.len(),
        ));
    }
    Ok(blocks
        .chunks_exact(block * block)
        .map(|s| (0..block).map(|i| s[i * block + i]).sum())
        .collect())
}

/// Trace of every factor of a set: the sum of its real diagonal entries, padding excluded.
pub fn factor_traces(set: &FactorSet, blocks: &[f64]) -> Result<Vec<f64>> {
    check_len("blocks", set.buffer_len(), blocks.len())?;
    let b = set.block();
    Ok(set
        .entries()
        .iter()
        .map(|e| {
            (0..e.layout.dim())
                .map(|i| {
                    let blk = e.first_block + i / b;
                    blocks[blk * b * b + (i % b) * b + i % b]
                })
                .sum()
        })
        .collect())
}

/// Damped Cholesky inverse of one `b x b` block: `(S + damping I)^-1` through
/// `S + damping I = L L^T`, `L^-1`, `L^-T L^-1`, reading the lower triangle of `s` only.
///
/// Returns the full symmetric inverse, or `Err(pivot)` with the LAPACK-style 1-based index
/// of the first pivot that was not positive and finite (a non-SPD, NaN or Inf input).
fn cholesky_inverse(s: &[f64], b: usize, damping: f64) -> std::result::Result<Vec<f64>, usize> {
    let mut l = vec![0.0; b * b];
    for j in 0..b {
        let mut dj = s[j * b + j] + damping;
        for k in 0..j {
            dj -= l[j * b + k] * l[j * b + k];
        }
        if !(dj > 0.0 && dj.is_finite()) {
            return Err(j + 1);
        }
        let ljj = dj.sqrt();
        l[j * b + j] = ljj;
        for i in j + 1..b {
            let mut v = s[i * b + j];
            for k in 0..j {
                v -= l[i * b + k] * l[j * b + k];
            }
            l[i * b + j] = v / ljj;
        }
    }
    // Forward substitution, column by column: L * Linv = I.
    let mut linv = vec![0.0; b * b];
    for c in 0..b {
        for r in c..b {
            let mut v = if r == c { 1.0 } else { 0.0 };
            for k in c..r {
                v -= l[r * b + k] * linv[k * b + c];
            }
            linv[r * b + c] = v / l[r * b + r];
        }
    }
    // X = Linv^T Linv.
    let mut x = vec![0.0; b * b];
    for r in 0..b {
        for c in 0..b {
            let mut v = 0.0;
            for k in r.max(c)..b {
                v += linv[k * b + r] * linv[k * b + c];
            }
            x[r * b + c] = v;
        }
    }
    Ok(x)
}

/// Damped inverse of every block of a `[nb, b, b]` buffer with damping `damping[j]` for
/// block `j`. Returns the inverses (a failed block keeps its input values) and the
/// LAPACK-style info per block: 0, or the 1-based pivot that was not positive.
pub fn invert_blocks(blocks: &[f64], b: usize, damping: &[f64]) -> Result<(Vec<f64>, Vec<i32>)> {
    crate::layout::check_block_size(b)?;
    let nb = damping.len();
    check_len("blocks", nb * b * b, blocks.len())?;
    let mut out = blocks.to_vec();
    let mut info = vec![0i32; nb];
    for j in 0..nb {
        match cholesky_inverse(&blocks[j * b * b..(j + 1) * b * b], b, damping[j]) {
            Ok(x) => out[j * b * b..(j + 1) * b * b].copy_from_slice(&x),
            Err(p) => info[j] = p as i32,
        }
    }
    Ok((out, info))
}

/// The residual `||(S + damping I) X - I||_F / sqrt(b)` of an inverse `x` of block `s`.
pub fn inverse_residual(s: &[f64], x: &[f64], b: usize, damping: f64) -> f64 {
    let mut acc = 0.0;
    for r in 0..b {
        for c in 0..b {
            let mut v = 0.0;
            for k in 0..b {
                let skr = if k == r {
                    s[r * b + k] + damping
                } else {
                    s[r * b + k]
                };
                v += skr * x[k * b + c];
            }
            if r == c {
                v -= 1.0;
            }
            acc += v * v;
        }
    }
    acc.sqrt() / (b as f64).sqrt()
}

/// The preconditioner apply for one layer: `dW = blockdiag(G^-1) * grad * blockdiag(A^-1)`.
///
/// `grad` is row-major `[out, in]`; `g_inv` holds the inverse blocks of the output-side
/// factor (dimension `out`) and `a_inv` those of the input-side factor (dimension `in`).
/// A side given as `None` is the identity.
pub fn apply(
    g_inv: Option<(&BlockLayout, &[f64])>,
    grad: &[f64],
    a_inv: Option<(&BlockLayout, &[f64])>,
    out_dim: usize,
    in_dim: usize,
) -> Result<Vec<f64>> {
    check_len("grad", out_dim * in_dim, grad.len())?;
    let dense =
        |side: Option<(&BlockLayout, &[f64])>, dim: usize, arg: &'static str| -> Result<Vec<f64>> {
            match side {
                Some((layout, blocks)) => {
                    if layout.dim() != dim {
                        return Err(Error::shape(
                            arg,
                            format!("dim {dim}"),
                            format!("dim {}", layout.dim()),
                        ));
                    }
                    merge(blocks, layout)
                }
                None => {
                    let mut eye = vec![0.0; dim * dim];
                    for i in 0..dim {
                        eye[i * dim + i] = 1.0;
                    }
                    Ok(eye)
                }
            }
        };
    let g = dense(g_inv, out_dim, "g_inv")?;
    let a = dense(a_inv, in_dim, "a_inv")?;
    let mut t = vec![0.0; out_dim * in_dim];
    for r in 0..out_dim {
        for k in 0..out_dim {
            let gv = g[r * out_dim + k];
            if gv != 0.0 {
                for c in 0..in_dim {
                    t[r * in_dim + c] += gv * grad[k * in_dim + c];
                }
            }
        }
    }
    let mut out = vec![0.0; out_dim * in_dim];
    for r in 0..out_dim {
        for k in 0..in_dim {
            let tv = t[r * in_dim + k];
            if tv != 0.0 {
                for c in 0..in_dim {
                    out[r * in_dim + c] += tv * a[k * in_dim + c];
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cholesky_inverse_of_a_known_matrix() {
        // [[4, 2], [2, 3]]^-1 = [[3, -2], [-2, 4]] / 8.
        let x = cholesky_inverse(&[4.0, 2.0, 2.0, 3.0], 2, 0.0).unwrap();
        let want = [0.375, -0.25, -0.25, 0.5];
        for (a, b) in x.iter().zip(want) {
            assert!((a - b).abs() < 1e-15, "{x:?}");
        }
        // Damping moves the diagonal: [[1, 0], [0, 1]] + 1 I.
        let x = cholesky_inverse(&[1.0, 0.0, 0.0, 1.0], 2, 1.0).unwrap();
        for (a, b) in x.iter().zip([0.5, 0.0, 0.0, 0.5]) {
            assert!((a - b).abs() < 1e-15, "{x:?}");
        }
    }

    #[test]
    fn cholesky_reports_the_failing_pivot() {
        assert_eq!(cholesky_inverse(&[1.0, 2.0, 2.0, 1.0], 2, 0.0), Err(2));
        assert_eq!(cholesky_inverse(&[-1.0, 0.0, 0.0, 1.0], 2, 0.0), Err(1));
        assert_eq!(cholesky_inverse(&[1.0, 0.0, f64::NAN, 1.0], 2, 0.0), Err(2));
        assert_eq!(
            cholesky_inverse(&[f64::INFINITY, 0.0, 0.0, 1.0], 2, 0.0),
            Err(1)
        );
    }

    #[test]
    fn split_then_merge_keeps_the_block_diagonal() {
        let layout = BlockLayout::new(33, 32).unwrap();
        let dense: Vec<f64> = (0..33 * 33).map(|i| i as f64).collect();
        let blocks = split(&dense, &layout).unwrap();
        assert_eq!(blocks[32 * 32], 32.0 * 33.0 + 32.0);
        assert_eq!(blocks[32 * 32 + 1], 0.0);
        assert_eq!(blocks[32 * 32 + 33], 1.0);
        let merged = merge(&blocks, &layout).unwrap();
        assert_eq!(merged[5 * 33 + 7], dense[5 * 33 + 7]);
        assert_eq!(merged[5 * 33 + 32], 0.0);
        assert_eq!(merged[32 * 33 + 32], dense[32 * 33 + 32]);
    }
}
