//! Image preprocessing of Osprey's inference scripts (docs/MODEL.md#image-preprocessing).
//!
//! `CLIPImageProcessor(size={"shortest_edge": S}, resample=BICUBIC, do_center_crop=False)` then
//! `F.interpolate(size=(S, S), mode="bilinear", align_corners=False)`:
//! 1. PIL bicubic resize of the 8-bit image so that the short side is S and the long side
//!    `int(S * long / short)` (truncated);
//! 2. `f32(u8 * (1/255))` (the multiplication in double precision, as numpy does);
//! 3. `(x - mean) / std` in f32 with the OpenAI CLIP statistics;
//! 4. a bilinear stretch (no antialias) of the normalised planes to S×S: no padding, no crop.

use candle_core::{Device, Tensor};
use osprey_common::resize::{PilFilter, pil_resize, torch_bilinear};

use crate::error::VisionError;

/// OpenAI CLIP normalisation statistics (`OPENAI_CLIP_MEAN`, `OPENAI_CLIP_STD`), written as the
/// Python decimals; numpy rounds them to the same f32 values.
#[allow(clippy::excessive_precision)]
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)]
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Widest aspect ratio accepted. The first resize keeps the aspect ratio, so a 1×16384 image would
/// grow to 512×8M pixels; this bounds the intermediate buffers (about 200 MB at S = 512).
pub const MAX_ASPECT_RATIO: usize = 64;

/// Size `(width, height)` of the first resize: short side `short_side`, long side
/// `int(short_side * long / short)`, as `transformers`' `get_resize_output_image_size`.
pub fn shortest_edge_size(width: usize, height: usize, short_side: usize) -> (usize, usize) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    // Python: `int(size * long / short)`, true division in double precision then truncation.
    let new_long = ((short_side * long) as f64 / short as f64) as usize;
    if width <= height { (short_side, new_long) } else { (new_long, short_side) }
}

/// The tower input of one image and the 8-bit resize it went through.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `[1, 3, S, S]` f32.
    pub pixel_values: Tensor,
    /// The PIL-bicubic resized image, RGB8 row-major, `resized_width x resized_height`.
    pub resized: Vec<u8>,
    pub resized_width: usize,
    pub resized_height: usize,
}

/// Preprocesses RGB8 pixels (row-major, `width x height`) for a tower of input side `image_size`.
pub fn preprocess(
    rgb: &[u8],
    width: usize,
    height: usize,
    image_size: usize,
    device: &Device,
) -> Result<Preprocessed, VisionError> {
    if width == 0 || height == 0 {
        return Err(VisionError::InvalidInput(format!("image is {width}x{height}")));
    }
    if width.max(height) > MAX_ASPECT_RATIO * width.min(height) {
        return Err(VisionError::InvalidInput(format!(
            "image is {width}x{height}; aspect ratios above {MAX_ASPECT_RATIO}:1 are not accepted"
        )));
    }
    let (rw, rh) = shortest_edge_size(width, height, image_size);
    let resized = pil_resize(rgb, width, height, 3, rw, rh, PilFilter::Bicubic)?;

    // Interleaved u8 to normalised planes [3, rh, rw].
    let plane = rw * rh;
    let mut planes = vec![0.0_f32; 3 * plane];
    for (p, px) in resized.chunks_exact(3).enumerate() {
        for c in 0..3 {
            let x = (f64::from(px[c]) * (1.0 / 255.0)) as f32;
            planes[c * plane + p] = (x - CLIP_MEAN[c]) / CLIP_STD[c];
        }
    }
    let stretched = torch_bilinear(&planes, 3, rh, rw, image_size, image_size)?;
    let pixel_values = Tensor::from_vec(stretched, (1, 3, image_size, image_size), device)?;
    Ok(Preprocessed { pixel_values, resized, resized_width: rw, resized_height: rh })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rule_truncates() {
        // 64 * 157 / 103 = 97.55: int() gives 97 (round would give 98).
        assert_eq!(shortest_edge_size(157, 103, 64), (97, 64));
        assert_eq!(shortest_edge_size(103, 157, 64), (64, 97));
        assert_eq!(shortest_edge_size(500, 375, 512), (682, 512));
        assert_eq!(shortest_edge_size(512, 512, 512), (512, 512));
    }

    #[test]
    fn rejects_degenerate_images() {
        let dev = Device::Cpu;
        assert!(preprocess(&[], 0, 5, 64, &dev).is_err());
        let thin = vec![0_u8; 3 * 200];
        assert!(matches!(preprocess(&thin, 200, 1, 64, &dev), Err(VisionError::InvalidInput(_))));
        let bad_len = vec![0_u8; 10];
        assert!(matches!(preprocess(&bad_len, 4, 4, 64, &dev), Err(VisionError::Resize(_))));
    }
}
