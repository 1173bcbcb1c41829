//! The first stage of Describe, Ask, Chat and Annotate: the request's image resolved and every
//! region made a mask (the client's masks decoded; SAM prompts and everything mode through the
//! SAM replica that holds the image's embedding).

use std::time::Instant;

use osprey_common::ServiceError;
use osprey_common::mask::{Mask, rle_from_worker};
use osprey_proto::v1::{self, CacheTier};
use osprey_proto::worker::v1 as worker;

use crate::deadline::Deadline;
use crate::images::RequestImage;
use crate::request::{RegionSource, RegionsInput, region_masks};
use crate::state::Gateway;

/// A request's image and the masks of its regions (SAM's RLE kept for masks it made, to send back).
pub struct Prepared {
    pub image: RequestImage,
    pub masks: Vec<Mask>,
    pub labels: Vec<String>,
    pub sam_masks: Vec<Option<v1::RleMask>>,
    pub sam_ns: u64,
    pub sam_tier: CacheTier,
}

impl Gateway {
    pub async fn prepare(&self, input: RegionsInput, deadline: Deadline) -> Result<Prepared, ServiceError> {
        let RegionsInput { image, sources, mut labels, everything } = input;
        let image = RequestImage::resolve(image, &self.cache, &self.model_revision).await?;
        let mut masks = region_masks(&sources, image.height, image.width, &self.limits)?;
        let prompts: Vec<(usize, worker::SamPrompt)> = sources
            .into_iter()
            .enumerate()
            .filter_map(|(i, source)| match source {
                RegionSource::Prompt(prompt) => Some((i, prompt)),
                RegionSource::Mask(_) => None,
            })
            .collect();
        let mut sam_masks: Vec<Option<v1::RleMask>> = vec![None; masks.len()];
        let start = Instant::now();
        let mut sam_tier = CacheTier::Unspecified;
        if !prompts.is_empty() {
            let request = worker::PredictRequest {
                image_key: image.key.clone(),
                image: None,
                prompts: prompts.iter().map(|(_, p)| p.clone()).collect(),
                // A region needs only its mask.
                return_low_res_logits: false,
            };
            let response = self
                .sam
                .predict(deadline, request, async || image.wire_pixels(&self.cache).await)
                .await
                .map_err(|e| prompt_field(e, &prompts))?;
            sam_tier = tier(response.was_resident);
            for ((i, _), result) in prompts.iter().zip(response.prompts) {
                let best = result
                    .masks
                    .into_iter()
                    .max_by(|a, b| a.predicted_iou.total_cmp(&b.predicted_iou))
                    .and_then(|m| m.mask)
                    .ok_or_else(|| ServiceError::Internal("SAM returned no mask for a prompt".into()))?;
                masks[*i] = Some(sam_mask(&best)?);
                sam_masks[*i] = Some(best.into());
            }
        }
        if let Some(params) = everything {
            let request =
                worker::EverythingRequest { image_key: image.key.clone(), image: None, params: Some(params) };
            let response =
                self.sam.everything(deadline, request, async || image.wire_pixels(&self.cache).await).await?;
            sam_tier = tier(response.was_resident);
            for (k, proposed) in response.masks.into_iter().enumerate() {
                let rle = proposed
                    .mask
                    .ok_or_else(|| ServiceError::Internal("SAM sent a mask without RLE".into()))?;
                masks.push(Some(sam_mask(&rle)?));
                labels.push(format!("everything {k}"));
                sam_masks.push(Some(rle.into()));
            }
        }
        let masks =
            masks.into_iter().map(|m| m.expect("every region has a mask by now. This is a bug.")).collect();
        let sam_ns = if sam_tier == CacheTier::Unspecified { 0 } else { start.elapsed().as_nanos() as u64 };
        Ok(Prepared { image, masks, labels, sam_masks, sam_ns, sam_tier })
    }
}

/// Where SAM's embedding came from.
pub fn tier(was_resident: bool) -> CacheTier {
    if was_resident { CacheTier::Resident } else { CacheTier::Computed }
}

/// A mask SAM made, decoded (its size is the image's by construction).
fn sam_mask(rle: &worker::RleMask) -> Result<Mask, ServiceError> {
    rle_from_worker(rle)
        .map(|r| r.to_mask())
        .map_err(|e| ServiceError::Internal(format!("SAM sent a malformed mask: {e}")))
}

/// The SAM worker names prompts by their index in its request (`prompts[j]...`); the client knows
/// them as `regions[i].prompt...`.
fn prompt_field(err: ServiceError, prompts: &[(usize, worker::SamPrompt)]) -> ServiceError {
    match err {
        ServiceError::InvalidField { field, problem } => {
            let renamed = field.strip_prefix("prompts[").and_then(|rest| {
                let (j, tail) = rest.split_once(']')?;
                let (i, _) = prompts.get(j.parse::<usize>().ok()?)?;
                Some(format!("regions[{i}].prompt{tail}"))
            });
            ServiceError::InvalidField { field: renamed.unwrap_or(field), problem }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sam_prompt_errors_name_the_client_region() {
        let prompts = vec![(2, worker::SamPrompt::default()), (5, worker::SamPrompt::default())];
        let err = prompt_field(ServiceError::invalid("prompts[1].points[0]", "outside the image"), &prompts);
        assert_eq!(err, ServiceError::invalid("regions[5].prompt.points[0]", "outside the image"));
        let other = ServiceError::invalid("image", "bad");
        assert_eq!(prompt_field(other.clone(), &prompts), other);
    }
}
