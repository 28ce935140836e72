//! The C ABI under hostile input: each break a randomized run once found (crashes, bad input
//! accepted, state changed by a failed call, messages naming the wrong argument) as its own
//! regression test, asserting the status, the argument the message names, and that nothing
//! was written. The randomized run itself is `tests/fuzz.rs`.

use std::ffi::{c_void, CStr, CString};
use std::ptr::{null, null_mut};

use thor_kernels_capi::*;

/// The thread's last error message.
fn last() -> String {
    // SAFETY: never null, valid until the next call on this thread.
    unsafe { CStr::from_ptr(thor_v1_last_error_message()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `status` is `want` and the message names the argument `arg` (as "`arg`").
#[track_caller]
fn refused(status: ThorStatus, want: ThorStatus, arg: &str) {
    let msg = last();
    assert_eq!(status, want, "{msg}");
    assert!(
        msg.contains(&format!("`{arg}`")),
        "the message should name `{arg}`: {msg}"
    );
}

fn cpu() -> *mut ThorContext {
    let mut ctx = null_mut();
    // SAFETY: `ctx` is a local.
    assert_eq!(
        unsafe { thor_v1_context_create_cpu(&mut ctx) },
        ThorStatus::Ok
    );
    ctx
}

fn optimizer(block: i32) -> *mut ThorOptimizer {
    let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
    let mut opt = null_mut();
    // SAFETY: the library fills the config before it is read.
    unsafe {
        assert_eq!(
            thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
            ThorStatus::Ok
        );
        let mut cfg = cfg.assume_init();
        cfg.block = block;
        cfg.interval = 1;
        assert_eq!(thor_v1_optimizer_create(&cfg, &mut opt), ThorStatus::Ok);
    }
    opt
}

#[test]
fn grouped_accumulation_refuses_strides_that_overflow() {
    let ctx = cpu();
    let (dims, rows) = ([32i64], [2i64]);
    let mut plan = null_mut();
    let x = vec![1.0f32; 64];
    let mut blocks = vec![7.0f32; 32 * 32];
    let (mut bt, mut ft, mut st) = ([7.0f32], [7.0f32], [7i32]);
    // SAFETY: every buffer is a local of the size the plan implies.
    unsafe {
        assert_eq!(
            thor_v1_accumulate_plan_create(
                ctx,
                32,
                1,
                dims.as_ptr(),
                rows.as_ptr(),
                0,
                0,
                &mut plan
            ),
            ThorStatus::Ok
        );
        // 1 << 61 used to crash, INT64_MAX to read before `x`, 1 << 62 to return garbage.
        for ld in [1i64 << 61, 1 << 62, i64::MAX, i64::MAX - 31] {
            let xs = [x.as_ptr() as *const c_void];
            let st_ = thor_v1_accumulate_grouped(
                ctx,
                plan,
                xs.as_ptr(),
                &ld,
                &1.0,
                &0.0,
                blocks.as_mut_ptr(),
                bt.as_mut_ptr(),
                ft.as_mut_ptr(),
                st.as_mut_ptr(),
            );
            refused(st_, ThorStatus::InvalidArgument, "lds");
            assert!(last().contains("factor 0"), "{}", last());
        }
        assert!(blocks.iter().all(|&v| v == 7.0) && bt[0] == 7.0 && ft[0] == 7.0 && st[0] == 7);
        thor_v1_accumulate_plan_destroy(plan);
        // One row spans `dim` elements whatever the stride, but a stride of 2^61 + 4 used to
        // overflow a byte stride inside the matrix product (found by the fuzzer).
        let one = [1i64];
        assert_eq!(
            thor_v1_accumulate_plan_create(
                ctx,
                32,
                1,
                dims.as_ptr(),
                one.as_ptr(),
                0,
                0,
                &mut plan
            ),
            ThorStatus::Ok
        );
        let xs = [x.as_ptr() as *const c_void];
        let s = thor_v1_accumulate_grouped(
            ctx,
            plan,
            xs.as_ptr(),
            &((1i64 << 61) + 4),
            &1.0,
            &0.0,
            blocks.as_mut_ptr(),
            bt.as_mut_ptr(),
            ft.as_mut_ptr(),
            st.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "lds");
        let s = thor_v1_accumulate(
            ctx,
            x.as_ptr() as *const c_void,
            0,
            1,
            (1i64 << 61) + 4,
            32,
            32,
            1.0,
            0.0,
            blocks.as_mut_ptr(),
            bt.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "ld");
        assert!(blocks.iter().all(|&v| v == 7.0) && bt[0] == 7.0);
        thor_v1_accumulate_plan_destroy(plan);
        thor_v1_context_destroy(ctx);
    }
}

#[test]
fn factor_counts_past_the_limit_are_refused_not_truncated() {
    let ctx = cpu();
    let dims = [32i64; 4];
    let (mut blocks, mut bt, mut ft) = (vec![0.0f32; 4 * 32 * 32], [0.0f32; 4], [0.0f32; 4]);
    // SAFETY: the counts are refused before any array is read past its 4 entries.
    unsafe {
        for n in [(1i64 << 61) + 4, THOR_MAX_FACTORS + 1, i64::MAX, -1, 0] {
            let s = thor_v1_traces(
                ctx,
                blocks.as_mut_ptr(),
                32,
                dims.as_ptr(),
                n,
                bt.as_mut_ptr(),
                ft.as_mut_ptr(),
            );
            refused(s, ThorStatus::InvalidArgument, "n_factors");
            let mut plan = null_mut();
            let s = thor_v1_accumulate_plan_create(
                ctx,
                32,
                n,
                dims.as_ptr(),
                dims.as_ptr(),
                0,
                0,
                &mut plan,
            );
            refused(s, ThorStatus::InvalidArgument, "n_factors");
            assert!(plan.is_null());
        }
        thor_v1_context_destroy(ctx);
    }
}

#[test]
fn grouped_accumulation_refuses_every_overlap() {
    let ctx = cpu();
    let (dims, rows) = ([32i64, 32], [4i64, 4]);
    let mut plan = null_mut();
    // One arena: the outputs are placed inside it, overlapping as each case says.
    let mut arena = vec![0.0f32; 4096];
    let p = arena.as_mut_ptr();
    let x = vec![1.0f32; 4 * 32];
    // SAFETY: every pointer addresses the arena or `x`, large enough for what it stands for.
    unsafe {
        assert_eq!(
            thor_v1_accumulate_plan_create(
                ctx,
                32,
                2,
                dims.as_ptr(),
                rows.as_ptr(),
                0,
                0,
                &mut plan
            ),
            ThorStatus::Ok
        );
        let xs = [x.as_ptr() as *const c_void, x.as_ptr() as *const c_void];
        let call =
            |blocks: *mut f32, bt: *mut f32, ft: *mut f32, st: *mut i32, xs: &[*const c_void]| {
                thor_v1_accumulate_grouped(
                    ctx,
                    plan,
                    xs.as_ptr(),
                    [32i64, 32].as_ptr(),
                    [1.0f32, 1.0].as_ptr(),
                    [0.0f32, 0.0].as_ptr(),
                    blocks,
                    bt,
                    ft,
                    st,
                )
            };
        // block_traces = status = blocks used to return OK with wrong numbers.
        let s = call(p, p, p.add(2048), p as *mut i32, &xs);
        refused(s, ThorStatus::InvalidArgument, "block_traces");
        let s = call(
            p,
            p.add(2048),
            p.add(2048 + 1),
            p.add(2048 + 2) as *mut i32,
            &xs,
        );
        refused(s, ThorStatus::InvalidArgument, "factor_traces");
        let s = call(p, p.add(2048), p.add(2050), p.add(2051) as *mut i32, &xs);
        refused(s, ThorStatus::InvalidArgument, "status");
        // An input inside an output.
        let xin = [p.add(100) as *const c_void, x.as_ptr() as *const c_void];
        let s = call(p, p.add(2048), p.add(2050), p.add(2052) as *mut i32, &xin);
        refused(s, ThorStatus::InvalidArgument, "xs");
        assert!(arena.iter().all(|&v| v == 0.0), "nothing written");
        // Disjoint: fine, and the two inputs may share memory (they are only read).
        let s = call(p, p.add(2048), p.add(2050), p.add(2052) as *mut i32, &xs);
        assert_eq!(s, ThorStatus::Ok, "{}", last());
        thor_v1_accumulate_plan_destroy(plan);
        thor_v1_context_destroy(ctx);
    }
}

#[test]
fn inversion_refuses_every_overlap_its_header_forbids() {
    let ctx = cpu();
    let (b, nb) = (32usize, 2usize);
    let mut arena = vec![0.0f32; 3 * nb * b * b + 64];
    let p = arena.as_mut_ptr();
    let len = nb * b * b;
    for j in 0..nb {
        for i in 0..b {
            arena[j * b * b + i * b + i] = 2.0;
        }
    }
    let before = arena.clone();
    let out = unsafe { p.add(len) };
    let tail = unsafe { p.add(2 * len) };
    // (output, info, damping_used, mask, damping, the argument named)
    type Case = (
        *mut f32,
        *mut i32,
        *mut f32,
        *const u8,
        *const f32,
        &'static str,
    );
    let cases: [Case; 5] = [
        // damping_used = output used to return OK.
        (out, tail as *mut i32, out, null(), null(), "damping_used"),
        (out, out as *mut i32, null_mut(), null(), null(), "info"),
        (
            out,
            tail as *mut i32,
            tail.wrapping_add(1),
            null(),
            null(),
            "damping_used",
        ),
        (
            out,
            tail as *mut i32,
            null_mut(),
            tail as *const u8,
            null(),
            "info",
        ),
        (
            out,
            tail as *mut i32,
            null_mut(),
            null(),
            tail as *const f32,
            "info",
        ),
    ];
    for (o, info, used, mask, damping, arg) in cases {
        // SAFETY: every pointer addresses the arena, large enough for what it stands for.
        let s = unsafe {
            thor_v1_invert(
                ctx,
                32,
                nb as i64,
                p,
                o,
                damping,
                0.1,
                mask,
                null(),
                info,
                used,
            )
        };
        refused(s, ThorStatus::InvalidArgument, arg);
        assert!(arena
            .iter()
            .zip(&before)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
    }
    // The damping_all argument is named as the header spells it.
    // SAFETY: as above.
    let s = unsafe {
        thor_v1_invert(
            ctx,
            32,
            nb as i64,
            p,
            out,
            null(),
            f32::NAN,
            null(),
            null(),
            tail as *mut i32,
            null_mut(),
        )
    };
    refused(s, ThorStatus::InvalidArgument, "damping_all");
    // SAFETY: as above.
    unsafe {
        let s = thor_v1_invert(
            ctx,
            32,
            nb as i64,
            p,
            out,
            null(),
            0.1,
            null(),
            null(),
            tail as *mut i32,
            tail.add(nb),
        );
        assert_eq!(s, ThorStatus::Ok, "{}", last());
        thor_v1_context_destroy(ctx);
    }
}

#[test]
fn conv_layers_whose_sizes_wrap_are_refused() {
    let opt = optimizer(32);
    let mut id = -1;
    // SAFETY: `id` is a local.
    unsafe {
        // 2^62 + 1, 1, 4, 1 used to register a 4-column layer.
        let s = thor_v1_optimizer_add_conv2d(opt, (1 << 62) + 1, 1, 4, 1, 0, &mut id);
        refused(s, ThorStatus::InvalidArgument, "c_in");
        assert_eq!(id, -1);
        let s = thor_v1_optimizer_add_linear(opt, 0, 4, 0, &mut id);
        refused(s, ThorStatus::InvalidArgument, "inputs");
        let s = thor_v1_optimizer_add_linear(opt, 4, -3, 0, &mut id);
        refused(s, ThorStatus::InvalidArgument, "outputs");
        let s = thor_v1_optimizer_add_conv2d(opt, 3, 4, 0, 3, 0, &mut id);
        refused(s, ThorStatus::InvalidArgument, "kh");
        assert_eq!(id, -1);
        thor_v1_optimizer_destroy(opt);
    }
}

#[test]
fn a_failed_observe_changes_nothing() {
    let opt = optimizer(32);
    let mut id = -1;
    let (acts, grads) = (vec![0.5f32; 8 * 6], vec![0.25f32; 8 * 3]);
    let mut storage = [0i32; 2];
    // A misaligned `observation` used to run the step, count it, then fail.
    let misaligned = unsafe { (storage.as_mut_ptr() as *mut u8).add(1) } as *mut i32;
    // SAFETY: the inputs are locals of the sizes the layer implies.
    unsafe {
        assert_eq!(
            thor_v1_optimizer_add_linear(opt, 6, 3, 0, &mut id),
            ThorStatus::Ok
        );
        let s = thor_v1_optimizer_observe(opt, id, acts.as_ptr(), grads.as_ptr(), 8, misaligned);
        refused(s, ThorStatus::InvalidArgument, "observation");
        // `observation` overlapping an input.
        let s = thor_v1_optimizer_observe(
            opt,
            id,
            acts.as_ptr(),
            grads.as_ptr(),
            8,
            acts.as_ptr() as *mut i32,
        );
        refused(s, ThorStatus::InvalidArgument, "observation");
        let mut c = ThorCounters::default();
        assert_eq!(thor_v1_optimizer_counters(opt, id, &mut c), ThorStatus::Ok);
        assert_eq!(c, ThorCounters::default(), "no statistics step counted");
        thor_v1_optimizer_destroy(opt);
    }
    assert_eq!(storage, [0, 0]);
}

#[test]
fn null_pointers_are_reported_before_overlaps() {
    let ctx = cpu();
    let mut blocks = vec![0.0f32; 32 * 32];
    // SAFETY: `x` is null and reported before anything is read.
    unsafe {
        // x null, block_traces overlapping blocks: the null is what the caller must fix first.
        let s = thor_v1_accumulate(
            ctx,
            null(),
            0,
            2,
            32,
            32,
            32,
            1.0,
            0.0,
            blocks.as_mut_ptr(),
            blocks.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "x");
        assert!(last().contains("null"), "{}", last());
        thor_v1_context_destroy(ctx);
    }
}

#[test]
fn messages_name_the_c_arguments() {
    let ctx = cpu();
    let (grad, mut out) = (vec![1.0f32; 64], vec![0.0f32; 64]);
    // SAFETY: buffers are locals at least as large as the calls read.
    unsafe {
        // A g_dim too large for a block layout used to be reported as `dim`.
        let s = thor_v1_apply(
            ctx,
            32,
            null(),
            1 << 40,
            grad.as_ptr(),
            null(),
            1,
            1.0,
            out.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "g_dim");
        let s = thor_v1_apply(
            ctx,
            32,
            null(),
            1,
            grad.as_ptr(),
            null(),
            1 << 40,
            1.0,
            out.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "a_dim");
        let s = thor_v1_apply(
            ctx,
            48,
            null(),
            8,
            grad.as_ptr(),
            null(),
            8,
            1.0,
            out.as_mut_ptr(),
        );
        refused(s, ThorStatus::InvalidArgument, "block");
        assert!(last().contains("48"), "the value passed: {}", last());

        // A non-finite alpha of the grouped form used to be reported as `alpha`.
        let (dims, rows) = ([32i64], [2i64]);
        let mut plan = null_mut();
        assert_eq!(
            thor_v1_accumulate_plan_create(
                ctx,
                32,
                1,
                dims.as_ptr(),
                rows.as_ptr(),
                0,
                0,
                &mut plan
            ),
            ThorStatus::Ok
        );
        let x = vec![1.0f32; 64];
        let mut blocks = vec![0.0f32; 32 * 32];
        let (mut bt, mut ft, mut st) = ([0.0f32], [0.0f32], [0i32]);
        let xs = [x.as_ptr() as *const c_void];
        for (alpha, beta, arg) in [(f32::NAN, 0.0, "alphas"), (1.0, f32::INFINITY, "betas")] {
            let s = thor_v1_accumulate_grouped(
                ctx,
                plan,
                xs.as_ptr(),
                &32,
                &alpha,
                &beta,
                blocks.as_mut_ptr(),
                bt.as_mut_ptr(),
                ft.as_mut_ptr(),
                st.as_mut_ptr(),
            );
            refused(s, ThorStatus::InvalidArgument, arg);
        }
        thor_v1_accumulate_plan_destroy(plan);
        thor_v1_context_destroy(ctx);
    }

    // A file that is not a state file is reported against `path`, not `state`.
    let opt = optimizer(32);
    let mut id = -1;
    let dir = std::env::temp_dir().join(format!("thor-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not-a-state");
    std::fs::write(&bad, b"hello").unwrap();
    let path = CString::new(bad.to_str().unwrap()).unwrap();
    // SAFETY: `path` is a NUL-terminated string.
    unsafe {
        assert_eq!(
            thor_v1_optimizer_add_linear(opt, 6, 3, 1, &mut id),
            ThorStatus::Ok
        );
        let s = thor_v1_optimizer_load(opt, path.as_ptr());
        refused(s, ThorStatus::InvalidArgument, "path");
        thor_v1_optimizer_destroy(opt);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Set in the child process [`allocations_the_caller_sizes_fail_with_a_status`] starts.
const OOM_CHILD: &str = "THOR_CAPI_OOM_CHILD";

#[test]
fn allocations_the_caller_sizes_fail_with_a_status() {
    // Under a 1 GiB address-space limit (in a child process, so other tests keep theirs), a
    // layer whose statistics and inverses take 2 GiB used to abort the process ("memory
    // allocation of N bytes failed"); now it is a status, and the optimizer stays usable.
    let exe = std::env::current_exe().unwrap();
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["--exact", "oom_child", "--nocapture", "--test-threads=1"])
        .env(OOM_CHILD, "1");
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 1 << 30,
                rlim_max: 1 << 30,
            };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "child failed:\n{text}");
    assert!(
        text.contains("oom child: checked"),
        "the child ran its checks:\n{text}"
    );
}

#[test]
fn oom_child() {
    if std::env::var_os(OOM_CHILD).is_none() {
        return; // Runs only as the child of the test above.
    }
    let opt = optimizer(128);
    let mut id = -1;
    // SAFETY: `id` is a local.
    unsafe {
        let s = thor_v1_optimizer_add_linear(opt, 1_000_000, 1_000_000, 0, &mut id);
        refused(s, ThorStatus::OutOfMemory, "inputs");
        assert_eq!(id, -1);
        let s = thor_v1_optimizer_add_conv2d(opt, 1000, 1_000_000, 1000, 1, 0, &mut id);
        refused(s, ThorStatus::OutOfMemory, "c_in");
        // Still usable.
        assert_eq!(
            thor_v1_optimizer_add_linear(opt, 6, 3, 1, &mut id),
            ThorStatus::Ok
        );
        assert_eq!(id, 0);
        thor_v1_optimizer_destroy(opt);

        // An apply whose scratch (block x a_dim floats) takes 8 GiB used to abort too.
        let ctx = cpu();
        let a_dim = 8_000_000usize;
        let grad = vec![1.0f32; a_dim];
        let mut out = vec![0.0f32; a_dim];
        let s = thor_v1_apply(
            ctx,
            256,
            null(),
            1,
            grad.as_ptr(),
            null(),
            a_dim as i64,
            1.0,
            out.as_mut_ptr(),
        );
        refused(s, ThorStatus::OutOfMemory, "a_dim");
        assert!(out.iter().all(|&v| v == 0.0), "nothing written");
        // The context goes on with what fits.
        let s = thor_v1_apply(
            ctx,
            256,
            null(),
            1,
            grad.as_ptr(),
            null(),
            1000,
            2.0,
            out.as_mut_ptr(),
        );
        assert_eq!(s, ThorStatus::Ok, "{}", last());
        assert_eq!(out[999], 2.0);
        thor_v1_context_destroy(ctx);
    }
    println!("oom child: checked");
}
