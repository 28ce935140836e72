//! The CUDA kernels run on the host through the kernel emulator (tests/emu): the same
//! kernel sources, launch plans (grid, block, shared memory, arguments) and buffers as on a
//! GPU, every launch under several thread scheduling orders, buffers guarded against
//! out-of-bounds writes, shared memory poisoned with NaN. This checks the kernels' logic,
//! indexing and barriers on machines without a GPU; it says nothing about speed, and the
//! GPU tests (tests/gpu.rs) remain the word on real hardware.
#![cfg(feature = "cuda")]

mod common;
#[path = "emu/harness.rs"]
mod harness;

use common::*;
use harness::{lock, run, Guarded, ORDERS};
use thor_kernels::cuda::raw::{self, InvertArgs};
use thor_kernels::cuda::RuleLayer;
use thor_kernels::invert::FailurePolicy;
use thor_kernels::layout::{BlockLayout, FactorSet, SUPPORTED_BLOCK_SIZES};
use thor_kernels::reference;

#[test]
fn emulated_split_and_merge_match_reference() {
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        for d in [1usize, b - 1, b + 1, 2 * b + 5] {
            let layout = BlockLayout::new(d, b).unwrap();
            let ld = d + 3;
            let mut r = rng((b * 1000 + d) as u64);
            let dense = normal(&mut r, (d - 1) * ld + d);
            let mut dd = Guarded::new(&dense);
            let order = ORDERS[d % ORDERS.len()];
            let mut blocks = Guarded::new(&poisoned(layout.buffer_len()));
            let plan = raw::plan_split_blocks_f32(dd.ptr(), ld, &layout, blocks.ptr()).unwrap();
            run(&[plan], order).unwrap();
            blocks.check("blocks");
            let dense64: Vec<f64> = (0..d * d)
                .map(|i| dense[(i / d) * ld + i % d] as f64)
                .collect();
            let want = reference::split(&dense64, &layout).unwrap();
            let got = blocks.get();
            assert!(
                got.iter().zip(&want).all(|(g, w)| *g as f64 == *w),
                "split b={b} d={d}"
            );
            // Merge back into a poisoned dense buffer with the same stride.
            let mut back = Guarded::new(&poisoned((d - 1) * ld + d));
            let plan = raw::plan_merge_blocks_f32(blocks.ptr(), &layout, back.ptr(), ld).unwrap();
            run(&[plan], order).unwrap();
            back.check("dense");
            let want = reference::merge(&want, &layout).unwrap();
            let back = back.get();
            for r in 0..d {
                for c in 0..d {
                    assert_eq!(
                        back[r * ld + c] as f64,
                        want[r * d + c],
                        "merge b={b} d={d}"
                    );
                }
            }
        }
    }
}

#[test]
fn emulated_traces_match_reference() {
    let _g = lock();
    for (b, dims) in [
        (32usize, vec![1usize, 31, 33, 200]),
        (128, vec![129, 7, 300]),
    ] {
        let set = FactorSet::new(b, &dims).unwrap();
        let mut r = rng(b as u64);
        let blocks = normal(&mut r, set.buffer_len());
        let mut db = Guarded::new(&blocks);
        let mut desc = Guarded::new(&set.trace_table());
        for order in ORDERS {
            let mut bt = Guarded::new(&poisoned(set.total_blocks()));
            let mut ft = Guarded::new(&poisoned(set.len()));
            let plan =
                raw::plan_trace_set_f32(db.ptr(), b, desc.ptr(), set.len(), bt.ptr(), ft.ptr())
                    .unwrap();
            run(&[plan], order).unwrap();
            bt.check("block_traces");
            ft.check("factor_traces");
            let wb = reference::block_traces(&f64s(&blocks), b).unwrap();
            let wf = reference::factor_traces(&set, &f64s(&blocks)).unwrap();
            for (g, w) in bt.get().iter().zip(&wb) {
                let tol = 1e-5 * b as f64;
                assert!(
                    approx::abs_diff_eq!(*g as f64, *w, epsilon = tol),
                    "{g} vs {w}"
                );
            }
            for (g, w) in ft.get().iter().zip(&wf) {
                let tol = 1e-4 * b as f64;
                assert!(
                    approx::abs_diff_eq!(*g as f64, *w, epsilon = tol),
                    "{g} vs {w}"
                );
            }
        }
    }
}

/// Options of one emulated inversion.
#[derive(Clone, Copy)]
struct Inv<'a> {
    /// Initial output (out of place), or None for in place.
    out_init: Option<&'a [f32]>,
    damping: Option<&'a [f32]>,
    damping_all: f32,
    mask: Option<&'a [u8]>,
    policy: FailurePolicy,
    order: i32,
    /// The kernel run (the others are run on copies and compared with it).
    kernel: raw::InvertKernel,
}

impl Default for Inv<'_> {
    fn default() -> Self {
        Inv {
            out_init: None,
            damping: None,
            damping_all: 0.0,
            mask: None,
            policy: FailurePolicy::Report,
            order: 0,
            kernel: raw::InvertKernel::Standard,
        }
    }
}

/// Runs the emulated inversion; returns (output, info, damping used).
fn emu_invert(b: usize, input: &[f32], o: Inv<'_>) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
    let Inv {
        out_init,
        damping,
        damping_all,
        mask,
        policy,
        order,
        kernel,
    } = o;
    let nb = input.len() / (b * b);
    let mut din = Guarded::new(input);
    let mut dout = out_init.map(Guarded::new);
    let mut info = Guarded::new(&vec![i32::MIN; nb]);
    let mut used = Guarded::new(&vec![f32::NAN; nb]);
    let mut dd = damping.map(Guarded::new);
    let mut dm = mask.map(Guarded::new);
    let inp = din.ptr();
    let outp = dout.as_mut().map_or(inp, |o| o.ptr());
    let args = InvertArgs {
        b,
        blocks: nb,
        damping: dd.as_mut().map_or(0, |d| d.ptr()),
        damping_all,
        mask: dm.as_mut().map_or(0, |m| m.ptr()),
        policy,
        info: info.ptr(),
        damping_used: used.ptr(),
    };
    let plan = raw::plan_invert_chol_f32_with(inp, outp, &args, kernel).unwrap();
    // The other kernels for this block size (every one after the standard kernel, the
    // standard one after another) run on fresh copies of the same buffers. Those with the
    // same arithmetic must give the same bits; the blocked kernel the same Cholesky, so the
    // same info and damping, and failed or skipped blocks left the same.
    let others: Vec<_> = raw::InvertKernel::ALL
        .into_iter()
        .filter(|k| {
            *k != kernel
                && k.supports(b)
                && (kernel == raw::InvertKernel::Standard || *k == raw::InvertKernel::Standard)
        })
        .collect();
    let before = (din.get(), dout.as_ref().map(|d| d.get()));
    run(&[plan], order).unwrap();
    din.check("input");
    info.check("info");
    used.check("damping_used");
    let out = match &dout {
        Some(o) => {
            o.check("output");
            o.get()
        }
        None => din.get(),
    };
    for k in others {
        let mut din2 = Guarded::new(&before.0);
        let mut dout2 = before.1.as_deref().map(Guarded::new);
        let mut info2 = Guarded::new(&vec![i32::MIN; nb]);
        let mut used2 = Guarded::new(&vec![f32::NAN; nb]);
        let inp2 = din2.ptr();
        let args2 = InvertArgs {
            info: info2.ptr(),
            damping_used: used2.ptr(),
            ..args
        };
        let outp2 = dout2.as_mut().map_or(inp2, |o| o.ptr());
        let plan = raw::plan_invert_chol_f32_with(inp2, outp2, &args2, k).unwrap();
        run(&[plan], order).unwrap();
        let out2 = dout2.as_ref().map_or_else(|| din2.get(), |o| o.get());
        let same = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits());
        assert_eq!(info2.get(), info.get(), "{k:?} beside {kernel:?}: info");
        assert!(
            same(&used2.get(), &used.get()),
            "{k:?} beside {kernel:?}: damping used"
        );
        if k.same_bits_as_standard() && kernel.same_bits_as_standard() {
            assert!(same(&out2, &out), "{k:?}: another output");
        } else {
            for (j, &st) in info.get().iter().enumerate() {
                let blk = j * b * b..(j + 1) * b * b;
                if st != 0 {
                    assert!(
                        same(&out2[blk.clone()], &out[blk]),
                        "{k:?} beside {kernel:?}: block {j} (info {st}) written"
                    );
                }
            }
        }
    }
    (out, info.get(), used.get())
}

#[test]
fn emulated_invert_every_block_size_matches_reference() {
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        for kernel in raw::InvertKernel::ALL {
            if !kernel.supports(b) || kernel == raw::InvertKernel::TwoPerSm {
                continue; // the two-per-SM kernel runs beside the standard one, same bits
            }
            let nb = if b == 256 { 2 } else { 3 };
            let mut r = rng(b as u64 * 7);
            let conds = [1.0, 1e2, 1e4];
            let input = spd_batch(&mut r, b, nb, &conds);
            let order = ORDERS[(b / 32) % ORDERS.len()];
            let (out, info, used) = emu_invert(
                b,
                &input,
                Inv {
                    out_init: Some(&poisoned(input.len())),
                    damping_all: 1e-3,
                    order,
                    kernel,
                    ..Inv::default()
                },
            );
            assert_eq!(info, vec![0; nb], "b={b} {kernel:?}");
            assert_eq!(used, vec![1e-3; nb]);
            for j in 0..nb {
                let res = block_residual(&input, &out, b, j, 1e-3);
                let tol = inverse_tolerance(conds[j % 3]);
                assert!(res < tol, "b={b} {kernel:?} block {j}: residual {res:e}");
                assert!(bitwise_symmetric(&out, b, j), "b={b} {kernel:?} block {j}");
            }
        }
    }
}

#[test]
fn emulated_trace_rule_matches_the_reference() {
    use thor_kernels::rule::{self, RuleState, Thresholds};
    let _g = lock();
    let dims = [40usize, 10, 64, 3, 100, 33];
    let set = FactorSet::new(32, &dims).unwrap();
    let layers = RuleLayer::pairs(&set);
    let mut table = Guarded::new(&RuleLayer::table(&set, &layers).unwrap());
    let (w1, w2, damping) = (0.01, 0.001, 0.04f32);
    let steps: [[f32; 6]; 6] = [
        [10.0, 5.0, 20.0, 2.0, 30.0, 3.0],
        [10.1, 5.0, f32::NAN, 2.0, 60.0, 3.0],
        [10.2, 5.0, 20.0, 2.0, 60.0, 3.0],
        [10.2001, 5.0, 20.0, 2.0, 60.0, 3.0],
        [50.0, 5.0, 20.0, 2.0, 60.0, 9.0],
        [f32::NAN, 5.0, 21.0, 2.0, 60.0, 9.0],
    ];
    let cap = 4;
    let mut prev = Guarded::new(&[0.0f64; 3]);
    let mut state = Guarded::new(&[0u8; 3]);
    let mut mask = Guarded::new(&vec![9u8; set.total_blocks()]);
    let mut decisions = Guarded::new(&[i32::MIN; 3]);
    let mut history = Guarded::new(&vec![-1i32; cap * 3]);
    let mut step = Guarded::new(&[0u64]);
    let mut states = [RuleState::default(); 3];
    let mut want_history = Vec::new();
    for (k, tr) in steps.iter().enumerate() {
        let mut dtr = Guarded::new(tr);
        let plan = raw::plan_trace_rule_f32(&raw::TraceRuleArgs {
            factor_traces: dtr.ptr(),
            factor_status: 0,
            layers: table.ptr(),
            n_layers: 3,
            damping,
            thresholds: Thresholds { w1, w2 },
            prev: prev.ptr(),
            state: state.ptr(),
            mask: mask.ptr(),
            decisions: decisions.ptr(),
            history: history.ptr(),
            history_capacity: cap,
            step: step.ptr(),
            factor_state: 0,
            counters: 0,
            damping_at: 0,
            block_damping: 0,
        })
        .unwrap();
        run(&[plan], ORDERS[k % ORDERS.len()]).unwrap();
        let s = (damping as f64).sqrt();
        let want: Vec<i32> = (0..3)
            .map(|l| {
                let cur = (tr[2 * l] as f64 + s * dims[2 * l] as f64)
                    * (tr[2 * l + 1] as f64 + s * dims[2 * l + 1] as f64);
                rule::step(&mut states[l], cur, Thresholds { w1, w2 }).code()
            })
            .collect();
        assert_eq!(decisions.get(), want, "step {k}");
        let m = mask.get();
        for (l, lay) in layers.iter().enumerate() {
            let expect = (want[l] == 0) as u8;
            assert!(m[lay.first_block..lay.first_block + lay.blocks]
                .iter()
                .all(|&v| v == expect));
        }
        want_history.push(want);
    }
    mask.check("mask");
    history.check("history");
    assert_eq!(step.get(), vec![6]);
    let ring = history.get();
    for s in 2..6 {
        assert_eq!(
            &ring[(s % cap) * 3..(s % cap) * 3 + 3],
            &want_history[s][..]
        );
    }
    assert_eq!((want_history[4][0], want_history[5][0]), (3, 3));
}

mod accumulate {
    use super::*;
    use thor_kernels::cuda::accumulate::{
        AccumulateBuffers, AccumulateKernel, AccumulateMode, AccumulatePlan, FactorInput,
    };
    use thor_kernels::Element;

    /// One factor's input for the emulated grouped accumulation: a matrix (`rows`, `ld`)
    /// or, with `patches`, a convolution's patches read from the tensor `x`.
    pub struct Input<E> {
        pub x: Vec<E>,
        pub rows: usize,
        pub ld: usize,
        pub patches: Option<thor_kernels::Patches>,
        pub alpha: f32,
        pub beta: f32,
    }

    impl<E> Input<E> {
        pub fn layout(&self) -> thor_kernels::InputLayout {
            match self.patches {
                Some(p) => thor_kernels::InputLayout::Patches(p),
                None => thor_kernels::InputLayout::matrix(self.rows, self.ld),
            }
        }

        /// The same input with its elements converted (to a 16-bit type, say).
        pub fn map<U>(&self, f: impl Fn(&E) -> U) -> Input<U> {
            Input {
                x: self.x.iter().map(f).collect(),
                rows: self.rows,
                ld: self.ld,
                patches: self.patches,
                alpha: self.alpha,
                beta: self.beta,
            }
        }
    }

    pub struct Out {
        pub blocks: Vec<f32>,
        pub block_traces: Vec<f32>,
        pub factor_traces: Vec<f32>,
        pub status: Vec<i32>,
    }

    /// Runs the three launches of a grouped accumulation on the emulator.
    pub fn run_acc<E: Element + bytemuck::Pod>(
        set: &FactorSet,
        inputs: &[Input<E>],
        init: &[f32],
        mode: AccumulateMode,
        order: i32,
    ) -> Out {
        run_acc_state(set, inputs, init, mode, order, None)
    }

    /// [`run_acc`] with the rule's per-factor state (`None`: every factor holds statistics).
    pub fn run_acc_state<E: Element + bytemuck::Pod>(
        set: &FactorSet,
        inputs: &[Input<E>],
        init: &[f32],
        mode: AccumulateMode,
        order: i32,
        state: Option<&[u8]>,
    ) -> Out {
        run_acc_with(
            set,
            inputs,
            init,
            mode,
            order,
            state,
            AccumulateKernel::Tiles,
        )
    }

    /// [`run_acc_state`] with the partial products computed by `kernel`.
    pub fn run_acc_with<E: Element + bytemuck::Pod>(
        set: &FactorSet,
        inputs: &[Input<E>],
        init: &[f32],
        mode: AccumulateMode,
        order: i32,
        state: Option<&[u8]>,
        kernel: AccumulateKernel,
    ) -> Out {
        let rows: Vec<usize> = inputs.iter().map(|i| i.rows).collect();
        let plan = AccumulatePlan::with_kernel(set, &rows, E::DTYPE, mode, 132, kernel).unwrap();
        run_acc_plan(&plan, inputs, init, order, state, false)
    }

    /// Runs `plan` on the emulator; with `fallback`, its tile-kernel fallback items.
    pub fn run_acc_plan<E: Element + bytemuck::Pod>(
        plan: &AccumulatePlan,
        inputs: &[Input<E>],
        init: &[f32],
        order: i32,
        state: Option<&[u8]>,
        fallback: bool,
    ) -> Out {
        let set = plan.set();
        let mut fstate = state.map(Guarded::new);
        let mut xs: Vec<Guarded<E>> = inputs.iter().map(|i| Guarded::new(&i.x)).collect();
        let fi: Vec<FactorInput> = inputs
            .iter()
            .zip(xs.iter_mut())
            .map(|(i, g)| FactorInput {
                x: g.ptr(),
                layout: i.layout(),
                alpha: i.alpha,
                beta: i.beta,
            })
            .collect();
        let mut factors = Guarded::new(&plan.factor_table(&fi).unwrap());
        let mut items = Guarded::new(if fallback {
            plan.fallback_items()
        } else {
            plan.items()
        });
        let mut finals = Guarded::new(plan.finals());
        let mut ws = Guarded::new(&poisoned(plan.workspace_len()));
        let mut flags = Guarded::new(&vec![-7i32; plan.slots()]);
        let mut blocks = Guarded::new(init);
        let mut status = Guarded::new(&vec![-7i32; set.len()]);
        let mut desc = Guarded::new(&set.trace_table());
        let mut bt = Guarded::new(&poisoned(set.total_blocks()));
        let mut ft = Guarded::new(&poisoned(set.len()));
        let launches = plan
            .launches_with(
                &AccumulateBuffers {
                    factors: factors.ptr(),
                    items: items.ptr(),
                    finals: finals.ptr(),
                    workspace: ws.ptr(),
                    flags: flags.ptr(),
                    blocks: blocks.ptr(),
                    status: status.ptr(),
                    trace_desc: desc.ptr(),
                    block_traces: bt.ptr(),
                    factor_traces: ft.ptr(),
                    factor_state: fstate.as_mut().map_or(0, |g| g.ptr()),
                },
                fallback,
            )
            .unwrap();
        assert_eq!(
            launches.len(),
            3,
            "launch count does not depend on the factors"
        );
        run(&launches, order).unwrap();
        for (g, name) in [
            (&ws, "workspace"),
            (&bt, "block_traces"),
            (&ft, "factor_traces"),
        ] {
            g.check(name);
        }
        blocks.check("blocks");
        flags.check("flags");
        status.check("status");
        for x in &xs {
            x.check("x");
        }
        Out {
            blocks: blocks.get(),
            block_traces: bt.get(),
            factor_traces: ft.get(),
            status: status.get(),
        }
    }

    /// The f64 reference of the whole set from `init`.
    pub fn reference_set<E: Element>(
        set: &FactorSet,
        inputs: &[Input<E>],
        init: &[f32],
    ) -> Vec<f64> {
        let mut out = f64s(init);
        for (e, i) in set.entries().iter().zip(inputs) {
            let mut x: Vec<f64> = i.x.iter().map(|v| v.to_f32() as f64).collect();
            let mut ld = i.ld;
            if let Some(p) = &i.patches {
                x = reference::im2col(&x, p).unwrap();
                ld = p.dim();
            }
            let s = &mut out[e.offset()..e.offset() + e.layout.buffer_len()];
            reference::accumulate(&x, i.rows, ld, &e.layout, i.alpha as f64, i.beta as f64, s)
                .unwrap();
        }
        out
    }

    pub fn make_inputs<E: Element>(
        set: &FactorSet,
        rows: &[usize],
        beta: f32,
        seed: u64,
    ) -> Vec<Input<E>> {
        make_inputs_ld(set, rows, beta, seed, |f, d| d + (f % 3) * 5)
    }

    /// [`make_inputs`] with factor `f`'s row stride `ld(f, d)`.
    pub fn make_inputs_ld<E: Element>(
        set: &FactorSet,
        rows: &[usize],
        beta: f32,
        seed: u64,
        ld: impl Fn(usize, usize) -> usize,
    ) -> Vec<Input<E>> {
        set.entries()
            .iter()
            .zip(rows)
            .enumerate()
            .map(|(f, (e, &n))| {
                let d = e.layout.dim();
                let ld = ld(f, d);
                let mut r = rng(seed * 31 + f as u64);
                let x = normal(&mut r, (n - 1) * ld + d)
                    .into_iter()
                    .map(E::from_f32)
                    .collect();
                Input {
                    x,
                    rows: n,
                    ld,
                    patches: None,
                    alpha: 1.0 / n as f32,
                    beta,
                }
            })
            .collect()
    }

    /// A symmetric starting state (for beta != 0): a previous accumulation's blocks.
    pub fn init_blocks(set: &FactorSet, seed: u64) -> Vec<f32> {
        let mut r = rng(seed);
        let mut v = normal(&mut r, set.buffer_len());
        let b = set.block();
        for k in 0..set.total_blocks() {
            let m = &mut v[k * b * b..(k + 1) * b * b];
            for i in 0..b {
                for j in 0..i {
                    m[j * b + i] = m[i * b + j];
                }
            }
        }
        v
    }

    pub fn check(set: &FactorSet, out: &Out, want: &[f64], tol: f64, label: &str) {
        let b = set.block();
        for (f, e) in set.entries().iter().enumerate() {
            let range = e.offset()..e.offset() + e.layout.buffer_len();
            let err = rel_err(&out.blocks[range.clone()], &want[range]);
            assert!(
                err < tol,
                "{label} factor {f} (d={}): rel err {err:e}",
                e.layout.dim()
            );
            for k in e.first_block..e.first_block + e.layout.blocks() {
                assert!(bitwise_symmetric(&out.blocks, b, k), "{label} block {k}");
                let w: f64 = (0..b).map(|i| want[k * b * b + i * b + i]).sum();
                let g = out.block_traces[k] as f64;
                assert!(
                    approx::relative_eq!(g, w, epsilon = 4.0 * tol, max_relative = 4.0 * tol),
                    "{label} trace {k}: {g} vs {w}"
                );
            }
            // Padding exactly identity.
            let j = e.layout.blocks() - 1;
            let valid = e.layout.valid(j);
            let blk = &out.blocks[(e.first_block + j) * b * b..(e.first_block + j + 1) * b * b];
            for r in 0..b {
                for c in 0..b {
                    if r >= valid || c >= valid {
                        let id = if r == c { 1.0 } else { 0.0 };
                        assert_eq!(blk[r * b + c], id, "{label} padding ({r},{c})");
                    }
                }
            }
        }
        assert!(
            out.status.iter().all(|&s| s == 0),
            "{label}: {:?}",
            out.status
        );
    }
}

#[test]
fn emulated_accumulate_f32_every_block_size_grouped() {
    use accumulate::*;
    use thor_kernels::cuda::accumulate::AccumulateMode;
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        let dims = [1, b - 1, b, b + 1, 3 * b + 5];
        let rows = [7usize, 1000, 1, 7, 300];
        let set = FactorSet::new(b, &dims).unwrap();
        for (k, beta) in [0.0f32, 0.95].into_iter().enumerate() {
            let inputs = make_inputs::<f32>(&set, &rows, beta, b as u64 + k as u64);
            let init = if beta == 0.0 {
                poisoned(set.buffer_len())
            } else {
                init_blocks(&set, 5)
            };
            let out = run_acc(
                &set,
                &inputs,
                &init,
                AccumulateMode::F32,
                ORDERS[(k + b / 64) % ORDERS.len()],
            );
            let want = reference_set(&set, &inputs, &init);
            check(&set, &out, &want, 1e-5, &format!("f32 b={b} beta={beta}"));
        }
    }
}

#[test]
fn emulated_accumulate_tensor_cores_and_half_inputs() {
    use accumulate::*;
    use half::{bf16, f16};
    use thor_kernels::cuda::accumulate::AccumulateMode;
    let _g = lock();
    for b in [32usize, 128] {
        let dims = [b - 1, b + 1, 2 * b + 5];
        let rows = [100usize, 1000, 33];
        let set = FactorSet::new(b, &dims).unwrap();
        let init = init_blocks(&set, 9);
        // TF32 on f32 input.
        let inputs = make_inputs::<f32>(&set, &rows, 0.95, 40 + b as u64);
        let out = run_acc(&set, &inputs, &init, AccumulateMode::TensorCore, 2);
        let want = reference_set(&set, &inputs, &init);
        check(&set, &out, &want, 5e-4, &format!("tf32 b={b}"));
        // f16 and bf16 inputs on tensor cores and widened on the SIMT path.
        for mode in [AccumulateMode::TensorCore, AccumulateMode::F32] {
            let inputs = make_inputs::<f16>(&set, &rows, 0.0, 50 + b as u64);
            let out = run_acc(&set, &inputs, &poisoned(set.buffer_len()), mode, 1);
            let want = reference_set(&set, &inputs, &poisoned(set.buffer_len()));
            check(&set, &out, &want, 1e-2, &format!("f16 {mode:?} b={b}"));
            let inputs = make_inputs::<bf16>(&set, &rows, 0.95, 60 + b as u64);
            let out = run_acc(&set, &inputs, &init, mode, 3);
            let want = reference_set(&set, &inputs, &init);
            check(&set, &out, &want, 1e-2, &format!("bf16 {mode:?} b={b}"));
        }
    }
}

/// The block kernels (b = 64 and 128): every input type and mode, rows that miss the
/// stage boundaries, blocks with dead tiles, and strides that take the cp.async path
/// (16-byte rows) and the element path, against the f64 reference; 16-bit products are
/// exact in f32, so 16-bit inputs and 3xTF32 meet the f32 tolerance.
#[test]
fn emulated_accumulate_block_kernels() {
    use accumulate::*;
    use half::{bf16, f16};
    use thor_kernels::cuda::accumulate::{AccumulateKernel, AccumulateMode};
    let _g = lock();
    let blocks = AccumulateKernel::Blocks;
    for b in [64usize, 128] {
        let dims = [1, b / 2 + 3, b - 1, b, b + 1, 3 * b + 5];
        let rows = [7usize, 1000, 1, 33, 300, 129];
        let set = FactorSet::new(b, &dims).unwrap();
        // Even factors: rows 16-byte aligned for every type; odd ones: not.
        let ld = |f: usize, d: usize| {
            if f % 2 == 0 {
                d.next_multiple_of(8)
            } else {
                d + 3
            }
        };
        let init = init_blocks(&set, 21);
        let fresh = poisoned(set.buffer_len());
        let seed = 1000 + b as u64;
        for (k, (mode, tol)) in [
            (AccumulateMode::F32, 1e-5),
            (AccumulateMode::TensorCore, 5e-4),
        ]
        .into_iter()
        .enumerate()
        {
            let (beta, start) = if k == 0 { (0.0, &fresh) } else { (0.95, &init) };
            let inputs = make_inputs_ld::<f32>(&set, &rows, beta, seed + k as u64, ld);
            let out = run_acc_with(&set, &inputs, start, mode, k as i32, None, blocks);
            let want = reference_set(&set, &inputs, start);
            check(
                &set,
                &out,
                &want,
                tol,
                &format!("blocks f32 {mode:?} b={b}"),
            );
            // The plan's tile-kernel fallback on the same slots (for inputs off the fast
            // path): the same statistics.
            let plan = thor_kernels::cuda::accumulate::AccumulatePlan::with_kernel(
                &set,
                &rows,
                thor_kernels::DType::F32,
                mode,
                132,
                blocks,
            )
            .unwrap();
            assert!(!plan.fallback_items().is_empty());
            let out = run_acc_plan(&plan, &inputs, start, 1, None, true);
            check(
                &set,
                &out,
                &want,
                tol,
                &format!("fallback f32 {mode:?} b={b}"),
            );
        }
        for (k, mode) in [AccumulateMode::TensorCore, AccumulateMode::F32]
            .into_iter()
            .enumerate()
        {
            let inputs = make_inputs_ld::<f16>(&set, &rows, 0.95, seed + 10 + k as u64, ld);
            let out = run_acc_with(&set, &inputs, &init, mode, 2, None, blocks);
            let want = reference_set(&set, &inputs, &init);
            check(
                &set,
                &out,
                &want,
                1e-5,
                &format!("blocks f16 {mode:?} b={b}"),
            );
            let inputs = make_inputs_ld::<bf16>(&set, &rows, 0.0, seed + 20 + k as u64, ld);
            let out = run_acc_with(&set, &inputs, &fresh, mode, 3, None, blocks);
            let want = reference_set(&set, &inputs, &fresh);
            check(
                &set,
                &out,
                &want,
                1e-5,
                &format!("blocks bf16 {mode:?} b={b}"),
            );
        }
    }
    // Other block sizes have no block kernels: refused, naming the kernel.
    let set = FactorSet::new(32, &[40]).unwrap();
    let err = thor_kernels::cuda::accumulate::AccumulatePlan::with_kernel(
        &set,
        &[10],
        thor_kernels::DType::F32,
        AccumulateMode::F32,
        132,
        blocks,
    )
    .unwrap_err();
    assert!(
        matches!(err, thor_kernels::Error::InvalidArgument { arg, .. } if arg == "kernel"),
        "{err}"
    );
}

/// Implicit im2col: every conv and position case of tests/common/conv_cases.rs, grouped
/// per block size with a matrix factor, in F32, TF32 and 16-bit tensor-core modes.
#[test]
fn emulated_accumulate_conv_patches() {
    use accumulate::*;
    use common::conv_cases::{conv_cases, position_cases};
    use half::bf16;
    use thor_kernels::cuda::accumulate::{AccumulateKernel, AccumulateMode};
    let _g = lock();
    let cases: Vec<_> = conv_cases().into_iter().chain(position_cases()).collect();
    for b in [32usize, 64] {
        let mine: Vec<_> = cases.iter().filter(|c| c.b == b).collect();
        let mut dims: Vec<usize> = mine.iter().map(|c| c.patches.dim()).collect();
        dims.push(b + 3);
        let set = FactorSet::new(b, &dims).unwrap();
        let make = |seed: u64| -> Vec<Input<f32>> {
            let mut v: Vec<Input<f32>> = mine
                .iter()
                .enumerate()
                .map(|(f, c)| Input {
                    x: c.tensor(&mut rng(seed + f as u64)),
                    rows: c.patches.rows(),
                    ld: 0,
                    patches: Some(c.patches),
                    alpha: 1.0 / c.patches.rows() as f32,
                    beta: 0.9,
                })
                .collect();
            v.push(Input {
                x: normal(&mut rng(seed + 99), 50 * (b + 3)),
                rows: 50,
                ld: b + 3,
                patches: None,
                alpha: 0.02,
                beta: 0.9,
            });
            v
        };
        let init = init_blocks(&set, 11);
        // The block kernels at b = 64 as well (16-bit products exact in f32).
        let kernels: &[AccumulateKernel] = if b == 64 {
            &[AccumulateKernel::Tiles, AccumulateKernel::Blocks]
        } else {
            &[AccumulateKernel::Tiles]
        };
        for &kernel in kernels {
            let tol16 = if kernel == AccumulateKernel::Blocks {
                1e-5
            } else {
                1e-2
            };
            for (mode, tol, order) in [
                (AccumulateMode::F32, 1e-5, 0),
                (AccumulateMode::TensorCore, 5e-4, 2),
            ] {
                let inputs = make(700 + b as u64);
                let out = run_acc_with(&set, &inputs, &init, mode, order, None, kernel);
                let want = reference_set(&set, &inputs, &init);
                check(
                    &set,
                    &out,
                    &want,
                    tol,
                    &format!("conv f32 {mode:?} {kernel:?} b={b}"),
                );
                let inputs16: Vec<Input<bf16>> = make(800 + b as u64)
                    .iter()
                    .map(|i| i.map(|&v| bf16::from_f32(v)))
                    .collect();
                let out = run_acc_with(&set, &inputs16, &init, mode, 1, None, kernel);
                let want = reference_set(&set, &inputs16, &init);
                check(
                    &set,
                    &out,
                    &want,
                    tol16,
                    &format!("conv bf16 {mode:?} {kernel:?} b={b}"),
                );
            }
            // f16 on tensor cores (its ones column is the f16 bit pattern of 1).
            let inputs16: Vec<Input<half::f16>> = make(850 + b as u64)
                .iter()
                .map(|i| i.map(|&v| half::f16::from_f32(v)))
                .collect();
            let out = run_acc_with(
                &set,
                &inputs16,
                &init,
                AccumulateMode::TensorCore,
                2,
                None,
                kernel,
            );
            let want = reference_set(&set, &inputs16, &init);
            check(
                &set,
                &out,
                &want,
                tol16,
                &format!("conv f16 {kernel:?} b={b}"),
            );
            // First statistics (no factor holds any yet): alpha is the entry's first alpha,
            // 1 / batch for patches normalised per sample (KFC's A), 1 / rows otherwise.
            let mut inputs = make(900 + b as u64);
            for (f, i) in inputs.iter_mut().enumerate() {
                if let Some(p) = i.patches.as_mut() {
                    p.per_sample = f % 2 == 0;
                    i.alpha = 1.0 / if p.per_sample { p.batch } else { p.rows() } as f32;
                } else {
                    i.alpha = 1.0 / i.rows as f32;
                }
                // The kernel replaces the inputs' own alpha and beta for a factor without
                // statistics; the reference takes the ones it should use.
                i.beta = 0.0;
            }
            let state = vec![0u8; set.len()];
            let out = run_acc_with(
                &set,
                &inputs,
                &init,
                AccumulateMode::F32,
                3,
                Some(&state),
                kernel,
            );
            let want = reference_set(&set, &inputs, &init);
            check(
                &set,
                &out,
                &want,
                1e-5,
                &format!("conv first statistics {kernel:?} b={b}"),
            );
        }
    }
}

#[test]
fn emulated_accumulate_many_rows_and_non_finite_inputs() {
    use accumulate::*;
    use thor_kernels::cuda::accumulate::{AccumulateKernel, AccumulateMode};
    let _g = lock();
    // 65537 rows: many row ranges summed in a fixed order.
    let set = FactorSet::new(32, &[33]).unwrap();
    let inputs = make_inputs::<f32>(&set, &[65537], 0.0, 77);
    let out = run_acc(
        &set,
        &inputs,
        &poisoned(set.buffer_len()),
        AccumulateMode::F32,
        0,
    );
    let want = reference_set(&set, &inputs, &poisoned(set.buffer_len()));
    check(&set, &out, &want, 1e-5, "65537 rows");
    // A NaN in factor 1 and an Inf in factor 2: both reported and left as they were; the
    // others updated.
    let set = FactorSet::new(64, &[70, 64, 100, 5]).unwrap();
    let kernels = [AccumulateKernel::Tiles, AccumulateKernel::Blocks];
    for (mode, kernel) in [AccumulateMode::F32, AccumulateMode::TensorCore]
        .into_iter()
        .flat_map(|m| kernels.map(|k| (m, k)))
    {
        let mut inputs = make_inputs::<f32>(&set, &[300, 600, 40, 9], 0.95, 88);
        let (ld1, ld2) = (inputs[1].ld, inputs[2].ld);
        inputs[1].x[599 * ld1 + 17] = f32::NAN;
        inputs[2].x[3 * ld2 + 99] = f32::INFINITY;
        let init = init_blocks(&set, 3);
        let out = run_acc_with(&set, &inputs, &init, mode, 2, None, kernel);
        assert_eq!(out.status, vec![0, 1, 1, 0], "{mode:?} {kernel:?}");
        let want = reference_set(&set, &inputs, &init);
        for (f, e) in set.entries().iter().enumerate() {
            let range = e.offset()..e.offset() + e.layout.buffer_len();
            if f == 1 || f == 2 {
                assert!(
                    out.blocks[range.clone()]
                        .iter()
                        .zip(&init[range])
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{mode:?} {kernel:?}: factor {f} changed"
                );
            } else {
                let tol = if mode == AccumulateMode::F32 {
                    1e-5
                } else {
                    5e-4
                };
                assert!(rel_err(&out.blocks[range.clone()], &want[range]) < tol);
            }
        }
        assert!(out.factor_traces.iter().all(|t| t.is_finite()));
    }
}

mod apply {
    use super::*;
    use thor_kernels::cuda::apply::{ApplyKernel, ApplyLayer, ApplyPlan, LayerBuffers};
    use thor_kernels::Element;

    /// Runs the emulated apply of `layers` (grads of type E), out of place or in place,
    /// with every kernel for the block size (each on fresh buffers; all must give the
    /// standard kernel's bits); returns the outputs.
    pub fn run_apply<E: Element + bytemuck::Pod>(
        set: &FactorSet,
        inv: &[f32],
        layers: &[ApplyLayer],
        grads: &[Vec<E>],
        scales: &[f32],
        in_place: bool,
        order: i32,
    ) -> Result<Vec<Vec<f32>>, String> {
        let mut first: Option<Vec<Vec<f32>>> = None;
        for k in ApplyKernel::ALL {
            if !k.supports(set.block()) {
                continue;
            }
            let outs = run_apply_with(set, inv, layers, grads, scales, in_place, order, k)?;
            match &first {
                None => first = Some(outs),
                Some(f) => {
                    for (l, (a, b)) in outs.iter().zip(f).enumerate() {
                        assert!(
                            a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits()),
                            "{k:?}: layer {l} differs from the standard kernel"
                        );
                    }
                }
            }
        }
        Ok(first.unwrap())
    }

    /// [`run_apply`] with one kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn run_apply_with<E: Element + bytemuck::Pod>(
        set: &FactorSet,
        inv: &[f32],
        layers: &[ApplyLayer],
        grads: &[Vec<E>],
        scales: &[f32],
        in_place: bool,
        order: i32,
        kernel: ApplyKernel,
    ) -> Result<Vec<Vec<f32>>, String> {
        let plan =
            ApplyPlan::with_kernel(set, layers, E::DTYPE, kernel).map_err(|e| e.to_string())?;
        let mut dinv = Guarded::new(inv);
        let mut dg: Vec<Guarded<E>> = grads.iter().map(|g| Guarded::new(g)).collect();
        let mut douts: Vec<Guarded<f32>> = grads
            .iter()
            .map(|g| Guarded::new(&poisoned(g.len())))
            .collect();
        let bufs: Vec<LayerBuffers> = dg
            .iter_mut()
            .zip(douts.iter_mut())
            .zip(scales)
            .map(|((g, o), &scale)| {
                let gp = g.ptr();
                LayerBuffers {
                    grad: gp,
                    out: if in_place { gp } else { o.ptr() },
                    scale,
                }
            })
            .collect();
        let table = plan
            .layer_table(dinv.ptr(), &bufs)
            .map_err(|e| e.to_string())?;
        let mut dt = Guarded::new(&table);
        let mut di = Guarded::new(plan.items());
        let l = plan.launch(dt.ptr(), di.ptr()).unwrap();
        run(&[l], order)?;
        dinv.check("inverses");
        for g in &dg {
            g.check("grad");
        }
        Ok(if in_place {
            dg.iter()
                .map(|g| {
                    let v = g.get();
                    // SAFETY-free reinterpretation: in place only with f32 gradients.
                    v.iter().map(|x| x.to_f32()).collect()
                })
                .collect()
        } else {
            douts
                .iter()
                .map(|o| {
                    o.check("out");
                    o.get()
                })
                .collect()
        })
    }
}

#[test]
fn emulated_apply_every_block_size_odd_shapes() {
    use apply::*;
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        let (set, layers) = apply_cases::odd_layers(b, &apply_cases::odd_shapes(b)[..4]);
        let inv = apply_cases::sym_blocks(&set, b as u64);
        let mut r = rng(b as u64 + 1);
        let grads: Vec<Vec<f32>> = layers
            .iter()
            .map(|l| normal(&mut r, l.out_dim * l.in_dim))
            .collect();
        let scales: Vec<f32> = (0..layers.len()).map(|l| 1.0 / (1 + l) as f32).collect();
        let order = ORDERS[(b / 32) % ORDERS.len()];
        for in_place in [false, b <= 128] {
            let outs = run_apply(&set, &inv, &layers, &grads, &scales, in_place, order).unwrap();
            for (l, lay) in layers.iter().enumerate() {
                let want = apply_cases::reference_layer(&set, &inv, lay, &grads[l], scales[l]);
                let err = rel_err(&outs[l], &want);
                assert!(err < 1e-5, "b={b} layer {l} in_place={in_place}: {err:e}");
            }
        }
        if b == 256 {
            let e = run_apply(&set, &inv, &layers, &grads, &scales, true, 0).unwrap_err();
            assert!(e.contains("in place"), "{e}");
        }
    }
}

#[test]
fn emulated_apply_bf16_gradients() {
    use apply::*;
    use half::bf16;
    let _g = lock();
    for b in [32usize, 128] {
        let (set, layers) = apply_cases::odd_layers(b, &apply_cases::odd_shapes(b)[..4]);
        let inv = apply_cases::sym_blocks(&set, 7);
        let mut r = rng(3);
        let grads: Vec<Vec<bf16>> = layers
            .iter()
            .map(|l| {
                normal(&mut r, l.out_dim * l.in_dim)
                    .into_iter()
                    .map(bf16::from_f32)
                    .collect()
            })
            .collect();
        let scales = vec![0.5f32; layers.len()];
        let outs = run_apply(&set, &inv, &layers, &grads, &scales, false, 2).unwrap();
        for (l, lay) in layers.iter().enumerate() {
            let want = apply_cases::reference_layer(&set, &inv, lay, &grads[l], 0.5);
            assert!(rel_err(&outs[l], &want) < 1e-5, "b={b} layer {l}");
        }
    }
}

/// THOR's whole device step on the emulator: the buffers `DeviceThorStep` keeps, guarded,
/// and its six launches built from the crate's own plans (grouped accumulation with the
/// rule's factor state, trace rule with counters, masked inversion, tally).
struct EmuStep {
    set: FactorSet,
    layers: Vec<RuleLayer>,
    plan: thor_kernels::cuda::accumulate::AccumulatePlan,
    stats: Guarded<f32>,
    inv: Guarded<f32>,
    items: Guarded<i32>,
    finals: Guarded<i32>,
    ws: Guarded<f32>,
    flags: Guarded<i32>,
    status: Guarded<i32>,
    desc: Guarded<i32>,
    bt: Guarded<f32>,
    ft: Guarded<f32>,
    table: Guarded<i32>,
    prev: Guarded<f64>,
    state: Guarded<u8>,
    fstate: Guarded<u8>,
    counters: Guarded<u64>,
    mask: Guarded<u8>,
    decisions: Guarded<i32>,
    history: Guarded<i32>,
    step: Guarded<u64>,
    info: Guarded<i32>,
    used: Guarded<f32>,
    damping_at: Guarded<f32>,
    block_damping: Guarded<f32>,
}

impl EmuStep {
    /// The step for the layers `RuleLayer::pairs(set)` (A and G of a layer are partners),
    /// factor `f` fed `rows[f]` rows; statistics and inverses start at the identity.
    fn new(set: FactorSet, rows: &[usize]) -> Self {
        use thor_kernels::cuda::accumulate::{AccumulateMode, AccumulatePlan};
        let layers = RuleLayer::pairs(&set);
        let mut plan =
            AccumulatePlan::new(&set, rows, thor_kernels::DType::F32, AccumulateMode::F32, 8)
                .unwrap();
        let partners: Vec<Option<usize>> = (0..set.len()).map(|f| Some(f ^ 1)).collect();
        plan.set_partners(&partners).unwrap();
        let b = set.block();
        let mut eye = vec![0.0f32; set.buffer_len()];
        for k in 0..set.total_blocks() {
            for i in 0..b {
                eye[k * b * b + i * b + i] = 1.0;
            }
        }
        let (nl, nb, nf) = (layers.len(), set.total_blocks(), set.len());
        EmuStep {
            stats: Guarded::new(&eye),
            inv: Guarded::new(&eye),
            items: Guarded::new(plan.items()),
            finals: Guarded::new(plan.finals()),
            ws: Guarded::new(&poisoned(plan.workspace_len())),
            flags: Guarded::new(&vec![0i32; plan.slots()]),
            status: Guarded::new(&vec![-1i32; nf]),
            desc: Guarded::new(&set.trace_table()),
            bt: Guarded::new(&poisoned(nb)),
            ft: Guarded::new(&poisoned(nf)),
            table: Guarded::new(&RuleLayer::table(&set, &layers).unwrap()),
            prev: Guarded::new(&vec![0.0f64; nl]),
            state: Guarded::new(&vec![0u8; nl]),
            fstate: Guarded::new(&vec![0u8; nf]),
            counters: Guarded::new(&vec![0u64; 6 * nl]),
            mask: Guarded::new(&vec![0u8; nb]),
            decisions: Guarded::new(&vec![0i32; nl]),
            history: Guarded::new(&vec![-1i32; 8 * nl]),
            step: Guarded::new(&[0u64]),
            info: Guarded::new(&vec![0i32; nb]),
            used: Guarded::new(&vec![0f32; nb]),
            damping_at: Guarded::new(&[f32::NAN]),
            block_damping: Guarded::new(&poisoned(nb)),
            set,
            layers,
            plan,
        }
    }

    /// One step on `xs` (one dense `rows x d` input per factor) with statistics decay
    /// `decay`, `thresholds` and `damping`, under thread order `order`.
    fn run(
        &mut self,
        xs: &[Vec<f32>],
        decay: f32,
        thresholds: thor_kernels::rule::Thresholds,
        damping: f32,
        order: i32,
    ) {
        let mut gx: Vec<Guarded<f32>> = xs.iter().map(|x| Guarded::new(x)).collect();
        let (_factors, launches) = self.launches(&mut gx, decay, thresholds, damping, None);
        run(&launches, order).unwrap();
    }

    /// The step's six launches on the inputs `gx`; on a rank of a distributed step
    /// (`local`: its local products buffer and the inversion's mask), the accumulation's
    /// raw products (alpha 1, beta 0, no factor state) go to `local` and the inversion reads
    /// the owned mask. Returns the factor table with the launches.
    fn launches(
        &mut self,
        gx: &mut [Guarded<f32>],
        decay: f32,
        thresholds: thor_kernels::rule::Thresholds,
        damping: f32,
        local: Option<(u64, u64)>,
    ) -> (Guarded<u64>, Vec<raw::LaunchPlan>) {
        use thor_kernels::cuda::accumulate::{AccumulateBuffers, FactorInput};
        let rows = self.plan.rows().to_vec();
        let fi: Vec<FactorInput> = gx
            .iter_mut()
            .zip(self.set.entries())
            .zip(&rows)
            .map(|((g, e), &n)| FactorInput {
                x: g.ptr(),
                layout: thor_kernels::InputLayout::matrix(n, e.layout.dim()),
                alpha: if local.is_some() {
                    1.0
                } else {
                    (1.0 - decay) / n as f32
                },
                beta: if local.is_some() { 0.0 } else { decay },
            })
            .collect();
        let mut factors = Guarded::new(&self.plan.factor_table(&fi).unwrap());
        let mut launches = self
            .plan
            .launches(&AccumulateBuffers {
                factors: factors.ptr(),
                items: self.items.ptr(),
                finals: self.finals.ptr(),
                workspace: self.ws.ptr(),
                flags: self.flags.ptr(),
                blocks: local.map_or(self.stats.ptr(), |l| l.0),
                status: self.status.ptr(),
                trace_desc: self.desc.ptr(),
                block_traces: self.bt.ptr(),
                factor_traces: self.ft.ptr(),
                factor_state: if local.is_some() {
                    0
                } else {
                    self.fstate.ptr()
                },
            })
            .unwrap();
        let nl = self.layers.len();
        // As the step does: the damping from device memory (the scalar argument is a decoy
        // the kernel must not use), its square root per block for the inversion.
        self.damping_at.set(&[damping]);
        launches.push(
            raw::plan_trace_rule_f32(&raw::TraceRuleArgs {
                factor_traces: self.ft.ptr(),
                factor_status: self.status.ptr(),
                layers: self.table.ptr(),
                n_layers: nl,
                damping: 0.0,
                thresholds,
                prev: self.prev.ptr(),
                state: self.state.ptr(),
                mask: self.mask.ptr(),
                decisions: self.decisions.ptr(),
                history: self.history.ptr(),
                history_capacity: 8,
                step: self.step.ptr(),
                factor_state: self.fstate.ptr(),
                counters: self.counters.ptr(),
                damping_at: self.damping_at.ptr(),
                block_damping: self.block_damping.ptr(),
            })
            .unwrap(),
        );
        launches.push(
            raw::plan_invert_chol_f32(
                self.stats.ptr(),
                self.inv.ptr(),
                &InvertArgs {
                    b: self.set.block(),
                    blocks: self.set.total_blocks(),
                    damping: self.block_damping.ptr(),
                    damping_all: 0.0,
                    mask: local.map_or(self.mask.ptr(), |l| l.1),
                    policy: FailurePolicy::retry(),
                    info: self.info.ptr(),
                    damping_used: self.used.ptr(),
                },
            )
            .unwrap(),
        );
        launches.push(
            raw::plan_rule_tally_f32(
                self.table.ptr(),
                nl,
                self.decisions.ptr(),
                self.info.ptr(),
                self.counters.ptr(),
            )
            .unwrap(),
        );
        assert_eq!(launches.len(), 6, "the device step's launches");
        (factors, launches)
    }
}

/// The device factor step run by the emulator (grouped accumulation with per-factor
/// status, rule reading the status, masked inversion), with a NaN in one layer's input on
/// the second step: that layer is skipped (decision 4), keeps its statistics and inverses;
/// the others update.
#[test]
fn emulated_factor_step_chain_skips_a_layer_with_nan_input() {
    use accumulate::*;
    let _g = lock();
    let b = 32;
    // Two layers: (A 40, G 10), (A 33, G 5).
    let dims = [40usize, 10, 33, 5];
    let rows = [64usize, 64, 50, 50];
    let set = FactorSet::new(b, &dims).unwrap();
    let mut st = EmuStep::new(set.clone(), &rows);
    let layers = st.layers.clone();
    let damping = 0.01f32;
    let mut kept_stats = Vec::new();
    let mut kept_inv = Vec::new();
    for k in 0..2u64 {
        let mut inputs = make_inputs::<f32>(&set, &rows, 0.0, 100 + k);
        if k == 1 {
            inputs[3].x[7] = f32::NAN; // layer 1's G input
            kept_stats = st.stats.get();
            kept_inv = st.inv.get();
        }
        let xs: Vec<Vec<f32>> = inputs.iter().map(|i| i.x.clone()).collect();
        st.run(
            &xs,
            0.0,
            thor_kernels::rule::Thresholds::THOR_STOP,
            damping,
            k as i32,
        );
        let (s, iv) = (st.stats.get(), st.inv.get());
        if k == 0 {
            assert_eq!(st.status.get(), vec![0; 4]);
            assert_eq!(
                st.decisions.get(),
                vec![0, 0],
                "first step updates every layer"
            );
        } else {
            assert_eq!(st.status.get(), vec![0, 0, 2, 1]);
            assert_eq!(st.decisions.get(), vec![0, 4], "layer 1 skipped");
            // Layer 1's blocks (factors 2 and 3) kept their statistics and inverses.
            let l1 =
                layers[1].first_block * b * b..(layers[1].first_block + layers[1].blocks) * b * b;
            assert!(s[l1.clone()]
                .iter()
                .zip(&kept_stats[l1.clone()])
                .all(|(a, c)| a.to_bits() == c.to_bits()));
            assert!(iv[l1.clone()]
                .iter()
                .zip(&kept_inv[l1])
                .all(|(a, c)| a.to_bits() == c.to_bits()));
            assert_eq!(
                st.info.get()[layers[1].first_block..],
                vec![-1; layers[1].blocks]
            );
        }
        // Updated blocks: inverses of the new statistics with sqrt(damping).
        let lam = (damping as f64).sqrt();
        for j in 0..layers[0].blocks {
            let res = block_residual(&s, &iv, b, j, lam);
            assert!(res < 1e-4, "step {k} block {j}: {res:e}");
        }
    }
}

/// The emulator as an [`invert_cases::Inverter`], under one thread order, running one
/// kernel.
struct EmuInverter(i32, raw::InvertKernel);

impl invert_cases::Inverter for EmuInverter {
    fn invert(
        &self,
        b: usize,
        input: &[f32],
        c: invert_cases::InvertCall<'_>,
    ) -> (Vec<f32>, Vec<i32>, Vec<f32>) {
        emu_invert(
            b,
            input,
            Inv {
                out_init: c.out_init,
                damping: c.damping,
                damping_all: c.damping_all,
                mask: c.mask,
                policy: c.policy,
                order: self.0,
                kernel: self.1,
            },
        )
    }
}

/// The kernels the inversion cases run directly for block size `b` (the two-per-SM one
/// runs beside the standard one, bit for bit).
fn invert_kernels(b: usize) -> impl Iterator<Item = raw::InvertKernel> {
    raw::InvertKernel::ALL
        .into_iter()
        .filter(move |k| k.supports(b) && *k != raw::InvertKernel::TwoPerSm)
}

#[test]
fn emulated_invert_choice_accepts_every_kernel_on_its_trial_blocks() {
    // The run-time choice checks each kernel against the standard one on synthetic blocks
    // and passes over any that disagrees: every kernel must agree there within the
    // tolerance the choice uses, or it could never be chosen. The timings are made up
    // (every other kernel "faster"), so each is chosen when it agrees.
    use thor_kernels::choice::{ChoiceKey, ChoiceSettings, Chooser, Trial};
    use thor_kernels::cuda::choose::{invert_trial_blocks, INVERT_TOLERANCE};
    let _g = lock();
    for b in [32usize, 64, 128] {
        let blocks = 2;
        let input = invert_trial_blocks(b, blocks);
        for other in raw::InvertKernel::ALL.into_iter().skip(1) {
            if !other.supports(b) {
                continue;
            }
            let mut chooser = Chooser::new(ChoiceSettings::default(), "emulated");
            let key = ChoiceKey {
                op: "invert".into(),
                card: "emulator".into(),
                class: format!("b={b} blocks={blocks}"),
                dtype: "f32".into(),
            };
            let names = ["standard", other.name()];
            let d = chooser
                .choose(&key, &names, INVERT_TOLERANCE, |v| {
                    let k = raw::InvertKernel::ALL
                        .into_iter()
                        .find(|k| k.name() == v)
                        .unwrap();
                    let (out, info, _) = emu_invert(
                        b,
                        &input,
                        Inv {
                            out_init: Some(&poisoned(input.len())),
                            damping_all: 1e-3,
                            kernel: k,
                            ..Inv::default()
                        },
                    );
                    assert_eq!(info, vec![0; blocks], "{v}");
                    Ok(Trial {
                        seconds: if k == raw::InvertKernel::Standard {
                            2.0
                        } else {
                            1.0
                        },
                        parts: out.chunks(b * b).map(<[f32]>::to_vec).collect(),
                    })
                })
                .unwrap();
            for t in &d.trials {
                assert!(
                    t.rejected.is_none(),
                    "b={b}: {} {:?}",
                    t.variant,
                    t.rejected
                );
            }
            assert_eq!(d.variant, other.name(), "b={b}");
        }
    }
}

#[test]
fn emulated_invert_reports_bad_blocks_in_place_and_out_of_place() {
    let _g = lock();
    for b in [32usize, 64] {
        for order in [0, 3] {
            for kernel in invert_kernels(b) {
                invert_cases::bad_blocks(&EmuInverter(order, kernel), b);
            }
        }
    }
}

#[test]
fn emulated_invert_late_failures_and_retries_at_every_size() {
    // Failures past the first panels of the blocked kernel: the standard and the blocked
    // kernels (each run beside the other) report the same pivots, retries and damping.
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        for kernel in invert_kernels(b) {
            invert_cases::late_failures(&EmuInverter(b as i32 % 5, kernel), b);
        }
    }
}

#[test]
fn emulated_invert_mask_retry_and_per_block_damping() {
    let _g = lock();
    for kernel in invert_kernels(32) {
        invert_cases::mask_retry_damping(&EmuInverter(2, kernel), 32);
    }
}

#[test]
fn emulated_invert_residual_bound_up_to_cond_1e7() {
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        for kernel in invert_kernels(b) {
            invert_cases::residual_bound(&EmuInverter(1, kernel), b, "emulated");
        }
    }
}

#[test]
fn emulated_device_step_matches_the_optimizer_over_several_steps() {
    // THOR's whole device step (grouped accumulation with the rule's factor state, trace
    // rule with counters, masked inversion, tally), run by the emulator step after step,
    // against `Thor` on the CPU fed the same batches (tests/common/step_cases.rs).
    use thor_kernels::rule::Decision;
    let _g = lock();
    let sc = step_cases::StepScenario::new();
    let set = sc.set();
    let mut st = EmuStep::new(set.clone(), &vec![sc.rows; set.len()]);
    let (mut thor, ids) = sc.thor();
    for k in 0..step_cases::STEPS {
        let cpu = sc.observe(&mut thor, &ids, k);
        st.run(
            &sc.batch(k),
            sc.decay,
            sc.thresholds,
            sc.damping,
            ORDERS[k % ORDERS.len()],
        );
        sc.check(
            k,
            &thor,
            &ids,
            &st.decisions.get(),
            &st.counters.get(),
            &st.stats.get(),
            &st.inv.get(),
            &st.status.get(),
        );
        // The rule keeps the per-factor state the accumulation reads: a layer's factors are
        // marked frozen from the step it freezes.
        let fs = st.fstate.get();
        for (l, d) in cpu.iter().enumerate() {
            let frozen = matches!(d, Decision::Freeze | Decision::Frozen);
            assert_eq!(
                fs[2 * l] & 2 != 0,
                frozen,
                "layer {l} frozen flag at step {k}"
            );
            assert_eq!(fs[2 * l + 1], fs[2 * l], "layer {l}: A and G share a state");
        }
    }
}

/// cp.async as the emulator models it: a copy lands at its group's wait, so a two-stage
/// pipeline that waits before each read reads every tile (from another thread's copy, after
/// the barrier), one that leaves the wait out reads poison, and one that reads the stage
/// still in flight (its group not waited for) reads poison too, under every thread order.
#[test]
fn emulated_cp_async_lands_at_the_wait() {
    use common::probe_cases::*;
    let _g = lock();
    let input = cp_input();
    let want = cp_expected(&input);
    let mut inp = Guarded::new(&input);
    for wait in [1, 0, 2] {
        for order in ORDERS {
            let mut out = Guarded::new(&vec![-1.0f32; input.len()]);
            run(&[cp_plan(inp.ptr(), out.ptr(), wait)], order).unwrap();
            out.check("cp.async probe output");
            for (k, v) in out.get().into_iter().enumerate() {
                let t = k / CP_TILE;
                if wait == 1 {
                    assert_eq!(v, want[k], "float {k} order {order}");
                } else if wait == 2 && t + 1 == CP_TILES {
                    // The last tile's "stage in flight" holds tile t - 1, long landed.
                    assert_eq!(v, want[k - CP_TILE], "float {k} order {order}");
                } else {
                    assert!(
                        v.is_nan(),
                        "wait mode {wait}, yet float {k} = {v} (order {order})"
                    );
                }
            }
        }
    }
}

/// ldmatrix as the emulator models it, against the PTX ISA's fragment layouts written out.
#[test]
fn emulated_ldmatrix_gives_the_fragment_layouts() {
    use common::probe_cases::*;
    let _g = lock();
    let tile = ld_tile();
    let mut t = Guarded::new(&tile);
    for trans in [false, true] {
        for order in ORDERS {
            let mut out = Guarded::new(&vec![0u32; 128]);
            run(&[ld_plan(t.ptr(), out.ptr(), trans)], order).unwrap();
            out.check("ldmatrix probe output");
            assert_eq!(
                out.get(),
                ld_expected(&tile, trans),
                "trans {trans} order {order}"
            );
        }
    }
}

/// One rank's buffers of the distributed device step (src/cuda/dist.rs) beside its
/// [`EmuStep`].
struct EmuDist {
    layout: thor_kernels::cuda::dist::DistLayout,
    local: Guarded<f32>,
    send: Guarded<f32>,
    recv: Guarded<f32>,
    meta: Guarded<f64>,
    gather_send: Guarded<f32>,
    gather_recv: Guarded<f32>,
    send_list: Guarded<i32>,
    own_list: Guarded<i32>,
    blocks_tab: Guarded<i32>,
    factors_tab: Guarded<i32>,
    samples: Guarded<f64>,
    own_mask: Guarded<u8>,
    fault: Guarded<i32>,
    upd_own: Guarded<i32>,
    upd_all: Guarded<i32>,
}

impl EmuDist {
    fn new(st: &EmuStep, plan: &thor_kernels::dist::OwnershipPlan, rank: usize) -> Self {
        let set = &st.set;
        let partners: Vec<Option<usize>> = (0..set.len()).map(|f| Some(f ^ 1)).collect();
        let l = thor_kernels::cuda::dist::DistLayout::new(set, plan, rank, &partners).unwrap();
        let samples: Vec<f64> = st.plan.rows().iter().map(|&n| n as f64).collect();
        EmuDist {
            local: Guarded::new(&poisoned(set.buffer_len())),
            send: Guarded::new(&poisoned(l.send_len())),
            recv: Guarded::new(&poisoned(l.recv_len())),
            meta: Guarded::new(&vec![f64::NAN; l.meta_len()]),
            gather_send: Guarded::new(&poisoned(l.gather_send_len())),
            gather_recv: Guarded::new(&poisoned(l.gather_recv_len())),
            send_list: Guarded::new(l.send_list()),
            own_list: Guarded::new(l.own_list()),
            blocks_tab: Guarded::new(l.blocks_table()),
            factors_tab: Guarded::new(l.factors_table()),
            samples: Guarded::new(&samples),
            own_mask: Guarded::new(&vec![7u8; set.total_blocks()]),
            fault: Guarded::new(&[0]),
            upd_own: Guarded::new(&vec![-7; l.per_rank()]),
            upd_all: Guarded::new(&vec![-7; l.send_list().len()]),
            layout: l,
        }
    }

    fn buffers(&mut self, st: &mut EmuStep) -> thor_kernels::cuda::dist::DistBuffers {
        thor_kernels::cuda::dist::DistBuffers {
            local: self.local.ptr(),
            send: self.send.ptr(),
            recv: self.recv.ptr(),
            meta: self.meta.ptr(),
            gather_send: self.gather_send.ptr(),
            gather_recv: self.gather_recv.ptr(),
            send_list: self.send_list.ptr(),
            own_list: self.own_list.ptr(),
            gather_own: self.own_list.ptr(),
            gather_all: self.send_list.ptr(),
            blocks_tab: self.blocks_tab.ptr(),
            factors_tab: self.factors_tab.ptr(),
            samples: self.samples.ptr(),
            own_mask: self.own_mask.ptr(),
            fault: self.fault.ptr(),
            stats: st.stats.ptr(),
            inverses: st.inv.ptr(),
            info: st.info.ptr(),
            status: st.status.ptr(),
            factor_state: st.fstate.ptr(),
            mask: st.mask.ptr(),
            block_traces: st.bt.ptr(),
            factor_traces: st.ft.ptr(),
            damping_at: st.damping_at.ptr(),
            step: st.step.ptr(),
        }
    }
}

/// The collectives of a group of emulated ranks, on the host: segment `r` of every rank's
/// `send` summed (in rank order) into rank `r`'s `recv`.
fn emu_reduce_scatter(ranks: &mut [(EmuStep, EmuDist)]) {
    let sends: Vec<Vec<f32>> = ranks.iter().map(|(_, d)| d.send.get()).collect();
    for (r, (_, d)) in ranks.iter_mut().enumerate() {
        let n = d.layout.recv_len();
        let sum: Vec<f32> = (0..n)
            .map(|i| sends.iter().fold(0.0f32, |a, s| a + s[r * n + i]))
            .collect();
        d.recv.set(&sum);
    }
}

fn emu_all_reduce(ranks: &mut [(EmuStep, EmuDist)]) {
    let metas: Vec<Vec<f64>> = ranks.iter().map(|(_, d)| d.meta.get()).collect();
    let sum: Vec<f64> = (0..metas[0].len())
        .map(|i| metas.iter().fold(0.0, |a, m| a + m[i]))
        .collect();
    for (_, d) in ranks.iter_mut() {
        d.meta.set(&sum);
    }
}

/// Every rank's first `n` elements of `gather_send` into the first `world * n` of every
/// rank's `gather_recv` (the rest keeps what it held).
fn emu_all_gather(ranks: &mut [(EmuStep, EmuDist)], n: usize) {
    let all: Vec<f32> = ranks
        .iter()
        .flat_map(|(_, d)| d.gather_send.get()[..n].to_vec())
        .collect();
    for (_, d) in ranks.iter_mut() {
        let mut recv = d.gather_recv.get();
        recv[..all.len()].copy_from_slice(&all);
        d.gather_recv.set(&recv);
    }
}

/// One distributed step of every emulated rank on its rows of `xs`: the launches of
/// `DistLayout::step_plans` in the phases src/cuda/step.rs runs, the collectives between
/// them emulated on the host (with `updated_only`, the all-gather of the updated inverses
/// only, listed from the rule's mask); then the statistics gathered, so that every rank
/// holds the whole state. Returns the blocks per rank of the inverses' all-gather (0: none).
fn emu_dist_step(
    ranks: &mut [(EmuStep, EmuDist)],
    xs: &[Vec<f32>],
    splits: &[usize],
    sc: &step_cases::StepScenario,
    order: i32,
    updated_only: bool,
) -> usize {
    use thor_kernels::cuda::dist::DistLayout as P;
    let mut ctx = Vec::new();
    for (r, (st, d)) in ranks.iter_mut().enumerate() {
        let mut gx: Vec<Guarded<f32>> = xs
            .iter()
            .zip(st.set.entries())
            .map(|(x, e)| {
                let dim = e.layout.dim();
                Guarded::new(&x[splits[r] * dim..splits[r + 1] * dim])
            })
            .collect();
        let local = (d.local.ptr(), d.own_mask.ptr());
        let (t, launches) = st.launches(&mut gx, sc.decay, sc.thresholds, sc.damping, Some(local));
        let mut buf = d.buffers(st);
        if updated_only {
            // As the step: the gather's lists are the updated ones from the start (still
            // the last step's, or poison, until the rule's mask of this step is read).
            buf.gather_own = d.upd_own.ptr();
            buf.gather_all = d.upd_all.ptr();
        }
        let per = d.layout.per_rank();
        let plans = d
            .layout
            .step_plans(&buf, sc.decay, launches.clone(), per)
            .unwrap();
        run(&plans[..=P::PACK_SUMS], order).unwrap();
        ctx.push((gx, t, launches, buf, plans));
    }
    emu_reduce_scatter(ranks);
    for (_, _, _, _, plans) in &ctx {
        run(&plans[P::META..=P::META], order).unwrap();
    }
    emu_all_reduce(ranks);
    let mut blocks = ranks[0].1.layout.per_rank();
    for ((st, d), (_, _, launches, buf, plans)) in ranks.iter_mut().zip(&mut ctx) {
        if !updated_only {
            run(&plans[P::META + 1..=P::PACK_INVERSES], order).unwrap();
            continue;
        }
        run(&plans[P::META + 1..=P::RULE], order).unwrap();
        let (mut own, mut all) = (d.upd_own.get(), d.upd_all.get());
        blocks = d
            .layout
            .updated_lists(&st.mask.get(), &mut own, &mut all)
            .unwrap();
        d.upd_own.set(&own);
        d.upd_all.set(&all);
        *plans = d
            .layout
            .step_plans(buf, sc.decay, launches.clone(), blocks.max(1))
            .unwrap();
        if blocks == 0 {
            run(&plans[P::RULE + 1..P::PACK_INVERSES], order).unwrap();
            run(&plans[P::UNPACK + 1..], order).unwrap();
        } else {
            run(&plans[P::RULE + 1..=P::PACK_INVERSES], order).unwrap();
        }
    }
    if blocks > 0 {
        let n = ranks[0].1.layout.gather_len(blocks);
        emu_all_gather(ranks, n);
        for (_, _, _, _, plans) in &ctx {
            run(&plans[P::UNPACK..], order).unwrap();
        }
    }
    // The statistics' gather: every owned block.
    for ((_, d), (_, _, _, buf, _)) in ranks.iter_mut().zip(&ctx) {
        run(&[d.layout.plan_pack_statistics(buf).unwrap()], order).unwrap();
    }
    let n = ranks[0].1.layout.gather_send_len();
    emu_all_gather(ranks, n);
    for ((_, d), (_, _, _, buf, _)) in ranks.iter_mut().zip(&ctx) {
        run(&[d.layout.plan_unpack_statistics(buf).unwrap()], order).unwrap();
        d.local.check("local");
        d.send.check("send");
        d.gather_recv.check("gather_recv");
    }
    blocks
}

#[test]
fn emulated_distributed_device_step_matches_the_optimizer_on_the_union() {
    // The distributed device step's kernels (pack, metadata, resolve, EMA, owned mask,
    // unpack) between host-emulated collectives, on 2, 3 and 5 ranks with uneven rows (at
    // 5 some rank owns fewer blocks than others: padded segments), against `Thor` on the
    // CPU fed the whole batch: the same decisions and counters on every rank, statistics
    // against the f64 reference, inverses within the DESIGN.md tolerances and identical on
    // every rank.
    let _g = lock();
    let sc = step_cases::StepScenario::new();
    let set = sc.set();
    for (world, splits, updated_only) in [
        (2usize, vec![0usize, 40, 64], false),
        (3, vec![0, 30, 50, 64], false),
        (5, vec![0, 1, 20, 33, 50, 64], false),
        (3, vec![0, 30, 50, 64], true),
    ] {
        let plan = thor_kernels::dist::OwnershipPlan::new(&set, world).unwrap();
        let mut ranks: Vec<(EmuStep, EmuDist)> = (0..world)
            .map(|r| {
                let rows = vec![splits[r + 1] - splits[r]; set.len()];
                let st = EmuStep::new(set.clone(), &rows);
                let d = EmuDist::new(&st, &plan, r);
                (st, d)
            })
            .collect();
        let (mut thor, ids) = sc.thor();
        let (mut saw_none, mut saw_some) = (false, false);
        for k in 0..step_cases::STEPS {
            sc.observe(&mut thor, &ids, k);
            for (st, _) in ranks.iter_mut() {
                st.damping_at.set(&[sc.damping]);
            }
            let blocks = emu_dist_step(
                &mut ranks,
                &sc.batch(k),
                &splits,
                &sc,
                ORDERS[k % ORDERS.len()],
                updated_only,
            );
            if updated_only {
                // The most updated blocks any rank owns: none when no layer updated.
                let l = &ranks[0].1.layout;
                let mask = ranks[0].0.mask.get();
                let want = (0..world)
                    .map(|r| {
                        l.send_list()[r * l.per_rank()..(r + 1) * l.per_rank()]
                            .iter()
                            .filter(|&&k| k >= 0 && mask[k as usize] != 0)
                            .count()
                    })
                    .max()
                    .unwrap();
                assert_eq!(blocks, want, "step {k}");
                saw_none |= blocks == 0;
                saw_some |= blocks > 0 && blocks < l.per_rank();
            }
            let inv0 = ranks[0].0.inv.get();
            for (r, (st, d)) in ranks.iter().enumerate() {
                sc.check(
                    k,
                    &thor,
                    &ids,
                    &st.decisions.get(),
                    &st.counters.get(),
                    &st.stats.get(),
                    &st.inv.get(),
                    &st.status.get(),
                );
                assert_eq!(d.fault.get(), vec![0], "world {world} rank {r}");
                // The traces the rule read: those of the statistics (padding counted in
                // the blocks' traces, not in the factors').
                let (stats, b) = (st.stats.get(), set.block());
                let (bt, ft) = (st.bt.get(), st.ft.get());
                for (f, e) in set.entries().iter().enumerate() {
                    let mut total = 0.0f64;
                    for j in 0..e.layout.blocks() {
                        let kb = e.first_block + j;
                        let diag = |n: usize| -> f64 {
                            (0..n).map(|i| stats[kb * b * b + i * b + i] as f64).sum()
                        };
                        let want = diag(b);
                        assert!(
                            (bt[kb] as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                            "world {world} rank {r} step {k}: block {kb}'s trace {} against {want}",
                            bt[kb]
                        );
                        total += diag(e.layout.valid(j));
                    }
                    assert!(
                        (ft[f] as f64 - total).abs() <= 1e-5 * total.abs().max(1.0),
                        "world {world} rank {r} step {k}: factor {f}'s trace {} against {total}",
                        ft[f]
                    );
                }
                assert!(
                    st.inv
                        .get()
                        .iter()
                        .zip(&inv0)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "world {world}: rank {r}'s inverses differ from rank 0's at step {k}"
                );
            }
        }
        // The scenario has steps where no layer updates and steps where some do.
        assert!(
            !updated_only || (saw_none && saw_some),
            "{saw_none} {saw_some}"
        );
    }
}

#[test]
fn emulated_distributed_pack_and_unpack_every_block_size() {
    // The flat triangle walk of dist_pack_f32 / dist_unpack_f32 against the host's
    // pack_lower / unpack_lower (bit for bit) at every block size, padded segments included
    // (3 blocks on 2 ranks).
    use thor_kernels::cuda::dist::{DistBuffers, DistLayout};
    use thor_kernels::dist::{pack_lower, tri_len, unpack_lower, OwnershipPlan};
    let _g = lock();
    for b in SUPPORTED_BLOCK_SIZES {
        let set = FactorSet::new(b, &[2 * b, b - 3]).unwrap();
        let plan = OwnershipPlan::new(&set, 2).unwrap();
        let l = DistLayout::new(&set, &plan, 1, &[None, None]).unwrap();
        let (tri, bb) = (tri_len(b), b * b);
        let stats = normal(&mut rng(b as u64), set.buffer_len());
        let mut st = Guarded::new(&stats);
        let mut own = Guarded::new(l.own_list());
        let mut all = Guarded::new(l.send_list());
        let mut gs = Guarded::new(&poisoned(l.gather_send_len()));
        // Every rank's owned blocks, packed on the host, as an all-gather delivers them.
        let mut want_all = vec![0.0f32; l.gather_recv_len()];
        for (i, &k) in l.send_list().iter().enumerate() {
            if k >= 0 {
                let k = k as usize;
                pack_lower(
                    &stats[k * bb..(k + 1) * bb],
                    b,
                    &mut want_all[i * (tri + 1)..][..tri],
                );
            }
        }
        let mut gr = Guarded::new(&want_all);
        let mut out = Guarded::new(&poisoned(set.buffer_len()));
        let pack = DistBuffers {
            stats: st.ptr(),
            own_list: own.ptr(),
            send_list: all.ptr(),
            gather_send: gs.ptr(),
            gather_recv: gr.ptr(),
            ..DistBuffers::default()
        };
        let unpack = DistBuffers {
            stats: out.ptr(),
            ..pack
        };
        run(
            &[
                l.plan_pack_statistics(&pack).unwrap(),
                l.plan_unpack_statistics(&unpack).unwrap(),
            ],
            ORDERS[b % ORDERS.len()],
        )
        .unwrap();
        gs.check("gather_send");
        out.check("stats");
        // Rank 1 owns block 1 and pads its second segment with zeros.
        let got = gs.get();
        assert_eq!(got.len(), 2 * (tri + 1), "b = {b}");
        assert!(
            got[..tri + 1]
                .iter()
                .zip(&want_all[(tri + 1) * 2..(tri + 1) * 3])
                .all(|(a, w)| a.to_bits() == w.to_bits()),
            "b = {b}: packed block 1"
        );
        assert!(got[tri + 1..].iter().all(|&v| v == 0.0), "b = {b}: padding");
        let mut want = vec![0.0f32; set.buffer_len()];
        for k in 0..set.total_blocks() {
            let mut p = vec![0.0; tri];
            pack_lower(&stats[k * bb..(k + 1) * bb], b, &mut p);
            unpack_lower(&p, b, &mut want[k * bb..(k + 1) * bb]);
        }
        assert!(
            out.get()
                .iter()
                .zip(&want)
                .all(|(a, w)| a.to_bits() == w.to_bits()),
            "b = {b}: unpacked"
        );
    }
}

#[test]
fn emulated_distributed_ranks_with_different_plans_skip_everything_and_say_so() {
    // Two ranks handed different block ownerships (as `_with_plan` allows): the resolve sees
    // the plans' fingerprints disagree, every layer is skipped on every rank and the fault
    // word is set for the host.
    let _g = lock();
    let sc = step_cases::StepScenario::new();
    let set = sc.set();
    let splits = [0usize, 30, 64];
    let plan = thor_kernels::dist::OwnershipPlan::new(&set, 2).unwrap();
    let mut ranks: Vec<(EmuStep, EmuDist)> = (0..2)
        .map(|r| {
            let st = EmuStep::new(set.clone(), &vec![splits[r + 1] - splits[r]; set.len()]);
            let d = EmuDist::new(&st, &plan.rotated(r), r);
            (st, d)
        })
        .collect();
    for (st, _) in ranks.iter_mut() {
        st.damping_at.set(&[sc.damping]);
    }
    emu_dist_step(&mut ranks, &sc.batch(0), &splits, &sc, 0, false);
    for (r, (st, d)) in ranks.iter().enumerate() {
        assert_eq!(d.fault.get(), vec![1], "rank {r}");
        assert_eq!(
            st.decisions.get(),
            vec![4; 3],
            "rank {r}: every layer skipped"
        );
    }
}
