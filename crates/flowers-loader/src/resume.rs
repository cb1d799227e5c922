//! Where a loader started again on a run picks up: it leaves out the batches the coordinator
//! already counted and those the broker confirmed to an earlier loader of the run (its
//! [`PublishLog`]), and publishes the rest of the plan.

use crate::LoaderError;
use flowers_broker::BatchKey;
use flowers_proto::v1 as pb;
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

/// The batches `status` (with its batch indices: `GetRun` with `include_batches`) counts: the
/// trained ones of every epoch and the evaluated ones of every evaluation.
pub fn counted_batches(status: &pb::RunStatus) -> BTreeSet<BatchKey> {
    let key = |epoch, validation, eval_part, batch_index| BatchKey {
        epoch,
        validation,
        eval_part,
        batch_index,
    };
    let mut counted = BTreeSet::new();
    for e in &status.epochs {
        counted.extend(
            e.trained_batch_indices
                .iter()
                .map(|&i| key(e.epoch, false, 0, i)),
        );
        counted.extend(
            e.validated_batch_indices
                .iter()
                .map(|&i| key(e.epoch, true, 0, i)),
        );
        for interim in &e.interim {
            counted.extend(
                interim
                    .validated_batch_indices
                    .iter()
                    .map(|&i| key(e.epoch, true, interim.part, i)),
            );
        }
    }
    counted
}

/// An append-only record, in the loader's cache folder, of the run's batches the broker
/// confirmed: a first line naming the run's plan, then one `epoch validation part index` line
/// per batch. Appends need no sync: a killed loader's writes are in the page cache, and a
/// torn last line is ignored.
#[derive(Debug)]
pub struct PublishLog {
    path: PathBuf,
    file: File,
}

impl PublishLog {
    /// The log of `run_id` in `cache_dir`.
    pub fn path(cache_dir: &Path, run_id: &str) -> PathBuf {
        cache_dir.join(format!("flowers-published-{run_id}.log"))
    }

    /// Opens the log at `path` for `plan` (a line that names the run's plan: what the batches
    /// are a function of). With `resume`, returns the batches it records when it was written
    /// for the same plan; otherwise (or for another plan) starts it afresh.
    pub fn open(
        path: &Path,
        plan: &str,
        resume: bool,
    ) -> Result<(PublishLog, BTreeSet<BatchKey>), LoaderError> {
        let io = |source| LoaderError::PublishLog {
            path: path.to_path_buf(),
            source,
        };
        let mut confirmed = BTreeSet::new();
        let mut same_plan = false;
        if resume && path.exists() {
            let mut lines = BufReader::new(File::open(path).map_err(io)?).lines();
            same_plan = lines.next().transpose().map_err(io)?.as_deref() == Some(plan);
            if same_plan {
                for line in lines {
                    match parse_key(&line.map_err(io)?) {
                        Some(key) => confirmed.insert(key),
                        // Torn by a kill mid-write: the last line only.
                        None => break,
                    };
                }
            } else {
                tracing::warn!(log = %path.display(), "the publish log is of another plan: starting it afresh");
            }
        }
        let file = if same_plan {
            OpenOptions::new().append(true).open(path).map_err(io)?
        } else {
            let mut file = File::create(path).map_err(io)?;
            writeln!(file, "{plan}").map_err(io)?;
            file
        };
        let log = PublishLog {
            path: path.to_path_buf(),
            file,
        };
        Ok((log, confirmed))
    }

    /// Records `keys` as confirmed.
    pub fn append(&mut self, keys: &[BatchKey]) -> Result<(), LoaderError> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut text = String::new();
        for k in keys {
            text.push_str(&format!(
                "{} {} {} {}\n",
                k.epoch, k.validation as u8, k.eval_part, k.batch_index
            ));
        }
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| LoaderError::PublishLog {
                path: self.path.clone(),
                source,
            })
    }
}

fn parse_key(line: &str) -> Option<BatchKey> {
    let mut fields = line.split(' ').map(|f| f.parse::<u32>().ok());
    let key = BatchKey {
        epoch: fields.next()??,
        validation: match fields.next()?? {
            0 => false,
            1 => true,
            _ => return None,
        },
        eval_part: fields.next()??,
        batch_index: fields.next()??,
    };
    fields.next().is_none().then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(epoch: u32, validation: bool, eval_part: u32, batch_index: u32) -> BatchKey {
        BatchKey {
            epoch,
            validation,
            eval_part,
            batch_index,
        }
    }

    #[test]
    fn the_log_returns_what_it_recorded_for_the_same_plan_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = PublishLog::path(dir.path(), "r1");
        let (mut log, before) = PublishLog::open(&path, "plan A", true).unwrap();
        assert!(before.is_empty());
        log.append(&[key(0, false, 0, 3), key(0, true, 2, 1)])
            .unwrap();
        drop(log);
        // A kill mid-write leaves a torn line behind.
        let mut torn = OpenOptions::new().append(true).open(&path).unwrap();
        write!(torn, "0 0 0").unwrap();
        drop(torn);
        let (_, again) = PublishLog::open(&path, "plan A", true).unwrap();
        assert_eq!(
            again,
            BTreeSet::from([key(0, false, 0, 3), key(0, true, 2, 1)])
        );
        let (_, other) = PublishLog::open(&path, "plan B", true).unwrap();
        assert!(other.is_empty(), "another plan's log is not used");
        let (_, fresh) = PublishLog::open(&path, "plan B", false).unwrap();
        assert!(fresh.is_empty());
    }

    #[test]
    fn counted_batches_cover_training_and_every_evaluation() {
        let status = pb::RunStatus {
            epochs: vec![pb::EpochStatus {
                epoch: 1,
                trained_batch_indices: vec![0, 2],
                validated_batch_indices: vec![1],
                interim: vec![pb::InterimEvaluation {
                    part: 1,
                    validated_batch_indices: vec![0],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(
            counted_batches(&status),
            BTreeSet::from([
                key(1, false, 0, 0),
                key(1, false, 0, 2),
                key(1, true, 0, 1),
                key(1, true, 1, 0)
            ])
        );
    }
}
