//! The distributed optimizer through the C ABI: callbacks that move the bytes through the
//! library's in-process group, against one optimizer on the union of the batches; a
//! failing callback is `COMMUNICATION` and the optimizer refuses statistics afterwards.

use std::ffi::{c_void, CStr};
use std::ptr::null_mut;
use std::time::Duration;

use rand::{Rng, SeedableRng};
use thor_kernels::dist::{Communicator, LocalComm, LocalGroup};
use thor_kernels_capi::*;

/// The callbacks' `user`: a rank's communicator, whether to fail, and the callbacks made.
struct User {
    comm: LocalComm,
    fail: bool,
    calls: usize,
}

fn counts(counts: *const i64, world: usize) -> Vec<usize> {
    // SAFETY: the library passes `world` counts.
    let c = unsafe { std::slice::from_raw_parts(counts, world) };
    c.iter().map(|&v| v as usize).collect()
}

unsafe extern "C" fn reduce_scatter(
    user: *mut c_void,
    send: *const f32,
    c: *const i64,
    recv: *mut f32,
) -> i32 {
    // SAFETY: `user` is the rank's `User`; lengths as the header describes them.
    let u = unsafe { &mut *(user as *mut User) };
    u.calls += 1;
    if u.fail {
        return 7;
    }
    let c = counts(c, u.comm.world());
    let total: usize = c.iter().sum();
    let (send, recv) = unsafe {
        (
            std::slice::from_raw_parts(send, total),
            std::slice::from_raw_parts_mut(recv, c[u.comm.rank()]),
        )
    };
    i32::from(u.comm.reduce_scatter(send, &c, recv).is_err())
}

unsafe extern "C" fn all_gather(
    user: *mut c_void,
    send: *const f32,
    c: *const i64,
    recv: *mut f32,
) -> i32 {
    // SAFETY: as in reduce_scatter.
    let u = unsafe { &mut *(user as *mut User) };
    u.calls += 1;
    let c = counts(c, u.comm.world());
    let total: usize = c.iter().sum();
    let (send, recv) = unsafe {
        (
            std::slice::from_raw_parts(send, c[u.comm.rank()]),
            std::slice::from_raw_parts_mut(recv, total),
        )
    };
    i32::from(u.comm.all_gather(send, &c, recv).is_err())
}

unsafe extern "C" fn all_reduce(user: *mut c_void, buf: *mut f64, n: i64) -> i32 {
    // SAFETY: as in reduce_scatter.
    let u = unsafe { &mut *(user as *mut User) };
    u.calls += 1;
    let buf = unsafe { std::slice::from_raw_parts_mut(buf, n as usize) };
    i32::from(u.comm.all_reduce(buf).is_err())
}

fn config() -> ThorOptimizerConfig {
    let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
    // SAFETY: writes the whole struct.
    unsafe {
        assert_eq!(
            thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
            ThorStatus::Ok
        );
        let mut cfg = cfg.assume_init();
        cfg.block = 32;
        cfg.interval = 1;
        cfg.stat_decay = 0.5;
        cfg.damping_l0 = 0.01;
        cfg.damping_decay = 1.0;
        cfg
    }
}

const D_IN: usize = 40;
const D_OUT: usize = 36;
const ROWS: usize = 30;

/// Runs 3 statistics steps on rows `rows` of the data; the preconditioned gradient after
/// each. `opt` has one linear layer with bias.
fn run(opt: *mut ThorOptimizer, rows: std::ops::Range<usize>) -> Vec<Vec<f32>> {
    let mut r = rand::rngs::StdRng::seed_from_u64(3);
    let grad: Vec<f32> = (0..D_OUT * (D_IN + 1))
        .map(|_| r.random::<f32>() - 0.5)
        .collect();
    (0..3)
        .map(|k| {
            let mut r = rand::rngs::StdRng::seed_from_u64(10 + k);
            let acts: Vec<f32> = (0..ROWS * D_IN).map(|_| r.random::<f32>() - 0.5).collect();
            let outg: Vec<f32> = (0..ROWS * D_OUT).map(|_| r.random::<f32>() - 0.5).collect();
            let mut out = vec![f32::NAN; grad.len()];
            let mut dec = -1;
            // SAFETY: live buffers of the sizes the header gives.
            unsafe {
                let st = thor_v1_optimizer_observe(
                    opt,
                    0,
                    acts[rows.start * D_IN..].as_ptr(),
                    outg[rows.start * D_OUT..].as_ptr(),
                    rows.len() as i64,
                    &mut dec,
                );
                assert_eq!(
                    st,
                    ThorStatus::Ok,
                    "{:?}",
                    CStr::from_ptr(thor_v1_last_error_message())
                );
                assert!((0..=4).contains(&dec), "a decision was written");
                let st = thor_v1_optimizer_precondition(opt, 0, grad.as_ptr(), out.as_mut_ptr());
                assert_eq!(st, ThorStatus::Ok);
                assert_eq!(thor_v1_optimizer_finish_step(opt), ThorStatus::Ok);
            }
            out
        })
        .collect()
}

fn add_layer(opt: *mut ThorOptimizer) {
    let mut id = -1;
    // SAFETY: a live optimizer.
    let st = unsafe { thor_v1_optimizer_add_linear(opt, D_IN as i64, D_OUT as i64, 1, &mut id) };
    assert_eq!((st, id), (ThorStatus::Ok, 0));
}

/// Rank `user.comm.rank()`'s optimizer: odd ranks through
/// `thor_v1_optimizer_create_distributed_on` on a CPU context, even ones without a context.
fn create(user: &mut User, world: i32) -> *mut ThorOptimizer {
    let mut opt = null_mut();
    let cfg = config();
    let rank = user.comm.rank() as i32;
    let user = user as *mut User as *mut c_void;
    let (rs, ar, ag) = (
        Some(reduce_scatter as _),
        Some(all_reduce as _),
        Some(all_gather as _),
    );
    // SAFETY: `user` outlives the optimizer (the caller destroys it first); the context is
    // made here and destroyed after the optimizer is made (the optimizer does not keep it).
    let st = unsafe {
        if rank % 2 == 1 {
            let mut ctx = null_mut();
            assert_eq!(thor_v1_context_create_cpu(&mut ctx), ThorStatus::Ok);
            let st = thor_v1_optimizer_create_distributed_on(
                ctx, &cfg, rank, world, user, rs, ar, ag, &mut opt,
            );
            thor_v1_context_destroy(ctx);
            st
        } else {
            thor_v1_optimizer_create_distributed(&cfg, rank, world, user, rs, ar, ag, &mut opt)
        }
    };
    assert_eq!(st, ThorStatus::Ok);
    add_layer(opt);
    opt
}

#[test]
fn ranks_through_callbacks_match_one_optimizer() {
    let mut one = null_mut();
    // SAFETY: a config and an out pointer.
    assert_eq!(
        unsafe { thor_v1_optimizer_create(&config(), &mut one) },
        ThorStatus::Ok
    );
    add_layer(one);
    let want = run(one, 0..ROWS);
    // SAFETY: made above.
    unsafe { thor_v1_optimizer_destroy(one) };
    let world = 3;
    let comms = LocalGroup::new(world, Duration::from_secs(60)).unwrap();
    let got: Vec<Vec<Vec<f32>>> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                s.spawn(move || {
                    let rank = comm.rank();
                    let mut user = User {
                        comm,
                        fail: false,
                        calls: 0,
                    };
                    let opt = create(&mut user, world as i32);
                    let out = run(opt, rank * 10..rank * 10 + 10);
                    // SAFETY: made above; destroyed before `user` goes.
                    unsafe {
                        assert_eq!(thor_v1_optimizer_gather_statistics(opt), ThorStatus::Ok);
                        thor_v1_optimizer_destroy(opt);
                    }
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (rank, steps) in got.iter().enumerate() {
        for (k, (g, w)) in steps.iter().zip(&want).enumerate() {
            let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = g.iter().zip(w).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / scale;
            assert!(err < 1e-4, "rank {rank} step {k}: {err:e}");
        }
    }
}

#[test]
fn a_failing_callback_is_a_communication_error() {
    let comms = LocalGroup::new(1, Duration::from_secs(5)).unwrap();
    let mut user = User {
        comm: comms.into_iter().next().unwrap(),
        fail: true,
        calls: 0,
    };
    let opt = create(&mut user, 1);
    let acts = vec![0.5f32; ROWS * D_IN];
    let outg = vec![0.25f32; ROWS * D_OUT];
    let mut dec = -1;
    // SAFETY: live buffers of the sizes the header gives.
    unsafe {
        for _ in 0..2 {
            let st = thor_v1_optimizer_observe(
                opt,
                0,
                acts.as_ptr(),
                outg.as_ptr(),
                ROWS as i64,
                &mut dec,
            );
            assert_eq!(st, ThorStatus::Communication);
            assert_eq!(dec, -1, "nothing written");
        }
        let msg = CStr::from_ptr(thor_v1_last_error_message())
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains("earlier collective"), "{msg}");
        thor_v1_optimizer_destroy(opt);
    }
    // Null callbacks and a bad rank are refused by name.
    let mut opt = null_mut();
    let cfg = config();
    for (rank, world, rs, arg) in [
        (0, 1, None, "reduce_scatter"),
        (1, 1, Some(reduce_scatter as _), "rank"),
        (0, 0, Some(reduce_scatter as _), "world"),
    ] {
        // SAFETY: a config and an out pointer; the callbacks are never called.
        let st = unsafe {
            thor_v1_optimizer_create_distributed(
                &cfg,
                rank,
                world,
                null_mut(),
                rs,
                Some(all_reduce),
                Some(all_gather),
                &mut opt,
            )
        };
        assert_eq!(st, ThorStatus::InvalidArgument, "{arg}");
        // SAFETY: never null.
        let msg = unsafe { CStr::from_ptr(thor_v1_last_error_message()) }
            .to_string_lossy()
            .into_owned();
        assert!(msg.contains(&format!("`{arg}`")), "{arg}: {msg}");
        assert!(opt.is_null());
    }
}

#[test]
fn a_distributed_optimizer_on_a_null_context_is_refused() {
    let mut opt = null_mut();
    // SAFETY: a null context is checked before anything is read.
    let st = unsafe {
        thor_v1_optimizer_create_distributed_on(
            null_mut(),
            &config(),
            0,
            1,
            null_mut(),
            Some(reduce_scatter),
            Some(all_reduce),
            Some(all_gather),
            &mut opt,
        )
    };
    assert_eq!(st, ThorStatus::InvalidArgument);
    assert!(opt.is_null());
    // SAFETY: the library's own message, valid until its next call on this thread.
    let msg = unsafe { std::ffi::CStr::from_ptr(thor_v1_last_error_message()) };
    let msg = msg.to_string_lossy();
    assert!(msg.contains("ctx"), "{msg}");
}

const D_HID: usize = 20;

/// Per step: the decisions and the layers' preconditioned gradients.
type Steps = Vec<(Vec<i32>, Vec<Vec<f32>>)>;

/// Three statistics steps of two layers (layer 0 from `create`, layer 1 `D_OUT -> D_HID`
/// without bias) on rows `rows`, through `thor_v1_optimizer_observe_layers` (`together`)
/// or one `thor_v1_optimizer_observe` per layer: per step the decisions and both layers'
/// preconditioned gradients.
fn run_two(opt: *mut ThorOptimizer, rows: std::ops::Range<usize>, together: bool) -> Steps {
    let dims = [(D_IN, D_OUT, D_IN + 1), (D_OUT, D_HID, D_OUT)];
    let mut r = rand::rngs::StdRng::seed_from_u64(4);
    let grads: Vec<Vec<f32>> = dims
        .iter()
        .map(|&(_, o, da)| (0..o * da).map(|_| r.random::<f32>() - 0.5).collect())
        .collect();
    (0..3)
        .map(|k| {
            let mut r = rand::rngs::StdRng::seed_from_u64(20 + k);
            let data: Vec<(Vec<f32>, Vec<f32>)> = dims
                .iter()
                .map(|&(i, o, _)| {
                    (
                        (0..ROWS * i).map(|_| r.random::<f32>() - 0.5).collect(),
                        (0..ROWS * o).map(|_| r.random::<f32>() - 0.5).collect(),
                    )
                })
                .collect();
            let steps: Vec<ThorLayerStep> = data
                .iter()
                .zip(&dims)
                .enumerate()
                .map(|(l, ((a, g), &(i, o, _)))| ThorLayerStep {
                    layer: l as i32,
                    acts: a[rows.start * i..].as_ptr(),
                    out_grads: g[rows.start * o..].as_ptr(),
                    rows: rows.len() as i64,
                    conv: std::ptr::null(),
                })
                .collect();
            let mut dec = vec![-1i32; 2];
            // SAFETY: live buffers of the sizes the header gives.
            unsafe {
                if together {
                    let st =
                        thor_v1_optimizer_observe_layers(opt, 2, steps.as_ptr(), dec.as_mut_ptr());
                    assert_eq!(
                        st,
                        ThorStatus::Ok,
                        "{:?}",
                        CStr::from_ptr(thor_v1_last_error_message())
                    );
                } else {
                    for (s, d) in steps.iter().zip(&mut dec) {
                        let st =
                            thor_v1_optimizer_observe(opt, s.layer, s.acts, s.out_grads, s.rows, d);
                        assert_eq!(st, ThorStatus::Ok);
                    }
                }
            }
            let pre = grads
                .iter()
                .enumerate()
                .map(|(l, g)| {
                    let mut out = vec![f32::NAN; g.len()];
                    // SAFETY: live buffers of the layer's size.
                    let st = unsafe {
                        thor_v1_optimizer_precondition(opt, l as i32, g.as_ptr(), out.as_mut_ptr())
                    };
                    assert_eq!(st, ThorStatus::Ok);
                    out
                })
                .collect();
            // SAFETY: a live optimizer.
            assert_eq!(
                unsafe { thor_v1_optimizer_finish_step(opt) },
                ThorStatus::Ok
            );
            (dec, pre)
        })
        .collect()
}

#[test]
fn layers_observed_together_through_callbacks_match_layer_by_layer() {
    let world = 2;
    let run_group = |together: bool| -> Vec<(Steps, usize)> {
        let comms = LocalGroup::new(world, Duration::from_secs(60)).unwrap();
        std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|comm| {
                    s.spawn(move || {
                        let rank = comm.rank();
                        let mut user = User {
                            comm,
                            fail: false,
                            calls: 0,
                        };
                        let opt = create(&mut user, world as i32);
                        let mut id = -1;
                        // SAFETY: a live optimizer.
                        let st = unsafe {
                            thor_v1_optimizer_add_linear(
                                opt,
                                D_OUT as i64,
                                D_HID as i64,
                                0,
                                &mut id,
                            )
                        };
                        assert_eq!((st, id), (ThorStatus::Ok, 1));
                        let half = ROWS / 2;
                        let out = run_two(opt, rank * half..(rank + 1) * half, together);
                        // SAFETY: made above; destroyed before `user` goes.
                        unsafe { thor_v1_optimizer_destroy(opt) };
                        (out, user.calls)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        })
    };
    let (joint, apart) = (run_group(true), run_group(false));
    for ((j, nj), (a, na)) in joint.iter().zip(&apart) {
        assert_eq!(j, a);
        assert!(j
            .iter()
            .all(|(d, _)| d.iter().all(|&d| (0..=4).contains(&d))));
        // Three steps: two or three joined collectives each, against four to six.
        assert!((6..=9).contains(nj), "{nj} callbacks joined");
        assert!(*na >= 12 && na > nj, "{na} callbacks layer by layer");
    }
}

#[test]
fn observe_layers_refuses_bad_steps_by_name() {
    // SAFETY: a config and an out pointer.
    let mut opt = null_mut();
    assert_eq!(
        unsafe { thor_v1_optimizer_create(&config(), &mut opt) },
        ThorStatus::Ok
    );
    add_layer(opt);
    let acts = vec![0.5f32; ROWS * D_IN];
    let outg = vec![0.25f32; ROWS * D_OUT];
    let good = ThorLayerStep {
        layer: 0,
        acts: acts.as_ptr(),
        out_grads: outg.as_ptr(),
        rows: ROWS as i64,
        conv: std::ptr::null(),
    };
    let no_acts = ThorLayerStep {
        acts: std::ptr::null(),
        ..good
    };
    let mut dec = [-1i32; 2];
    let msg = || {
        // SAFETY: never null.
        unsafe { CStr::from_ptr(thor_v1_last_error_message()) }
            .to_string_lossy()
            .into_owned()
    };
    for (steps, n, want) in [
        (vec![good, good], 2i64, "given twice"),
        (vec![good, no_acts], 2, "steps[1]"),
        (vec![good], -1, "`n`"),
    ] {
        // SAFETY: live buffers; the library checks the rest.
        let st =
            unsafe { thor_v1_optimizer_observe_layers(opt, n, steps.as_ptr(), dec.as_mut_ptr()) };
        assert_eq!(st, ThorStatus::InvalidArgument, "{want}");
        assert!(msg().contains(want), "{want}: {}", msg());
        assert_eq!(dec, [-1, -1], "{want}: nothing written");
    }
    // SAFETY: null `steps` with one step is refused before anything is read.
    let st =
        unsafe { thor_v1_optimizer_observe_layers(opt, 1, std::ptr::null(), dec.as_mut_ptr()) };
    assert_eq!(st, ThorStatus::InvalidArgument);
    assert!(msg().contains("steps"), "{}", msg());
    // Observations overlapping an input.
    let st = unsafe { thor_v1_optimizer_observe_layers(opt, 1, &good, acts.as_ptr() as *mut i32) };
    assert_eq!(st, ThorStatus::InvalidArgument);
    // One good step: as observe.
    // SAFETY: live buffers.
    let st = unsafe { thor_v1_optimizer_observe_layers(opt, 1, &good, dec.as_mut_ptr()) };
    assert_eq!(st, ThorStatus::Ok, "{}", msg());
    assert!((0..=4).contains(&dec[0]) && dec[1] == -1);
    // SAFETY: made above.
    unsafe { thor_v1_optimizer_destroy(opt) };
}
