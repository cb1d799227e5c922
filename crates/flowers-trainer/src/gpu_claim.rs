//! One worker per GPU. Trainer replicas that see the same GPUs (compose's `--scale trainer=N`
//! with every GPU reserved for each replica) would all default to GPU 0; instead each claims a
//! GPU of its own by locking `gpu-<index>.lock` in a folder the replicas share. The lock is an
//! OS file lock, so it is released when the process exits, however it exits.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};

/// A GPU this process holds until it drops the claim (or exits).
#[derive(Debug)]
pub struct GpuClaim {
    pub index: usize,
    _lock: File,
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error("claim folder {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("all {visible} visible GPUs are claimed by other trainers (lock files in {}); run fewer replicas or give this one its own GPUs", dir.display())]
    AllClaimed { visible: usize, dir: PathBuf },
}

/// Claims the first of the `visible` GPUs whose lock file in `dir` is not held by another process.
pub fn claim_gpu(dir: &Path, visible: usize) -> Result<GpuClaim, ClaimError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ClaimError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    for index in 0..visible {
        let path = dir.join(format!("gpu-{index}.lock"));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io(&path))?;
        match file.try_lock() {
            Ok(()) => return Ok(GpuClaim { index, _lock: file }),
            Err(TryLockError::WouldBlock) => continue,
            Err(TryLockError::Error(e)) => return Err(io(&path)(e)),
        }
    }
    Err(ClaimError::AllClaimed {
        visible,
        dir: dir.to_path_buf(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_claim_gets_its_own_gpu_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let first = claim_gpu(dir.path(), 2).unwrap();
        let second = claim_gpu(dir.path(), 2).unwrap();
        assert_eq!((first.index, second.index), (0, 1));
        let err = claim_gpu(dir.path(), 2).unwrap_err();
        assert!(
            err.to_string().contains("all 2 visible GPUs are claimed"),
            "{err}"
        );
        drop(first);
        assert_eq!(
            claim_gpu(dir.path(), 2).unwrap().index,
            0,
            "a released GPU is free again"
        );
    }

    #[test]
    fn an_unusable_folder_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-folder");
        std::fs::write(&file, b"x").unwrap();
        let err = claim_gpu(&file.join("claims"), 1).unwrap_err();
        assert!(err.to_string().contains("not-a-folder"), "{err}");
    }
}
