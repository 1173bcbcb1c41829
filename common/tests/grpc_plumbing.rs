//! The standard routes every server gets: health that flips with the model's readiness, and
//! reflection listing every Osprey service, served over real TCP with graceful shutdown.

use osprey_common::grpc::{serve, standard_routes};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_and_reflection_work_over_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (routes, health) = standard_routes(&["osprey.worker.v1.Vision"]).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_health = health.clone();
    let server = tokio::spawn(async move {
        serve(listener, routes, &server_health, async {
            let _ = stopped.await;
        })
        .await
    });

    let channel = tonic::transport::Channel::from_shared(address).unwrap().connect().await.unwrap();
    let mut client = HealthClient::new(channel.clone());
    let status = |service: &str| {
        let mut client = client.clone();
        let request = HealthCheckRequest { service: service.to_string() };
        async move { client.check(request).await.unwrap().into_inner().status }
    };
    assert_eq!(status("").await, ServingStatus::NotServing as i32);
    assert_eq!(status("osprey.worker.v1.Vision").await, ServingStatus::NotServing as i32);
    health.set_serving().await;
    assert_eq!(status("").await, ServingStatus::Serving as i32);
    assert_eq!(status("osprey.worker.v1.Vision").await, ServingStatus::Serving as i32);
    let unknown = client.check(HealthCheckRequest { service: "nope".into() }).await.unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "osprey.v1.Osprey",
        "osprey.worker.v1.Vision",
        "osprey.worker.v1.Sam",
        "osprey.worker.v1.Llm",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
