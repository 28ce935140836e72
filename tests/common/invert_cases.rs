//! The batched inversion's test cases, written once and run by every executor of the device
//! kernels: the GPU (tests/gpu.rs) and the kernel emulator (tests/emulated.rs).

use super::*;
use thor_kernels::invert::{FailurePolicy, INFO_BAD_DAMPING, INFO_SKIPPED};
use thor_kernels::reference;

/// One inversion call's options.
#[derive(Clone, Copy)]
pub struct InvertCall<'a> {
    /// Initial output (out of place), or None for in place.
    pub out_init: Option<&'a [f32]>,
    /// Per-block damping, or None for `damping_all`.
    pub damping: Option<&'a [f32]>,
    /// Damping of every block when `damping` is None.
    pub damping_all: f32,
    /// One byte per block, 0 skips it.
    pub mask: Option<&'a [u8]>,
    /// Failure policy.
    pub policy: FailurePolicy,
}

impl Default for InvertCall<'_> {
    fn default() -> Self {
        InvertCall {
            out_init: None,
            damping: None,
            damping_all: 0.0,
            mask: None,
            policy: FailurePolicy::Report,
        }
    }
}

/// Something that runs the device inversion kernels on host data.
pub trait Inverter {
    /// Inverts `[nb, b, b]` blocks; returns (output, info, damping used).
    fn invert(
        &self,
        b: usize,
        input: &[f32],
        call: InvertCall<'_>,
    ) -> (Vec<f32>, Vec<i32>, Vec<f32>);
}

/// A batch mixing good, non-SPD, NaN and Inf blocks: exactly the bad ones reported with the
/// right pivot, the good ones right, failed blocks untouched out of place and keeping their
/// input in place.
pub fn bad_blocks(inv: &dyn Inverter, b: usize) {
    let mut r = rng(80 + b as u64);
    let (input, want) = mixed_bad_batch(&mut r, b);
    let (ref_out, ref_info) = reference::invert_blocks(&f64s(&input), b, &[0.0; 5]).unwrap();
    assert_eq!(ref_info, want);
    let before = vec![7.0f32; input.len()];
    let (out, info, _) = inv.invert(
        b,
        &input,
        InvertCall {
            out_init: Some(&before),
            ..InvertCall::default()
        },
    );
    assert_eq!(info, want, "b={b}");
    for j in 0..5 {
        let blk = &out[j * b * b..(j + 1) * b * b];
        if want[j] != 0 {
            assert!(
                blk.iter().all(|&v| v == 7.0),
                "b={b}: failed block {j} written"
            );
        } else {
            let err = rel_err(blk, &ref_out[j * b * b..(j + 1) * b * b]);
            assert!(err < 1e-4, "b={b} block {j}: {err:e} vs reference");
        }
    }
    let (got, info, _) = inv.invert(b, &input, InvertCall::default());
    assert_eq!(info, want, "b={b} in place");
    for j in [1, 2, 3] {
        let (g, i) = (
            &got[j * b * b..(j + 1) * b * b],
            &input[j * b * b..(j + 1) * b * b],
        );
        assert!(
            g.iter().zip(i).all(|(a, c)| a.to_bits() == c.to_bits()),
            "b={b}: in-place failed block {j} changed"
        );
    }
    assert!(block_residual(&input, &got, b, 0, 0.0) < 1e-4);
}

/// Masks with nothing, everything and some set; the retry policy (damping 0.5 -> 5 for an
/// indefinite block); per-block damping with negative and NaN values.
pub fn mask_retry_damping(inv: &dyn Inverter, b: usize) {
    let nb = 6;
    let mut r = rng(61);
    let input = spd_batch(&mut r, b, nb, &[10.0]);
    for mask in [vec![0u8; nb], vec![1u8; nb], vec![1, 0, 0, 1, 0, 1]] {
        let (out, info, used) = inv.invert(
            b,
            &input,
            InvertCall {
                out_init: Some(&vec![5.0; nb * b * b]),
                mask: Some(&mask),
                ..InvertCall::default()
            },
        );
        for j in 0..nb {
            if mask[j] == 0 {
                assert_eq!(info[j], INFO_SKIPPED);
                assert!(used[j].is_nan());
                assert!(out[j * b * b..(j + 1) * b * b].iter().all(|&v| v == 5.0));
            } else {
                assert_eq!(info[j], 0);
                assert!(block_residual(&input, &out, b, j, 0.0) < 1e-4);
            }
        }
    }
    // Retry: an indefinite block (eigenvalues in [-4, 95]) succeeds at damping 5 from 0.5.
    let mut s = spd(&mut r, 32, 100.0);
    for i in 0..32 {
        s[i * 32 + i] -= 5.0;
    }
    let ind: Vec<f32> = s.iter().map(|&v| v as f32).collect();
    let (out, info, used) = inv.invert(
        32,
        &ind,
        InvertCall {
            out_init: Some(&poisoned(32 * 32)),
            damping_all: 0.5,
            policy: FailurePolicy::retry(),
            ..InvertCall::default()
        },
    );
    assert_eq!((info, used), (vec![0], vec![5.0]));
    assert!(block_residual(&ind, &out, 32, 0, 5.0) < 1e-4);
    // Per-block damping, two of them invalid.
    let damping = [0.0f32, 0.1, -1.0, f32::NAN, 0.2, 0.3];
    let (out, info, _) = inv.invert(
        b,
        &input,
        InvertCall {
            out_init: Some(&vec![5.0; nb * b * b]),
            damping: Some(&damping),
            ..InvertCall::default()
        },
    );
    assert_eq!(info, vec![0, 0, INFO_BAD_DAMPING, INFO_BAD_DAMPING, 0, 0]);
    assert!(out[2 * b * b..4 * b * b].iter().all(|&v| v == 5.0));
    assert!(block_residual(&input, &out, b, 1, 0.1) < 1e-4);
    assert!(thor_kernels::invert::check_info(&info).is_err());
}

/// Blocks that fail at late pivots (the middle and the last panel of a blocked kernel):
/// the reference's pivot reported, the output left as it was; and an indefinite block of
/// size `b` retried to success at the second damping.
pub fn late_failures(inv: &dyn Inverter, b: usize) {
    let mut r = rng(120 + b as u64);
    let good = spd(&mut r, b, 10.0);
    let ks = [b / 2 + 3, b - 5];
    let mut blocks = Vec::new();
    for &k in &ks {
        let mut m = good.clone();
        m[k * b + k] = -100.0;
        blocks.extend(m.iter().map(|&v| v as f32));
    }
    let (_, ref_info) = reference::invert_blocks(&f64s(&blocks), b, &[0.0; 2]).unwrap();
    assert_eq!(ref_info, vec![ks[0] as i32 + 1, ks[1] as i32 + 1]);
    let before = poisoned(blocks.len());
    let (out, info, _) = inv.invert(
        b,
        &blocks,
        InvertCall {
            out_init: Some(&before),
            ..InvertCall::default()
        },
    );
    assert_eq!(info, ref_info, "b={b}");
    let same = out
        .iter()
        .zip(&before)
        .all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "b={b}: a failed block was written");
    // Eigenvalues in [-4, 95]: fails at damping 0.5, succeeds at 5.
    let mut s = spd(&mut r, b, 100.0);
    for i in 0..b {
        s[i * b + i] -= 5.0;
    }
    let ind: Vec<f32> = s.iter().map(|&v| v as f32).collect();
    let (out, info, used) = inv.invert(
        b,
        &ind,
        InvertCall {
            out_init: Some(&poisoned(b * b)),
            damping_all: 0.5,
            policy: FailurePolicy::retry(),
            ..InvertCall::default()
        },
    );
    assert_eq!((info, used), (vec![0], vec![5.0]), "b={b}");
    assert!(block_residual(&ind, &out, b, 0, 5.0) < 1e-4, "b={b}");
}

/// Residual up to condition number 1e7: within [`inverse_tolerance`] (0.25 x cond x eps_f32)
/// everywhere; each figure printed.
pub fn residual_bound(inv: &dyn Inverter, b: usize, label: &str) {
    let mut r = rng(70 + b as u64);
    for cond in [1e4, 1e5, 1e6, 1e7] {
        let input = spd_batch(&mut r, b, 1, &[cond]);
        let (out, info, _) = inv.invert(
            b,
            &input,
            InvertCall {
                out_init: Some(&poisoned(b * b)),
                ..InvertCall::default()
            },
        );
        assert_eq!(info, vec![0], "b={b} cond={cond:e}");
        let res = block_residual(&input, &out, b, 0, 0.0);
        skip_note!(
            "{label} invert b={b} cond={cond:e}: residual {res:.2e} ({:.3} cond eps)",
            res / (cond * f32::EPSILON as f64)
        );
        assert!(
            res <= inverse_tolerance(cond),
            "b={b} cond={cond:e}: residual {res:e}"
        );
    }
}
