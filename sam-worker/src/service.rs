//! The SAM worker's gRPC edge (`osprey.worker.v1.Sam`): flags, request checks, a byte-bounded LRU
//! of image embeddings keyed by image key (a click or a box on a resident image costs only the
//! prompt encoder and mask decoder; docs/ARCHITECTURE.md, "Cache tiers and keys"), and hand-off to
//! the model thread ([`crate::engine`]) on the shared worker skeleton.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::error::check_image_key;
use osprey_common::grpc::Admission;
use osprey_common::image::RgbImage;
use osprey_common::lru::ResidentCache;
use osprey_common::mask::rle_to_worker;
use osprey_common::telemetry::{TelemetryArgs, set_parent_from_metadata};
use osprey_common::worker::{self, ModelQueue, elapsed_ns, handle, image_from_proto, request_deadline};
use osprey_proto::worker::v1::sam_server::{Sam, SamServer};
use osprey_proto::worker::v1::{
    EmbedRequest, EmbedResponse, EverythingParams, EverythingRequest, EverythingResponse, LowResLogits,
    Point, PointLabel, PredictRequest, PredictResponse, PromptMasks, ProposedMask, SamPrompt, Timing,
};
use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use crate::amg::{AmgParams, GeneratedMask, mask_to_box};
use crate::dump::resolve_config;
use crate::engine::{EmbedJob, EverythingJob, EverythingOutput, PredictJob, SamEngine, SamJob};
use crate::error::SamError;
use crate::predictor::{ImageEmbedding, Prediction, SamPredictor, load_sam};
use crate::prompt::Prompt;

/// `sam-worker serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Checkpoint with the official key names (`sam_vit_b_01ec64.pth`, ..., `mobile_sam.pt`; `.pth` or safetensors).
    /// Or a Hugging Face repo id and file, `owner/name[@revision]:path/in/repo.pth`, fetched into `HF_HOME`.
    #[arg(long, env = "OSPREY_WEIGHTS")]
    pub weights: PathBuf,
    /// JSON model config (fields of `SamConfig`); by default read off the checkpoint's tensor shapes
    /// (ViT-B/L/H, MobileSAM's TinyViT or a reduced model).
    #[arg(long, env = "OSPREY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve gRPC on.
    #[arg(long, env = "OSPREY_LISTEN", default_value = "0.0.0.0:50054")]
    pub listen: SocketAddr,
    /// Compute device: `cpu`, or `cuda:N` in a build with `--features cuda`.
    #[arg(long, env = "OSPREY_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Most queued Predict requests the model thread takes at once: the prompts of those on the
    /// same image go through the mask decoder together, in one batched call.
    #[arg(long, env = "OSPREY_MAX_BATCH_SIZE", default_value_t = 8)]
    pub max_batch_size: usize,
    /// Bytes of image embeddings kept resident, least recently used evicted first (a ViT embedding
    /// is 256 x 64 x 64 f32 = 4 MiB).
    #[arg(long, env = "OSPREY_MAX_RESIDENT_BYTES", default_value_t = 2 << 30)]
    pub max_resident_bytes: usize,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OSPREY_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Most prompts in one Predict call.
    #[arg(long, env = "OSPREY_MAX_PROMPTS", default_value_t = 256)]
    pub max_prompts: usize,
    /// Most points in one prompt.
    #[arg(long, env = "OSPREY_MAX_POINTS_PER_PROMPT", default_value_t = 64)]
    pub max_points_per_prompt: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env = "OSPREY_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_MESSAGE_BYTES", default_value_t = 256 << 20)]
    pub max_message_bytes: usize,
    /// TLS, and mutual TLS with `--tls-client-ca` (docs/RELIABILITY.md, Security).
    #[command(flatten)]
    pub tls: osprey_common::grpc::ServerTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The gRPC handlers: admission, the resident LRU, and hand-off to the model thread.
pub struct SamService {
    model: ModelQueue<SamJob>,
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
        let low_res_size = predictor.config().low_res_size();
        Self {
            model: ModelQueue::start(
                "sam",
                "sam-model",
                SamEngine::new(predictor),
                args.max_concurrent_requests,
                args.max_batch_size,
            ),
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

    /// The resident embedding of `key`, or the embedding of `image` (then kept): `(embedding, was_resident)`.
    async fn embedding(
        &self,
        key: &str,
        image: Option<osprey_proto::worker::v1::RgbImage>,
        deadline: Option<Instant>,
    ) -> Result<(Arc<ImageEmbedding>, bool), ServiceError> {
        if let Some(embedding) = self.resident.get(key) {
            return Ok((embedding, true));
        }
        let Some(image) = image else {
            return Err(ServiceError::FailedPrecondition(format!(
                "the embedding of image {key} is not resident on this worker; send `image` or call Embed"
            )));
        };
        let image = image_from_proto(image, self.max_pixels)?;
        let start = Instant::now();
        let embedding = self.embed(image, deadline).await?;
        metrics::histogram!("osprey_sam_embed_duration_seconds").record(start.elapsed().as_secs_f64());
        self.resident.insert(key, embedding.clone(), embedding.bytes());
        Ok((embedding, false))
    }

    async fn embed(
        &self,
        image: RgbImage,
        deadline: Option<Instant>,
    ) -> Result<Arc<ImageEmbedding>, ServiceError> {
        self.model.ask(|reply| SamJob::Embed(EmbedJob { image, reply }), deadline).await
    }

    async fn predict(
        &self,
        embedding: Arc<ImageEmbedding>,
        prompts: Vec<Prompt>,
        deadline: Option<Instant>,
    ) -> Result<Vec<Prediction>, ServiceError> {
        self.model.ask(|reply| SamJob::Predict(PredictJob { embedding, prompts, reply }), deadline).await
    }

    async fn handle_embed(
        &self,
        request: EmbedRequest,
        deadline: Option<Instant>,
    ) -> Result<EmbedResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        let image = Some(request.image.ok_or_else(|| ServiceError::invalid("image", "required"))?);
        let (_, was_resident) = self.embedding(&request.image_key, image, deadline).await?;
        let ns = elapsed_ns(start);
        Ok(EmbedResponse {
            was_resident,
            timing: Some(Timing { sam_ns: ns, total_ns: ns, ..Timing::default() }),
        })
    }

    async fn handle_predict(
        &self,
        request: PredictRequest,
        deadline: Option<Instant>,
    ) -> Result<PredictResponse, ServiceError> {
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
        let (embedding, was_resident) = self.embedding(&request.image_key, request.image, deadline).await?;
        let decode_start = Instant::now();
        let predictions = self.predict(embedding, prompts, deadline).await?;
        metrics::histogram!("osprey_sam_predict_duration_seconds")
            .record(decode_start.elapsed().as_secs_f64());
        let logits = request.return_low_res_logits;
        let prompts = predictions.iter().map(|p| prompt_masks(p, logits)).collect::<Result<Vec<_>, _>>()?;
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
        deadline: Option<Instant>,
    ) -> Result<EverythingResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        let params = params_from_proto(request.params.unwrap_or_default());
        params.validate()?;
        let embedding = self.resident.get(&request.image_key);
        let was_resident = embedding.is_some();
        let image = request.image.map(|i| image_from_proto(i, self.max_pixels)).transpose()?;
        if image.is_none() && (embedding.is_none() || params.crop_n_layers > 0) {
            return Err(ServiceError::FailedPrecondition(format!(
                "image {} is not resident on this worker (or crop layers need its pixels); send `image`",
                request.image_key
            )));
        }
        let job = |reply| SamJob::Everything(EverythingJob { image, embedding, params, reply });
        let (masks, whole): EverythingOutput = self.model.ask(job, deadline).await?;
        if let (false, Some(whole)) = (was_resident, whole) {
            let bytes = whole.bytes();
            self.resident.insert(&request.image_key, whole, bytes);
        }
        metrics::histogram!("osprey_sam_everything_duration_seconds").record(start.elapsed().as_secs_f64());
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
        let label = match PointLabel::try_from(point.label) {
            Ok(PointLabel::Foreground) => 1.0,
            Ok(PointLabel::Background) => 0.0,
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
    let box_xyxy = match &prompt.r#box {
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
        box_xyxy,
        multimask_output: prompt.multimask_output,
        mask_input,
    };
    prompt.validate(low_res_size)?;
    Ok(prompt)
}

/// Unset fields take the reference defaults.
pub fn params_from_proto(p: EverythingParams) -> AmgParams {
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

/// A prediction's masks as sent back; their low-resolution logits only when `with_logits`.
fn prompt_masks(p: &Prediction, with_logits: bool) -> Result<PromptMasks, ServiceError> {
    let masks = (0..p.num_masks)
        .map(|k| {
            let mask = p
                .mask(k)
                .ok_or_else(|| ServiceError::Internal("mask out of range. This is a bug.".into()))?;
            let flags: Vec<bool> = mask.data().iter().map(|&v| v != 0).collect();
            let b = mask_to_box(&flags, p.height, p.width);
            let rle = mask.to_rle();
            Ok(ProposedMask {
                mask: Some(rle_to_worker(&rle)),
                area: rle.area(),
                bbox_xywh: xyxy_to_xywh(b),
                predicted_iou: p.iou_predictions[k],
                stability_score: 0.0,
                point: None,
                crop_box_xywh: Vec::new(),
                low_res_logits: p.low_res(k).filter(|_| with_logits).map(|values| LowResLogits {
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
        mask: Some(rle_to_worker(&m.rle)),
        area: m.area,
        bbox_xywh: m.bbox_xywh.iter().map(|&v| v as f32).collect(),
        predicted_iou: m.predicted_iou,
        stability_score: m.stability_score,
        point: Some(Point {
            x: m.point[0] as f32,
            y: m.point[1] as f32,
            label: PointLabel::Foreground as i32,
        }),
        crop_box_xywh: m.crop_box_xywh.iter().map(|&v| v as f32).collect(),
        low_res_logits: None,
    }
}

#[tonic::async_trait]
impl Sam for SamService {
    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn embed(&self, request: Request<EmbedRequest>) -> Result<Response<EmbedResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let deadline = request_deadline(request.metadata());
        handle(&self.admission, self.handle_embed(request.into_inner(), deadline)).await
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key, prompts = request.get_ref().prompts.len()))]
    async fn predict(&self, request: Request<PredictRequest>) -> Result<Response<PredictResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let deadline = request_deadline(request.metadata());
        handle(&self.admission, self.handle_predict(request.into_inner(), deadline)).await
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn everything(
        &self,
        request: Request<EverythingRequest>,
    ) -> Result<Response<EverythingResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let deadline = request_deadline(request.metadata());
        handle(&self.admission, self.handle_everything(request.into_inner(), deadline)).await
    }
}

/// Registers the `osprey_sam_*` metrics with their units.
pub fn describe_metrics() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_histogram!(
        "osprey_sam_embed_duration_seconds",
        Unit::Seconds,
        "Image encoder pass, queue included"
    );
    describe_histogram!(
        "osprey_sam_predict_duration_seconds",
        Unit::Seconds,
        "Prompt decoding of one Predict call"
    );
    describe_histogram!("osprey_sam_everything_duration_seconds", Unit::Seconds, "One Everything call");
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

/// Loads the model, warms it up, serves until `shutdown` completes, then drains.
pub async fn run(
    args: ServeArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    describe_metrics();
    let device = osprey_checkpoint::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let (weights, config) = (args.weights.clone(), args.config.clone());
    let predictor = tokio::task::spawn_blocking(move || -> Result<SamPredictor, SamError> {
        let cfg = resolve_config(config.as_deref(), &weights)?;
        Ok(SamPredictor::new(load_sam(&weights, &cfg, &device)?, device))
    })
    .await??;
    osprey_common::memory::return_free_memory();
    tracing::info!("sam model loaded");
    let service = Arc::new(SamService::start(predictor, &args));
    let sam = SamServer::from_arc(service.clone())
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    worker::serve_worker("osprey.worker.v1.Sam", listener, &args.tls, shutdown, warm_up(&service), |routes| {
        routes.add_service(sam)
    })
    .await
}

/// One embed and one prompt decode through the model thread before the worker reports SERVING.
async fn warm_up(service: &SamService) -> anyhow::Result<()> {
    let (w, h) = (32u32, 24u32);
    let image = RgbImage::from_raw(w, h, vec![127; (w * h * 3) as usize])?;
    let embedding = service.embed(image, None).await?;
    let mut prompt = Prompt::named("warm_up");
    prompt.point_coords = Some(vec![vec![16.0, 12.0]]);
    prompt.point_labels = Some(vec![1.0]);
    service.predict(embedding, vec![prompt], None).await?;
    Ok(())
}

/// `sam-worker serve`: telemetry, then [`run`] until SIGTERM or ctrl-c.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let telemetry = args.telemetry.clone();
    worker::main("sam-worker", &telemetry, args.listen, |listener, shutdown| {
        tracing::info!(?args, "starting");
        run(args, listener, shutdown)
    })
    .await
}
