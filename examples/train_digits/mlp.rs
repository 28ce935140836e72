//! A small multilayer perceptron with forward and backward passes, and the first-order
//! optimizers THOR is compared with. Weights are `[outputs, inputs + 1]` row-major, the bias
//! as the last column: exactly the gradient layout `Thor::precondition` takes.

use faer::linalg::matmul::matmul;
use faer::{Accum, MatMut, MatRef, Par};

/// Hidden-layer nonlinearity (the output's comes with the loss).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Act {
    /// max(0, x)
    Relu,
}

/// The loss on the last layer's pre-activations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Loss {
    /// Sigmoid outputs, binary cross-entropy against targets in [0, 1], summed over
    /// outputs, averaged over the batch.
    SigmoidBce,
    /// Softmax cross-entropy against class labels, averaged over the batch.
    SoftmaxCe,
}

/// A dense layer.
#[derive(Debug, Clone)]
pub struct Dense {
    pub inputs: usize,
    pub outputs: usize,
    /// `[outputs, inputs + 1]`, bias last.
    pub w: Vec<f32>,
}

/// What a training step needs from the forward and backward passes, per layer.
#[derive(Debug, Default, Clone)]
pub struct Tape {
    /// Layer inputs `[n, inputs]`.
    pub inputs: Vec<Vec<f32>>,
    /// Pre-activations `[n, outputs]`.
    pub z: Vec<Vec<f32>>,
    /// Gradient of the mean loss with respect to the pre-activations `[n, outputs]`.
    pub dz: Vec<Vec<f32>>,
    /// Gradient of the mean loss with respect to the weights `[outputs, inputs + 1]`.
    pub grads: Vec<Vec<f32>>,
}

/// The model.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub layers: Vec<Dense>,
    pub hidden: Act,
    pub loss: Loss,
}

fn rm(v: &[f32], r: usize, c: usize) -> MatRef<'_, f32> {
    MatRef::from_row_major_slice(v, r, c)
}

fn rm_mut(v: &mut [f32], r: usize, c: usize) -> MatMut<'_, f32> {
    MatMut::from_row_major_slice_mut(v, r, c)
}

fn par() -> Par {
    Par::rayon(0)
}

impl Mlp {
    /// Layers of `sizes[i] -> sizes[i + 1]`, He-initialised from `seed`, zero biases.
    pub fn new(sizes: &[usize], hidden: Act, loss: Loss, seed: u64) -> Self {
        let mut s = seed;
        let mut uniform = move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let layers = sizes
            .windows(2)
            .map(|p| {
                let (i, o) = (p[0], p[1]);
                // Uniform with the variance of He init: 2 / fan_in.
                let a = (6.0 / i as f32).sqrt();
                let mut w = vec![0.0; o * (i + 1)];
                for r in 0..o {
                    for c in 0..i {
                        w[r * (i + 1) + c] = a * uniform();
                    }
                }
                Dense {
                    inputs: i,
                    outputs: o,
                    w,
                }
            })
            .collect();
        Self {
            layers,
            hidden,
            loss,
        }
    }

    /// Forward pass of `n` examples, keeping what backward needs in `tape`; returns the last
    /// pre-activations.
    pub fn forward<'t>(&self, x: &[f32], n: usize, tape: &'t mut Tape) -> &'t [f32] {
        let nl = self.layers.len();
        tape.inputs.resize(nl, Vec::new());
        tape.z.resize(nl, Vec::new());
        tape.inputs[0].clear();
        tape.inputs[0].extend_from_slice(x);
        for (l, d) in self.layers.iter().enumerate() {
            let (i, o) = (d.inputs, d.outputs);
            let z = &mut tape.z[l];
            z.resize(n * o, 0.0);
            let w = MatRef::from_row_major_slice_with_stride(&d.w, o, i, i + 1);
            matmul(
                rm_mut(z, n, o),
                Accum::Replace,
                rm(&tape.inputs[l], n, i),
                w.transpose(),
                1.0,
                par(),
            );
            for row in z.chunks_exact_mut(o) {
                for (r, v) in row.iter_mut().enumerate() {
                    *v += d.w[r * (i + 1) + i];
                }
            }
            if l + 1 < nl {
                let next: Vec<f32> = match self.hidden {
                    Act::Relu => z.iter().map(|&v| v.max(0.0)).collect(),
                };
                tape.inputs[l + 1] = next;
            }
        }
        &tape.z[nl - 1]
    }

    /// Mean loss of the last pre-activations against `targets` (`[n, outputs]` in [0, 1] for
    /// BCE, one label per example for softmax), and its gradient `[n, outputs]`.
    fn loss_grad(
        &self,
        z: &[f32],
        n: usize,
        targets: &Targets<'_>,
        dz: Option<&mut Vec<f32>>,
    ) -> f64 {
        let o = self.layers.last().unwrap().outputs;
        let mut total = 0.0f64;
        let mut g = dz;
        if let Some(g) = g.as_deref_mut() {
            g.resize(n * o, 0.0);
        }
        for s in 0..n {
            let zs = &z[s * o..(s + 1) * o];
            match (self.loss, targets) {
                (Loss::SigmoidBce, Targets::Pixels(t)) => {
                    let ts = &t[s * o..(s + 1) * o];
                    for k in 0..o {
                        let (zk, tk) = (zs[k] as f64, ts[k] as f64);
                        total += zk.max(0.0) - tk * zk + (-zk.abs()).exp().ln_1p();
                        if let Some(g) = g.as_deref_mut() {
                            g[s * o + k] = ((1.0 / (1.0 + (-zk).exp()) - tk) / n as f64) as f32;
                        }
                    }
                }
                (Loss::SoftmaxCe, Targets::Labels(y)) => {
                    let m = zs.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
                    let sum: f64 = zs.iter().map(|&v| (v as f64 - m).exp()).sum();
                    let lse = m + sum.ln();
                    let label = y[s] as usize;
                    total += lse - zs[label] as f64;
                    if let Some(g) = g.as_deref_mut() {
                        for k in 0..o {
                            let p = (zs[k] as f64 - lse).exp();
                            g[s * o + k] = ((p - (k == label) as u8 as f64) / n as f64) as f32;
                        }
                    }
                }
                _ => panic!("targets do not match the loss"),
            }
        }
        total / n as f64
    }

    /// Forward and backward on a batch: fills `tape` (inputs, dz, gradients) and returns the
    /// mean loss.
    pub fn train_step(&self, x: &[f32], n: usize, targets: &Targets<'_>, tape: &mut Tape) -> f64 {
        self.forward(x, n, tape);
        let nl = self.layers.len();
        tape.dz.resize(nl, Vec::new());
        tape.grads.resize(nl, Vec::new());
        let last = std::mem::take(&mut tape.z[nl - 1]);
        let mut dz = std::mem::take(&mut tape.dz[nl - 1]);
        let loss = self.loss_grad(&last, n, targets, Some(&mut dz));
        tape.z[nl - 1] = last;
        tape.dz[nl - 1] = dz;
        for l in (0..nl).rev() {
            let d = &self.layers[l];
            let (i, o) = (d.inputs, d.outputs);
            let g = &mut tape.grads[l];
            g.resize(o * (i + 1), 0.0);
            let dzl = &tape.dz[l];
            // dW = dz^T h, db = sum over the batch of dz.
            // The row-major strided view, built as the transpose of a column-major one:
            // faer 0.24.4's from_row_major_slice_with_stride_mut swaps the two strides.
            let gw =
                MatMut::from_column_major_slice_with_stride_mut(g, i, o, i + 1).transpose_mut();
            matmul(
                gw,
                Accum::Replace,
                rm(dzl, n, o).transpose(),
                rm(&tape.inputs[l], n, i),
                1.0,
                par(),
            );
            for r in 0..o {
                g[r * (i + 1) + i] = (0..n).map(|s| dzl[s * o + r]).sum();
            }
            if l > 0 {
                // dh = dz W, then through the nonlinearity of layer l - 1.
                let mut dh = vec![0.0f32; n * i];
                let w = MatRef::from_row_major_slice_with_stride(&d.w, o, i, i + 1);
                matmul(
                    rm_mut(&mut dh, n, i),
                    Accum::Replace,
                    rm(dzl, n, o),
                    w,
                    1.0,
                    par(),
                );
                if self.hidden == Act::Relu {
                    for (v, &z) in dh.iter_mut().zip(&tape.z[l - 1]) {
                        if z <= 0.0 {
                            *v = 0.0;
                        }
                    }
                }
                tape.dz[l - 1] = dh;
            }
        }
        loss
    }

    /// Mean loss and accuracy (for labels; NaN for pixel targets) over a whole set.
    pub fn evaluate(&self, x: &[f32], n: usize, targets: &Targets<'_>) -> (f64, f64) {
        let mut tape = Tape::default();
        let z = self.forward(x, n, &mut tape).to_vec();
        let loss = self.loss_grad(&z, n, targets, None);
        let acc = match targets {
            Targets::Labels(y) => {
                let o = self.layers.last().unwrap().outputs;
                let hits = (0..n)
                    .filter(|&s| {
                        let zs = &z[s * o..(s + 1) * o];
                        let best = (0..o).max_by(|&a, &b| zs[a].total_cmp(&zs[b])).unwrap();
                        best == y[s] as usize
                    })
                    .count();
                hits as f64 / n as f64
            }
            Targets::Pixels(_) => f64::NAN,
        };
        (loss, acc)
    }
}

/// Training targets.
pub enum Targets<'a> {
    /// Reconstruction targets `[n, outputs]` in [0, 1].
    Pixels(&'a [f32]),
    /// Class labels.
    Labels(&'a [u8]),
}

/// SGD with momentum and Adam, per layer.
#[derive(Debug, Clone)]
pub enum FirstOrder {
    /// `v <- mu v + g; w <- w - lr v`.
    Sgd {
        lr: f32,
        momentum: f32,
        v: Vec<Vec<f32>>,
    },
    /// Adam with bias correction.
    Adam {
        lr: f32,
        b1: f32,
        b2: f32,
        eps: f32,
        t: u64,
        m: Vec<Vec<f32>>,
        v: Vec<Vec<f32>>,
    },
}

impl FirstOrder {
    /// SGD with momentum for `model`'s layers.
    pub fn sgd(model: &Mlp, lr: f32, momentum: f32) -> Self {
        FirstOrder::Sgd {
            lr,
            momentum,
            v: model.layers.iter().map(|d| vec![0.0; d.w.len()]).collect(),
        }
    }

    /// Adam (0.9, 0.999, 1e-8) for `model`'s layers.
    pub fn adam(model: &Mlp, lr: f32) -> Self {
        let z = || model.layers.iter().map(|d| vec![0.0; d.w.len()]).collect();
        FirstOrder::Adam {
            lr,
            b1: 0.9,
            b2: 0.999,
            eps: 1e-8,
            t: 0,
            m: z(),
            v: z(),
        }
    }

    /// Starts a step (Adam's step count).
    pub fn begin(&mut self) {
        if let FirstOrder::Adam { t, .. } = self {
            *t += 1;
        }
    }

    /// Updates layer `l`'s weights with the (possibly preconditioned) gradient `g`.
    pub fn update(&mut self, l: usize, w: &mut [f32], g: &[f32]) {
        match self {
            FirstOrder::Sgd { lr, momentum, v } => {
                for ((w, v), &g) in w.iter_mut().zip(v[l].iter_mut()).zip(g) {
                    *v = *momentum * *v + g;
                    *w -= *lr * *v;
                }
            }
            FirstOrder::Adam {
                lr,
                b1,
                b2,
                eps,
                t,
                m,
                v,
            } => {
                let (c1, c2) = (1.0 - b1.powi(*t as i32), 1.0 - b2.powi(*t as i32));
                for (((w, m), v), &g) in w
                    .iter_mut()
                    .zip(m[l].iter_mut())
                    .zip(v[l].iter_mut())
                    .zip(g)
                {
                    *m = *b1 * *m + (1.0 - *b1) * g;
                    *v = *b2 * *v + (1.0 - *b2) * g * g;
                    *w -= *lr * (*m / c1) / ((*v / c2).sqrt() + *eps);
                }
            }
        }
    }
}
