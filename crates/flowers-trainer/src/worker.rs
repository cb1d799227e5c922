//! The thread that owns the model. libtorch steps block for seconds, so they run here, off the
//! async runtime that keeps the AMQP connection serviced; the runtime hands over closures and
//! awaits their results.

use std::sync::mpsc;
use std::thread;

use tokio::sync::oneshot;

type Job<S> = Box<dyn FnOnce(&mut S) + Send>;

/// The training thread died (a panic in libtorch or in a job); its message was printed by the
/// panic hook.
#[derive(Debug, thiserror::Error)]
#[error("the training thread stopped (it panicked; see the message above)")]
pub struct WorkerGone;

/// Owner of a state `S` that lives on one dedicated thread.
pub struct Worker<S> {
    jobs: Option<mpsc::Sender<Job<S>>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl<S: 'static> Worker<S> {
    /// Starts the thread and builds the state on it (`make` may fail; its error comes back).
    pub async fn spawn<E: Send + 'static>(
        name: &str,
        make: impl FnOnce() -> Result<S, E> + Send + 'static,
    ) -> Result<Self, E> {
        let (jobs, queue) = mpsc::channel::<Job<S>>();
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread = thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                let mut state = match make() {
                    Ok(state) => {
                        let _ = ready_tx.send(Ok(()));
                        state
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                while let Ok(job) = queue.recv() {
                    job(&mut state);
                }
            })
            .expect("spawning the training thread");
        let worker = Self {
            jobs: Some(jobs),
            thread: Some(thread),
        };
        match ready_rx.await {
            Ok(Ok(())) => Ok(worker),
            Ok(Err(e)) => Err(e),
            Err(_) => panic!("the training thread panicked while building its state"),
        }
    }

    /// Runs `f` on the thread with the state and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, WorkerGone> {
        let (tx, rx) = oneshot::channel();
        let job: Job<S> = Box::new(move |state| {
            let _ = tx.send(f(state));
        });
        self.jobs
            .as_ref()
            .expect("jobs sender lives until drop")
            .send(job)
            .map_err(|_| WorkerGone)?;
        rx.await.map_err(|_| WorkerGone)
    }
}

impl<S> Drop for Worker<S> {
    fn drop(&mut self) {
        // Closing the queue ends the thread's loop; joining makes the state's drop (freeing
        // device memory) happen before the worker is gone.
        self.jobs.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn runs_jobs_in_order_on_one_thread() {
        let w = Worker::spawn("t", || Ok::<_, String>(Vec::<u32>::new()))
            .await
            .unwrap();
        let main_thread = thread::current().id();
        for i in 0..3 {
            let id = w
                .call(move |v| {
                    v.push(i);
                    thread::current().id()
                })
                .await
                .unwrap();
            assert_ne!(id, main_thread);
        }
        assert_eq!(w.call(|v| v.clone()).await.unwrap(), vec![0, 1, 2]);
    }

    #[tokio::test]
    async fn build_errors_come_back() {
        let r = Worker::<u8>::spawn("t", || Err::<u8, _>("no model".to_owned())).await;
        assert_eq!(r.err().as_deref(), Some("no model"));
    }

    #[tokio::test]
    async fn a_panicking_job_reports_worker_gone() {
        let w = Worker::spawn("t", || Ok::<_, ()>(0u8)).await.unwrap();
        let r = w.call(|_| -> u8 { panic!("boom") }).await;
        assert!(r.is_err());
        assert!(w.call(|s| *s).await.is_err());
    }
}
