//! The f64 reference checked against an independent library (faer).

mod common;

use common::*;
use faer::linalg::solvers::DenseSolveCore;
use faer::Mat;
use thor_kernels::layout::BlockLayout;
use thor_kernels::reference;

fn mat(v: &[f64], r: usize, c: usize) -> Mat<f64> {
    Mat::from_fn(r, c, |i, j| v[i * c + j])
}

fn max_abs_diff(a: &Mat<f64>, b: &[f64]) -> f64 {
    let c = a.ncols();
    let mut m = 0.0f64;
    for i in 0..a.nrows() {
        for j in 0..c {
            m = m.max((a[(i, j)] - b[i * c + j]).abs());
        }
    }
    m
}

#[test]
fn damped_inverse_matches_faer_on_random_spd() {
    for (case, &(b, cond, damping)) in [
        (32, 10.0, 0.0),
        (64, 1e3, 0.1),
        (128, 1e4, 1e-3),
        (33, 1e2, 0.5),
    ]
    .iter()
    .enumerate()
    {
        let b: usize = b;
        let mut r = rng(100 + case as u64);
        let s = spd(&mut r, b, cond);
        let damped = Mat::from_fn(b, b, |i, j| {
            s[i * b + j] + if i == j { damping } else { 0.0 }
        });
        let want = damped.llt(faer::Side::Lower).unwrap().inverse();
        // The reference inverse of one block of a supported size, padding the matrix when
        // b is not one (padding with identity leaves the leading block's inverse unchanged).
        let bs = [32, 64, 128, 256].into_iter().find(|&x| x >= b).unwrap();
        let mut padded = vec![0.0; bs * bs];
        for i in 0..bs {
            for j in 0..bs {
                padded[i * bs + j] = if i < b && j < b {
                    s[i * b + j]
                } else if i == j {
                    1.0
                } else {
                    0.0
                };
            }
        }
        let (x, info) = reference::invert_blocks(&padded, bs, &[damping]).unwrap();
        assert_eq!(info, vec![0]);
        let lead: Vec<f64> = (0..b * b).map(|k| x[(k / b) * bs + k % b]).collect();
        let scale = (0..b * b)
            .map(|k| want[(k / b, k % b)].abs())
            .fold(0.0, f64::max);
        let diff = max_abs_diff(&want, &lead);
        assert!(
            diff <= 1e-9 * scale * cond,
            "b={b} cond={cond}: max diff {diff} (scale {scale})"
        );
        assert!(reference::inverse_residual(&padded, &x, bs, damping) < 1e-10);
    }
}

#[test]
fn non_spd_blocks_fail_where_faer_fails() {
    let mut r = rng(7);
    let b = 32;
    let mut s = spd(&mut r, b, 10.0);
    // Make the matrix indefinite by flipping one eigen-direction: subtract 20 * e e^T.
    s[5 * b + 5] -= 50.0;
    let faer_ok = mat(&s, b, b).llt(faer::Side::Lower).is_ok();
    let (_, info) = reference::invert_blocks(&s, b, &[0.0]).unwrap();
    assert!(!faer_ok);
    assert_eq!(info[0], 6, "the pivot of row 5 (1-based 6) fails first");
}

#[test]
fn accumulate_matches_faer_gram_matrix() {
    for (case, &(n, d, b, beta)) in [
        (7usize, 45usize, 32usize, 0.0),
        (100, 70, 64, 0.95),
        (1, 1, 32, 0.5),
    ]
    .iter()
    .enumerate()
    {
        let mut r = rng(200 + case as u64);
        let ld = d + 3;
        let x = f64s(&normal(&mut r, n * ld));
        let layout = BlockLayout::new(d, b).unwrap();
        let prev = f64s(&normal(&mut r, layout.buffer_len()));
        let mut blocks = prev.clone();
        reference::accumulate(&x, n, ld, &layout, 0.5, beta, &mut blocks).unwrap();
        let xm = Mat::from_fn(n, d, |i, j| x[i * ld + j]);
        let gram = xm.transpose() * &xm;
        for j in 0..layout.blocks() {
            let w = layout.valid(j);
            for rr in 0..b {
                for cc in 0..b {
                    let got = blocks[j * b * b + rr * b + cc];
                    let want = if rr < w && cc < w {
                        beta * prev[j * b * b + rr * b + cc] + 0.5 * gram[(j * b + rr, j * b + cc)]
                    } else if rr == cc {
                        1.0
                    } else {
                        0.0
                    };
                    assert!(
                        approx::relative_eq!(got, want, epsilon = 1e-12, max_relative = 1e-12),
                        "block {j} ({rr},{cc}): {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn apply_matches_faer_products() {
    let (out_dim, in_dim, b) = (70, 40, 32);
    let mut r = rng(300);
    let gl = BlockLayout::new(out_dim, b).unwrap();
    let al = BlockLayout::new(in_dim, b).unwrap();
    let g = f64s(&normal(&mut r, gl.buffer_len()));
    let a = f64s(&normal(&mut r, al.buffer_len()));
    let grad = f64s(&normal(&mut r, out_dim * in_dim));
    let got = reference::apply(Some((&gl, &g)), &grad, Some((&al, &a)), out_dim, in_dim).unwrap();
    let gd = mat(&reference::merge(&g, &gl).unwrap(), out_dim, out_dim);
    let ad = mat(&reference::merge(&a, &al).unwrap(), in_dim, in_dim);
    let want = &gd * mat(&grad, out_dim, in_dim) * &ad;
    assert!(max_abs_diff(&want, &got) < 1e-10);
    // One side only.
    let got = reference::apply(None, &grad, Some((&al, &a)), out_dim, in_dim).unwrap();
    let want = mat(&grad, out_dim, in_dim) * &ad;
    assert!(max_abs_diff(&want, &got) < 1e-10);
}

/// The test matrices have the spectrum asked for, and their eigenvectors point in random
/// directions: the off-diagonal part carries a good share of the Frobenius norm (a
/// diagonal-plus-low-rank matrix would keep it near the diagonal).
#[test]
fn spd_test_matrices_have_the_asked_spectrum_and_random_eigenvectors() {
    let mut r = rng(31);
    for (b, cond) in [(1usize, 1.0), (32, 1e2), (64, 1e4), (128, 1e7)] {
        let s = spd(&mut r, b, cond);
        let mut eig = mat(&s, b, b)
            .self_adjoint_eigenvalues(faer::Side::Lower)
            .unwrap();
        eig.sort_by(f64::total_cmp);
        for (i, e) in eig.iter().enumerate() {
            let want = if b > 1 {
                cond.powf(i as f64 / (b - 1) as f64)
            } else {
                1.0
            };
            assert!(
                approx::abs_diff_eq!(*e, want, epsilon = 1e-9 * cond),
                "b={b} cond={cond:e}: eigenvalue {i} is {e}, want {want}"
            );
        }
        if b > 1 {
            let total: f64 = s.iter().map(|v| v * v).sum();
            let diag: f64 = (0..b).map(|i| s[i * b + i].powi(2)).sum();
            let off = 1.0 - diag / total;
            assert!(off > 0.2, "b={b}: off-diagonal share {off:.3}");
        }
    }
}
