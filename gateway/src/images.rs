//! The image of a request as the pipeline sees it: its key and size always, its pixels only when
//! a stage needs them (a registered image's pixels stay in the cache until then).

use std::sync::Arc;

use osprey_common::ServiceError;
use osprey_common::image::RgbImage;
use osprey_proto::worker::v1 as worker;
use tokio::sync::OnceCell;

use crate::cache::FeatureCache;
use crate::cache_entries::{PIXELS_HEADER_BYTES, pixels_from_bytes, pixels_key, size_from_header};
use crate::request::ImageInput;

pub struct RequestImage {
    pub key: String,
    pub width: u32,
    pub height: u32,
    pixels: OnceCell<Arc<RgbImage>>,
}

impl RequestImage {
    /// A decoded image is keyed here; a registered one is looked up by its size alone.
    pub async fn resolve(
        input: ImageInput,
        cache: &FeatureCache,
        model_revision: &str,
    ) -> Result<Self, ServiceError> {
        match input {
            ImageInput::Decoded(image) => Ok(Self::decoded(image, model_revision)),
            ImageInput::Registered(key) => {
                let header = cache.get_prefix(&pixels_key(&key), PIXELS_HEADER_BYTES).await;
                let (width, height) = size_from_header(&header.ok_or_else(|| unregistered(&key))?)?;
                Ok(Self { key, width, height, pixels: OnceCell::new() })
            }
        }
    }

    pub fn decoded(image: RgbImage, model_revision: &str) -> Self {
        let key = image.key(model_revision);
        let (width, height) = (image.width(), image.height());
        Self { key, width, height, pixels: OnceCell::new_with(Some(Arc::new(image))) }
    }

    /// The pixels, read from the cache the first time a registered image's are needed.
    pub async fn pixels(&self, cache: &FeatureCache) -> Result<Arc<RgbImage>, ServiceError> {
        self.pixels
            .get_or_try_init(async || {
                let key = pixels_key(&self.key);
                let bytes = cache.get(&key).await.ok_or_else(|| unregistered(&self.key))?;
                let image = pixels_from_bytes(&key, &bytes)?;
                if (image.width(), image.height()) != (self.width, self.height) {
                    return Err(ServiceError::FailedPrecondition(
                        "the registered image is damaged in the cache; register it again".into(),
                    ));
                }
                Ok(Arc::new(image))
            })
            .await
            .cloned()
    }

    /// The pixels as a worker request carries them.
    pub async fn wire_pixels(&self, cache: &FeatureCache) -> Result<worker::RgbImage, ServiceError> {
        let image = self.pixels(cache).await?;
        Ok(worker::RgbImage { width: image.width(), height: image.height(), rgb: image.pixels().to_vec() })
    }
}

fn unregistered(key: &str) -> ServiceError {
    ServiceError::FailedPrecondition(format!(
        "image.key: no registered image {key:?} (unknown or expired); send the image bytes or register it again"
    ))
}
