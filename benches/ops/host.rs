//! CPU backend benches: traces, split, inversion, apply.

use super::*;

pub(crate) fn cpu_benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("cpu");
    g.sample_size(10);

    let set = FactorSet::new(128, &resnet_dims()).unwrap();
    let blocks = normal(1, set.buffer_len());
    let (mut bt, mut ft) = (vec![0.0; set.total_blocks()], vec![0.0; set.len()]);
    g.throughput(Throughput::Bytes((set.total_blocks() * 128 * 4) as u64));
    g.bench_function("trace/resnet50_b128", |bch| {
        bch.iter(|| cpu::traces(&set, &blocks, &mut bt, &mut ft).unwrap())
    });

    let layout = BlockLayout::new(2304, 128).unwrap();
    let dense = normal(2, 2304 * 2304);
    let mut out = vec![0.0; layout.buffer_len()];
    g.throughput(Throughput::Bytes((2 * 4 * layout.buffer_len()) as u64));
    g.bench_function("split/d2304_b128", |bch| {
        bch.iter(|| cpu::split(&dense, 2304, &layout, &mut out).unwrap())
    });

    for (n, d) in [(8192usize, 576usize), (4096, 4608)] {
        let layout = BlockLayout::new(d, 128).unwrap();
        let x = normal(3, n * d);
        let mut s = vec![0.0; layout.buffer_len()];
        let mut t = vec![0.0; layout.blocks()];
        let mut ws = Workspace::new(0);
        g.throughput(Throughput::Elements(
            (2 * n * layout.blocks() * 128 * 128) as u64,
        ));
        g.bench_function(
            BenchmarkId::new("accumulate_f32", format!("n{n}_d{d}_b128")),
            |bch| {
                bch.iter(|| {
                    cpu::accumulate(&x, n, d, &layout, 1.0, 0.0, &mut s, &mut t, &mut ws).unwrap()
                })
            },
        );
    }

    for (b, nb) in [(128usize, 654usize), (64, 512)] {
        let s = spd_blocks(b, nb, 4);
        let mut out = vec![0.0; s.len()];
        let mut info = vec![0; nb];
        let mut ws = Workspace::new(cpu::invert_workspace_size(b, nb));
        g.throughput(Throughput::Elements((nb * b * b * b) as u64));
        g.bench_function(BenchmarkId::new("invert", format!("b{b}_x{nb}")), |bch| {
            bch.iter(|| {
                cpu::invert(
                    b,
                    &s,
                    &mut out,
                    &mut info,
                    None,
                    &InvertOptions::uniform(0.03),
                    &mut ws,
                )
                .unwrap()
            })
        });
    }

    let (o, i, b) = (512usize, 4608usize, 128usize);
    let (gl, al) = (
        BlockLayout::new(o, b).unwrap(),
        BlockLayout::new(i, b).unwrap(),
    );
    let (gi, ai) = (spd_blocks(b, gl.blocks(), 5), spd_blocks(b, al.blocks(), 6));
    let grad = normal(7, o * i);
    let mut out = vec![0.0; o * i];
    let mut ws = Workspace::new(cpu::apply_workspace_size(Some(b), o, i));
    g.throughput(Throughput::Elements((2 * o * i * 2 * b) as u64));
    g.bench_function("apply/512x4608_b128", |bch| {
        bch.iter(|| {
            cpu::apply(
                Some((&gl, &gi)),
                &grad,
                Some((&al, &ai)),
                o,
                i,
                1.0,
                &mut out,
                &mut ws,
            )
            .unwrap()
        })
    });
    g.finish();
}
