//! The coordinator of a training run: run and worker state, epoch accounting, parameter
//! averaging, checkpoints, and the gRPC server.
//!
//! - [`state`]: the pure state machine (runs, workers, rounds, epochs), time and ids passed in;
//! - [`Coordinator`]: drives it, saves it under the state directory ([`Store`]), averages
//!   rounds ([`tensors`]) off the async threads, fans events out to watchers;
//! - [`serve`] / [`ServerHandle`]: the tonic server (auth, TLS, reflection, shutdown) over
//!   [`CoordinatorService`];
//! - [`CoordinatorError`]: what it refuses or fails at, as gRPC statuses.
//!
//! The round and epoch protocol a trainer follows is in this crate's README.md. Clients use
//! `flowers-coordinator-client`, which this crate must not depend on (only its `testing`
//! helpers do), nor on any tensor library: tensors arrive as safetensors bytes.

mod coordinator;
mod error;
mod server;
mod service;
pub mod state;
mod store;
pub mod tensors;
#[cfg(feature = "testing")]
pub mod testing;

pub use coordinator::{Coordinator, CoordinatorConfig};
pub use error::{CoordinatorError, Result};
pub use server::{serve, BearerAuth, ServeError, ServeOptions, ServerHandle};
pub use service::CoordinatorService;
pub use store::Store;
