//! The coordinator: run and worker state, epoch accounting, parameter averaging,
//! checkpoints, the gRPC server and its client.
//!
//! - [`state`]: the pure state machine (runs, workers, rounds, epochs);
//! - [`Coordinator`]: drives it, saves it under the state directory, averages rounds;
//! - [`serve`]: the tonic server (auth, TLS, reflection, shutdown);
//! - [`CoordinatorClient`]: what trainers, the loader and flowersctl use.
//!
//! The round and epoch protocol a trainer follows is in this crate's README.md.

mod client;
mod coordinator;
mod error;
mod server;
mod service;
pub mod state;
mod store;
pub mod tensors;
#[cfg(feature = "testing")]
pub mod testing;

pub use client::{
    BearerToken, ClientConfig, ClientError, ClientResult, CoordinatorClient, RawClient,
    RetryPolicy, WorkerInfo,
};
pub use coordinator::{Coordinator, CoordinatorConfig};
pub use error::{CoordinatorError, Result};
pub use server::{serve, BearerAuth, ServeError, ServeOptions, ServerHandle, MAX_MESSAGE_BYTES};
pub use service::{CoordinatorService, CHUNK_BYTES};
pub use store::Store;
