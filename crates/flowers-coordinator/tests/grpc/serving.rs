//! Serving: restarts, authentication, ids, reflection, health and TLS.

use flowers_coordinator::{Coordinator, CoordinatorConfig, ServeOptions, ServerHandle};
use flowers_coordinator_client::{
    coordinator_serving, Backoff, ClientConfig, ClientError, CoordinatorClient, WorkerInfo,
};
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn a_restarted_coordinator_resumes_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let run = c
        .register_run(config(1, 3, 1), Some("resume-me"))
        .await
        .unwrap()
        .run_id;
    let w = worker(&c, &run, "a").await;
    c.report_steps(&run, &w, 1, vec![step(0, 0), step(0, 1)])
        .await
        .unwrap();
    server.shutdown().await.unwrap();

    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!((s.steps, s.epochs[0].train_batches_done), (2, 2));
    // The trainer reconnects under its old id; batch 1 redelivered still counts once.
    let info = WorkerInfo {
        host: "a".into(),
        device: "cpu".into(),
        gpu_name: String::new(),
    };
    assert_eq!(
        c.register_worker(&run, &info, Some(&w))
            .await
            .unwrap()
            .worker_id,
        w
    );
    let r = c
        .report_steps(&run, &w, 2, vec![step(0, 1), step(0, 2)])
        .await
        .unwrap();
    assert_eq!(r.newly_counted, 1);
    let round = r.directives.unwrap().sync_round;
    assert!(round > 0);
    let avg = c
        .sync_parameters(&run, &w, round, 4, tensors(&[("w", vec![1], vec![3.0])]))
        .await
        .unwrap();
    server.shutdown().await.unwrap();

    // Again, now with a checkpoint and an epoch awaiting validation.
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    let s = c.get_run(&run, false).await.unwrap();
    assert_eq!(s.validating_epoch_plus_one, 1);
    assert_eq!(c.get_checkpoint(&run, None).await.unwrap().1, avg);
    assert_eq!(
        c.register_worker(&run, &info, Some(&w))
            .await
            .unwrap()
            .checkpoint_id,
        s.latest_checkpoint_id
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_missing_or_wrong_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    for token in [None, Some("wrong".to_owned())] {
        let c = CoordinatorClient::connect(
            &ClientConfig::new(server.url())
                .token(token)
                .retry(Backoff::none()),
        )
        .unwrap();
        let err = c.list_runs().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    }
    let c = client(&server);
    assert!(c.list_runs().await.unwrap().is_empty());
    let err = c.get_run("nope", false).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_answers_without_a_token_until_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let url = server.url();
    let timeout = std::time::Duration::from_secs(5);
    assert!(coordinator_serving(&url, timeout).await.unwrap());
    server.shutdown().await.unwrap();
    let err = coordinator_serving(&url, timeout).await.unwrap_err();
    assert!(matches!(err, ClientError::Endpoint { .. }), "{err:?}");
}

#[tokio::test]
async fn reflection_lists_the_service_to_token_holders() {
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    use tonic_reflection::pb::v1::ServerReflectionRequest;

    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let list = || {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let denied = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(list())
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::Unauthenticated);
    let mut req = tonic::Request::new(list());
    req.metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    let mut stream = ServerReflectionClient::new(channel)
        .server_reflection_info(req)
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(services)) =
        stream.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list");
    };
    let names: Vec<String> = services.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"flowers.v1.Coordinator".to_owned()),
        "{names:?}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn tls_with_a_trusted_certificate_works() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert_pem, key_pem) = (cert.cert.pem(), cert.key_pair.serialize_pem());
    let dir = tempfile::tempdir().unwrap();
    let coordinator = Coordinator::open(CoordinatorConfig::new(dir.path())).unwrap();
    let options = ServeOptions {
        token: Some(TOKEN.into()),
        tls: Some((cert_pem.clone().into(), key_pem.into())),
    };
    let server = ServerHandle::start(coordinator, "127.0.0.1:0", options)
        .await
        .unwrap();
    let address = format!("https://localhost:{}", server.addr.port());
    let config = ClientConfig {
        ca_cert: Some(cert_pem.into()),
        ..ClientConfig::new(&address).token(Some(TOKEN.into()))
    };
    let c = CoordinatorClient::connect(&config).unwrap();
    assert!(c.list_runs().await.unwrap().is_empty());
    // Plain HTTP/2 to a TLS port fails rather than leaking anything.
    let plain = ClientConfig::new(server.url())
        .token(Some(TOKEN.into()))
        .retry(Backoff::none());
    assert!(CoordinatorClient::connect(&plain)
        .unwrap()
        .list_runs()
        .await
        .is_err());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_run_id_the_broker_would_refuse_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), 0, 5_000).await;
    let c = client(&server);
    // '.' separates the parts of queue names (flowers.<run>.train.<epoch>).
    let err = c
        .register_run(config(1, 2, 1), Some("a.b"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    let generated = c.register_run(config(1, 2, 1), None).await.unwrap().run_id;
    assert!(flowers_proto::run_id::is_valid(&generated), "{generated}");
    let runs: Vec<String> = c
        .list_runs()
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.run_id)
        .collect();
    assert_eq!(runs, [generated]);
    server.shutdown().await.unwrap();
}
