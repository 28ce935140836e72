//! Both kernel build paths, proven on every run: the nvcc fatbin really holds SASS for the
//! configured architectures, and every kernel source compiles under NVRTC.
#![cfg(feature = "cuda")]

use thor_kernels::cuda::{self, kernels};

macro_rules! skip_note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// (kind, arch) of every entry of a fatbin: kind 1 is PTX, kind 2 is SASS (ELF).
fn fatbin_entries(fb: &[u8]) -> Vec<(u16, u32)> {
    let u16_at = |o: usize| u16::from_le_bytes([fb[o], fb[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(fb[o..o + 4].try_into().unwrap());
    let u64_at = |o: usize| u64::from_le_bytes(fb[o..o + 8].try_into().unwrap());
    assert_eq!(u32_at(0), 0xBA55_ED50, "not a fatbin (magic)");
    let header = u16_at(6) as usize;
    let end = header + u64_at(8) as usize;
    assert!(end <= fb.len(), "fatbin size field past the end");
    let mut off = header;
    let mut out = Vec::new();
    while off < end {
        let kind = u16_at(off);
        let entry_header = u32_at(off + 4) as usize;
        let payload = u64_at(off + 8) as usize;
        out.push((kind, u32_at(off + 28)));
        off += entry_header + payload;
    }
    out
}

#[test]
fn fatbin_holds_sass_for_every_configured_arch() {
    let missing: Vec<_> = kernels::MODULES
        .iter()
        .filter(|m| m.fatbin.is_none())
        .map(|m| m.name)
        .collect();
    if !missing.is_empty() {
        if required("THOR_REQUIRE_NVCC") {
            panic!(
                "THOR_REQUIRE_NVCC=1 but modules {missing:?} have no fatbin (build without nvcc?)"
            );
        }
        skip_note!("SKIPPED fatbin check: built without nvcc (modules {missing:?} use NVRTC); set THOR_REQUIRE_NVCC=1 to fail instead");
        return;
    }
    let archs = kernels::FATBIN_ARCHS;
    if std::env::var("THOR_CUDA_ARCHS").is_err() {
        assert_eq!(archs, &[80, 90], "default architectures");
    }
    let newest = *archs.iter().max().unwrap();
    for m in kernels::MODULES {
        let entries = fatbin_entries(m.fatbin.unwrap());
        for &a in archs {
            assert!(
                entries.contains(&(2, a)),
                "module {}: no SASS for sm_{a} in {entries:?}",
                m.name
            );
        }
        assert!(
            entries.contains(&(1, newest)),
            "module {}: no PTX for compute_{newest} in {entries:?}",
            m.name
        );
    }
}

/// The kernel names a source declares (`extern "C" __global__ ... name(`).
fn kernel_names(src: &str) -> Vec<String> {
    let flat = src.replace('\n', " ");
    let mut names = Vec::new();
    for part in flat.split("extern \"C\" __global__").skip(1) {
        let mut rest = part.trim_start();
        if let Some(r) = rest.strip_prefix("void") {
            rest = r.trim_start();
        }
        if let Some(r) = rest.strip_prefix("__launch_bounds__") {
            // Balanced parentheses: the bound may be an expression.
            let mut depth = 0;
            let close = r
                .char_indices()
                .find(|&(_, c)| {
                    depth += (c == '(') as i32 - (c == ')') as i32;
                    c == ')' && depth == 0
                })
                .unwrap()
                .0;
            rest = r[close + 1..].trim_start();
            rest = rest.trim_start_matches('\\').trim_start();
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect();
        // A name built by token pasting in a macro (`invert_chol_b##B##_f32`) or given as a
        // macro parameter (`NAME`) is checked through the launchers' kernel list instead.
        let macro_param = name.chars().all(|c| c.is_ascii_uppercase() || c == '_');
        if !rest[name.len()..].starts_with("##") && !macro_param {
            names.push(name);
        }
    }
    names
}

#[test]
fn every_kernel_source_compiles_with_nvrtc() {
    if !cuda::nvrtc_present() {
        if required("THOR_REQUIRE_NVRTC") {
            panic!("THOR_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded (LD_LIBRARY_PATH?)");
        }
        skip_note!(
            "SKIPPED NVRTC compile: libnvrtc not found; set THOR_REQUIRE_NVRTC=1 to fail instead"
        );
        return;
    }
    assert!(!kernels::MODULES.is_empty());
    for m in kernels::MODULES {
        let mut names = kernel_names(m.source);
        names.extend(
            thor_kernels::cuda::raw::kernels::ALL
                .iter()
                .filter(|k| k.module == m.name)
                .map(|k| k.name.to_string()),
        );
        names.sort();
        names.dedup();
        assert!(!names.is_empty(), "module {} declares no kernels", m.name);
        for arch in [80, 90] {
            let ptx = cuda::compile_nvrtc(m, arch)
                .unwrap_or_else(|e| panic!("{e}"))
                .to_src();
            for n in &names {
                assert!(
                    ptx.contains(&format!(".entry {n}(")),
                    "module {}: no entry {n} in PTX",
                    m.name
                );
            }
            // A CUDA 13.0 driver (580) accepts PTX ISA up to 9.0; newer NVRTC parts emit more.
            let version = ptx
                .lines()
                .find_map(|l| l.trim().strip_prefix(".version "))
                .expect("PTX .version line");
            let (maj, min) = version.split_once('.').unwrap();
            let v = (
                maj.parse::<u32>().unwrap(),
                min.trim().parse::<u32>().unwrap(),
            );
            assert!(
                v <= (9, 0),
                "PTX .version {version} is newer than a CUDA 13.0 driver accepts"
            );
        }
    }
}

#[test]
fn every_launched_kernel_is_in_the_fatbin() {
    use thor_kernels::cuda::raw::kernels as k;
    for id in k::ALL {
        let m = kernels::find(id.module).unwrap_or_else(|| panic!("no module {}", id.module));
        let Some(fb) = m.fatbin else {
            if required("THOR_REQUIRE_NVCC") {
                panic!("THOR_REQUIRE_NVCC=1 but module {} has no fatbin", m.name);
            }
            skip_note!(
                "SKIPPED fatbin symbol check for {}: built without nvcc",
                id.name
            );
            continue;
        };
        // The SASS ELF's string table holds each entry's name.
        let needle = id.name.as_bytes();
        assert!(
            fb.windows(needle.len()).any(|w| w == needle),
            "{} not in the {}.cu fatbin",
            id.name,
            id.module
        );
    }
}
