//! The public `osprey.v1.Osprey` service: validates every request up front (so bad input is
//! `INVALID_ARGUMENT` naming the field, before any work), then runs the pipeline
//! image → features (worker-resident, shared cache, or computed) → region tokens → answers,
//! streaming one result per region as it finishes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use osprey_common::ServiceError;
use osprey_common::error::respond;
use osprey_common::grpc::Admission;
use osprey_common::image::{ImageLimits, RgbImage, decode_image};
use osprey_common::mask::{Mask, mask_from_proto, rle_from_proto, rle_to_proto};
use osprey_common::telemetry::{TelemetryArgs, inject_trace_context, set_parent_from_metadata};
use osprey_proto::v1::osprey_server::Osprey;
use osprey_proto::v1::{self, CacheHits, CacheTier, Metadata, Timing};
use osprey_proto::worker::v1 as worker;
use osprey_proto::worker::v1::llm_client::LlmClient;
use osprey_proto::worker::v1::sam_client::SamClient;
use osprey_proto::worker::v1::vision_client::VisionClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, Response, Status, Streaming};
use tracing::{Instrument, Span, instrument};

use prost::Message;

use crate::cache::{CacheArgs, FeatureCache, features_key, pixels_key, result_key};
use crate::workers::Replicas;

/// `gateway serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Address to serve the public gRPC API on.
    #[arg(long, env, default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,
    /// Vision workers, comma-separated `host:port` names (an `http://` prefix is accepted). Each
    /// name is re-resolved every `--resolve-interval` and every address it resolves to is a
    /// replica (a Kubernetes headless Service gives one per pod), e.g. `vision.osprey.svc:50052`.
    #[arg(long, env, value_delimiter = ',', required = true)]
    pub vision_workers: Vec<String>,
    /// LLM workers, comma-separated `host:port` names, as `--vision-workers`.
    #[arg(long, env, value_delimiter = ',', required = true)]
    pub llm_workers: Vec<String>,
    /// SAM workers, comma-separated `host:port` names, as `--vision-workers`; needed for Segment,
    /// prompt regions and everything mode.
    #[arg(long, env, value_delimiter = ',')]
    pub sam_workers: Vec<String>,
    /// Seconds between re-resolutions of the worker names (new addresses join, vanished ones leave).
    #[arg(long, env, default_value_t = 10.0, value_parser = positive_seconds)]
    pub resolve_interval: f64,
    /// Seconds between `grpc.health.v1` checks of every replica; one that is not SERVING is
    /// skipped until a check passes again.
    #[arg(long, env, default_value_t = 2.0, value_parser = positive_seconds)]
    pub health_interval: f64,
    /// Serve TLS with this PEM certificate (chain); needs `--tls-key`. Plaintext when unset.
    #[arg(long, env, requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// The PEM private key of `--tls-cert`.
    #[arg(long, env, requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,
    /// Clients must send this key as `authorization: Bearer KEY` or `x-api-key: KEY`. Open when unset.
    #[arg(long, env)]
    pub api_key: Option<String>,
    /// Model revision mixed into image keys; change it when any model's weights change.
    #[arg(long, env, default_value = "osprey-7b")]
    pub model_revision: String,
    /// Most regions in one request.
    #[arg(long, env, default_value_t = 256)]
    pub max_regions: usize,
    /// Largest image file accepted, in bytes.
    #[arg(long, env, default_value_t = 32 << 20)]
    pub max_image_bytes: usize,
    /// Largest decoded image accepted, in pixels.
    #[arg(long, env, default_value_t = 40_000_000)]
    pub max_image_pixels: u64,
    /// Longest question accepted, in bytes.
    #[arg(long, env, default_value_t = 4096)]
    pub max_question_bytes: usize,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env, default_value_t = 512)]
    pub max_concurrent_requests: usize,
    /// A request running longer than this is cancelled with DEADLINE_EXCEEDED.
    #[arg(long, env, default_value_t = 600)]
    pub request_timeout_seconds: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env, default_value_t = 64 << 20)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub cache: CacheArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The gateway's state: worker replicas, the feature cache and limits.
pub struct Gateway {
    vision: Arc<Replicas>,
    llm: Arc<Replicas>,
    sam: Arc<Replicas>,
    cache: FeatureCache,
    admission: Admission,
    image_limits: ImageLimits,
    args: GatewayArgs,
}

/// A validated request: the image, its key and the regions' masks (SAM's RLE kept for masks it
/// made, to send back).
struct Prepared {
    image: Arc<RgbImage>,
    key: String,
    masks: Vec<Mask>,
    labels: Vec<String>,
    sam_masks: Vec<Option<v1::RleMask>>,
    sam_ns: u64,
    sam_tier: CacheTier,
}

/// Region tokens and image tokens for one request's regions.
struct Pooled {
    response: worker::PoolResponse,
    tier: CacheTier,
    encode_ns: u64,
    pool_ns: u64,
}

impl Gateway {
    pub fn new(args: GatewayArgs) -> anyhow::Result<Self> {
        Ok(Self {
            vision: Arc::new(Replicas::new("vision", &args.vision_workers).map_err(anyhow::Error::msg)?),
            llm: Arc::new(Replicas::new("llm", &args.llm_workers).map_err(anyhow::Error::msg)?),
            sam: Arc::new(Replicas::new("sam", &args.sam_workers).map_err(anyhow::Error::msg)?),
            cache: FeatureCache::from_args(&args.cache)?,
            admission: Admission::new("gateway", args.max_concurrent_requests),
            image_limits: ImageLimits {
                max_bytes: args.max_image_bytes,
                max_pixels: args.max_image_pixels,
                ..ImageLimits::default()
            },
            args,
        })
    }

    /// Resolves the worker names and checks the replicas once, then keeps doing so in the
    /// background for as long as the gateway lives.
    pub async fn discover_workers(&self) {
        let resolve_every = Duration::from_secs_f64(self.args.resolve_interval);
        let health_every = Duration::from_secs_f64(self.args.health_interval);
        let first = |replicas: Arc<Replicas>| async move {
            replicas.resolve().await;
            replicas.check_health(health_every).await;
            replicas.maintain(resolve_every, health_every);
        };
        tokio::join!(first(self.vision.clone()), first(self.llm.clone()), first(self.sam.clone()));
    }

    /// Every known replica of each worker kind and whether it is healthy.
    pub fn worker_replicas(&self) -> [(&'static str, Vec<(String, bool)>); 3] {
        [("vision", self.vision.replicas()), ("llm", self.llm.replicas()), ("sam", self.sam.replicas())]
    }

    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        self.admission.admit()
    }

    /// The image of a request: decoded from its bytes, or read back by key.
    async fn image(&self, image: Option<&v1::Image>) -> Result<(Arc<RgbImage>, String), ServiceError> {
        match image.and_then(|i| i.source.as_ref()) {
            Some(v1::image::Source::Encoded(bytes)) => {
                let image = decode_image(bytes, &self.image_limits)
                    .map_err(|e| ServiceError::invalid("image.encoded", e))?;
                let key = image.key(&self.args.model_revision);
                Ok((Arc::new(image), key))
            }
            Some(v1::image::Source::Key(key)) => {
                let bytes = self.cache.get(&pixels_key(key)).await.ok_or_else(|| {
                    ServiceError::FailedPrecondition(format!(
                        "image.key: no registered image {key:?} (unknown or expired); send the image bytes or register it again"
                    ))
                })?;
                Ok((Arc::new(pixels_from_bytes(&bytes)?), key.clone()))
            }
            None => Err(ServiceError::invalid("image", "required: set `encoded` or `key`")),
        }
    }

    /// Validates the image and regions of a request; SAM prompts and everything mode become
    /// masks through the routed SAM replica.
    async fn prepare(
        &self,
        image: Option<&v1::Image>,
        regions: &[v1::Region],
        everything: Option<&v1::EverythingParams>,
    ) -> Result<Prepared, ServiceError> {
        if regions.len() > self.args.max_regions {
            return Err(ServiceError::invalid(
                "regions",
                format!("{} regions, over the limit of {}", regions.len(), self.args.max_regions),
            ));
        }
        if everything.is_some() && !regions.is_empty() {
            return Err(ServiceError::invalid("everything", "send either regions or everything, not both"));
        }
        let (image, key) = self.image(image).await?;
        let mut masks: Vec<Option<Mask>> = Vec::with_capacity(regions.len());
        let mut prompts: Vec<(usize, v1::SamPrompt)> = Vec::new();
        for (i, region) in regions.iter().enumerate() {
            match &region.source {
                Some(v1::region::Source::Mask(mask)) => {
                    let mask = mask_from_proto(mask, image.height(), image.width(), &self.image_limits)
                        .map_err(|e| ServiceError::invalid(format!("regions[{i}].mask"), e))?;
                    masks.push(Some(mask));
                }
                Some(v1::region::Source::Prompt(prompt)) => {
                    prompts.push((i, prompt.clone()));
                    masks.push(None);
                }
                None => return Err(ServiceError::invalid(format!("regions[{i}]"), "set `mask` or `prompt`")),
            }
        }
        let mut labels: Vec<String> = regions.iter().map(|r| r.label.clone()).collect();
        let mut sam_masks: Vec<Option<v1::RleMask>> = vec![None; regions.len()];
        let start = Instant::now();
        let mut sam_tier = CacheTier::Unspecified;
        if !prompts.is_empty() {
            let sent: Vec<v1::SamPrompt> = prompts.iter().map(|(_, p)| p.clone()).collect();
            let response =
                self.sam_predict(&key, &image, sent).await.map_err(|e| prompt_field(e, &prompts))?;
            sam_tier = if response.was_resident { CacheTier::Resident } else { CacheTier::Computed };
            for ((i, _), result) in prompts.iter().zip(response.prompts) {
                let best = result
                    .masks
                    .into_iter()
                    .max_by(|a, b| a.predicted_iou.total_cmp(&b.predicted_iou))
                    .and_then(|m| m.mask)
                    .ok_or_else(|| ServiceError::Internal("SAM returned no mask for a prompt".into()))?;
                masks[*i] = Some(sam_mask(&best)?);
                sam_masks[*i] = Some(best);
            }
        }
        if let Some(params) = everything {
            let response = self.sam_everything(&key, &image, *params).await?;
            sam_tier = if response.was_resident { CacheTier::Resident } else { CacheTier::Computed };
            for (k, proposed) in response.masks.into_iter().enumerate() {
                let rle = proposed
                    .mask
                    .ok_or_else(|| ServiceError::Internal("SAM sent a mask without RLE".into()))?;
                masks.push(Some(sam_mask(&rle)?));
                labels.push(format!("everything {k}"));
                sam_masks.push(Some(rle));
            }
        }
        let masks =
            masks.into_iter().map(|m| m.expect("every region has a mask by now. This is a bug.")).collect();
        let sam_ns = if sam_tier == CacheTier::Unspecified { 0 } else { elapsed_ns(start) };
        Ok(Prepared { image, key, masks, labels, sam_masks, sam_ns, sam_tier })
    }

    /// SAM prompt decoding on the routed replica: without pixels first (the embedding is usually
    /// resident there), then with them.
    async fn sam_predict(
        &self,
        key: &str,
        image: &RgbImage,
        prompts: Vec<v1::SamPrompt>,
    ) -> Result<worker::PredictResponse, ServiceError> {
        let request = |image: Option<worker::RgbImage>| worker::PredictRequest {
            image_key: key.to_string(),
            image,
            prompts: prompts.clone(),
        };
        match self.sam.call(key, |channel| predict_call(channel, self.worker_request(request(None)))).await {
            Err(ServiceError::FailedPrecondition(_)) => {
                self.sam
                    .call(key, |channel| {
                        predict_call(channel, self.worker_request(request(Some(wire_image(image)))))
                    })
                    .await
            }
            other => other,
        }
    }

    /// SAM's automatic masks for the whole image, as [`Self::sam_predict`].
    async fn sam_everything(
        &self,
        key: &str,
        image: &RgbImage,
        params: v1::EverythingParams,
    ) -> Result<worker::EverythingResponse, ServiceError> {
        let request = |image: Option<worker::RgbImage>| worker::EverythingRequest {
            image_key: key.to_string(),
            image,
            params: Some(params),
        };
        match self.sam.call(key, |channel| everything_call(channel, self.worker_request(request(None)))).await
        {
            Err(ServiceError::FailedPrecondition(_)) => {
                self.sam
                    .call(key, |channel| {
                        everything_call(channel, self.worker_request(request(Some(wire_image(image)))))
                    })
                    .await
            }
            other => other,
        }
    }

    /// Region and image tokens of the regions `indices` (rows in that order), from the routed
    /// vision replica's resident features, the shared cache, or a fresh encoding (in that order).
    async fn pool(&self, prepared: &Prepared, indices: &[usize]) -> Result<Pooled, ServiceError> {
        let key = prepared.key.clone();
        let masks: Vec<v1::RleMask> =
            indices.iter().map(|&i| rle_to_proto(&prepared.masks[i].to_rle())).collect();
        let request = |features: Option<worker::FeatureBlob>| worker::PoolRequest {
            image_key: key.clone(),
            features,
            masks: masks.clone(),
            return_image_tokens: true,
        };
        let start = Instant::now();
        let first =
            self.vision.call(&key, |channel| pool_call(channel, self.worker_request(request(None)))).await;
        match first {
            Ok(response) => {
                let pool_ns = elapsed_ns(start);
                return Ok(Pooled { response, tier: CacheTier::Resident, encode_ns: 0, pool_ns });
            }
            Err(ServiceError::FailedPrecondition(_)) => {}
            Err(err) => return Err(err),
        }
        let (blob, tier) = self.features(&key, &prepared.image).await?;
        let encode_ns = elapsed_ns(start);
        let pool_start = Instant::now();
        let response = self
            .vision
            .call(&key, |channel| pool_call(channel, self.worker_request(request(Some(blob.clone())))))
            .await?;
        Ok(Pooled { response, tier, encode_ns, pool_ns: elapsed_ns(pool_start) })
    }

    /// The image's feature blob from the shared cache, or else encoded by the routed vision
    /// replica (and then cached).
    async fn features(
        &self,
        key: &str,
        image: &RgbImage,
    ) -> Result<(worker::FeatureBlob, CacheTier), ServiceError> {
        if let Some(blob) = self.cache.get(&features_key(key)).await.and_then(|b| blob_from_bytes(&b)) {
            return Ok((blob, CacheTier::Shared));
        }
        let encode = worker::EncodeRequest {
            image_key: key.to_string(),
            image: Some(wire_image(image)),
            return_features: true,
        };
        let response = self
            .vision
            .call(key, |channel| encode_call(channel, self.worker_request(encode.clone())))
            .await?;
        let blob = response
            .features
            .ok_or_else(|| ServiceError::Internal("vision worker sent no features".into()))?;
        self.cache.put(&features_key(key), blob_to_bytes(&blob)).await;
        Ok((blob, CacheTier::Computed))
    }

    /// Sends questions to the routed LLM replica and returns its response stream.
    async fn generate(
        &self,
        key: &str,
        pooled: &Pooled,
        questions: Vec<worker::Question>,
        parameters: Option<v1::GenerationParameters>,
    ) -> Result<Streaming<worker::GenerateResponse>, ServiceError> {
        let request = worker::GenerateRequest {
            image_key: key.to_string(),
            image_tokens: pooled.response.image_tokens.clone(),
            questions,
            parameters,
        };
        self.llm
            .call(key, |channel| {
                let request = self.worker_request(request.clone());
                async move {
                    let mut client = LlmClient::new(channel)
                        .max_decoding_message_size(usize::MAX)
                        .max_encoding_message_size(usize::MAX);
                    Ok(client.generate(request).await?.into_inner())
                }
            })
            .await
    }

    /// Describe: one question per region, results streamed as each finishes. Regions whose
    /// answer is in the result cache are answered first, without vision or the LLM.
    async fn describe_stream(
        self: &Arc<Self>,
        prepared: Prepared,
        task: worker::RegionTask,
        parameters: Option<v1::GenerationParameters>,
        start: Instant,
        tx: mpsc::Sender<Result<v1::RegionResult, Status>>,
    ) -> Result<(), ServiceError> {
        let n = prepared.masks.len();
        let question = format!("task:{}", task as i32);
        let keys: Vec<Option<String>> =
            (0..n).map(|i| self.answer_key(&prepared, &[i], &question, &[], parameters.as_ref())).collect();
        let mut missing = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.cached_answer(key.as_deref()).await {
                Some(answer) => {
                    let result = region_result(&prepared, i, answer, cached_metadata(&prepared, start));
                    metrics::counter!("osprey_gateway_regions_total").increment(1);
                    if tx.send(Ok(result)).await.is_err() {
                        return Ok(());
                    }
                }
                None => missing.push(i),
            }
        }
        if missing.is_empty() {
            return Ok(()); // every answer was cached, or everything mode found nothing
        }
        let pooled = self.pool(&prepared, &missing).await?;
        let questions = missing
            .iter()
            .enumerate()
            .map(|(row, &i)| {
                Ok(worker::Question {
                    index: i as u32,
                    prompt: Some(worker::question::Prompt::Task(task as i32)),
                    history: vec![],
                    mask_tokens: Some(rows(&pooled.response.mask_tokens, row..row + 1)?),
                    pos_tokens: Some(rows(&pooled.response.pos_tokens, row..row + 1)?),
                })
            })
            .collect::<Result<Vec<_>, ServiceError>>()?;
        let mut stream = self.generate(&prepared.key, &pooled, questions, parameters).await?;
        while let Some(response) = stream.message().await.map_err(ServiceError::from)? {
            if !response.finished {
                continue;
            }
            let i = response.question_index as usize;
            if !missing.contains(&i) {
                return Err(ServiceError::Internal(format!("the LLM worker answered unknown question {i}")));
            }
            let metadata =
                metadata(&prepared, &pooled, response.timing.as_ref(), response.prefix_cache_hit, start);
            let stored = keys[i].as_ref().map(|key| (key.clone(), stored_answer(&response)));
            metrics::counter!("osprey_gateway_regions_total").increment(1);
            if tx.send(Ok(region_result(&prepared, i, response, metadata))).await.is_err() {
                return Ok(()); // the client has gone; dropping `stream` cancels the rest downstream
            }
            if let Some((key, answer)) = stored {
                self.cache.put_result(&key, answer).await;
            }
        }
        Ok(())
    }

    /// The result-cache key of a question about `regions` of `prepared`, or `None` when the
    /// answer is not deterministic (sampling) or the result cache is off.
    fn answer_key(
        &self,
        prepared: &Prepared,
        regions: &[usize],
        question: &str,
        history: &[v1::Turn],
        parameters: Option<&v1::GenerationParameters>,
    ) -> Option<String> {
        let greedy = parameters.and_then(|p| p.temperature).unwrap_or(0.0) == 0.0;
        if !greedy || !self.cache.caches_results() {
            return None;
        }
        let mask_digests: Vec<[u8; 32]> = regions
            .iter()
            .map(|&i| {
                let mask = &prepared.masks[i];
                let mut hasher = blake3::Hasher::new();
                hasher.update(&mask.height().to_le_bytes());
                hasher.update(&mask.width().to_le_bytes());
                hasher.update(mask.data());
                *hasher.finalize().as_bytes()
            })
            .collect();
        let counts = [regions.len() as u64, history.len() as u64].map(u64::to_le_bytes);
        let parameters = parameters.map(Message::encode_to_vec).unwrap_or_default();
        let mut parts: Vec<&[u8]> = vec![
            b"osprey-answer-v1",
            self.args.model_revision.as_bytes(),
            prepared.key.as_bytes(),
            &counts[0],
            &counts[1],
        ];
        parts.extend(mask_digests.iter().map(|d| d.as_slice()));
        parts.push(question.as_bytes());
        for turn in history {
            parts.push(turn.question.as_bytes());
            parts.push(turn.answer.as_bytes());
        }
        parts.push(&parameters);
        Some(result_key(&parts))
    }

    /// The LLM's final response stored under `key`, if any.
    async fn cached_answer(&self, key: Option<&str>) -> Option<worker::GenerateResponse> {
        let bytes = self.cache.get_result(key?).await?;
        worker::GenerateResponse::decode(bytes.as_slice()).ok()
    }

    /// Validates a free-form question (Ask and Chat) and prepares its image and regions.
    async fn prepare_question(
        &self,
        image: Option<&v1::Image>,
        regions: &[v1::Region],
        question: &str,
        verbatim: bool,
        parameters: Option<&v1::GenerationParameters>,
    ) -> Result<Prepared, ServiceError> {
        if question.trim().is_empty() {
            return Err(ServiceError::invalid("question", "must not be empty"));
        }
        if question.len() > self.args.max_question_bytes {
            return Err(ServiceError::invalid(
                "question",
                format!("{} bytes, over the limit of {}", question.len(), self.args.max_question_bytes),
            ));
        }
        check_parameters(parameters)?;
        // Before `prepare`, so that a miscounted question costs no SAM or image work.
        if verbatim {
            Self::check_verbatim(question, regions.len())?;
        }
        self.prepare(image, regions, None).await
    }

    /// A verbatim question (see `AskRequest.verbatim`) names the image once and every region by
    /// one `<mask><pos>` pair; the LLM worker checks the exact layout.
    fn check_verbatim(question: &str, regions: usize) -> Result<(), ServiceError> {
        let images = question.matches("<image>").count();
        if images != 1 {
            return Err(ServiceError::invalid(
                "question",
                format!("verbatim: {images} `<image>`, expected 1"),
            ));
        }
        let pairs = question.matches("<mask><pos>").count();
        if pairs != regions {
            return Err(ServiceError::invalid(
                "question",
                format!("verbatim: {pairs} `<mask><pos>` pairs for {regions} regions"),
            ));
        }
        Ok(())
    }

    /// A free-form question (Ask, Chat) about `regions`, validated and its regions prepared; the
    /// answer comes from the result cache (with its key) or as the LLM's stream.
    async fn question_answer(
        &self,
        image: Option<&v1::Image>,
        regions: &[v1::Region],
        history: &[v1::Turn],
        question: &str,
        verbatim: bool,
        parameters: Option<v1::GenerationParameters>,
    ) -> Result<(Prepared, Answer, Option<String>), ServiceError> {
        let prepared = self.prepare_question(image, regions, question, verbatim, parameters.as_ref()).await?;
        let n = prepared.masks.len();
        let all: Vec<usize> = (0..n).collect();
        let (kind, prompt) = if verbatim {
            ("verbatim", worker::question::Prompt::Verbatim(question.to_string()))
        } else {
            ("text", worker::question::Prompt::Text(question.to_string()))
        };
        let key =
            self.answer_key(&prepared, &all, &format!("{kind}:{question}"), history, parameters.as_ref());
        if let Some(answer) = self.cached_answer(key.as_deref()).await {
            return Ok((prepared, Answer::Cached(answer), key));
        }
        let pooled = self.pool(&prepared, &all).await?;
        let question = worker::Question {
            index: 0,
            prompt: Some(prompt),
            history: history
                .iter()
                .map(|t| worker::Exchange { question: t.question.clone(), answer: t.answer.clone() })
                .collect(),
            mask_tokens: (n > 0).then(|| rows(&pooled.response.mask_tokens, 0..n)).transpose()?,
            pos_tokens: (n > 0).then(|| rows(&pooled.response.pos_tokens, 0..n)).transpose()?,
        };
        let stream = self.generate(&prepared.key, &pooled, vec![question], parameters).await?;
        Ok((prepared, Answer::Streaming(stream, Box::new(pooled)), key))
    }

    /// The last response of a streamed answer: kept in the result cache (when the request has a
    /// key) and summed up in the response metadata.
    async fn finish_answer(
        &self,
        key: Option<&str>,
        response: &worker::GenerateResponse,
        prepared: &Prepared,
        pooled: &Pooled,
        start: Instant,
    ) -> Metadata {
        if let Some(key) = key {
            self.cache.put_result(key, stored_answer(response)).await;
        }
        metadata(prepared, pooled, response.timing.as_ref(), response.prefix_cache_hit, start)
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.args.request_timeout_seconds.max(1))
    }

    /// A call to a worker: this request's trace context, and its deadline as `grpc-timeout` (the
    /// worker stops when it passes; dropping the call, when the client cancels, resets the stream).
    fn worker_request<T>(&self, message: T) -> Request<T> {
        worker_request(message, self.timeout())
    }
}

/// Runs `work` under the request timeout, turning its error into a status on `tx`.
async fn finish_stream<T>(
    work: impl std::future::Future<Output = Result<(), ServiceError>>,
    timeout: Duration,
    tx: mpsc::Sender<Result<T, Status>>,
) {
    let result = match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(ServiceError::DeadlineExceeded(format!("the request ran past {}s", timeout.as_secs()))),
    };
    if let Err(err) = result {
        let _ = tx.send(Err(err.into_status())).await;
    }
}

/// The answer to a free-form question.
enum Answer {
    /// From the result cache: the LLM's final response, as stored.
    Cached(worker::GenerateResponse),
    Streaming(Streaming<worker::GenerateResponse>, Box<Pooled>),
}

/// What the result cache keeps of an answer: the LLM's final response without its timings.
fn stored_answer(response: &worker::GenerateResponse) -> Vec<u8> {
    worker::GenerateResponse {
        question_index: 0,
        text: String::new(),
        finished: true,
        timing: None,
        prefix_cache_hit: false,
        ..response.clone()
    }
    .encode_to_vec()
}

/// Region `i`'s result from the LLM's final response about it.
fn region_result(
    prepared: &Prepared,
    i: usize,
    answer: worker::GenerateResponse,
    metadata: Metadata,
) -> v1::RegionResult {
    let rle = prepared.masks[i].to_rle();
    v1::RegionResult {
        region_index: i as u32,
        label: prepared.labels[i].clone(),
        text: answer.answer,
        raw_text: answer.raw_text,
        area: rle.area(),
        bbox: rle.bbox().iter().map(|&v| v as f32).collect(),
        mask: prepared.sam_masks[i].clone(),
        generated_tokens: answer.generated_tokens,
        finish_reason: answer.finish_reason,
        metadata: Some(metadata),
    }
}

/// Metadata of an answer served from the result cache: only SAM (if any) ran.
fn cached_metadata(prepared: &Prepared, start: Instant) -> Metadata {
    Metadata {
        timing: Some(Timing { sam_ns: prepared.sam_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
        cache: Some(CacheHits {
            sam_embedding: prepared.sam_tier as i32,
            result: true,
            ..CacheHits::default()
        }),
    }
}

fn metadata(
    prepared: &Prepared,
    pooled: &Pooled,
    llm: Option<&Timing>,
    prefix_hit: bool,
    start: Instant,
) -> Metadata {
    let llm = llm.cloned().unwrap_or_default();
    Metadata {
        timing: Some(Timing {
            sam_ns: prepared.sam_ns,
            encode_ns: pooled.encode_ns,
            pool_ns: pooled.pool_ns,
            prefill_ns: llm.prefill_ns,
            decode_ns: llm.decode_ns,
            total_ns: elapsed_ns(start),
            ..Timing::default()
        }),
        cache: Some(CacheHits {
            sam_embedding: prepared.sam_tier as i32,
            vision_features: pooled.tier as i32,
            llm_prefix: prefix_hit,
            result: false,
        }),
    }
}

/// Rows `range` of an f32 `[N, C]` wire tensor.
fn rows(tensor: &Option<v1::Tensor>, range: std::ops::Range<usize>) -> Result<v1::Tensor, ServiceError> {
    let tensor = tensor
        .as_ref()
        .ok_or_else(|| ServiceError::Internal("vision worker sent no region tokens".into()))?;
    let width =
        *tensor.shape.get(1).ok_or_else(|| ServiceError::Internal("region tokens are not [N, C]".into()))?
            as usize;
    let bytes = tensor
        .data
        .get(range.start * width * 4..range.end * width * 4)
        .ok_or_else(|| ServiceError::Internal("fewer region tokens than regions".into()))?;
    Ok(v1::Tensor {
        shape: vec![range.len() as u64, width as u64],
        dtype: tensor.dtype,
        data: bytes.to_vec(),
    })
}

fn describe_task(task: i32) -> Result<worker::RegionTask, ServiceError> {
    match v1::DescribeTask::try_from(task) {
        Ok(v1::DescribeTask::Short) => Ok(worker::RegionTask::Short),
        Ok(v1::DescribeTask::Detailed) => Ok(worker::RegionTask::Detailed),
        Ok(v1::DescribeTask::Category) => Ok(worker::RegionTask::Category),
        Err(_) => Err(ServiceError::invalid("task", format!("unknown task {task}"))),
    }
}

fn check_parameters(p: Option<&v1::GenerationParameters>) -> Result<(), ServiceError> {
    let Some(p) = p else { return Ok(()) };
    if let Some(t) = p.temperature
        && !(t.is_finite() && t >= 0.0)
    {
        return Err(ServiceError::invalid(
            "parameters.temperature",
            format!("must be finite and >= 0, got {t}"),
        ));
    }
    if let Some(top_p) = p.top_p
        && !(top_p > 0.0 && top_p <= 1.0)
    {
        return Err(ServiceError::invalid("parameters.top_p", format!("must be in (0, 1], got {top_p}")));
    }
    if p.max_new_tokens == Some(0) {
        return Err(ServiceError::invalid("parameters.max_new_tokens", "must be at least 1"));
    }
    Ok(())
}

fn worker_request<T>(message: T, timeout: Duration) -> Request<T> {
    let mut request = inject_trace_context(Request::new(message));
    request.set_timeout(timeout);
    request
}

async fn pool_call(
    channel: tonic::transport::Channel,
    request: Request<worker::PoolRequest>,
) -> Result<worker::PoolResponse, Status> {
    let mut client = VisionClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    Ok(client.pool(request).await?.into_inner())
}

async fn encode_call(
    channel: tonic::transport::Channel,
    request: Request<worker::EncodeRequest>,
) -> Result<worker::EncodeResponse, Status> {
    let mut client = VisionClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .max_encoding_message_size(usize::MAX);
    Ok(client.encode(request).await?.into_inner())
}

/// Cached blob bytes: the model revision (length-prefixed) then the safetensors bytes.
fn blob_to_bytes(blob: &worker::FeatureBlob) -> Vec<u8> {
    let revision = blob.model_revision.as_bytes();
    let mut bytes = Vec::with_capacity(4 + revision.len() + blob.safetensors.len());
    bytes.extend_from_slice(&(revision.len() as u32).to_le_bytes());
    bytes.extend_from_slice(revision);
    bytes.extend_from_slice(&blob.safetensors);
    bytes
}

fn blob_from_bytes(bytes: &[u8]) -> Option<worker::FeatureBlob> {
    let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let revision = std::str::from_utf8(bytes.get(4..4 + n)?).ok()?.to_string();
    Some(worker::FeatureBlob { safetensors: bytes.get(4 + n..)?.to_vec(), model_revision: revision })
}

/// Registered pixels: width and height (u32 little-endian) then RGB8.
fn pixels_to_bytes(image: &RgbImage) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(8 + image.pixels().len());
    bytes.extend_from_slice(&image.width().to_le_bytes());
    bytes.extend_from_slice(&image.height().to_le_bytes());
    bytes.extend_from_slice(image.pixels());
    bytes
}

fn pixels_from_bytes(bytes: &[u8]) -> Result<RgbImage, ServiceError> {
    let corrupt = || ServiceError::Internal("corrupt registered image in the cache".into());
    let width = u32::from_le_bytes(bytes.get(..4).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
    let height = u32::from_le_bytes(bytes.get(4..8).ok_or_else(corrupt)?.try_into().map_err(|_| corrupt())?);
    RgbImage::from_raw(width, height, bytes[8..].to_vec()).map_err(|_| corrupt())
}

pub(crate) fn positive_seconds(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds > 0.0 => Ok(seconds),
        _ => Err(format!("expected a positive number of seconds, got {text:?}")),
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

type ResultStream<T> = ReceiverStream<Result<T, Status>>;

/// The handlers; shared state lives in `Arc<Gateway>`.
pub struct OspreyService(pub Arc<Gateway>);

#[tonic::async_trait]
impl Osprey for OspreyService {
    #[instrument(skip_all)]
    async fn register_image(
        &self,
        request: Request<v1::RegisterImageRequest>,
    ) -> Result<Response<v1::RegisterImageResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let start = Instant::now();
        let request = request.into_inner();
        let image = decode_image(&request.encoded, &self.0.image_limits)
            .map_err(|e| ServiceError::invalid("encoded", e).into_status())?;
        let key = image.key(&self.0.args.model_revision);
        self.0.cache.put(&pixels_key(&key), pixels_to_bytes(&image)).await;
        let mut metadata = Metadata::default();
        if request.warm_features {
            let (_, tier) = self.0.features(&key, &image).await.map_err(ServiceError::into_status)?;
            let timing =
                Timing { encode_ns: elapsed_ns(start), total_ns: elapsed_ns(start), ..Timing::default() };
            metadata.timing = Some(timing);
            metadata.cache = Some(CacheHits { vision_features: tier as i32, ..CacheHits::default() });
        }
        Ok(Response::new(v1::RegisterImageResponse {
            key,
            width: image.width(),
            height: image.height(),
            metadata: Some(metadata),
        }))
    }

    #[instrument(skip_all, fields(prompts = request.get_ref().prompts.len()))]
    async fn segment(
        &self,
        request: Request<v1::SegmentRequest>,
    ) -> Result<Response<v1::SegmentResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let start = Instant::now();
        let request = request.into_inner();
        let work = async {
            let (image, key) = self.0.image(request.image.as_ref()).await?;
            let (prompts, everything, was_resident) = match (&request.everything, request.prompts.is_empty())
            {
                (Some(_), false) => {
                    return Err(ServiceError::invalid("everything", "send either prompts or everything"));
                }
                (None, true) => {
                    return Err(ServiceError::invalid(
                        "prompts",
                        "at least one prompt (or everything) is needed",
                    ));
                }
                (None, false) => {
                    let response = self.0.sam_predict(&key, &image, request.prompts.clone()).await?;
                    let prompts =
                        response.prompts.into_iter().map(|p| v1::PromptResult { masks: p.masks }).collect();
                    (prompts, vec![], response.was_resident)
                }
                (Some(params), true) => {
                    let response = self.0.sam_everything(&key, &image, *params).await?;
                    (vec![], response.masks, response.was_resident)
                }
            };
            let tier = if was_resident { CacheTier::Resident } else { CacheTier::Computed };
            let metadata = Metadata {
                timing: Some(Timing {
                    sam_ns: elapsed_ns(start),
                    total_ns: elapsed_ns(start),
                    ..Timing::default()
                }),
                cache: Some(CacheHits { sam_embedding: tier as i32, ..CacheHits::default() }),
            };
            Ok(v1::SegmentResponse { prompts, everything, metadata: Some(metadata) })
        };
        respond(work.await)
    }

    type DescribeStream = ResultStream<v1::RegionResult>;

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len()))]
    async fn describe(
        &self,
        request: Request<v1::DescribeRequest>,
    ) -> Result<Response<Self::DescribeStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let permit = self.0.admit().map_err(ServiceError::into_status)?;
        let start = Instant::now();
        let request = request.into_inner();
        // Validate (and run SAM) before answering, so that bad input is the RPC's status, not a
        // stream item.
        let task = describe_task(request.task).map_err(ServiceError::into_status)?;
        check_parameters(request.parameters.as_ref()).map_err(ServiceError::into_status)?;
        if request.regions.is_empty() && request.everything.is_none() {
            return Err(ServiceError::invalid("regions", "at least one region is needed").into_status());
        }
        let prepared = self
            .0
            .prepare(request.image.as_ref(), &request.regions, request.everything.as_ref())
            .await
            .map_err(ServiceError::into_status)?;
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.0.clone();
        tokio::spawn(
            async move {
                let _permit = permit;
                let work = gateway.describe_stream(prepared, task, request.parameters, start, tx.clone());
                finish_stream(work, gateway.timeout(), tx).await;
            }
            .instrument(Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len()))]
    async fn ask(&self, request: Request<v1::AskRequest>) -> Result<Response<v1::AskResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.0.admit().map_err(ServiceError::into_status)?;
        let start = Instant::now();
        let request = request.into_inner();
        let work = async {
            let ask = |response: worker::GenerateResponse, metadata| v1::AskResponse {
                text: response.answer,
                raw_text: response.raw_text,
                generated_tokens: response.generated_tokens,
                finish_reason: response.finish_reason,
                metadata: Some(metadata),
            };
            let (image, regions) = (request.image.as_ref(), &request.regions);
            let (prepared, answer, key) = self
                .0
                .question_answer(image, regions, &[], &request.question, request.verbatim, request.parameters)
                .await?;
            let (mut stream, pooled) = match answer {
                Answer::Cached(response) => return Ok(ask(response, cached_metadata(&prepared, start))),
                Answer::Streaming(stream, pooled) => (stream, pooled),
            };
            while let Some(response) = stream.message().await.map_err(ServiceError::from)? {
                if response.finished {
                    let metadata =
                        self.0.finish_answer(key.as_deref(), &response, &prepared, &pooled, start).await;
                    return Ok(ask(response, metadata));
                }
            }
            Err(ServiceError::Internal("the LLM worker ended the answer early".into()))
        };
        match tokio::time::timeout(self.0.timeout(), work).await {
            Ok(result) => result.map(Response::new).map_err(ServiceError::into_status),
            Err(_) => {
                Err(ServiceError::DeadlineExceeded("the request ran past its timeout".into()).into_status())
            }
        }
    }

    type ChatStream = ResultStream<v1::ChatChunk>;

    #[instrument(skip_all, fields(regions = request.get_ref().regions.len(), turns = request.get_ref().history.len()))]
    async fn chat(&self, request: Request<v1::ChatRequest>) -> Result<Response<Self::ChatStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let permit = self.0.admit().map_err(ServiceError::into_status)?;
        let start = Instant::now();
        let request = request.into_inner();
        let (image, regions) = (request.image.as_ref(), &request.regions);
        let (prepared, answer, key) = self
            .0
            .question_answer(image, regions, &request.history, &request.question, false, request.parameters)
            .await
            .map_err(ServiceError::into_status)?;
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
                                finish_reason: response.finish_reason,
                                metadata: Some(cached_metadata(&prepared, start)),
                            };
                            let _ = tx.send(Ok(chunk)).await;
                            return Ok(());
                        }
                        Answer::Streaming(stream, pooled) => (stream, pooled),
                    };
                    while let Some(response) = stream.message().await.map_err(ServiceError::from)? {
                        let metadata = if response.finished {
                            let key = key.as_deref();
                            Some(gateway.finish_answer(key, &response, &prepared, &pooled, start).await)
                        } else {
                            None
                        };
                        let chunk = v1::ChatChunk {
                            text: response.text,
                            finished: response.finished,
                            finish_reason: response.finish_reason,
                            metadata,
                        };
                        if tx.send(Ok(chunk)).await.is_err() {
                            break;
                        }
                    }
                    Ok(())
                };
                finish_stream(work, gateway.timeout(), tx.clone()).await;
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
        let mut items = request.into_inner();
        let (tx, rx) = mpsc::channel(64);
        let gateway = self.0.clone();
        tokio::spawn(
            async move {
                // Items are answered one after the other; a bad item gets an ItemError and the
                // stream goes on.
                while let Ok(Some(item)) = items.message().await {
                    if !annotate_item(&gateway, item, &tx).await {
                        break;
                    }
                }
            }
            .instrument(Span::current()),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Answers one Annotate item; false when the client has gone.
async fn annotate_item(
    gateway: &Arc<Gateway>,
    item: v1::AnnotateRequest,
    tx: &mpsc::Sender<Result<v1::AnnotateResponse, Status>>,
) -> bool {
    use v1::annotate_response::Event;
    let start = Instant::now();
    let item_id = item.item_id.clone();
    let (results_tx, mut results) = mpsc::channel(64);
    let run = {
        let gateway = gateway.clone();
        tokio::spawn(async move {
            let permit = gateway.admit()?;
            let work = async {
                let task = describe_task(item.task)?;
                check_parameters(item.parameters.as_ref())?;
                if item.regions.is_empty() && item.everything.is_none() {
                    return Err(ServiceError::invalid("regions", "at least one region is needed"));
                }
                let prepared =
                    gateway.prepare(item.image.as_ref(), &item.regions, item.everything.as_ref()).await?;
                gateway.describe_stream(prepared, task, item.parameters, start, results_tx).await
            };
            let result = tokio::time::timeout(gateway.timeout(), work).await.unwrap_or_else(|_| {
                Err(ServiceError::DeadlineExceeded("the item ran past its timeout".into()))
            });
            drop(permit);
            result
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
        Ok(Ok(())) => Event::Done(v1::ItemDone {
            regions: answered,
            metadata: Some(Metadata {
                timing: Some(Timing { total_ns: elapsed_ns(start), ..Timing::default() }),
                cache: None,
            }),
        }),
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

/// Checks the API key on every public call (health and reflection stay open for probes).
#[derive(Clone)]
pub struct ApiKeyCheck(pub Option<Arc<str>>);

impl tonic::service::Interceptor for ApiKeyCheck {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.0 else { return Ok(request) };
        let metadata = request.metadata();
        let bearer = metadata
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let header = metadata.get("x-api-key").and_then(|v| v.to_str().ok());
        if bearer.or(header).is_some_and(|given| constant_time_eq(given.as_bytes(), expected.as_bytes())) {
            Ok(request)
        } else {
            metrics::counter!("osprey_request_failure", "err" => "unauthenticated").increment(1);
            Err(ServiceError::Unauthenticated.into())
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves the public API until `shutdown`, then drains.
pub async fn run(
    args: GatewayArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = tls_config(&args)?;
    let (routes, health) = osprey_common::grpc::standard_routes(&["osprey.v1.Osprey"]).await;
    let api_key = args.api_key.clone().map(Arc::from);
    let max_message_bytes = args.max_message_bytes;
    let gateway = Arc::new(Gateway::new(args)?);
    gateway.discover_workers().await;
    let server = osprey_proto::v1::osprey_server::OspreyServer::new(OspreyService(gateway))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let routes = routes
        .add_service(tonic::service::interceptor::InterceptedService::new(server, ApiKeyCheck(api_key)));
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "serving");
    match tls {
        None => osprey_common::grpc::serve(listener, routes, &health, shutdown).await?,
        Some(tls) => {
            // As osprey_common::grpc::serve, over TLS.
            let drain = async move {
                shutdown.await;
                health.set_not_serving().await;
            };
            tonic::transport::Server::builder()
                .tls_config(tls)?
                .add_routes(routes)
                .serve_with_incoming_shutdown(osprey_common::grpc::incoming(listener), drain)
                .await?
        }
    }
    Ok(())
}

/// The server TLS configuration from `--tls-cert` and `--tls-key`, if given.
fn tls_config(args: &GatewayArgs) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
    let (Some(cert), Some(key)) = (&args.tls_cert, &args.tls_key) else { return Ok(None) };
    let read = |path: &std::path::Path, what: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("cannot read the TLS {what} {}: {e}", path.display()))
    };
    let identity = tonic::transport::Identity::from_pem(read(cert, "certificate")?, read(key, "key")?);
    Ok(Some(tonic::transport::ServerTlsConfig::new().identity(identity)))
}

/// `gateway serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: GatewayArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "gateway")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, osprey_common::grpc::shutdown_signal()).await
}

async fn predict_call(
    channel: tonic::transport::Channel,
    request: Request<worker::PredictRequest>,
) -> Result<worker::PredictResponse, Status> {
    let mut client =
        SamClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    Ok(client.predict(request).await?.into_inner())
}

async fn everything_call(
    channel: tonic::transport::Channel,
    request: Request<worker::EverythingRequest>,
) -> Result<worker::EverythingResponse, Status> {
    let mut client =
        SamClient::new(channel).max_decoding_message_size(usize::MAX).max_encoding_message_size(usize::MAX);
    Ok(client.everything(request).await?.into_inner())
}

fn wire_image(image: &RgbImage) -> worker::RgbImage {
    worker::RgbImage { width: image.width(), height: image.height(), rgb: image.pixels().to_vec() }
}

/// A mask SAM made, decoded (its size is the image's by construction).
fn sam_mask(rle: &v1::RleMask) -> Result<Mask, ServiceError> {
    rle_from_proto(rle)
        .map(|r| r.to_mask())
        .map_err(|e| ServiceError::Internal(format!("SAM sent a malformed mask: {e}")))
}

/// The SAM worker names prompts by their index in its request (`prompts[j]...`); the client knows
/// them as `regions[i].prompt...`.
fn prompt_field(err: ServiceError, prompts: &[(usize, v1::SamPrompt)]) -> ServiceError {
    match err {
        ServiceError::InvalidArgument(message) => {
            let renamed = message.strip_prefix("prompts[").and_then(|rest| {
                let (j, tail) = rest.split_once(']')?;
                let (i, _) = prompts.get(j.parse::<usize>().ok()?)?;
                Some(format!("regions[{i}].prompt{tail}"))
            });
            ServiceError::InvalidArgument(renamed.unwrap_or(message))
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_calls_carry_the_deadline() {
        let request = worker_request((), Duration::from_secs(90));
        let header = request.metadata().get("grpc-timeout").expect("grpc-timeout set");
        assert_eq!(header.to_str().unwrap(), "90000000u");
    }
}
