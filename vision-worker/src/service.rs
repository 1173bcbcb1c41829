//! The vision worker as a gRPC service (`osprey.worker.v1.Vision`): a model thread that batches
//! concurrent encodes into one forward pass, a resident LRU of image features keyed by image key,
//! and pooling from resident features or from a feature blob sent along (architecture.md §3).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use osprey_common::ServiceError;
use osprey_common::error::{check_image_key, respond};
use osprey_common::grpc::Admission;
use osprey_common::grpc::{serve, shutdown_signal, standard_routes};
use osprey_common::image::RgbImage;
use osprey_common::lru::ResidentCache;
use osprey_common::mask::{Mask, rle_from_proto};
use osprey_common::telemetry::{TelemetryArgs, set_parent_from_metadata};
use osprey_common::tensor::f32_to_proto;
use osprey_proto::v1::Timing;
use osprey_proto::worker::v1::vision_server::{Vision, VisionServer};
use osprey_proto::worker::v1::{EncodeRequest, EncodeResponse, FeatureBlob, PoolRequest, PoolResponse};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};
use tracing::{Instrument, Span, instrument};

use crate::error::VisionError;
use crate::models::VisionModel;
use crate::models::clip_convnext::Features;
use crate::preprocess::preprocess;

/// `vision-worker serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Osprey checkpoint directory (config.json + safetensors or PyTorch .bin weights; the
    /// Open-CLIP file named by `mm_vision_tower` when the checkpoint lacks the vision trunk), or a
    /// Hugging Face repo id (`sunshine-lwt/Osprey-7b[@revision]`) fetched into `HF_HOME`.
    #[arg(long, env = "OSPREY_WEIGHTS")]
    pub weights: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, env, default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// Compute device: `cpu`, or `cuda:N` in a build with `--features cuda`.
    #[arg(long, env, default_value = "cpu")]
    pub device: String,
    /// Most images encoded in one forward pass (concurrent encodes are batched).
    #[arg(long, env, default_value_t = 4)]
    pub max_batch_size: usize,
    /// Bytes of image features kept resident, least recently used evicted first.
    #[arg(long, env, default_value_t = 4 << 30)]
    pub max_resident_bytes: usize,
    /// Element type features are kept and shipped in: `f16` (as the reference runs the tower,
    /// half the memory) or `f32`.
    #[arg(long, env, value_enum, default_value = "f16")]
    pub feature_dtype: FeatureDtype,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env, default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Most masks in one Pool call.
    #[arg(long, env, default_value_t = 1024)]
    pub max_masks: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env, default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env, default_value_t = 512 << 20)]
    pub max_message_bytes: usize,
    /// Model revision reported with feature blobs and mixed into cache keys; defaults to a hash
    /// of the checkpoint's config and weight file names and sizes.
    #[arg(long, env)]
    pub model_revision: Option<String>,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureDtype {
    F16,
    F32,
}

impl FeatureDtype {
    fn dtype(self) -> DType {
        match self {
            Self::F16 => DType::F16,
            Self::F32 => DType::F32,
        }
    }
}

/// Features of one image, as kept resident and shipped: res2..res5 `[1, C, h, w]` in the feature
/// dtype, and the original image size (masks must match it).
#[derive(Debug)]
pub struct ImageFeatures {
    pub levels: [Tensor; 4],
    pub height: u32,
    pub width: u32,
}

impl ImageFeatures {
    fn bytes(&self) -> usize {
        self.levels.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// The compact blob: safetensors bytes with `res2`..`res5` and `image_hw` (u32 [2]).
    pub fn to_blob(&self, model_revision: &str) -> Result<FeatureBlob, VisionError> {
        let image_hw = Tensor::new(&[self.height, self.width], &Device::Cpu)?;
        let levels: Vec<Tensor> =
            self.levels.iter().map(|t| t.to_device(&Device::Cpu)).collect::<Result<_, _>>()?;
        let mut named: Vec<(&str, &Tensor)> = Features::NAMES.iter().copied().zip(levels.iter()).collect();
        named.push(("image_hw", &image_hw));
        let bytes = safetensors::serialize(named, None)
            .map_err(|e| VisionError::InvalidInput(format!("serialising features: {e}")))?;
        Ok(FeatureBlob { safetensors: bytes, model_revision: model_revision.to_string() })
    }

    /// Reads a blob, checking every level's shape against the model's.
    pub fn from_blob(
        blob: &FeatureBlob,
        expected_shapes: &[[usize; 4]; 4],
        dtype: DType,
        device: &Device,
    ) -> Result<Self, String> {
        let tensors = candle_core::safetensors::load_buffer(&blob.safetensors, device)
            .map_err(|e| format!("not a safetensors blob: {e}"))?;
        let level = |i: usize| -> Result<Tensor, String> {
            let name = Features::NAMES[i];
            let t = tensors.get(name).ok_or_else(|| format!("missing tensor {name}"))?;
            if t.dims() != expected_shapes[i] {
                return Err(format!(
                    "{name} has shape {:?}, the model's is {:?}",
                    t.dims(),
                    expected_shapes[i]
                ));
            }
            t.to_dtype(dtype).map_err(|e| e.to_string())
        };
        let levels = [level(0)?, level(1)?, level(2)?, level(3)?];
        let hw = tensors
            .get("image_hw")
            .and_then(|t| t.to_vec1::<u32>().ok())
            .filter(|hw| hw.len() == 2 && hw[0] > 0 && hw[1] > 0)
            .ok_or("missing or bad tensor image_hw")?;
        Ok(Self { levels, height: hw[0], width: hw[1] })
    }
}

/// What the model thread is asked to do.
enum Command {
    Encode(EncodeJob),
    Pool(PoolJob),
}

struct EncodeJob {
    image: RgbImage,
    span: Span,
    reply: oneshot::Sender<Result<Arc<ImageFeatures>, VisionError>>,
}

struct PoolJob {
    features: Arc<ImageFeatures>,
    masks: Vec<Mask>,
    image_tokens: bool,
    span: Span,
    reply: oneshot::Sender<Result<PoolOutput, VisionError>>,
}

/// Region tokens (and image tokens when asked) as row-major f32 with their shapes.
pub struct PoolOutput {
    pub mask_tokens: (Vec<usize>, Vec<f32>),
    pub pos_tokens: (Vec<usize>, Vec<f32>),
    pub image_tokens: Option<(Vec<usize>, Vec<f32>)>,
}

/// The model and what it needs to serve: runs synchronously on its own thread.
pub struct VisionCore {
    model: VisionModel,
    feature_dtype: DType,
}

impl VisionCore {
    pub fn new(model: VisionModel, feature_dtype: DType) -> Self {
        Self { model, feature_dtype }
    }

    /// Shapes of res2..res5 for one image.
    pub fn level_shapes(&self) -> [[usize; 4]; 4] {
        let cfg = &self.model.config;
        let sizes = cfg.level_sizes();
        std::array::from_fn(|i| [1, cfg.dims[i], sizes[i], sizes[i]])
    }

    /// Encodes several images in one forward pass.
    pub fn encode_batch(&self, images: &[&RgbImage]) -> Result<Vec<ImageFeatures>, VisionError> {
        let size = self.model.config.image_size;
        let inputs = images
            .iter()
            .map(|image| {
                let (w, h) = (image.width() as usize, image.height() as usize);
                preprocess(image.pixels(), w, h, size, self.model.device()).map(|p| p.pixel_values)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let features = self.model.trunk.forward(&Tensor::cat(&inputs, 0)?)?;
        images
            .iter()
            .enumerate()
            .map(|(i, image)| {
                let level = |l: usize| features.levels[l].narrow(0, i, 1)?.to_dtype(self.feature_dtype);
                Ok(ImageFeatures {
                    levels: [level(0)?, level(1)?, level(2)?, level(3)?],
                    height: image.height(),
                    width: image.width(),
                })
            })
            .collect()
    }

    /// `<mask>`/`<pos>` tokens of masks at the image's resolution.
    pub fn pool(
        &self,
        features: &ImageFeatures,
        masks: &[Mask],
        image_tokens: bool,
    ) -> Result<PoolOutput, VisionError> {
        let (h, w) = (features.height as usize, features.width as usize);
        let mut data = Vec::with_capacity(masks.len() * h * w);
        for (index, mask) in masks.iter().enumerate() {
            if (mask.height() as usize, mask.width() as usize) != (h, w) {
                return Err(VisionError::MaskSize {
                    index,
                    mask_height: mask.height() as usize,
                    mask_width: mask.width() as usize,
                    image_height: h,
                    image_width: w,
                });
            }
            data.extend_from_slice(mask.data());
        }
        let device = self.model.device();
        let masks = Tensor::from_vec(data, (masks.len(), h, w), device)?;
        let levels: Vec<Tensor> = features
            .levels
            .iter()
            .map(|t| t.to_device(device)?.to_dtype(DType::F32))
            .collect::<Result<_, _>>()?;
        let features_f32 = Features { levels: levels.try_into().expect("four levels. This is a bug.") };
        let tokens = self.model.regions(&features_f32, &masks, (h, w))?;
        let flat = |t: &Tensor| -> Result<(Vec<usize>, Vec<f32>), VisionError> {
            Ok((t.dims().to_vec(), t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?))
        };
        Ok(PoolOutput {
            mask_tokens: flat(&tokens.mask_tokens)?,
            pos_tokens: flat(&tokens.pos_tokens)?,
            image_tokens: if image_tokens { Some(flat(&features_f32.image_tokens()?)?) } else { None },
        })
    }
}

/// Runs commands until every sender is gone. Encodes waiting together run as one batch.
fn model_thread(core: VisionCore, mut commands: mpsc::Receiver<Command>, max_batch_size: usize) {
    let mut deferred: Option<Command> = None;
    loop {
        let Some(command) = deferred.take().or_else(|| commands.blocking_recv()) else { return };
        match command {
            Command::Pool(job) => {
                if job.reply.is_closed() {
                    continue; // the caller has gone: skip the work
                }
                let _enter = job.span.enter();
                let result = core.pool(&job.features, &job.masks, job.image_tokens);
                let _ = job.reply.send(result);
            }
            Command::Encode(first) => {
                let mut batch = vec![first];
                while batch.len() < max_batch_size {
                    match commands.try_recv() {
                        Ok(Command::Encode(job)) => batch.push(job),
                        Ok(other) => {
                            deferred = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                batch.retain(|job| !job.reply.is_closed());
                if batch.is_empty() {
                    continue;
                }
                metrics::histogram!("osprey_vision_encode_batch_size").record(batch.len() as f64);
                let images: Vec<&RgbImage> = batch.iter().map(|job| &job.image).collect();
                let span = batch[0].span.clone();
                let _enter = span.enter();
                match core.encode_batch(&images) {
                    Ok(features) => {
                        for (job, features) in batch.into_iter().zip(features) {
                            let _ = job.reply.send(Ok(Arc::new(features)));
                        }
                    }
                    Err(err) => {
                        let message = err.to_string();
                        for job in batch {
                            let _ = job.reply.send(Err(VisionError::InvalidInput(message.clone())));
                        }
                    }
                }
            }
        }
    }
}

impl From<VisionError> for ServiceError {
    fn from(err: VisionError) -> Self {
        match err {
            VisionError::MaskSize { .. } | VisionError::InvalidInput(_) | VisionError::Image(_) => {
                ServiceError::InvalidArgument(err.to_string())
            }
            other => ServiceError::Internal(other.to_string()),
        }
    }
}

/// The gRPC handlers: admission, the resident LRU, and hand-off to the model thread.
pub struct VisionService {
    commands: mpsc::Sender<Command>,
    resident: ResidentCache<Arc<ImageFeatures>>,
    level_shapes: [[usize; 4]; 4],
    feature_dtype: DType,
    model_revision: String,
    admission: Admission,
    max_masks: usize,
    max_pixels: u64,
}

impl VisionService {
    /// Starts the model thread and returns the service in front of it.
    pub fn start(core: VisionCore, args: &ServeArgs, model_revision: String) -> Self {
        let (commands, receiver) = mpsc::channel(args.max_concurrent_requests.max(1));
        let level_shapes = core.level_shapes();
        let feature_dtype = core.feature_dtype;
        let max_batch_size = args.max_batch_size.max(1);
        std::thread::Builder::new()
            .name("vision-model".into())
            .spawn(move || model_thread(core, receiver, max_batch_size))
            .expect("spawning the model thread");
        Self {
            commands,
            resident: ResidentCache::new(
                args.max_resident_bytes,
                "osprey_vision_resident_lookups_total",
                "osprey_vision_resident_bytes",
            ),
            level_shapes,
            feature_dtype,
            model_revision,
            admission: Admission::new("vision worker", args.max_concurrent_requests),
            max_masks: args.max_masks,
            max_pixels: args.max_pixels,
        }
    }

    async fn ask<T>(
        &self,
        command: Command,
        reply: oneshot::Receiver<Result<T, VisionError>>,
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

    async fn handle_encode(&self, request: EncodeRequest) -> Result<EncodeResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        if let Some(features) = self.resident.get(&request.image_key) {
            return Ok(EncodeResponse {
                features: self.blob_if(request.return_features, &features)?,
                was_resident: true,
                timing: Some(Timing { total_ns: elapsed_ns(start), ..Timing::default() }),
            });
        }
        let image = request.image.ok_or_else(|| ServiceError::invalid("image", "required"))?;
        if image.width as u64 * image.height as u64 > self.max_pixels {
            return Err(ServiceError::invalid(
                "image",
                format!("over the limit of {} pixels", self.max_pixels),
            ));
        }
        let image = RgbImage::from_raw(image.width, image.height, image.rgb)
            .map_err(|e| ServiceError::invalid("image", e))?;
        let (reply, receiver) = oneshot::channel();
        let features =
            self.ask(Command::Encode(EncodeJob { image, span: Span::current(), reply }), receiver).await?;
        let encode_ns = elapsed_ns(start);
        metrics::histogram!("osprey_vision_encode_duration").record(encode_ns as f64 / 1e9);
        self.resident.insert(&request.image_key, features.clone(), features.bytes());
        Ok(EncodeResponse {
            features: self.blob_if(request.return_features, &features)?,
            was_resident: false,
            timing: Some(Timing { encode_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
        })
    }

    fn blob_if(&self, wanted: bool, features: &ImageFeatures) -> Result<Option<FeatureBlob>, ServiceError> {
        wanted.then(|| features.to_blob(&self.model_revision)).transpose().map_err(Into::into)
    }

    async fn handle_pool(&self, request: PoolRequest) -> Result<PoolResponse, ServiceError> {
        let start = Instant::now();
        check_image_key(&request.image_key)?;
        if request.masks.len() > self.max_masks {
            return Err(ServiceError::invalid(
                "masks",
                format!("{} masks, over the limit of {}", request.masks.len(), self.max_masks),
            ));
        }
        let (features, was_resident) = match (self.resident.get(&request.image_key), &request.features) {
            (Some(features), _) => (features, true),
            (None, Some(blob)) => {
                if blob.model_revision != self.model_revision {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "features were computed by model revision {:?}, this worker runs {:?}",
                        blob.model_revision, self.model_revision
                    )));
                }
                let features =
                    ImageFeatures::from_blob(blob, &self.level_shapes, self.feature_dtype, &Device::Cpu)
                        .map_err(|e| ServiceError::invalid("features", e))?;
                let features = Arc::new(features);
                self.resident.insert(&request.image_key, features.clone(), features.bytes());
                (features, false)
            }
            (None, None) => {
                return Err(ServiceError::FailedPrecondition(format!(
                    "features of image {} are not resident on this worker; send them in `features` or call Encode",
                    request.image_key
                )));
            }
        };
        let masks = request
            .masks
            .iter()
            .enumerate()
            .map(|(i, rle)| {
                let mask =
                    rle_from_proto(rle).map_err(|e| ServiceError::invalid(format!("masks[{i}]"), e))?;
                if (mask.height(), mask.width()) != (features.height, features.width) {
                    return Err(ServiceError::invalid(
                        format!("masks[{i}]"),
                        format!(
                            "mask is {}x{} but the image is {}x{} (height x width)",
                            mask.height(),
                            mask.width(),
                            features.height,
                            features.width
                        ),
                    ));
                }
                Ok(mask.to_mask())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (reply, receiver) = oneshot::channel();
        let job = PoolJob {
            features,
            masks,
            image_tokens: request.return_image_tokens,
            span: Span::current(),
            reply,
        };
        let output = self.ask(Command::Pool(job), receiver).await?;
        let pool_ns = elapsed_ns(start);
        metrics::histogram!("osprey_vision_pool_duration").record(pool_ns as f64 / 1e9);
        Ok(PoolResponse {
            mask_tokens: Some(f32_to_proto(&output.mask_tokens.0, &output.mask_tokens.1)),
            pos_tokens: Some(f32_to_proto(&output.pos_tokens.0, &output.pos_tokens.1)),
            image_tokens: output.image_tokens.map(|(shape, values)| f32_to_proto(&shape, &values)),
            was_resident,
            timing: Some(Timing { pool_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
        })
    }
}

fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

#[tonic::async_trait]
impl Vision for VisionService {
    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn encode(&self, request: Request<EncodeRequest>) -> Result<Response<EncodeResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.admission.admit()?;
        respond(self.handle_encode(request.into_inner()).await)
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key, masks = request.get_ref().masks.len()))]
    async fn pool(&self, request: Request<PoolRequest>) -> Result<Response<PoolResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let _permit = self.admission.admit()?;
        respond(self.handle_pool(request.into_inner()).await)
    }
}

/// A revision string for a checkpoint directory: config and weight file names and sizes.
pub fn checkpoint_revision(dir: &std::path::Path) -> Result<String, VisionError> {
    let io = |source| VisionError::Io { path: dir.to_path_buf(), source };
    let mut entries: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(Result::ok)
        .filter_map(|e| Some((e.file_name().to_string_lossy().into_owned(), e.metadata().ok()?.len())))
        .filter(|(name, _)| {
            name.ends_with(".json") || name.ends_with(".bin") || name.ends_with(".safetensors")
        })
        .collect();
    entries.sort();
    let mut hasher = blake3::Hasher::new();
    hasher.update(&std::fs::read(dir.join("config.json")).map_err(io)?);
    for (name, size) in entries {
        hasher.update(name.as_bytes());
        hasher.update(&size.to_le_bytes());
    }
    Ok(hasher.finalize().to_hex()[..16].to_string())
}

/// Loads the model, warms it up, serves until SIGTERM/ctrl-c (or `shutdown`), then drains.
pub async fn run(
    args: ServeArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (routes, health) = standard_routes(&["osprey.worker.v1.Vision"]).await;
    let device = osprey_checkpoint::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let weights = args.weights.clone();
    let model = tokio::task::spawn_blocking(move || VisionModel::from_dir(&weights, &device)).await??;
    let revision = match &args.model_revision {
        Some(revision) => revision.clone(),
        None => checkpoint_revision(&args.weights)?,
    };
    tracing::info!(revision, "vision model loaded");
    let service =
        Arc::new(VisionService::start(VisionCore::new(model, args.feature_dtype.dtype()), &args, revision));
    warm_up(&service).await?;
    let vision = VisionServer::from_arc(service)
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    let routes = routes.add_service(vision);
    health.set_serving().await;
    tracing::info!(address = %listener.local_addr()?, "serving");
    serve(listener, routes, &health, shutdown).await?;
    Ok(())
}

/// One encode and one pool through the model thread before reporting SERVING.
async fn warm_up(service: &VisionService) -> anyhow::Result<()> {
    let (w, h) = (32u32, 24u32);
    let image = RgbImage::from_raw(w, h, vec![127; (w * h * 3) as usize])?;
    let (reply, receiver) = oneshot::channel();
    let features = service
        .ask(Command::Encode(EncodeJob { image, span: Span::current(), reply }), receiver)
        .instrument(tracing::info_span!("warm_up"))
        .await?;
    let (reply, receiver) = oneshot::channel();
    let masks = vec![Mask::from_row_major(h, w, &vec![1; (w * h) as usize])?];
    let job = PoolJob { features, masks, image_tokens: true, span: Span::current(), reply };
    service.ask(Command::Pool(job), receiver).await?;
    Ok(())
}

/// `vision-worker serve`: telemetry, then [`run`] until a shutdown signal.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let _telemetry = osprey_common::telemetry::init_telemetry(&args.telemetry, "vision-worker")?;
    tracing::info!(?args, "starting");
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    run(args, listener, shutdown_signal()).await
}
