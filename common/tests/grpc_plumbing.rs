//! The standard routes every server gets: health that flips with the model's readiness, and
//! reflection (v1 and v1alpha alike) listing exactly the services the server serves, over real
//! TCP with graceful shutdown.

use osprey_common::grpc::{serve, standard_routes};
use tokio::net::TcpListener;
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::{v1, v1alpha};

#[tokio::test]
async fn health_and_reflection_work_over_tcp() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (routes, health) = standard_routes(&["osprey.worker.v1.Vision"]).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_health = health.clone();
    let server = tokio::spawn(async move {
        serve(listener, routes, &server_health, None, async {
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

    assert_eq!(
        listed_v1(channel.clone()).await,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "osprey.worker.v1.Vision",
        ]
    );
    assert_eq!(listed_v1alpha(channel.clone()).await, listed_v1(channel).await);

    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

async fn tonic_channel(address: &str) -> Channel {
    Channel::from_shared(address.to_string()).unwrap().connect().await.unwrap()
}

/// Services listed by reflection v1, in the server's order.
async fn listed_v1(channel: Channel) -> Vec<String> {
    use v1::server_reflection_request::MessageRequest;
    use v1::server_reflection_response::MessageResponse;
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel);
    let mut responses =
        client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// Services listed by reflection v1alpha (what older grpcurl versions ask), in the server's order.
async fn listed_v1alpha(channel: Channel) -> Vec<String> {
    use v1alpha::server_reflection_request::MessageRequest;
    use v1alpha::server_reflection_response::MessageResponse;
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(channel);
    let mut responses =
        client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    list.service.into_iter().map(|s| s.name).collect()
}

/// A gateway-like server: only its own service, and every listed service's descriptor resolves
/// through both versions (grpcurl describes what it lists).
#[tokio::test]
async fn reflection_lists_only_what_a_gateway_serves() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (routes, health) = standard_routes(&["osprey.v1.Osprey"]).await;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_health = health.clone();
    let server = tokio::spawn(async move {
        serve(listener, routes, &server_health, None, async {
            let _ = stopped.await;
        })
        .await
    });
    let channel = tonic_channel(&address).await;
    let listed = listed_v1(channel.clone()).await;
    assert_eq!(
        listed,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
            "osprey.v1.Osprey",
        ]
    );
    assert_eq!(listed_v1alpha(channel.clone()).await, listed);
    for name in &listed {
        use v1::server_reflection_request::MessageRequest;
        use v1::server_reflection_response::MessageResponse;
        let request = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol(name.clone())),
        };
        let mut client = v1::server_reflection_client::ServerReflectionClient::new(channel.clone());
        let mut responses =
            client.server_reflection_info(tokio_stream::once(request)).await.unwrap().into_inner();
        let response = responses.next().await.unwrap().unwrap();
        assert!(
            matches!(response.message_response, Some(MessageResponse::FileDescriptorResponse(_))),
            "{name}: {response:?}"
        );
    }
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}
