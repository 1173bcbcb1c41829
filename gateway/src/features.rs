//! The vision stage: region tokens of some regions of a prepared request (and, for an LLM replica
//! that lacks them, the image tokens), from the features resident on the routed vision replica,
//! else the shared cache, else a fresh encoding. Features never travel back to the replica that
//! computed them.

use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::mask::rle_to_worker;
use osprey_proto::v1::CacheTier;
use osprey_proto::worker::v1 as worker;

use crate::cache_entries::{blob_from_bytes, blob_to_bytes, features_key};
use crate::clients::resident_first;
use crate::deadline::Deadline;
use crate::images::RequestImage;
use crate::prepare::Prepared;
use crate::state::Gateway;

/// Region tokens for some of a request's regions.
pub struct Pooled {
    pub response: worker::PoolResponse,
    pub tier: CacheTier,
    pub encode_ns: u64,
    pub pool_ns: u64,
}

impl Pooled {
    /// `<mask>` tokens of rows `range` (rows are the pooled regions, in the order asked).
    pub fn mask_tokens(&self, range: std::ops::Range<usize>) -> Result<worker::Tensor, ServiceError> {
        rows(&self.response.mask_tokens, range)
    }

    /// `<pos>` tokens of rows `range`.
    pub fn pos_tokens(&self, range: std::ops::Range<usize>) -> Result<worker::Tensor, ServiceError> {
        rows(&self.response.pos_tokens, range)
    }
}

impl Gateway {
    /// Region tokens of the regions `indices` (rows in that order), without the image tokens.
    pub async fn pool(
        &self,
        prepared: &Prepared,
        indices: &[usize],
        deadline: Deadline,
    ) -> Result<Pooled, ServiceError> {
        let request = worker::PoolRequest {
            image_key: prepared.image.key.clone(),
            features: None,
            masks: indices.iter().map(|&i| rle_to_worker(&prepared.masks[i].to_rle())).collect(),
            return_image_tokens: false,
        };
        self.pool_request(&prepared.image, request, deadline).await
    }

    /// The image's tokens for the LLM with the feature revision that names them, as vision's
    /// answer (for an LLM replica that does not keep them).
    pub async fn image_tokens(
        &self,
        image: &RequestImage,
        deadline: Deadline,
    ) -> Result<worker::PoolResponse, ServiceError> {
        let request = worker::PoolRequest {
            image_key: image.key.clone(),
            features: None,
            masks: vec![],
            return_image_tokens: true,
        };
        let response = self.pool_request(image, request, deadline).await?.response;
        if response.image_tokens.is_none() {
            return Err(ServiceError::Internal("vision worker sent no image tokens".into()));
        }
        Ok(response)
    }

    /// `request` (without features) on the routed vision replica, with the features sent only when
    /// that replica does not hold them.
    async fn pool_request(
        &self,
        image: &RequestImage,
        request: worker::PoolRequest,
        deadline: Deadline,
    ) -> Result<Pooled, ServiceError> {
        let start = Instant::now();
        let resident = async {
            let response = self.vision.pool(deadline, &request).await?;
            Ok(Pooled { response, tier: CacheTier::Resident, encode_ns: 0, pool_ns: elapsed_ns(start) })
        };
        resident_first(resident, async || {
            let with_blob = |blob| worker::PoolRequest { features: Some(blob), ..request.clone() };
            if let Some(blob) = self.shared_features(&image.key).await {
                let encode_ns = elapsed_ns(start);
                match self.vision.pool(deadline, &with_blob(blob)).await {
                    // The replica refuses features of another feature revision than its own (its
                    // weights changed under the same `--model-revision`, so under the same image
                    // key): they are computed again below, and replace the shared entry.
                    Err(ServiceError::FailedPrecondition(why)) => {
                        tracing::info!(%why, "shared features not usable here; encoding again");
                    }
                    response => {
                        let pool_ns = elapsed_ns(start).saturating_sub(encode_ns);
                        return Ok(Pooled {
                            response: response?,
                            tier: CacheTier::Shared,
                            encode_ns,
                            pool_ns,
                        });
                    }
                }
            }
            let blob = self.encode(image, deadline).await?;
            let encode_ns = elapsed_ns(start);
            // The replica that encoded keeps the features resident: pool there without them, and
            // send the blob only if another replica answers.
            let response = resident_first(self.vision.pool(deadline, &request), async || {
                self.vision.pool(deadline, &with_blob(blob)).await
            })
            .await?;
            let pool_ns = elapsed_ns(start).saturating_sub(encode_ns);
            Ok(Pooled { response, tier: CacheTier::Computed, encode_ns, pool_ns })
        })
        .await
    }

    /// The image's features from the shared cache, if present and intact.
    async fn shared_features(&self, image_key: &str) -> Option<worker::FeatureBlob> {
        let key = features_key(image_key);
        self.cache.get(&key).await.and_then(|bytes| blob_from_bytes(&key, &bytes))
    }

    /// Makes sure the image's features are computed (RegisterImage with `warm_features`): present in
    /// the shared cache, or encoded now on the routed vision replica, which keeps them resident, and
    /// stored there; answers where they were found.
    pub async fn warm_features(
        &self,
        image: &RequestImage,
        deadline: Deadline,
    ) -> Result<CacheTier, ServiceError> {
        if self.shared_features(&image.key).await.is_some() {
            return Ok(CacheTier::Shared);
        }
        self.encode(image, deadline).await?;
        Ok(CacheTier::Computed)
    }

    /// Encodes the image on its routed vision replica (which keeps the features resident) and
    /// stores the blob in the shared cache.
    async fn encode(
        &self,
        image: &RequestImage,
        deadline: Deadline,
    ) -> Result<worker::FeatureBlob, ServiceError> {
        let request = worker::EncodeRequest {
            image_key: image.key.clone(),
            image: Some(image.wire_pixels(&self.cache).await?),
            return_features: true,
        };
        let blob = self
            .vision
            .encode(deadline, &request)
            .await?
            .features
            .ok_or_else(|| ServiceError::Internal("vision worker sent no features".into()))?;
        let key = features_key(&image.key);
        self.cache.put(&key, blob_to_bytes(&key, &blob)).await;
        Ok(blob)
    }
}

/// Rows `range` of an f32 `[N, C]` wire tensor.
fn rows(
    tensor: &Option<worker::Tensor>,
    range: std::ops::Range<usize>,
) -> Result<worker::Tensor, ServiceError> {
    let tensor = tensor
        .as_ref()
        .ok_or_else(|| ServiceError::Internal("vision worker sent no region tokens".into()))?;
    let width =
        *tensor.shape.get(1).ok_or_else(|| ServiceError::Internal("region tokens are not [N, C]".into()))?
            as usize;
    let bytes = tensor
        .data
        .get(range.start * width * 4..range.end * width * 4)
        .ok_or_else(|| ServiceError::Internal("fewer region tokens than regions".into()))?;
    Ok(worker::Tensor {
        shape: vec![range.len() as u64, width as u64],
        dtype: tensor.dtype,
        data: bytes.to_vec(),
    })
}

fn elapsed_ns(start: Instant) -> u64 {
    start.elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_of_a_wire_tensor() {
        let data: Vec<u8> = (0..3 * 2).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let tensor = Some(worker::Tensor { shape: vec![3, 2], dtype: 0, data });
        let middle = rows(&tensor, 1..2).unwrap();
        assert_eq!(middle.shape, [1, 2]);
        let values: Vec<f32> =
            middle.data.chunks(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        assert_eq!(values, [2.0, 3.0]);
        assert!(rows(&tensor, 2..4).is_err());
        assert!(rows(&None, 0..1).is_err());
    }
}
