//! TLS on the public API, and mutual TLS between the gateway and its workers.

use std::time::Duration;

use osprey_proto::v1;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

use crate::support::*;

#[tokio::test]
async fn tls_serves_the_api_to_clients_that_trust_the_certificate() {
    use tonic::transport::ClientTlsConfig;
    let tls = fixtures().join("tls");
    let (vision, llm) = (vision().await, llm().await);
    // The gateway's flags with the test certificate and `key_file` as its key.
    let argv = |key_file: &str| -> Vec<String> {
        let path = |name: &str| tls.join(name).display().to_string();
        let mut argv =
            ["g", "--vision-workers", &vision.url, "--llm-workers", &llm.url].map(String::from).to_vec();
        argv.extend(["--tls-cert".into(), path("server.pem"), "--tls-key".into(), path(key_file)]);
        argv
    };
    let args = parse_args(argv("server.key"));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(gateway::service::run(args, listener, async {
        let _ = stopped.await;
    }));

    let options = osprey_client::ConnectOptions {
        endpoint: format!("https://localhost:{port}"),
        ca_cert: Some(tls.join("ca.pem")),
        ..Default::default()
    };
    let mut client = osprey_client::connect(&options).await.expect("TLS connection");
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
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = gateway::service::run(parse_args(argv("no-such.key")), listener, async {}).await.unwrap_err();
    assert!(err.to_string().contains("no-such.key"), "{err}");
}

/// A worker's TLS flags: the test server certificate (for 127.0.0.1), and client certificates
/// signed by the test client CA required.
fn worker_tls_flags() -> Vec<String> {
    let tls = fixtures().join("tls");
    let path = |name: &str| tls.join(name).to_str().unwrap().to_string();
    ["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "client-ca.pem"]
        .chunks(2)
        .flat_map(|pair| [pair[0].to_string(), path(pair[1])])
        .collect()
}

/// The gateway's flags to reach TLS workers: the CA that signed their certificate and, when
/// `with_client_cert`, its client certificate.
fn gateway_tls_flags(with_client_cert: bool) -> Vec<String> {
    let tls = fixtures().join("tls");
    let path = |name: &str| tls.join(name).to_str().unwrap().to_string();
    let mut flags = vec!["--worker-tls-ca".to_string(), path("ca.pem")];
    if with_client_cert {
        flags.extend([
            "--worker-tls-cert".into(),
            path("client.pem"),
            "--worker-tls-key".into(),
            path("client.key"),
        ]);
    }
    flags
}

/// Starts a worker with `run` on a fresh port; its address once it answers health checks over
/// mutual TLS.
async fn tls_worker<F, Fut>(run: F) -> std::net::SocketAddr
where
    F: FnOnce(TcpListener) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(run(listener));
    let tls = fixtures().join("tls");
    let read = |name: &str| std::fs::read(tls.join(name)).unwrap();
    let config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem")))
        .identity(Identity::from_pem(read("client.pem"), read("client.key")));
    let endpoint = Channel::from_shared(format!("https://{address}")).unwrap().tls_config(config).unwrap();
    for _ in 0..2400 {
        if let Ok(channel) = endpoint.connect().await {
            let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
            let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
            let answer = tonic_health::pb::health_client::HealthClient::new(channel).check(request).await;
            if answer.is_ok_and(|a| a.into_inner().status == serving) {
                return address;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the TLS worker on {address} did not start");
}

#[tokio::test]
async fn workers_with_mutual_tls_answer_only_the_gateway_with_the_client_certificate() {
    let vision_weights = fixtures().join("vision/tiny/tiny_st");
    let mut vision_argv = vec!["v", "--weights", vision_weights.to_str().unwrap(), "--feature-dtype", "f32"];
    let worker_flags = worker_tls_flags();
    vision_argv.extend(worker_flags.iter().map(String::as_str));
    let vision_args = parse_args(vision_argv);
    let vision =
        tls_worker(|listener| vision_worker::service::run(vision_args, listener, std::future::pending()))
            .await;
    let llm_weights = fixtures().join("llm/tiny");
    let mut llm_argv = vec!["l", "--weights", llm_weights.to_str().unwrap(), "--default-max-new-tokens", "5"];
    llm_argv.extend(worker_flags.iter().map(String::as_str));
    let llm_args = parse_args(llm_argv);
    let llm =
        tls_worker(|listener| llm_worker::service::run(llm_args, listener, std::future::pending())).await;

    // Everything over mutual TLS: the answer equals a plaintext pipeline's.
    let start_gateway = |flags: Vec<String>| async move {
        let (vision, llm) = (vision.to_string(), llm.to_string());
        let mut argv =
            vec!["g", "--vision-workers", &vision, "--llm-workers", &llm, "--health-interval", "0.2"];
        argv.extend(flags.iter().map(String::as_str));
        let args = parse_args(argv);
        let running = osprey_test_support::serve_in_process(|listener, stopped| {
            gateway::service::run(args, listener, stopped)
        })
        .await;
        let client = client(&running.url).await;
        (running, client)
    };
    let request = || describe_request(v1::image::Source::Encoded(photo()), masks(&[1, 4]));
    let (_mtls, mut client) = start_gateway(gateway_tls_flags(true)).await;
    let answers = describe(&mut client, request()).await;
    let (plain_vision, plain_llm) = (crate::support::vision().await, crate::support::llm().await);
    let (_plain, mut plain_client) = gateway(&[&plain_vision], &plain_llm, &[]).await;
    let expected = describe(&mut plain_client, request()).await;
    let texts = |results: &[v1::RegionResult]| results.iter().map(|r| r.text.clone()).collect::<Vec<_>>();
    assert_eq!(texts(&answers), texts(&expected));
    assert!(answers.iter().all(|r| r.generated_tokens >= 1));

    // A gateway without the client certificate, or in plaintext, is refused by the workers: its
    // requests fail with UNAVAILABLE (no replica it can reach), never an answer.
    for flags in [gateway_tls_flags(false), vec![]] {
        let (_gateway, mut client) = start_gateway(flags.clone()).await;
        let refused = match client.describe(request()).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{flags:?}: {refused:?}");
    }

    // Missing certificate files are a startup error naming the file.
    let mut argv = vec!["v", "--weights", vision_weights.to_str().unwrap()];
    argv.extend(["--tls-cert", "no-such.pem", "--tls-key", "no-such.key"]);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let error = vision_worker::service::run(parse_args(argv), listener, async {}).await.unwrap_err();
    assert!(error.to_string().contains("no-such.pem"), "{error}");
}
