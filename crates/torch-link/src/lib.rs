//! Called from the `build.rs` of every package that builds tch binaries or tests.
//!
//! torch-sys gives final binaries no rpath, and the linker's `--as-needed` drops
//! `libtorch_cuda`, so a binary may load another libtorch (and crash) or silently
//! run without CUDA. The package must depend on `torch-sys` directly so that
//! cargo hands its build script `DEP_TCH_LIBTORCH_LIB`.
//!
//! One function, [`emit`]. A build-dependency of those packages: it must not depend on
//! anything, so that it adds nothing to their build scripts' build.

/// Emits the link arguments; call it from `build.rs`.
pub fn emit() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB unset: add torch-sys as a direct dependency of this package");
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}
