//! The vision model core behind the gRPC edge: encodes batches of images into features, pools
//! region tokens from features, moves features in and out of the compact blob, and runs as the
//! worker's model thread ([`VisionEngine`], a [`Model`] of the shared worker skeleton) where
//! encodes waiting together share one forward pass.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use osprey_common::ServiceError;
use osprey_common::image::RgbImage;
use osprey_common::mask::Mask;
use osprey_common::worker::{Model, Reply};
use osprey_proto::worker::v1::FeatureBlob;

use crate::error::VisionError;
use crate::models::VisionModel;
use crate::models::clip_convnext::Features;
use crate::preprocess::preprocess;

/// Element type features are kept and shipped in.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeatureDtype {
    F16,
    F32,
}

impl FeatureDtype {
    pub fn dtype(self) -> DType {
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
    /// Bytes the features take (what the resident LRU charges for them).
    pub fn bytes(&self) -> usize {
        self.levels.iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }

    /// The compact blob: safetensors bytes with `res2`..`res5` and `image_hw` (u32 [2]), tagged
    /// with the revision of the weights that computed them.
    pub fn to_blob(&self, feature_revision: &str) -> Result<FeatureBlob, VisionError> {
        let image_hw = Tensor::new(&[self.height, self.width], &Device::Cpu)?;
        let levels: Vec<Tensor> =
            self.levels.iter().map(|t| t.to_device(&Device::Cpu)).collect::<Result<_, _>>()?;
        let mut named: Vec<(&str, &Tensor)> = Features::NAMES.iter().copied().zip(levels.iter()).collect();
        named.push(("image_hw", &image_hw));
        let bytes = safetensors::serialize(named, None)
            .map_err(|e| VisionError::Internal(format!("serialising features: {e}")))?;
        Ok(FeatureBlob { safetensors: bytes, feature_revision: feature_revision.to_string() })
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

/// Region tokens (and image tokens when asked) as row-major f32 with their shapes.
pub struct PoolOutput {
    pub mask_tokens: (Vec<usize>, Vec<f32>),
    pub pos_tokens: (Vec<usize>, Vec<f32>),
    pub image_tokens: Option<(Vec<usize>, Vec<f32>)>,
}

/// The model and the dtype its features are kept in; synchronous, for one thread.
pub struct VisionCore {
    model: VisionModel,
    feature_dtype: DType,
}

impl VisionCore {
    pub fn new(model: VisionModel, feature_dtype: DType) -> Self {
        Self { model, feature_dtype }
    }

    pub fn feature_dtype(&self) -> DType {
        self.feature_dtype
    }

    /// Shapes of res2..res5 for one image.
    pub fn level_shapes(&self) -> [[usize; 4]; 4] {
        let cfg = &self.model.config;
        let sizes = cfg.level_sizes();
        std::array::from_fn(|i| [1, cfg.dims[i], sizes[i], sizes[i]])
    }

    /// The tower input of one image, `[1, 3, S, S]`.
    pub fn preprocess(&self, image: &RgbImage) -> Result<Tensor, VisionError> {
        let (w, h) = (image.width() as usize, image.height() as usize);
        let size = self.model.config.image_size;
        Ok(preprocess(image.pixels(), w, h, size, self.model.device())?.pixel_values)
    }

    /// Encodes several images in one forward pass.
    pub fn encode_batch(&self, images: &[&RgbImage]) -> Result<Vec<ImageFeatures>, VisionError> {
        let inputs = images.iter().map(|image| self.preprocess(image)).collect::<Result<Vec<_>, _>>()?;
        let sizes: Vec<(u32, u32)> = images.iter().map(|i| (i.height(), i.width())).collect();
        self.encode_inputs(&inputs, &sizes)
    }

    /// Runs the trunk once over preprocessed inputs; `sizes` are the original `(height, width)`.
    fn encode_inputs(
        &self,
        inputs: &[Tensor],
        sizes: &[(u32, u32)],
    ) -> Result<Vec<ImageFeatures>, VisionError> {
        let features = self.model.trunk.forward(&Tensor::cat(inputs, 0)?)?;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &(height, width))| {
                let level = |l: usize| features.levels[l].narrow(0, i, 1)?.to_dtype(self.feature_dtype);
                Ok(ImageFeatures { levels: [level(0)?, level(1)?, level(2)?, level(3)?], height, width })
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

/// What the model thread is asked to do.
pub enum VisionJob {
    Encode(EncodeJob),
    Pool(PoolJob),
}

pub struct EncodeJob {
    pub image_key: String,
    pub image: RgbImage,
    pub reply: Reply<Arc<ImageFeatures>>,
}

pub struct PoolJob {
    pub features: Arc<ImageFeatures>,
    pub masks: Vec<Mask>,
    pub image_tokens: bool,
    pub reply: Reply<PoolOutput>,
}

/// The vision model thread: encodes waiting together run as one forward pass; pools run alone.
pub struct VisionEngine {
    core: VisionCore,
    /// Testing only: an encode batch holding this image key fails in the model, as a device
    /// error would, so tests can see how a model failure is answered.
    fault_image_key: Option<String>,
}

impl VisionEngine {
    pub fn new(core: VisionCore, fault_image_key: Option<String>) -> Self {
        Self { core, fault_image_key }
    }

    /// Encodes the batch: an image that cannot be preprocessed fails alone; a failed forward
    /// pass fails every image in it, each answered with that error.
    fn encode(&self, batch: Vec<EncodeJob>) {
        metrics::histogram!("osprey_vision_encode_batch_size").record(batch.len() as f64);
        let span = batch[0].reply.span().clone();
        let _enter = span.enter();
        let mut ready = Vec::with_capacity(batch.len());
        let mut inputs = Vec::with_capacity(batch.len());
        for job in batch {
            match self.core.preprocess(&job.image) {
                Ok(input) => {
                    inputs.push(input);
                    ready.push(job);
                }
                // Preprocessing refuses only what the image is (e.g. its aspect ratio).
                Err(VisionError::InvalidInput(problem)) => {
                    job.reply.send(Err(ServiceError::invalid("image", problem)))
                }
                Err(err) => job.reply.send(Err(err.into())),
            }
        }
        if ready.is_empty() {
            return;
        }
        let sizes: Vec<(u32, u32)> = ready.iter().map(|j| (j.image.height(), j.image.width())).collect();
        let poisoned =
            self.fault_image_key.as_ref().is_some_and(|key| ready.iter().any(|j| &j.image_key == key));
        let result = if poisoned {
            Err(VisionError::from(candle_core::Error::Msg("injected fault: the encode batch failed".into())))
        } else {
            self.core.encode_inputs(&inputs, &sizes)
        };
        match result {
            Ok(features) => {
                for (job, features) in ready.into_iter().zip(features) {
                    job.reply.send(Ok(Arc::new(features)));
                }
            }
            Err(err) => {
                tracing::error!(error = %err, images = ready.len(), "encode batch failed");
                let err = ServiceError::from(err);
                for job in ready {
                    job.reply.send(Err(err.clone()));
                }
            }
        }
    }
}

impl Model for VisionEngine {
    type Job = VisionJob;

    fn batches_with(first: &VisionJob, next: &VisionJob) -> bool {
        matches!((first, next), (VisionJob::Encode(_), VisionJob::Encode(_)))
    }

    fn abandoned(job: &VisionJob) -> bool {
        match job {
            VisionJob::Encode(job) => job.reply.is_closed(),
            VisionJob::Pool(job) => job.reply.is_closed(),
        }
    }

    fn run(&mut self, batch: Vec<VisionJob>) {
        let mut encodes = Vec::with_capacity(batch.len());
        for job in batch {
            match job {
                VisionJob::Encode(job) => encodes.push(job),
                VisionJob::Pool(job) => {
                    let _enter = job.reply.span().clone().entered();
                    let result = self.core.pool(&job.features, &job.masks, job.image_tokens);
                    job.reply.send(result.map_err(Into::into));
                }
            }
        }
        if !encodes.is_empty() {
            self.encode(encodes);
        }
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

#[cfg(test)]
mod tests {
    use osprey_common::worker::{Model, Reply};

    use super::*;

    fn engine(fault_image_key: Option<&str>) -> VisionEngine {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision/tiny/tiny_st");
        let model = VisionModel::from_dir(&dir, &Device::Cpu).unwrap();
        VisionEngine::new(VisionCore::new(model, DType::F32), fault_image_key.map(String::from))
    }

    fn encode(
        key: &str,
        width: u32,
    ) -> (VisionJob, tokio::sync::oneshot::Receiver<Result<Arc<ImageFeatures>, ServiceError>>) {
        let image = RgbImage::from_raw(width, 24, vec![90; width as usize * 24 * 3]).unwrap();
        let (reply, answer) = Reply::new();
        (VisionJob::Encode(EncodeJob { image_key: key.into(), image, reply }), answer)
    }

    #[test]
    fn a_failed_batch_is_internal_for_every_request_in_it() {
        let mut engine = engine(Some("poisoned"));
        let (jobs, answers): (Vec<_>, Vec<_>) =
            [encode("a", 32), encode("poisoned", 40), encode("b", 28)].into_iter().unzip();
        engine.run(jobs);
        for mut answer in answers {
            let err = answer.try_recv().unwrap().unwrap_err();
            assert_eq!(err.code(), tonic::Code::Internal, "{err:?}");
            assert!(err.to_string().contains("injected fault"), "{err}");
        }
        // The same images in a batch without the poisoned one are encoded.
        let (jobs, answers): (Vec<_>, Vec<_>) = [encode("a", 32), encode("b", 28)].into_iter().unzip();
        engine.run(jobs);
        for mut answer in answers {
            assert!(answer.try_recv().unwrap().is_ok());
        }
    }

    #[test]
    fn an_image_preprocessing_refuses_fails_alone_naming_the_image() {
        let mut engine = engine(None);
        let (thin, thin_answer) = {
            let image = RgbImage::from_raw(400, 1, vec![0; 400 * 3]).unwrap();
            let (reply, answer) = Reply::new();
            (VisionJob::Encode(EncodeJob { image_key: "thin".into(), image, reply }), answer)
        };
        let (good, good_answer) = encode("good", 32);
        engine.run(vec![thin, good]);
        let err = { thin_answer }.try_recv().unwrap().unwrap_err();
        assert_eq!(err.field(), Some("image"), "{err:?}");
        assert!({ good_answer }.try_recv().unwrap().is_ok());
    }
}
