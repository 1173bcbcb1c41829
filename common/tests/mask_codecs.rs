//! Mask codecs against pycocotools (fixtures from `tools/make_codec_fixtures.py`): RLE strings
//! byte for byte, decoded masks pixel for pixel, area and bbox exactly.

use std::path::PathBuf;

use osprey_common::mask::{Mask, MaskError, Rle};
use safetensors::SafeTensors;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/codecs")
}

#[derive(Deserialize)]
struct MaskCase {
    name: String,
    tensor: String,
    height: u32,
    width: u32,
    rle: String,
    counts: Vec<u32>,
    area: u64,
    bbox: [f64; 4],
}

#[derive(Deserialize)]
struct PolygonCase {
    name: String,
    height: u32,
    width: u32,
    polygons: Vec<Vec<f64>>,
    rles: Vec<String>,
    merged_rle: String,
    tensor: String,
}

fn load(name: &str) -> (Vec<u8>, String) {
    let dir = fixtures();
    let tensors = std::fs::read(dir.join(format!("{name}.safetensors"))).unwrap();
    let json = std::fs::read_to_string(dir.join(format!("{name}.json"))).unwrap();
    (tensors, json)
}

fn mask_from(tensors: &SafeTensors, name: &str, height: u32, width: u32) -> Mask {
    let view = tensors.tensor(name).unwrap();
    assert_eq!(view.shape(), [height as usize, width as usize], "{name}");
    Mask::from_row_major(height, width, view.data()).unwrap()
}

#[test]
fn masks_encode_and_decode_like_pycocotools() {
    let (bytes, json) = load("masks");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let cases: Vec<MaskCase> = serde_json::from_str(&json).unwrap();
    assert!(cases.len() >= 40);
    for case in &cases {
        let mask = mask_from(&tensors, &case.tensor, case.height, case.width);
        let rle = mask.to_rle();
        assert_eq!(rle.counts(), case.counts.as_slice(), "{}: counts", case.name);
        assert_eq!(rle.to_compressed(), case.rle, "{}: compressed string", case.name);
        assert_eq!(rle.area(), case.area, "{}: area", case.name);
        assert_eq!(mask.area(), case.area, "{}: mask area", case.name);
        assert_eq!(rle.bbox(), case.bbox, "{}: bbox", case.name);

        let from_string = Rle::from_compressed(case.height, case.width, &case.rle).unwrap();
        assert_eq!(from_string.counts(), case.counts.as_slice(), "{}: decoded counts", case.name);
        assert_eq!(from_string.to_mask(), mask, "{}: decoded mask", case.name);
        let from_counts = Rle::from_counts(case.height, case.width, case.counts.clone()).unwrap();
        assert_eq!(from_counts.to_mask(), mask, "{}: mask from counts", case.name);
    }
}

#[test]
fn polygons_rasterise_like_pycocotools() {
    let (bytes, json) = load("polygons");
    let tensors = SafeTensors::deserialize(&bytes).unwrap();
    let cases: Vec<PolygonCase> = serde_json::from_str(&json).unwrap();
    let mut checked = 0;
    for case in &cases {
        let (h, w) = (case.height, case.width);
        let result = Mask::from_polygons(h, w, &case.polygons);
        if let Some(index) = case.polygons.iter().position(|p| p.len() < 6) {
            // Fewer than 3 points: pycocotools draws nothing (or refuses, for a first polygon of
            // 2 points); we refuse, naming the polygon.
            assert_eq!(
                result,
                Err(MaskError::PolygonLength { index, len: case.polygons[index].len() }),
                "{}",
                case.name
            );
            continue;
        }
        let mask = result.unwrap_or_else(|e| panic!("{}: {e}", case.name));
        let expected = mask_from(&tensors, &case.tensor, h, w);
        assert_eq!(mask, expected, "{}: merged mask", case.name);
        assert_eq!(mask.to_rle().to_compressed(), case.merged_rle, "{}: merged RLE", case.name);
        for (polygon, rle) in case.polygons.iter().zip(&case.rles) {
            let single = Mask::from_polygons(h, w, std::slice::from_ref(polygon)).unwrap();
            assert_eq!(single.to_rle().to_compressed(), *rle, "{}: per-polygon RLE", case.name);
        }
        checked += 1;
    }
    assert!(checked >= 30, "only {checked} polygon cases checked");
}

#[test]
fn malformed_rle_strings_are_errors_not_panics() {
    let (_, json) = load("masks");
    let cases: Vec<MaskCase> = serde_json::from_str(&json).unwrap();
    for case in cases.iter().filter(|c| c.rle.len() > 2) {
        let (h, w) = (case.height, case.width);
        // Every prefix, every single-character corruption: never a panic, never a wrong-sized mask.
        for end in 0..case.rle.len() {
            if let Ok(rle) = Rle::from_compressed(h, w, &case.rle[..end]) {
                assert_eq!(rle.to_mask().data().len(), (h * w) as usize);
            }
        }
        for position in 0..case.rle.len() {
            for replacement in ['0', 'O', 'o', '_', ' ', '~'] {
                let mut corrupted = case.rle.clone().into_bytes();
                corrupted[position] = replacement as u8;
                let corrupted = String::from_utf8(corrupted).unwrap();
                if let Ok(rle) = Rle::from_compressed(h, w, &corrupted) {
                    assert_eq!(rle.to_mask().area(), rle.area());
                }
            }
        }
        // The right string for a different size is refused.
        assert!(matches!(Rle::from_compressed(h + 1, w, &case.rle), Err(MaskError::CountsSum { .. })));
    }
}

/// A mask's declared size is checked against the image's before any pixel is made: RLE counts
/// that sum to 60000x60000 (or a polygon declaring it) would otherwise allocate 3.6 GB.
#[test]
fn a_huge_declared_mask_size_is_refused_before_decoding() {
    use osprey_common::image::ImageLimits;
    use osprey_common::mask::mask_from_proto;
    use osprey_proto::v1;
    let huge_rle = v1::Mask {
        format: Some(v1::mask::Format::Rle(v1::RleMask {
            height: 60_000,
            width: 60_000,
            counts: Some(v1::rle_mask::Counts::Uncompressed(v1::RunLengths {
                counts: vec![1_800_000_000, 1_800_000_000],
            })),
        })),
    };
    let huge_polygon = v1::Mask {
        format: Some(v1::mask::Format::Polygon(v1::PolygonMask {
            height: 60_000,
            width: 60_000,
            polygons: vec![v1::Polygon { xy: vec![1.0, 1.0, 20.0, 5.0, 4.0, 9.0] }],
        })),
    };
    for mask in [huge_rle, huge_polygon] {
        let err = mask_from_proto(&mask, 30, 40, &ImageLimits::default()).unwrap_err();
        assert!(
            matches!(err, MaskError::SizeMismatch { got_height: 60_000, got_width: 60_000, .. }),
            "{err:?}"
        );
    }
}
