//! thor-candle on the CPU: the layers' forward passes against candle-nn's, the recorded
//! statistics and the update against THOR's engine driven by hand with explicitly computed
//! activations and output gradients, the errors, and save / load.

use candle_core::{DType, Device, Module, Tensor, Var};
use candle_nn::{Conv2dConfig, VarBuilder, VarMap};
use thor_candle::{
    Error, LossMean, MomentumSgd, ParamsMomentumSgd, ThorConfig, ThorLayers, ThorOptimizer,
    ThorParams,
};
use thor_kernels::backend::{AnyBackend, CpuBackend};
use thor_kernels::thor::{IntervalSchedule, LayerKind, Thor};

const B: usize = 6;

fn dev() -> Device {
    Device::Cpu
}

/// A deterministic tensor (the CPU's random tensors are not seeded).
fn det(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
        })
        .collect();
    Tensor::from_vec(v, shape, &dev()).unwrap()
}

/// Sets every variable of `varmap` to a deterministic value (by name).
fn init(varmap: &VarMap) {
    let data = varmap.data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for (k, name) in names.iter().enumerate() {
        let v = &data[name];
        v.set(&(det(v.dims(), 100 + k as u64) * 0.5).unwrap())
            .unwrap();
    }
}

fn config(interval: u64) -> ThorConfig {
    ThorConfig {
        block: 32,
        interval: IntervalSchedule::Fixed(interval),
        ..ThorConfig::thor()
    }
}

fn params(interval: u64) -> ThorParams {
    ThorParams {
        sgd: ParamsMomentumSgd {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
        },
        thor: config(interval),
        loss_mean: LossMean::Batch,
    }
}

fn host2(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: got {g}, want {w} (scale {scale})"
        );
    }
}

/// linear(5 -> 4) - relu - linear(4 -> 3), squared error summed over outputs, mean over
/// the batch.
struct Mlp {
    varmap: VarMap,
    layers: ThorLayers,
    fc1: thor_candle::ThorLinear,
    fc2: thor_candle::ThorLinear,
}

impl Mlp {
    fn new() -> Self {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
        let layers = ThorLayers::new();
        let fc1 = thor_candle::linear(5, 4, vb.pp("fc1"), &layers).unwrap();
        let fc2 = thor_candle::linear(4, 3, vb.pp("fc2"), &layers).unwrap();
        init(&varmap);
        Self {
            varmap,
            layers,
            fc1,
            fc2,
        }
    }

    fn loss(&self, x: &Tensor, t: &Tensor) -> Tensor {
        let y = self
            .fc2
            .forward(&self.fc1.forward(x).unwrap().relu().unwrap())
            .unwrap();
        ((y - t).unwrap().sqr().unwrap().sum_all().unwrap() / B as f64).unwrap()
    }

    fn var(&self, name: &str) -> Tensor {
        self.varmap.data().lock().unwrap()[name]
            .as_tensor()
            .copy()
            .unwrap()
    }
}

fn mm(a: &[Vec<f64>], b: &[Vec<f64>]) -> Vec<Vec<f64>> {
    let (n, k, m) = (a.len(), b.len(), b[0].len());
    (0..n)
        .map(|i| {
            (0..m)
                .map(|j| (0..k).map(|p| a[i][p] * b[p][j]).sum())
                .collect()
        })
        .collect()
}

fn f64s(t: &Tensor) -> Vec<Vec<f64>> {
    host2(t)
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect()
}

/// The layer's gradient `[out, in + 1]` of the mean loss from explicit per-example output
/// gradients `g` (summed loss) and inputs `a`, weight decay included.
fn explicit_grad(g: &[Vec<f64>], a: &[Vec<f64>], w: &Tensor, b: &Tensor, wd: f64) -> Vec<f32> {
    let (w, b) = (f64s(w), flat(b));
    let (out, inp) = (w.len(), w[0].len());
    let mut full = Vec::new();
    for o in 0..out {
        for i in 0..inp {
            let s: f64 = (0..B).map(|n| g[n][o] * a[n][i]).sum::<f64>() / B as f64;
            full.push((s + wd * w[o][i]) as f32);
        }
        let s: f64 = (0..B).map(|n| g[n][o]).sum::<f64>() / B as f64;
        full.push((s + wd * b[o] as f64) as f32);
    }
    full
}

fn rows_f32(m: &[Vec<f64>]) -> Vec<f32> {
    m.iter().flatten().map(|&v| v as f32).collect()
}

#[test]
fn forward_passes_equal_candle_nn() {
    let net = Mlp::new();
    // Without an optimizer the layers record nothing; with one they record (step 0).
    assert!(!net.layers.is_recording());
    let _opt = ThorOptimizer::new(&net.varmap, &net.layers, params(2)).unwrap();
    assert!(net.layers.is_recording());
    for x in [det(&[B, 5], 1), det(&[2, 3, 5], 2)] {
        let got = net.fc1.forward(&x).unwrap();
        let want = net.fc1.inner().forward(&x).unwrap();
        assert_eq!(flat(&got), flat(&want));
    }
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let layers = ThorLayers::new();
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let conv = thor_candle::conv2d(2, 3, 3, cfg, vb.pp("c"), &layers).unwrap();
    let _opt = ThorOptimizer::new(&varmap, &layers, params(2)).unwrap();
    assert!(layers.is_recording());
    let x = det(&[2, 2, 7, 6], 3);
    let got = conv.forward(&x).unwrap();
    assert_eq!(flat(&got), flat(&conv.inner().forward(&x).unwrap()));
    layers.set_training(false);
    assert!(!layers.is_recording());
    assert_eq!(flat(&conv.forward(&x).unwrap()), flat(&got));
}

/// One statistics step and one plain step of the MLP against the engine driven by hand
/// with explicitly computed activations, output gradients and gradients.
#[test]
fn linear_step_matches_the_engine_driven_by_hand() {
    let net = Mlp::new();
    let p = params(2);
    let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, p.clone()).unwrap();
    let (x, t) = (det(&[B, 5], 7), det(&[B, 3], 8));
    let (w1, b1, w2, b2) = (
        net.var("fc1.weight"),
        net.var("fc1.bias"),
        net.var("fc2.weight"),
        net.var("fc2.bias"),
    );
    // Explicit forward and backward in f64.
    let xs = f64s(&x);
    let z1: Vec<Vec<f64>> = mm(&xs, &transpose(&f64s(&w1)))
        .into_iter()
        .map(|r| r.iter().zip(flat(&b1)).map(|(v, b)| v + b as f64).collect())
        .collect();
    let h: Vec<Vec<f64>> = z1
        .iter()
        .map(|r| r.iter().map(|v| v.max(0.0)).collect())
        .collect();
    let y: Vec<Vec<f64>> = mm(&h, &transpose(&f64s(&w2)))
        .into_iter()
        .map(|r| r.iter().zip(flat(&b2)).map(|(v, b)| v + b as f64).collect())
        .collect();
    let ts = f64s(&t);
    // Output gradients of the summed loss.
    let g2: Vec<Vec<f64>> = (0..B)
        .map(|n| (0..3).map(|o| 2.0 * (y[n][o] - ts[n][o])).collect())
        .collect();
    let g1: Vec<Vec<f64>> = mm(&g2, &f64s(&w2))
        .into_iter()
        .zip(&z1)
        .map(|(r, z)| {
            r.iter()
                .zip(z)
                .map(|(g, z)| if *z > 0.0 { *g } else { 0.0 })
                .collect()
        })
        .collect();
    let wd = p.sgd.weight_decay;
    let full1 = explicit_grad(&g1, &xs, &w1, &b1, wd);
    let full2 = explicit_grad(&g2, &h, &w2, &b2, wd);

    let mut thor = Thor::with_backend(config(2), AnyBackend::Cpu(CpuBackend)).unwrap();
    let l1 = thor
        .add_layer(LayerKind::Linear {
            inputs: 5,
            outputs: 4,
            bias: true,
        })
        .unwrap();
    let l2 = thor
        .add_layer(LayerKind::Linear {
            inputs: 4,
            outputs: 3,
            bias: true,
        })
        .unwrap();
    thor.observe(l1, &rows_f32(&xs), &rows_f32(&g1), B).unwrap();
    thor.observe(l2, &rows_f32(&h), &rows_f32(&g2), B).unwrap();
    let mut u1 = vec![0.0; full1.len()];
    let mut u2 = vec![0.0; full2.len()];
    thor.precondition(l1, &full1, &mut u1).unwrap();
    thor.precondition(l2, &full2, &mut u2).unwrap();

    opt.backward_step(&net.loss(&x, &t)).unwrap();
    assert_eq!(opt.thor().step(), 1);
    // The layers' statistics changed the preconditioner: THOR's update is not the gradient.
    assert!(u1.iter().zip(&full1).any(|(u, g)| (u - g).abs() > 1e-3));
    let lr = p.sgd.lr as f32;
    let expect = |w: &Tensor, b: &Tensor, u: &[f32]| -> (Vec<f32>, Vec<f32>) {
        let (wv, bv) = (flat(w), flat(b));
        let cols = wv.len() / bv.len() + 1;
        let mut nw = Vec::new();
        let mut nb = Vec::new();
        for (o, row) in u.chunks(cols).enumerate() {
            for (i, d) in row[..cols - 1].iter().enumerate() {
                nw.push(wv[o * (cols - 1) + i] - lr * d);
            }
            nb.push(bv[o] - lr * row[cols - 1]);
        }
        (nw, nb)
    };
    let (nw1, nb1) = expect(&w1, &b1, &u1);
    let (nw2, nb2) = expect(&w2, &b2, &u2);
    assert_close(&flat(&net.var("fc1.weight")), &nw1, 1e-4, "fc1.weight");
    assert_close(&flat(&net.var("fc1.bias")), &nb1, 1e-4, "fc1.bias");
    assert_close(&flat(&net.var("fc2.weight")), &nw2, 1e-4, "fc2.weight");
    assert_close(&flat(&net.var("fc2.bias")), &nb2, 1e-4, "fc2.bias");

    // Interval 2: the next step is not a statistics step; nothing records, and the
    // preconditioned gradient is the engine's with unchanged inverses.
    assert!(!net.layers.is_recording());
    let g = det(&[4, 6], 9);
    let want = {
        let mut out = vec![0.0; 24];
        thor.precondition(l1, &flat(&g), &mut out).unwrap();
        out
    };
    let got = opt.precondition(net.fc1.id(), &g).unwrap();
    assert_close(&flat(&got), &want, 1e-5, "precondition");
    let before = opt.counters(net.fc1.id()).unwrap();
    opt.backward_step(&net.loss(&x, &t)).unwrap();
    assert_eq!(opt.counters(net.fc1.id()).unwrap(), before);
    assert!(net.layers.is_recording(), "step 2 is a statistics step");
}

fn transpose(m: &[Vec<f64>]) -> Vec<Vec<f64>> {
    (0..m[0].len())
        .map(|j| m.iter().map(|r| r[j]).collect())
        .collect()
}

/// A conv layer's statistics: the engine fed explicit im2col rows and the conv output's
/// gradient (taken from a separate graph where the output is a variable).
#[test]
fn conv_step_matches_the_engine_driven_by_hand() {
    // Sizes for which candle's conv backward handles stride 2: (h + 2 - k) even.
    let (n, c_in, h, w, c_out, k) = (3usize, 2usize, 7usize, 5usize, 3usize, 3usize);
    let cfg = Conv2dConfig {
        padding: 1,
        stride: 2,
        ..Default::default()
    };
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let layers = ThorLayers::new();
    let conv = thor_candle::conv2d(c_in, c_out, k, cfg, vb.pp("conv"), &layers).unwrap();
    let (ho, wo) = ((h + 2 - k) / 2 + 1, (w + 2 - k) / 2 + 1);
    let fc = candle_nn::linear(c_out * ho * wo, 2, vb.pp("fc")).unwrap();
    init(&varmap);
    let x = det(&[n, c_in, h, w], 11);
    let t = det(&[n, 2], 12);
    let head = |y: &Tensor| -> Tensor {
        let o = fc.forward(&y.flatten_from(1).unwrap()).unwrap();
        ((o - &t).unwrap().sqr().unwrap().sum_all().unwrap() / n as f64).unwrap()
    };
    // The conv output's gradient and the weight gradients from a graph without THOR.
    let y = Var::from_tensor(&conv.inner().forward(&x).unwrap()).unwrap();
    let grads = head(y.as_tensor()).backward().unwrap();
    let gy = (grads.get(y.as_tensor()).unwrap() * n as f64).unwrap();
    let wt = conv.inner().weight();
    let grads_w = {
        let l = head(&conv.inner().forward(&x).unwrap());
        l.backward().unwrap()
    };
    let gw = grads_w.get(wt).unwrap().reshape((c_out, ())).unwrap();
    let gb = grads_w.get(conv.inner().bias().unwrap()).unwrap();
    let full = Tensor::cat(&[gw, gb.reshape((c_out, 1)).unwrap()], 1).unwrap();
    // Explicit im2col rows (n, oh, ow) x (ci, ki, kj), and the gradient's rows.
    let xv = flat(&x);
    let gyv = flat(&gy);
    let mut acts = Vec::new();
    let mut outg = Vec::new();
    for s in 0..n {
        for oh in 0..ho {
            for ow in 0..wo {
                for ci in 0..c_in {
                    for ki in 0..k {
                        for kj in 0..k {
                            let (ih, iw) = ((oh * 2 + ki) as isize - 1, (ow * 2 + kj) as isize - 1);
                            let inside =
                                ih >= 0 && iw >= 0 && (ih as usize) < h && (iw as usize) < w;
                            acts.push(if inside {
                                xv[((s * c_in + ci) * h + ih as usize) * w + iw as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
                for co in 0..c_out {
                    outg.push(gyv[((s * c_out + co) * ho + oh) * wo + ow]);
                }
            }
        }
    }
    let mut thor = Thor::with_backend(config(5), AnyBackend::Cpu(CpuBackend)).unwrap();
    let id = thor
        .add_layer(LayerKind::Conv2d {
            c_in,
            c_out,
            kh: k,
            kw: k,
            bias: true,
        })
        .unwrap();
    thor.observe(id, &acts, &outg, n * ho * wo).unwrap();
    let mut u = vec![0.0; c_out * (c_in * k * k + 1)];
    thor.precondition(id, &flat(&full), &mut u).unwrap();

    let p = ThorParams {
        sgd: ParamsMomentumSgd {
            lr: 0.05,
            momentum: 0.0,
            weight_decay: 0.0,
        },
        thor: config(5),
        loss_mean: LossMean::Batch,
    };
    let w0 = flat(wt);
    let mut opt = ThorOptimizer::new(&varmap, &layers, p).unwrap();
    opt.backward_step(&head(&conv.forward(&x).unwrap()))
        .unwrap();
    let cols = c_in * k * k + 1;
    let want: Vec<f32> = w0
        .iter()
        .enumerate()
        .map(|(i, w)| w - 0.05 * u[(i / (cols - 1)) * cols + i % (cols - 1)])
        .collect();
    assert_close(&flat(conv.inner().weight()), &want, 1e-4, "conv.weight");
}

#[test]
fn momentum_sgd_is_torch_sgd() {
    let v = Var::from_tensor(&det(&[3, 2], 1)).unwrap();
    let w0 = flat(v.as_tensor());
    let p = ParamsMomentumSgd {
        lr: 0.1,
        momentum: 0.5,
        weight_decay: 0.2,
    };
    let mut sgd = MomentumSgd::with_params(vec![v.clone()], p).unwrap();
    let target = det(&[3, 2], 2);
    let loss = |v: &Var| {
        (v.as_tensor() - &target)
            .unwrap()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let mut w = w0.clone();
    let mut buf: Vec<f32> = Vec::new();
    for step in 0..3 {
        let tv = flat(&target);
        let d: Vec<f32> = w
            .iter()
            .zip(&tv)
            .map(|(w, t)| 2.0 * (w - t) + 0.2 * w)
            .collect();
        buf = if step == 0 {
            d
        } else {
            buf.iter().zip(&d).map(|(b, d)| 0.5 * b + d).collect()
        };
        w = w.iter().zip(&buf).map(|(w, b)| w - 0.1 * b).collect();
        sgd.step_grads(&loss(&v).backward().unwrap()).unwrap();
        assert_close(&flat(v.as_tensor()), &w, 1e-6, "momentum sgd");
    }
    assert!(matches!(
        MomentumSgd::with_params(vec![], ParamsMomentumSgd { momentum: 1.0, ..p }),
        Err(Error::Invalid {
            arg: "momentum",
            ..
        })
    ));
}

/// The KL clip scales every THOR layer's first update by one factor below 1.
#[test]
fn kl_clip_scales_the_update() {
    let (x, t) = (det(&[B, 5], 7), det(&[B, 3], 8));
    let run = |kl: Option<f32>| {
        let net = Mlp::new();
        let mut p = params(3);
        p.thor.kl_clip = kl;
        let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, p).unwrap();
        let w0 = flat(&net.var("fc2.weight"));
        opt.backward_step(&net.loss(&x, &t)).unwrap();
        let dw: Vec<f32> = flat(&net.var("fc2.weight"))
            .iter()
            .zip(&w0)
            .map(|(a, b)| a - b)
            .collect();
        (dw, opt.last_kl_clip_factor())
    };
    let (free, f1) = run(None);
    let (clipped, f) = run(Some(1e-6));
    assert_eq!(f1, 1.0);
    assert!(f > 0.0 && f < 0.1, "factor {f}");
    let want: Vec<f32> = free.iter().map(|d| d * f).collect();
    assert_close(&clipped, &want, 1e-4, "clipped update");
}

#[test]
fn errors_leave_everything_unchanged() {
    let (x, t) = (det(&[B, 5], 7), det(&[B, 3], 8));
    // A NaN gradient.
    let net = Mlp::new();
    let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, params(2)).unwrap();
    let w = flat(&net.var("fc1.weight"));
    let bad = (net.loss(&x, &t) * f64::NAN).unwrap();
    let e = opt.backward_step(&bad).unwrap_err();
    assert!(
        matches!(&e, Error::NonFinite { var } if var.starts_with("fc")),
        "{e}"
    );
    assert_eq!(flat(&net.var("fc1.weight")), w);
    assert_eq!(opt.thor().step(), 0);
    // It recovers.
    opt.backward_step(&net.loss(&x, &t)).unwrap();
    assert_eq!(opt.thor().step(), 1);

    // A second optimizer on the same layers; after the first is dropped, fine.
    let e = ThorOptimizer::new(&net.varmap, &net.layers, params(2)).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "layers", .. }), "{e}");
    drop(opt);
    let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, params(2)).unwrap();

    // A layer made after the optimizer.
    let vb = VarBuilder::from_varmap(&net.varmap, DType::F32, &dev());
    let late = thor_candle::linear(3, 3, vb.pp("late"), &net.layers).unwrap();
    let w = flat(&net.var("fc1.weight"));
    let loss = ((late.forward(&det(&[B, 3], 3)).unwrap().sum_all().unwrap() * 0.0).unwrap()
        + net.loss(&x, &t))
    .unwrap();
    let e = opt.backward_step(&loss).unwrap_err();
    assert!(
        matches!(&e, Error::UnknownLayer { layer, .. } if layer == "late"),
        "{e}"
    );
    assert_eq!(flat(&net.var("fc1.weight")), w);
    assert!(matches!(
        opt.counters(late.id()),
        Err(Error::UnknownLayer { .. })
    ));

    // A layer whose weight is not a variable of the VarMap.
    let layers = ThorLayers::new();
    let lin = candle_nn::Linear::new(det(&[2, 2], 1), None);
    thor_candle::ThorLinear::new(lin, "loose", &layers).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    candle_nn::linear(2, 2, vb.pp("other")).unwrap();
    let e = ThorOptimizer::new(&varmap, &layers, params(2)).unwrap_err();
    assert!(
        matches!(&e, Error::UnknownLayer { layer, .. } if layer == "loose"),
        "{e}"
    );

    // Tied weights: two THOR layers on one variable.
    let layers = ThorLayers::new();
    let tied = candle_nn::linear(2, 2, vb.pp("tied")).unwrap();
    thor_candle::ThorLinear::new(tied.clone(), "tied_a", &layers).unwrap();
    thor_candle::ThorLinear::new(tied, "tied_b", &layers).unwrap();
    let e = ThorOptimizer::new(&varmap, &layers, params(2)).unwrap_err();
    assert!(
        matches!(&e, Error::UnknownLayer { layer, .. } if layer == "tied_b"),
        "{e}"
    );

    // Grouped convolutions, bad settings, an empty VarMap.
    let cfg = Conv2dConfig {
        groups: 2,
        ..Default::default()
    };
    let e = thor_candle::conv2d(4, 4, 3, cfg, vb.pp("g"), &layers).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "groups", .. }), "{e}");
    let net = Mlp::new();
    let mut p = params(2);
    p.sgd.lr = f64::NAN;
    let e = ThorOptimizer::new(&net.varmap, &net.layers, p).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "lr", .. }), "{e}");
    let e = ThorOptimizer::new(&VarMap::new(), &ThorLayers::new(), params(2)).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "varmap", .. }), "{e}");
    let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, params(2)).unwrap();
    let e = opt.set_learning_rate(-1.0).unwrap_err();
    assert!(matches!(e, Error::Invalid { arg: "lr", .. }), "{e}");
    assert_eq!(opt.learning_rate(), 0.1);
}

/// Passes that never reach the loss, and evaluation passes, change nothing.
#[test]
fn evaluation_passes_leave_no_statistics() {
    let (x, t) = (det(&[B, 5], 7), det(&[B, 3], 8));
    let run = |extra: bool| {
        let net = Mlp::new();
        let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, params(1)).unwrap();
        for _ in 0..2 {
            if extra {
                // A pass whose output is dropped, then one in evaluation mode.
                net.fc2
                    .forward(&net.fc1.forward(&det(&[9, 5], 4)).unwrap())
                    .unwrap();
                net.layers.set_training(false);
                net.loss(&det(&[B, 5], 5), &t);
                net.layers.set_training(true);
            }
            opt.backward_step(&net.loss(&x, &t)).unwrap();
        }
        flat(&net.var("fc1.weight"))
    };
    assert_eq!(run(true), run(false));
}

/// Training 2 + 3 steps with a save / load in between equals training 5 steps.
#[test]
fn save_and_load_resume_exactly() {
    let dir = std::env::temp_dir().join(format!("thor-candle-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (vars, state) = (dir.join("vars.safetensors"), dir.join("opt.safetensors"));
    let batches: Vec<(Tensor, Tensor)> = (0..5)
        .map(|i| (det(&[B, 5], 20 + i), det(&[B, 3], 40 + i)))
        .collect();
    let mut p = params(2);
    p.thor.kl_clip = Some(1e-3);
    p.thor.stat_decay = 0.9;
    let net = Mlp::new();
    let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, p.clone()).unwrap();
    for (i, (x, t)) in batches.iter().enumerate() {
        if i == 3 {
            net.varmap.save(&vars).unwrap();
            opt.save(&state).unwrap();
        }
        opt.set_epoch(i as f64 / 2.0);
        opt.backward_step(&net.loss(x, t)).unwrap();
    }
    let mut other = Mlp::new();
    other.varmap.load(&vars).unwrap();
    // The configuration is the caller's (as for `Thor::load_bytes`): the same one.
    let mut opt2 = ThorOptimizer::new(&other.varmap, &other.layers, p.clone()).unwrap();
    opt2.load(&state).unwrap();
    assert_eq!(opt2.params().weight_decay, p.sgd.weight_decay);
    assert_eq!(opt2.thor().step(), 3);
    for (i, (x, t)) in batches.iter().enumerate().skip(3) {
        opt2.set_epoch(i as f64 / 2.0);
        opt2.backward_step(&other.loss(x, t)).unwrap();
    }
    for name in ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"] {
        assert_eq!(flat(&net.var(name)), flat(&other.var(name)), "{name}");
    }

    // Another model's state: refused, nothing changes.
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev());
    let layers = ThorLayers::new();
    thor_candle::linear(5, 4, vb.pp("fc1"), &layers).unwrap();
    let mut small = ThorOptimizer::new(&varmap, &layers, params(2)).unwrap();
    let e = small.load(&state).unwrap_err();
    assert!(matches!(e, Error::State(_)), "{e}");
    assert_eq!(small.thor().step(), 0);
    std::fs::write(&vars, b"not a state").unwrap();
    assert!(opt2.load(&vars).is_err());
    assert_eq!(opt2.thor().step(), 5);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A loss averaged over the tokens of `[B, T, features]` inputs (`LossMean::Rows`) gives the
/// same step as the same rows flattened to `[B * T, features]` (a mean over the batch), and
/// a summed loss (`LossMean::Sum`) the same statistics.
#[test]
fn loss_mean_over_rows_or_a_sum() {
    let (x, t) = (det(&[2, 3, 5], 7), det(&[2, 3, 3], 8));
    let run = |mean: LossMean, flat_rows: bool, sum: bool| {
        let net = Mlp::new();
        let mut p = params(3);
        p.loss_mean = mean;
        // The preconditioner after one step depends only on the statistics.
        p.sgd.momentum = 0.0;
        let mut opt = ThorOptimizer::new(&net.varmap, &net.layers, p).unwrap();
        let (x, t) = if flat_rows {
            (x.reshape((6, 5)).unwrap(), t.reshape((6, 3)).unwrap())
        } else {
            (x.clone(), t.clone())
        };
        let y = net
            .fc2
            .forward(&net.fc1.forward(&x).unwrap().relu().unwrap())
            .unwrap();
        let se = (y - &t).unwrap().sqr().unwrap().sum_all().unwrap();
        let loss = if sum { se } else { (se / 6.0).unwrap() };
        opt.backward_step(&loss).unwrap();
        let g = det(&[4, 6], 9);
        flat(&opt.precondition(net.fc1.id(), &g).unwrap())
    };
    let rows = run(LossMean::Rows, false, false);
    assert_eq!(rows, run(LossMean::Batch, true, false));
    assert_close(&run(LossMean::Sum, false, true), &rows, 1e-5, "sum");
    // The batch count (2, not 6) gives other factors.
    assert_ne!(run(LossMean::Batch, false, false), rows);
}
