//! The coordinator: run and worker state, epoch accounting, parameter averaging,
//! checkpoints and the gRPC server. Clients use `flowers-coordinator-client`.
//!
//! - [`state`]: the pure state machine (runs, workers, rounds, epochs);
//! - [`Coordinator`]: drives it, saves it under the state directory, averages rounds;
//! - [`serve`]: the tonic server (auth, TLS, reflection, shutdown).
//!
//! The round and epoch protocol a trainer follows is in this crate's README.md.

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
