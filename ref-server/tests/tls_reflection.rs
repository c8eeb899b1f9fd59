//! TLS (a self-signed certificate made with the `openssl` CLI, which the test needs:
//! `deploy/test.sh` installs it where it is missing) and server reflection (what
//! `grpcurl list` uses).

mod common;

use std::process::Command;

use common::*;
use dpo_proto::client::ClientOptions;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_services() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let server = Server::start(&model, &[], &[]);
    server.ready_client(&server.options()).await;
    let channel = tonic::transport::Endpoint::from_shared(server.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = c.server_reflection_info(tokio_stream::iter([req])).await.unwrap().into_inner();
    let msg = resp.message().await.unwrap().expect("a reply");
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("unexpected reply {msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"dpo.v1.Reference".to_string()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_string()), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args(["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("the `openssl` CLI makes the test certificate: install it (deploy/test.sh does)");
    assert!(made.status.success(), "openssl req failed: {}", String::from_utf8_lossy(&made.stderr));
    let model = tiny_model(dir.path());
    let server = Server::start(
        &model,
        &["--tls-cert", cert.to_str().unwrap(), "--tls-key", key.to_str().unwrap()],
        &[],
    );
    let opts = ClientOptions {
        url: format!("https://{}", server.addr),
        ca_cert: Some(cert.clone()),
        tls_domain: Some("localhost".into()),
        ..ClientOptions::default()
    };
    let client = server.ready_client(&opts).await;
    assert_eq!(client.model_info().await.unwrap().vocab_size, 258);
    // Plain text against a TLS server fails.
    let plain = ClientOptions { url: server.url.clone(), ..ClientOptions::default() };
    let ok = match dpo_proto::client::ReplicaClient::connect(&plain).await {
        Ok(c) => c.model_info().await.is_ok(),
        Err(_) => false,
    };
    assert!(!ok);
    // The CLI's health check over TLS.
    let st = Command::new(BIN)
        .args(["health", "--server", &opts.url, "--tls-domain", "localhost", "--tls-ca"])
        .arg(&cert)
        .status()
        .unwrap();
    assert!(st.success());
}
