//! Bounded fuzzing of everything a client's bytes reach first: image decoding, the mask codecs
//! (COCO RLE, PNG, polygons, the API's mask message) and protobuf decoding of the public and
//! worker request types. Each property feeds arbitrary or mutated input and requires a typed
//! result: no panic, and a success that is internally consistent.
//!
//! CI runs proptest's default 256 cases per target; `PROPTEST_CASES=100000` runs longer
//! (docs/RELIABILITY.md has the figures).

use std::path::PathBuf;

use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::{Mask, Rle, mask_from_proto, rle_from_proto};
use osprey_proto::v1;
use proptest::prelude::*;
use prost::Message;

fn fixture(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Small fixtures of every accepted format, the seeds that mutations start from (read once).
fn seeds() -> &'static [Vec<u8>] {
    static SEEDS: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
    SEEDS.get_or_init(|| {
        [
            "chelsea_q90_420.jpg",
            "chelsea_q90_progressive.jpg",
            "chelsea_cmyk_q90.jpg",
            "chelsea_ycck_q90.jpg",
            "chelsea_exif_orient6.jpg",
            "chelsea_palette_trns.png",
            "chelsea_rgb16_exact.png",
            "chelsea_gray_alpha.png",
            "chelsea_lossless.webp",
            "chelsea_lossy_q80.webp",
            "bomb.png",
        ]
        .iter()
        .map(|n| fixture(n))
        .collect()
    })
}

/// Limits small enough that a mutated header cannot make one case slow.
fn limits() -> ImageLimits {
    ImageLimits { max_bytes: 1 << 20, max_pixels: 1 << 20, max_side: 4096 }
}

/// A seed with some bytes overwritten, a few inserted or removed, and maybe cut short.
#[derive(Debug, Clone)]
struct Mutation {
    seed: usize,
    edits: Vec<(usize, u8, u8)>,
    cut: Option<usize>,
}

fn mutation(seeds: usize) -> impl Strategy<Value = Mutation> {
    (
        0..seeds,
        prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 0..12),
        prop::option::of(any::<usize>()),
    )
        .prop_map(|(seed, edits, cut)| Mutation { seed, edits, cut })
}

fn apply(mutation: &Mutation, seed: &[u8]) -> Vec<u8> {
    let mut bytes = seed.to_vec();
    for &(at, kind, value) in &mutation.edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        match kind {
            0 => bytes[at] = value,
            1 => bytes.insert(at, value),
            _ => {
                bytes.remove(at);
            }
        }
    }
    if let Some(cut) = mutation.cut {
        let keep = cut % (bytes.len() + 1);
        bytes.truncate(keep);
    }
    bytes
}

fn check_decoded(bytes: &[u8]) {
    if let Ok(image) = decode_image(bytes, &limits()) {
        let (w, h) = (image.width() as u64, image.height() as u64);
        assert!(w > 0 && h > 0 && w * h <= limits().max_pixels);
        assert_eq!(image.pixels().len() as u64, w * h * 3);
    }
}

proptest! {
    #[test]
    fn mutated_images_decode_or_fail_cleanly(m in mutation(11)) {
        let seeds = seeds();
        check_decoded(&apply(&m, &seeds[m.seed]));
    }

    #[test]
    fn arbitrary_bytes_after_an_image_signature_fail_cleanly(
        signature in prop::sample::select(vec![
            b"\x89PNG\r\n\x1a\n".to_vec(), b"\xff\xd8\xff".to_vec(), b"RIFF\0\0\0\0WEBPVP8 ".to_vec(), Vec::new(),
        ]),
        rest in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let mut bytes = signature;
        bytes.extend(rest);
        check_decoded(&bytes);
    }

    #[test]
    fn mutated_png_masks_decode_or_fail_cleanly(m in mutation(11)) {
        let seeds = seeds();
        if let Ok(mask) = Mask::from_png(&apply(&m, &seeds[m.seed]), &limits()) {
            assert_eq!(mask.data().len() as u64, mask.height() as u64 * mask.width() as u64);
        }
    }

    #[test]
    fn compressed_rle_strings_decode_or_fail_cleanly(
        height in 0u32..40, width in 0u32..40, text in "[0-o]{0,40}|\\PC{0,20}",
    ) {
        if let Ok(rle) = Rle::from_compressed(height, width, &text) {
            let mask = rle.to_mask();
            assert_eq!(mask.data().len(), (height * width) as usize);
            assert_eq!(Rle::from_compressed(height, width, &rle.to_compressed()).unwrap(), rle);
        }
    }

    #[test]
    fn masks_round_trip_through_rle(
        (height, width, bits) in (1u32..24, 1u32..24).prop_flat_map(|(h, w)| {
            (Just(h), Just(w), prop::collection::vec(0u8..2, (h * w) as usize))
        }),
    ) {
        let mask = Mask::from_row_major(height, width, &bits).unwrap();
        let rle = mask.to_rle();
        let back = Rle::from_compressed(height, width, &rle.to_compressed()).unwrap();
        prop_assert_eq!(back.to_mask(), mask.clone());
        prop_assert_eq!(Rle::from_counts(height, width, rle.counts().to_vec()).unwrap().to_mask(), mask);
    }

    #[test]
    fn polygons_rasterise_or_fail_cleanly(
        height in 1u32..64, width in 1u32..64,
        polygons in prop::collection::vec(
            prop::collection::vec(prop_oneof![
                8 => -10.0f64..80.0,
                1 => Just(f64::NAN), 1 => Just(f64::INFINITY), 1 => Just(-1e300), 1 => Just(1e300),
            ], 0..16),
            0..4,
        ),
    ) {
        if let Ok(mask) = Mask::from_polygons(height, width, &polygons) {
            assert_eq!((mask.height(), mask.width()), (height, width));
        }
    }

    /// The API's mask message, sizes included: a declared size other than the image's is refused
    /// before any pixel is made (a 60000x60000 RLE would otherwise allocate 3.6 GB).
    #[test]
    fn api_masks_decode_or_fail_cleanly(
        declared in (0u32..70_000, 0u32..70_000),
        counts in prop::collection::vec(any::<u32>(), 0..6),
        text in "[0-o]{0,12}",
        xy in prop::collection::vec(-100.0f64..100.0, 0..10),
        which in 0u8..3,
    ) {
        use v1::mask::Format;
        let (height, width) = (30, 40);
        let format = match which {
            0 => Format::Rle(v1::RleMask {
                height: declared.0, width: declared.1,
                counts: Some(v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts })),
            }),
            1 => Format::Rle(v1::RleMask {
                height: declared.0, width: declared.1, counts: Some(v1::rle_mask::Counts::Compressed(text)),
            }),
            _ => Format::Polygon(v1::PolygonMask {
                height: declared.0, width: declared.1, polygons: vec![v1::Polygon { xy }],
            }),
        };
        let mask = v1::Mask { format: Some(format) };
        if let Ok(decoded) = mask_from_proto(&mask, height, width, &limits()) {
            assert_eq!((decoded.height(), decoded.width()), (height, width));
        }
    }

    #[test]
    fn arbitrary_rle_messages_fail_cleanly(height: u32, width: u32, counts in prop::collection::vec(any::<u32>(), 0..4)) {
        let rle = v1::RleMask {
            height, width, counts: Some(v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts })),
        };
        // Only validation: decoding the counts to pixels is what mask_from_proto bounds.
        if let Ok(valid) = rle_from_proto(&rle) {
            let sum: u64 = valid.counts().iter().map(|&c| c as u64).sum();
            assert_eq!(sum, height as u64 * width as u64);
        }
    }
}

/// Encoded requests of every type a server decodes, as seeds for mutation.
fn request_seeds() -> Vec<Vec<u8>> {
    let image = v1::Image { source: Some(v1::image::Source::Encoded(b"\x89PNG\r\n\x1a\nxx".to_vec())) };
    let region = v1::Region {
        source: Some(v1::region::Source::Prompt(v1::SamPrompt {
            points: vec![v1::Point { x: 3.0, y: 4.0, label: 1 }],
            r#box: Some(v1::Box { x0: 1.0, y0: 2.0, x1: 5.0, y1: 6.0 }),
            ..Default::default()
        })),
        label: "cat".into(),
    };
    vec![
        v1::DescribeRequest {
            image: Some(image.clone()),
            regions: vec![region.clone()],
            task: 1,
            parameters: Some(v1::GenerationParameters { max_new_tokens: Some(8), ..Default::default() }),
            ..Default::default()
        }
        .encode_to_vec(),
        v1::AskRequest {
            image: Some(image.clone()),
            regions: vec![region.clone()],
            question: "What is <mask>?".into(),
            ..Default::default()
        }
        .encode_to_vec(),
        v1::SegmentRequest { image: Some(image.clone()), ..Default::default() }.encode_to_vec(),
        v1::RegisterImageRequest { encoded: b"\xff\xd8\xff".to_vec(), warm_features: true }.encode_to_vec(),
    ]
}

/// Decodes `bytes` as `T`; a success must re-encode to bytes that decode to the same message.
fn decode_round_trip<T: Message + Default + PartialEq + std::fmt::Debug>(bytes: &[u8]) {
    if let Ok(message) = T::decode(bytes) {
        let again = T::decode(message.encode_to_vec().as_slice()).expect("a decoded message re-encodes");
        assert_eq!(again, message);
    }
}

fn decode_all(bytes: &[u8]) {
    use osprey_proto::worker::v1 as worker;
    decode_round_trip::<v1::DescribeRequest>(bytes);
    decode_round_trip::<v1::AskRequest>(bytes);
    decode_round_trip::<v1::ChatRequest>(bytes);
    decode_round_trip::<v1::SegmentRequest>(bytes);
    decode_round_trip::<v1::RegisterImageRequest>(bytes);
    decode_round_trip::<v1::AnnotateRequest>(bytes);
    decode_round_trip::<worker::PredictRequest>(bytes);
    decode_round_trip::<worker::EverythingRequest>(bytes);
    decode_round_trip::<worker::EncodeRequest>(bytes);
    decode_round_trip::<worker::PoolRequest>(bytes);
    decode_round_trip::<worker::GenerateRequest>(bytes);
}

proptest! {
    #[test]
    fn arbitrary_bytes_decode_as_requests_or_fail_cleanly(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        decode_all(&bytes);
    }

    #[test]
    fn mutated_requests_decode_or_fail_cleanly(m in mutation(4)) {
        let seeds = request_seeds();
        decode_all(&apply(&m, &seeds[m.seed]));
    }
}
