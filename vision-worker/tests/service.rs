//! The vision worker over real gRPC: health after warm-up, encode/pool against the reference
//! fixtures, the resident LRU, feature blobs moving to another replica, bad input (INVALID_ARGUMENT
//! with the field as a structured detail) and a failed model batch (INTERNAL).

use osprey_common::error::StatusExt;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::{Mask, rle_to_worker};
use osprey_common::tensor::f32_from_proto;
use osprey_proto::worker::v1::vision_client::VisionClient;
use osprey_proto::worker::v1::{EncodeRequest, PoolRequest, RgbImage};
use osprey_test_support::{InProcess, fixture, parse_args, serve_in_process};
use safetensors::SafeTensors;
use tonic::Code;
use tonic::transport::Channel;
use vision_worker::service::{ServeArgs, run};

/// Starts a worker on a free loopback port; returns a client once health says SERVING (the
/// worker stops when the returned handle is dropped).
async fn start_worker(extra: &[&str]) -> (VisionClient<Channel>, InProcess) {
    let weights = fixture("vision/tiny/tiny_st");
    let mut argv = vec!["vision-worker", "--weights", weights.to_str().unwrap(), "--feature-dtype", "f32"];
    argv.extend_from_slice(extra);
    let args: ServeArgs = parse_args(argv);
    let server = serve_in_process(|listener, stopped| run(args, listener, stopped)).await;
    (VisionClient::connect(server.url.clone()).await.unwrap(), server)
}

fn photo() -> RgbImage {
    let image =
        decode_image(&std::fs::read(fixture("vision/photo.png")).unwrap(), &ImageLimits::default()).unwrap();
    RgbImage { width: image.width(), height: image.height(), rgb: image.into_pixels() }
}

fn fixture_masks() -> Vec<Mask> {
    let bytes = std::fs::read(fixture("vision/masks.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let masks = tensors.tensor("masks").unwrap();
    let [n, h, w] = masks.shape() else { panic!("masks must be [N, H, W]") };
    (0..*n)
        .map(|i| {
            Mask::from_row_major(*h as u32, *w as u32, &masks.data()[i * h * w..(i + 1) * h * w]).unwrap()
        })
        .collect()
}

fn expected(name: &str) -> Vec<f32> {
    let bytes = std::fs::read(fixture("vision/expected_f32.safetensors")).unwrap();
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    tensors
        .tensor(name)
        .unwrap()
        .data()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

fn pool_request(key: &str, masks: &[Mask]) -> PoolRequest {
    PoolRequest {
        image_key: key.into(),
        features: None,
        masks: masks.iter().map(|m| rle_to_worker(&m.to_rle())).collect(),
        return_image_tokens: true,
    }
}

#[tokio::test]
async fn encode_pool_resident_and_blob_on_another_replica() {
    let (mut first, _stop_first) = start_worker(&[]).await;
    let masks = fixture_masks();

    let encoded = first
        .encode(EncodeRequest { image_key: "photo".into(), image: Some(photo()), return_features: true })
        .await
        .unwrap()
        .into_inner();
    assert!(!encoded.was_resident);
    let blob = encoded.features.expect("asked for the blob");
    let again = first
        .encode(EncodeRequest { image_key: "photo".into(), image: Some(photo()), return_features: false })
        .await
        .unwrap()
        .into_inner();
    assert!(again.was_resident, "second encode of the same key must hit the resident LRU");

    let pooled = first.pool(pool_request("photo", &masks)).await.unwrap().into_inner();
    assert!(pooled.was_resident);
    let (shape, mask_tokens) =
        f32_from_proto(pooled.mask_tokens.as_ref().unwrap(), "mask_tokens", 2).unwrap();
    assert_eq!(shape, [masks.len(), 32]);
    let (_, pos_tokens) = f32_from_proto(pooled.pos_tokens.as_ref().unwrap(), "pos_tokens", 2).unwrap();
    let (_, image_tokens) = f32_from_proto(pooled.image_tokens.as_ref().unwrap(), "image_tokens", 2).unwrap();
    for (name, actual) in
        [("mask_tokens", &mask_tokens), ("pos_tokens", &pos_tokens), ("image_tokens", &image_tokens)]
    {
        let error = osprey_test_support::rel_l2(actual, &expected(name));
        assert!(error <= 1e-4, "{name}: relative L2 error {error:e}");
    }

    // Another replica has nothing resident: it needs the blob, and then gives the same tokens.
    let (mut second, _stop_second) = start_worker(&[]).await;
    let status = second.pool(pool_request("photo", &masks)).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    let mut with_blob = pool_request("photo", &masks);
    with_blob.features = Some(blob.clone());
    let from_blob = second.pool(with_blob).await.unwrap().into_inner();
    assert!(!from_blob.was_resident);
    assert_eq!(from_blob.mask_tokens, pooled.mask_tokens);
    assert_eq!(from_blob.pos_tokens, pooled.pos_tokens);
    // ...and keeps the features resident afterwards.
    assert!(second.pool(pool_request("photo", &masks)).await.unwrap().into_inner().was_resident);

    // A blob from another model revision is refused.
    let mut stale = pool_request("other", &masks);
    let mut old_blob = blob;
    old_blob.feature_revision = "some-older-model".into();
    stale.features = Some(old_blob);
    assert_eq!(second.pool(stale).await.unwrap_err().code(), Code::FailedPrecondition);
}

#[tokio::test]
async fn bad_input_is_invalid_argument_naming_the_field() {
    let (mut client, _stop) = start_worker(&["--max-masks", "3"]).await;
    client
        .encode(EncodeRequest { image_key: "photo".into(), image: Some(photo()), return_features: false })
        .await
        .unwrap();

    let wrong_size = Mask::empty(10, 10);
    let status =
        client.pool(pool_request("photo", &[fixture_masks()[1].clone(), wrong_size])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("masks[1]: mask is 10x10 but the image is 103x157"),
        "{}",
        status.message()
    );

    let too_many = vec![Mask::empty(103, 157); 4];
    let status = client.pool(pool_request("photo", &too_many)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("over the limit of 3"), "{}", status.message());
    // The field also travels structured, as a google.rpc.BadRequest field violation.
    let details = status.get_error_details();
    let violations = &details.bad_request().expect("a BadRequest detail").field_violations;
    assert_eq!(violations[0].field, "masks");

    let mut bad_rle = pool_request("photo", &[]);
    bad_rle.masks.push(osprey_proto::worker::v1::RleMask { height: 103, width: 157, counts: "1~".into() });
    let status = client.pool(bad_rle).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().starts_with("masks[0]: RLE string has invalid character"),
        "{}",
        status.message()
    );

    let bad_pixels = RgbImage { width: 4, height: 4, rgb: vec![0; 10] };
    let status = client
        .encode(EncodeRequest { image_key: "x".into(), image: Some(bad_pixels), return_features: false })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    let status = client
        .encode(EncodeRequest { image_key: "".into(), image: Some(photo()), return_features: false })
        .await;
    assert_eq!(status.unwrap_err().code(), Code::InvalidArgument);

    // The worker is still healthy and answering.
    assert!(client.pool(pool_request("photo", &fixture_masks()[..2])).await.is_ok());
}

/// A model failure is the worker's, not the client's: every request that shared the failed
/// encode batch is answered INTERNAL (so the gateway tries another replica), never
/// INVALID_ARGUMENT, and the worker goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_encode_batch_is_internal_for_every_request_in_it() {
    let (client, _stop) = start_worker(&["--fault-image-key", "poisoned", "--max-batch-size", "16"]).await;
    let encode = |key: String| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .encode(EncodeRequest { image_key: key, image: Some(photo()), return_features: false })
                .await
        })
    };
    let alone = encode("poisoned".into()).await.unwrap().unwrap_err();
    assert_eq!(alone.code(), Code::Internal, "{alone:?}");

    // Sent at once, the requests queue behind one another and the model thread takes them in
    // batches; those in the poisoned one's batch fail with it, the others are encoded.
    let mut failed_with_it = 0;
    for attempt in 0..20 {
        let mut calls = vec![encode("poisoned".into())];
        calls.extend((0..8).map(|i| encode(format!("innocent-{attempt}-{i}"))));
        for call in calls {
            if let Err(status) = call.await.unwrap() {
                assert_eq!(status.code(), Code::Internal, "{status:?}");
                assert!(status.message().contains("injected fault"), "{}", status.message());
                failed_with_it += 1;
            }
        }
        if failed_with_it > 1 {
            break;
        }
    }
    assert!(failed_with_it > 1, "no request ever shared a batch with the poisoned one");

    let fine = encode("fine".into()).await.unwrap().unwrap().into_inner();
    assert!(!fine.was_resident);
}
