//! `SamPredictor` (`segment_anything/predictor.py`): embed an image once, then answer prompts.
//!
//! Pre-processing is `ResizeLongestSide` (torchvision `resize` on a PIL image, i.e. Pillow's
//! antialiased BILINEAR, target side `int(side * scale + 0.5)`), `(x - pixel_mean) / pixel_std` and
//! zero padding to a square. Prompt coordinates are scaled by `new / old` per axis in double precision.
//! Post-processing (`Sam.postprocess_masks`) resizes the low-res logits bilinearly (align_corners=False)
//! to the model input size, crops the padding, resizes to the original size and thresholds.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use osprey_common::image::RgbImage;
use osprey_common::mask::Mask;
use osprey_common::resize::{PilFilter, pil_resize, torch_bilinear};

use crate::error::SamError;
use crate::models::sam::{Sam, SamConfig};
use crate::prompt::Prompt;

/// `ResizeLongestSide.get_preprocess_shape`: `(new_h, new_w)`.
pub fn preprocess_shape(h: usize, w: usize, long_side: usize) -> (usize, usize) {
    let scale = long_side as f64 / h.max(w) as f64;
    let new_h = (h as f64 * scale + 0.5) as usize;
    let new_w = (w as f64 * scale + 0.5) as usize;
    (new_h, new_w)
}

/// Loads a checkpoint with the official key names: a PyTorch zip `.pth` (`torch.save(state_dict)`)
/// or safetensors, told apart by their first bytes.
pub fn load_sam(path: &Path, cfg: &SamConfig, device: &Device) -> Result<Sam, SamError> {
    cfg.validate().map_err(SamError::Config)?;
    let weights_err = |source| SamError::Weights { path: path.to_path_buf(), source };
    let mut head = [0u8; 9];
    {
        use std::io::Read;
        let mut f =
            std::fs::File::open(path).map_err(|source| SamError::Io { path: path.to_path_buf(), source })?;
        f.read_exact(&mut head).map_err(|source| SamError::Io { path: path.to_path_buf(), source })?;
    }
    let vb = if head.starts_with(b"PK") {
        VarBuilder::from_pth(path, DType::F32, device).map_err(weights_err)?
    } else if head[8] == b'{' {
        let tensors = candle_core::safetensors::load(path, device).map_err(weights_err)?;
        VarBuilder::from_tensors(tensors, DType::F32, device)
    } else {
        return Err(weights_err(candle_core::Error::Msg(
            "neither a PyTorch zip checkpoint nor safetensors".into(),
        )));
    };
    Sam::load(vb, cfg).map_err(weights_err)
}

/// Picks the device: CUDA when asked for (and compiled in), else the CPU.
pub fn select_device(cuda: bool) -> Result<Device, SamError> {
    if !cuda {
        return Ok(Device::Cpu);
    }
    #[cfg(feature = "cuda")]
    {
        Ok(Device::new_cuda(0)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(SamError::CudaUnavailable)
    }
}

/// Masks for one prompt.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Number of masks K (1, or `num_multimask_outputs`).
    pub num_masks: usize,
    pub height: usize,
    pub width: usize,
    /// `[K, height, width]` booleans (0/1) at the original image size.
    pub masks: Vec<u8>,
    /// `[K]`.
    pub iou_predictions: Vec<f32>,
    /// Side L of the low-resolution logits.
    pub low_res_size: usize,
    /// `[K, L, L]`: feed one back as [`Prompt::mask_input`].
    pub low_res_logits: Vec<f32>,
}

impl Prediction {
    /// Mask `k` as a shared [`Mask`].
    pub fn mask(&self, k: usize) -> Option<Mask> {
        let n = self.height * self.width;
        let data = self.masks.get(k * n..(k + 1) * n)?;
        Mask::from_row_major(self.height as u32, self.width as u32, data).ok()
    }

    /// Low-res logits of mask `k`.
    pub fn low_res(&self, k: usize) -> Option<&[f32]> {
        let n = self.low_res_size * self.low_res_size;
        self.low_res_logits.get(k * n..(k + 1) * n)
    }

    /// Index of the mask with the highest predicted IoU.
    pub fn best(&self) -> usize {
        let mut best = 0;
        for (i, v) in self.iou_predictions.iter().enumerate() {
            if *v > self.iou_predictions[best] {
                best = i;
            }
        }
        best
    }
}

/// The embedding of one image and the sizes needed to map prompts and masks (what `set_image` keeps).
#[derive(Debug, Clone)]
pub struct ImageEmbedding {
    /// `[1, C, grid, grid]`.
    pub embeddings: Tensor,
    /// `(h, w)` of the original image.
    pub original: (usize, usize),
    /// `(h, w)` after ResizeLongestSide.
    pub input: (usize, usize),
}

impl ImageEmbedding {
    /// Bytes held by the embedding tensor (for the resident LRU's budget).
    pub fn bytes(&self) -> usize {
        self.embeddings.elem_count() * self.embeddings.dtype().size_in_bytes()
    }
}

/// Holds the model and the embedding of the current image. Synchronous: run it on a model thread.
#[derive(Debug)]
pub struct SamPredictor {
    model: Sam,
    device: Device,
    image: Option<ImageEmbedding>,
}

impl SamPredictor {
    pub fn new(model: Sam, device: Device) -> Self {
        Self { model, device, image: None }
    }

    pub fn config(&self) -> &SamConfig {
        &self.model.config
    }

    /// ResizeLongestSide on 8-bit RGB: `(resized HWC pixels, new_h, new_w)`.
    pub fn resize_image(&self, image: &RgbImage) -> Result<(Vec<u8>, usize, usize), SamError> {
        let (h, w) = (image.height() as usize, image.width() as usize);
        let (nh, nw) = preprocess_shape(h, w, self.model.config.image_size);
        let pixels = pil_resize(image.pixels(), w, h, 3, nw, nh, PilFilter::Bilinear)?;
        Ok((pixels, nh, nw))
    }

    pub fn model(&self) -> &Sam {
        &self.model
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Computes the embedding of `image` without keeping it.
    pub fn embed(&self, image: &RgbImage) -> Result<ImageEmbedding, SamError> {
        let cfg = &self.model.config;
        let s = cfg.image_size;
        let (pixels, nh, nw) = self.resize_image(image)?;
        let x = Tensor::from_vec(pixels, (nh, nw, 3), &self.device)?
            .permute((2, 0, 1))?
            .to_dtype(DType::F32)?
            .unsqueeze(0)?;
        let mean = Tensor::new(&cfg.pixel_mean.map(|v| v as f32), &self.device)?.reshape((1, 3, 1, 1))?;
        let std = Tensor::new(&cfg.pixel_std.map(|v| v as f32), &self.device)?.reshape((1, 3, 1, 1))?;
        let x = x.broadcast_sub(&mean)?.broadcast_div(&std)?;
        let x = x.pad_with_zeros(2, 0, s - nh)?.pad_with_zeros(3, 0, s - nw)?;
        let embeddings = self.model.embed_image(&x)?;
        let original = (image.height() as usize, image.width() as usize);
        Ok(ImageEmbedding { embeddings, original, input: (nh, nw) })
    }

    /// Computes and keeps the image embedding (`set_image`); returns it, `[1, C, grid, grid]`.
    pub fn set_image(&mut self, image: &RgbImage) -> Result<&Tensor, SamError> {
        self.image = None;
        let state = self.embed(image)?;
        Ok(&self.image.insert(state).embeddings)
    }

    /// The embedding of the current image (`get_image_embedding`).
    pub fn image_embedding(&self) -> Result<&Tensor, SamError> {
        self.image.as_ref().map(|s| &s.embeddings).ok_or(SamError::NoImage)
    }

    /// `predict(point_coords, point_labels, box, mask_input, multimask_output)` for the current image.
    pub fn predict(&self, prompt: &Prompt) -> Result<Prediction, SamError> {
        let state = self.image.as_ref().ok_or(SamError::NoImage)?;
        self.predict_with(state, prompt)
    }

    /// `predict` against a given embedding (e.g. one kept in the service's resident LRU).
    pub fn predict_with(&self, state: &ImageEmbedding, prompt: &Prompt) -> Result<Prediction, SamError> {
        let mut one = self.predict_batch(state, std::slice::from_ref(prompt))?;
        Ok(one.remove(0))
    }

    /// `predict_with` for several prompts of one image, in input order. Prompts with the same number of
    /// sparse tokens (points, the padding point, box corners) and the same `multimask_output` are
    /// decoded together in one mask-decoder call, as `SamPredictor.predict_torch` decodes a batch.
    pub fn predict_batch(
        &self,
        state: &ImageEmbedding,
        prompts: &[Prompt],
    ) -> Result<Vec<Prediction>, SamError> {
        let encoded = prompts.iter().map(|p| self.encode_prompt(state, p)).collect::<Result<Vec<_>, _>>()?;
        // Groups in order of first appearance: (tokens, multimask) → prompt indices.
        let mut groups: Vec<((usize, bool), Vec<usize>)> = Vec::new();
        for (i, (sparse, _, multimask)) in encoded.iter().enumerate() {
            let key = (sparse.dim(1)?, *multimask);
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, members)) => members.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let mut out: Vec<Option<Prediction>> = vec![None; prompts.len()];
        for ((_, multimask), members) in groups {
            let sparse = Tensor::cat(&members.iter().map(|&i| &encoded[i].0).collect::<Vec<_>>(), 0)?;
            let dense = Tensor::cat(&members.iter().map(|&i| &encoded[i].1).collect::<Vec<_>>(), 0)?;
            let pe = &self.model.prompt_encoder;
            let (low_res, iou) = self.model.mask_decoder.forward(
                &state.embeddings,
                &pe.dense_pe()?,
                &sparse,
                &dense,
                multimask,
            )?;
            let k = low_res.dim(1)?;
            let low_res = low_res.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let iou = iou.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            let plane = k * self.model.config.low_res_size().pow(2);
            for (j, &i) in members.iter().enumerate() {
                let logits = low_res[j * plane..(j + 1) * plane].to_vec();
                out[i] = Some(self.prediction(state, k, logits, iou[j * k..(j + 1) * k].to_vec())?);
            }
        }
        Ok(out.into_iter().map(|p| p.expect("every prompt is in one group. This is a bug.")).collect())
    }

    /// The prompt encoder's `(sparse [1, T, C], dense [1, C, g, g])` embeddings of a validated prompt
    /// and its `multimask_output`.
    fn encode_prompt(
        &self,
        state: &ImageEmbedding,
        prompt: &Prompt,
    ) -> Result<(Tensor, Tensor, bool), SamError> {
        let lr = self.model.config.low_res_size();
        let valid = prompt.validate_in_image(lr, state.original)?;
        let (oh, ow) = state.original;
        let (ih, iw) = state.input;
        // apply_coords: per-axis scale in float64, then float32 tensors.
        let (sx, sy) = (iw as f64 / ow as f64, ih as f64 / oh as f64);
        let tx = |x: f64| (x * sx) as f32;
        let ty = |y: f64| (y * sy) as f32;
        let coords: Option<Vec<[f32; 2]>> =
            valid.points.as_ref().map(|(xy, _)| xy.iter().map(|p| [tx(p[0]), ty(p[1])]).collect());
        let points = coords.as_deref().zip(valid.points.as_ref().map(|(_, l)| l.as_slice()));
        let bbox = valid.box_xyxy.map(|b| [tx(b[0]), ty(b[1]), tx(b[2]), ty(b[3])]);
        let mask = match valid.mask_input {
            Some(m) => Some(Tensor::from_vec(m, (1, 1, lr, lr), &self.device)?),
            None => None,
        };
        let (sparse, dense) = self.model.prompt_encoder.forward(points, bbox, mask.as_ref())?;
        Ok((sparse, dense, valid.multimask_output))
    }

    /// One prompt's `[K, L, L]` low-res logits and `[K]` IoU predictions, post-processed to masks.
    fn prediction(
        &self,
        state: &ImageEmbedding,
        k: usize,
        low_res_logits: Vec<f32>,
        iou_predictions: Vec<f32>,
    ) -> Result<Prediction, SamError> {
        let cfg = &self.model.config;
        let lr = cfg.low_res_size();
        let (oh, ow) = state.original;
        let masks = postprocess_masks(
            &low_res_logits,
            k,
            lr,
            cfg.image_size,
            state.input,
            (oh, ow),
            cfg.mask_threshold,
        )?;
        Ok(Prediction {
            num_masks: k,
            height: oh,
            width: ow,
            masks,
            iou_predictions,
            low_res_size: lr,
            low_res_logits,
        })
    }
}

/// `Sam.postprocess_masks` followed by `> mask_threshold`: `[K, L, L]` logits → `[K, oh, ow]` 0/1.
pub fn postprocess_masks(
    low_res: &[f32],
    k: usize,
    lr: usize,
    image_size: usize,
    input: (usize, usize),
    original: (usize, usize),
    threshold: f64,
) -> Result<Vec<u8>, SamError> {
    let out = postprocess_logits(low_res, k, lr, image_size, input, original)?;
    let t = threshold as f32;
    Ok(out.iter().map(|&v| u8::from(v > t)).collect())
}

/// `Sam.postprocess_masks`: `[K, L, L]` low-res logits → `[K, oh, ow]` logits at the original size
/// (bilinear to the model input, crop the padding, bilinear to the original size).
pub fn postprocess_logits(
    low_res: &[f32],
    k: usize,
    lr: usize,
    image_size: usize,
    (ih, iw): (usize, usize),
    (oh, ow): (usize, usize),
) -> Result<Vec<f32>, SamError> {
    let full = torch_bilinear(low_res, k, lr, lr, image_size, image_size)?;
    let mut cropped = Vec::with_capacity(k * ih * iw);
    for plane in full.chunks_exact(image_size * image_size) {
        for row in plane.chunks_exact(image_size).take(ih) {
            cropped.extend_from_slice(&row[..iw]);
        }
    }
    Ok(torch_bilinear(&cropped, k, ih, iw, oh, ow)?)
}
