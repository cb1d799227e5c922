//! Container health checks for services that serve nothing a probe could ask: the loader and
//! the trainer. While the process's async runtime runs, [`keep_fresh`] rewrites a liveness
//! file ([`LivenessFile`]) every few seconds; `<binary> health` ([`HealthArgs::check`]) succeeds
//! while that file is younger than `--max-age`. So a health check sees a process that has stopped or whose
//! runtime is wedged; a training step that hangs is the coordinator's to notice (heartbeats).
//!
//! Owns the file's path, its refresh and its check; must not depend on any other crate of the
//! workspace.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often a running service rewrites its liveness file.
pub const REFRESH: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LivenessError {
    #[error("no liveness file to check: set --liveness-file or FLOWERS_LIVENESS_FILE as the service has it")]
    NoFile,
    #[error("liveness file {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("liveness file {} is {age:?} old (at most {max_age:?} allowed): the process stopped refreshing it", path.display())]
    Stale {
        path: PathBuf,
        age: Duration,
        max_age: Duration,
    },
}

/// The liveness file of a service (off unless named; the images name one).
#[derive(Debug, Clone, clap::Args)]
pub struct LivenessFile {
    /// A file this service rewrites every few seconds while it runs, for container health
    /// checks (`health`).
    #[arg(long = "liveness-file", env = "FLOWERS_LIVENESS_FILE")]
    pub path: Option<PathBuf>,
}

impl LivenessFile {
    /// Starts refreshing the file, if one is named (see [`keep_fresh`]).
    pub fn keep_fresh(&self) {
        if let Some(path) = &self.path {
            keep_fresh(path.clone(), REFRESH);
        }
    }
}

/// The `health` subcommand: checks the liveness file of a running service.
#[derive(Debug, Clone, clap::Args)]
pub struct HealthArgs {
    #[command(flatten)]
    pub file: LivenessFile,
    /// Oldest the file may be, in seconds, for the service to count as alive.
    #[arg(long, default_value_t = 30)]
    pub max_age: u64,
}

impl HealthArgs {
    /// Succeeds while the file is younger than `--max-age`; returns its age.
    pub fn check(&self) -> Result<Duration, LivenessError> {
        let path = self.file.path.as_deref().ok_or(LivenessError::NoFile)?;
        check(path, Duration::from_secs(self.max_age), SystemTime::now())
    }

    /// [`check`](Self::check), printing the file's age when it passes: the whole subcommand.
    pub fn report(&self) -> Result<(), LivenessError> {
        let age = self.check()?;
        println!(
            "alive: liveness file refreshed {:.1} s ago",
            age.as_secs_f64()
        );
        Ok(())
    }
}

/// The age of the liveness file at `now`, if at most `max_age`.
pub fn check(path: &Path, max_age: Duration, now: SystemTime) -> Result<Duration, LivenessError> {
    let io = |source| LivenessError::Io {
        path: path.to_path_buf(),
        source,
    };
    let modified = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .map_err(io)?;
    // A file from the future (clock steps) counts as fresh.
    let age = now.duration_since(modified).unwrap_or_default();
    if age > max_age {
        return Err(LivenessError::Stale {
            path: path.to_path_buf(),
            age,
            max_age,
        });
    }
    Ok(age)
}

/// Rewrites `path` now and then every `every` (services: [`REFRESH`]) on the current tokio
/// runtime, for as long as the process runs. A failed write is logged once and tried again
/// at the next refresh.
pub fn keep_fresh(path: PathBuf, every: Duration) {
    tokio::spawn(async move {
        let mut failing = false;
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            match tokio::fs::write(&path, b"alive\n").await {
                Ok(()) => failing = false,
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(file = %path.display(), error = %e, "cannot refresh the liveness file: health checks will fail");
                }
                Err(_) => {}
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_file_passes_and_a_stale_or_missing_one_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alive");
        let max_age = Duration::from_secs(30);
        let err = check(&path, max_age, SystemTime::now()).unwrap_err();
        assert!(matches!(err, LivenessError::Io { .. }), "{err}");
        std::fs::write(&path, b"alive\n").unwrap();
        let written = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert!(check(&path, max_age, written + Duration::from_secs(29)).is_ok());
        let err = check(&path, max_age, written + Duration::from_secs(31)).unwrap_err();
        assert!(err.to_string().contains("stopped refreshing"), "{err}");
    }

    #[tokio::test]
    async fn keep_fresh_writes_at_once_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alive");
        let every = Duration::from_millis(50);
        keep_fresh(path.clone(), every);
        let appears = || async {
            for _ in 0..200 {
                if path.exists() {
                    return true;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            false
        };
        assert!(appears().await, "written on the first tick");
        std::fs::remove_file(&path).unwrap();
        assert!(appears().await, "written again a refresh later");
    }
}
