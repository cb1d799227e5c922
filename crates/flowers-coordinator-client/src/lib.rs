//! The coordinator's client: what the loader, the trainers and flowersctl use to talk to it.
//!
//! - [`CoordinatorClient`]: typed calls of `flowers.v1.Coordinator`, with the bearer token on
//!   every call, lazy (re)connection, and retries with [`Backoff`] while the coordinator is
//!   unreachable; [`RawClient`] is the generated client underneath, for other calls;
//! - [`ClientConfig`]: where and how to reach the coordinator;
//! - [`WorkerInfo`]: what a trainer tells about itself when registering;
//! - [`coordinator_serving`]: the standard gRPC health check, which needs no token;
//! - [`ClientError`]: what a call can fail with.
//!
//! The protocol a trainer follows is in `crates/flowers-coordinator/README.md`. This crate must
//! not depend on `flowers-coordinator`: its users should not link the server and its state
//! machine to talk to one.

mod client;
mod config;
mod error;
mod health;

pub use client::{CoordinatorClient, RawClient, WorkerInfo};
pub use config::{BearerToken, ClientConfig};
pub use error::{ClientError, ClientResult};
pub use flowers_retry::Backoff;
pub use health::{coordinator_serving, COORDINATOR_SERVICE};
