//! The standard gRPC health check (`grpc.health.v1.Health/Check`) of a coordinator. The
//! coordinator answers it without a token, so container probes (`coordinator probe`) carry
//! none.

use std::time::Duration;

use tonic::transport::Endpoint;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::error::{ClientError, ClientResult};

/// The service name the coordinator reports its health under.
pub const COORDINATOR_SERVICE: &str = "flowers.v1.Coordinator";

/// Whether the coordinator at `address` (plain `http://` only) serves runs: one connection
/// attempt and one call, both within `timeout`, no retries.
pub async fn coordinator_serving(address: &str, timeout: Duration) -> ClientResult<bool> {
    let endpoint_err = |source| ClientError::Endpoint {
        address: address.to_owned(),
        source,
    };
    let channel = Endpoint::from_shared(address.to_owned())
        .map_err(endpoint_err)?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(endpoint_err)?;
    let reply = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: COORDINATOR_SERVICE.to_owned(),
        })
        .await
        .map_err(|status| ClientError::Status {
            call: "Health/Check",
            status,
        })?;
    Ok(reply.into_inner().status() == ServingStatus::Serving)
}
