//! Image decoding with limits checked before any pixel buffer is allocated, and the image key.
//!
//! Decoded pixels must equal what PIL gives (`ImageOps.exif_transpose(Image.open(f)).convert("RGB")`),
//! because real-weight outputs move visibly with ±1 pixel changes; `tests/image_decode.rs` checks
//! this against PIL fixtures made by `tools/make_codec_fixtures.py`.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader};

/// Version of everything between decoded pixels and model input that is not part of the model
/// weights (decoding, resizing). Part of the image key: bump it when that arithmetic changes.
pub const PREPROCESSING_VERSION: &str = "osprey-preprocess-1";

/// Size limits applied to every image (and PNG mask) before decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded file accepted, in bytes.
    pub max_bytes: usize,
    /// Largest decoded image accepted, in pixels (width × height).
    pub max_pixels: u64,
    /// Largest width or height accepted.
    pub max_side: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        Self { max_bytes: 32 << 20, max_pixels: 40_000_000, max_side: 16_384 }
    }
}

/// Why an image could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("image is empty")]
    Empty,
    #[error("image is {size} bytes, over the limit of {limit} bytes")]
    TooManyBytes { size: usize, limit: usize },
    #[error("unrecognised image format (PNG, JPEG and WebP are accepted)")]
    UnknownFormat,
    #[error("{0:?} images are not accepted (PNG, JPEG and WebP are)")]
    UnsupportedFormat(ImageFormat),
    #[error("image is {width}x{height}, over the limit of {limit} pixels or {max_side} per side")]
    TooLarge { width: u32, height: u32, limit: u64, max_side: u32 },
    #[error("image has a zero dimension ({width}x{height})")]
    ZeroSize { width: u32, height: u32 },
    #[error("malformed image: {0}")]
    Malformed(String),
}

/// Decoded 8-bit RGB pixels, row-major, no padding.
#[derive(Clone, PartialEq, Eq)]
pub struct RgbImage {
    width: u32,
    height: u32,
    pixels: Vec<u8>,
}

impl std::fmt::Debug for RgbImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RgbImage({}x{})", self.width, self.height)
    }
}

impl RgbImage {
    /// Wraps raw RGB8 pixels, checking the length.
    pub fn from_raw(width: u32, height: u32, pixels: Vec<u8>) -> Result<Self, ImageError> {
        if width == 0 || height == 0 {
            return Err(ImageError::ZeroSize { width, height });
        }
        let expected = width as usize * height as usize * 3;
        if pixels.len() != expected {
            return Err(ImageError::Malformed(format!(
                "{width}x{height} RGB needs {expected} bytes, got {}",
                pixels.len()
            )));
        }
        Ok(Self { width, height, pixels })
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    /// RGB8 pixels, row-major.
    pub fn pixels(&self) -> &[u8] {
        &self.pixels
    }

    pub fn into_pixels(self) -> Vec<u8> {
        self.pixels
    }

    /// The cache key of this image for a given model revision (docs/ARCHITECTURE.md#image-keys): BLAKE3 over
    /// the dimensions, the preprocessing version, the model revision and the pixels.
    pub fn key(&self, model_revision: &str) -> String {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"osprey-image-key\0");
        hasher.update(&self.width.to_le_bytes());
        hasher.update(&self.height.to_le_bytes());
        for part in [PREPROCESSING_VERSION, model_revision] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        hasher.update(&self.pixels);
        hasher.finalize().to_hex().to_string()
    }
}

/// Decodes a PNG, JPEG or WebP file to RGB8, applying EXIF orientation.
///
/// The dimensions are read from the header and checked against `limits` before the pixels are
/// decoded, so a small file that declares a huge image (a decompression bomb) is refused cheaply.
pub fn decode_image(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    let decoded = decode_dynamic(bytes, limits)?;
    let (width, height) = (decoded.width(), decoded.height());
    RgbImage::from_raw(width, height, to_rgb8_like_pil(decoded))
}

/// Decodes with the limits checked, EXIF orientation applied, pixel format untouched.
pub(crate) fn decode_dynamic(bytes: &[u8], limits: &ImageLimits) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(ImageError::TooManyBytes { size: bytes.len(), limit: limits.max_bytes });
    }
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ImageError::Malformed(e.to_string()))?;
    let format = match reader.format() {
        None => return Err(ImageError::UnknownFormat),
        Some(format @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => format,
        Some(other) => return Err(ImageError::UnsupportedFormat(other)),
    };
    let mut decoder = reader.into_decoder().map_err(malformed)?;
    let (width, height) = decoder.dimensions();
    check_dimensions(width, height, limits)?;
    let orientation = decoder.orientation().map_err(malformed)?;
    // The decoder's own allocation cap, as a second guard behind the header check.
    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_side);
    decoder_limits.max_image_height = Some(limits.max_side);
    decoder_limits.max_alloc = Some(limits.max_pixels.saturating_mul(16));
    decoder.set_limits(decoder_limits).map_err(malformed)?;
    let mut image = if matches!(format, ImageFormat::Jpeg) {
        drop(decoder);
        decode_jpeg_like_pil(bytes, width, height)?
    } else {
        DynamicImage::from_decoder(decoder).map_err(malformed)?
    };
    image.apply_orientation(orientation);
    Ok(image)
}

/// Decodes a JPEG with libjpeg-turbo's own code (mozjpeg's fork, islow IDCT, fancy upsampling:
/// PIL's defaults), so the pixels are PIL's bit for bit. A file that ends early is an error, as
/// in PIL; libjpeg's other warnings are ignored, as in PIL.
fn decode_jpeg_like_pil(bytes: &[u8], width: u32, height: u32) -> Result<DynamicImage, ImageError> {
    use mozjpeg_sys::{
        J_COLOR_SPACE as ColorSpace, J_MESSAGE_CODE, JWRN_JPEG_EOF, jpeg_common_struct, jpeg_error_mgr,
        jpeg_std_error,
    };
    use std::os::raw::c_int;

    // libjpeg reports errors through callbacks; they unwind back to `catch_unwind` below.
    extern "C-unwind" fn error_exit(cinfo: &mut jpeg_common_struct) {
        // SAFETY: libjpeg always sets `err` before calling its callbacks.
        let code = unsafe { (*cinfo.err).msg_code };
        std::panic::resume_unwind(Box::new(format!("libjpeg error {code}")));
    }
    extern "C-unwind" fn emit_message(cinfo: &mut jpeg_common_struct, level: c_int) {
        // SAFETY: as above.
        let code = unsafe { (*cinfo.err).msg_code };
        if level < 0 && code == JWRN_JPEG_EOF as J_MESSAGE_CODE as c_int {
            std::panic::resume_unwind(Box::new("the file ends before the image data does".to_string()));
        }
    }

    let decoded = std::panic::catch_unwind(|| -> std::io::Result<Vec<u8>> {
        // SAFETY: jpeg_std_error fully initialises the zeroed struct.
        let mut errors: jpeg_error_mgr = unsafe { std::mem::zeroed() };
        unsafe { jpeg_std_error(&mut errors) };
        errors.error_exit = Some(error_exit);
        errors.emit_message = Some(emit_message);
        let decompress = mozjpeg::Decompress::with_err(errors).from_mem(bytes)?;
        let four_channel = matches!(decompress.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
        if four_channel {
            // libjpeg cannot convert CMYK to RGB; it gives CMYK (undoing YCCK itself), as to PIL.
            let mut started = decompress.to_colorspace(ColorSpace::JCS_CMYK)?;
            let cmyk = started.read_scanlines::<u8>()?;
            started.finish()?;
            Ok(adobe_cmyk_to_rgb_like_pil(&cmyk))
        } else {
            let mut started = decompress.rgb()?;
            let pixels = started.read_scanlines::<u8>()?;
            started.finish()?;
            Ok(pixels)
        }
    });
    let pixels = match decoded {
        Ok(Ok(pixels)) => pixels,
        Ok(Err(err)) => return Err(ImageError::Malformed(err.to_string())),
        Err(payload) => {
            let message =
                payload.downcast_ref::<String>().cloned().unwrap_or_else(|| "libjpeg failed".into());
            return Err(ImageError::Malformed(message));
        }
    };
    image::RgbImage::from_raw(width, height, pixels)
        .map(DynamicImage::ImageRgb8)
        .ok_or_else(|| ImageError::Malformed("JPEG data does not match its header's size".into()))
}

/// CMYK samples from a 4-channel JPEG to RGB as PIL does it. PIL reads every CMYK JPEG with
/// Adobe's polarity (stored samples inverted, raw mode `CMYK;I`, whatever the file's markers say),
/// then converts each channel as `(255 - k) - round((255 - k) * c / 255)` with its integer
/// rounding of the product; `tools/make_codec_fixtures.py` checks the formula on every (c, k) pair.
fn adobe_cmyk_to_rgb_like_pil(stored: &[u8]) -> Vec<u8> {
    let mut rgb = Vec::with_capacity(stored.len() / 4 * 3);
    for pixel in stored.chunks_exact(4) {
        let not_k = u32::from(pixel[3]);
        for &stored_ink in &pixel[..3] {
            let ink = 255 - u32::from(stored_ink);
            let product = ink * not_k + 128;
            let scaled = ((product >> 8) + product) >> 8;
            rgb.push((not_k - scaled) as u8);
        }
    }
    rgb
}

fn check_dimensions(width: u32, height: u32, limits: &ImageLimits) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSize { width, height });
    }
    if width as u64 * height as u64 > limits.max_pixels || width > limits.max_side || height > limits.max_side
    {
        return Err(ImageError::TooLarge {
            width,
            height,
            limit: limits.max_pixels,
            max_side: limits.max_side,
        });
    }
    Ok(())
}

fn malformed(err: image::ImageError) -> ImageError {
    ImageError::Malformed(err.to_string())
}

/// RGB8 as PIL's `convert("RGB")` makes it: alpha is dropped (not composited), grey is
/// replicated, and 16-bit samples keep their high byte (PIL truncates rather than rounds).
fn to_rgb8_like_pil(image: DynamicImage) -> Vec<u8> {
    match image {
        DynamicImage::ImageRgb8(rgb) => rgb.into_raw(),
        DynamicImage::ImageRgb16(rgb) => rgb.into_raw().iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => other.to_rgb8().into_raw(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_depends_on_pixels_size_and_revision() {
        let a = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let b = RgbImage::from_raw(1, 2, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let c = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 7]).unwrap();
        assert_eq!(a.key("r1"), a.clone().key("r1"));
        assert_eq!(a.key("r1").len(), 64);
        assert_ne!(a.key("r1"), b.key("r1"));
        assert_ne!(a.key("r1"), c.key("r1"));
        assert_ne!(a.key("r1"), a.key("r2"));
    }

    #[test]
    fn raw_length_is_checked() {
        assert!(matches!(RgbImage::from_raw(2, 2, vec![0; 11]), Err(ImageError::Malformed(_))));
        assert!(matches!(RgbImage::from_raw(0, 2, vec![]), Err(ImageError::ZeroSize { .. })));
    }

    #[test]
    fn byte_limit_is_checked_before_decoding() {
        let limits = ImageLimits { max_bytes: 10, ..ImageLimits::default() };
        assert_eq!(decode_image(&[0u8; 11], &limits), Err(ImageError::TooManyBytes { size: 11, limit: 10 }));
        assert_eq!(decode_image(&[], &limits), Err(ImageError::Empty));
    }
}
