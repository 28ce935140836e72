//! Layer shape sets used by examples, benchmarks and tests.

use crate::patches::Conv2dGeometry;

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
    /// A conv layer's geometry (its input size, kernel, stride, padding), `None` for a
    /// linear layer.
    pub conv: Option<Conv2dGeometry>,
}

impl LayerShape {
    /// Rows of the activation and gradient matrices at batch size `batch`.
    pub fn rows(&self, batch: usize) -> usize {
        batch * self.positions
    }

    fn conv(name: String, c_out: usize, g: Conv2dGeometry) -> Self {
        let [ho, wo] = g.output().expect("a valid ResNet geometry");
        LayerShape {
            name,
            d_a: g.patch_dim(),
            d_g: c_out,
            positions: ho * wo,
            conv: Some(g),
        }
    }
}

/// The 54 layers of ResNet-50 v1.5 at 224 x 224 input (53 convolutions and the fc layer
/// with a bias column), in forward order, with each convolution's geometry. Sum of d_A =
/// 54,932, sum of d_G = 27,560.
pub fn resnet50() -> Vec<LayerShape> {
    let square = |c_in: usize, side: usize, k: usize, stride: usize, pad: usize| {
        Conv2dGeometry::new(c_in, side, side, [k, k])
            .with_stride([stride, stride])
            .with_padding([pad, pad])
    };
    let mut layers = vec![LayerShape::conv(
        "conv1".into(),
        64,
        square(3, 224, 7, 2, 3),
    )];
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
            let stride = first_side / side;
            let mut push = |name: &str, c_out: usize, g: Conv2dGeometry| {
                layers.push(LayerShape::conv(format!("{p}.{name}"), c_out, g));
            };
            push("conv1", mid, square(c_in, first_side, 1, 1, 0));
            push("conv2", mid, square(mid, first_side, 3, stride, 1));
            push("conv3", out, square(mid, side, 1, 1, 0));
            if blk == 0 {
                push("downsample", out, square(c_in, side_in, 1, stride, 0));
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
        conv: None,
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
        // Every conv's output feeds the next layer at the size its geometry says.
        assert_eq!(l.iter().filter(|x| x.conv.is_some()).count(), 53);
        let sides: Vec<usize> = l
            .iter()
            .filter_map(|x| x.conv.map(|g| g.output().unwrap()[0]))
            .collect();
        assert_eq!((sides[0], sides[1], *sides.last().unwrap()), (112, 56, 7));
    }
}
