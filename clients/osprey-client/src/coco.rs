//! COCO `segmentation` fields (polygons, or RLE with compressed or uncompressed counts) read as
//! the public API's region masks. The one reader of COCO masks on the client side: the annotate
//! CLI reads its input files with it, osprey-eval its datasets.

use anyhow::{Context, bail};
use osprey_proto::v1;
use serde::Deserialize;
use serde_json::Value;

/// A COCO `segmentation`. Deserializes from JSON with the same checks as [`Segmentation::parse`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "Value")]
pub enum Segmentation {
    /// Polygons, each a flat `[x0, y0, x1, y1, ...]` list in pixels.
    Polygons(Vec<Vec<f64>>),
    /// Run lengths over the column-major pixels of a `height` x `width` mask.
    Rle { height: u32, width: u32, counts: RleCounts },
}

/// An RLE's `counts`: COCO's compressed string, or the plain run lengths.
#[derive(Debug, Clone, PartialEq)]
pub enum RleCounts {
    Compressed(String),
    Runs(Vec<u32>),
}

impl Segmentation {
    /// Reads a `segmentation` value: a list of polygons, or `{"size": [h, w], "counts": ...}`.
    pub fn parse(value: &Value) -> anyhow::Result<Self> {
        match value {
            Value::Array(polygons) => {
                let polygon = |p: &Value| -> anyhow::Result<Vec<f64>> {
                    let xy = p.as_array().context("a polygon is a list of numbers")?;
                    xy.iter().map(|v| v.as_f64().context("a polygon is a list of numbers")).collect()
                };
                Ok(Self::Polygons(polygons.iter().map(polygon).collect::<anyhow::Result<_>>()?))
            }
            Value::Object(rle) => {
                let size = rle.get("size").and_then(Value::as_array).context("RLE without size")?;
                let side = |i: usize| {
                    size.get(i)
                        .and_then(Value::as_u64)
                        .and_then(|v| u32::try_from(v).ok())
                        .context("RLE size is [height, width]")
                };
                if size.len() != 2 {
                    bail!("RLE size is [height, width]");
                }
                let counts = match rle.get("counts") {
                    Some(Value::String(text)) => RleCounts::Compressed(text.clone()),
                    Some(Value::Array(runs)) => RleCounts::Runs(
                        runs.iter()
                            .map(|v| {
                                v.as_u64()
                                    .and_then(|c| u32::try_from(c).ok())
                                    .context("RLE counts are non-negative numbers")
                            })
                            .collect::<anyhow::Result<_>>()?,
                    ),
                    _ => bail!("RLE counts are a string or a list"),
                };
                Ok(Self::Rle { height: side(0)?, width: side(1)?, counts })
            }
            _ => bail!("no segmentation (polygons or RLE)"),
        }
    }

    /// The region mask the public API takes, for an image of `height` x `width` (polygons need
    /// the image's size; an RLE carries its own, which the gateway checks against the image).
    pub fn to_proto(&self, height: u32, width: u32) -> v1::Mask {
        use v1::mask::Format;
        let format = match self {
            Segmentation::Polygons(polygons) => Format::Polygon(v1::PolygonMask {
                height,
                width,
                polygons: polygons.iter().map(|xy| v1::Polygon { xy: xy.clone() }).collect(),
            }),
            Segmentation::Rle { height, width, counts } => Format::Rle(v1::RleMask {
                height: *height,
                width: *width,
                counts: Some(match counts {
                    RleCounts::Compressed(text) => v1::rle_mask::Counts::Compressed(text.clone()),
                    RleCounts::Runs(runs) => {
                        v1::rle_mask::Counts::Uncompressed(v1::RunLengths { counts: runs.clone() })
                    }
                }),
            }),
        };
        v1::Mask { format: Some(format) }
    }
}

impl TryFrom<Value> for Segmentation {
    type Error = anyhow::Error;

    fn try_from(value: Value) -> anyhow::Result<Self> {
        Self::parse(&value)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn polygons_take_the_image_size() {
        let polygons = Segmentation::parse(&json!([[1, 2, 3.5, 4, 5, 6]])).unwrap();
        assert_eq!(polygons, Segmentation::Polygons(vec![vec![1.0, 2.0, 3.5, 4.0, 5.0, 6.0]]));
        let Some(v1::mask::Format::Polygon(mask)) = polygons.to_proto(10, 20).format else { panic!() };
        assert_eq!((mask.height, mask.width), (10, 20));
        assert_eq!(mask.polygons[0].xy, [1.0, 2.0, 3.5, 4.0, 5.0, 6.0]);
    }

    #[test]
    fn rle_keeps_its_own_size_and_counts() {
        let compressed = Segmentation::parse(&json!({"size": [3, 4], "counts": "52"})).unwrap();
        let Some(v1::mask::Format::Rle(mask)) = compressed.to_proto(99, 99).format else { panic!() };
        assert_eq!((mask.height, mask.width), (3, 4));
        assert_eq!(mask.counts, Some(v1::rle_mask::Counts::Compressed("52".into())));

        let runs = Segmentation::parse(&json!({"size": [3, 4], "counts": [5, 2, 5]})).unwrap();
        assert_eq!(runs, Segmentation::Rle { height: 3, width: 4, counts: RleCounts::Runs(vec![5, 2, 5]) });
    }

    #[test]
    fn bad_segmentations_say_what_is_wrong() {
        let cases = [
            (json!(null), "no segmentation"),
            (json!([["a"]]), "a polygon is a list of numbers"),
            (json!({"counts": "52"}), "RLE without size"),
            (json!({"size": [3], "counts": "52"}), "RLE size is [height, width]"),
            (json!({"size": [3, 4], "counts": [1, -2]}), "RLE counts are non-negative numbers"),
            (json!({"size": [3, 4]}), "RLE counts are a string or a list"),
        ];
        for (value, message) in cases {
            let err = Segmentation::parse(&value).unwrap_err();
            assert!(err.to_string().contains(message), "{value}: {err}");
        }
    }

    #[test]
    fn deserializes_inside_other_types_with_the_same_checks() {
        #[derive(Debug, Deserialize)]
        struct Annotation {
            segmentation: Segmentation,
        }
        let good: Annotation = serde_json::from_value(json!({"segmentation": [[0, 0, 1, 1, 0, 1]]})).unwrap();
        assert!(matches!(good.segmentation, Segmentation::Polygons(_)));
        let bad = serde_json::from_value::<Annotation>(json!({"segmentation": {"size": [3, 4]}}));
        assert!(bad.unwrap_err().to_string().contains("RLE counts are a string or a list"));
    }
}
