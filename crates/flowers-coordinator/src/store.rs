//! On-disk layout under `--state-dir` ([`Store`]), and crash-safe writes of its files. It
//! moves bytes only: what a run's JSON or a checkpoint holds is not its business.
//!
//! ```text
//! <state-dir>/runs/<run-id>/run.json                      run state (JSON)
//! <state-dir>/runs/<run-id>/checkpoints/<id>.safetensors  averaged weights
//! ```

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use atomic_write_file::AtomicWriteFile;

use crate::error::{CoordinatorError, Result};

/// The state directory.
#[derive(Clone, Debug)]
pub struct Store {
    root: PathBuf,
}

impl Store {
    /// Opens (creating if needed) a state directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let root = root.into();
        let runs = root.join("runs");
        fs::create_dir_all(&runs)
            .map_err(|e| CoordinatorError::io("creating state directory", &runs, e))?;
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn run_file(&self, run_id: &str) -> PathBuf {
        self.root.join("runs").join(run_id).join("run.json")
    }

    pub fn checkpoint_file(&self, run_id: &str, checkpoint_id: &str) -> PathBuf {
        self.root
            .join("runs")
            .join(run_id)
            .join("checkpoints")
            .join(format!("{checkpoint_id}.safetensors"))
    }

    /// Contents of every `runs/*/run.json`.
    pub fn load_run_files(&self) -> Result<Vec<(PathBuf, Vec<u8>)>> {
        let runs = self.root.join("runs");
        let entries = fs::read_dir(&runs).map_err(|e| CoordinatorError::io("listing", &runs, e))?;
        let mut out = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| CoordinatorError::io("listing", &runs, e))?;
            let file = entry.path().join("run.json");
            match fs::read(&file) {
                Ok(bytes) => out.push((file, bytes)),
                // A run directory whose first save never completed holds nothing to resume.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(CoordinatorError::io("reading", &file, e)),
            }
        }
        out.sort();
        Ok(out)
    }

    /// Saves run `run_id`'s state (JSON) as its `run.json`.
    pub fn save_run(&self, run_id: &str, json: &[u8]) -> Result<()> {
        write_atomic(&self.run_file(run_id), json)
    }

    /// Saves a checkpoint's safetensors bytes.
    pub fn save_checkpoint(&self, run_id: &str, checkpoint_id: &str, bytes: &[u8]) -> Result<()> {
        write_atomic(&self.checkpoint_file(run_id, checkpoint_id), bytes)
    }

    pub fn remove(&self, path: &Path) {
        if let Err(e) = fs::remove_file(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %path.display(), error = %e, "could not remove an old checkpoint");
            }
        }
    }
}

/// Writes `bytes` to `path` so that a crash leaves either the old or the new file, creating
/// the directory if needed. (atomic-write-file writes a uniquely named temporary sibling,
/// fsyncs it, renames it over and fsyncs the directory.)
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(|e| CoordinatorError::io("creating", dir, e))?;
    let write = || -> std::io::Result<()> {
        let mut file = AtomicWriteFile::open(path)?;
        file.write_all(bytes)?;
        file.commit()
    };
    write().map_err(|e| CoordinatorError::io("writing", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = store.run_file("r1");
        store.save_run("r1", b"one").unwrap();
        store.save_run("r1", b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("run.json")]);
        assert_eq!(store.load_run_files().unwrap().len(), 1);
    }
}
