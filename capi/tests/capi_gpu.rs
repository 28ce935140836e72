//! The C ABI on a CUDA context whose stream another framework owns: every op, device
//! pointers, against the f64 reference. Skips, saying why, without a usable GPU.

#[path = "../../tests/common/mod.rs"]
mod common;

use common::*;
use thor_kernels::cudarc::driver::{DevicePtr, DevicePtrMut};
use thor_kernels::layout::BlockLayout;
use thor_kernels::reference;

#[test]
fn gpu_c_abi_on_a_cuda_context_with_a_borrowed_stream() {
    use std::ffi::c_void;
    use thor_kernels_capi::*;
    let Some(owner) = gpu_or_skip("gpu_c_abi_on_a_cuda_context_with_a_borrowed_stream") else {
        return;
    };
    let stream = owner.context_handle().new_stream().unwrap();
    let mut ctx: *mut ThorContext = std::ptr::null_mut();
    // SAFETY: `stream` is a live stream of device 0's primary context and outlives `ctx`.
    let st = unsafe { thor_v1_context_create_cuda(0, stream.cu_stream() as *mut c_void, &mut ctx) };
    assert_eq!(st, ThorStatus::Ok);
    let (d, b) = (100usize, 64usize);
    let layout = BlockLayout::new(d, b).unwrap();
    let mut r = rng(9);
    let dense = normal(&mut r, d * d);
    let ddense = stream.clone_htod(&dense).unwrap();
    let mut dblocks = stream.clone_htod(&poisoned(layout.buffer_len())).unwrap();
    let mut inv = stream.clone_htod(&poisoned(layout.buffer_len())).unwrap();
    let mut info = stream.clone_htod(&[i32::MIN; 2]).unwrap();
    let spd_in = spd_batch(&mut r, b, 2, &[10.0]);
    let dspd = stream.clone_htod(&spd_in).unwrap();
    {
        let (dp, _a) = ddense.device_ptr(&stream);
        let (bp, _b) = dblocks.device_ptr_mut(&stream);
        let (sp, _c) = dspd.device_ptr(&stream);
        let (ip, _d) = inv.device_ptr_mut(&stream);
        let (fp, _e) = info.device_ptr_mut(&stream);
        // SAFETY: live device allocations of the sizes each call documents.
        unsafe {
            assert_eq!(
                thor_v1_split(
                    ctx,
                    dp as *const f32,
                    d as i64,
                    d as i64,
                    b as i32,
                    bp as *mut f32
                ),
                ThorStatus::Ok
            );
            let st = thor_v1_invert(
                ctx,
                b as i32,
                2,
                sp as *const f32,
                ip as *mut f32,
                std::ptr::null(),
                0.01,
                std::ptr::null(),
                std::ptr::null(),
                fp as *mut i32,
                std::ptr::null_mut(),
            );
            assert_eq!(st, ThorStatus::Ok);
            assert_eq!(thor_v1_context_synchronize(ctx), ThorStatus::Ok);
        }
    }
    let want = reference::split(&f64s(&dense), &layout).unwrap();
    assert_eq!(rel_err(&stream.clone_dtoh(&dblocks).unwrap(), &want), 0.0);
    assert_eq!(stream.clone_dtoh(&info).unwrap(), vec![0, 0]);
    let out = stream.clone_dtoh(&inv).unwrap();
    assert!(block_residual(&spd_in, &out, b, 0, 0.01) < 1e-4);
    // Accumulate: the single call (waits, reports non-finite input) and the grouped form
    // (queued) on the first 10 rows of `dense`, against the reference.
    let n = 10usize;
    let mut acc1 = stream.clone_htod(&poisoned(layout.buffer_len())).unwrap();
    let mut acc2 = stream.clone_htod(&poisoned(layout.buffer_len())).unwrap();
    let mut tr = stream.clone_htod(&poisoned(2 * 2 + 1)).unwrap();
    let mut status = stream.clone_htod(&[-1i32]).unwrap();
    {
        let (dp, _a) = ddense.device_ptr(&stream);
        let (p1, _b) = acc1.device_ptr_mut(&stream);
        let (p2, _c) = acc2.device_ptr_mut(&stream);
        let (tp, _d) = tr.device_ptr_mut(&stream);
        let (sp, _e) = status.device_ptr_mut(&stream);
        let tp = tp as *mut f32;
        // SAFETY: live device allocations of the sizes each call documents.
        unsafe {
            let st = thor_v1_accumulate(
                ctx,
                dp as *const c_void,
                0,
                n as i64,
                d as i64,
                d as i64,
                b as i32,
                0.5,
                0.0,
                p1 as *mut f32,
                tp,
            );
            assert_eq!(st, ThorStatus::Ok);
            let mut plan: *mut ThorAccumulatePlan = std::ptr::null_mut();
            let (dims, rows) = ([d as i64], [n as i64]);
            let st = thor_v1_accumulate_plan_create(
                ctx,
                b as i32,
                1,
                dims.as_ptr(),
                rows.as_ptr(),
                0,
                0,
                &mut plan,
            );
            assert_eq!(st, ThorStatus::Ok);
            let xs = [dp as *const c_void];
            let st = thor_v1_accumulate_grouped(
                ctx,
                plan,
                xs.as_ptr(),
                [d as i64].as_ptr(),
                [0.5f32].as_ptr(),
                [0.0f32].as_ptr(),
                p2 as *mut f32,
                tp.add(2),
                tp.add(4),
                sp as *mut i32,
            );
            assert_eq!(st, ThorStatus::Ok);
            assert_eq!(thor_v1_context_synchronize(ctx), ThorStatus::Ok);
            thor_v1_accumulate_plan_destroy(plan);
        }
    }
    let (a1, a2) = (
        stream.clone_dtoh(&acc1).unwrap(),
        stream.clone_dtoh(&acc2).unwrap(),
    );
    assert!(a1.iter().zip(&a2).all(|(x, y)| x.to_bits() == y.to_bits()));
    assert_eq!(stream.clone_dtoh(&status).unwrap(), vec![0]);
    let mut want = vec![0.0; layout.buffer_len()];
    reference::accumulate(&f64s(&dense), n, d, &layout, 0.5, 0.0, &mut want).unwrap();
    assert!(rel_err(&a1, &want) < 1e-5);
    // Apply on the A side only, with the inverses computed above (d = 100 at b = 64).
    let g_dim = 20usize;
    let grad = normal(&mut r, g_dim * d);
    let dgrad = stream.clone_htod(&grad).unwrap();
    let mut dout = stream.clone_htod(&poisoned(g_dim * d)).unwrap();
    {
        let (gp, _a) = dgrad.device_ptr(&stream);
        let (ip, _b) = inv.device_ptr(&stream);
        let (op, _c) = dout.device_ptr_mut(&stream);
        // SAFETY: live device allocations of the sizes the call documents.
        let st = unsafe {
            thor_v1_apply(
                ctx,
                b as i32,
                std::ptr::null(),
                g_dim as i64,
                gp as *const f32,
                ip as *const f32,
                d as i64,
                0.25,
                op as *mut f32,
            )
        };
        assert_eq!(st, ThorStatus::Ok);
    }
    let want = reference::apply(None, &f64s(&grad), Some((&layout, &f64s(&out))), g_dim, d)
        .unwrap()
        .into_iter()
        .map(|v| 0.25 * v)
        .collect::<Vec<_>>();
    assert!(rel_err(&stream.clone_dtoh(&dout).unwrap(), &want) < 1e-5);
    // SAFETY: made above, destroyed once.
    unsafe { thor_v1_context_destroy(ctx) };
}

/// The optimizer handle on a CUDA context: device pointers in, work on the caller's stream,
/// against the optimizer on the CPU fed the same host data (decisions, counters,
/// preconditioned gradients, in place too).
#[test]
fn gpu_c_abi_optimizer_on_a_cuda_context() {
    use std::ffi::c_void;
    use thor_kernels_capi::*;
    let Some(owner) = gpu_or_skip("gpu_c_abi_optimizer_on_a_cuda_context") else {
        return;
    };
    let stream = owner.context_handle().new_stream().unwrap();
    let (mut ctx, mut cpu_ctx) = (std::ptr::null_mut(), std::ptr::null_mut());
    let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
    let (mut dopt, mut hopt) = (std::ptr::null_mut(), std::ptr::null_mut());
    // SAFETY: `stream` outlives the context and the optimizer; locals otherwise.
    unsafe {
        assert_eq!(
            thor_v1_context_create_cuda(0, stream.cu_stream() as *mut c_void, &mut ctx),
            ThorStatus::Ok
        );
        assert_eq!(thor_v1_context_create_cpu(&mut cpu_ctx), ThorStatus::Ok);
        assert_eq!(
            thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
            ThorStatus::Ok
        );
        let mut cfg = cfg.assume_init();
        cfg.block = 32;
        cfg.interval = 1;
        cfg.stat_decay = 0.5;
        assert_eq!(
            thor_v1_optimizer_create_on(ctx, &cfg, &mut dopt),
            ThorStatus::Ok
        );
        assert_eq!(
            thor_v1_optimizer_create_on(cpu_ctx, &cfg, &mut hopt),
            ThorStatus::Ok
        );
        // The optimizer keeps its own handle on the device: the context may go first.
        thor_v1_context_destroy(ctx);
        let (mut a, mut b) = (-1, -1);
        assert_eq!(
            thor_v1_optimizer_add_linear(dopt, 40, 70, 1, &mut a),
            ThorStatus::Ok
        );
        assert_eq!(
            thor_v1_optimizer_add_linear(hopt, 40, 70, 1, &mut b),
            ThorStatus::Ok
        );
        let mut r = rng(5);
        let rows = 48;
        for step in 0..3 {
            let acts = normal(&mut r, rows * 40);
            let grads = normal(&mut r, rows * 70);
            let g = normal(&mut r, 70 * 41);
            let (da, dg) = (
                stream.clone_htod(&acts).unwrap(),
                stream.clone_htod(&grads).unwrap(),
            );
            let (mut oh, mut od) = (-1, -1);
            assert_eq!(
                thor_v1_optimizer_observe(
                    hopt,
                    0,
                    acts.as_ptr(),
                    grads.as_ptr(),
                    rows as i64,
                    &mut oh
                ),
                ThorStatus::Ok
            );
            {
                let (ap, _x) = da.device_ptr(&stream);
                let (gp, _y) = dg.device_ptr(&stream);
                assert_eq!(
                    thor_v1_optimizer_observe(
                        dopt,
                        0,
                        ap as *const f32,
                        gp as *const f32,
                        rows as i64,
                        &mut od
                    ),
                    ThorStatus::Ok
                );
            }
            assert_eq!(od, oh, "step {step}");
            let mut want = vec![0.0f32; g.len()];
            assert_eq!(
                thor_v1_optimizer_precondition(hopt, 0, g.as_ptr(), want.as_mut_ptr()),
                ThorStatus::Ok
            );
            // In place on the device.
            let mut dgrad = stream.clone_htod(&g).unwrap();
            {
                let (p, _z) = dgrad.device_ptr_mut(&stream);
                assert_eq!(
                    thor_v1_optimizer_precondition(dopt, 0, p as *const f32, p as *mut f32),
                    ThorStatus::Ok
                );
            }
            let got = stream.clone_dtoh(&dgrad).unwrap();
            assert!(rel_err(&got, &f64s(&want)) < 1e-4, "step {step}");
            let (mut ch, mut cd) = (ThorCounters::default(), ThorCounters::default());
            assert_eq!(thor_v1_optimizer_counters(hopt, 0, &mut ch), ThorStatus::Ok);
            assert_eq!(thor_v1_optimizer_counters(dopt, 0, &mut cd), ThorStatus::Ok);
            assert_eq!(ch, cd, "step {step}");
            assert_eq!(thor_v1_optimizer_finish_step(hopt), ThorStatus::Ok);
            assert_eq!(thor_v1_optimizer_finish_step(dopt), ThorStatus::Ok);
        }
        thor_v1_optimizer_destroy(dopt);
        thor_v1_optimizer_destroy(hopt);
        thor_v1_context_destroy(cpu_ctx);
    }
}
