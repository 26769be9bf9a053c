//! Every CUDA kernel family compiles with NVRTC for Ampere (sm_80) and
//! Hopper (sm_90), the CUBINs are cached on disk by source, architecture
//! and compiler version, and ptxas's resource report is read: registers
//! and shared memory of each kernel are printed, and no kernel spills.
//!
//! Needs no GPU, only NVRTC (NVIDIA's nvidia-cuda-nvrtc wheel) and, for the
//! report, ptxas (nvidia-cuda-nvcc) at `$AITL_PTXAS`; `scripts/cuda-tools`
//! installs both and CI sets `AITL_REQUIRE_NVRTC=1`, so there a missing
//! library fails instead of skipping.

use std::{io::Write, path::Path, process::Command};

use aitl::backend::cuda::{
    compile::{self, KernelCache},
    kernels::{FAMILIES, KernelFamily, KernelId},
};

const ARCHS: [&str; 2] = ["sm_80", "sm_90"];

/// Printed past the test harness's capture, so a skip shows in the log.
fn say(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// Whether to run: NVRTC found, or a skip said out loud (a failure where
/// CI requires NVRTC).
fn nvrtc_here(test: &str) -> bool {
    match compile::nvrtc_version() {
        Ok(_) => true,
        Err(e) if std::env::var_os("AITL_REQUIRE_NVRTC").is_some() => panic!("{test}: AITL_REQUIRE_NVRTC is set: {e}"),
        Err(e) => {
            say(&format!("{test}: skipped: {e}"));
            false
        }
    }
}

#[test]
fn every_family_compiles_for_ampere_and_hopper_with_all_entry_points() {
    if !nvrtc_here("every_family_compiles") {
        return;
    }
    let (major, minor) = compile::nvrtc_version().unwrap();
    let supported = compile::supported_archs().unwrap();
    say(&format!("NVRTC {major}.{minor}, architectures {supported:?}"));
    for arch in ARCHS {
        let number: i32 = arch[3..].parse().unwrap();
        assert!(supported.contains(&number), "NVRTC {major}.{minor} cannot target {arch}");
        for family in FAMILIES {
            let compiled = compile::compile(family, arch, &[]).unwrap_or_else(|e| panic!("{e}"));
            let cubin = compiled.cubin.as_ref().expect("a real architecture gives a CUBIN");
            assert_eq!(&cubin[..4], b"\x7fELF", "{} for {arch}: a CUBIN is an ELF file", family.name);
            for id in KernelId::ALL.iter().filter(|id| std::ptr::eq(id.family().get(), family)) {
                assert!(
                    compiled.ptx.contains(&format!(".entry {}(", id.entry())),
                    "{} for {arch} has no entry {}",
                    family.name,
                    id.entry()
                );
            }
            assert!(!compiled.log.contains("warning"), "{} for {arch}: NVRTC warns:\n{}", family.name, compiled.log);
        }
    }
}

#[test]
fn a_bad_kernel_fails_with_nvrtcs_log() {
    if !nvrtc_here("a_bad_kernel_fails") {
        return;
    }
    let broken = KernelFamily::new(
        "broken.cu",
        "#include \"common.cuh\"\nextern \"C\" __global__ void broken(float* x) { x[0] = undeclared_name; }\n",
    );
    match compile::compile(&broken, "sm_90", &[]) {
        Ok(_) => panic!("a kernel naming an undeclared variable compiled"),
        Err(e) => {
            let message = e.to_string();
            assert!(message.contains("broken.cu") && message.contains("sm_90"), "{message}");
            assert!(message.contains("undeclared_name"), "NVRTC's log is kept: {message}");
        }
    }
}

#[test]
fn cubins_are_cached_by_source_architecture_and_compiler() {
    if !nvrtc_here("cubins_are_cached") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = KernelCache::new(dir.path());
    let family = &FAMILIES[0];
    let (first, compiled) = cache.cubin(family, "sm_90").unwrap();
    assert!(compiled, "an empty cache compiles");
    let (again, compiled) = cache.cubin(family, "sm_90").unwrap();
    assert!(!compiled, "the second load reads the file");
    assert_eq!(first, again);
    let version = compile::nvrtc_version().unwrap();
    let (hopper, ampere) = (cache.path(family, "sm_90", version), cache.path(family, "sm_80", version));
    assert_ne!(hopper, ampere);
    assert!(hopper.exists() && !ampere.exists());
    assert_ne!(cache.path(family, "sm_90", (version.0, version.1 + 1)), hopper, "the compiler version is in the key");
    // A corrupt cache file is the loader's problem, not the cache's: the
    // key moves with the source, so a changed kernel never reads it.
    assert_ne!(cache.path(&FAMILIES[1], "sm_90", version), hopper);
}

/// One kernel's line of ptxas's report.
#[derive(Debug, Default)]
struct Resources {
    registers: u32,
    shared_bytes: u32,
    stack_bytes: u32,
    spill_stores: u32,
    spill_loads: u32,
}

/// Reads `ptxas -v` output: a "Compiling entry function 'X'" line, then
/// "Function properties for X: N bytes stack frame, N bytes spill stores,
/// N bytes spill loads" and "Used N registers, … N bytes smem …".
fn parse_report(report: &str) -> Vec<(String, Resources)> {
    let number_before = |line: &str, unit: &str| -> u32 {
        line.split(',')
            .find(|part| part.contains(unit))
            .and_then(|part| part.split_whitespace().rev().find_map(|w| w.parse().ok()))
            .unwrap_or(0)
    };
    let mut kernels: Vec<(String, Resources)> = Vec::new();
    for line in report.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or_default().to_string();
            kernels.push((name, Resources::default()));
        } else if let Some((_, r)) = kernels.last_mut() {
            if line.contains("bytes stack frame") {
                r.stack_bytes = number_before(line, "stack frame");
                r.spill_stores = number_before(line, "spill stores");
                r.spill_loads = number_before(line, "spill loads");
            } else if line.contains("Used") && line.contains("registers") {
                let used = line.split("Used").nth(1).unwrap_or_default();
                r.registers = used.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or(0);
                r.shared_bytes = number_before(line, "smem");
            }
        }
    }
    kernels
}

#[test]
fn ptxas_reports_no_spills_and_prints_each_kernels_resources() {
    if !nvrtc_here("ptxas_report") {
        return;
    }
    let ptxas = match std::env::var("AITL_PTXAS") {
        Ok(path) if Path::new(&path).exists() => path,
        _ if std::env::var_os("AITL_REQUIRE_NVRTC").is_some() => {
            panic!("AITL_REQUIRE_NVRTC is set but AITL_PTXAS is not")
        }
        _ => return say("ptxas_report: skipped: AITL_PTXAS does not name ptxas (scripts/cuda-tools installs it)"),
    };
    let dir = tempfile::tempdir().unwrap();
    let mut table =
        vec![format!("{:<28} {:>5} {:>5} {:>9} {:>7} {:>6}", "kernel", "arch", "regs", "smem B", "stack B", "spills")];
    for arch in ARCHS {
        for family in FAMILIES {
            let compiled = compile::compile(family, arch, &[]).unwrap();
            let ptx = dir.path().join(format!("{}-{arch}.ptx", family.name));
            std::fs::write(&ptx, &compiled.ptx).unwrap();
            let out = Command::new(&ptxas)
                .args([&format!("-arch={arch}"), "-v", "-o"])
                .arg(dir.path().join("out.cubin"))
                .arg(&ptx)
                .output()
                .unwrap();
            let report = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "ptxas rejected {} for {arch}:\n{report}", family.name);
            let kernels = parse_report(&report);
            let entries: Vec<&str> = KernelId::ALL
                .iter()
                .filter(|id| std::ptr::eq(id.family().get(), family))
                .map(|id| id.entry())
                .collect();
            for entry in &entries {
                assert!(kernels.iter().any(|(name, _)| name == entry), "ptxas reported nothing for {entry}:\n{report}");
            }
            for (name, r) in kernels {
                assert!(r.registers > 0, "{name}: no register count read from:\n{report}");
                assert_eq!((r.spill_stores, r.spill_loads), (0, 0), "{name} spills on {arch}:\n{report}");
                table.push(format!(
                    "{name:<28} {arch:>5} {:>5} {:>9} {:>7} {:>6}",
                    r.registers,
                    r.shared_bytes,
                    r.stack_bytes,
                    r.spill_stores + r.spill_loads
                ));
            }
        }
    }
    say(&table.join("\n"));
}

#[test]
fn the_report_parser_reads_ptxas_lines() {
    let report = "ptxas info    : 0 bytes gmem\n\
        ptxas info    : Compiling entry function 'score_rows_f32' for 'sm_90'\n\
        ptxas info    : Function properties for score_rows_f32\n\
        \x20   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
        ptxas info    : Used 40 registers, used 1 barriers, 8192 bytes smem, 400 bytes cmem[0]\n";
    let kernels = parse_report(report);
    assert_eq!(kernels.len(), 1);
    let (name, r) = &kernels[0];
    assert_eq!(name, "score_rows_f32");
    assert_eq!((r.registers, r.shared_bytes, r.stack_bytes, r.spill_stores, r.spill_loads), (40, 8192, 8, 4, 12));
}
