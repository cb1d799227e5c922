//! The `trainer` binary allocates everything, libtorch's tensor buffers included, from jemalloc
//! with the settings main.rs builds in (see BENCHMARKS.md, "Allocator").

use std::process::{Command, Output};

fn trainer_version(envs: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .arg("--version")
        .envs(envs.iter().copied())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    out
}

#[test]
fn libtorch_binds_its_allocation_calls_to_the_binary() {
    // The dynamic linker's trace of every symbol binding, resolved at load time.
    let out = trainer_version(&[("LD_DEBUG", "bindings"), ("LD_BIND_NOW", "1")]);
    let trace = String::from_utf8_lossy(&out.stderr);
    // c10's CPU allocator takes tensor memory with posix_memalign and gives it back with free.
    for symbol in ["posix_memalign", "free"] {
        let bound_here = trace.lines().any(|line| {
            line.contains("binding file")
                && line.contains("libc10.so")
                && line.contains("/trainer [0]")
                && line.contains(&format!("symbol `{symbol}'"))
        });
        assert!(
            bound_here,
            "libc10.so's {symbol} is not the trainer's own (jemalloc)"
        );
    }
}

#[test]
fn big_buffers_stay_with_the_process_when_freed() {
    let out = trainer_version(&[("MALLOC_CONF", "stats_print:true")]);
    let stats = String::from_utf8_lossy(&out.stderr);
    assert!(
        stats.contains("opt.oversize_threshold: 0"),
        "jemalloc's statistics lack the built-in setting:\n{stats}"
    );
}
