//! The SAM worker as a gRPC service (`osprey.worker.v1.Sam`): a model thread fed over `mpsc` with
//! `oneshot` replies, a byte-bounded LRU of image embeddings keyed by image key (architecture.md §3:
//! a click or a box on a resident image costs only the prompt encoder and mask decoder), prompt
//! decoding and automatic mask generation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::error::{check_image_key, respond};
use osprey_common::grpc::Admission;
use osprey_common::grpc::{serve, shutdown_signal, standard_routes};
use osprey_common::image::RgbImage;
use osprey_common::lru::ResidentCache;
use osprey_common::mask::rle_to_proto;
use osprey_common::telemetry::{TelemetryArgs, set_parent_from_metadata};
use osprey_proto::v1::{self, LowResLogits, ProposedMask, SamPrompt, Timing};
use osprey_proto::worker::v1::sam_server::{Sam, SamServer};
use osprey_proto::worker::v1::{
    EmbedRequest, EmbedResponse, EverythingRequest, EverythingResponse, PredictRequest, PredictResponse,
    PromptMasks,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, instrument};

use crate::amg::{AmgParams, GeneratedMask, generate, mask_to_box};
use crate::dump::resolve_config;
use crate::error::SamError;
use crate::predictor::{ImageEmbedding, Prediction, SamPredictor, load_sam};
use crate::prompt::Prompt;

/// `sam-worker serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Checkpoint with the official key names (`sam_vit_b_01ec64.pth`, ..., `mobile_sam.pt`; `.pth` or safetensors).
    /// Or a Hugging Face repo id and file, `owner/name[@revision]:path/in/repo.pth`, fetched into `HF_HOME`.
    #[arg(long, env = "SAM_WEIGHTS")]
    pub weights: PathBuf,
    /// JSON model config (fields of `SamConfig`); by default read off the checkpoint's tensor shapes
    /// (ViT-B/L/H, MobileSAM's TinyViT or a reduced model).
    #[arg(long, env = "SAM_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env, default_value = "0.0.0.0:50054")]
    pub listen: SocketAddr,
    /// Compute device: `cpu`, or `cuda:N` in a build with `--features cuda`.
    #[arg(long, env, default_value = "cpu")]
    pub device: String,
    /// Most queued Predict requests the model thread takes in one wake-up (they share the device
    /// without returning to the queue in between).
    #[arg(long, env, default_value_t = 8)]
    pub max_batch_size: usize,
    /// Bytes of image embeddings kept resident, least recently used evicted first (a ViT embedding
    /// is 256 x 64 x 64 f32 = 4 MiB).
    #[arg(long, env, default_value_t = 2 << 30)]
    pub max_resident_bytes: usize,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env, default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Most prompts in one Predict call.
    #[arg(long, env, default_value_t = 256)]
    pub max_prompts: usize,
    /// Most points in one prompt.
    #[arg(long, env, default_value_t = 64)]
    pub max_points_per_prompt: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env, default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env, default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// What the model thread is asked to do.
enum Command {
    Embed(EmbedJob),
    Predict(PredictJob),
    Everything(EverythingJob),
}

struct EmbedJob {
    image: RgbImage,
    span: Span,
    reply: oneshot::Sender<Result<Arc<ImageEmbedding>, SamError>>,
}

struct PredictJob {
    embedding: Arc<ImageEmbedding>,
    prompts: Vec<Prompt>,
    span: Span,
    reply: oneshot::Sender<Result<Vec<Prediction>, SamError>>,
}

/// The masks, and the whole-image embedding when one was computed or used (to keep resident).
type EverythingOutput = (Vec<GeneratedMask>, Option<Arc<ImageEmbedding>>);

struct EverythingJob {
    image: Option<RgbImage>,
    embedding: Option<Arc<ImageEmbedding>>,
    params: AmgParams,
    span: Span,
    reply: oneshot::Sender<Result<EverythingOutput, SamError>>,
}

/// Runs commands until every sender is gone. Predict requests waiting together are served in one
/// wake-up; requests whose client has gone are dropped before compute.
fn model_thread(predictor: SamPredictor, mut commands: mpsc::Receiver<Command>, max_batch_size: usize) {
    let mut deferred: Option<Command> = None;
    loop {
        let Some(command) = deferred.take().or_else(|| commands.blocking_recv()) else { return };
        match command {
            Command::Embed(job) => {
                if job.reply.is_closed() {
                    continue;
                }
                let _enter = job.span.enter();
                metrics::counter!("osprey_sam_encoder_runs_total").increment(1);
                let _ = job.reply.send(predictor.embed(&job.image).map(Arc::new));
            }
            Command::Everything(job) => {
                if job.reply.is_closed() {
                    continue;
                }
                let _enter = job.span.enter();
                let result = (|| {
                    // The whole-image embedding is computed once here so the service can keep it.
                    let embedding = match (job.embedding, &job.image) {
                        (Some(e), _) => Some(e),
                        (None, Some(image)) => {
                            metrics::counter!("osprey_sam_encoder_runs_total").increment(1);
                            Some(Arc::new(predictor.embed(image)?))
                        }
                        (None, None) => None,
                    };
                    let masks = generate(&predictor, job.image.as_ref(), embedding.as_deref(), &job.params)?;
                    Ok((masks, embedding))
                })();
                let _ = job.reply.send(result);
            }
            Command::Predict(first) => {
                let mut batch = vec![first];
                while batch.len() < max_batch_size {
                    match commands.try_recv() {
                        Ok(Command::Predict(job)) => batch.push(job),
                        Ok(other) => {
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                batch.retain(|job| !job.reply.is_closed());
                metrics::histogram!("osprey_sam_predict_batch_size").record(batch.len() as f64);
                for job in batch {
                    let _enter = job.span.enter();
                    let result = predictor.predict_batch(&job.embedding, &job.prompts);
                    let _ = job.reply.send(result);
                }
            }
        }
    }
}

impl From<SamError> for ServiceError {
    fn from(err: SamError) -> Self {
        match err {
            SamError::InvalidPrompt { .. } | SamError::InvalidParams { .. } | SamError::Image(_) => {
                ServiceError::InvalidArgument(err.to_string())
            }
            SamError::NoImage => ServiceError::FailedPrecondition(err.to_string()),
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

/// The gRPC handlers: admission, the resident LRU, and hand-off to the model thread.
pub struct SamService {
    commands: mpsc::Sender<Command>,
    resident: ResidentCache<Arc<ImageEmbedding>>,
    admission: Admission,
    low_res_size: usize,
    max_prompts: usize,
    max_points_per_prompt: usize,
    max_pixels: u64,
}

impl SamService {
    /// Starts the model thread and returns the service in front of it.
    pub fn start(predictor: SamPredictor, args: &ServeArgs) -> Self {
        let (commands, receiver) = mpsc::channel(args.max_concurrent_requests.max(1));
        let low_res_size = predictor.config().low_res_size();
        let max_batch_size = args.max_batch_size.max(1);
        std::thread::Builder::new()
            .name("sam-model".into())
            .spawn(move || model_thread(predictor, receiver, max_batch_size))
            .expect("spawning the model thread");
        Self {
            commands,
            resident: ResidentCache::new(
                args.max_resident_bytes,
                "osprey_sam_resident_lookups_total",
                "osprey_sam_resident_bytes",
            ),
            admission: Admission::new("sam worker", args.max_concurrent_requests),
            low_res_size,
            max_prompts: args.max_prompts,
            max_points_per_prompt: args.max_points_per_prompt,
            max_pixels: args.max_pixels,
        }
    }

    async fn ask<T>(
        &self,
        command: Command,
        reply: oneshot::Receiver<Result<T, SamError>>,
    ) -> Result<T, ServiceError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| ServiceError::Unavailable("model thread stopped".into()))?;
        reply
            .await
            .map_err(|_| ServiceError::Internal("model thread dropped the request".into()))?
            .map_err(Into::into)
    }

    fn check_image(&self, image: osprey_proto::worker::v1::RgbImage) -> Result<RgbImage, ServiceError> {
        if image.width as u64 * image.height as u64 > self.max_pixels {
            return Err(ServiceError::invalid(
                "image",
                format!("over the limit of {} pixels", self.max_pixels),
            ));
        }
        RgbImage::from_raw(image.width, image.height, image.rgb)
            .map_err(|e| ServiceError::invalid("image", e))
    }

    /// The resident embedding of `key`, or the embedding of `image` (then kept): `(embedding, was_resident)`.
    async fn embedding(
        &self,
        key: &str,
        image: Option<osprey_proto::worker::v1::RgbImage>,
    ) -> Result<(Arc<ImageEmbedding>, bool), ServiceError> {
        if let Some(embedding) = self.resident.get(key) {
            return Ok((embedding, true));
        }
        let Some(image) = image else {
            return Err(ServiceError::FailedPrecondition(format!(
                "the embedding of image {key} is not resident on this worker; send `image` or call Embed"
            )));
        };
        let image = self.check_image(image)?;
        let start = Instant::now();
        let (reply, receiver) = oneshot::channel();
        let embedding =
            self.ask(Command::Embed(EmbedJob { image, span: Span::current(), reply }), receiver).await?;
        metrics::histogram!("osprey_sam_embed_duration").record(start.elapsed().as_secs_f64());
        self.resident.insert(key, embedding.clone(), embedding.bytes());
        Ok((embedding, false))
    }

    async fn handle_embed(&self, request: EmbedRequest) -> Result<EmbedResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        let image = Some(request.image.ok_or_else(|| ServiceError::invalid("image", "required"))?);
        let (_, was_resident) = self.embedding(&request.image_key, image).await?;
        let ns = elapsed_ns(start);
        Ok(EmbedResponse {
            was_resident,
            timing: Some(Timing { sam_ns: ns, total_ns: ns, ..Timing::default() }),
        })
    }

    async fn handle_predict(&self, request: PredictRequest) -> Result<PredictResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        if request.prompts.len() > self.max_prompts {
            return Err(ServiceError::invalid(
                "prompts",
                format!("{} prompts, over the limit of {}", request.prompts.len(), self.max_prompts),
            ));
        }
        let prompts = request
            .prompts
            .iter()
            .enumerate()
            .map(|(i, p)| prompt_from_proto(i, p, self.low_res_size, self.max_points_per_prompt))
            .collect::<Result<Vec<_>, _>>()?;
        let (embedding, was_resident) = self.embedding(&request.image_key, request.image).await?;
        let decode_start = Instant::now();
        let (reply, receiver) = oneshot::channel();
        let job = PredictJob { embedding, prompts, span: Span::current(), reply };
        let predictions = self.ask(Command::Predict(job), receiver).await?;
        metrics::histogram!("osprey_sam_predict_duration").record(decode_start.elapsed().as_secs_f64());
        let prompts = predictions.iter().map(prompt_masks).collect::<Result<Vec<_>, _>>()?;
        let ns = elapsed_ns(start);
        Ok(PredictResponse {
            prompts,
            was_resident,
            timing: Some(Timing { sam_ns: ns, total_ns: ns, ..Timing::default() }),
        })
    }

    async fn handle_everything(
        &self,
        request: EverythingRequest,
    ) -> Result<EverythingResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        let params = params_from_proto(request.params.unwrap_or_default());
        params.validate()?;
        let embedding = self.resident.get(&request.image_key);
        let was_resident = embedding.is_some();
        let image = request.image.map(|i| self.check_image(i)).transpose()?;
        if image.is_none() && (embedding.is_none() || params.crop_n_layers > 0) {
            return Err(ServiceError::FailedPrecondition(format!(
                "image {} is not resident on this worker (or crop layers need its pixels); send `image`",
                request.image_key
            )));
        }
        let (reply, receiver) = oneshot::channel();
        let job = EverythingJob { image, embedding, params, span: Span::current(), reply };
        let (masks, whole) = self.ask(Command::Everything(job), receiver).await?;
        if let (false, Some(whole)) = (was_resident, whole) {
            let bytes = whole.bytes();
            self.resident.insert(&request.image_key, whole, bytes);
        }
        metrics::histogram!("osprey_sam_everything_duration").record(start.elapsed().as_secs_f64());
        let ns = elapsed_ns(start);
        Ok(EverythingResponse {
            masks: masks.iter().map(generated_to_proto).collect(),
            was_resident,
            timing: Some(Timing { sam_ns: ns, total_ns: ns, ..Timing::default() }),
        })
    }
}

/// A proto prompt as a [`Prompt`], each problem named by its field (`prompts[1].points[0].label`).
pub fn prompt_from_proto(
    index: usize,
    prompt: &SamPrompt,
    low_res_size: usize,
    max_points: usize,
) -> Result<Prompt, ServiceError> {
    let field = |rest: String| format!("prompts[{index}]{rest}");
    if prompt.points.len() > max_points {
        return Err(ServiceError::invalid(
            field(".points".into()),
            format!("{} points, over the limit of {max_points}", prompt.points.len()),
        ));
    }
    let mut coords = Vec::with_capacity(prompt.points.len());
    let mut labels = Vec::with_capacity(prompt.points.len());
    for (j, point) in prompt.points.iter().enumerate() {
        if !(point.x.is_finite() && point.y.is_finite()) {
            return Err(ServiceError::invalid(
                field(format!(".points[{j}]")),
                format!("coordinates ({}, {}) are not finite", point.x, point.y),
            ));
        }
        let label = match v1::PointLabel::try_from(point.label) {
            Ok(v1::PointLabel::Foreground) => 1.0,
            Ok(v1::PointLabel::Background) => 0.0,
            Err(_) => {
                return Err(ServiceError::invalid(
                    field(format!(".points[{j}].label")),
                    format!("{} is not a PointLabel (FOREGROUND or BACKGROUND)", point.label),
                ));
            }
        };
        coords.push(vec![point.x as f64, point.y as f64]);
        labels.push(label);
    }
    let bbox = match &prompt.r#box {
        None => None,
        Some(b) => {
            let v = [b.x0, b.y0, b.x1, b.y1];
            if !v.iter().all(|c| c.is_finite()) {
                return Err(ServiceError::invalid(field(".box".into()), format!("{v:?} is not finite")));
            }
            if b.x1 < b.x0 || b.y1 < b.y0 {
                return Err(ServiceError::invalid(
                    field(".box".into()),
                    format!(
                        "corner (x1, y1) = ({}, {}) is not below-right of (x0, y0) = ({}, {})",
                        b.x1, b.y1, b.x0, b.y0
                    ),
                ));
            }
            Some(v.iter().map(|&c| c as f64).collect())
        }
    };
    let mask_input = match &prompt.mask_input {
        None => None,
        Some(m) => {
            let n = low_res_size * low_res_size;
            if m.height as usize != low_res_size || m.width as usize != low_res_size || m.values.len() != n {
                return Err(ServiceError::invalid(
                    field(".mask_input".into()),
                    format!(
                        "is {}x{} with {} values; this model's low-res logits are {low_res_size}x{low_res_size}",
                        m.height,
                        m.width,
                        m.values.len()
                    ),
                ));
            }
            if !m.values.iter().all(|v| v.is_finite()) {
                return Err(ServiceError::invalid(field(".mask_input".into()), "has non-finite values"));
            }
            Some(m.values.clone())
        }
    };
    let has_points = !coords.is_empty();
    let prompt = Prompt {
        name: format!("prompts[{index}]"),
        point_coords: has_points.then_some(coords),
        point_labels: has_points.then_some(labels),
        bbox,
        multimask_output: prompt.multimask_output,
        mask_input,
    };
    prompt.validate(low_res_size)?;
    Ok(prompt)
}

/// Unset fields take the reference defaults.
pub fn params_from_proto(p: v1::EverythingParams) -> AmgParams {
    let d = AmgParams::default();
    AmgParams {
        points_per_side: p.points_per_side.map_or(d.points_per_side, |v| v as usize),
        points_per_batch: p.points_per_batch.map_or(d.points_per_batch, |v| v as usize),
        pred_iou_thresh: p.pred_iou_thresh.map_or(d.pred_iou_thresh, f64::from),
        stability_score_thresh: p.stability_score_thresh.map_or(d.stability_score_thresh, f64::from),
        stability_score_offset: p.stability_score_offset.map_or(d.stability_score_offset, f64::from),
        box_nms_thresh: p.box_nms_thresh.map_or(d.box_nms_thresh, f64::from),
        crop_n_layers: p.crop_n_layers.map_or(d.crop_n_layers, |v| v as usize),
        crop_nms_thresh: p.crop_nms_thresh.map_or(d.crop_nms_thresh, f64::from),
        crop_overlap_ratio: p.crop_overlap_ratio.map_or(d.crop_overlap_ratio, f64::from),
        crop_n_points_downscale_factor: p
            .crop_n_points_downscale_factor
            .map_or(d.crop_n_points_downscale_factor, |v| v as usize),
        min_mask_region_area: p.min_mask_region_area.map_or(d.min_mask_region_area, |v| v as usize),
        max_masks: p.max_masks.map(|v| v as usize),
    }
}

fn prompt_masks(p: &Prediction) -> Result<PromptMasks, ServiceError> {
    let masks = (0..p.num_masks)
        .map(|k| {
            let mask = p
                .mask(k)
                .ok_or_else(|| ServiceError::Internal("mask out of range. This is a bug.".into()))?;
            let flags: Vec<bool> = mask.data().iter().map(|&v| v != 0).collect();
            let b = mask_to_box(&flags, p.height, p.width);
            let rle = mask.to_rle();
            Ok(ProposedMask {
                mask: Some(rle_to_proto(&rle)),
                area: rle.area(),
                bbox: xyxy_to_xywh(b),
                predicted_iou: p.iou_predictions[k],
                stability_score: 0.0,
                point: None,
                crop_box: Vec::new(),
                low_res_logits: p.low_res(k).map(|values| LowResLogits {
                    height: p.low_res_size as u32,
                    width: p.low_res_size as u32,
                    values: values.to_vec(),
                }),
            })
        })
        .collect::<Result<Vec<_>, ServiceError>>()?;
    Ok(PromptMasks { masks })
}

fn xyxy_to_xywh(b: [i64; 4]) -> Vec<f32> {
    vec![b[0] as f32, b[1] as f32, (b[2] - b[0]) as f32, (b[3] - b[1]) as f32]
}

fn generated_to_proto(m: &GeneratedMask) -> ProposedMask {
    ProposedMask {
        mask: Some(rle_to_proto(&m.rle)),
        area: m.area,
        bbox: m.bbox.iter().map(|&v| v as f32).collect(),
        predicted_iou: m.predicted_iou,
        stability_score: m.stability_score,
        point: Some(v1::Point {
            x: m.point[0] as f32,
            y: m.point[1] as f32,
            label: v1::PointLabel::Foreground as i32,
        }),
        crop_box: m.crop_box.iter().map(|&v| v as f32).collect(),
        low_res_logits: None,
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

#[tonic::async_trait]
impl Sam for SamService {
    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.admission.admit()?;
        respond(self.handle_embed(request.into_inner()).await)
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key, prompts = request.get_ref().prompts.len()))]
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.admission.admit()?;
        respond(self.handle_predict(request.into_inner()).await)
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn everything(
        &self,
        request: Request<EverythingRequest>,
    ) -> Result<Response<EverythingResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.admission.admit()?;
        respond(self.handle_everything(request.into_inner()).await)
    }
}

/// Registers the `osprey_sam_*` metrics with their units.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!("osprey_sam_embed_duration", Unit::Seconds, "Image encoder pass, queue included");
    describe_histogram!("osprey_sam_predict_duration", Unit::Seconds, "Prompt decoding of one Predict call");
    describe_histogram!("osprey_sam_everything_duration", Unit::Seconds, "One Everything call");
    describe_histogram!(
        "osprey_sam_predict_batch_size",
        Unit::Count,
        "Predict calls served per model wake-up"
    );
    describe_counter!("osprey_sam_encoder_runs_total", Unit::Count, "Image encoder passes");
    describe_counter!(
        "osprey_sam_resident_lookups_total",
        Unit::Count,
        "Lookups of the resident embedding LRU, by hit"
    );
    describe_gauge!("osprey_sam_resident_bytes", Unit::Bytes, "Bytes of resident embeddings");
}

/// Loads the model, warms it up, serves until SIGTERM/ctrl-c (or `shutdown`), then drains.
pub async fn run(
    args: ServeArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    describe_metrics();
    let (routes, health) = standard_routes(&["osprey.worker.v1.Sam"]).await;
    let device = osprey_checkpoint::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let (weights, config) = (args.weights.clone(), args.config.clone());
    let predictor = tokio::task::spawn_blocking(move || -> Result<SamPredictor, SamError> {
        let cfg = resolve_config(config.as_deref(), &weights)?;
        Ok(SamPredictor::new(load_sam(&weights, &cfg, &device)?, device))
    })
    .await??;
    tracing::info!("sam model loaded");
    let service = Arc::new(SamService::start(predictor, &args));
    warm_up(&service).await?;
    let sam = SamServer::from_arc(service)
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let routes = routes.add_service(sam);
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, "serving");
    serve(listener, routes, &health, shutdown).await?;
    Ok(())
}

/// One embed and one prompt decode through the model thread before reporting SERVING.
async fn warm_up(service: &SamService) -> anyhow::Result<()> {
    let (w, h) = (32u32, 24u32);
    let image = RgbImage::from_raw(w, h, vec![127; (w * h * 3) as usize])?;
    let (reply, receiver) = oneshot::channel();
    let embedding = service
        .ask(Command::Embed(EmbedJob { image, span: Span::current(), reply }), receiver)
        .instrument(tracing::info_span!("warm_up"))
        .await?;
    let mut prompt = Prompt::named("warm_up");
    prompt.point_coords = Some(vec![vec![16.0, 12.0]]);
    prompt.point_labels = Some(vec![1.0]);
    let (reply, receiver) = oneshot::channel();
    let job = PredictJob { embedding, prompts: vec![prompt], span: Span::current(), reply };
    service.ask(Command::Predict(job), receiver).await?;
    Ok(())
}

/// `sam-worker serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "sam-worker")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, shutdown_signal()).await
}
