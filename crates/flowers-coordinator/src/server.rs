//! Serving ([`serve`], [`ServerHandle`], [`ServeOptions`], [`ServeError`]): bearer-token check
//! ([`BearerAuth`]), optional TLS, reflection, the standard gRPC health service (answered
//! without a token, so that container probes need none), message limits, the lost-worker
//! sweeper, and graceful shutdown with a final save. The shutdown request itself comes from the
//! caller.

use std::future::Future;

use flowers_proto::v1::coordinator_server::CoordinatorServer;
use flowers_proto::MAX_MESSAGE_BYTES;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic::{Request, Status};
use tonic_health::ServingStatus;

use crate::coordinator::Coordinator;
use crate::service::CoordinatorService;

/// Transport errors while serving.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("TLS configuration: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving gRPC: {0}")]
    Transport(#[source] tonic::transport::Error),
    #[error(transparent)]
    Coordinator(#[from] crate::CoordinatorError),
}

/// How the server authenticates and encrypts.
#[derive(Clone, Debug, Default)]
pub struct ServeOptions {
    /// Required bearer token; `None` serves without authentication.
    pub token: Option<String>,
    /// PEM certificate chain and private key; `None` serves plain HTTP/2.
    pub tls: Option<(Vec<u8>, Vec<u8>)>,
}

/// Checks `authorization: Bearer <token>` on every call.
#[derive(Clone)]
pub struct BearerAuth {
    expected: Option<Vec<u8>>,
}

impl BearerAuth {
    pub fn new(token: Option<&str>) -> Self {
        Self {
            expected: token.map(|t| format!("Bearer {t}").into_bytes()),
        }
    }
}

/// Equal-length comparison that does not stop at the first difference.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.expected else {
            return Ok(req);
        };
        match req.metadata().get("authorization") {
            None => Err(Status::unauthenticated(
                "missing authorization: Bearer <token> metadata",
            )),
            Some(v) if constant_time_eq(v.as_bytes(), expected) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong bearer token")),
        }
    }
}

/// Serves `coordinator` on `listener` until `shutdown` resolves, then stops
/// waiters, lets in-flight calls finish and saves every run.
pub async fn serve(
    coordinator: Coordinator,
    listener: TcpListener,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let auth = BearerAuth::new(options.token.as_deref());
    let rpc = CoordinatorServer::new(CoordinatorService::new(coordinator.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(flowers_proto::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServer<CoordinatorService>>()
        .await;
    let mut builder = Server::builder();
    if let Some((cert, key)) = &options.tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
            .map_err(ServeError::Tls)?;
    }
    let sweeper = {
        let c = coordinator.clone();
        tokio::spawn(async move { c.run_sweeper().await })
    };
    let stopping = {
        let c = coordinator.clone();
        async move {
            shutdown.await;
            tracing::info!("shutting down");
            // Probes see the coordinator go before its port does.
            health_reporter
                .set_not_serving::<CoordinatorServer<CoordinatorService>>()
                .await;
            health_reporter
                .set_service_status("", ServingStatus::NotServing)
                .await;
            c.begin_shutdown();
        }
    };
    tracing::info!(addr = ?listener.local_addr().ok(), tls = options.tls.is_some(), auth = options.token.is_some(), "coordinator listening");
    let served = builder
        .add_service(InterceptedService::new(rpc, auth.clone()))
        .add_service(InterceptedService::new(reflection, auth))
        .add_service(health)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopping)
        .await;
    coordinator.begin_shutdown();
    let _ = sweeper.await;
    coordinator.save_all().await?;
    tracing::info!("state saved");
    served.map_err(ServeError::Transport)
}

/// A coordinator served in the background (tests, embedding in other tools).
pub struct ServerHandle {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
}

impl ServerHandle {
    /// Serves `coordinator` on `addr` (port 0 picks a free one) in a background task.
    pub async fn start(
        coordinator: Coordinator,
        addr: &str,
        options: ServeOptions,
    ) -> Result<Self, ServeError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| crate::CoordinatorError::io("binding", addr, e))?;
        let addr = listener
            .local_addr()
            .map_err(|e| crate::CoordinatorError::io("binding", "listener", e))?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(coordinator, listener, options, async move {
            let _ = stopped.await;
        }));
        Ok(Self {
            addr,
            stop: Some(stop),
            task,
        })
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Shuts down gracefully and waits for the final save.
    pub async fn shutdown(mut self) -> Result<(), ServeError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task).await.expect("server task")
    }
}
