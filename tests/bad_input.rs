//! Bad input gives a typed error naming the argument and leaves the caller's buffers as
//! they were; nothing panics.

mod common;

use common::*;
use thor_kernels::cpu::{self, InvertOptions, Workspace};
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::Error;

fn arg_of(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::Shape { arg, .. } => arg,
        other => panic!("expected an argument error, got {other:?}"),
    }
}

#[test]
fn layout_errors_are_typed() {
    assert_eq!(arg_of(&BlockLayout::new(10, 100).unwrap_err()), "block");
    assert_eq!(arg_of(&BlockLayout::new(0, 32).unwrap_err()), "dim");
    assert_eq!(arg_of(&FactorSet::new(32, &[]).unwrap_err()), "dims");
    let msg = BlockLayout::new(10, 100).unwrap_err().to_string();
    assert!(
        msg.contains("100") && msg.contains("[32, 64, 128, 256]"),
        "{msg}"
    );
}

#[test]
fn split_rejects_bad_shapes_and_copies_non_finite_values() {
    let layout = BlockLayout::new(40, 32).unwrap();
    let mut out = vec![3.0f32; layout.buffer_len()];
    let short = vec![1.0f32; 40 * 40 - 1];
    assert_eq!(
        arg_of(&cpu::split(&short, 40, &layout, &mut out).unwrap_err()),
        "dense"
    );
    let dense = vec![1.0f32; 40 * 40];
    assert_eq!(
        arg_of(&cpu::split(&dense, 39, &layout, &mut out).unwrap_err()),
        "ld"
    );
    let mut small = vec![3.0f32; 10];
    assert_eq!(
        arg_of(&cpu::split(&dense, 40, &layout, &mut small).unwrap_err()),
        "out"
    );
    assert!(out.iter().all(|&v| v == 3.0), "output touched on error");
    // A pure copy on both backends: non-finite values go through, they are not errors.
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut d = dense.clone();
        d[7 * 40 + 9] = bad;
        cpu::split(&d, 40, &layout, &mut out).unwrap();
        assert_eq!(out[7 * 32 + 9].to_bits(), bad.to_bits());
        assert!(out
            .iter()
            .enumerate()
            .all(|(i, v)| i == 7 * 32 + 9 || v.is_finite()));
    }
}

#[test]
fn accumulate_rejects_bad_input_and_keeps_statistics() {
    let layout = BlockLayout::new(50, 32).unwrap();
    let mut r = rng(1);
    let x = normal(&mut r, 20 * 50);
    let before = normal(&mut r, layout.buffer_len());
    let mut blocks = before.clone();
    let mut tr = vec![5.0f32; layout.blocks()];
    let mut ws = Workspace::new(0);
    let mut run = |x: &[f32], rows: usize, ld: usize, alpha: f32, beta: f32| {
        cpu::accumulate(
            x,
            rows,
            ld,
            &layout,
            alpha,
            beta,
            &mut blocks,
            &mut tr,
            &mut ws,
        )
        .unwrap_err()
    };
    assert_eq!(arg_of(&run(&x, 0, 50, 1.0, 0.0)), "rows");
    assert_eq!(arg_of(&run(&x, 21, 50, 1.0, 0.0)), "x");
    assert_eq!(arg_of(&run(&x, 20, 49, 1.0, 0.0)), "ld");
    // One row spans only `d` elements whatever the stride, but a stride of 2^61 used to
    // overflow a byte stride inside the matrix product (a panic).
    assert_eq!(arg_of(&run(&x, 1, (1 << 61) + 4, 1.0, 0.0)), "ld");
    assert_eq!(arg_of(&run(&x, 1, usize::MAX, 1.0, 0.0)), "ld");
    assert_eq!(arg_of(&run(&x, 20, 50, f32::NAN, 0.0)), "alpha");
    assert_eq!(arg_of(&run(&x, 20, 50, 1.0, f32::INFINITY)), "beta");
    let mut xn = x.clone();
    xn[13 * 50 + 49] = f32::NAN;
    assert_eq!(arg_of(&run(&xn, 20, 50, 1.0, 0.5)), "x");
    assert!(blocks
        .iter()
        .zip(&before)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
    assert!(tr.iter().all(|&v| v == 5.0));
    // f16 input with a workspace that is too small.
    let xh: Vec<half::f16> = x.iter().map(|&v| half::f16::from_f32(v)).collect();
    let mut tiny = Workspace::new(16);
    let e = cpu::accumulate(
        &xh,
        20,
        50,
        &layout,
        1.0,
        0.0,
        &mut blocks,
        &mut tr,
        &mut tiny,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "workspace");
    assert!(blocks
        .iter()
        .zip(&before)
        .all(|(a, b)| a.to_bits() == b.to_bits()));
}

#[test]
fn invert_rejects_bad_damping_and_empty_input() {
    let b = 32;
    let mut r = rng(2);
    let s: Vec<f32> = spd(&mut r, b, 10.0).iter().map(|&v| v as f32).collect();
    let before = vec![9.0f32; b * b];
    let mut out = before.clone();
    let mut info = vec![-7; 1];
    let mut ws = Workspace::new(cpu::invert_workspace_size(b, 1));
    for d in [-1.0, f32::NAN, f32::INFINITY] {
        let e = cpu::invert(
            b,
            &s,
            &mut out,
            &mut info,
            None,
            &InvertOptions::uniform(d),
            &mut ws,
        )
        .unwrap_err();
        assert_eq!(arg_of(&e), "damping");
    }
    let e = cpu::invert(
        b,
        &s,
        &mut out,
        &mut info,
        None,
        &InvertOptions::per_block(&[0.1, 0.2]),
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "damping");
    // Per-block values are data: a bad one marks its block, as on the device.
    let mut two = vec![9.0f32; 2 * b * b];
    let ss: Vec<f32> = s.iter().chain(&s).copied().collect();
    let mut info2 = vec![-7; 2];
    let mut used = vec![-5.0f32; 2];
    cpu::invert(
        b,
        &ss,
        &mut two,
        &mut info2,
        Some(&mut used),
        &InvertOptions::per_block(&[f32::NAN, 0.1]),
        &mut Workspace::new(cpu::invert_workspace_size(b, 2)),
    )
    .unwrap();
    assert_eq!(info2, vec![cpu::INFO_BAD_DAMPING, 0]);
    assert!(
        two[..b * b].iter().all(|&v| v == 9.0),
        "the bad block is untouched"
    );
    assert_eq!(used[0], -5.0);
    assert_eq!(used[1], 0.1);
    let e = cpu::invert(
        48,
        &s,
        &mut out,
        &mut info,
        None,
        &InvertOptions::uniform(0.0),
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "block");
    let e = cpu::invert(
        b,
        &[],
        &mut [],
        &mut [],
        None,
        &InvertOptions::uniform(0.0),
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "info");
    let mut none = Workspace::new(0);
    let e = cpu::invert(
        b,
        &s,
        &mut out,
        &mut info,
        None,
        &InvertOptions::uniform(0.0),
        &mut none,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "workspace");
    assert_eq!(out, before);
    assert_eq!(info, vec![-7]);
}

#[test]
fn traces_and_apply_reject_bad_input() {
    let set = FactorSet::new(32, &[40, 3]).unwrap();
    let mut blocks = vec![1.0f32; set.buffer_len()];
    let mut bt = vec![2.0f32; set.total_blocks()];
    let mut ft = vec![2.0f32; set.len()];
    let e = cpu::traces(&set, &blocks[1..], &mut bt, &mut ft).unwrap_err();
    assert_eq!(arg_of(&e), "blocks");
    assert!(bt.iter().chain(&ft).all(|&v| v == 2.0));
    // A non-finite diagonal gives a non-finite trace of that block and factor only, as on
    // the GPU; the others are exact.
    blocks[32 * 32 + 5 * 32 + 5] = f32::NAN;
    cpu::traces(&set, &blocks, &mut bt, &mut ft).unwrap();
    assert_eq!((bt[0], bt[2]), (32.0, 32.0));
    assert!(bt[1].is_nan() && ft[0].is_nan());
    assert_eq!(ft[1], 3.0);

    let gl = BlockLayout::new(4, 32).unwrap();
    let al = BlockLayout::new(6, 32).unwrap();
    let g = vec![0.5f32; gl.buffer_len()];
    let a = vec![0.5f32; al.buffer_len()];
    let mut grad = vec![1.0f32; 24];
    let mut out = vec![4.0f32; 24];
    let mut ws = Workspace::new(cpu::apply_workspace_size(Some(32), 4, 6));
    // The G factor of the wrong dimension.
    let e = cpu::apply(
        Some((&al, &a)),
        &grad,
        Some((&al, &a)),
        4,
        6,
        1.0,
        &mut out,
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "g_inv");
    let e = cpu::apply(
        Some((&gl, &g)),
        &grad,
        Some((&al, &a)),
        4,
        6,
        f32::NAN,
        &mut out,
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "scale");
    let e = cpu::apply(
        Some((&gl, &g)),
        &grad,
        Some((&al, &a)),
        0,
        6,
        1.0,
        &mut out,
        &mut ws,
    )
    .unwrap_err();
    assert!(matches!(e, Error::InvalidArgument { .. }));
    grad[3] = f32::INFINITY;
    let e = cpu::apply(
        Some((&gl, &g)),
        &grad,
        Some((&al, &a)),
        4,
        6,
        1.0,
        &mut out,
        &mut ws,
    )
    .unwrap_err();
    assert_eq!(arg_of(&e), "grad");
    assert!(out.iter().all(|&v| v == 4.0));
}

/// Device planners check every size before anything reaches a kernel: rows above the cap
/// (no `int` row counter in a kernel may overflow) and rule layers whose block range
/// overflows or leaves the set are refused by name; no GPU is needed to plan.
#[cfg(feature = "cuda")]
#[test]
fn device_planners_refuse_sizes_a_kernel_cannot_count() {
    use thor_kernels::cuda::accumulate::{AccumulateMode, AccumulatePlan, MAX_ROWS};
    use thor_kernels::cuda::RuleLayer;
    use thor_kernels::DType;
    let set = FactorSet::new(32, &[40, 7]).unwrap();
    let plan = |rows: &[usize]| AccumulatePlan::new(&set, rows, DType::F32, AccumulateMode::F32, 4);
    assert!(plan(&[MAX_ROWS, 1]).is_ok());
    for rows in [[MAX_ROWS + 1, 1], [1, usize::MAX], [0, 1]] {
        let e = plan(&rows).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "rows", .. }),
            "{rows:?}: {e}"
        );
    }
    let ok = RuleLayer::pairs(&set);
    assert_eq!(RuleLayer::table(&set, &ok).unwrap().len(), 6);
    for (first_block, blocks) in [(usize::MAX, 2), (1, usize::MAX), (2, 2), (4, 0)] {
        let bad = [RuleLayer {
            first_block,
            blocks,
            ..ok[0]
        }];
        let e = RuleLayer::table(&set, &bad).unwrap_err();
        assert_eq!(arg_of(&e), "layers", "{first_block} + {blocks}: {e}");
    }
    let bad = [RuleLayer {
        g_factor: Some(2),
        ..ok[0]
    }];
    let e = RuleLayer::table(&set, &bad).unwrap_err();
    assert!(e.to_string().contains("factor 2 not in the set"), "{e}");
}

#[test]
fn caller_sized_scratch_is_a_typed_error_not_an_abort() {
    // A shape no memory holds: the size query saturates instead of wrapping (it used to
    // overflow), and the fallible allocation reports it by kind and argument.
    let need = cpu::apply_workspace_size(Some(256), usize::MAX / 2, usize::MAX / 2);
    assert_eq!(need, usize::MAX);
    match Workspace::try_new(need) {
        Err(Error::OutOfMemory { arg, bytes }) => {
            assert_eq!(arg, "workspace");
            assert_eq!(bytes, usize::MAX);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
    // And apply refuses a gradient shape whose element count overflows, by name.
    let mut ws = Workspace::new(0);
    let e = cpu::apply(None, &[], None, usize::MAX / 2, 3, 1.0, &mut [], &mut ws).unwrap_err();
    assert_eq!(arg_of(&e), "out_dim");
}

#[test]
fn step_layers_own_their_factors_and_blocks() {
    use thor_kernels::rule::RuleLayer;
    let set = FactorSet::new(32, &[40, 7, 12, 3]).unwrap();
    let pairs = RuleLayer::pairs(&set);
    RuleLayer::check_step_layers(&set, &pairs).unwrap();
    let refused = |layers: &[RuleLayer], what: &str| {
        let e = RuleLayer::check_step_layers(&set, layers).unwrap_err();
        assert_eq!(arg_of(&e), "layers");
        assert!(e.to_string().contains(what), "{e}");
    };
    // Factor 1 in two layers: the rule would write its state from two threads.
    let mut shared = pairs.clone();
    shared[1].a_factor = Some(1);
    refused(&shared, "factor 1 belongs to layers 0 and 1");
    let mut same = pairs.clone();
    same[0].g_factor = Some(0);
    refused(&same, "the same factor");
    let mut outside = pairs.clone();
    outside[1].g_factor = Some(9);
    refused(&outside, "not in the set");
    // Block ranges that are not the layer's own: overlapping another layer's, or short.
    let mut over = pairs.clone();
    over[1].first_block = 0;
    refused(&over, "are not its factors' blocks");
    let mut short = pairs.clone();
    short[0].blocks -= 1;
    refused(&short, "are not its factors' blocks");
    // A factor in no layer would be re-initialised every step.
    refused(&pairs[..1], "factor 2 belongs to no layer");
    // Factors whose blocks are not back to back (A of layer 0 with G of layer 1).
    let swapped = [
        RuleLayer {
            a_factor: Some(0),
            g_factor: Some(3),
            first_block: 0,
            blocks: 3,
        },
        RuleLayer {
            a_factor: Some(2),
            g_factor: Some(1),
            first_block: 2,
            blocks: 2,
        },
    ];
    refused(&swapped, "not back to back");
}
