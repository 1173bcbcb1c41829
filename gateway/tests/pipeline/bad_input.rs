//! INVALID_ARGUMENT for bad input, and API keys.

use std::collections::BTreeSet;

use osprey_common::error::StatusExt;
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1;
use tonic::{Code, Request};

use crate::support::*;

#[tokio::test]
async fn bad_input_and_auth() {
    let (vision, llm) = (vision().await, llm().await);
    let (_gateway, mut client) =
        gateway(&[&vision], &llm, &["--api-key", "secret", "--max-regions", "3"]).await;
    let image = v1::image::Source::Encoded(photo());

    let status = client.describe(describe_request(image.clone(), masks(&[1]))).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);

    let authed = |request: v1::DescribeRequest| {
        let mut request = Request::new(request);
        request.metadata_mut().insert("authorization", "Bearer secret".parse().unwrap());
        request
    };
    let mut wrong_size = masks(&[1]);
    wrong_size.push(v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(rle_to_proto(&Mask::empty(10, 10).to_rle()))),
        })),
        label: String::new(),
    });
    let bad_rle = vec![v1::Region {
        source: Some(v1::region::Source::Mask(v1::Mask {
            format: Some(v1::mask::Format::Rle(v1::RleMask {
                height: 103,
                width: 157,
                counts: Some(v1::rle_mask::Counts::Compressed("1~".into())),
            })),
        })),
        label: String::new(),
    }];
    let cases = [
        (
            describe_request(image.clone(), wrong_size),
            "regions[1].mask: mask is 10x10 but the image is 103x157",
        ),
        (describe_request(image.clone(), bad_rle), "regions[0].mask: RLE string has invalid character"),
        (describe_request(image.clone(), masks(&[1, 1, 1, 1])), "regions: 4 regions, over the limit of 3"),
        (describe_request(image.clone(), vec![]), "regions: at least one region"),
        (
            describe_request(v1::image::Source::Encoded(b"not an image".to_vec()), masks(&[1])),
            "image.encoded:",
        ),
        (
            v1::DescribeRequest { image: None, ..describe_request(image.clone(), masks(&[1])) },
            "image: required",
        ),
    ];
    for (request, expected) in cases {
        let status = match client.describe(authed(request)).await {
            Err(status) => status,
            Ok(response) => response.into_inner().message().await.unwrap_err(),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{expected}: {status:?}");
        assert!(status.message().starts_with(expected), "expected {expected:?}, got {:?}", status.message());
        // The field also travels as a structured google.rpc.BadRequest detail.
        let field = expected.split_once(':').map_or(expected, |(field, _)| field);
        let details = status.get_error_details();
        let violations = &details.bad_request().expect("a BadRequest detail").field_violations;
        assert_eq!(violations.len(), 1, "{violations:?}");
        assert_eq!(violations[0].field, field);
        assert!(status.message().ends_with(&violations[0].description), "{violations:?}");
    }

    // Annotate: a bad item gets an error, the stream goes on with the next one.
    let items = vec![
        v1::AnnotateRequest {
            item_id: "bad".into(),
            image: None,
            regions: masks(&[1]),
            ..Default::default()
        },
        v1::AnnotateRequest {
            item_id: "good".into(),
            image: Some(v1::Image { source: Some(image.clone()) }),
            regions: masks(&[1, 4]),
            ..Default::default()
        },
    ];
    let mut request = Request::new(tokio_stream::iter(items));
    request.metadata_mut().insert("x-api-key", "secret".parse().unwrap());
    let mut stream = client.annotate(request).await.unwrap().into_inner();
    let mut events = Vec::new();
    while let Some(response) = stream.message().await.unwrap() {
        events.push(response);
    }
    use v1::annotate_response::Event;
    assert!(
        matches!(&events[0].event, Some(Event::Error(e)) if e.code == Code::InvalidArgument as i32 && events[0].item_id == "bad")
    );
    let good: Vec<_> = events.iter().filter(|e| e.item_id == "good").collect();
    let regions: BTreeSet<u32> = good
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Region(r)) => Some(r.region_index),
            _ => None,
        })
        .collect();
    assert_eq!(regions, BTreeSet::from([0, 1]));
    assert!(matches!(&good.last().unwrap().event, Some(Event::Done(done)) if done.regions == 2));

    // Still healthy and answering.
    let mut stream =
        client.describe(authed(describe_request(image, masks(&[1])))).await.unwrap().into_inner();
    assert_eq!(stream.message().await.unwrap().unwrap().region_index, 0);
}
