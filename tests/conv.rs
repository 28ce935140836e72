//! Convolution factors straight from NCHW / NHWC tensors (implicit im2col) on the CPU:
//! against the f64 reference (im2col written out from the definition, then the plain
//! accumulation) and against an explicit unfold + dense accumulation on the same data.

mod common;

use common::conv_cases::{conv_cases, position_cases, ConvCase};
use common::*;
use thor_kernels::cpu::{self, FactorInput, Workspace};
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::{reference, Conv2dGeometry, Element, Error, InputLayout, Patches, TensorLayout};

fn arg_of(e: &Error) -> &'static str {
    match e {
        Error::InvalidArgument { arg, .. } | Error::Shape { arg, .. } => arg,
        other => panic!("expected an argument error, got {other:?}"),
    }
}

#[test]
fn patch_offsets_match_the_written_out_im2col() {
    for (i, c) in conv_cases().iter().chain(&position_cases()).enumerate() {
        let p = &c.patches;
        let x = c.tensor(&mut rng(100 + i as u64));
        let want = reference::im2col(&f64s(&x), p).unwrap();
        let (rows, d) = (p.rows(), p.dim());
        assert_eq!(want.len(), rows * d, "{}", c.name);
        for r in 0..rows {
            for col in 0..d {
                assert_eq!(
                    p.value(&x, r, col) as f64,
                    want[r * d + col],
                    "{} ({r}, {col})",
                    c.name
                );
            }
        }
    }
}

/// Implicit against the reference and against unfold + the dense CPU accumulation.
fn check_case<E: Element>(c: &ConvCase, seed: u64, tol: f64) {
    let p = &c.patches;
    let layout = BlockLayout::new(p.dim(), c.b).unwrap();
    let x32 = c.tensor(&mut rng(seed));
    let x: Vec<E> = x32.iter().map(|&v| E::from_f32(v)).collect();
    let xr: Vec<f64> = x.iter().map(|v| v.to_f32() as f64).collect();
    let unfolded = reference::im2col(&xr, p).unwrap();
    let (rows, d) = (p.rows(), p.dim());
    let (alpha, beta) = (1.0 / rows as f32, 0.0);
    let mut want = vec![0.0; layout.buffer_len()];
    reference::accumulate(
        &unfolded,
        rows,
        d,
        &layout,
        alpha as f64,
        beta as f64,
        &mut want,
    )
    .unwrap();
    let mut ws = Workspace::new(cpu::accumulate_workspace_size::<E>(&layout));
    let mut blocks = poisoned(layout.buffer_len());
    let mut traces = poisoned(layout.blocks());
    cpu::accumulate_input(
        &x,
        &InputLayout::Patches(*p),
        &layout,
        alpha,
        beta,
        &mut blocks,
        &mut traces,
        &mut ws,
    )
    .unwrap();
    let err = rel_err(&blocks, &want);
    assert!(err < tol, "{} {:?}: rel err {err:e}", c.name, E::DTYPE);
    let wt = reference::block_traces(&want, c.b).unwrap();
    assert!(rel_err(&traces, &wt) < tol, "{}: traces", c.name);
    // The explicit path on the same (rounded) data.
    let explicit: Vec<E> = unfolded.iter().map(|&v| E::from_f32(v as f32)).collect();
    let mut dense = poisoned(layout.buffer_len());
    let mut dtr = poisoned(layout.blocks());
    cpu::accumulate(
        &explicit, rows, d, &layout, alpha, beta, &mut dense, &mut dtr, &mut ws,
    )
    .unwrap();
    let gap = rel_err(&blocks, &f64s(&dense));
    assert!(gap < 1e-5, "{}: implicit vs unfold {gap:e}", c.name);
}

#[test]
fn implicit_accumulation_matches_reference_and_unfold() {
    for (i, c) in conv_cases().iter().chain(&position_cases()).enumerate() {
        check_case::<f32>(c, 200 + i as u64, 1e-5);
        check_case::<thor_kernels::half::bf16>(c, 300 + i as u64, 1e-5);
    }
}

#[test]
fn g_factor_from_positions_equals_the_transposed_gradient() {
    // [n, c, ho, wo] NCHW, transposed by hand to rows (n, ho, wo) x c, then dense.
    let (n, c, ho, wo, b) = (3, 40, 4, 5, 32);
    let grad = normal(&mut rng(7), n * c * ho * wo);
    let mut rows = vec![0.0f32; n * ho * wo * c];
    for s in 0..n {
        for ch in 0..c {
            for p in 0..ho * wo {
                rows[(s * ho * wo + p) * c + ch] = grad[(s * c + ch) * ho * wo + p];
            }
        }
    }
    let layout = BlockLayout::new(c, b).unwrap();
    let mut ws = Workspace::new(cpu::accumulate_workspace_size::<f32>(&layout));
    let (mut a, mut ta) = (poisoned(layout.buffer_len()), poisoned(2));
    let (mut bb, mut tb) = (poisoned(layout.buffer_len()), poisoned(2));
    let pos = Patches::positions(c, ho, wo, n, TensorLayout::Nchw);
    cpu::accumulate_input(
        &grad,
        &InputLayout::Patches(pos),
        &layout,
        0.5,
        0.0,
        &mut a,
        &mut ta,
        &mut ws,
    )
    .unwrap();
    cpu::accumulate(
        &rows,
        n * ho * wo,
        c,
        &layout,
        0.5,
        0.0,
        &mut bb,
        &mut tb,
        &mut ws,
    )
    .unwrap();
    assert!(rel_err(&a, &f64s(&bb)) < 1e-6);
}

#[test]
fn bad_geometry_is_a_typed_error_and_nothing_is_written() {
    let g = Conv2dGeometry::new(3, 8, 8, [3, 3]);
    let bad: [(Conv2dGeometry, &str); 7] = [
        (Conv2dGeometry { c_in: 0, ..g }, "c_in"),
        (Conv2dGeometry { h: 0, ..g }, "h"),
        (g.with_stride([0, 1]), "stride"),
        (g.with_dilation([1, 0]), "dilation"),
        (
            Conv2dGeometry {
                kernel: [9, 3],
                ..g
            },
            "kernel",
        ),
        (g.with_dilation([4, 1]), "kernel"),
        (
            Conv2dGeometry {
                kernel: [0, 3],
                ..g
            },
            "kernel",
        ),
    ];
    let layout = BlockLayout::new(27, 32).unwrap();
    let x = normal(&mut rng(1), 2 * 3 * 64);
    let mut ws = Workspace::new(cpu::accumulate_workspace_size::<f32>(&layout));
    let mut blocks = vec![7.0f32; layout.buffer_len()];
    let mut tr = vec![7.0f32; 1];
    // One refused call: the argument it names, and nothing written.
    let mut refused = |x: &[f32], p: Patches, layout: &BlockLayout| -> &'static str {
        let e = cpu::accumulate_input(
            x,
            &InputLayout::Patches(p),
            layout,
            1.0,
            0.0,
            &mut blocks,
            &mut tr,
            &mut ws,
        )
        .unwrap_err();
        assert!(blocks.iter().chain(&tr).all(|&v| v == 7.0));
        arg_of(&e)
    };
    for (geom, arg) in bad {
        assert_eq!(arg_of(&geom.validate().unwrap_err()), arg, "{geom:?}");
        let p = Patches::new(geom, 2, TensorLayout::Nchw);
        assert_eq!(refused(&x, p, &layout), arg, "{geom:?}");
    }
    // Mismatched sizes: the factor's dimension, the tensor's length, the batch, strides.
    let p = Patches::new(g, 2, TensorLayout::Nchw);
    let wrong_dim = BlockLayout::new(28, 32).unwrap();
    let cases = [
        (refused(&x, p, &wrong_dim), "patches"),
        (refused(&x[1..], p, &layout), "x"),
        (refused(&x, Patches { batch: 0, ..p }, &layout), "batch"),
        (
            refused(&x, p.with_strides([usize::MAX / 2, 1, 1, 1]), &layout),
            "strides",
        ),
    ];
    for (got, arg) in cases {
        assert_eq!(got, arg);
    }
}

#[test]
fn non_finite_values_count_only_where_a_patch_reads_them() {
    // 1x1 stride 2: odd rows and columns of the input are never read.
    let g = Conv2dGeometry::new(4, 6, 6, [1, 1]).with_stride([2, 2]);
    let p = Patches::new(g, 2, TensorLayout::Nchw);
    let set = FactorSet::new(32, &[4]).unwrap();
    let mut ws = Workspace::new(cpu::accumulate_set_workspace_size::<f32>(&set));
    for (at, status) in [((1usize, 3usize, 1usize), 0), ((2, 2, 4), 1)] {
        let mut x = normal(&mut rng(9), p.span().unwrap());
        x[36 * 4 + at.0 * 36 + at.1 * 6 + at.2] = f32::NAN;
        let inputs = [FactorInput {
            x: &x,
            layout: InputLayout::Patches(p),
            alpha: 0.5,
            beta: 0.0,
        }];
        let mut blocks = vec![0.0f32; set.buffer_len()];
        let (mut bt, mut ft, mut st) = (vec![0.0; 1], vec![0.0; 1], vec![-1; 1]);
        cpu::accumulate_set(
            &set,
            &inputs,
            None,
            None,
            &mut blocks,
            &mut bt,
            &mut ft,
            &mut st,
            &mut ws,
        )
        .unwrap();
        assert_eq!(st[0], status, "NaN at {at:?}");
        assert!(blocks.iter().all(|v| v.is_finite()));
    }
}

mod optimizer {
    use super::*;
    use thor_kernels::thor::{
        ConvNorm, DampingSchedule, IntervalSchedule, LayerKind, Thor, ThorConfig,
    };

    fn thor(norm: ConvNorm, damping: f32) -> Thor {
        Thor::new(ThorConfig {
            block: 32,
            damping: DampingSchedule::Constant(damping),
            interval: IntervalSchedule::Fixed(1),
            backend: thor_kernels::BackendKind::Cpu,
            conv_norm: norm,
            ..ThorConfig::thor()
        })
        .unwrap()
    }

    /// A conv layer's step: input `[n, c_in, h, w]` NCHW, output gradient
    /// `[n, c_out, ho, wo]` NCHW, and the same as explicit rows.
    struct ConvStep {
        input: Vec<f32>,
        grad: Vec<f32>,
        a_view: Patches,
        g_view: Patches,
        acts_rows: Vec<f32>,
        grad_rows: Vec<f32>,
        rows: usize,
    }

    fn conv_step(g: Conv2dGeometry, n: usize, c_out: usize, seed: u64) -> ConvStep {
        let mut r = rng(seed);
        let a_view = Patches::new(g, n, TensorLayout::Nchw);
        let [ho, wo] = g.output().unwrap();
        let g_view = Patches::positions(c_out, ho, wo, n, TensorLayout::Nchw);
        let input = normal(&mut r, a_view.span().unwrap());
        let grad = normal(&mut r, g_view.span().unwrap());
        let acts_rows: Vec<f32> = reference::im2col(&f64s(&input), &a_view)
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        let grad_rows: Vec<f32> = reference::im2col(&f64s(&grad), &g_view)
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect();
        ConvStep {
            input,
            grad,
            a_view,
            g_view,
            acts_rows,
            grad_rows,
            rows: n * ho * wo,
        }
    }

    fn conv_layer(g: &Conv2dGeometry, c_out: usize, bias: bool) -> LayerKind {
        LayerKind::Conv2d {
            c_in: g.c_in,
            c_out,
            kh: g.kernel[0],
            kw: g.kernel[1],
            bias,
        }
    }

    #[test]
    fn observe_conv_matches_explicit_patch_rows() {
        let g = Conv2dGeometry::new(5, 9, 8, [3, 3])
            .with_stride([2, 1])
            .with_padding([1, 1]);
        let c_out = 37;
        let kind = conv_layer(&g, c_out, true);
        let (mut implicit, mut explicit) = (
            thor(ConvNorm::PerPosition, 0.03),
            thor(ConvNorm::PerPosition, 0.03),
        );
        let (li, le) = (
            implicit.add_layer(kind).unwrap(),
            explicit.add_layer(kind).unwrap(),
        );
        let d = kind.d_a() * kind.d_g();
        for step in 0..4 {
            let s = conv_step(g, 2, c_out, 40 + step);
            let di = implicit
                .observe_conv(li, &s.input, s.a_view, &s.grad, s.g_view)
                .unwrap();
            let de = explicit
                .observe(le, &s.acts_rows, &s.grad_rows, s.rows)
                .unwrap();
            assert_eq!(di, de, "step {step}");
            let grad = normal(&mut rng(90 + step), d);
            let (mut oi, mut oe) = (poisoned(d), poisoned(d));
            implicit.precondition(li, &grad, &mut oi).unwrap();
            explicit.precondition(le, &grad, &mut oe).unwrap();
            let err = rel_err(&oi, &f64s(&oe));
            assert!(err < 1e-5, "step {step}: {err:e}");
            implicit.finish_step();
            explicit.finish_step();
        }
        assert_eq!(
            implicit.counters(li).unwrap(),
            explicit.counters(le).unwrap()
        );
    }

    /// KFC's A is `T` times the per-position one: without damping, the preconditioned
    /// gradient under `ConvNorm::Kfc` is the per-position one divided by `T = ho * wo`.
    #[test]
    fn kfc_normalisation_divides_the_update_by_the_positions() {
        let g = Conv2dGeometry::new(3, 10, 10, [3, 3]).with_padding([1, 1]);
        let c_out = 8;
        let kind = conv_layer(&g, c_out, false);
        let s = conv_step(g, 4, c_out, 5);
        let t = 100.0f64;
        let damping = 1e-12;
        let (mut kfc, mut pos) = (
            thor(ConvNorm::Kfc, damping),
            thor(ConvNorm::PerPosition, damping),
        );
        let (lk, lp) = (kfc.add_layer(kind).unwrap(), pos.add_layer(kind).unwrap());
        kfc.observe_conv(lk, &s.input, s.a_view, &s.grad, s.g_view)
            .unwrap();
        pos.observe_conv(lp, &s.input, s.a_view, &s.grad, s.g_view)
            .unwrap();
        let d = kind.d_a() * kind.d_g();
        let grad = normal(&mut rng(6), d);
        let (mut ok, mut op) = (poisoned(d), poisoned(d));
        kfc.precondition(lk, &grad, &mut ok).unwrap();
        pos.precondition(lp, &grad, &mut op).unwrap();
        let scaled: Vec<f64> = op.iter().map(|&v| v as f64 / t).collect();
        let err = rel_err(&ok, &scaled);
        assert!(err < 1e-3, "kfc vs per-position / T: {err:e}");
        // And the two are not the same update.
        assert!(rel_err(&ok, &f64s(&op)) > 0.5);
    }

    #[test]
    fn observe_conv_refuses_mismatched_views_and_changes_nothing() {
        let g = Conv2dGeometry::new(4, 6, 6, [3, 3]);
        let c_out = 5;
        let mut t = thor(ConvNorm::PerPosition, 0.03);
        let conv = t.add_layer(conv_layer(&g, c_out, false)).unwrap();
        let lin = t
            .add_layer(LayerKind::Linear {
                inputs: 36,
                outputs: 5,
                bias: false,
            })
            .unwrap();
        let s = conv_step(g, 2, c_out, 3);
        let wrong_c = Patches::new(Conv2dGeometry { c_in: 3, ..g }, 2, TensorLayout::Nchw);
        let wrong_k = Patches::new(
            Conv2dGeometry {
                kernel: [3, 1],
                ..g
            },
            2,
            TensorLayout::Nchw,
        );
        let wrong_g = Patches::positions(c_out, 4, 5, 2, TensorLayout::Nchw);
        let wrong_n = Patches::positions(c_out, 4, 4, 3, TensorLayout::Nchw);
        let bad_stride = Patches::new(g.with_stride([0, 1]), 2, TensorLayout::Nchw);
        let cases: Vec<(Result<_, Error>, &str)> = vec![
            (
                t.observe_conv(lin, &s.input, s.a_view, &s.grad, s.g_view),
                "layer",
            ),
            (
                t.observe_conv(conv, &s.input, wrong_c, &s.grad, s.g_view),
                "input_view",
            ),
            (
                t.observe_conv(conv, &s.input, wrong_k, &s.grad, s.g_view),
                "input_view",
            ),
            (
                t.observe_conv(conv, &s.input, s.a_view, &s.grad, wrong_g),
                "grad_view",
            ),
            (
                t.observe_conv(conv, &s.input, s.a_view, &s.grad, wrong_n),
                "grad_view",
            ),
            (
                t.observe_conv(conv, &s.input, bad_stride, &s.grad, s.g_view),
                "stride",
            ),
            (
                t.observe_conv(conv, &s.input[1..], s.a_view, &s.grad, s.g_view),
                "input",
            ),
            (
                t.observe_conv(conv, &s.input, s.a_view, &s.grad[..10], s.g_view),
                "out_grad",
            ),
        ];
        for (r, arg) in cases {
            assert_eq!(arg_of(&r.unwrap_err()), arg);
        }
        assert_eq!(t.counters(conv).unwrap().statistics, 0);
        // A NaN the patches read: skipped, counted, nothing else changes.
        let mut bad = s.input.clone();
        bad[7] = f32::NAN;
        let d = t
            .observe_conv(conv, &bad, s.a_view, &s.grad, s.g_view)
            .unwrap();
        assert_eq!(d, thor_kernels::thor::Decision::Skipped);
        assert_eq!(t.counters(conv).unwrap().skipped, 1);
    }
}

/// The device's row decoding divides through a double reciprocal and one correction step
/// (`acc_divmod` in kernels/accumulate.cu, mirrored here line for line): exact for every
/// numerator below 2^30 and divisor below 2^30, checked at the edges where rounding could
/// push the quotient off by one.
#[test]
fn division_by_double_reciprocal_is_exact() {
    fn divmod(a: i32, d: i32, inv: f64) -> (i32, i32) {
        let mut q = (a as f64 * inv) as i32;
        let mut r = a - q * d;
        if r < 0 {
            q -= 1;
            r += d;
        } else if r >= d {
            q += 1;
            r -= d;
        }
        (q, r)
    }
    let max = (1i32 << 30) - 1;
    let divisors = [
        1,
        2,
        3,
        7,
        49,
        3136,
        12544,
        (1 << 22) - 1,
        (1 << 22) + 1,
        (1 << 29) + 3,
        max - 1,
        max,
    ];
    let mut r = rng(77);
    for &d in &divisors {
        let inv = 1.0 / d as f64;
        let mut nums: Vec<i32> = vec![0, 1, d - 1, d, max, max - 1];
        for k in [1i64, 2, 3, 1000, (max / d) as i64] {
            for off in [-1i64, 0, 1] {
                let a = k * d as i64 + off;
                if (0..=max as i64).contains(&a) {
                    nums.push(a as i32);
                }
            }
        }
        nums.extend((0..1000).map(|_| rand::Rng::random_range(&mut r, 0..=max)));
        for a in nums {
            assert_eq!(divmod(a, d, inv), (a / d, a % d), "{a} / {d}");
        }
    }
}
