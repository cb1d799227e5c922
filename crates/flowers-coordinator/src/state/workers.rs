//! The workers of a run: registration, liveness (every call a worker makes counts as a sign of
//! life), and the sweep that marks silent workers lost.

use flowers_proto::v1 as pb;

use super::records::WorkerRecord;
use super::{check_id, event, Now, State, StatusDetail};
use crate::error::{CoordinatorError, Result};

impl State {
    pub fn register_worker(
        &mut self,
        req: &pb::RegisterWorkerRequest,
        now: Now,
    ) -> Result<pb::RegisterWorkerResponse> {
        let settings = self.settings.clone();
        let run = self.run_mut(&req.run_id)?;
        let id = if req.worker_id.is_empty() {
            let id = format!("w{}", run.next_worker);
            run.next_worker += 1;
            id
        } else {
            check_id("worker", &req.worker_id)?;
            req.worker_id.clone()
        };
        let worker = run
            .workers
            .entry(id.clone())
            .or_insert_with(|| WorkerRecord::new(id.clone(), now.instant));
        worker.host = req.host.clone();
        worker.device = req.device.clone();
        worker.gpu_name = req.gpu_name.clone();
        worker.lost = false;
        worker.last_seen = Some(now.instant);
        worker.last_heartbeat = now.unix;
        // It starts from the latest average, so nothing it trained before counts.
        worker.steps_since_sync = 0;
        let changed = worker.status();
        tracing::info!(run = %req.run_id, worker = %id, host = %req.host, device = %req.device, "worker registered");
        let checkpoint_id = run.latest.clone().unwrap_or_default();
        let status = run.status(&settings, StatusDetail::default());
        self.events.push((
            req.run_id.clone(),
            event(pb::run_event::Event::Worker(pb::WorkerChanged {
                worker: Some(changed),
            })),
        ));
        Ok(pb::RegisterWorkerResponse {
            worker_id: id,
            run: Some(status),
            checkpoint_id,
            heartbeat_interval_ms: (settings.worker_timeout.as_millis() / 3).clamp(10, 10_000)
                as u32,
            sync_every: settings.sync_every,
        })
    }

    /// Marks a worker alive, reviving it if it was lost.
    pub(super) fn touch(&mut self, run_id: &str, worker_id: &str, now: Now) -> Result<()> {
        let run = self
            .runs
            .get_mut(run_id)
            .ok_or_else(|| CoordinatorError::UnknownRun(run_id.to_owned()))?;
        let worker =
            run.workers
                .get_mut(worker_id)
                .ok_or_else(|| CoordinatorError::UnknownWorker {
                    run: run_id.to_owned(),
                    worker: worker_id.to_owned(),
                })?;
        worker.last_seen = Some(now.instant);
        worker.last_heartbeat = now.unix;
        if worker.lost {
            // Back after a network blip: it joins the next round, not the open one.
            worker.lost = false;
            tracing::info!(run = run_id, worker = worker_id, "lost worker is back");
            let changed = worker.status();
            self.dirty.insert(run_id.to_owned());
            self.events.push((
                run_id.to_owned(),
                event(pb::run_event::Event::Worker(pb::WorkerChanged {
                    worker: Some(changed),
                })),
            ));
        }
        Ok(())
    }

    pub fn heartbeat(
        &mut self,
        run_id: &str,
        worker_id: &str,
        now: Now,
    ) -> Result<pb::HeartbeatResponse> {
        self.touch(run_id, worker_id, now)?;
        self.maybe_open_round(run_id);
        Ok(self.run(run_id)?.directives(worker_id))
    }

    /// Marks workers silent for longer than the timeout as lost; returns the runs touched.
    pub fn sweep(&mut self, now: Now) -> Vec<String> {
        let timeout = self.settings.worker_timeout;
        let mut touched = Vec::new();
        for (run_id, run) in &mut self.runs {
            for w in run.workers.values_mut() {
                let silent = w
                    .last_seen
                    .is_some_and(|seen| now.instant.saturating_duration_since(seen) > timeout);
                if !w.lost && !w.in_sync && silent {
                    w.lost = true;
                    tracing::warn!(run = %run_id, worker = %w.id, "worker missed its heartbeats: lost");
                    self.events.push((
                        run_id.clone(),
                        event(pb::run_event::Event::Worker(pb::WorkerChanged {
                            worker: Some(w.status()),
                        })),
                    ));
                    touched.push(run_id.clone());
                }
            }
        }
        touched.dedup();
        self.dirty.extend(touched.iter().cloned());
        touched
    }
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::Settings;
    use super::*;
    use std::time::Duration;

    fn register(
        state: &mut State,
        worker_id: &str,
        now: Now,
    ) -> Result<pb::RegisterWorkerResponse> {
        let req = pb::RegisterWorkerRequest {
            run_id: RUN.into(),
            host: "h".into(),
            worker_id: worker_id.into(),
            ..Default::default()
        };
        state.register_worker(&req, now)
    }

    fn states(state: &State) -> Vec<bool> {
        state.runs[RUN].workers.values().map(|w| w.lost).collect()
    }

    #[test]
    fn workers_get_numbered_ids_and_keep_theirs_on_a_reconnect() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let (a, b) = (
            add_worker(&mut state, "a", clock.at(0)),
            add_worker(&mut state, "b", clock.at(0)),
        );
        assert_eq!((a.as_str(), b.as_str()), ("w1", "w2"));
        assert_eq!(event_kinds(&mut state), ["worker", "worker"]);
        let again = register(&mut state, "w1", clock.at(500)).unwrap();
        assert_eq!(again.worker_id, "w1");
        assert_eq!(state.runs[RUN].workers["w1"].last_heartbeat, 1000.5);
        assert_eq!(state.runs[RUN].workers.len(), 2);
        assert_eq!(again.heartbeat_interval_ms, 333, "a third of the timeout");
        let err = register(&mut state, "w.1", clock.at(500)).unwrap_err();
        assert!(matches!(err, CoordinatorError::Invalid(_)), "{err}");
        let mut other = State::new(Settings {
            sync_every: 0,
            worker_timeout: Duration::from_secs(3600),
        });
        other
            .register_run(Some(&config(1, 4, 1)), RUN, clock.at(0))
            .unwrap();
        let interval = register(&mut other, "", clock.at(0))
            .unwrap()
            .heartbeat_interval_ms;
        assert_eq!(interval, 10_000, "at most 10 s");
    }

    #[test]
    fn a_silent_worker_is_lost_after_the_timeout_and_back_with_its_next_call() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        add_worker(&mut state, "b", clock.at(0));
        state.heartbeat(RUN, &a, clock.at(900)).unwrap();
        state.take_events();
        state.take_dirty();
        assert!(
            state.sweep(clock.at(1000)).is_empty(),
            "exactly the timeout is not over it"
        );
        assert_eq!(state.sweep(clock.at(1001)), [RUN]);
        assert_eq!(states(&state), [false, true]);
        assert_eq!(event_kinds(&mut state), ["worker"]);
        assert_eq!(state.take_dirty().len(), 1);
        assert_eq!(state.sweep(clock.at(5000)), [RUN], "a is silent too now");
        assert!(state.sweep(clock.at(9000)).is_empty(), "lost once");
        state.heartbeat(RUN, "w2", clock.at(9000)).unwrap();
        assert_eq!(states(&state), [true, false]);
        assert_eq!(event_kinds(&mut state), ["worker", "worker"]);
    }

    #[test]
    fn a_worker_waiting_in_a_round_is_not_lost() {
        let clock = Clock::new();
        let mut state = state_with_run(1, config(1, 4, 1), clock.at(0));
        let a = add_worker(&mut state, "a", clock.at(0));
        report(&mut state, &a, 1, &[(0, 0)], clock.at(0)).unwrap();
        state
            .add_upload(RUN, &a, 1, upload(4), clock.at(0))
            .unwrap();
        assert!(state.sweep(clock.at(60_000)).is_empty());
    }

    #[test]
    fn calls_name_unknown_runs_and_workers() {
        let clock = Clock::new();
        let mut state = state_with_run(0, config(1, 4, 1), clock.at(0));
        let err = state.heartbeat("nope", "w1", clock.at(0)).unwrap_err();
        assert!(matches!(err, CoordinatorError::UnknownRun(_)), "{err}");
        let err = state.heartbeat(RUN, "w9", clock.at(0)).unwrap_err();
        assert!(
            matches!(err, CoordinatorError::UnknownWorker { .. }),
            "{err}"
        );
    }
}
