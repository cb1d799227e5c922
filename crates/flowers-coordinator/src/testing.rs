//! For tests, here and in the services, that talk to a real coordinator over gRPC: a server on a
//! free loopback port, and clients whose retries give up in seconds rather than after the
//! production budget, so that a broken test fails fast.

use std::time::Duration;

use flowers_coordinator_client::{Backoff, ClientConfig};

use crate::{Coordinator, CoordinatorConfig, ServeError, ServeOptions, ServerHandle};

/// Serves a coordinator opened with `config` on a free loopback port, plain HTTP/2, requiring
/// `token` where one is given.
pub async fn serve_on_free_port(
    config: CoordinatorConfig,
    token: Option<&str>,
) -> Result<ServerHandle, ServeError> {
    let options = ServeOptions {
        token: token.map(Into::into),
        tls: None,
    };
    ServerHandle::start(Coordinator::open(config)?, "127.0.0.1:0", options).await
}

/// A client configuration for `server`, with `token`, retrying for 10 s at the most.
pub fn client_config(server: &ServerHandle, token: Option<&str>) -> ClientConfig {
    ClientConfig::new(server.url())
        .token(token.map(Into::into))
        .retry(Backoff {
            initial: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            give_up_after: Duration::from_secs(10),
        })
}
