//! Layer shape sets used by examples, benchmarks and tests.

/// One layer of a model, as THOR sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerShape {
    /// A readable name (`layer3.2.conv2`).
    pub name: String,
    /// Dimension of the input-side factor A (`C_in * kh * kw`, +1 for a bias column).
    pub d_a: usize,
    /// Dimension of the output-side factor G (`C_out`, or the number of outputs).
    pub d_g: usize,
    /// Output positions per sample (`Ho * Wo` for a conv layer, 1 for a linear layer):
    /// the factors see `batch * positions` rows.
    pub positions: usize,
}

impl LayerShape {
    /// Rows of the activation and gradient matrices at batch size `batch`.
    pub fn rows(&self, batch: usize) -> usize {
        batch * self.positions
    }
}

/// The 54 layers of ResNet-50 v1.5 at 224 x 224 input (53 convolutions and the fc layer
/// with a bias column), in forward order. Sum of d_A = 54,932, sum of d_G = 27,560.
pub fn resnet50() -> Vec<LayerShape> {
    let mut layers = vec![LayerShape {
        name: "conv1".into(),
        d_a: 3 * 7 * 7,
        d_g: 64,
        positions: 112 * 112,
    }];
    // (blocks, mid channels, output channels, output side of the stage)
    let stages = [
        (3, 64, 256, 56),
        (4, 128, 512, 28),
        (6, 256, 1024, 14),
        (3, 512, 2048, 7),
    ];
    let mut c_in = 64;
    let mut side_in = 56;
    for (s, &(blocks, mid, out, side)) in stages.iter().enumerate() {
        for blk in 0..blocks {
            let p = format!("layer{}.{}", s + 1, blk);
            // v1.5: the stride sits in the 3x3 conv, so conv1 runs at the input resolution.
            let first_side = if blk == 0 { side_in } else { side };
            let mut push = |name: &str, d_a: usize, d_g: usize, side: usize| {
                layers.push(LayerShape {
                    name: format!("{p}.{name}"),
                    d_a,
                    d_g,
                    positions: side * side,
                })
            };
            push("conv1", c_in, mid, first_side);
            push("conv2", mid * 9, mid, side);
            push("conv3", mid, out, side);
            if blk == 0 {
                push("downsample", c_in, out, side);
            }
            c_in = out;
        }
        side_in = side;
    }
    layers.push(LayerShape {
        name: "fc".into(),
        d_a: 2048 + 1,
        d_g: 1000,
        positions: 1,
    });
    layers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resnet50_matches_the_design_numbers() {
        let l = resnet50();
        assert_eq!(l.len(), 54);
        assert_eq!(l.iter().map(|x| x.d_a).sum::<usize>(), 54_932);
        assert_eq!(l.iter().map(|x| x.d_g).sum::<usize>(), 27_560);
        let blocks: usize = l
            .iter()
            .map(|x| x.d_a.div_ceil(128) + x.d_g.div_ceil(128))
            .sum();
        assert_eq!(blocks, 654);
        assert_eq!(l[0].rows(32), 32 * 112 * 112);
    }
}
