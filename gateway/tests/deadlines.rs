//! One deadline policy: every RPC ends with DEADLINE_EXCEEDED at the request's deadline (the
//! client's `grpc-timeout`, else `--request-timeout-seconds`) even when a worker hangs, and every
//! worker call is sent with the time left, never more.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use osprey_client::{Client, ConnectOptions};
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, DescribeTask};
use osprey_proto::worker::v1 as worker;
use osprey_proto::worker::v1::sam_server::{Sam, SamServer};
use osprey_proto::worker::v1::vision_server::{Vision, VisionServer};
use osprey_test_support::{InProcess, parse_args, serve_in_process};
use tonic::{Code, Request, Response, Status};

/// The photo's size (height, width).
const SIZE: (u32, u32) = (103, 157);

/// Far past any deadline in these tests, and far short of what they would wait for without one.
const LONG: Duration = Duration::from_secs(60);

fn photo() -> Vec<u8> {
    std::fs::read(osprey_test_support::fixture("vision/photo.png")).unwrap()
}

/// A vision and SAM worker that never answers; it notes the `grpc-timeout` of every call.
#[derive(Clone, Default)]
struct Hung {
    timeouts: Arc<Mutex<Vec<Duration>>>,
}

impl Hung {
    async fn hang<T, R>(&self, request: Request<T>) -> Result<Response<R>, Status> {
        let header = request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).map(String::from);
        self.timeouts.lock().unwrap().push(header.as_deref().map_or(Duration::MAX, grpc_timeout));
        tokio::time::sleep(10 * LONG).await;
        Err(Status::internal("woke up"))
    }

    fn longest_timeout(&self) -> Duration {
        let timeouts = self.timeouts.lock().unwrap();
        assert!(!timeouts.is_empty(), "no worker call was made");
        timeouts.iter().copied().max().unwrap()
    }
}

fn grpc_timeout(value: &str) -> Duration {
    let (amount, unit) = value.split_at(value.len() - 1);
    let amount: u64 = amount.parse().unwrap();
    match unit {
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        other => panic!("unexpected grpc-timeout unit {other}"),
    }
}

#[tonic::async_trait]
impl Vision for Hung {
    async fn encode(
        &self,
        request: Request<worker::EncodeRequest>,
    ) -> Result<Response<worker::EncodeResponse>, Status> {
        self.hang(request).await
    }
    async fn pool(
        &self,
        request: Request<worker::PoolRequest>,
    ) -> Result<Response<worker::PoolResponse>, Status> {
        self.hang(request).await
    }
}

#[tonic::async_trait]
impl Sam for Hung {
    async fn embed(
        &self,
        request: Request<worker::EmbedRequest>,
    ) -> Result<Response<worker::EmbedResponse>, Status> {
        self.hang(request).await
    }
    async fn predict(
        &self,
        request: Request<worker::PredictRequest>,
    ) -> Result<Response<worker::PredictResponse>, Status> {
        self.hang(request).await
    }
    async fn everything(
        &self,
        request: Request<worker::EverythingRequest>,
    ) -> Result<Response<worker::EverythingResponse>, Status> {
        self.hang(request).await
    }
}

/// Serves `worker` as a vision, SAM and (unused) LLM worker.
async fn serve_hung(worker: Hung) -> InProcess {
    serve_in_process(|listener, stopped| async move {
        let (routes, health) =
            osprey_common::grpc::standard_routes(&["osprey.worker.v1.Vision", "osprey.worker.v1.Sam"]).await;
        let routes =
            routes.add_service(VisionServer::new(worker.clone())).add_service(SamServer::new(worker));
        health.set_serving().await;
        osprey_common::grpc::serve(listener, routes, &health, None, stopped).await?;
        Ok(())
    })
    .await
}

async fn gateway(worker: &str, request_timeout_seconds: &str) -> (InProcess, Client) {
    let args = parse_args([
        "g",
        "--vision-workers",
        worker,
        "--sam-workers",
        worker,
        "--llm-workers",
        worker,
        "--request-timeout-seconds",
        request_timeout_seconds,
    ]);
    let server = serve_in_process(|listener, stopped| gateway::service::run(args, listener, stopped)).await;
    let options = ConnectOptions { endpoint: server.url.clone(), ..Default::default() };
    let client = osprey_client::connect(&options).await.unwrap();
    (server, client)
}

fn image() -> Option<v1::Image> {
    Some(v1::Image { source: Some(v1::image::Source::Encoded(photo())) })
}

fn mask_region() -> v1::Region {
    let mask = Mask::from_row_major(SIZE.0, SIZE.1, &vec![1; (SIZE.0 * SIZE.1) as usize]).unwrap();
    let rle = rle_to_proto(&mask.to_rle());
    v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask { format: Some(v1::mask::Format::Rle(rle)) })),
        label: "all".into(),
    }
}

fn prompt_region() -> v1::Region {
    v1::Region { source: Some(v1::region::Source::Prompt(box_prompt())), label: "box".into() }
}

fn box_prompt() -> v1::SamPrompt {
    let bbox = v1::Box { x0: 10.0, y0: 10.0, x1: 50.0, y1: 50.0 };
    v1::SamPrompt { r#box: Some(bbox), ..Default::default() }
}

fn assert_deadline(status: &Status, started: Instant) {
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() < LONG, "took {:?}", started.elapsed());
}

/// Describe's answers stream after its headers, so the client's own timeout no longer covers
/// them: the gateway ends the stream at the client's deadline though its default is 600 s.
#[tokio::test]
async fn a_streamed_describe_ends_at_the_client_deadline() {
    let worker = Hung::default();
    let hung = serve_hung(worker.clone()).await;
    let (_gateway, mut client) = gateway(&hung.url, "600").await;
    let client_deadline = Duration::from_secs(2);
    let mut request = Request::new(v1::DescribeRequest {
        image: image(),
        regions: vec![mask_region()],
        task: DescribeTask::Short as i32,
        ..Default::default()
    });
    request.set_timeout(client_deadline);
    let started = Instant::now();
    let mut stream = client.describe(request).await.unwrap().into_inner();
    let status = stream.message().await.unwrap_err();
    assert_deadline(&status, started);
    assert!(worker.longest_timeout() <= client_deadline, "{:?}", worker.longest_timeout());
}

/// With no client deadline, every RPC ends at `--request-timeout-seconds`, whichever stage hangs
/// (SAM for Segment and prompt regions, vision for the rest).
#[tokio::test]
async fn every_rpc_ends_at_the_default_deadline() {
    let worker = Hung::default();
    let hung = serve_hung(worker.clone()).await;
    let (_gateway, mut client) = gateway(&hung.url, "1").await;
    let default = Duration::from_secs(1);

    let started = Instant::now();
    let register = v1::RegisterImageRequest { encoded: photo(), warm_features: true };
    assert_deadline(&client.register_image(register).await.unwrap_err(), started);

    let started = Instant::now();
    let segment = v1::SegmentRequest { image: image(), prompts: vec![box_prompt()], everything: None };
    assert_deadline(&client.segment(segment).await.unwrap_err(), started);

    let started = Instant::now();
    let describe =
        v1::DescribeRequest { image: image(), regions: vec![prompt_region()], ..Default::default() };
    assert_deadline(&client.describe(describe).await.unwrap_err(), started);

    let started = Instant::now();
    let ask = v1::AskRequest {
        image: image(),
        regions: vec![mask_region()],
        question: "What is <region1>?".into(),
        ..Default::default()
    };
    assert_deadline(&client.ask(ask).await.unwrap_err(), started);

    let started = Instant::now();
    let chat = v1::ChatRequest {
        image: image(),
        regions: vec![mask_region()],
        question: "Hi".into(),
        ..Default::default()
    };
    assert_deadline(&client.chat(chat).await.unwrap_err(), started);

    let started = Instant::now();
    let item = v1::AnnotateRequest {
        item_id: "a".into(),
        image: image(),
        regions: vec![mask_region()],
        ..Default::default()
    };
    let mut events = client.annotate(tokio_stream::iter([item])).await.unwrap().into_inner();
    let event = events.message().await.unwrap().unwrap().event.unwrap();
    let v1::annotate_response::Event::Error(error) = event else {
        panic!("expected an item error, got {event:?}")
    };
    assert_eq!(error.code, Code::DeadlineExceeded as i32, "{error:?}");
    assert!(started.elapsed() < LONG);

    assert!(worker.longest_timeout() <= default, "{:?}", worker.longest_timeout());
}
