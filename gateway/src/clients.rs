//! Typed clients of the three worker kinds, over their replica sets. Each call carries the
//! request's time left and its trace context, and counts the bytes it sends and receives in
//! `osprey_gateway_worker_bytes_total{kind,direction}` (the encoded messages).
//!
//! Workers keep what they computed (SAM embeddings, vision features) resident under the image
//! key, so a call first goes without its payload, and only a FAILED_PRECONDITION ("not resident
//! here") makes the caller fetch the payload and call again: [`resident_first`] is that protocol.
//! LLM workers keep the image tokens they were sent the same way, so those travel only to a
//! replica that lacks them.

use std::future::Future;
use std::sync::Arc;

use osprey_common::ServiceError;
use osprey_proto::worker::v1 as worker;
use osprey_proto::worker::v1::llm_client::LlmClient;
use osprey_proto::worker::v1::sam_client::SamClient;
use osprey_proto::worker::v1::vision_client::VisionClient;
use prost::Message;
use tonic::transport::Channel;
use tonic::{Request, Status, Streaming};

use crate::deadline::Deadline;
use crate::workers::Replicas;

/// Runs `first` (the call without its payload); when the worker answers that what it needs is not
/// resident, runs `with_payload` (which fetches the payload and calls again) instead.
pub async fn resident_first<T>(
    first: impl Future<Output = Result<T, ServiceError>>,
    with_payload: impl AsyncFnOnce() -> Result<T, ServiceError>,
) -> Result<T, ServiceError> {
    match first.await {
        Err(ServiceError::FailedPrecondition(_)) => with_payload().await,
        other => other,
    }
}

/// Counts `bytes` moved to (`sent`) or from (`received`) workers of `kind`.
fn count(kind: &'static str, direction: &'static str, bytes: usize) {
    metrics::counter!("osprey_gateway_worker_bytes_total", "kind" => kind, "direction" => direction)
        .increment(bytes as u64);
}

/// One unary call of `rpc` on the replica preferred for `image_key` (moving on to the next as
/// [`Replicas::call`] does), with the bytes counted.
async fn unary<Req, Resp, Fut>(
    replicas: &Replicas,
    kind: &'static str,
    image_key: &str,
    deadline: Deadline,
    request: &Req,
    rpc: impl Fn(Channel, Request<Req>) -> Fut,
) -> Result<Resp, ServiceError>
where
    Req: Message + Clone,
    Resp: Message,
    Fut: Future<Output = Result<Resp, Status>>,
{
    replicas
        .call(image_key, |channel| {
            let request = deadline.worker_request(request.clone());
            let call = request.map(|request| {
                count(kind, "sent", request.get_ref().encoded_len());
                rpc(channel, request)
            });
            async move {
                let response = call.map_err(Status::from)?.await.map_err(|s| past_deadline(s, deadline))?;
                count(kind, "received", response.encoded_len());
                Ok(response)
            }
        })
        .await
}

/// The vision workers: features and region tokens.
pub struct Vision(pub Arc<Replicas>);

impl Vision {
    const KIND: &'static str = "vision";

    pub async fn encode(
        &self,
        deadline: Deadline,
        request: &worker::EncodeRequest,
    ) -> Result<worker::EncodeResponse, ServiceError> {
        unary(&self.0, Self::KIND, &request.image_key, deadline, request, |channel, request| async move {
            Ok(vision(channel).encode(request).await?.into_inner())
        })
        .await
    }

    pub async fn pool(
        &self,
        deadline: Deadline,
        request: &worker::PoolRequest,
    ) -> Result<worker::PoolResponse, ServiceError> {
        unary(&self.0, Self::KIND, &request.image_key, deadline, request, |channel, request| async move {
            Ok(vision(channel).pool(request).await?.into_inner())
        })
        .await
    }
}

/// The SAM workers: masks from prompts, and everything mode.
pub struct Sam(pub Arc<Replicas>);

impl Sam {
    const KIND: &'static str = "sam";

    /// Decodes `request`'s prompts; the image is sent (from `pixels`) only when its embedding is
    /// not resident on the replica.
    pub async fn predict(
        &self,
        deadline: Deadline,
        request: worker::PredictRequest,
        pixels: impl AsyncFnOnce() -> Result<worker::RgbImage, ServiceError>,
    ) -> Result<worker::PredictResponse, ServiceError> {
        let call = async |request: &worker::PredictRequest| {
            unary(&self.0, Self::KIND, &request.image_key, deadline, request, |channel, request| async move {
                Ok(sam(channel).predict(request).await?.into_inner())
            })
            .await
        };
        resident_first(call(&request), async || {
            let request = worker::PredictRequest { image: Some(pixels().await?), ..request.clone() };
            call(&request).await
        })
        .await
    }

    /// SAM's automatic masks over the whole image, sending the image as [`Self::predict`] does.
    pub async fn everything(
        &self,
        deadline: Deadline,
        request: worker::EverythingRequest,
        pixels: impl AsyncFnOnce() -> Result<worker::RgbImage, ServiceError>,
    ) -> Result<worker::EverythingResponse, ServiceError> {
        let call = async |request: &worker::EverythingRequest| {
            unary(&self.0, Self::KIND, &request.image_key, deadline, request, |channel, request| async move {
                Ok(sam(channel).everything(request).await?.into_inner())
            })
            .await
        };
        resident_first(call(&request), async || {
            let request = worker::EverythingRequest { image: Some(pixels().await?), ..request.clone() };
            call(&request).await
        })
        .await
    }
}

/// The LLM workers: answers, streamed.
pub struct Llm(pub Arc<Replicas>);

impl Llm {
    const KIND: &'static str = "llm";

    /// Opens the answer stream of `request`, which goes without image tokens: the replica uses the
    /// ones it keeps for the image key and feature revision, and only when it has none are they
    /// fetched (`image_tokens`: a vision answer carrying them and their feature revision) and sent.
    pub async fn generate(
        &self,
        deadline: Deadline,
        request: worker::GenerateRequest,
        image_tokens: impl AsyncFnOnce() -> Result<worker::PoolResponse, ServiceError>,
    ) -> Result<Answers, ServiceError> {
        let request = worker::GenerateRequest { image_tokens: None, ..request };
        let stream = resident_first(unary_stream(&self.0, deadline, &request), async || {
            let pooled = image_tokens().await?;
            let request = worker::GenerateRequest {
                image_tokens: pooled.image_tokens,
                feature_revision: pooled.feature_revision,
                ..request.clone()
            };
            unary_stream(&self.0, deadline, &request).await
        })
        .await?;
        Ok(Answers { stream, deadline })
    }
}

/// Opens a Generate stream (its messages are counted as they arrive, by [`Answers`]).
async fn unary_stream(
    replicas: &Replicas,
    deadline: Deadline,
    request: &worker::GenerateRequest,
) -> Result<Streaming<worker::GenerateResponse>, ServiceError> {
    replicas
        .call(&request.image_key, |channel| {
            let request = deadline.worker_request(request.clone());
            async move {
                let request = request.map_err(Status::from)?;
                count(Llm::KIND, "sent", request.get_ref().encoded_len());
                let mut client = LlmClient::new(channel)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX);
                let response = client.generate(request).await.map_err(|s| past_deadline(s, deadline))?;
                Ok(response.into_inner())
            }
        })
        .await
}

/// An LLM worker's answer stream.
pub struct Answers {
    stream: Streaming<worker::GenerateResponse>,
    deadline: Deadline,
}

impl Answers {
    /// The next response, `None` at the end of the stream. A worker that goes away mid-answer
    /// (killed, or its connection cut) is UNAVAILABLE: the caller may ask another replica.
    pub async fn message(&mut self) -> Result<Option<worker::GenerateResponse>, ServiceError> {
        let response = self.stream.message().await.map_err(|status| {
            let status = past_deadline(status, self.deadline);
            if crate::workers::replica_gone(&status) {
                ServiceError::Unavailable(format!(
                    "the LLM worker went away mid-answer: {}",
                    status.message()
                ))
            } else {
                status.into()
            }
        })?;
        if let Some(response) = &response {
            count(Llm::KIND, "received", response.encoded_len());
        }
        Ok(response)
    }
}

/// A worker's failure at the request's deadline is the deadline's doing (the call's own
/// `grpc-timeout`, the time left, ran out; tonic answers CANCELLED, and its timer may fire a hair
/// before ours): no other replica is tried, none is marked down.
fn past_deadline(status: Status, deadline: Deadline) -> Status {
    match deadline.remaining() {
        Ok(left) if left > std::time::Duration::from_millis(20) => status,
        _ => Status::deadline_exceeded("the request ran past its deadline"),
    }
}

fn vision(channel: Channel) -> VisionClient<Channel> {
    VisionClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
}

fn sam(channel: Channel) -> SamClient<Channel> {
    SamClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_payload_goes_only_after_a_miss() {
        let mut fetched = 0;
        let resident: Result<u8, _> = resident_first(async { Ok(1) }, async || {
            fetched += 1;
            Ok(2)
        })
        .await;
        assert_eq!(resident.unwrap(), 1);
        assert_eq!(fetched, 0);

        let missing =
            resident_first(async { Err(ServiceError::FailedPrecondition("not here".into())) }, async || {
                fetched += 1;
                Ok(2)
            })
            .await;
        assert_eq!(missing.unwrap(), 2);
        assert_eq!(fetched, 1);

        let failed: Result<u8, _> =
            resident_first(async { Err(ServiceError::Internal("broken".into())) }, async || {
                fetched += 1;
                Ok(2)
            })
            .await;
        assert!(matches!(failed, Err(ServiceError::Internal(_))));
        assert_eq!(fetched, 1);
    }
}
