//! The SAM worker over real gRPC on loopback: health after warm-up, Embed/Predict against the
//! reference fixtures, the resident LRU (a second Predict on the same image key skips the encoder),
//! Everything, and bad input answered with INVALID_ARGUMENT naming the field.

mod common;

use common::*;
use osprey_common::error::StatusExt;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::rle_from_worker;
use osprey_proto::worker::v1::sam_client::SamClient;
use osprey_proto::worker::v1::{
    BoxXyxy, EmbedRequest, EverythingParams, EverythingRequest, LowResLogits, Point, PointLabel,
    PredictRequest, ProposedMask, RgbImage, SamPrompt,
};
use osprey_test_support::{InProcess, parse_args, serve_in_process};
use sam_worker::service::{ServeArgs, run};
use tonic::Code;
use tonic::transport::Channel;

/// Starts a worker on a free loopback port; returns a client once health says SERVING (the
/// worker stops when the returned handle is dropped).
async fn start_worker(extra: &[&str]) -> (SamClient<Channel>, InProcess) {
    let (weights, config) = (fixture("tiny_sam.safetensors"), fixture("tiny_config.json"));
    let mut argv =
        vec!["sam-worker", "--weights", weights.to_str().unwrap(), "--config", config.to_str().unwrap()];
    argv.extend_from_slice(extra);
    let args: ServeArgs = parse_args(argv);
    let server = serve_in_process(|listener, stopped| run(args, listener, stopped)).await;
    (SamClient::connect(server.url.clone()).await.unwrap(), server)
}

fn photo() -> RgbImage {
    let image = decode_image(&std::fs::read(fixture("photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    RgbImage { width: image.width(), height: image.height(), rgb: image.into_pixels() }
}

fn point(x: f32, y: f32, label: PointLabel) -> Point {
    Point { x, y, label: label as i32 }
}

/// The fixture prompts `point_multi` (index 4) and `box_single` (index 1) in proto form.
fn fixture_prompts() -> Vec<(usize, SamPrompt)> {
    vec![
        (
            4,
            SamPrompt {
                points: vec![point(61.0, 40.0, PointLabel::Foreground)],
                r#box: None,
                mask_input: None,
                multimask_output: true,
            },
        ),
        (
            1,
            SamPrompt {
                points: vec![],
                r#box: Some(BoxXyxy { x0: 20.0, y0: 15.5, x1: 100.0, y1: 75.0 }),
                mask_input: None,
                multimask_output: false,
            },
        ),
    ]
}

/// A Predict that asks for the low-resolution logits too (as the gateway's Segment does).
fn predict(key: &str, image: Option<RgbImage>, prompts: Vec<SamPrompt>) -> PredictRequest {
    PredictRequest { image_key: key.into(), image, prompts, return_low_res_logits: true }
}

#[tokio::test]
async fn embed_predict_resident_and_everything() {
    let (mut client, _stop) = start_worker(&[]).await;
    let exp = expected();

    let first = client.embed(EmbedRequest { image_key: "photo".into(), image: Some(photo()) }).await.unwrap();
    assert!(!first.into_inner().was_resident);
    let again = client.embed(EmbedRequest { image_key: "photo".into(), image: Some(photo()) }).await.unwrap();
    assert!(again.into_inner().was_resident, "second Embed of the same key must hit the resident LRU");

    // Nothing resident under this key and no image: FAILED_PRECONDITION.
    let prompts: Vec<SamPrompt> = fixture_prompts().into_iter().map(|(_, p)| p).collect();
    let status = client.predict(predict("elsewhere", None, prompts.clone())).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");

    // First Predict on a new key embeds the sent image; the second on the same key is resident:
    // no image needed, the encoder is skipped, and the answer is the same.
    let cold = client.predict(predict("clicks", Some(photo()), prompts.clone())).await.unwrap().into_inner();
    assert!(!cold.was_resident);
    let warm = client.predict(predict("clicks", None, prompts.clone())).await.unwrap().into_inner();
    assert!(warm.was_resident, "the second Predict on the same image key must skip the encoder");
    assert_eq!(warm.prompts, cold.prompts);

    for ((i, _), got) in fixture_prompts().into_iter().zip(&warm.prompts) {
        let want_masks = u8s(&exp[&format!("masks_{i}")]);
        let want_iou = f32s(&exp[&format!("iou_predictions_{i}")]);
        let want_logits = f32s(&exp[&format!("low_res_logits_{i}")]);
        assert_eq!(got.masks.len(), want_iou.len());
        let n = want_masks.len() / want_iou.len();
        let lr = 32 * 32;
        for (k, m) in got.masks.iter().enumerate() {
            let mask = rle_from_worker(m.mask.as_ref().unwrap()).unwrap().to_mask();
            assert_eq!((mask.height(), mask.width()), (87, 118));
            assert_eq!(mask.area(), m.area);
            assert!(
                agreement(mask.data(), &want_masks[k * n..(k + 1) * n]) >= MIN_AGREEMENT,
                "prompt {i} mask {k}"
            );
            assert!((m.predicted_iou - want_iou[k]).abs() <= 1e-4, "prompt {i} iou {k}");
            let logits = m.low_res_logits.as_ref().unwrap();
            assert_eq!((logits.height, logits.width), (32, 32));
            assert!(rel_l2(&logits.values, &want_logits[k * lr..(k + 1) * lr]) <= MAX_REL_L2);
        }
    }

    // Unless asked for, the logits stay here (a described region needs only its mask): the same
    // masks and scores without them.
    let unasked = PredictRequest { return_low_res_logits: false, ..predict("clicks", None, prompts.clone()) };
    let without = client.predict(unasked).await.unwrap().into_inner();
    assert_eq!(without.prompts.len(), warm.prompts.len());
    for (bare, full) in without.prompts.iter().zip(&warm.prompts) {
        assert!(bare.masks.iter().all(|m| m.low_res_logits.is_none()));
        let full: Vec<_> =
            full.masks.iter().map(|m| ProposedMask { low_res_logits: None, ..m.clone() }).collect();
        assert_eq!(bare.masks, full);
    }

    // Everything on the resident image, without pixels (no crop layers): relaxed thresholds so
    // the tiny random model yields masks.
    let params = EverythingParams {
        pred_iou_thresh: Some(0.0),
        stability_score_thresh: Some(0.0),
        box_nms_thresh: Some(0.99),
        ..Default::default()
    };
    let everything = client
        .everything(EverythingRequest { image_key: "photo".into(), image: None, params: Some(params) })
        .await
        .unwrap()
        .into_inner();
    assert!(everything.was_resident);
    assert!(!everything.masks.is_empty());
    assert!(everything.masks.windows(2).all(|w| w[0].area <= w[1].area), "sorted by area");
    for m in &everything.masks {
        assert_eq!(rle_from_worker(m.mask.as_ref().unwrap()).unwrap().area(), m.area);
        assert_eq!(m.crop_box_xywh, [0.0, 0.0, 118.0, 87.0]);
        assert!(m.point.is_some());
    }
    // Removing small regions only edits masks and drops new duplicates.
    let small_regions = EverythingParams { min_mask_region_area: Some(20), ..params };
    let cleaned = client
        .everything(EverythingRequest { image_key: "photo".into(), image: None, params: Some(small_regions) })
        .await
        .unwrap()
        .into_inner();
    assert!(!cleaned.masks.is_empty() && cleaned.masks.len() <= everything.masks.len());
    for m in &cleaned.masks {
        assert_eq!(rle_from_worker(m.mask.as_ref().unwrap()).unwrap().area(), m.area);
    }
    // With a crop layer the pixels are needed; sent along, they give masks from the crops too.
    let crops = EverythingParams { crop_n_layers: Some(1), ..params };
    let status = client
        .everything(EverythingRequest { image_key: "photo".into(), image: None, params: Some(crops) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let with_crops = client
        .everything(EverythingRequest {
            image_key: "photo".into(),
            image: Some(photo()),
            params: Some(crops),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(with_crops.was_resident);
    // Unknown image, no pixels.
    let status = client
        .everything(EverythingRequest { image_key: "nowhere".into(), image: None, params: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (mut client, _stop) = start_worker(&["--max-prompts", "3"]).await;
    client.embed(EmbedRequest { image_key: "photo".into(), image: Some(photo()) }).await.unwrap();
    let good = fixture_prompts()[0].1.clone();
    let expect_invalid = |status: tonic::Status, prefix: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(
            status.message().starts_with(prefix),
            "{:?} does not start with {prefix:?}",
            status.message()
        );
    };

    let mut bad_label = good.clone();
    bad_label.points[0].label = 7;
    let status = client.predict(predict("photo", None, vec![good.clone(), bad_label])).await.unwrap_err();
    expect_invalid(status, "prompts[1].points[0].label: 7 is not a PointLabel");

    let mut bad_point = good.clone();
    bad_point.points.push(point(f32::NAN, 1.0, PointLabel::Background));
    let status = client.predict(predict("photo", None, vec![bad_point])).await.unwrap_err();
    expect_invalid(status, "prompts[0].points[1]: coordinates");

    let mut bad_box = good.clone();
    bad_box.r#box = Some(BoxXyxy { x0: 50.0, y0: 10.0, x1: 20.0, y1: 30.0 });
    let status = client.predict(predict("photo", None, vec![bad_box])).await.unwrap_err();
    expect_invalid(status, "prompts[0].box:");

    let mut bad_mask = good.clone();
    bad_mask.mask_input = Some(LowResLogits { height: 256, width: 256, values: vec![0.0; 256 * 256] });
    let status = client.predict(predict("photo", None, vec![bad_mask])).await.unwrap_err();
    expect_invalid(status, "prompts[0].mask_input: is 256x256");

    let status = client.predict(predict("photo", None, vec![good.clone(); 4])).await.unwrap_err();
    expect_invalid(status, "prompts: 4 prompts, over the limit of 3");

    let bad_pixels = RgbImage { width: 4, height: 4, rgb: vec![0; 10] };
    let status =
        client.embed(EmbedRequest { image_key: "x".into(), image: Some(bad_pixels) }).await.unwrap_err();
    expect_invalid(status, "image:");
    let status = client.embed(EmbedRequest { image_key: "".into(), image: Some(photo()) }).await.unwrap_err();
    expect_invalid(status, "image_key:");

    // Still healthy and answering.
    let ok = client.predict(predict("photo", None, vec![good])).await.unwrap().into_inner();
    assert!(ok.was_resident);
    assert_eq!(ok.prompts[0].masks.len(), 3);
}

/// A prompt's problem travels as a structured `google.rpc.BadRequest` field violation beside the
/// readable message, so a caller can rename the field without reading the text.
#[tokio::test]
async fn a_bad_prompt_names_its_field_as_a_structured_detail() {
    let (mut client, _stop) = start_worker(&[]).await;
    let mut bad_label = fixture_prompts()[0].1.clone();
    bad_label.points[0].label = 7;
    let prompts = vec![fixture_prompts()[1].1.clone(), bad_label];
    let status = client.predict(predict("photo", Some(photo()), prompts)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("a BadRequest detail").field_violations;
    assert_eq!(violations.len(), 1);
    assert_eq!(violations[0].field, "prompts[1].points[0].label");
    assert!(violations[0].description.starts_with("7 is not a PointLabel"), "{}", violations[0].description);
    assert!(status.message().starts_with("prompts[1].points[0].label: 7 is not a PointLabel"));
}
