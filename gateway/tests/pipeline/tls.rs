//! TLS on the public API.

use std::time::Duration;

use clap::Parser;
use osprey_proto::v1;
use osprey_proto::v1::osprey_client::OspreyClient;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::support::*;

#[tokio::test]
async fn tls_serves_the_api_to_clients_that_trust_the_certificate() {
    use tonic::transport::{Certificate, ClientTlsConfig};
    let tls = fixtures().join("tls");
    let (cert, key) = (tls.join("server.pem"), tls.join("server.key"));
    let (vision, llm) = (vision().await, llm().await);
    let argv = [
        "g",
        "--vision-workers",
        &vision.url,
        "--llm-workers",
        &llm.url,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    let args = GatewayCli::parse_from(argv).args;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(gateway::service::run(args, listener, async {
        let _ = stopped.await;
    }));

    let ca = Certificate::from_pem(std::fs::read(tls.join("ca.pem")).unwrap());
    let endpoint = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().ca_certificate(ca).domain_name("localhost"))
        .unwrap();
    let mut channel = None;
    for _ in 0..200 {
        if let Ok(connected) = endpoint.connect().await {
            channel = Some(connected);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut client = OspreyClient::new(channel.expect("TLS connection"));
    let results =
        describe(&mut client, describe_request(v1::image::Source::Encoded(photo()), masks(&[1]))).await;
    assert_eq!(results.len(), 1);
    assert!(results[0].generated_tokens >= 1);

    // A plaintext client gets nothing.
    let plain = Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect().await;
    if let Ok(plain) = plain {
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        let answer = tonic_health::pb::health_client::HealthClient::new(plain).check(request).await;
        assert!(answer.is_err(), "plaintext was answered: {answer:?}");
    }
    // A client that does not trust the certificate refuses the connection.
    let untrusting = Channel::from_shared(format!("https://localhost:{port}"))
        .unwrap()
        .tls_config(ClientTlsConfig::new().domain_name("localhost"))
        .unwrap()
        .connect()
        .await;
    assert!(untrusting.is_err());

    // Missing key files are a startup error naming the file.
    let missing = tls.join("no-such.key");
    let argv = [
        "g",
        "--vision-workers",
        &vision.url,
        "--llm-workers",
        &llm.url,
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        missing.to_str().unwrap(),
    ];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = gateway::service::run(GatewayCli::parse_from(argv).args, listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("no-such.key"), "{err}");
}
