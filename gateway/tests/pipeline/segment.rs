//! SAM prompts through Segment and Describe, and everything mode.

use osprey_common::error::StatusExt;
use osprey_proto::v1::{self, CacheTier};
use tonic::Code;

use crate::support::*;

#[tokio::test]
async fn sam_prompts_segment_and_everything() {
    let (vision, llm, sam) = (vision().await, llm().await, sam().await);
    let (_gateway, mut client) = gateway(&[&vision], &llm, &["--sam-workers", &sam.url]).await;
    let image = v1::Image { source: Some(v1::image::Source::Encoded(photo())) };
    let point = |label: v1::PointLabel| v1::SamPrompt {
        points: vec![v1::Point { x: 80.0, y: 50.0, label: label as i32 }],
        ..Default::default()
    };

    let segmented = client
        .segment(v1::SegmentRequest {
            image: Some(image.clone()),
            prompts: vec![point(v1::PointLabel::Foreground)],
            everything: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(segmented.prompts.len(), 1);
    assert_eq!(segmented.prompts[0].masks.len(), 1);
    let mask = segmented.prompts[0].masks[0].mask.as_ref().unwrap();
    assert_eq!((mask.height, mask.width), (103, 157));

    // A prompt region is described with the mask SAM made, which comes back with the result.
    let prompt_region = v1::Region {
        source: Some(v1::region::Source::Prompt(point(v1::PointLabel::Foreground))),
        label: "p".into(),
    };
    let mut regions = masks(&[1]);
    regions.push(prompt_region);
    let results = describe(
        &mut client,
        v1::DescribeRequest {
            image: Some(image.clone()),
            ..describe_request(v1::image::Source::Key(String::new()), regions)
        },
    )
    .await;
    assert_eq!(results.len(), 2);
    assert!(results[0].mask.is_none());
    assert_eq!(results[1].mask.as_ref(), Some(mask));
    let sam_tier = results[1].metadata.as_ref().unwrap().cache.as_ref().unwrap().sam_embedding;
    assert_eq!(sam_tier, CacheTier::Resident as i32, "the embedding from Segment is reused");

    // A bad prompt is named by its region.
    let mut bad = point(v1::PointLabel::Foreground);
    bad.points[0].x = f32::NAN;
    let regions = vec![
        masks(&[1]).remove(0),
        v1::Region { source: Some(v1::region::Source::Prompt(bad)), label: String::new() },
    ];
    let status = client
        .describe(v1::DescribeRequest {
            image: Some(image.clone()),
            ..describe_request(v1::image::Source::Key(String::new()), regions)
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().starts_with("regions[1].prompt"), "{}", status.message());
    // The SAM worker found it (`prompts[0].points[0]` in its request); the client gets the field
    // as its own request names it, as a BadRequest detail too.
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("a BadRequest detail").field_violations;
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert_eq!(violations[0].field, "regions[1].prompt.points[0]");
    assert!(violations[0].description.contains("not finite"), "{violations:?}");

    // Everything mode describes what SAM proposes (loose thresholds for the random model).
    let everything = v1::EverythingParams {
        points_per_side: Some(4),
        pred_iou_thresh: Some(0.0),
        stability_score_thresh: Some(0.0),
        ..Default::default()
    };
    let request = v1::DescribeRequest {
        image: Some(image),
        everything: Some(everything),
        ..describe_request(v1::image::Source::Key(String::new()), vec![])
    };
    let results = describe(&mut client, request).await;
    assert!(!results.is_empty());
    assert!(results.iter().all(|r| r.mask.is_some() && r.label.starts_with("everything")));
}
