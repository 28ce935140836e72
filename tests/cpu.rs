//! The CPU backend against the f64 reference, on sizes that miss tile boundaries.

mod common;

use common::*;
use half::{bf16, f16};
use thor_kernels::cpu::{self, FailurePolicy, InvertOptions, Workspace};
use thor_kernels::layout::{BlockLayout, FactorSet, SUPPORTED_BLOCK_SIZES};
use thor_kernels::{reference, Element, Error};

fn dims(b: usize) -> [usize; 5] {
    [1, b - 1, b, b + 1, 3 * b + 5]
}

#[test]
fn split_and_merge_match_reference() {
    for b in SUPPORTED_BLOCK_SIZES {
        for d in dims(b) {
            let mut r = rng((b * 1000 + d) as u64);
            let layout = BlockLayout::new(d, b).unwrap();
            let ld = d + 2;
            let dense = normal(&mut r, d * ld);
            let tight: Vec<f32> = (0..d * d).map(|k| dense[(k / d) * ld + k % d]).collect();
            let want = reference::split(&f64s(&tight), &layout).unwrap();
            let mut blocks = poisoned(layout.buffer_len());
            cpu::split(&dense, ld, &layout, &mut blocks).unwrap();
            assert_eq!(rel_err(&blocks, &want), 0.0, "split b={b} d={d}");
            let want = reference::merge(&want, &layout).unwrap();
            let mut merged = poisoned(d * ld);
            cpu::merge(&blocks, &layout, &mut merged, ld).unwrap();
            let merged_tight: Vec<f32> = (0..d * d).map(|k| merged[(k / d) * ld + k % d]).collect();
            assert_eq!(rel_err(&merged_tight, &want), 0.0, "merge b={b} d={d}");
        }
    }
}

#[test]
fn traces_match_reference() {
    for b in SUPPORTED_BLOCK_SIZES {
        let dims = dims(b);
        let set = FactorSet::new(b, &dims).unwrap();
        let mut r = rng(b as u64);
        let blocks = normal(&mut r, set.buffer_len());
        let mut bt = poisoned(set.total_blocks());
        let mut ft = poisoned(set.len());
        cpu::traces(&set, &blocks, &mut bt, &mut ft).unwrap();
        let wb = reference::block_traces(&f64s(&blocks), b).unwrap();
        let wf = reference::factor_traces(&set, &f64s(&blocks)).unwrap();
        // Sums of up to 256 (blocks) and 773 (factors) standard normals: compare absolutely
        // at f32 resolution of the magnitudes summed.
        for (g, w) in bt.iter().zip(&wb) {
            assert!(
                approx::abs_diff_eq!(*g as f64, *w, epsilon = 1e-4 * b as f64),
                "block trace {g} vs {w}"
            );
        }
        for (g, w) in ft.iter().zip(&wf) {
            assert!(
                approx::relative_eq!(*g as f64, *w, epsilon = 1e-4, max_relative = 1e-4),
                "factor trace {g} vs {w}"
            );
        }
    }
}

fn accumulate_case<E: Element>(n: usize, d: usize, b: usize, beta: f32, tol: f64, seed: u64) {
    let mut r = rng(seed);
    let layout = BlockLayout::new(d, b).unwrap();
    let ld = d + 3;
    let x32 = normal(&mut r, n * ld);
    let x: Vec<E> = x32.iter().map(|&v| E::from_f32(v)).collect();
    let xr: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
    let prev = {
        // A valid previous statistic: symmetric, so the blocks mean something.
        let mut p = normal(&mut r, layout.buffer_len());
        for j in 0..layout.blocks() {
            for rr in 0..b {
                for cc in 0..rr {
                    p[j * b * b + cc * b + rr] = p[j * b * b + rr * b + cc];
                }
            }
        }
        p
    };
    let alpha = 1.0 / n as f32;
    let mut want = f64s(&prev);
    reference::accumulate(&xr, n, ld, &layout, alpha as f64, beta as f64, &mut want).unwrap();
    let mut blocks = if beta == 0.0 {
        poisoned(layout.buffer_len())
    } else {
        prev.clone()
    };
    let mut traces = poisoned(layout.blocks());
    let mut ws = Workspace::new(cpu::accumulate_workspace_size::<E>(&layout));
    cpu::accumulate(
        &x,
        n,
        ld,
        &layout,
        alpha,
        beta,
        &mut blocks,
        &mut traces,
        &mut ws,
    )
    .unwrap();
    let err = rel_err(&blocks, &want);
    assert!(
        err < tol,
        "{:?} n={n} d={d} b={b} beta={beta}: rel err {err:e}",
        E::DTYPE
    );
    let wt = reference::block_traces(&want, b).unwrap();
    let terr = rel_err(&traces, &wt);
    assert!(terr < tol, "traces n={n} d={d} b={b}: rel err {terr:e}");
    // Bitwise symmetric blocks, identity padding.
    for j in 0..layout.blocks() {
        let w = layout.valid(j);
        for rr in 0..b {
            for cc in 0..b {
                let v = blocks[j * b * b + rr * b + cc];
                assert_eq!(v.to_bits(), blocks[j * b * b + cc * b + rr].to_bits());
                if rr >= w || cc >= w {
                    assert_eq!(v, if rr == cc { 1.0 } else { 0.0 });
                }
            }
        }
    }
}

#[test]
fn accumulate_f32_matches_reference() {
    let mut seed = 0;
    for b in SUPPORTED_BLOCK_SIZES {
        for d in dims(b) {
            for (n, beta) in [(1, 0.0), (7, 0.95), (1000, 0.0)] {
                seed += 1;
                accumulate_case::<f32>(n, d, b, beta, 1e-5, seed);
            }
        }
    }
    accumulate_case::<f32>(65537, 33, 32, 0.95, 1e-5, 9999);
}

#[test]
fn accumulate_half_inputs_match_reference() {
    for b in [32, 128] {
        for d in [b - 1, b + 1] {
            accumulate_case::<f16>(1000, d, b, 0.0, 1e-5, 500 + d as u64);
            accumulate_case::<bf16>(1000, d, b, 0.95, 1e-5, 600 + d as u64);
        }
    }
    accumulate_case::<bf16>(65537, 33, 32, 0.0, 1e-5, 700);
}

#[test]
fn invert_matches_reference_residual() {
    for b in SUPPORTED_BLOCK_SIZES {
        let nb = 3;
        let mut r = rng(40 + b as u64);
        let conds = [1.0, 1e2, 1e4];
        let mut s = Vec::new();
        for &c in &conds {
            s.extend(spd(&mut r, b, c));
        }
        let s32: Vec<f32> = s.iter().map(|&v| v as f32).collect();
        let s_used = f64s(&s32);
        let damping = [0.0f32, 1e-3, 0.1];
        let mut out = poisoned(nb * b * b);
        let mut info = vec![-1; nb];
        let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
        cpu::invert(
            b,
            &s32,
            &mut out,
            &mut info,
            None,
            &InvertOptions::per_block(&damping),
            &mut ws,
        )
        .unwrap();
        assert_eq!(info, vec![0; nb]);
        for j in 0..nb {
            let blk = &out[j * b * b..(j + 1) * b * b];
            let res = reference::inverse_residual(
                &s_used[j * b * b..(j + 1) * b * b],
                &f64s(blk),
                b,
                damping[j] as f64,
            );
            let tol = inverse_tolerance(conds[j]);
            assert!(res < tol, "b={b} cond={}: residual {res:e}", conds[j]);
            for rr in 0..b {
                for cc in 0..rr {
                    assert_eq!(blk[rr * b + cc].to_bits(), blk[cc * b + rr].to_bits());
                }
            }
        }
        // In place gives the same bits.
        let mut inplace = s32.clone();
        let mut info2 = vec![-1; nb];
        cpu::invert_in_place(
            b,
            &mut inplace,
            &mut info2,
            None,
            &InvertOptions::per_block(&damping),
            &mut ws,
        )
        .unwrap();
        assert_eq!(info2, info);
        assert!(inplace
            .iter()
            .zip(&out)
            .all(|(a, c)| a.to_bits() == c.to_bits()));
    }
}

#[test]
fn invert_reports_bad_blocks_and_leaves_them_untouched() {
    let b = 32;
    let mut r = rng(77);
    let (blocks, want) = mixed_bad_batch(&mut r, b);
    let nb = 5;
    let (_, want_info) = reference::invert_blocks(&f64s(&blocks), b, &[0.0; 5]).unwrap();
    assert_eq!(want_info, want);
    let before = vec![7.0f32; nb * b * b];
    let mut out = before.clone();
    let mut info = vec![-1; nb];
    let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
    cpu::invert(
        b,
        &blocks,
        &mut out,
        &mut info,
        None,
        &InvertOptions::uniform(0.0),
        &mut ws,
    )
    .unwrap();
    assert_eq!(info, want_info);
    for j in [1, 2, 3] {
        assert!(
            out[j * b * b..(j + 1) * b * b].iter().all(|&v| v == 7.0),
            "failed block {j} was written"
        );
    }
    for j in [0, 4] {
        assert!(out[j * b * b..(j + 1) * b * b]
            .iter()
            .all(|v| v.is_finite()));
    }
    assert_eq!(
        cpu::check_info(&info),
        Err(thor_kernels::Error::NotPositiveDefinite { block: 1, pivot: 4 })
    );
}

#[test]
fn apply_matches_reference_on_odd_shapes() {
    let mut seed = 900;
    for b in [32, 64] {
        for (out_dim, in_dim) in [
            (1, 1),
            (b - 1, b + 1),
            (b + 1, 3 * b + 5),
            (2 * b, 1),
            (5, b),
        ] {
            for sides in 0..4 {
                seed += 1;
                let mut r = rng(seed);
                let gl = BlockLayout::new(out_dim, b).unwrap();
                let al = BlockLayout::new(in_dim, b).unwrap();
                let g = normal(&mut r, gl.buffer_len());
                let a = normal(&mut r, al.buffer_len());
                let grad = normal(&mut r, out_dim * in_dim);
                let gs = (sides & 1 == 1).then_some((&gl, &g[..]));
                let as_ = (sides & 2 == 2).then_some((&al, &a[..]));
                let g64 = f64s(&g);
                let a64 = f64s(&a);
                let mut want = reference::apply(
                    gs.map(|_| (&gl, &g64[..])),
                    &f64s(&grad),
                    as_.map(|_| (&al, &a64[..])),
                    out_dim,
                    in_dim,
                )
                .unwrap();
                want.iter_mut().for_each(|v| *v *= 0.25);
                let mut out = poisoned(out_dim * in_dim);
                let mut ws =
                    Workspace::new(cpu::apply_workspace_size(gs.map(|_| b), out_dim, in_dim));
                cpu::apply(gs, &grad, as_, out_dim, in_dim, 0.25, &mut out, &mut ws).unwrap();
                let err = rel_err(&out, &want);
                assert!(
                    err < 1e-5,
                    "apply b={b} {out_dim}x{in_dim} sides={sides}: {err:e}"
                );
            }
        }
    }
}

/// Residual bound of the f32 inversion, in units of `cond * eps_f32` (measured).
const INVERT_BOUND: f64 = 0.5;

fn cpu_invert(
    b: usize,
    input: &[f32],
    out: &mut [f32],
    opts: &InvertOptions<'_>,
) -> (Vec<i32>, Vec<f32>) {
    let nb = input.len() / (b * b);
    let mut info = vec![i32::MIN; nb];
    let mut used = vec![f32::NAN; nb];
    let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
    cpu::invert(b, input, out, &mut info, Some(&mut used), opts, &mut ws).unwrap();
    (info, used)
}

#[test]
fn invert_odd_batch_sizes_every_block_size() {
    for b in SUPPORTED_BLOCK_SIZES {
        for nb in [1usize, 3, 1000] {
            let mut r = rng((b * 10_000 + nb) as u64);
            let conds = [1.0, 1e2, 1e4];
            let input = spd_batch(&mut r, b, nb, &conds);
            let mut out = poisoned(nb * b * b);
            let (info, used) = cpu_invert(b, &input, &mut out, &InvertOptions::uniform(1e-3));
            assert!(
                info.iter().all(|&i| i == 0),
                "b={b} nb={nb}: {:?}",
                &info[..info.len().min(8)]
            );
            assert!(used.iter().all(|&u| u == 1e-3));
            for j in (0..nb).step_by(nb.div_ceil(5)) {
                let res = block_residual(&input, &out, b, j, 1e-3);
                let tol = inverse_tolerance(conds[j % 3]);
                assert!(res < tol, "b={b} nb={nb} block {j}: residual {res:e}");
                assert!(bitwise_symmetric(&out, b, j));
            }
            assert!(out.iter().all(|v| v.is_finite()));
        }
    }
}

#[test]
fn invert_mask_nothing_everything_and_some() {
    let b = 64;
    let nb = 6;
    let mut r = rng(61);
    let input = spd_batch(&mut r, b, nb, &[10.0]);
    for mask in [vec![0u8; nb], vec![1u8; nb], vec![1, 0, 0, 1, 0, 1]] {
        let before = vec![5.0f32; nb * b * b];
        let mut out = before.clone();
        let opts = InvertOptions {
            mask: Some(&mask),
            ..InvertOptions::uniform(0.0)
        };
        let (info, used) = cpu_invert(b, &input, &mut out, &opts);
        for j in 0..nb {
            let blk = &out[j * b * b..(j + 1) * b * b];
            if mask[j] == 0 {
                assert_eq!(info[j], cpu::INFO_SKIPPED);
                assert!(used[j].is_nan(), "skipped block reports no damping");
                assert!(blk.iter().all(|&v| v == 5.0), "skipped block {j} written");
            } else {
                assert_eq!(info[j], 0);
                assert!(block_residual(&input, &out, b, j, 0.0) < 1e-4);
            }
        }
        assert_eq!(cpu::check_info(&info), Ok(()));
    }
}

#[test]
fn invert_retry_raises_damping_until_spd() {
    let b = 32;
    let mut r = rng(62);
    // Eigenvalues in [1, 100], shifted down by 5: the smallest is -4.
    let mut s = spd(&mut r, b, 100.0);
    for i in 0..b {
        s[i * b + i] -= 5.0;
    }
    let input: Vec<f32> = s.iter().map(|&v| v as f32).collect();
    let (_, want) = reference::invert_blocks(&s, b, &[0.0]).unwrap();
    assert!(want[0] > 0, "the block must be indefinite");
    // Report: untouched, pivot as the reference.
    let mut out = vec![3.0f32; b * b];
    let (info, used) = cpu_invert(b, &input, &mut out, &InvertOptions::uniform(0.0));
    assert_eq!(info, want);
    assert_eq!(used, vec![0.0]);
    assert!(out.iter().all(|&v| v == 3.0));
    // Retry from 0.5 by x10: 0.5 fails, 5 succeeds (eigenvalues >= -4 + 5 = 1).
    let opts = InvertOptions {
        policy: FailurePolicy::retry(),
        ..InvertOptions::uniform(0.5)
    };
    let (info, used) = cpu_invert(b, &input, &mut out, &opts);
    assert_eq!(info, vec![0]);
    assert_eq!(used, vec![5.0]);
    assert!(block_residual(&input, &out, b, 0, 5.0) < 1e-4);
    // Retries never rescue a NaN block: reported with its pivot, untouched.
    let mut nan = input.clone();
    nan[7 * b + 2] = f32::NAN;
    let mut out = vec![3.0f32; b * b];
    let (info, _) = cpu_invert(b, &nan, &mut out, &opts);
    assert_eq!(info, vec![8]);
    assert!(out.iter().all(|&v| v == 3.0));
    // Bad policies are typed errors.
    let bad = InvertOptions {
        policy: FailurePolicy::Retry {
            factor: 1.0,
            max_retries: 3,
            floor: 1e-6,
        },
        ..InvertOptions::uniform(0.0)
    };
    let mut info = vec![0];
    let e = cpu::invert(
        b,
        &input,
        &mut out,
        &mut info,
        None,
        &bad,
        &mut Workspace::new(cpu::invert_workspace_size(b, 1)),
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            thor_kernels::Error::InvalidArgument {
                arg: "policy.factor",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn invert_residual_bound_up_to_cond_1e7() {
    // Measured bound (docs/PERF.md): residual <= 0.5 * cond * eps_f32 for every b; the
    // largest measured ratio was 0.13 (b = 32, cond 1e5). At cond 1e7 that allows 0.6:
    // f32 has run out of digits there, as for any f32 inverse.
    for b in SUPPORTED_BLOCK_SIZES {
        let mut r = rng(70 + b as u64);
        for cond in [1e4, 1e5, 1e6, 1e7] {
            let input = spd_batch(&mut r, b, 1, &[cond]);
            let mut out = poisoned(b * b);
            let (info, _) = cpu_invert(b, &input, &mut out, &InvertOptions::uniform(0.0));
            assert_eq!(info, vec![0], "b={b} cond={cond:e}");
            let res = block_residual(&input, &out, b, 0, 0.0);
            eprintln!("cpu invert b={b} cond={cond:e}: residual {res:.2e}");
            assert!(
                res <= INVERT_BOUND * cond * f32::EPSILON as f64,
                "b={b} cond={cond:e}: residual {res:e}"
            );
        }
    }
}

#[test]
fn accumulate_set_status_partners_and_traces() {
    // Two layers (A, G): factor 3 (layer 1's G) gets a NaN; with partners, layer 1's A is
    // kept too (status 2); without, only factor 3 is kept.
    let b = 32;
    let dims = [40usize, 10, 33, 5];
    let rows = [64usize, 64, 50, 50];
    let set = FactorSet::new(b, &dims).unwrap();
    let mut r = rng(71);
    let mut xs: Vec<Vec<f32>> = dims
        .iter()
        .zip(&rows)
        .map(|(&d, &n)| normal(&mut r, n * d))
        .collect();
    xs[3][17] = f32::NAN;
    let init = normal(&mut r, set.buffer_len());
    for (partners, want) in [
        (None, vec![0, 0, 0, 1]),
        (
            Some(vec![Some(1), Some(0), Some(3), Some(2)]),
            vec![0, 0, 2, 1],
        ),
    ] {
        let inputs: Vec<cpu::FactorInput<'_, f32>> = xs
            .iter()
            .enumerate()
            .map(|(f, x)| cpu::FactorInput {
                x,
                layout: thor_kernels::InputLayout::matrix(rows[f], dims[f]),
                alpha: 1.0 / rows[f] as f32,
                beta: 0.0,
            })
            .collect();
        let mut blocks = init.clone();
        let (mut bt, mut ft, mut st) = (
            poisoned(set.total_blocks()),
            poisoned(set.len()),
            vec![-1i32; set.len()],
        );
        let mut ws = Workspace::new(cpu::accumulate_set_workspace_size::<f32>(&set));
        cpu::accumulate_set(
            &set,
            &inputs,
            partners.as_deref(),
            None,
            &mut blocks,
            &mut bt,
            &mut ft,
            &mut st,
            &mut ws,
        )
        .unwrap();
        assert_eq!(st, want);
        for (f, e) in set.entries().iter().enumerate() {
            let range = e.offset()..e.offset() + e.layout.buffer_len();
            if want[f] != 0 {
                assert_eq!(blocks[range.clone()], init[range], "factor {f} kept");
                continue;
            }
            let mut w = vec![0.0; e.layout.buffer_len()];
            reference::accumulate(
                &f64s(&xs[f]),
                rows[f],
                dims[f],
                &e.layout,
                1.0 / rows[f] as f64,
                0.0,
                &mut w,
            )
            .unwrap();
            assert!(rel_err(&blocks[range], &w) < 1e-5, "factor {f}");
        }
        let want_ft = reference::factor_traces(&set, &f64s(&blocks)).unwrap();
        for (g, w) in ft.iter().zip(&want_ft) {
            assert!(
                approx::relative_eq!(*g as f64, *w, epsilon = 1e-4, max_relative = 1e-4),
                "{g} vs {w}"
            );
        }
    }
    // A partner that is the factor itself is refused.
    let inputs: Vec<cpu::FactorInput<'_, f32>> = xs
        .iter()
        .enumerate()
        .map(|(f, x)| cpu::FactorInput {
            x,
            layout: thor_kernels::InputLayout::matrix(rows[f], dims[f]),
            alpha: 1.0,
            beta: 0.0,
        })
        .collect();
    let mut blocks = init.clone();
    let (mut bt, mut ft, mut st) = (vec![0.0; set.total_blocks()], vec![0.0; 4], vec![0; 4]);
    let mut ws = Workspace::new(cpu::accumulate_set_workspace_size::<f32>(&set));
    let bad = [Some(0), None, None, None];
    let e = cpu::accumulate_set(
        &set,
        &inputs,
        Some(&bad),
        None,
        &mut blocks,
        &mut bt,
        &mut ft,
        &mut st,
        &mut ws,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidArgument {
                arg: "partners",
                ..
            }
        ),
        "{e}"
    );
    // A factor state of the wrong length too.
    let e = cpu::accumulate_set(
        &set,
        &inputs,
        None,
        Some(&[0u8; 3]),
        &mut blocks,
        &mut bt,
        &mut ft,
        &mut st,
        &mut ws,
    )
    .unwrap_err();
    assert!(
        matches!(
            e,
            Error::Shape {
                arg: "factor_state",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn accumulate_dense_lower_triangle_matches_reference() {
    let k = DenseCase::new(4);
    let (n, d, ld, ldc) = (k.n, k.d, k.ld, k.ldc);
    for beta in [0.0f32, 0.9] {
        let mut c = k.c0.clone();
        if beta == 0.0 {
            // Not read when beta is 0: NaN there must not propagate.
            for i in 0..d {
                for j in 0..=i {
                    c[i * ldc + j] = f32::NAN;
                }
            }
        }
        cpu::accumulate_dense(&k.x, n, ld, d, 0.5, beta, &mut c, ldc).unwrap();
        k.check(&c, 0.5, beta as f64, 1e-5 * n as f64);
        // Outside the matrix (row padding past d) untouched.
        assert_eq!(c[d..ldc], k.c0[d..ldc]);
    }
    let mut c = k.c0.clone();
    let mut bad = k.x.clone();
    bad[5 * ld + 3] = f32::INFINITY;
    assert!(cpu::accumulate_dense(&bad, n, ld, d, 0.5, 0.0, &mut c, ldc).is_err());
    assert_eq!(c, k.c0, "nothing written on error");
    assert!(cpu::accumulate_dense(&k.x, n, d - 1, d, 0.5, 0.0, &mut c, ldc).is_err());
}
