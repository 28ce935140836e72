//! THOR's factor step across ranks (`thor_kernels::dist`), ranks as threads of an
//! in-process group: the same decisions, counters, statistics, inverses and preconditioned
//! gradients as one rank on the union of the batches, a NaN on one rank skipping the layer
//! on all of them, a rank that leaves or never arrives failing the others with a clear
//! error, and the bytes the plan says each rank sends.

mod common;

use std::ops::Range;
use std::time::{Duration, Instant};

use common::step_cases::{StepScenario, STEPS};
use common::*;
use thor_kernels::cpu::step::{CpuThorStep, HostStepInput};
use thor_kernels::cpu::{self, Workspace};
use thor_kernels::dist::{tri_len, Communicator, LocalGroup, OwnershipPlan};
use thor_kernels::rule::{Decision, RuleLayer};
use thor_kernels::shapes;
use thor_kernels::step::StepConfig;
use thor_kernels::{Error, FactorSet};

/// Rows of each rank: uneven, growing with the rank (rank 0 the fewest), at least one.
fn row_ranges(rows: usize, world: usize) -> Vec<Range<usize>> {
    let (tri, extra) = (world * (world + 1) / 2, rows - world);
    let cut = |r: usize| r + extra * (r * (r + 1) / 2) / tri;
    (0..world).map(|r| cut(r)..cut(r + 1)).collect()
}

fn config(sc: &StepScenario) -> StepConfig {
    StepConfig {
        stat_decay: sc.decay,
        thresholds: sc.thresholds,
        ..StepConfig::default()
    }
}

/// What a step shows after each statistics step.
#[derive(Debug, Clone)]
struct Seen {
    decisions: Vec<Decision>,
    counters: Vec<[u64; 6]>,
    stats: Vec<f32>,
    inverses: Vec<f32>,
}

fn seen(step: &CpuThorStep) -> Seen {
    Seen {
        decisions: step.decisions().to_vec(),
        counters: step.counters().iter().map(|c| c.to_array()).collect(),
        stats: step.stats().to_vec(),
        inverses: step.inverses().to_vec(),
    }
}

/// The scenario's inputs of step `k`, rows `rows` of every factor.
fn inputs<'a>(
    batch: &'a [Vec<f32>],
    dims: &[usize],
    rows: Range<usize>,
) -> Vec<HostStepInput<'a, f32>> {
    batch
        .iter()
        .zip(dims)
        .map(|(x, &d)| HostStepInput::matrix(&x[rows.start * d..rows.end * d], rows.len(), d))
        .collect()
}

/// One rank on every row: the oracle of the distributed runs (itself checked against the
/// optimizer and the f64 reference in tests/thor.rs).
fn one_rank(sc: &StepScenario) -> Vec<Seen> {
    let set = sc.set();
    let mut step = CpuThorStep::new::<f32>(&set, &RuleLayer::pairs(&set), config(sc)).unwrap();
    let dims = sc.flat_dims();
    (0..STEPS)
        .map(|k| {
            let batch = sc.batch(k);
            step.run(&inputs(&batch, &dims, 0..sc.rows), sc.damping)
                .unwrap();
            seen(&step)
        })
        .collect()
}

/// Runs the scenario on `world` ranks; per rank: what it saw after each step, its blocks,
/// and its bytes sent.
fn ranks(sc: &StepScenario, world: usize) -> Vec<(Vec<Seen>, Vec<usize>, u64)> {
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    let ranges = row_ranges(sc.rows, world);
    LocalGroup::run(world, Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        let mut step =
            CpuThorStep::new_distributed::<f32>(&set, &layers, config(sc), Box::new(comm)).unwrap();
        let seen_steps = (0..STEPS)
            .map(|k| {
                let batch = sc.batch(k);
                step.run(&inputs(&batch, &dims, ranges[rank].clone()), sc.damping)
                    .unwrap();
                seen(&step)
            })
            .collect();
        let owned = step.plan().unwrap().owned(rank).to_vec();
        (seen_steps, owned, step.comm_counters().unwrap().bytes_sent)
    })
    .unwrap()
}

fn max_rel(got: &[f32], want: &[f32]) -> f64 {
    let scale = want.iter().fold(1f64, |m, v| m.max(v.abs() as f64));
    got.iter()
        .zip(want)
        .fold(0f64, |m, (&a, &w)| m.max((a as f64 - w as f64).abs()))
        / scale
}

#[test]
fn every_world_size_matches_one_rank_on_the_union() {
    let sc = StepScenario::new();
    let set = sc.set();
    let b = set.block();
    let want = one_rank(&sc);
    // The scenario's own decisions (update, reuse, skipped, freeze, frozen) on one rank.
    for (k, w) in want.iter().enumerate() {
        for (l, d) in w.decisions.iter().enumerate() {
            assert_eq!(*d, sc.want[l][k], "one rank, layer {l} step {k}");
        }
    }
    let mut rng = rng(5);
    let grads: Vec<Vec<f32>> = sc
        .dims
        .iter()
        .map(|&(a, g)| normal(&mut rng, a * g))
        .collect();
    // 8 blocks: world 8 gives each rank one, world 11 leaves three ranks without any.
    assert_eq!(set.total_blocks(), 8);
    for world in [1, 2, 3, 4, 8, 11] {
        let got = ranks(&sc, world);
        let mut all_owned: Vec<usize> = got.iter().flat_map(|g| g.1.clone()).collect();
        all_owned.sort();
        assert_eq!(all_owned, (0..8).collect::<Vec<_>>(), "world {world}");
        for (rank, (steps, owned, _)) in got.iter().enumerate() {
            for (k, (g, w)) in steps.iter().zip(&want).enumerate() {
                let at = format!("world {world} rank {rank} step {k}");
                assert_eq!(g.decisions, w.decisions, "decisions, {at}");
                assert_eq!(g.counters, w.counters, "counters, {at}");
                // Every rank holds the owners' inverses, bit for bit.
                assert_eq!(
                    g.inverses.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    got[0].0[k]
                        .inverses
                        .iter()
                        .map(|v| v.to_bits())
                        .collect::<Vec<_>>(),
                    "inverses differ between ranks, {at}"
                );
                let err = max_rel(&g.inverses, &w.inverses);
                assert!(err <= 1e-4, "inverses, {at}: {err:e}");
                for &blk in owned {
                    let r = blk * b * b..(blk + 1) * b * b;
                    let err = max_rel(&g.stats[r.clone()], &w.stats[r]);
                    assert!(err <= 1e-5, "statistics of block {blk}, {at}: {err:e}");
                }
            }
        }
        // The preconditioned gradients after the last step, on the last rank.
        let last = &got[world - 1].0[STEPS - 1];
        for (l, &(da, dg)) in sc.dims.iter().enumerate() {
            let (ea, eg) = (&set.entries()[2 * l], &set.entries()[2 * l + 1]);
            let apply = |inv: &[f32]| {
                let mut out = poisoned(da * dg);
                let mut ws = Workspace::new(cpu::apply_workspace_size(Some(b), dg, da));
                fn side<'a>(
                    e: &'a thor_kernels::FactorEntry,
                    inv: &'a [f32],
                ) -> (&'a thor_kernels::BlockLayout, &'a [f32]) {
                    (
                        &e.layout,
                        &inv[e.offset()..e.offset() + e.layout.buffer_len()],
                    )
                }
                cpu::apply(
                    Some(side(eg, inv)),
                    &grads[l],
                    Some(side(ea, inv)),
                    dg,
                    da,
                    1.0,
                    &mut out,
                    &mut ws,
                )
                .unwrap();
                out
            };
            let (g, w) = (apply(&last.inverses), apply(&want[STEPS - 1].inverses));
            let err = rel_err(&g, &f64s(&w));
            assert!(
                err <= 1e-4,
                "preconditioned gradient of layer {l}, world {world}: {err:e}"
            );
        }
    }
}

#[test]
fn bytes_sent_are_what_the_plan_says() {
    let sc = StepScenario::new();
    let set = sc.set();
    let b = set.block();
    let (world, nf) = (3, set.len());
    let got = ranks(&sc, world);
    let plan = OwnershipPlan::new(&set, world).unwrap();
    let want = one_rank(&sc);
    let layers = RuleLayer::pairs(&set);
    for (rank, (_, _, sent)) in got.iter().enumerate() {
        let mut expect = 0u64;
        for w in &want {
            let decided = |k: usize, what: Decision| {
                layers.iter().zip(&w.decisions).any(|(lay, d)| {
                    *d == what && (lay.first_block..lay.first_block + lay.blocks).contains(&k)
                })
            };
            // Layers frozen before the step (decision Frozen) send nothing: layer 1 from
            // step 2 on, layer 0 at step 7.
            let (rs, ag) = plan.bytes_sent(
                rank,
                b,
                |k| !decided(k, Decision::Frozen),
                |k| decided(k, Decision::Update),
            );
            // One all-reduce of f64: per factor a flag and the samples, per block two
            // traces, split evenly over the ranks.
            let ar = |n: usize| {
                let seg = |r: usize| n / world + usize::from(r < n % world);
                8 * ((n - seg(rank)) + (n - seg((rank + 1) % world))) as u64
            };
            // (and the three values every rank checks: the damping, the steps run, the
            // plan's fingerprint).
            expect += rs + ag + ar(2 * (nf + set.total_blocks()) + 3);
        }
        assert_eq!(*sent, expect, "rank {rank}");
    }
}

#[test]
fn resnet50_plan_halves_the_bytes_and_balances_the_inversions() {
    // The ResNet-50 factor set at b = 128: the reduce-scatter of packed triangles and the
    // all-gather of packed inverses against an all-reduce of whole blocks and of inverses.
    let dims: Vec<usize> = shapes::resnet50()
        .iter()
        .flat_map(|l| [l.d_a, l.d_g])
        .collect();
    let set = FactorSet::new(128, &dims).unwrap();
    let nb = set.total_blocks();
    assert_eq!(nb, 654);
    let (b, tri) = (128usize, tri_len(128));
    let packed = (nb * tri * 4) as f64;
    let full = (nb * b * b * 4) as f64;
    for world in [2usize, 8, 64, 256] {
        let plan = OwnershipPlan::new(&set, world).unwrap();
        let frac = (world - 1) as f64 / world as f64;
        let mut total_sent = 0u64;
        for rank in 0..world {
            let (rs, ag) = plan.bytes_sent(rank, b, |_| true, |_| true);
            // At most (world - 1) / world of the packed bytes, plus one block for the ranks
            // that own one block fewer than others.
            let slack = ((tri + 1) * 4) as f64;
            assert!(
                rs as f64 <= frac * packed + slack,
                "world {world} rank {rank}"
            );
            assert!(ag as f64 <= frac * (packed + 4.0 * nb as f64) + slack);
            // Against all-reducing whole blocks then all-gathering whole inverses.
            let anchor = 2.0 * frac * full + frac * full;
            assert!(((rs + ag) as f64) < 0.34 * anchor, "world {world}");
            total_sent += rs;
        }
        // Summed over the ranks, exactly (world - 1) times the packed bytes.
        assert_eq!(total_sent as f64, (world - 1) as f64 * packed);
        // Inversion work: never more than one block over the mean, and no assignment of
        // whole blocks does better (some rank owns ceil(654 / world)).
        let most = (0..world).map(|r| plan.owned(r).len()).max().unwrap();
        assert_eq!(most, nb.div_ceil(world), "world {world}");
        if world == 8 {
            assert!(plan.imbalance() <= 0.02, "{plan}");
        }
    }
}

#[test]
fn a_nan_on_one_rank_skips_the_layer_on_every_rank() {
    // The scenario's NaN at step 3 (layer 0's G input, row 0) lies in rank 0's rows only;
    // `every_world_size_matches_one_rank_on_the_union` checks the decisions. Here: the
    // NaN on the last rank instead, on a fresh scenario step.
    let sc = StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    let world = 3;
    let ranges = row_ranges(sc.rows, world);
    let out: Vec<Vec<Decision>> = LocalGroup::run(world, Duration::from_secs(60), |comm| {
        let (set, layers, dims, ranges, sc) = (&set, &layers, &dims, &ranges, &sc);
        let rank = comm.rank();
        let mut step =
            CpuThorStep::new_distributed::<f32>(set, layers, config(sc), Box::new(comm)).unwrap();
        let mut batch = sc.batch(0);
        if rank == world - 1 {
            // Layer 2's A input, in the last rank's rows.
            let at = (ranges[rank].end - 1) * dims[4] + 3;
            batch[4][at] = f32::INFINITY;
        }
        step.run(&inputs(&batch, dims, ranges[rank].clone()), sc.damping)
            .unwrap();
        step.decisions().to_vec()
    })
    .unwrap();
    for (rank, d) in out.iter().enumerate() {
        assert_eq!(
            d,
            &[Decision::Update, Decision::Update, Decision::Skipped],
            "rank {rank}"
        );
    }
}

#[test]
fn ranks_that_disagree_on_the_damping_all_fail() {
    let sc = StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    let ranges = row_ranges(sc.rows, 3);
    let out = LocalGroup::run(3, Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        let mut step =
            CpuThorStep::new_distributed::<f32>(&set, &layers, config(&sc), Box::new(comm))
                .unwrap();
        let batch = sc.batch(0);
        let damping = if rank == 2 {
            2.0 * sc.damping
        } else {
            sc.damping
        };
        step.run(&inputs(&batch, &dims, ranges[rank].clone()), damping)
            .unwrap_err()
    })
    .unwrap();
    for e in out {
        assert!(
            matches!(&e, Error::Communication(m) if m.contains("disagree on the damping")),
            "{e}"
        );
    }
}

#[test]
fn a_rank_that_fails_or_never_arrives_fails_the_others() {
    let sc = StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    for hang in [false, true] {
        let world = 3;
        let ranges = row_ranges(sc.rows, world);
        let timeout = Duration::from_millis(if hang { 300 } else { 60_000 });
        let out: Vec<Option<(Error, Error, Duration)>> = LocalGroup::run(world, timeout, |comm| {
            let (set, layers, dims, ranges, sc) = (&set, &layers, &dims, &ranges, &sc);
            let rank = comm.rank();
            let mut step =
                CpuThorStep::new_distributed::<f32>(set, layers, config(sc), Box::new(comm))
                    .unwrap();
            let batch = sc.batch(0);
            let inp = inputs(&batch, dims, ranges[rank].clone());
            step.run(&inp, sc.damping).unwrap();
            if rank == 1 {
                if hang {
                    // Arrives long after the others gave up, and finds the
                    // group broken.
                    std::thread::sleep(Duration::from_millis(1500));
                    let e = step.run(&inp, sc.damping).unwrap_err();
                    assert!(matches!(e, Error::Communication(_)), "{e}");
                }
                // Else: the rank fails (returns, dropping its communicator).
                return None;
            }
            let t = Instant::now();
            let first = step.run(&inp, sc.damping).unwrap_err();
            let took = t.elapsed();
            // The step refuses to run on a state that may differ from the
            // other ranks'.
            let again = step.run(&inp, sc.damping).unwrap_err();
            Some((first, again, took))
        })
        .unwrap();
        for (first, again, took) in out.into_iter().flatten() {
            let want = if hang {
                "waited"
            } else {
                "rank 1 left the group"
            };
            assert!(
                matches!(&first, Error::Communication(m) if m.contains(want)),
                "hang {hang}: {first}"
            );
            assert!(
                matches!(&again, Error::Communication(m) if m.contains("earlier collective")),
                "{again}"
            );
            assert!(took < Duration::from_secs(20), "{took:?}");
        }
    }
}

#[test]
fn bad_input_on_a_distributed_step_changes_nothing_and_calls_no_collective() {
    // A shape error is found before the first collective, so the group stays usable.
    let sc = StepScenario::new();
    let set = sc.set();
    let mut comms = LocalGroup::new(1, Duration::from_secs(5)).unwrap();
    let mut step = CpuThorStep::new_distributed::<f32>(
        &set,
        &RuleLayer::pairs(&set),
        config(&sc),
        Box::new(comms.pop().unwrap()),
    )
    .unwrap();
    let dims = sc.flat_dims();
    let batch = sc.batch(0);
    let mut inp = inputs(&batch, &dims, 0..sc.rows);
    let before = step.stats().to_vec();
    inp[1] = HostStepInput::matrix(&batch[1][..5], sc.rows, dims[1]);
    let e = step.run(&inp, sc.damping).unwrap_err();
    assert!(matches!(e, Error::Shape { arg: "x", .. }), "{e}");
    assert_eq!(step.comm_counters().unwrap().collectives, 0);
    assert_eq!(step.stats(), &before[..]);
    let inp = inputs(&batch, &dims, 0..sc.rows);
    step.run(&inp, sc.damping).unwrap();
    assert_eq!(step.comm_counters().unwrap().collectives, 3);
}

mod optimizer {
    //! `Thor::with_communicator`: the optimizer on ranks against one optimizer on the union.

    use super::*;
    use thor_kernels::thor::{
        DampingSchedule, IntervalSchedule, LayerInputs, LayerKind, Thor, ThorConfig,
    };
    use thor_kernels::BackendKind;

    const LAYERS: [(usize, usize, bool); 3] = [(70, 20, true), (20, 33, false), (33, 10, true)];
    const ROWS: usize = 48;

    fn config() -> ThorConfig {
        ThorConfig {
            block: 32,
            stat_decay: 0.8,
            damping: DampingSchedule::Constant(1e-2),
            interval: IntervalSchedule::Fixed(1),
            backend: BackendKind::Cpu,
            ..ThorConfig::thor()
        }
    }

    fn add_layers(t: &mut Thor) {
        for (i, o, bias) in LAYERS {
            t.add_layer(LayerKind::Linear {
                inputs: i,
                outputs: o,
                bias,
            })
            .unwrap();
        }
    }

    /// Step `k`'s activations and output gradients per layer, `ROWS` rows; every third
    /// step repeats the previous one (so the rule reuses).
    fn batch(k: usize) -> Vec<(Vec<f32>, Vec<f32>)> {
        let mut r = rng(100 + (k - usize::from(k % 3 == 2)) as u64);
        LAYERS
            .iter()
            .map(|&(i, o, _)| (normal(&mut r, ROWS * i), normal(&mut r, ROWS * o)))
            .collect()
    }

    fn grads() -> Vec<Vec<f32>> {
        let mut r = rng(9);
        LAYERS
            .iter()
            .map(|&(i, o, bias)| normal(&mut r, o * (i + usize::from(bias))))
            .collect()
    }

    /// Runs `steps` statistics steps on rows `rows` of each batch; per step the decisions
    /// and the preconditioned gradients.
    fn run(
        t: &mut Thor,
        steps: Range<usize>,
        rows: Range<usize>,
    ) -> Vec<(Vec<Decision>, Vec<Vec<f32>>)> {
        run_with(t, steps, rows, Observe::OneByOne)
    }

    /// How [`run_with`] hands the layers over.
    #[derive(Clone, Copy, PartialEq)]
    enum Observe {
        OneByOne,
        /// In one [`Thor::observe_layers`].
        Together,
        /// In one [`Thor::observe_layers`], the last layer first.
        Reversed,
    }

    /// [`run`], the layers observed as `how` says.
    fn run_with(
        t: &mut Thor,
        steps: Range<usize>,
        rows: Range<usize>,
        how: Observe,
    ) -> Vec<(Vec<Decision>, Vec<Vec<f32>>)> {
        let g = grads();
        steps
            .map(|k| {
                let b = batch(k);
                let ids: Vec<_> = (0..LAYERS.len()).map(thor_kernels::thor::LayerId).collect();
                let items: Vec<_> = LAYERS
                    .iter()
                    .zip(&b)
                    .zip(&ids)
                    .map(|((&(i, o, _), (a, og)), &id)| {
                        let item = LayerInputs::Dense {
                            acts: &a[rows.start * i..rows.end * i],
                            out_grads: &og[rows.start * o..rows.end * o],
                            rows: rows.len(),
                        };
                        (id, item)
                    })
                    .collect();
                let d = if how == Observe::Reversed {
                    let rev: Vec<_> = items.iter().rev().copied().collect();
                    let mut d = t.observe_layers(&rev).unwrap();
                    d.reverse();
                    d
                } else if how == Observe::Together {
                    t.observe_layers(&items).unwrap()
                } else {
                    items
                        .iter()
                        .map(|(id, item)| match *item {
                            LayerInputs::Dense {
                                acts,
                                out_grads,
                                rows,
                            } => t.observe(*id, acts, out_grads, rows).unwrap(),
                            LayerInputs::Conv { .. } => unreachable!(),
                        })
                        .collect()
                };
                let p = ids
                    .iter()
                    .zip(&g)
                    .map(|(&id, g)| {
                        let mut out = poisoned(g.len());
                        t.precondition(id, g, &mut out).unwrap();
                        out
                    })
                    .collect();
                t.finish_step();
                (d, p)
            })
            .collect()
    }

    #[test]
    fn ranks_match_one_optimizer_and_save_a_whole_state() {
        let mut one = Thor::new(config()).unwrap();
        add_layers(&mut one);
        let want = run(&mut one, 0..6, 0..ROWS);
        let updates = want
            .iter()
            .flat_map(|(d, _)| d)
            .filter(|d| **d == Decision::Update)
            .count();
        let reuses = want
            .iter()
            .flat_map(|(d, _)| d)
            .filter(|d| **d == Decision::Reuse)
            .count();
        assert!(
            updates > 3 && reuses > 0,
            "{updates} updates, {reuses} reuses"
        );
        let one_bytes = {
            let mut t = Thor::new(config()).unwrap();
            add_layers(&mut t);
            run(&mut t, 0..4, 0..ROWS);
            t
        };
        for world in [2, 3, 4] {
            let ranges = row_ranges(ROWS, world);
            let out = LocalGroup::run(world, Duration::from_secs(60), |comm| {
                let rank = comm.rank();
                let mut t = Thor::with_communicator(config(), Box::new(comm)).unwrap();
                add_layers(&mut t);
                let first = run(&mut t, 0..4, ranges[rank].clone());
                t.gather_statistics().unwrap();
                let bytes = t.to_bytes().unwrap();
                let rest = run(&mut t, 4..6, ranges[rank].clone());
                (first.into_iter().chain(rest).collect::<Vec<_>>(), bytes)
            })
            .unwrap();
            for (rank, (steps, bytes)) in out.iter().enumerate() {
                // After gathering, every rank saves the same, whole state.
                assert!(
                    bytes == &out[0].1,
                    "world {world} rank {rank}: saved state differs from rank 0's"
                );
                for (k, ((d, p), (wd, wp))) in steps.iter().zip(&want).enumerate() {
                    assert_eq!(d, wd, "decisions, world {world} rank {rank} step {k}");
                    for (l, (g, w)) in p.iter().zip(wp).enumerate() {
                        let err = rel_err(g, &f64s(w));
                        assert!(
                            err <= 1e-4,
                            "layer {l}, world {world} rank {rank} step {k}: {err:e}"
                        );
                    }
                }
            }
            // The saved state loads into a single optimizer and continues as the one that
            // ran on the union all along.
            let mut t = Thor::new(config()).unwrap();
            add_layers(&mut t);
            t.load_bytes(&out[0].1).unwrap();
            let mut u = Thor::new(config()).unwrap();
            add_layers(&mut u);
            u.load_bytes(&one_bytes.to_bytes().unwrap()).unwrap();
            let (got, exp) = (run(&mut t, 4..6, 0..ROWS), run(&mut u, 4..6, 0..ROWS));
            for ((d, p), (wd, wp)) in got.iter().zip(&exp) {
                assert_eq!(d, wd, "world {world}: after loading");
                for (g, w) in p.iter().zip(wp) {
                    assert!(rel_err(g, &f64s(w)) <= 1e-4, "world {world}: after loading");
                }
            }
        }
    }

    /// A rank's communicator that fails any collective called from a thread other than
    /// the one that made it (MPI's funneled mode, say, needs that).
    #[derive(Debug)]
    struct OneThread {
        inner: thor_kernels::dist::LocalComm,
        owner: std::thread::ThreadId,
    }

    impl OneThread {
        fn check(&self) -> thor_kernels::Result<()> {
            if std::thread::current().id() == self.owner {
                Ok(())
            } else {
                Err(Error::invalid("thread", "a collective from another thread"))
            }
        }
    }

    impl Communicator for OneThread {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world(&self) -> usize {
            self.inner.world()
        }
        fn reduce_scatter(
            &mut self,
            send: &[f32],
            counts: &[usize],
            recv: &mut [f32],
        ) -> thor_kernels::Result<()> {
            self.check()?;
            self.inner.reduce_scatter(send, counts, recv)
        }
        fn all_gather(
            &mut self,
            send: &[f32],
            counts: &[usize],
            recv: &mut [f32],
        ) -> thor_kernels::Result<()> {
            self.check()?;
            self.inner.all_gather(send, counts, recv)
        }
        fn all_reduce(&mut self, buf: &mut [f64]) -> thor_kernels::Result<()> {
            self.check()?;
            self.inner.all_reduce(buf)
        }
        fn counters(&self) -> thor_kernels::dist::CommCounters {
            self.inner.counters()
        }
    }

    #[test]
    fn layers_observed_together_join_their_collectives() {
        // The same steps through `observe_layers`: the same bits as layer by layer (the
        // in-process group sums each element in rank order either way), at most three
        // collectives per step for the three layers instead of up to nine.
        for world in [2, 3] {
            let ranges = row_ranges(ROWS, world);
            let out = LocalGroup::run(world, Duration::from_secs(60), |comm| {
                let rank = comm.rank();
                // The joined collectives run on the caller's thread.
                let comm = OneThread {
                    inner: comm,
                    owner: std::thread::current().id(),
                };
                let mut t = Thor::with_communicator(config(), Box::new(comm)).unwrap();
                add_layers(&mut t);
                // Odd ranks pass the layers in another order: the same steps.
                let how = if rank % 2 == 1 {
                    Observe::Reversed
                } else {
                    Observe::Together
                };
                let steps = run_with(&mut t, 0..6, ranges[rank].clone(), how);
                let joint = t.comm_counters().unwrap().collectives;
                t.gather_statistics().unwrap();
                (steps, joint, t.to_bytes().unwrap())
            })
            .unwrap();
            let sep = LocalGroup::run(world, Duration::from_secs(60), |comm| {
                let rank = comm.rank();
                let mut t = Thor::with_communicator(config(), Box::new(comm)).unwrap();
                add_layers(&mut t);
                let steps = run_with(&mut t, 0..6, ranges[rank].clone(), Observe::OneByOne);
                let one_by_one = t.comm_counters().unwrap().collectives;
                t.gather_statistics().unwrap();
                (steps, one_by_one, t.to_bytes().unwrap())
            })
            .unwrap();
            for (rank, ((steps, joint, bytes), (want, sep_n, want_bytes))) in
                out.iter().zip(&sep).enumerate()
            {
                for (k, ((d, p), (wd, wp))) in steps.iter().zip(want).enumerate() {
                    assert_eq!(d, wd, "world {world} rank {rank} step {k}");
                    for (l, (g, w)) in p.iter().zip(wp).enumerate() {
                        let same = g.iter().zip(w).all(|(x, y)| x.to_bits() == y.to_bits());
                        assert!(same, "world {world} rank {rank} step {k} layer {l}");
                    }
                }
                assert!(
                    bytes == want_bytes,
                    "world {world} rank {rank}: saved state"
                );
                // Every step updates some layer: three joined collectives each; layer by
                // layer 47 (the layers that did not update gather nothing).
                assert_eq!(*joint, 3 * 6, "world {world}: collectives joined");
                assert_eq!(*sep_n, 47, "world {world}: collectives layer by layer");
            }
        }
    }

    #[test]
    fn observe_layers_checks_every_input_before_any_step() {
        let mut t = Thor::new(config()).unwrap();
        add_layers(&mut t);
        let b = batch(0);
        let id = thor_kernels::thor::LayerId;
        let item = |l: usize, rows: usize| {
            let (i, o, _) = LAYERS[l];
            LayerInputs::Dense {
                acts: &b[l].0[..rows * i],
                out_grads: &b[l].1[..rows * o],
                rows,
            }
        };
        let before = t.to_bytes().unwrap();
        let e = t
            .observe_layers(&[(id(0), item(0, 8)), (id(0), item(0, 8))])
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "layers", .. }),
            "{e}"
        );
        let (i, _, _) = LAYERS[1];
        let short = LayerInputs::Dense {
            acts: &b[1].0[..8 * i - 1],
            out_grads: &b[1].1[..8 * LAYERS[1].1],
            rows: 8,
        };
        let e = t
            .observe_layers(&[(id(0), item(0, 8)), (id(1), short)])
            .unwrap_err();
        assert!(matches!(e, Error::Shape { arg: "acts", .. }), "{e}");
        let e = t
            .observe_layers(&[(id(0), item(0, 8)), (id(7), item(1, 8))])
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidArgument { arg: "layer", .. }),
            "{e}"
        );
        assert!(t.to_bytes().unwrap() == before, "a layer changed");
        // On one process, the same as layer by layer.
        let mut u = Thor::new(config()).unwrap();
        add_layers(&mut u);
        let together = run_with(&mut t, 0..3, 0..ROWS, Observe::Together);
        let apart = run_with(&mut u, 0..3, 0..ROWS, Observe::OneByOne);
        assert_eq!(together, apart);
    }

    #[test]
    fn a_rank_gone_fails_every_layer_observed_together() {
        let out = LocalGroup::run(2, Duration::from_secs(60), |comm| {
            let rank = comm.rank();
            let mut t = Thor::with_communicator(config(), Box::new(comm)).unwrap();
            add_layers(&mut t);
            run_with(&mut t, 0..1, 0..24, Observe::Together);
            if rank == 1 {
                return None;
            }
            let b = batch(1);
            let items: Vec<_> = (0..LAYERS.len())
                .map(|l| {
                    let (i, o, _) = LAYERS[l];
                    (
                        thor_kernels::thor::LayerId(l),
                        LayerInputs::Dense {
                            acts: &b[l].0[..24 * i],
                            out_grads: &b[l].1[..24 * o],
                            rows: 24,
                        },
                    )
                })
                .collect();
            let e = t.observe_layers(&items).unwrap_err();
            let again = t.observe_layers(&items).unwrap_err();
            Some((e, again))
        })
        .unwrap();
        let (e, again) = out[0].as_ref().unwrap();
        assert!(
            matches!(e, Error::Communication(m) if m.contains("rank 1 left")),
            "{e}"
        );
        assert!(matches!(again, Error::Communication(_)), "{again}");
    }

    #[test]
    fn a_failure_in_one_layer_stops_every_layer_and_stale_states_are_not_saved() {
        let out: Vec<Option<Vec<Error>>> = LocalGroup::run(2, Duration::from_secs(60), |comm| {
            let rank = comm.rank();
            let mut t = Thor::with_communicator(config(), Box::new(comm)).unwrap();
            add_layers(&mut t);
            let b = batch(0);
            let obs = |t: &mut Thor, l: usize| {
                let (i, o, _) = LAYERS[l];
                let (a, g) = &b[l];
                t.observe(
                    thor_kernels::thor::LayerId(l),
                    &a[..24 * i],
                    &g[..24 * o],
                    24,
                )
            };
            obs(&mut t, 0).unwrap();
            if rank == 1 {
                return None;
            }
            // Statistics of other ranks' blocks are missing: no stale save.
            let stale = t.to_bytes().unwrap_err();
            // Rank 1 has left: layer 1's collectives fail, and then layer 0
            // (whose own step never failed) refuses too.
            let e1 = obs(&mut t, 1).unwrap_err();
            let e0 = obs(&mut t, 0).unwrap_err();
            let (i, o, bias) = LAYERS[0];
            let g = vec![0.0f32; o * (i + usize::from(bias))];
            let mut p = vec![0.0f32; g.len()];
            let ep = t
                .precondition(thor_kernels::thor::LayerId(0), &g, &mut p)
                .unwrap_err();
            let es = t.to_bytes().unwrap_err();
            Some(vec![stale, e1, e0, ep, es])
        })
        .unwrap();
        let errs = out[0].as_ref().unwrap();
        assert!(
            matches!(
                &errs[0],
                Error::InvalidArgument {
                    arg: "gather_statistics",
                    ..
                }
            ),
            "{}",
            errs[0]
        );
        assert!(
            matches!(&errs[1], Error::Communication(m) if m.contains("rank 1 left")),
            "{}",
            errs[1]
        );
        for e in &errs[2..] {
            assert!(
                matches!(e, Error::Communication(m) if m.contains("earlier collective")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_models_blocks_are_spread_over_the_ranks() {
        // 10 blocks (4 + 3 + 3) on 4 ranks: each layer's plan starts where the last one
        // ended, so the ranks own 3, 3, 2, 2 (without the rotation: 3, 3, 3, 1).
        let comms = LocalGroup::new(4, Duration::from_secs(10)).unwrap();
        let owned: Vec<usize> = comms
            .into_iter()
            .map(|c| {
                let mut t = Thor::with_communicator(config(), Box::new(c)).unwrap();
                add_layers(&mut t);
                t.owned_blocks().unwrap()
            })
            .collect();
        assert_eq!(owned, [3, 3, 2, 2]);
        let mut one = Thor::new(config()).unwrap();
        add_layers(&mut one);
        assert_eq!(one.owned_blocks(), None);
    }

    #[test]
    fn a_distributed_optimizer_on_cuda_needs_a_device() {
        // With a GPU the optimizer runs there (tests/gpu/step.rs); without one, or without
        // the `cuda` feature, asking for it is a clear error.
        let mut comms = LocalGroup::new(1, Duration::from_secs(1)).unwrap();
        let cfg = ThorConfig {
            backend: BackendKind::Cuda,
            ..config()
        };
        match Thor::with_communicator(cfg, Box::new(comms.pop().unwrap())) {
            Ok(t) => assert_eq!(t.owned_blocks(), Some(0)),
            Err(e) => assert!(
                matches!(
                    e,
                    Error::NoDevice(_) | Error::InvalidArgument { arg: "backend", .. }
                ),
                "{e}"
            ),
        }
    }
}

#[test]
fn a_step_that_fails_after_its_first_collective_aborts_the_group() {
    // A transport whose all-gather fails with an error of its own (not a Communication
    // error), or panics: the step breaks and tells the group through `abort`; after a
    // panic it refuses to run again (it must not go on as a single-rank step).
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use thor_kernels::dist::{CommCounters, LocalComm};
    #[derive(Debug)]
    struct Flaky {
        inner: LocalComm,
        aborted: Arc<AtomicBool>,
        panics: bool,
    }
    impl Communicator for Flaky {
        fn rank(&self) -> usize {
            self.inner.rank()
        }
        fn world(&self) -> usize {
            self.inner.world()
        }
        fn reduce_scatter(
            &mut self,
            send: &[f32],
            counts: &[usize],
            recv: &mut [f32],
        ) -> thor_kernels::Result<()> {
            self.inner.reduce_scatter(send, counts, recv)
        }
        fn all_gather(
            &mut self,
            _: &[f32],
            _: &[usize],
            _: &mut [f32],
        ) -> thor_kernels::Result<()> {
            if self.panics {
                panic!("a transport bug");
            }
            Err(Error::invalid("transport", "out of buffers"))
        }
        fn all_reduce(&mut self, buf: &mut [f64]) -> thor_kernels::Result<()> {
            self.inner.all_reduce(buf)
        }
        fn counters(&self) -> CommCounters {
            self.inner.counters()
        }
        fn abort(&mut self, _: &str) {
            self.aborted.store(true, Ordering::SeqCst);
        }
    }
    let sc = StepScenario::new();
    let set = sc.set();
    let dims = sc.flat_dims();
    let batch = sc.batch(0);
    let inp = inputs(&batch, &dims, 0..sc.rows);
    for panics in [false, true] {
        let aborted = Arc::new(AtomicBool::new(false));
        let comm = Flaky {
            inner: LocalGroup::new(1, Duration::from_secs(5))
                .unwrap()
                .pop()
                .unwrap(),
            aborted: aborted.clone(),
            panics,
        };
        let mut step = CpuThorStep::new_distributed::<f32>(
            &set,
            &RuleLayer::pairs(&set),
            config(&sc),
            Box::new(comm),
        )
        .unwrap();
        if panics {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                step.run(&inp, sc.damping)
            }));
            assert!(r.is_err(), "the transport's panic went on");
        } else {
            let e = step.run(&inp, sc.damping).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidArgument {
                        arg: "transport",
                        ..
                    }
                ),
                "{e}"
            );
        }
        assert!(
            aborted.load(Ordering::SeqCst),
            "panics {panics}: the group was not told"
        );
        assert_eq!(
            step.comm_rank(),
            Some(0),
            "panics {panics}: no longer a rank"
        );
        let e = step.run(&inp, sc.damping).unwrap_err();
        assert!(
            matches!(&e, Error::Communication(m) if m.contains("earlier collective")),
            "panics {panics}: {e}"
        );
        assert!(matches!(step.check_usable(), Err(Error::Communication(_))));
        let e = step.gather_statistics().unwrap_err();
        assert!(matches!(e, Error::Communication(_)), "panics {panics}: {e}");
    }
}

#[test]
fn ranks_that_run_different_plans_all_fail() {
    // Through the `_with_plan` constructor a caller can hand ranks different ownerships:
    // the segments would not line up; every rank says so instead.
    let sc = StepScenario::new();
    let set = sc.set();
    let layers = RuleLayer::pairs(&set);
    let dims = sc.flat_dims();
    let ranges = row_ranges(sc.rows, 2);
    let out = LocalGroup::run(2, Duration::from_secs(60), |comm| {
        let rank = comm.rank();
        let plan = OwnershipPlan::new(&set, 2).unwrap().rotated(rank);
        let mut step = CpuThorStep::new_distributed_with_plan::<f32>(
            &set,
            &layers,
            config(&sc),
            Box::new(comm),
            plan,
        )
        .unwrap();
        step.run(
            &inputs(&sc.batch(0), &dims, ranges[rank].clone()),
            sc.damping,
        )
        .unwrap_err()
    })
    .unwrap();
    for e in out {
        assert!(
            matches!(&e, Error::Communication(m) if m.contains("block ownership")),
            "{e}"
        );
    }
}
