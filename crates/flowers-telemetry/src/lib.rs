//! One tracing setup for every service binary: [`init`] (stderr, filtered by `RUST_LOG`).
//!
//! Binaries only call it; it must not depend on any other crate of the workspace.

use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
