//! The C ABI: the committed header is current and compiles as C99 and C++17, and a C program
//! compiled here calls the CPU path with host pointers; its results are checked against the
//! Rust reference and its status codes for bad input inside the program.

#[path = "../../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use thor_kernels::layout::{BlockLayout, FactorSet};
use thor_kernels::reference;

/// This crate's folder.
fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The repository, which holds the committed header in `include/`.
fn repo() -> PathBuf {
    root().parent().unwrap().to_path_buf()
}

fn generated_header() -> String {
    let cfg = cbindgen::Config::from_file(root().join("cbindgen.toml")).unwrap();
    let mut out = Vec::new();
    cbindgen::Builder::new()
        .with_crate(root())
        .with_config(cfg)
        .generate()
        .expect("cbindgen")
        .write(&mut out);
    String::from_utf8(out).unwrap()
}

#[test]
fn committed_header_is_current() {
    let path = repo().join("include/thor_kernels.h");
    let fresh = generated_header();
    if std::env::var("THOR_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &fresh).unwrap();
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == fresh,
        "include/thor_kernels.h is stale: regenerate with THOR_BLESS=1 cargo test -p thor-kernels-capi --test capi"
    );
    assert!(
        fresh.contains("thor_v1_invert") && fresh.contains("Batched damped Cholesky inversion"),
        "doc comments carried into the header"
    );
    for line in fresh.lines().filter(|l| {
        l.contains('(') && (l.starts_with("enum ThorStatus thor_") || l.contains(" thor_"))
    }) {
        if let Some(name) = line.split_whitespace().find(|w| w.starts_with("thor_")) {
            assert!(
                name.starts_with(thor_kernels_capi::ABI_PREFIX),
                "{name} lacks the ABI prefix"
            );
        }
    }
}

fn compiler(cpp: bool) -> cc::Tool {
    let target = env!("THOR_TARGET");
    let mut b = cc::Build::new();
    b.target(target)
        .host(target)
        .opt_level(0)
        .cargo_metadata(false)
        .cpp(cpp);
    b.get_compiler()
}

#[test]
fn header_compiles_as_c99_and_cpp17() {
    let hdr = repo().join("include/thor_kernels.h");
    let dir = std::env::temp_dir().join(format!("thor-hdr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (cpp, std, file) in [(false, "-std=c99", "t.c"), (true, "-std=c++17", "t.cpp")] {
        let src = dir.join(file);
        std::fs::write(&src, format!("#include \"{}\"\nint main(void) {{ return thor_v1_abi_version() == 1 ? 0 : 1; }}\n", hdr.display())).unwrap();
        let status = compiler(cpp)
            .to_command()
            .args([
                std,
                "-Wall",
                "-Wextra",
                "-pedantic",
                "-Werror",
                "-fsyntax-only",
            ])
            .arg(&src)
            .status()
            .unwrap();
        assert!(status.success(), "header does not compile with {std}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The library's shared object in the profile folder the tests run from. `cargo test` does
/// not build the cdylib; `cargo build -p thor-kernels-capi` (scripts/test.sh runs it) does.
fn cdylib() -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let lib = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("libthor_kernels_capi.so");
    if lib.is_file() {
        return Some(lib);
    }
    let msg = format!(
        "{} not built: run `cargo build -p thor-kernels-capi` first (scripts/test.sh does)",
        lib.display()
    );
    if std::env::var("THOR_REQUIRE_CAPI").is_ok_and(|v| v == "1") {
        panic!("THOR_REQUIRE_CAPI=1 but {msg}");
    }
    skip_note!(
        "SKIPPED c_program_calls_the_cpu_path: {msg}; set THOR_REQUIRE_CAPI=1 to fail instead"
    );
    None
}

/// The C program's deterministic inputs: the same LCG as tests/c/capi_test.c.
fn lcg_fill(seed: &mut u32, n: usize) -> Vec<f32> {
    (0..n)
        .map(|_| {
            *seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
            ((*seed >> 8) as f32 / (1u32 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

#[test]
fn c_program_calls_the_cpu_path() {
    let Some(lib) = cdylib() else { return };
    let dir = std::env::temp_dir().join(format!("thor-capi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let exe = dir.join("capi_test");
    let status = compiler(false)
        .to_command()
        .args(["-std=c99", "-Wall", "-Wextra", "-Werror", "-I"])
        .arg(repo().join("include"))
        .arg(root().join("tests/c/capi_test.c"))
        .arg("-o")
        .arg(&exe)
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.parent().unwrap().display()))
        .arg("-lm")
        .status()
        .unwrap();
    assert!(status.success(), "C test program did not compile");
    let out = Command::new(&exe).arg(&dir).output().unwrap();
    let log =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "C test program failed:\n{log}");

    // Same inputs as the C program, then the reference.
    let mut seed = 12345u32;
    let (d, b) = (70usize, 32usize);
    let layout = BlockLayout::new(d, b).unwrap();
    let dense = lcg_fill(&mut seed, d * d);
    let want = reference::split(&f64s(&dense), &layout).unwrap();
    assert_eq!(rel_err(&read_f32(&dir.join("split.bin")), &want), 0.0);
    let set = FactorSet::new(b, &[d]).unwrap();
    let want_tr = reference::factor_traces(&set, &want).unwrap();
    let got_tr = read_f32(&dir.join("traces.bin"));
    assert!(
        approx::abs_diff_eq!(got_tr[0] as f64, want_tr[0], epsilon = 1e-4),
        "{} vs {}",
        got_tr[0],
        want_tr[0]
    );
    // accumulate: x [n, d], then invert the statistics and apply to a gradient.
    let n = 100;
    let x = lcg_fill(&mut seed, n * d);
    let mut stats = vec![0.0; layout.buffer_len()];
    reference::accumulate(&f64s(&x), n, d, &layout, 1.0 / n as f64, 0.0, &mut stats).unwrap();
    assert!(rel_err(&read_f32(&dir.join("accumulate.bin")), &stats) < 1e-5);
    let acc32 = read_f32(&dir.join("accumulate.bin"));
    let (inv, info) =
        reference::invert_blocks(&f64s(&acc32), b, &vec![0.1; layout.blocks()]).unwrap();
    assert_eq!(info, vec![0; layout.blocks()]);
    let got_inv = read_f32(&dir.join("invert.bin"));
    assert!(
        rel_err(&got_inv, &inv) < 1e-4,
        "{}",
        rel_err(&got_inv, &inv)
    );
    let g_dim = 20;
    let grad = lcg_fill(&mut seed, g_dim * d);
    let want = reference::apply(
        None,
        &f64s(&grad),
        Some((&layout, &f64s(&got_inv))),
        g_dim,
        d,
    )
    .unwrap();
    assert!(rel_err(&read_f32(&dir.join("apply.bin")), &want) < 1e-5);
    assert!(log.contains("bad-input checks passed"), "{log}");
    assert!(log.contains("optimizer checks passed"), "{log}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The optimizer handle honours the KL clip: the factor it returns is `Thor`'s for the same
/// state, below 1 for a tight bound, exactly 1 without a clip, and bad arguments are
/// refused by name.
#[test]
fn optimizer_kl_clip_factor_through_the_c_abi() {
    use thor_kernels::thor::{LayerKind, Thor, ThorConfig};
    use thor_kernels_capi::*;
    let mut seed = 7u32;
    let (n, d_in, d_out) = (24usize, 6usize, 5usize);
    let acts = lcg_fill(&mut seed, n * d_in);
    let outg = lcg_fill(&mut seed, n * d_out);
    let grad = lcg_fill(&mut seed, d_out * (d_in + 1));
    let factor_for = |kl_clip: f32| -> (f32, f32) {
        let mut cfg = ThorOptimizerConfig {
            block: 0,
            stat_decay: 0.0,
            damping_l0: 0.0,
            damping_decay: 0.0,
            damping_every: 0.0,
            interval: 0,
            w1: 0.0,
            w2: 0.0,
            kl_clip: 0.0,
            retry: 0,
        };
        let mut opt = std::ptr::null_mut();
        let (mut id, mut obs) = (0i32, 0i32);
        let mut update = vec![f32::NAN; grad.len()];
        let mut f = f32::NAN;
        // SAFETY: every pointer addresses a live local of the size the header gives.
        unsafe {
            assert_eq!(thor_v1_optimizer_config_default(&mut cfg), ThorStatus::Ok);
            cfg.block = 32;
            cfg.kl_clip = kl_clip;
            assert_eq!(thor_v1_optimizer_create(&cfg, &mut opt), ThorStatus::Ok);
            assert_eq!(
                thor_v1_optimizer_add_linear(opt, d_in as i64, d_out as i64, 1, &mut id),
                ThorStatus::Ok
            );
            let st = thor_v1_optimizer_observe(
                opt,
                id,
                acts.as_ptr(),
                outg.as_ptr(),
                n as i64,
                &mut obs,
            );
            assert_eq!(st, ThorStatus::Ok);
            let st = thor_v1_optimizer_precondition(opt, id, grad.as_ptr(), update.as_mut_ptr());
            assert_eq!(st, ThorStatus::Ok);
            let (gp, up) = (grad.as_ptr(), update.as_ptr());
            let st = thor_v1_optimizer_kl_clip_factor(opt, 0.5, 1, &id, &gp, &up, &mut f);
            assert_eq!(st, ThorStatus::Ok);
            // Bad arguments: named, nothing written.
            let mut g = -1.0f32;
            for (lr, n_layers, layer, want) in [
                (f32::NAN, 1, id, "lr"),
                (-1.0, 1, id, "lr"),
                (0.5, 3, id, "n_layers"),
                (0.5, -1, id, "n_layers"),
                (0.5, 1, 3, "layer"),
            ] {
                let st =
                    thor_v1_optimizer_kl_clip_factor(opt, lr, n_layers, &layer, &gp, &up, &mut g);
                assert_eq!(st, ThorStatus::InvalidArgument, "{want}");
                let msg = std::ffi::CStr::from_ptr(thor_v1_last_error_message());
                assert!(msg.to_string_lossy().contains(want), "{want}: {msg:?}");
                assert_eq!(g, -1.0);
            }
            // A layer listed twice would count twice: refused (a second layer makes n = 2
            // legal).
            let mut id2 = -1;
            let st = thor_v1_optimizer_add_linear(opt, d_in as i64, d_out as i64, 1, &mut id2);
            assert_eq!((st, id2), (ThorStatus::Ok, 1));
            let (twice, gps, ups) = ([id, id], [gp, gp], [up, up]);
            let st = thor_v1_optimizer_kl_clip_factor(
                opt,
                0.5,
                2,
                twice.as_ptr(),
                gps.as_ptr(),
                ups.as_ptr(),
                &mut g,
            );
            assert_eq!(st, ThorStatus::InvalidArgument);
            let msg = std::ffi::CStr::from_ptr(thor_v1_last_error_message());
            assert!(msg.to_string_lossy().contains("twice"), "{msg:?}");
            assert_eq!(g, -1.0);
            thor_v1_optimizer_destroy(opt);
        }
        let dot: f64 = grad
            .iter()
            .zip(&update)
            .map(|(&a, &b)| a as f64 * b as f64)
            .sum();
        (f, dot as f32)
    };
    // A NaN bound is refused by name (it used to read as "no clip").
    {
        let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
        let mut opt = std::ptr::null_mut();
        // SAFETY: the config is filled by the library before it is read; `opt` is a local.
        unsafe {
            assert_eq!(
                thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
                ThorStatus::Ok
            );
            let mut cfg = cfg.assume_init();
            cfg.kl_clip = f32::NAN;
            assert_eq!(
                thor_v1_optimizer_create(&cfg, &mut opt),
                ThorStatus::InvalidArgument
            );
            let msg = std::ffi::CStr::from_ptr(thor_v1_last_error_message());
            assert!(msg.to_string_lossy().contains("kl_clip"), "{msg:?}");
            assert!(opt.is_null(), "nothing created");
        }
    }
    let (free, _) = factor_for(0.0);
    assert_eq!(free, 1.0, "no clip");
    let (loose, _) = factor_for(1e9);
    assert_eq!(loose, 1.0, "a loose clip");
    let (tight, dot) = factor_for(1e-6);
    let want = (1e-6f64 / (0.25 * dot as f64)).sqrt();
    assert!(
        tight < 1.0 && approx::relative_eq!(tight as f64, want, max_relative = 1e-5),
        "{tight} vs {want}"
    );
    // The same as the Rust optimizer's factor for the same pair.
    let mut t = Thor::new(ThorConfig {
        block: 32,
        kl_clip: Some(1e-6),
        backend: thor_kernels::BackendKind::Cpu,
        ..ThorConfig::thor()
    })
    .unwrap();
    let id = t
        .add_layer(LayerKind::Linear {
            inputs: d_in,
            outputs: d_out,
            bias: true,
        })
        .unwrap();
    t.observe(id, &acts, &outg, n).unwrap();
    let mut upd = vec![0.0; grad.len()];
    t.precondition(id, &grad, &mut upd).unwrap();
    assert_eq!(t.kl_clip_factor(0.5, [(&grad[..], &upd[..])]), tight);
}

/// A conv layer fed its raw tensors through the C ABI (a channels-last input, an NCHW
/// gradient) matches the Rust optimizer fed the explicit patch rows; bad geometry and a
/// non-conv layer are refused by name with nothing written.
#[test]
fn optimizer_observe_conv_through_the_c_abi() {
    use thor_kernels::thor::{LayerKind, Thor, ThorConfig};
    use thor_kernels::{reference, Conv2dGeometry, Patches, TensorLayout};
    use thor_kernels_capi::*;
    let mut seed = 11u32;
    let (n, c_in, h, w, c_out) = (2usize, 3usize, 7usize, 6usize, 4usize);
    let g = Conv2dGeometry::new(c_in, h, w, [3, 3])
        .with_stride([2, 1])
        .with_padding([1, 1]);
    let [ho, wo] = g.output().unwrap();
    // Channels last: [n, h, w, c] in memory, strides of the logical [n, c, h, w].
    let input = lcg_fill(&mut seed, n * h * w * c_in);
    let out_grad = lcg_fill(&mut seed, n * c_out * ho * wo);
    let a_view = Patches::new(g, n, TensorLayout::Nhwc);
    let g_view = Patches::positions(c_out, ho, wo, n, TensorLayout::Nchw);
    let kind = LayerKind::Conv2d {
        c_in,
        c_out,
        kh: 3,
        kw: 3,
        bias: true,
    };
    let d = kind.d_a() * kind.d_g();
    let grad = lcg_fill(&mut seed, d);
    let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    let rows_of = |x: &[f32], p: &Patches| -> Vec<f32> {
        reference::im2col(&f64s(x), p)
            .unwrap()
            .iter()
            .map(|&v| v as f32)
            .collect()
    };
    // The Rust optimizer on explicit rows.
    let mut want = vec![f32::NAN; d];
    {
        let mut t = Thor::new(ThorConfig {
            block: 32,
            backend: thor_kernels::BackendKind::Cpu,
            ..ThorConfig::thor()
        })
        .unwrap();
        let id = t.add_layer(kind).unwrap();
        let rows = n * ho * wo;
        t.observe(
            id,
            &rows_of(&input, &a_view),
            &rows_of(&out_grad, &g_view),
            rows,
        )
        .unwrap();
        t.precondition(id, &grad, &mut want).unwrap();
    }
    let s = |v: [usize; 4]| v.map(|x| x as i64);
    let tensors = ThorConvTensors {
        batch: n as i64,
        h: h as i64,
        w: w as i64,
        stride: [2, 1],
        padding: [1, 1],
        dilation: [1, 1],
        input_strides: s(a_view.strides),
        grad_strides: s(g_view.strides),
    };
    let mut got = vec![f32::NAN; d];
    // SAFETY: every pointer addresses a live local of the size the header gives.
    unsafe {
        let mut cfg = std::mem::MaybeUninit::<ThorOptimizerConfig>::uninit();
        assert_eq!(
            thor_v1_optimizer_config_default(cfg.as_mut_ptr()),
            ThorStatus::Ok
        );
        let mut cfg = cfg.assume_init();
        cfg.block = 32;
        let mut opt = std::ptr::null_mut();
        assert_eq!(thor_v1_optimizer_create(&cfg, &mut opt), ThorStatus::Ok);
        let (mut conv, mut lin) = (-1, -1);
        assert_eq!(
            thor_v1_optimizer_add_conv2d(opt, c_in as i64, c_out as i64, 3, 3, 1, &mut conv),
            ThorStatus::Ok
        );
        assert_eq!(
            thor_v1_optimizer_add_linear(opt, 4, 4, 0, &mut lin),
            ThorStatus::Ok
        );
        // Refused by name, `observation` untouched.
        let mut obs = -7;
        let bad = |f: fn(&mut ThorConvTensors)| {
            let mut t = tensors;
            f(&mut t);
            t
        };
        for (layer, t, want_arg) in [
            (lin, tensors, "layer"),
            (conv, bad(|t| t.stride = [0, 1]), "stride"),
            (conv, bad(|t| t.padding = [-1, 0]), "padding"),
            (
                conv,
                bad(|t| {
                    t.h = 1;
                    t.padding = [0, 0];
                }),
                "kernel",
            ),
            (conv, bad(|t| t.batch = 0), "batch"),
            (
                conv,
                bad(|t| t.input_strides = [i64::MAX / 2, 1, 1, 1]),
                "input_strides",
            ),
        ] {
            let st = thor_v1_optimizer_observe_conv(
                opt,
                layer,
                input.as_ptr(),
                out_grad.as_ptr(),
                &t,
                &mut obs,
            );
            assert_eq!(st, ThorStatus::InvalidArgument, "{want_arg}");
            let msg = std::ffi::CStr::from_ptr(thor_v1_last_error_message());
            assert!(
                msg.to_string_lossy().contains(want_arg),
                "{want_arg}: {msg:?}"
            );
            assert_eq!(obs, -7);
        }
        let st = thor_v1_optimizer_observe_conv(
            opt,
            conv,
            input.as_ptr(),
            out_grad.as_ptr(),
            std::ptr::null(),
            &mut obs,
        );
        assert_eq!(st, ThorStatus::InvalidArgument);
        let msg = std::ffi::CStr::from_ptr(thor_v1_last_error_message());
        assert!(msg.to_string_lossy().contains("tensors"), "{msg:?}");
        let st = thor_v1_optimizer_observe_conv(
            opt,
            conv,
            input.as_ptr(),
            out_grad.as_ptr(),
            &tensors,
            &mut obs,
        );
        assert_eq!((st, obs), (ThorStatus::Ok, 0));
        let st = thor_v1_optimizer_precondition(opt, conv, grad.as_ptr(), got.as_mut_ptr());
        assert_eq!(st, ThorStatus::Ok);
        thor_v1_optimizer_destroy(opt);
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&a, &b) in got.iter().zip(&want) {
        assert!(a.is_finite());
        num += (a as f64 - b as f64).powi(2);
        den += (b as f64).powi(2);
    }
    assert!((num / den).sqrt() < 1e-5, "rel err {}", (num / den).sqrt());
}
