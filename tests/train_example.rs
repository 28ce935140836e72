//! The training example's model: its gradients against finite differences, for both losses.

#[path = "../examples/train_digits/mlp.rs"]
#[allow(dead_code)]
mod mlp;

use mlp::{Act, Loss, Mlp, Tape, Targets};

fn check(loss: Loss, sizes: &[usize]) {
    let n = 5;
    let mut model = Mlp::new(sizes, Act::Relu, loss, 3);
    let f = sizes[0];
    let x: Vec<f32> = (0..n * f).map(|i| ((i * 37 % 17) as f32) / 17.0).collect();
    let labels: Vec<u8> = (0..n).map(|i| (i % sizes[sizes.len() - 1]) as u8).collect();
    let targets = match loss {
        Loss::SigmoidBce => Targets::Pixels(&x),
        Loss::SoftmaxCe => Targets::Labels(&labels),
    };
    let mut tape = Tape::default();
    model.train_step(&x, n, &targets, &mut tape);
    let grads = tape.grads.clone();
    let h = 1e-2f32;
    for (l, gl) in grads.iter().enumerate() {
        for k in (0..gl.len()).step_by(7) {
            let w0 = model.layers[l].w[k];
            model.layers[l].w[k] = w0 + h;
            let (up, _) = model.evaluate(&x, n, &targets);
            model.layers[l].w[k] = w0 - h;
            let (down, _) = model.evaluate(&x, n, &targets);
            model.layers[l].w[k] = w0;
            let fd = (up - down) / (2.0 * h as f64);
            let g = gl[k] as f64;
            assert!(
                approx::relative_eq!(fd, g, epsilon = 2e-2, max_relative = 2e-2),
                "{loss:?} layer {l} weight {k}: backprop {g} vs finite difference {fd}"
            );
        }
    }
}

#[test]
fn backprop_matches_finite_differences() {
    check(Loss::SigmoidBce, &[6, 8, 3, 6]);
    check(Loss::SoftmaxCe, &[6, 9, 4]);
}
