//! Convolution factors on the CPU: the A statistics of ResNet-50 conv layers read from the
//! NCHW input (implicit im2col) against what a user would otherwise do, unfold the input
//! to its patch matrix and accumulate that, in the same run (and the accumulation alone
//! on patch rows computed beforehand, for scale).

use super::*;
use thor_kernels::{Conv2dGeometry, InputLayout, Patches, TensorLayout};

/// The patch matrix `[n * ho * wo, c_in * kh * kw]` of an NCHW tensor, the plain way.
fn unfold(x: &[f32], p: &Patches, out: &mut [f32]) {
    let g = &p.geometry;
    let [ho, wo] = g.output().unwrap();
    let [kh, kw] = g.kernel;
    let d = g.patch_dim();
    let mut row = 0;
    for n in 0..p.batch {
        for oh in 0..ho {
            for ow in 0..wo {
                let dst = &mut out[row * d..(row + 1) * d];
                let mut k = 0;
                for ci in 0..g.c_in {
                    let plane = &x[n * p.strides[0] + ci * p.strides[1]..];
                    for ki in 0..kh {
                        let h = (oh * g.stride[0] + ki * g.dilation[0]) as isize
                            - g.padding[0] as isize;
                        for kj in 0..kw {
                            let w = (ow * g.stride[1] + kj * g.dilation[1]) as isize
                                - g.padding[1] as isize;
                            dst[k] = if h >= 0 && w >= 0 && (h as usize) < g.h && (w as usize) < g.w
                            {
                                plane[h as usize * g.w + w as usize]
                            } else {
                                0.0
                            };
                            k += 1;
                        }
                    }
                }
                row += 1;
            }
        }
    }
}

pub(crate) fn cpu_conv_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu/conv_a");
    g.sample_size(10);
    let g2 = |c_in, side, k: usize, s: usize, p: usize| {
        Conv2dGeometry::new(c_in, side, side, [k, k])
            .with_stride([s, s])
            .with_padding([p, p])
    };
    // (name, geometry, batch): conv1, layer1's 1x1, layer2's 3x3, layer3's strided 3x3.
    let layers = [
        ("conv1_7x7s2", g2(3, 224, 7, 2, 3), 2usize),
        ("layer1.0.conv1_1x1", g2(64, 56, 1, 1, 0), 4),
        ("layer2.1.conv2_3x3", g2(128, 28, 3, 1, 1), 4),
        ("layer3.0.conv2_3x3s2", g2(256, 28, 3, 2, 1), 4),
    ];
    for (name, geom, batch) in layers {
        let p = Patches::new(geom, batch, TensorLayout::Nchw);
        let (rows, d) = (p.rows(), p.dim());
        let layout = BlockLayout::new(d, 128).unwrap();
        let x = normal(11, p.span().unwrap());
        let mut s = vec![0.0; layout.buffer_len()];
        let mut t = vec![0.0; layout.blocks()];
        let mut ws = Workspace::new(cpu::accumulate_workspace_size::<f32>(&layout));
        let mut patches = vec![0.0f32; rows * d];
        g.throughput(Throughput::Elements(
            (2 * rows * layout.blocks() * 128 * 128) as u64,
        ));
        let id = format!("{name}_n{batch}_rows{rows}_d{d}");
        g.bench_function(BenchmarkId::new("implicit", &id), |bch| {
            bch.iter(|| {
                cpu::accumulate_input(
                    &x,
                    &InputLayout::Patches(p),
                    &layout,
                    1.0,
                    0.0,
                    &mut s,
                    &mut t,
                    &mut ws,
                )
                .unwrap()
            })
        });
        g.bench_function(BenchmarkId::new("unfold+accumulate", &id), |bch| {
            bch.iter(|| {
                unfold(&x, &p, &mut patches);
                cpu::accumulate(
                    &patches, rows, d, &layout, 1.0, 0.0, &mut s, &mut t, &mut ws,
                )
                .unwrap()
            })
        });
        unfold(&x, &p, &mut patches);
        g.bench_function(BenchmarkId::new("accumulate_on_patches", &id), |bch| {
            bch.iter(|| {
                cpu::accumulate(
                    &patches, rows, d, &layout, 1.0, 0.0, &mut s, &mut t, &mut ws,
                )
                .unwrap()
            })
        });
    }
    g.finish();
}
