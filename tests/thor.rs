//! The optimizer: schedules, trace rule, counters, preconditioned gradient, state files.

mod common;

use common::*;
use thor_kernels::layout::BlockLayout;
use thor_kernels::reference;
use thor_kernels::thor::{
    DampingSchedule, Decision, IntervalSchedule, LayerKind, Thor, ThorConfig, Thresholds,
};
use thor_kernels::{BackendKind, Error};

fn config(block: usize) -> ThorConfig {
    ThorConfig {
        block,
        damping: DampingSchedule::Constant(1e-2),
        interval: IntervalSchedule::Fixed(1),
        backend: BackendKind::Cpu,
        ..ThorConfig::thor()
    }
}

fn scaled(v: &[f32], f: f32) -> Vec<f32> {
    v.iter().map(|x| x * f).collect()
}

#[test]
fn trace_rule_drives_update_reuse_freeze_and_frozen_stays_frozen() {
    let mut t = Thor::new(ThorConfig {
        thresholds: Thresholds::THOR_STOP,
        damping: DampingSchedule::Constant(0.0),
        ..config(32)
    })
    .unwrap();
    let id = t
        .add_layer(LayerKind::Linear {
            inputs: 20,
            outputs: 10,
            bias: false,
        })
        .unwrap();
    let mut r = rng(1);
    let (n, a, g) = (64, normal(&mut r, 64 * 20), normal(&mut r, 64 * 10));
    // Fisher trace scales as f^2 when activations scale by f.
    let steps: [(f32, Decision); 4] = [
        (1.0, Decision::Update),                     // first statistics
        (2.0, Decision::Update),                     // delta = 3
        ((1.005f32).sqrt() * 2.0, Decision::Reuse),  // delta = 0.005
        ((1.005f32).sqrt() * 2.0, Decision::Freeze), // delta = 0
    ];
    for (f, want) in steps {
        assert_eq!(
            t.observe(id, &scaled(&a, f), &g, n).unwrap(),
            want,
            "scale {f}"
        );
        t.finish_step();
    }
    assert!(t.is_frozen(id).unwrap());
    let grad = normal(&mut r, 10 * 20);
    let mut before = vec![0.0; 200];
    t.precondition(id, &grad, &mut before).unwrap();
    // Frozen: new statistics, even wildly different or NaN, change nothing.
    assert_eq!(
        t.observe(id, &scaled(&a, 10.0), &g, n).unwrap(),
        Decision::Frozen
    );
    let mut nan = a.clone();
    nan[3] = f32::NAN;
    assert_eq!(t.observe(id, &nan, &g, n).unwrap(), Decision::Frozen);
    let mut after = vec![0.0; 200];
    t.precondition(id, &grad, &mut after).unwrap();
    assert_eq!(before, after);
    let c = t.counters(id).unwrap();
    assert_eq!(
        (c.statistics, c.updates, c.reuses, c.freezes, c.skipped),
        (4, 2, 1, 1, 0)
    );
}

#[test]
fn non_finite_statistics_are_skipped_and_counted() {
    let mut t = Thor::new(config(32)).unwrap();
    let id = t
        .add_layer(LayerKind::Linear {
            inputs: 8,
            outputs: 5,
            bias: true,
        })
        .unwrap();
    let mut r = rng(2);
    let (a, g) = (normal(&mut r, 16 * 8), normal(&mut r, 16 * 5));
    t.observe(id, &a, &g, 16).unwrap();
    let state = t.to_bytes().unwrap();
    for bad in [f32::NAN, f32::INFINITY] {
        let mut ga = g.clone();
        ga[7] = bad;
        assert_eq!(t.observe(id, &a, &ga, 16).unwrap(), Decision::Skipped);
        let mut aa = a.clone();
        aa[0] = bad;
        assert_eq!(t.observe(id, &aa, &g, 16).unwrap(), Decision::Skipped);
    }
    let c = t.counters(id).unwrap();
    assert_eq!((c.statistics, c.skipped, c.updates), (1, 4, 1));
    // Apart from the counters, nothing moved: same factors and inverses.
    let mut restored = Thor::new(config(32)).unwrap();
    restored
        .add_layer(LayerKind::Linear {
            inputs: 8,
            outputs: 5,
            bias: true,
        })
        .unwrap();
    assert_eq!(
        restored.last_decision(id).unwrap(),
        Decision::Skipped,
        "no step yet"
    );
    restored.load_bytes(&state).unwrap();
    // The last decision is not part of the state: none after a load.
    assert_eq!(restored.last_decision(id).unwrap(), Decision::Skipped);
    assert_eq!(
        t.last_decision(id).unwrap(),
        Decision::Skipped,
        "t's NaN step"
    );
    let grad = normal(&mut r, 5 * 9);
    let (mut x, mut y) = (vec![0.0; 45], vec![0.0; 45]);
    t.precondition(id, &grad, &mut x).unwrap();
    restored.precondition(id, &grad, &mut y).unwrap();
    assert_eq!(x, y);
}

#[test]
fn preconditioned_gradient_matches_the_reference_formula() {
    for (b, inputs, outputs, bias) in [(32, 40, 7, true), (64, 64, 65, false)] {
        let lam = 0.05f32;
        let mut t = Thor::new(ThorConfig {
            damping: DampingSchedule::Constant(lam),
            ..config(b)
        })
        .unwrap();
        let id = t
            .add_layer(LayerKind::Linear {
                inputs,
                outputs,
                bias,
            })
            .unwrap();
        let d_a = inputs + bias as usize;
        let mut r = rng(3 + b as u64);
        let n = 50;
        let (a, g) = (normal(&mut r, n * inputs), normal(&mut r, n * outputs));
        t.observe(id, &a, &g, n).unwrap();
        let grad = normal(&mut r, outputs * d_a);
        let mut out = poisoned(outputs * d_a);
        t.precondition(id, &grad, &mut out).unwrap();
        // Reference: A = [a, 1]^T [a, 1] / n, G = g^T g / n, each damped by sqrt(lam).
        let xa: Vec<f64> = (0..n)
            .flat_map(|i| {
                let row = a[i * inputs..(i + 1) * inputs].iter().map(|&v| v as f64);
                row.chain(bias.then_some(1.0))
            })
            .collect();
        let (la, lg) = (
            BlockLayout::new(d_a, b).unwrap(),
            BlockLayout::new(outputs, b).unwrap(),
        );
        let mut sa = vec![0.0; la.buffer_len()];
        let mut sg = vec![0.0; lg.buffer_len()];
        reference::accumulate(&xa, n, d_a, &la, 1.0 / n as f64, 0.0, &mut sa).unwrap();
        reference::accumulate(&f64s(&g), n, outputs, &lg, 1.0 / n as f64, 0.0, &mut sg).unwrap();
        let s = (lam as f64).sqrt();
        let (ia, _) = reference::invert_blocks(&sa, b, &vec![s; la.blocks()]).unwrap();
        let (ig, _) = reference::invert_blocks(&sg, b, &vec![s; lg.blocks()]).unwrap();
        let want = reference::apply(
            Some((&lg, &ig)),
            &f64s(&grad),
            Some((&la, &ia)),
            outputs,
            d_a,
        )
        .unwrap();
        let err = rel_err(&out, &want);
        assert!(err < 1e-4, "b={b}: {err:e}");
    }
}

#[test]
fn statistics_follow_the_interval_schedule() {
    let mut t = Thor::new(ThorConfig {
        interval: IntervalSchedule::Stepwise(vec![(0.0, 3), (1.0, 5)]),
        ..config(32)
    })
    .unwrap();
    t.add_layer(LayerKind::Linear {
        inputs: 3,
        outputs: 2,
        bias: false,
    })
    .unwrap();
    let mut stats_steps = Vec::new();
    for step in 0..20u64 {
        t.set_epoch(step as f64 / 10.0);
        if t.needs_statistics() {
            stats_steps.push(step);
        }
        t.finish_step();
    }
    assert_eq!(stats_steps, vec![0, 3, 6, 9, 12, 17]);
}

#[test]
fn bad_registrations_and_calls_are_typed_errors() {
    assert!(matches!(
        Thor::new(ThorConfig {
            block: 100,
            ..config(32)
        }),
        Err(Error::InvalidArgument { arg: "block", .. })
    ));
    assert!(matches!(
        Thor::new(ThorConfig {
            stat_decay: 1.0,
            ..config(32)
        }),
        Err(Error::InvalidArgument {
            arg: "stat_decay",
            ..
        })
    ));
    assert!(matches!(
        Thor::new(ThorConfig {
            thresholds: Thresholds {
                w1: 0.001,
                w2: 0.01
            },
            ..config(32)
        }),
        Err(Error::InvalidArgument {
            arg: "thresholds",
            ..
        })
    ));
    // The CUDA backend: a NoDevice error where there is no GPU, an optimizer where there is.
    let cuda = Thor::new(ThorConfig {
        backend: BackendKind::Cuda,
        ..config(32)
    });
    match thor_kernels::backend::AnyBackend::cuda(0) {
        Ok(_) => assert!(cuda.unwrap().backend_name().starts_with("cuda:")),
        Err(_) => assert!(matches!(cuda, Err(Error::NoDevice(_)))),
    }
    let mut t = Thor::new(config(32)).unwrap();
    assert!(matches!(
        t.add_layer(LayerKind::Linear {
            inputs: 0,
            outputs: 3,
            bias: true
        }),
        Err(Error::InvalidArgument { arg: "layer", .. })
    ));
    assert!(matches!(
        t.add_layer(LayerKind::Conv2d {
            c_in: 3,
            c_out: 0,
            kh: 3,
            kw: 3,
            bias: false
        }),
        Err(Error::InvalidArgument { arg: "layer", .. })
    ));
    // Sizes whose products overflow are refused, not wrapped (2^62 + 1 channels of 4 taps
    // would wrap to a 4-column layer) and never panic.
    for kind in [
        LayerKind::Conv2d {
            c_in: (1 << 62) + 1,
            c_out: 1,
            kh: 4,
            kw: 1,
            bias: false,
        },
        LayerKind::Conv2d {
            c_in: usize::MAX,
            c_out: usize::MAX,
            kh: usize::MAX,
            kw: usize::MAX,
            bias: true,
        },
        LayerKind::Linear {
            inputs: usize::MAX,
            outputs: 2,
            bias: true,
        },
    ] {
        let e = t.add_layer(kind).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "layer", .. }),
            "{kind:?}: {e}"
        );
        assert!(e.to_string().contains("too large"), "{e}");
    }
    assert_eq!(t.layers(), 0, "nothing registered");
    let id = t
        .add_layer(LayerKind::Conv2d {
            c_in: 3,
            c_out: 4,
            kh: 3,
            kw: 3,
            bias: false,
        })
        .unwrap();
    assert!(matches!(
        t.observe(id, &[0.0; 27], &[0.0; 3], 1),
        Err(Error::Shape {
            arg: "out_grads",
            ..
        })
    ));
    assert!(matches!(
        t.observe(id, &[], &[], 0),
        Err(Error::InvalidArgument { arg: "rows", .. })
    ));
    let mut out = vec![0.0; 4 * 27];
    assert!(matches!(
        t.precondition(id, &[0.0; 5], &mut out),
        Err(Error::Shape { arg: "grad", .. })
    ));
    assert!(t
        .precondition(thor_kernels::thor::LayerId(9), &[0.0; 108], &mut out)
        .is_err());
    assert!(t.counters(thor_kernels::thor::LayerId(9)).is_err());
}

/// Runs `steps` steps of a fixed synthetic problem from `t`'s current position, returning
/// every preconditioned gradient.
fn drive(
    t: &mut Thor,
    ids: &[thor_kernels::thor::LayerId],
    kinds: &[LayerKind],
    from: u64,
    steps: u64,
) -> Vec<Vec<f32>> {
    let mut outs = Vec::new();
    for step in from..from + steps {
        let mut r = rng(1000 + step);
        t.set_epoch(step as f64 / 4.0);
        if t.needs_statistics() {
            for (&id, k) in ids.iter().zip(kinds) {
                let n = 24;
                let a = normal(&mut r, n * k.inputs());
                let g = normal(&mut r, n * k.d_g());
                t.observe(id, &a, &g, n).unwrap();
            }
        }
        for (&id, k) in ids.iter().zip(kinds) {
            let grad = normal(&mut r, k.d_g() * k.d_a());
            let mut out = vec![0.0; grad.len()];
            t.precondition(id, &grad, &mut out).unwrap();
            outs.push(out);
        }
        t.finish_step();
    }
    outs
}

#[test]
fn a_restored_run_continues_bit_for_bit() {
    let cfg = ThorConfig {
        stat_decay: 0.9,
        interval: IntervalSchedule::Fixed(2),
        damping: DampingSchedule::Decay {
            l0: 0.1,
            decay: 0.5,
            every: 1.0,
        },
        ..config(32)
    };
    let kinds = [
        LayerKind::Linear {
            inputs: 40,
            outputs: 33,
            bias: true,
        },
        LayerKind::Conv2d {
            c_in: 2,
            c_out: 5,
            kh: 3,
            kw: 3,
            bias: false,
        },
    ];
    let build = || {
        let mut t = Thor::new(cfg.clone()).unwrap();
        let ids: Vec<_> = kinds.iter().map(|&k| t.add_layer(k).unwrap()).collect();
        (t, ids)
    };
    let (mut whole, ids) = build();
    let all = drive(&mut whole, &ids, &kinds, 0, 12);
    let (mut first, _) = build();
    let head = drive(&mut first, &ids, &kinds, 0, 5);
    let dir = std::env::temp_dir().join(format!("thor-state-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("state.thor");
    first.save(&path).unwrap();
    let (mut resumed, _) = build();
    resumed.load(&path).unwrap();
    assert_eq!(resumed.step(), 5);
    let tail = drive(&mut resumed, &ids, &kinds, 5, 7);
    let joined: Vec<_> = head.into_iter().chain(tail).collect();
    assert_eq!(joined.len(), all.len());
    for (k, (x, y)) in joined.iter().zip(&all).enumerate() {
        assert!(
            x.iter().zip(y).all(|(a, b)| a.to_bits() == b.to_bits()),
            "output {k} differs after restore"
        );
    }
    for &id in &ids {
        assert_eq!(resumed.counters(id).unwrap(), whole.counters(id).unwrap());
    }

    // Truncated, corrupted, other layers, other version: errors, and nothing changes.
    let good = std::fs::read(&path).unwrap();
    let snapshot = resumed.to_bytes().unwrap();
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    let mut version = good.clone();
    version[8] = 99;
    for (what, bytes) in [
        ("truncated", good[..good.len() - 100].to_vec()),
        ("flipped", flipped),
        ("version", version),
        ("empty", vec![]),
    ] {
        let e = resumed.load_bytes(&bytes).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "state", .. }),
            "{what}: {e}"
        );
        assert_eq!(
            resumed.to_bytes().unwrap(),
            snapshot,
            "{what}: state changed"
        );
    }
    // Well-formed files (checksum recomputed) holding values no optimizer can reach: refused,
    // nothing changes. Offsets: magic 8, version 4, block, layers, step, next 8 each, then
    // the epoch (44); layer 0: shape 48 bytes, flags (100), six counters (108..156), the
    // last trace (156), then its A statistics (length at 164, values from 172).
    let resealed = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = good.clone();
        edit(&mut b);
        let body = b.len() - 8;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &x in &b[..body] {
            h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
        }
        b[body..].copy_from_slice(&h.to_le_bytes());
        b
    };
    for (what, bytes) in [
        (
            "epoch",
            resealed(&|b| b[44..52].copy_from_slice(&f64::NAN.to_le_bytes())),
        ),
        (
            "statistics",
            resealed(&|b| b[172..176].copy_from_slice(&f32::INFINITY.to_le_bytes())),
        ),
        (
            "counters",
            resealed(&|b| b[108..116].copy_from_slice(&1_000u64.to_le_bytes())),
        ),
        ("flags", resealed(&|b| b[100] |= 0x80)),
    ] {
        let e = resumed.load_bytes(&bytes).unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "state", .. }),
            "{what}: {e}"
        );
        assert_eq!(
            resumed.to_bytes().unwrap(),
            snapshot,
            "{what}: state changed"
        );
    }
    assert!(
        resumed.load_bytes(&resealed(&|_| {})).is_ok(),
        "resealing alone is fine"
    );
    // A save that fails after writing its temporary file (the target is a non-empty
    // directory, so the rename fails) leaves the target as it was and no temporary file
    // (the listing at the end finds only state.thor).
    let blocked = dir.join("blocked");
    std::fs::create_dir_all(blocked.join("inside")).unwrap();
    assert!(resumed.save(&blocked).is_err());
    assert!(blocked.join("inside").is_dir());
    std::fs::remove_dir_all(&blocked).unwrap();
    let mut other = Thor::new(cfg.clone()).unwrap();
    other.add_layer(kinds[0]).unwrap();
    assert!(other.load(&path).is_err());
    let mut reshaped = Thor::new(cfg.clone()).unwrap();
    reshaped.add_layer(kinds[0]).unwrap();
    reshaped
        .add_layer(LayerKind::Conv2d {
            c_in: 2,
            c_out: 5,
            kh: 1,
            kw: 9,
            bias: false,
        })
        .unwrap();
    let e = reshaped.load(&path).unwrap_err();
    assert!(e.to_string().contains("layer 1"), "{e}");
    assert!(resumed.load(&dir.join("missing")).is_err());
    // No temporary files left behind by the atomic save.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn kl_clip_scales_large_updates_only() {
    let t = Thor::new(ThorConfig {
        kl_clip: Some(1e-3),
        ..config(32)
    })
    .unwrap();
    let g = vec![1.0f32; 100];
    let d = vec![1.0f32; 100];
    // lr^2 * g.d = 0.01 * 100 = 1 > 1e-3: scale sqrt(1e-3).
    let f = t.kl_clip_factor(0.1, [(&g[..], &d[..])]);
    approx::assert_abs_diff_eq!(f, 1e-3f32.sqrt(), epsilon = 1e-6);
    assert_eq!(t.kl_clip_factor(1e-4, [(&g[..], &d[..])]), 1.0);
    let none = Thor::new(config(32)).unwrap();
    assert_eq!(none.kl_clip_factor(10.0, [(&g[..], &d[..])]), 1.0);
}

#[test]
fn cpu_factor_step_matches_the_optimizer_over_several_steps() {
    // The CPU twin of the device step, on the scenario the emulator and the GPU run
    // (tests/common/step_cases.rs): decisions, counters, statistics, inverses and statuses
    // against `Thor` fed the same batches, and its history.
    use thor_kernels::cpu::step::{CpuThorStep, HostStepInput};
    use thor_kernels::rule::RuleLayer;
    use thor_kernels::step::StepConfig;
    let sc = step_cases::StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let cfg = StepConfig {
        stat_decay: sc.decay,
        thresholds: sc.thresholds,
        history: 4,
        ..StepConfig::default()
    };
    let mut step = CpuThorStep::new::<f32>(&set, &layers, cfg).unwrap();
    let (mut thor, ids) = sc.thor();
    let dims = sc.flat_dims();
    for k in 0..step_cases::STEPS {
        sc.observe(&mut thor, &ids, k);
        let batch = sc.batch(k);
        let inputs: Vec<HostStepInput<'_, f32>> = batch
            .iter()
            .zip(&dims)
            .map(|(x, &ld)| HostStepInput::matrix(x, sc.rows, ld))
            .collect();
        step.run(&inputs, sc.damping).unwrap();
        let decisions: Vec<i32> = step.decisions().iter().map(|d| d.code()).collect();
        let counters: Vec<u64> = step.counters().iter().flat_map(|c| c.to_array()).collect();
        sc.check(
            k,
            &thor,
            &ids,
            &decisions,
            &counters,
            step.stats(),
            step.inverses(),
            step.status(),
        );
    }
    let (n, hist) = step.history();
    assert_eq!(n, step_cases::STEPS as u64);
    assert_eq!(hist.len(), 4, "the last 4 steps");
    for (i, row) in hist.iter().enumerate() {
        let k = step_cases::STEPS - 4 + i;
        for (l, d) in row.iter().enumerate() {
            assert_eq!(*d, sc.want[l][k], "history, layer {l} step {k}");
        }
    }
    // Bad input is refused before anything changes.
    let before = step.stats().to_vec();
    let batch = sc.batch(0);
    let short: Vec<HostStepInput<'_, f32>> = batch
        .iter()
        .zip(&dims)
        .map(|(x, &ld)| HostStepInput::matrix(&x[..x.len() - 1], sc.rows, ld))
        .collect();
    let e = step.run(&short, sc.damping).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    let e = step.run(&short[..2], sc.damping).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "inputs", .. }), "{e}");
    let e = step.run(&short, f32::NAN).unwrap_err();
    assert!(
        matches!(e, Error::InvalidArgument { arg: "damping", .. }),
        "{e}"
    );
    assert_eq!(step.stats(), &before[..]);
    assert_eq!(step.history().0, step_cases::STEPS as u64);
}
