//! The vision worker's gRPC edge (`osprey.worker.v1.Vision`): flags, request checks, the resident
//! LRU of image features keyed by image key, and hand-off to the model thread ([`crate::engine`]),
//! where concurrent encodes share one forward pass. Pool reads resident features or a feature blob
//! sent along (docs/ARCHITECTURE.md, "Cache tiers and keys").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use osprey_common::ServiceError;
use osprey_common::error::check_image_key;
use osprey_common::grpc::Admission;
use osprey_common::image::RgbImage;
use osprey_common::lru::ResidentCache;
use osprey_common::mask::{Mask, rle_from_worker};
use osprey_common::telemetry::{TelemetryArgs, set_parent_from_metadata};
use osprey_common::tensor::f32_to_proto;
use osprey_common::worker::{self, ModelQueue, elapsed_ns, handle, image_from_proto, request_deadline};
use osprey_proto::worker::v1::vision_server::{Vision, VisionServer};
use osprey_proto::worker::v1::{
    EncodeRequest, EncodeResponse, FeatureBlob, PoolRequest, PoolResponse, Timing,
};
use tonic::{Request, Response, Status};
use tracing::{Span, instrument};

use crate::engine::{
    EncodeJob, FeatureDtype, ImageFeatures, PoolJob, VisionCore, VisionEngine, VisionJob, checkpoint_revision,
};
use crate::models::VisionModel;

/// `vision-worker serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Osprey checkpoint directory (config.json + safetensors or PyTorch .bin weights; the
    /// Open-CLIP file named by `mm_vision_tower` when the checkpoint lacks the vision trunk), or a
    /// Hugging Face repo id (`sunshine-lwt/Osprey-7b[@revision]`) fetched into `HF_HOME`.
    #[arg(long, env = "OSPREY_WEIGHTS")]
    pub weights: PathBuf,
    /// Address to serve gRPC on.
    #[arg(long, env = "OSPREY_LISTEN", default_value = "0.0.0.0:50052")]
    pub listen: SocketAddr,
    /// Compute device: `cpu`, or `cuda:N` in a build with `--features cuda`.
    #[arg(long, env = "OSPREY_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Most images encoded in one forward pass (concurrent encodes are batched).
    #[arg(long, env = "OSPREY_MAX_BATCH_SIZE", default_value_t = 4)]
    pub max_batch_size: usize,
    /// Bytes of image features kept resident, least recently used evicted first.
    #[arg(long, env = "OSPREY_MAX_RESIDENT_BYTES", default_value_t = 4 << 30)]
    pub max_resident_bytes: usize,
    /// Element type features are kept and shipped in: `f16` (as the reference runs the tower,
    /// half the memory) or `f32`.
    #[arg(long, env = "OSPREY_FEATURE_DTYPE", value_enum, default_value = "f16")]
    pub feature_dtype: FeatureDtype,
    /// Requests in flight at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "OSPREY_MAX_CONCURRENT_REQUESTS", default_value_t = 256)]
    pub max_concurrent_requests: usize,
    /// Most masks in one Pool call.
    #[arg(long, env = "OSPREY_MAX_MASKS", default_value_t = 1024)]
    pub max_masks: usize,
    /// Largest image accepted, in pixels.
    #[arg(long, env = "OSPREY_MAX_PIXELS", default_value_t = 40_000_000)]
    pub max_pixels: u64,
    /// Largest gRPC message accepted, in bytes.
    #[arg(long, env = "OSPREY_MAX_MESSAGE_BYTES", default_value_t = 512 << 20)]
    pub max_message_bytes: usize,
    /// Revision of the weights that compute features: tags every feature blob this worker sends,
    /// and a blob with another tag is refused. Defaults to a hash of the checkpoint's config and
    /// weight file names and sizes. (The gateway's `--model-revision`, which keys its caches, is
    /// a different setting.)
    #[arg(long, env = "OSPREY_FEATURE_REVISION")]
    pub feature_revision: Option<String>,
    /// Testing only: an encode batch holding this image key fails in the model, as a device
    /// error would (to test how model failures are answered and failed over).
    #[arg(long, hide = true)]
    pub fault_image_key: Option<String>,
    /// TLS, and mutual TLS with `--tls-client-ca` (docs/RELIABILITY.md, Security).
    #[command(flatten)]
    pub tls: osprey_common::grpc::ServerTlsArgs,
    #[command(flatten)]
    pub telemetry: TelemetryArgs,
}

/// The gRPC handlers: admission, the resident LRU, and hand-off to the model thread.
pub struct VisionService {
    model: ModelQueue<VisionJob>,
    resident: ResidentCache<Arc<ImageFeatures>>,
    level_shapes: [[usize; 4]; 4],
    feature_dtype: DType,
    feature_revision: String,
    admission: Admission,
    max_masks: usize,
    max_pixels: u64,
}

impl VisionService {
    /// Starts the model thread and returns the service in front of it.
    pub fn start(core: VisionCore, args: &ServeArgs, feature_revision: String) -> Self {
        let level_shapes = core.level_shapes();
        let feature_dtype = core.feature_dtype();
        let engine = VisionEngine::new(core, args.fault_image_key.clone());
        Self {
            model: ModelQueue::start(
                "vision",
                "vision-model",
                engine,
                args.max_concurrent_requests,
                args.max_batch_size,
            ),
            resident: ResidentCache::new(
                args.max_resident_bytes,
                "osprey_vision_resident_lookups_total",
                "osprey_vision_resident_bytes",
            ),
            level_shapes,
            feature_dtype,
            feature_revision,
            admission: Admission::new("vision worker", args.max_concurrent_requests),
            max_masks: args.max_masks,
            max_pixels: args.max_pixels,
        }
    }

    /// Features of `image` from the model thread.
    async fn encode_image(
        &self,
        image_key: &str,
        image: RgbImage,
        deadline: Option<Instant>,
    ) -> Result<Arc<ImageFeatures>, ServiceError> {
        let image_key = image_key.to_string();
        self.model.ask(|reply| VisionJob::Encode(EncodeJob { image_key, image, reply }), deadline).await
    }

    async fn handle_encode(
        &self,
        request: EncodeRequest,
        deadline: Option<Instant>,
    ) -> Result<EncodeResponse, ServiceError> {
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
        let image = image_from_proto(image, self.max_pixels)?;
        let features = self.encode_image(&request.image_key, image, deadline).await?;
        let encode_ns = elapsed_ns(start);
        metrics::histogram!("osprey_vision_encode_duration_seconds").record(encode_ns as f64 / 1e9);
        self.resident.insert(&request.image_key, features.clone(), features.bytes());
        Ok(EncodeResponse {
            features: self.blob_if(request.return_features, &features)?,
            was_resident: false,
            timing: Some(Timing { encode_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
        })
    }

    fn blob_if(&self, wanted: bool, features: &ImageFeatures) -> Result<Option<FeatureBlob>, ServiceError> {
        wanted.then(|| features.to_blob(&self.feature_revision)).transpose().map_err(Into::into)
    }

    async fn handle_pool(
        &self,
        request: PoolRequest,
        deadline: Option<Instant>,
    ) -> Result<PoolResponse, ServiceError> {
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
                if blob.feature_revision != self.feature_revision {
                    return Err(ServiceError::FailedPrecondition(format!(
                        "features were computed by weights of revision {:?}, this worker runs {:?}",
                        blob.feature_revision, self.feature_revision
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
                    rle_from_worker(rle).map_err(|e| ServiceError::invalid(format!("masks[{i}]"), e))?;
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
        let output = self.pool_masks(features, masks, request.return_image_tokens, deadline).await?;
        let pool_ns = elapsed_ns(start);
        metrics::histogram!("osprey_vision_pool_duration_seconds").record(pool_ns as f64 / 1e9);
        Ok(PoolResponse {
            mask_tokens: Some(f32_to_proto(&output.mask_tokens.0, &output.mask_tokens.1)),
            pos_tokens: Some(f32_to_proto(&output.pos_tokens.0, &output.pos_tokens.1)),
            image_tokens: output.image_tokens.map(|(shape, values)| f32_to_proto(&shape, &values)),
            was_resident,
            timing: Some(Timing { pool_ns, total_ns: elapsed_ns(start), ..Timing::default() }),
            feature_revision: self.feature_revision.clone(),
        })
    }

    /// Region tokens of `masks` from the model thread.
    async fn pool_masks(
        &self,
        features: Arc<ImageFeatures>,
        masks: Vec<Mask>,
        image_tokens: bool,
        deadline: Option<Instant>,
    ) -> Result<crate::engine::PoolOutput, ServiceError> {
        let job = |reply| VisionJob::Pool(PoolJob { features, masks, image_tokens, reply });
        self.model.ask(job, deadline).await
    }

    /// One encode and one pool through the model thread before the worker reports SERVING.
    async fn warm_up(&self) -> anyhow::Result<()> {
        let (w, h) = (32u32, 24u32);
        let image = RgbImage::from_raw(w, h, vec![127; (w * h * 3) as usize])?;
        let features = self.encode_image("warm-up", image, None).await?;
        let masks = vec![Mask::from_row_major(h, w, &vec![1; (w * h) as usize])?];
        self.pool_masks(features, masks, true, None).await?;
        Ok(())
    }
}

#[tonic::async_trait]
impl Vision for VisionService {
    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key))]
    async fn encode(&self, request: Request<EncodeRequest>) -> Result<Response<EncodeResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let deadline = request_deadline(request.metadata());
        handle(&self.admission, self.handle_encode(request.into_inner(), deadline)).await
    }

    #[instrument(skip_all, fields(image_key = %request.get_ref().image_key, masks = request.get_ref().masks.len()))]
    async fn pool(&self, request: Request<PoolRequest>) -> Result<Response<PoolResponse>, Status> {
        set_parent_from_metadata(&Span::current(), request.metadata());
        let deadline = request_deadline(request.metadata());
        handle(&self.admission, self.handle_pool(request.into_inner(), deadline)).await
    }
}

/// Loads the model, warms it up, serves until `shutdown` completes, then drains.
pub async fn run(
    args: ServeArgs,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let device = osprey_checkpoint::parse_device(&args.device).map_err(anyhow::Error::msg)?;
    let weights = args.weights.clone();
    let model = tokio::task::spawn_blocking(move || VisionModel::from_dir(&weights, &device)).await??;
    osprey_common::memory::return_free_memory();
    let revision = match &args.feature_revision {
        Some(revision) => revision.clone(),
        None => checkpoint_revision(&args.weights)?,
    };
    tracing::info!(revision, "vision model loaded");
    let service =
        Arc::new(VisionService::start(VisionCore::new(model, args.feature_dtype.dtype()), &args, revision));
    let vision = VisionServer::from_arc(service.clone())
        .max_decoding_message_size(args.max_message_bytes)
        .max_encoding_message_size(args.max_message_bytes);
    worker::serve_worker(
        "osprey.worker.v1.Vision",
        listener,
        &args.tls,
        shutdown,
        service.warm_up(),
        |routes| routes.add_service(vision),
    )
    .await
}

/// `vision-worker serve`: telemetry, then [`run`] until SIGTERM or ctrl-c.
pub async fn main(args: ServeArgs) -> anyhow::Result<()> {
    let telemetry = args.telemetry.clone();
    worker::main("vision-worker", &telemetry, args.listen, |listener, shutdown| {
        tracing::info!(?args, "starting");
        run(args, listener, shutdown)
    })
    .await
}
