//! The one place where public (`osprey.v1`) and internal worker (`osprey.worker.v1`) messages map
//! into each other. The worker package imports nothing public, so the gateway converts what it
//! forwards: SAM prompts and parameters on the way in, proposed masks and finish reasons on the
//! way out, and the public `DescribeTask` into the LLM's `RegionTask`.
//!
//! Enum values the public side does not know are passed through unchanged, so the worker that
//! validates them answers with its own INVALID_ARGUMENT.

use crate::v1;
use crate::worker::v1 as worker;

impl From<v1::DescribeTask> for worker::RegionTask {
    fn from(task: v1::DescribeTask) -> Self {
        match task {
            v1::DescribeTask::Short => Self::Short,
            v1::DescribeTask::Detailed => Self::Detailed,
            v1::DescribeTask::Category => Self::Category,
        }
    }
}

impl From<worker::FinishReason> for v1::FinishReason {
    fn from(reason: worker::FinishReason) -> Self {
        match reason {
            worker::FinishReason::Unspecified => Self::Unspecified,
            worker::FinishReason::Eos => Self::Eos,
            worker::FinishReason::Length => Self::Length,
        }
    }
}

/// A worker's `finish_reason` field as the public field's value.
pub fn public_finish_reason(worker_reason: i32) -> i32 {
    let reason = worker::FinishReason::try_from(worker_reason).unwrap_or_default();
    v1::FinishReason::from(reason) as i32
}

impl From<v1::GenerationParameters> for worker::GenerationParameters {
    fn from(p: v1::GenerationParameters) -> Self {
        let v1::GenerationParameters { max_new_tokens, temperature, top_p, top_k, seed } = p;
        Self { max_new_tokens, temperature, top_p, top_k, seed }
    }
}

fn point_label(label: i32) -> i32 {
    match v1::PointLabel::try_from(label) {
        Ok(v1::PointLabel::Foreground) => worker::PointLabel::Foreground as i32,
        Ok(v1::PointLabel::Background) => worker::PointLabel::Background as i32,
        Err(_) => label,
    }
}

fn public_point_label(label: i32) -> i32 {
    match worker::PointLabel::try_from(label) {
        Ok(worker::PointLabel::Foreground) => v1::PointLabel::Foreground as i32,
        Ok(worker::PointLabel::Background) => v1::PointLabel::Background as i32,
        Err(_) => label,
    }
}

impl From<v1::Point> for worker::Point {
    fn from(p: v1::Point) -> Self {
        Self { x: p.x, y: p.y, label: point_label(p.label) }
    }
}

impl From<worker::Point> for v1::Point {
    fn from(p: worker::Point) -> Self {
        Self { x: p.x, y: p.y, label: public_point_label(p.label) }
    }
}

impl From<v1::LowResLogits> for worker::LowResLogits {
    fn from(l: v1::LowResLogits) -> Self {
        Self { height: l.height, width: l.width, values: l.values }
    }
}

impl From<worker::LowResLogits> for v1::LowResLogits {
    fn from(l: worker::LowResLogits) -> Self {
        Self { height: l.height, width: l.width, values: l.values }
    }
}

impl From<v1::SamPrompt> for worker::SamPrompt {
    fn from(p: v1::SamPrompt) -> Self {
        Self {
            points: p.points.into_iter().map(Into::into).collect(),
            r#box: p.r#box.map(|b| worker::BoxXyxy { x0: b.x0, y0: b.y0, x1: b.x1, y1: b.y1 }),
            mask_input: p.mask_input.map(Into::into),
            multimask_output: p.multimask_output,
        }
    }
}

impl From<v1::EverythingParams> for worker::EverythingParams {
    fn from(p: v1::EverythingParams) -> Self {
        let v1::EverythingParams {
            points_per_side,
            points_per_batch,
            pred_iou_thresh,
            stability_score_thresh,
            stability_score_offset,
            box_nms_thresh,
            crop_n_layers,
            crop_nms_thresh,
            crop_overlap_ratio,
            crop_n_points_downscale_factor,
            min_mask_region_area,
            max_masks,
        } = p;
        Self {
            points_per_side,
            points_per_batch,
            pred_iou_thresh,
            stability_score_thresh,
            stability_score_offset,
            box_nms_thresh,
            crop_n_layers,
            crop_nms_thresh,
            crop_overlap_ratio,
            crop_n_points_downscale_factor,
            min_mask_region_area,
            max_masks,
        }
    }
}

impl From<worker::RleMask> for v1::RleMask {
    fn from(m: worker::RleMask) -> Self {
        Self { height: m.height, width: m.width, counts: Some(v1::rle_mask::Counts::Compressed(m.counts)) }
    }
}

impl From<worker::ProposedMask> for v1::ProposedMask {
    fn from(m: worker::ProposedMask) -> Self {
        Self {
            mask: m.mask.map(Into::into),
            area: m.area,
            bbox: m.bbox_xywh,
            predicted_iou: m.predicted_iou,
            stability_score: m.stability_score,
            point: m.point.map(Into::into),
            crop_box: m.crop_box_xywh,
            low_res_logits: m.low_res_logits.map(Into::into),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_keep_every_field_and_unknown_labels() {
        let public = v1::SamPrompt {
            points: vec![
                v1::Point { x: 1.0, y: 2.0, label: v1::PointLabel::Background as i32 },
                v1::Point { x: 3.0, y: 4.0, label: 7 },
            ],
            r#box: Some(v1::Box { x0: 1.0, y0: 2.0, x1: 5.0, y1: 6.0 }),
            mask_input: Some(v1::LowResLogits { height: 1, width: 2, values: vec![0.5, -0.5] }),
            multimask_output: true,
        };
        let internal = worker::SamPrompt::from(public);
        assert_eq!(internal.points[0].label(), worker::PointLabel::Background);
        assert_eq!(internal.points[1].label, 7, "an unknown label reaches the worker, which refuses it");
        assert_eq!(internal.r#box, Some(worker::BoxXyxy { x0: 1.0, y0: 2.0, x1: 5.0, y1: 6.0 }));
        assert_eq!(internal.mask_input.unwrap().values, [0.5, -0.5]);
        assert!(internal.multimask_output);
    }

    #[test]
    fn proposed_masks_keep_both_box_conventions_apart() {
        let proposed = worker::ProposedMask {
            mask: Some(worker::RleMask { height: 4, width: 5, counts: "52".into() }),
            area: 9,
            bbox_xywh: vec![1.0, 1.0, 2.0, 2.0],
            crop_box_xywh: vec![0.0, 0.0, 5.0, 4.0],
            point: Some(worker::Point { x: 2.0, y: 2.0, label: worker::PointLabel::Foreground as i32 }),
            ..Default::default()
        };
        let public = v1::ProposedMask::from(proposed);
        assert_eq!(public.bbox, [1.0, 1.0, 2.0, 2.0]);
        assert_eq!(public.crop_box, [0.0, 0.0, 5.0, 4.0]);
        let mask = public.mask.unwrap();
        assert_eq!((mask.height, mask.width), (4, 5));
        assert_eq!(mask.counts, Some(v1::rle_mask::Counts::Compressed("52".into())));
        assert_eq!(public.point.unwrap().label(), v1::PointLabel::Foreground);
    }

    #[test]
    fn tasks_and_finish_reasons_map_one_to_one() {
        assert_eq!(worker::RegionTask::from(v1::DescribeTask::Short), worker::RegionTask::Short);
        assert_eq!(worker::RegionTask::from(v1::DescribeTask::Detailed), worker::RegionTask::Detailed);
        assert_eq!(worker::RegionTask::from(v1::DescribeTask::Category), worker::RegionTask::Category);
        let done = worker::GenerateResponse {
            finish_reason: worker::FinishReason::Length as i32,
            ..Default::default()
        };
        assert_eq!(public_finish_reason(done.finish_reason), v1::FinishReason::Length as i32);
    }
}
