//! The `osprey.v1.Osprey` handlers: admission, the request's deadline, validation, then the
//! pipeline; streamed answers run in a task of their own under the same deadline.

use std::sync::Arc;
use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::error::respond;
use osprey_common::telemetry::set_parent_from_metadata;
use osprey_proto::convert::public_finish_reason;
use osprey_proto::v1;
use osprey_proto::v1::osprey_server::Osprey;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, Span, instrument};

use crate::answers::total_metadata;
use crate::deadline::Deadline;
use crate::pipeline::{Answer, MAX_STREAM_RETRIES};
use crate::request;
use crate::state::Gateway;

type ResultStream<T> = ReceiverStream<Result<T, Status>>;

/// The handlers; shared state lives in `Arc<Gateway>`.
pub struct OspreyService(pub Arc<Gateway>);

impl OspreyService {
    fn deadline<T>(&self, request: &Request<T>) -> Deadline {
        Deadline::of_request(request, self.0.default_deadline)
    }
}

#[tonic::async_trait]
impl Osprey for OspreyService {
    #[instrument(skip_all)]
    async fn register_image(
        &self,
        request: Request<v1::RegisterImageRequest>,
    ) -> Result<Response<v1::RegisterImageResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let (start, deadline) = (Instant::now(), self.deadline(&request));
        let request = request.into_inner();
        let work = async {
            let image = request::register(&request, &self.0.limits)?;
            self.0.register(image, request.warm_features, deadline, start).await
        };
        respond(deadline.run(work).await)
    }

    #[instrument(skip_all, fields(prompts = request.get_ref().prompts.len()))]
    async fn segment(
        &self,
        request: Request<v1::SegmentRequest>,
    ) -> Result<Response<v1::SegmentResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let (start, deadline) = (Instant::now(), self.deadline(&request));
        let request = request.into_inner();
        let work = async {
            let input = request::segment(request, &self.0.limits)?;
            self.0.segment(input, deadline, start).await
        };
        respond(deadline.run(work).await)
    }

    type DescribeStream = ResultStream<v1::RegionResult>;

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len()))]
    async fn describe(
        &self,
        request: Request<v1::DescribeRequest>,
    ) -> Result<Response<Self::DescribeStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let permit = self.0.admit().map_err(ServiceError::into_status)?;
        let (start, deadline) = (Instant::now(), self.deadline(&request));
        // Validate (and run SAM) before answering, so that bad input is the RPC's status, not a
        // stream item.
        let input =
            request::describe(request.into_inner(), &self.0.limits).map_err(ServiceError::into_status)?;
        let prepared =
            deadline.run(self.0.prepare(input.regions, deadline)).await.map_err(ServiceError::into_status)?;
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.0.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let work = gateway.describe_stream(
                    prepared,
                    input.task,
                    input.parameters,
                    deadline,
                    start,
                    tx.clone(),
                );
                send_failure(deadline.run(work).await, &tx).await;
            }
            .instrument(Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len()))]
    async fn ask(&self, request: Request<v1::AskRequest>) -> Result<Response<v1::AskResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let (start, deadline) = (Instant::now(), self.deadline(&request));
        let request = request.into_inner();
        let work = async {
            let ask = |response: osprey_proto::worker::v1::GenerateResponse, metadata| v1::AskResponse {
                text: response.answer,
                raw_text: response.raw_text,
                generated_tokens: response.generated_tokens,
                finish_reason: public_finish_reason(response.finish_reason),
                metadata: Some(metadata),
            };
            // Nothing reaches the client before the whole answer: an LLM replica that goes away
            // mid-answer costs a new attempt (routed to another replica once it is marked down),
            // as Describe does for the regions it had not answered.
            let mut retries = 0;
            loop {
                let input = request::ask(request.clone(), &self.0.limits)?;
                let (prepared, answer, key) = self.0.question_answer(input, deadline).await?;
                let (mut stream, pooled) = match answer {
                    Answer::Cached(response) => {
                        return Ok(ask(response, crate::answers::cached_metadata(&prepared, start)));
                    }
                    Answer::Streaming(stream, pooled) => (stream, pooled),
                };
                let finished = async {
                    while let Some(response) = stream.message().await? {
                        if response.finished {
                            return Ok(response);
                        }
                    }
                    Err(ServiceError::Internal("the LLM worker ended the answer early".into()))
                };
                match finished.await {
                    Ok(response) => {
                        let metadata =
                            self.0.finish_answer(key.as_deref(), &response, &prepared, &pooled, start).await;
                        return Ok(ask(response, metadata));
                    }
                    Err(ServiceError::Unavailable(why)) if retries < MAX_STREAM_RETRIES => {
                        retries += 1;
                        tracing::warn!(%why, "LLM answer stream broke; asking again");
                        metrics::counter!("osprey_gateway_llm_stream_retries_total").increment(1);
                    }
                    Err(err) => return Err(err),
                }
            }
        };
        respond(deadline.run(work).await)
    }

    type ChatStream = ResultStream<v1::ChatChunk>;

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len(), turns = request.get_ref().history.len()))]
    async fn chat(&self, request: Request<v1::ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let permit = self.0.admit().map_err(ServiceError::into_status)?;
        let (start, deadline) = (Instant::now(), self.deadline(&request));
        let input = request::chat(request.into_inner(), &self.0.limits).map_err(ServiceError::into_status)?;
        let (prepared, answer, key) =
            deadline.run(self.0.question_answer(input, deadline)).await.map_err(ServiceError::into_status)?;
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.0.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let work = async {
                    let (mut stream, pooled) = match answer {
                        Answer::Cached(response) => {
                            let chunk = v1::ChatChunk {
                                text: response.raw_text,
                                finished: true,
                                finish_reason: public_finish_reason(response.finish_reason),
                                metadata: Some(crate::answers::cached_metadata(&prepared, start)),
                            };
                            let _ = tx.send(Ok(chunk)).await;
                            return Ok(());
                        }
                        Answer::Streaming(stream, pooled) => (stream, pooled),
                    };
                    let mut finished = false;
                    while let Some(response) = stream.message().await? {
                        finished |= response.finished;
                        let metadata = if response.finished {
                            let key = key.as_deref();
                            Some(gateway.finish_answer(key, &response, &prepared, &pooled, start).await)
                        } else {
                            None
                        };
                        let chunk = v1::ChatChunk {
                            text: response.text,
                            finished: response.finished,
                            finish_reason: public_finish_reason(response.finish_reason),
                            metadata,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            return Ok(()); // the client has gone
                        }
                    }
                    // A stream that ends OK without its last chunk would read as a whole answer.
                    if !finished {
                        return Err(ServiceError::Internal("the LLM worker ended the answer early".into()));
                    }
                    Ok(())
                };
                send_failure(deadline.run(work).await, &tx).await;
            }
            .instrument(Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type AnnotateStream = ResultStream<v1::AnnotateResponse>;

    #[instrument(skip_all)]
    async fn annotate(
        &self,
        request: Request<Streaming<v1::AnnotateRequest>>,
    ) -> Result<Response<Self::AnnotateStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        // Each item gets the default deadline, cut short by the stream's own if the client set one.
        let stream_deadline = Deadline::of_client(&request);
        let mut items = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.0.clone();
        tokio::spawn(
            async move {
                // Items are answered one after the other; a bad item gets an ItemError and the
                // stream goes on.
                while let Ok(Some(item)) = items.message().await {
                    let item_deadline = Deadline::after(gateway.default_deadline);
                    let deadline = stream_deadline.map_or(item_deadline, |d| d.min(item_deadline));
                    if !annotate_item(&gateway, item, deadline, &tx).await {
                        break;
                    }
                }
            }
            .instrument(Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// A streamed answer's failure, as the stream's last item.
async fn send_failure<T>(result: Result<(), ServiceError>, tx: &mpsc::Sender<Result<T, Status>>) {
    if let Err(err) = result {
        let _ = tx.send(Err(err.into_status())).await;
    }
}

/// Answers one Annotate item; false when the client has gone.
async fn annotate_item(
    gateway: &Arc<Gateway>,
    item: v1::AnnotateRequest,
    deadline: Deadline,
    tx: &mpsc::Sender<Result<v1::AnnotateResponse, Status>>,
) -> bool {
    use v1::annotate_response::Event;
    let start = Instant::now();
    let item_id = item.item_id.clone();
    let (results_tx, mut results) = mpsc::channel(64);
    let run = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let _permit = gateway.admit()?;
            let work = async {
                let input = request::annotate_item(item, &gateway.limits)?;
                let prepared = gateway.prepare(input.regions, deadline).await?;
                gateway
                    .describe_stream(prepared, input.task, input.parameters, deadline, start, results_tx)
                    .await
            };
            deadline.run(work).await
        })
    };
    let mut answered = 0u32;
    while let Some(result) = results.recv().await {
        let event = match result {
            Ok(region) => {
                answered += 1;
                Event::Region(region)
            }
            Err(status) => {
                Event::Error(v1::ItemError { code: status.code() as i32, message: status.message().into() })
            }
        };
        if tx.send(Ok(v1::AnnotateResponse { item_id: item_id.clone(), event: Some(event) })).await.is_err() {
            run.abort();
            return false;
        }
    }
    let event = match run.await {
        Ok(Ok(())) => Event::Done(v1::ItemDone { regions: answered, metadata: Some(total_metadata(start)) }),
        Ok(Err(err)) => {
            let status = err.into_status();
            Event::Error(v1::ItemError { code: status.code() as i32, message: status.message().into() })
        }
        Err(_) => {
            Event::Error(v1::ItemError { code: Code::Internal as i32, message: "item task failed".into() })
        }
    };
    tx.send(Ok(v1::AnnotateResponse { item_id, event: Some(event) })).await.is_ok()
}
