//! Convolution geometries shared by the CPU, emulated and GPU tests of implicit im2col.

use rand::rngs::StdRng;
use thor_kernels::{Conv2dGeometry, Patches, TensorLayout};

use super::normal;

/// One case: a factor input read from a 4-d tensor, and the block size to accumulate at.
#[derive(Debug, Clone, Copy)]
pub struct ConvCase {
    /// What the case covers.
    pub name: &'static str,
    /// The view of the tensor (strides included).
    pub patches: Patches,
    /// Block size.
    pub b: usize,
}

impl ConvCase {
    /// A random tensor for the case (every element finite, none zero-only).
    pub fn tensor(&self, rng: &mut StdRng) -> Vec<f32> {
        normal(rng, self.patches.span().unwrap())
    }
}

fn case(
    name: &'static str,
    g: Conv2dGeometry,
    batch: usize,
    layout: TensorLayout,
    b: usize,
) -> ConvCase {
    ConvCase {
        name,
        patches: Patches::new(g, batch, layout),
        b,
    }
}

/// Kernels 1, 3, 5, 7; strides 1, 2; padding 0, 1, 3; dilation 1, 2; sizes off every tile;
/// `c_in * kh * kw` below, at and above multiples of b; batch 1; NCHW, NHWC and strided
/// views; a bias column. Small enough for the kernel emulator.
pub fn conv_cases() -> Vec<ConvCase> {
    use TensorLayout::*;
    let g = Conv2dGeometry::new;
    let mut v = vec![
        case("1x1 nchw d=40 b=32", g(40, 5, 7, [1, 1]), 2, Nchw, 32),
        case(
            "3x3 pad 1 nhwc d=27 batch 1",
            g(3, 9, 9, [3, 3]).with_padding([1, 1]),
            1,
            Nhwc,
            32,
        ),
        case(
            "3x3 stride 2 pad 1 nchw d=63+1 (= b)",
            g(7, 11, 13, [3, 3])
                .with_stride([2, 2])
                .with_padding([1, 1]),
            2,
            Nchw,
            64,
        ),
        case(
            "5x5 dilation 2 nhwc d=75",
            g(3, 13, 12, [5, 5]).with_dilation([2, 2]),
            1,
            Nhwc,
            32,
        ),
        case(
            "7x7 stride 2 pad 3 nchw d=147 (conv1)",
            g(3, 15, 15, [7, 7])
                .with_stride([2, 2])
                .with_padding([3, 3]),
            2,
            Nchw,
            64,
        ),
        case(
            "3x3 stride 2x1 pad 3x1 dilation 2x1 nchw, kernel taller than the input",
            g(4, 4, 5, [3, 3])
                .with_stride([2, 1])
                .with_padding([3, 1])
                .with_dilation([2, 1]),
            2,
            Nchw,
            32,
        ),
        case(
            "1x3 stride 2x1 nchw d=96 (= 3b)",
            g(32, 6, 9, [1, 3]).with_stride([2, 1]),
            1,
            Nchw,
            32,
        ),
        case(
            "1x1 stride 2 nhwc (skips elements)",
            g(33, 7, 6, [1, 1]).with_stride([2, 2]),
            2,
            Nhwc,
            32,
        ),
    ];
    v[2].patches = v[2].patches.with_ones(true);
    // More rows than the CPU's chunk (256), a row length (11) that does not divide it.
    v.push(case(
        "3x3 pad 1 nchw 429 rows",
        g(4, 13, 11, [3, 3]).with_padding([1, 1]),
        3,
        Nchw,
        32,
    ));
    // A tensor broadcast along W (stride 0, as `expand` makes) and along the batch.
    let wide = g(3, 5, 6, [2, 3]).with_padding([0, 1]);
    v.push(ConvCase {
        name: "broadcast w and n (stride 0)",
        patches: Patches::new(wide, 2, Nchw).with_strides([0, 5, 1, 0]),
        b: 32,
    });
    // A channel slice of a larger NCHW tensor (x[:, 2:2+c_in] keeps the big strides) and a
    // tensor stored channel-first ([C, N, H, W], a permuted view).
    let sliced = g(5, 6, 7, [3, 3]).with_padding([1, 1]);
    v.push(ConvCase {
        name: "channel slice of a larger nchw tensor",
        patches: Patches::new(sliced, 2, Nchw).with_strides([9 * 42, 42, 7, 1]),
        b: 32,
    });
    let perm = g(6, 5, 5, [3, 3]).with_stride([2, 2]);
    v.push(ConvCase {
        name: "[c, n, h, w] storage",
        patches: Patches::new(perm, 3, Nchw)
            .with_strides([25, 3 * 25, 5, 1])
            .with_ones(true),
        b: 64,
    });
    v
}

/// Output-gradient views (G factors): `[batch, c_out, ho, wo]` position by position.
pub fn position_cases() -> Vec<ConvCase> {
    use TensorLayout::*;
    vec![
        ConvCase {
            name: "positions nchw c=33",
            patches: Patches::positions(33, 5, 7, 2, Nchw),
            b: 32,
        },
        ConvCase {
            name: "positions nhwc c=64 batch 1",
            patches: Patches::positions(64, 3, 9, 1, Nhwc),
            b: 64,
        },
    ]
}
