//! The LLM worker as a gRPC service (`osprey.worker.v1.Llm`): prompts built from the Osprey
//! template, validated and handed to the engine thread (prefix sharing, continuous batching);
//! each question's text streamed back as it is generated.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use osprey_common::ServiceError;
use osprey_common::grpc::{serve, shutdown_signal, standard_routes};
use osprey_common::lru::ResidentCache;
use osprey_common::telemetry::{TelemetryArgs, set_parent_from_metadata};
use osprey_common::tensor::f32_from_proto;
use osprey_proto::worker::v1::llm_server::{Llm, LlmServer};
use osprey_proto::worker::v1::question::Prompt;
use osprey_proto::worker::v1::{
    FinishReason as ProtoFinishReason, GenerateRequest as ProtoRequest, GenerateResponse,
    GenerationParameters, Question as ProtoQuestion, RegionTask, Timing,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, instrument};

use crate::checkpoint::{load_model, load_tokenizer};
use crate::engine::{Engine, EngineConfig, EngineHandle, Event, GenerateRequest, Question};
use crate::error::LlmError;
use crate::prompt::{self, PostProcess, Task, Turn};
use crate::sampling::{FinishReason, SamplingParams};
use crate::tokenizer::OspreyTokenizer;

/// `llm-worker serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Osprey checkpoint directory: config.json, weights, tokenizer.model or tokenizer.json and
    /// added_tokens.json; or a Hugging Face repo id (`sunshine-lwt/Osprey-7b[@revision]`) fetched
    /// into `HF_HOME`; or a GGUF file written by `llm-worker quantize` (quantized linear layers).
    #[arg(long, env = "OSPREY_WEIGHTS")]
    pub weights: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, env = "OSPREY_LISTEN", default_value = "0.0.0.0:50053")]
    pub listen: SocketAddr,
    /// Compute device: `cpu` or `cuda:N` (a build with `--features cuda`).
    #[arg(long, env = "OSPREY_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Weights and activations dtype: `auto` (f32 on the CPU, bf16 on a GPU), `f32`, `bf16`, `f16`.
    #[arg(long, env = "OSPREY_DTYPE", default_value = "auto")]
    pub dtype: String,
    /// Most sequences decoded together in one forward pass.
    #[arg(long, env = "OSPREY_MAX_BATCH_SIZE", default_value_t = 32)]
    pub max_batch_size: usize,
    /// Requests queued for the engine before new ones are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OSPREY_MAX_QUEUED_REQUESTS", default_value_t = 64)]
    pub max_queued_requests: usize,
    /// Computed prefixes (system prompt + image tokens) kept for later requests about the same image.
    #[arg(long, env = "OSPREY_PREFIX_CACHE_ENTRIES", default_value_t = 16)]
    pub prefix_cache_entries: usize,
    /// Bytes of image tokens kept so that later requests about an image need not send them again
    /// (f32: 3 MiB per image at full size, so the default holds more images than the prefix cache).
    #[arg(long, env = "OSPREY_RESIDENT_IMAGE_TOKEN_BYTES", default_value_t = 256 << 20)]
    pub resident_image_token_bytes: usize,
    /// New tokens per answer when the request does not say.
    #[arg(long, env = "OSPREY_DEFAULT_MAX_NEW_TOKENS", default_value_t = 512)]
    pub default_max_new_tokens: u32,
    /// Most new tokens a request may ask for (the official scripts use 1024).
    #[arg(long, env = "OSPREY_MAX_NEW_TOKENS_LIMIT", default_value_t = 1024)]
    pub max_new_tokens_limit: u32,
    /// Most questions in one request.
    #[arg(long, env = "OSPREY_MAX_QUESTIONS", default_value_t = 1024)]
    pub max_questions: usize,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    /// TLS, and mutual TLS with `--tls-client-ca` (docs/RELIABILITY.md, Security).
    #[command(flatten)]
    pub tls: osprey_common::grpc::ServerTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// Limits applied to requests before they reach the engine.
#[derive(Debug, Clone)]
struct Limits {
    default_max_new_tokens: u32,
    max_new_tokens_limit: u32,
    max_questions: usize,
}

/// The gRPC handler in front of the engine thread.
pub struct LlmService {
    engine: EngineHandle,
    tokenizer: Arc<OspreyTokenizer>,
    limits: Limits,
    /// Image tokens `[T, mm_hidden]` (f32, CPU) by [`image_identity`], kept from requests that sent
    /// them.
    resident_image_tokens: ResidentCache<Tensor>,
}

impl From<LlmError> for ServiceError {
    fn from(err: LlmError) -> Self {
        match err {
            err if err.is_invalid_argument() => ServiceError::InvalidArgument(err.to_string()),
            LlmError::Overloaded(msg) => ServiceError::Overloaded(msg),
            LlmError::EngineStopped => ServiceError::Unavailable(err.to_string()),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

impl LlmService {
    /// Loads config, weights and tokenizer and starts the engine thread.
    pub fn load(args: &ServeArgs) -> Result<Self, anyhow::Error> {
        let device = osprey_checkpoint::parse_device(&args.device).map_err(anyhow::Error::msg)?;
        let dtype = osprey_checkpoint::parse_dtype(&args.dtype, &device).map_err(anyhow::Error::msg)?;
        let model = load_model(&args.weights, dtype, &device)?;
        tracing::info!(device = args.device, ?dtype, "model loaded");
        let tokenizer = load_tokenizer(&args.weights)?;
        let cfg = model.config();
        if (tokenizer.mask_id(), tokenizer.pos_id()) != (cfg.mask_token_id, cfg.pos_token_id) {
            anyhow::bail!(
                "tokenizer has <mask>={} <pos>={}, the model expects {} and {}",
                tokenizer.mask_id(),
                tokenizer.pos_id(),
                cfg.mask_token_id,
                cfg.pos_token_id
            );
        }
        let engine_cfg = EngineConfig {
            max_batch_size: args.max_batch_size.max(1),
            max_queued_requests: args.max_queued_requests.max(1),
            prefix_cache_entries: args.prefix_cache_entries,
        };
        let (engine, _thread) = Engine::new(model, engine_cfg).spawn()?;
        let limits = Limits {
            default_max_new_tokens: args.default_max_new_tokens.max(1),
            max_new_tokens_limit: args.max_new_tokens_limit.max(1),
            max_questions: args.max_questions,
        };
        let resident_image_tokens = ResidentCache::new(
            args.resident_image_token_bytes,
            "osprey_llm_resident_image_token_lookups_total",
            "osprey_llm_resident_image_token_bytes",
        );
        Ok(Self { engine, tokenizer: Arc::new(tokenizer), limits, resident_image_tokens })
    }

    /// Turns the wire request into the engine's, checking everything the client controls. Image
    /// tokens the request does not carry come from the resident copy of its image.
    fn engine_request(
        &self,
        request: &ProtoRequest,
    ) -> Result<(GenerateRequest, Vec<PostProcess>), ServiceError> {
        let cfg = self.engine.model_config();
        if request.questions.is_empty() {
            return Err(ServiceError::invalid("questions", "at least one question is needed"));
        }
        if request.questions.len() > self.limits.max_questions {
            return Err(ServiceError::invalid(
                "questions",
                format!(
                    "{} questions, over the limit of {}",
                    request.questions.len(),
                    self.limits.max_questions
                ),
            ));
        }
        let identity = image_identity(&request.image_key, &request.feature_revision);
        let image_features = match (&request.image_tokens, &identity) {
            (Some(tokens), _) => {
                let (shape, values) = f32_from_proto(tokens, "image_tokens", 2)?;
                Tensor::from_vec(values, (shape[0], shape[1]), &Device::Cpu).map_err(internal)?
            }
            (None, Some(identity)) => self.resident_image_tokens.get(identity).ok_or_else(|| {
                ServiceError::FailedPrecondition(format!(
                    "image tokens of image {} (feature revision {:?}) are not resident on this worker; \
                     send them in `image_tokens`",
                    request.image_key, request.feature_revision
                ))
            })?,
            (None, None) => {
                return Err(ServiceError::invalid("image_tokens", "required when image_key is empty"));
            }
        };
        let params = self.sampling(request.parameters.as_ref())?;
        let mut questions = Vec::with_capacity(request.questions.len());
        let mut post = Vec::with_capacity(request.questions.len());
        for (i, question) in request.questions.iter().enumerate() {
            let field = format!("questions[{i}]");
            let (mask_tokens, n) = region_tokens(
                question.mask_tokens.as_ref(),
                &format!("{field}.mask_tokens"),
                cfg.hidden_size,
            )?;
            let (pos_tokens, m) =
                region_tokens(question.pos_tokens.as_ref(), &format!("{field}.pos_tokens"), cfg.hidden_size)?;
            if n != m {
                return Err(ServiceError::invalid(&field, format!("{n} mask tokens but {m} pos tokens")));
            }
            let (text, mode) = question_prompt(question, n).map_err(|e| ServiceError::invalid(&field, e))?;
            let input_ids =
                self.tokenizer.tokenizer_image_token(&text).map_err(|e| ServiceError::invalid(&field, e))?;
            questions.push(Question { input_ids, mask_tokens, pos_tokens, params: params.clone() });
            post.push(mode);
        }
        // The prefix cache is keyed by the same identity, so a new feature revision never reuses a
        // prefix computed from the old image tokens.
        Ok((GenerateRequest { image_key: identity, image_features: Some(image_features), questions }, post))
    }

    fn sampling(&self, parameters: Option<&GenerationParameters>) -> Result<SamplingParams, ServiceError> {
        let p = parameters.cloned().unwrap_or_default();
        let max_new_tokens = p.max_new_tokens.unwrap_or(self.limits.default_max_new_tokens);
        if max_new_tokens == 0 || max_new_tokens > self.limits.max_new_tokens_limit {
            return Err(ServiceError::invalid(
                "parameters.max_new_tokens",
                format!("must be 1 to {}, got {max_new_tokens}", self.limits.max_new_tokens_limit),
            ));
        }
        let temperature = p.temperature.unwrap_or(0.0);
        let params = if temperature == 0.0 {
            SamplingParams::greedy(max_new_tokens as usize)
        } else {
            let defaults = SamplingParams::osprey_default(0);
            SamplingParams {
                temperature,
                top_p: p.top_p.unwrap_or(defaults.top_p),
                top_k: p.top_k.map_or(defaults.top_k, |k| k as usize),
                seed: p.seed.unwrap_or_else(random_seed),
                max_new_tokens: max_new_tokens as usize,
                stop_at_eos: true,
            }
        };
        params.validate().map_err(|e| ServiceError::invalid("parameters", e))?;
        Ok(params)
    }

    async fn generate(
        &self,
        request: ProtoRequest,
    ) -> Result<mpsc::Receiver<Result<GenerateResponse, Status>>, ServiceError> {
        let start = Instant::now();
        let (engine_request, post) = self.engine_request(&request)?;
        // Kept only once the engine has accepted them (validated), for requests that omit them.
        let sent_image_tokens = match (&request.image_tokens, &engine_request.image_key) {
            (Some(_), Some(identity)) => engine_request.image_features.clone().map(|t| (identity.clone(), t)),
            _ => None,
        };
        let indices: Vec<u32> = request.questions.iter().map(|q| q.index).collect();
        let streams = self.engine.try_submit(engine_request)?;
        if let Some((identity, tokens)) = sent_image_tokens {
            let bytes = tokens.elem_count() * tokens.dtype().size_in_bytes();
            self.resident_image_tokens.insert(&identity, tokens, bytes);
        }
        let (tx, rx) = mpsc::channel(64);
        for ((stream, index), mode) in streams.into_iter().zip(indices).zip(post) {
            let relay = Relay { tokenizer: self.tokenizer.clone(), tx: tx.clone(), index, mode, start };
            tokio::spawn(relay.run(stream).instrument(Span::current()));
        }
        Ok(rx)
    }
}

/// Forwards one question's engine events to the response stream as text pieces.
struct Relay {
    tokenizer: Arc<OspreyTokenizer>,
    tx: mpsc::Sender<Result<GenerateResponse, Status>>,
    index: u32,
    mode: PostProcess,
    start: Instant,
}

impl Relay {
    async fn run(self, mut stream: crate::engine::EventStream) {
        let mut ids: Vec<u32> = Vec::new();
        let mut sent = 0usize; // bytes of decoded text already sent
        let mut first_token: Option<Instant> = None;
        while let Some(event) = stream.recv().await {
            let response = match event {
                Event::Token(id) => {
                    first_token.get_or_insert_with(Instant::now);
                    ids.push(id);
                    let text = self.decode(&ids);
                    // Hold back a trailing partial UTF-8 sequence until it completes.
                    let stable = text.trim_end_matches('\u{FFFD}');
                    if stable.len() <= sent || !stable.is_char_boundary(sent) {
                        continue;
                    }
                    let piece = stable[sent..].to_string();
                    sent = stable.len();
                    GenerateResponse { question_index: self.index, text: piece, ..Default::default() }
                }
                Event::Finished(done) => {
                    let raw = self.decode(&ids);
                    let piece = raw.get(sent..).unwrap_or_default().to_string();
                    let prefill_end = first_token.unwrap_or_else(Instant::now);
                    metrics::counter!("osprey_llm_generated_tokens_total")
                        .increment(done.generated_tokens as u64);
                    metrics::counter!("osprey_llm_prefix_cache_lookups_total", "hit" => (done.cached_prefix_positions > 0).to_string())
                        .increment(1);
                    metrics::histogram!("osprey_llm_generate_duration_seconds")
                        .record(self.start.elapsed().as_secs_f64());
                    GenerateResponse {
                        question_index: self.index,
                        text: piece,
                        finished: true,
                        answer: prompt::post_process(&raw, self.mode),
                        raw_text: raw,
                        generated_tokens: done.generated_tokens as u32,
                        finish_reason: match done.reason {
                            FinishReason::Eos => ProtoFinishReason::Eos,
                            FinishReason::Length => ProtoFinishReason::Length,
                        } as i32,
                        prefix_cache_hit: done.cached_prefix_positions > 0,
                        timing: Some(Timing {
                            prefill_ns: (prefill_end - self.start).as_nanos() as u64,
                            decode_ns: prefill_end.elapsed().as_nanos() as u64,
                            total_ns: self.start.elapsed().as_nanos() as u64,
                            ..Timing::default()
                        }),
                    }
                }
                Event::Error(message) => {
                    // Counted with every other failure (a model failure: the gateway may retry).
                    let _ = self.tx.send(Err(ServiceError::Internal(message).into_status())).await;
                    return;
                }
            };
            if self.tx.send(Ok(response)).await.is_err() {
                return; // the client has gone; dropping `stream` takes the question out of the batch
            }
        }
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, true).unwrap_or_default()
    }
}

/// What names a request's image tokens across requests: the image key and the revision of the
/// vision weights that computed them, length-prefixed so no two pairs give the same text. `None`
/// without an image key (nothing is shared across requests then).
fn image_identity(image_key: &str, feature_revision: &str) -> Option<String> {
    (!image_key.is_empty()).then(|| format!("{}:{image_key}:{feature_revision}", image_key.len()))
}

/// The prompt of one question and how its answer is post-processed.
fn question_prompt(question: &ProtoQuestion, regions: usize) -> Result<(String, PostProcess), String> {
    let history: Vec<Turn> = question
        .history
        .iter()
        .map(|e| Turn { user: e.question.clone(), assistant: Some(e.answer.clone()) })
        .collect();
    match &question.prompt {
        Some(Prompt::Task(task)) => {
            let task = match RegionTask::try_from(*task).map_err(|_| format!("unknown task {task}"))? {
                RegionTask::Short => Task::Short,
                RegionTask::Detailed => Task::Detailed,
                RegionTask::Category => Task::Category,
            };
            if regions != 1 || !history.is_empty() {
                return Err(format!(
                    "a task is about exactly one region and no history; got {regions} regions"
                ));
            }
            Ok((task.prompt(), task.post_process()))
        }
        Some(Prompt::Text(text)) => {
            let mut turns = history;
            turns.push(Turn { user: text.clone(), assistant: None });
            let prompt = if regions == 0 {
                prompt::image_chat_prompt(&turns)
            } else {
                prompt::region_chat_prompt(regions, &turns)
            };
            Ok((prompt.map_err(|e| e.to_string())?, PostProcess::Plain))
        }
        Some(Prompt::Verbatim(user)) => {
            if !history.is_empty() {
                return Err("a verbatim prompt takes no history".into());
            }
            Ok((prompt::verbatim_prompt(regions, user).map_err(|e| e.to_string())?, PostProcess::Plain))
        }
        None => Err("set `task`, `text` or `verbatim`".into()),
    }
}

/// `[N, hidden]` region tokens (absent means no regions).
fn region_tokens(
    tensor: Option<&osprey_proto::worker::v1::Tensor>,
    field: &str,
    hidden: usize,
) -> Result<(Tensor, usize), ServiceError> {
    let (shape, values) = match tensor {
        Some(t) => f32_from_proto(t, field, 2)?,
        None => (vec![0, hidden], Vec::new()),
    };
    if shape[1] != hidden {
        return Err(ServiceError::invalid(field, format!("must be [N, {hidden}], got {shape:?}")));
    }
    let n = shape[0];
    Ok((Tensor::from_vec(values, (n, hidden), &Device::Cpu).map_err(internal)?, n))
}

fn internal(err: candle_core::Error) -> ServiceError {
    ServiceError::Internal(err.to_string())
}

fn random_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(Instant::now())
}

#[tonic::async_trait]
impl Llm for LlmService {
    type GenerateStream = ReceiverStream<Result<GenerateResponse, Status>>;

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key, questions = request.get_ref().questions.len()))]
    async fn generate(
        &self,
        request: Request<ProtoRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        match LlmService::generate(self, request.into_inner()).await {
            Ok(rx) => Ok(Response::new(ReceiverStream::new(rx))),
            Err(err) => Err(err.into_status()),
        }
    }
}

/// Loads the model, warms it up, serves until `shutdown`, then drains.
pub async fn run(
    args: ServeArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let tls = args.tls.config()?;
    let (routes, health) = standard_routes(&["osprey.worker.v1.Llm"]).await;
    let load_args = args.clone();
    let service = Arc::new(tokio::task::spawn_blocking(move || LlmService::load(&load_args)).await??);
    osprey_common::memory::return_free_memory();
    warm_up(&service).await?;
    let llm = LlmServer::from_arc(service)
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, tls = tls.is_some(), "serving");
    serve(listener, routes.add_service(llm), &health, tls, shutdown).await?;
    Ok(())
}

/// One short generation through the engine before reporting SERVING.
async fn warm_up(service: &LlmService) -> anyhow::Result<()> {
    let cfg = service.engine.model_config();
    let mm = cfg.mm_hidden_size.expect("the loaded model fills mm_hidden_size. This is a bug.");
    let request = ProtoRequest {
        image_key: String::new(),
        image_tokens: Some(osprey_common::tensor::f32_to_proto(&[1, mm], &vec![0.0; mm])),
        questions: vec![ProtoQuestion {
            index: 0,
            prompt: Some(Prompt::Task(RegionTask::Short as i32)),
            history: vec![],
            mask_tokens: Some(osprey_common::tensor::f32_to_proto(
                &[1, cfg.hidden_size],
                &vec![0.0; cfg.hidden_size],
            )),
            pos_tokens: Some(osprey_common::tensor::f32_to_proto(
                &[1, cfg.hidden_size],
                &vec![0.0; cfg.hidden_size],
            )),
        }],
        parameters: Some(GenerationParameters { max_new_tokens: Some(1), ..Default::default() }),
        feature_revision: String::new(),
    };
    let mut rx = service.generate(request).await.map_err(|e| anyhow::anyhow!("warm-up: {e}"))?;
    while let Some(response) = rx.recv().await {
        if response?.finished {
            return Ok(());
        }
    }
    anyhow::bail!("warm-up generation ended without finishing")
}

/// `llm-worker serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "llm-worker")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, shutdown_signal()).await
}
