//! The gateway's shared state: the worker clients, the cache, admission and the request limits,
//! built from the flags.

use std::sync::Arc;
use std::time::Duration;

use osprey_common::ServiceError;
use osprey_common::grpc::Admission;
use osprey_common::image::ImageLimits;
use tokio::sync::OwnedSemaphorePermit;

use crate::cache::FeatureCache;
use crate::clients::{Llm, Sam, Vision};
use crate::config::GatewayArgs;
use crate::request::Limits;
use crate::workers::Replicas;

pub struct Gateway {
    pub vision: Vision,
    pub llm: Llm,
    pub sam: Sam,
    pub cache: FeatureCache,
    pub limits: Limits,
    pub model_revision: String,
    /// The deadline of a request whose client sets none.
    pub default_deadline: Duration,
    admission: Admission,
    resolve_every: Duration,
    health_every: Duration,
}

impl Gateway {
    pub fn new(args: &GatewayArgs) -> anyhow::Result<Self> {
        let tls = args.worker_tls()?;
        let replicas = |kind, targets: &[String]| {
            Replicas::new(kind, targets)
                .map(|r| Arc::new(r.with_tls(tls.clone())))
                .map_err(anyhow::Error::msg)
        };
        Ok(Self {
            vision: Vision(replicas("vision", &args.vision_workers)?),
            llm: Llm(replicas("llm", &args.llm_workers)?),
            sam: Sam(replicas("sam", &args.sam_workers)?),
            cache: FeatureCache::from_args(&args.cache)?,
            limits: Limits {
                max_regions: args.max_regions,
                max_question_bytes: args.max_question_bytes,
                max_points_per_side: args.max_points_per_side,
                max_request_tokens: args.max_request_tokens,
                image: ImageLimits {
                    max_bytes: args.max_image_bytes,
                    max_pixels: args.max_image_pixels,
                    ..ImageLimits::default()
                },
            },
            model_revision: args.model_revision.clone(),
            default_deadline: args.default_deadline(),
            admission: Admission::new("gateway", args.max_concurrent_requests),
            resolve_every: Duration::from_secs_f64(args.resolve_interval),
            health_every: Duration::from_secs_f64(args.health_interval),
        })
    }

    /// Resolves the worker names and checks the replicas once, then keeps doing so in the
    /// background for as long as the gateway lives.
    pub async fn discover_workers(&self) {
        let (resolve_every, health_every) = (self.resolve_every, self.health_every);
        let first = |replicas: Arc<Replicas>| async move {
            replicas.resolve().await;
            replicas.check_health(health_every).await;
            replicas.maintain(resolve_every, health_every);
        };
        tokio::join!(first(self.vision.0.clone()), first(self.llm.0.clone()), first(self.sam.0.clone()));
    }

    /// Every known replica of each worker kind and whether it is healthy.
    pub fn worker_replicas(&self) -> [(&'static str, Vec<(String, bool)>); 3] {
        [("vision", self.vision.0.replicas()), ("llm", self.llm.0.replicas()), ("sam", self.sam.0.replicas())]
    }

    /// A slot for one more request in flight, or RESOURCE_EXHAUSTED.
    pub fn admit(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        self.admission.admit()
    }
}
