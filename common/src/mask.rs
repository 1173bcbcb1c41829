//! Binary masks and their encodings, bit-compatible with pycocotools: COCO RLE (uncompressed
//! counts and the compressed string), polygons, boxes, PNG masks, area and bounding box.
//!
//! Unlike pycocotools, invalid input is refused with a precise error instead of decoding to a
//! silently wrong mask. `tests/mask_codecs.rs` checks everything against fixtures written by
//! pycocotools (`tools/make_codec_fixtures.py`).

use crate::image::{ImageError, ImageLimits, decode_dynamic};

/// Polygon and box coordinates beyond this (in pixels) are refused: real ones never are, and the
/// rasteriser's work grows with the outline's length.
pub const MAX_POLYGON_COORDINATE: f64 = 1e6;

fn coordinate_ok(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_POLYGON_COORDINATE
}

/// Cap on the points the rasteriser walks for one polygon (5 per pixel of outline).
const MAX_OUTLINE_POINTS: i64 = 16_000_000;

/// Why a mask could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MaskError {
    #[error("mask is {got_height}x{got_width} but the image is {height}x{width} (height x width)")]
    SizeMismatch { height: u32, width: u32, got_height: u32, got_width: u32 },
    #[error("RLE counts sum to {sum} but a {height}x{width} mask has {pixels} pixels")]
    CountsSum { sum: u64, height: u32, width: u32, pixels: u64 },
    #[error("RLE string has invalid character {character:?} at byte {position} (allowed: '0'..='o')")]
    BadCharacter { character: char, position: usize },
    #[error("RLE string ends in the middle of a number")]
    Truncated,
    #[error("RLE string has a number too large at byte {position}")]
    Overflow { position: usize },
    #[error("RLE run {index} is negative ({value})")]
    NegativeRun { index: usize, value: i64 },
    #[error("polygon {index} has {len} coordinates; it needs an even number, at least 6 (3 points)")]
    PolygonLength { index: usize, len: usize },
    #[error("polygon {index} has a coordinate that is not finite or beyond ±{MAX_POLYGON_COORDINATE}")]
    PolygonNotFinite { index: usize },
    #[error("polygon {index} has an outline too long to rasterise")]
    PolygonTooLong { index: usize },
    #[error("a region needs at least one polygon")]
    NoPolygons,
    #[error("box {0} is not finite with non-negative width and height")]
    BadBox(String),
    #[error("mask has {got} values, {height}x{width} needs {expected}")]
    DataLength { got: usize, expected: usize, height: u32, width: u32 },
    #[error("no mask given (set one of the formats)")]
    MissingFormat,
    #[error("PNG mask: {0}")]
    Png(#[from] ImageError),
}

/// A binary mask, row-major, one byte (0 or 1) per pixel.
#[derive(Clone, PartialEq, Eq)]
pub struct Mask {
    height: u32,
    width: u32,
    data: Vec<u8>,
}

impl std::fmt::Debug for Mask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mask({}x{}, area {})", self.height, self.width, self.area())
    }
}

impl Mask {
    /// A mask from row-major values; any non-zero value is inside.
    pub fn from_row_major(height: u32, width: u32, values: &[u8]) -> Result<Self, MaskError> {
        let expected = height as usize * width as usize;
        if values.len() != expected {
            return Err(MaskError::DataLength { got: values.len(), expected, height, width });
        }
        Ok(Self { height, width, data: values.iter().map(|&v| (v != 0) as u8).collect() })
    }

    /// An all-zero mask.
    pub fn empty(height: u32, width: u32) -> Self {
        Self { height, width, data: vec![0; height as usize * width as usize] }
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    /// Row-major 0/1 values.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Number of pixels inside.
    pub fn area(&self) -> u64 {
        self.data.iter().map(|&v| v as u64).sum()
    }

    /// Fails unless the mask has the given size.
    pub fn check_size(&self, height: u32, width: u32) -> Result<(), MaskError> {
        if (self.height, self.width) != (height, width) {
            return Err(MaskError::SizeMismatch {
                height,
                width,
                got_height: self.height,
                got_width: self.width,
            });
        }
        Ok(())
    }

    /// Pixel-wise union with a mask of the same size.
    pub fn union(&mut self, other: &Mask) -> Result<(), MaskError> {
        other.check_size(self.height, self.width)?;
        self.data.iter_mut().zip(&other.data).for_each(|(a, b)| *a |= b);
        Ok(())
    }

    /// A PNG mask: a pixel is inside when it is not black (any colour channel non-zero) and,
    /// where the PNG has alpha, not fully transparent.
    pub fn from_png(bytes: &[u8], limits: &ImageLimits) -> Result<Self, MaskError> {
        let image = decode_dynamic(bytes, limits)?;
        let (width, height) = (image.width(), image.height());
        // into_rgba16 gives images without alpha an opaque one, so one rule covers every format.
        let data = image
            .into_rgba16()
            .into_raw()
            .chunks_exact(4)
            .map(|p| (p[3] != 0 && p[..3].iter().any(|&v| v != 0)) as u8)
            .collect();
        Ok(Self { height, width, data })
    }

    /// The union of polygons, rasterised exactly as pycocotools' `frPyObjects` + `merge`.
    /// Each polygon is `[x0, y0, x1, y1, ...]` in pixel coordinates.
    pub fn from_polygons(height: u32, width: u32, polygons: &[Vec<f64>]) -> Result<Self, MaskError> {
        if polygons.is_empty() {
            return Err(MaskError::NoPolygons);
        }
        let mut mask = Mask::empty(height, width);
        for (index, xy) in polygons.iter().enumerate() {
            if xy.len() < 6 || xy.len() % 2 != 0 {
                return Err(MaskError::PolygonLength { index, len: xy.len() });
            }
            if !xy.iter().all(|v| coordinate_ok(*v)) {
                return Err(MaskError::PolygonNotFinite { index });
            }
            let rle = Rle::from_polygon(height, width, xy).ok_or(MaskError::PolygonTooLong { index })?;
            mask.union(&rle.to_mask())?;
        }
        Ok(mask)
    }

    /// A box `[x, y, w, h]` rasterised as pycocotools' `frBbox` (as the polygon of its corners).
    pub fn from_bbox(height: u32, width: u32, bbox: [f64; 4]) -> Result<Self, MaskError> {
        let [x, y, w, h] = bbox;
        let corners = [x, y, x, y + h, x + w, y + h, x + w, y];
        if w < 0.0 || h < 0.0 || !corners.iter().all(|v| coordinate_ok(*v)) {
            return Err(MaskError::BadBox(format!("{bbox:?}")));
        }
        let rle = Rle::from_polygon(height, width, &corners).ok_or(MaskError::BadBox(format!("{bbox:?}")))?;
        Ok(rle.to_mask())
    }

    /// COCO run-length encoding (column-major runs, starting with zeros).
    pub fn to_rle(&self) -> Rle {
        let (h, w) = (self.height as usize, self.width as usize);
        let mut counts = Vec::new();
        let (mut current, mut run) = (0u8, 0u32);
        for x in 0..w {
            for y in 0..h {
                let v = self.data[y * w + x];
                if v != current {
                    counts.push(run);
                    run = 0;
                    current = v;
                }
                run += 1;
            }
        }
        counts.push(run);
        Rle { height: self.height, width: self.width, counts }
    }
}

/// A COCO run-length encoded mask: alternating runs of 0s and 1s over the pixels in column-major
/// order, the first run being 0s (possibly of length 0).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rle {
    height: u32,
    width: u32,
    counts: Vec<u32>,
}

impl Rle {
    /// Uncompressed counts; they must sum to height × width.
    pub fn from_counts(height: u32, width: u32, counts: Vec<u32>) -> Result<Self, MaskError> {
        let sum: u64 = counts.iter().map(|&c| c as u64).sum();
        let pixels = height as u64 * width as u64;
        if sum != pixels {
            return Err(MaskError::CountsSum { sum, height, width, pixels });
        }
        Ok(Self { height, width, counts })
    }

    /// pycocotools' compressed string (`rleFrString`), validated: only characters '0'..='o', no
    /// number cut off at the end, no negative run, counts summing to height × width.
    pub fn from_compressed(height: u32, width: u32, text: &str) -> Result<Self, MaskError> {
        let mut counts: Vec<u32> = Vec::new();
        let mut values: Vec<i64> = Vec::new();
        let bytes = text.as_bytes();
        let mut p = 0;
        while p < bytes.len() {
            let (mut x, mut k, mut more) = (0i64, 0u32, true);
            while more {
                let Some(&byte) = bytes.get(p) else {
                    return Err(MaskError::Truncated);
                };
                if !(b'0'..=b'o').contains(&byte) {
                    let character = text[p..].chars().next().unwrap_or('?');
                    return Err(MaskError::BadCharacter { character, position: p });
                }
                // 5 bits per character; anything past 7 characters cannot be a valid run.
                if k >= 7 {
                    return Err(MaskError::Overflow { position: p });
                }
                let c = (byte - b'0') as i64;
                x |= (c & 0x1f) << (5 * k);
                more = c & 0x20 != 0;
                p += 1;
                k += 1;
                if !more && c & 0x10 != 0 {
                    x |= -1i64 << (5 * k);
                }
            }
            let index = values.len();
            if index > 2 {
                x += values[index - 2];
            }
            if x < 0 {
                return Err(MaskError::NegativeRun { index, value: x });
            }
            if x > u32::MAX as i64 {
                return Err(MaskError::Overflow { position: p });
            }
            values.push(x);
            counts.push(x as u32);
        }
        Self::from_counts(height, width, counts)
    }

    /// The compressed string (`rleToString`).
    pub fn to_compressed(&self) -> String {
        let mut out = String::new();
        for (i, &count) in self.counts.iter().enumerate() {
            let mut x = count as i64;
            if i > 2 {
                x -= self.counts[i - 2] as i64;
            }
            let mut more = true;
            while more {
                let mut c = x & 0x1f;
                x >>= 5;
                more = if c & 0x10 != 0 { x != -1 } else { x != 0 };
                if more {
                    c |= 0x20;
                }
                out.push((c as u8 + b'0') as char);
            }
        }
        out
    }

    pub fn height(&self) -> u32 {
        self.height
    }

    pub fn width(&self) -> u32 {
        self.width
    }

    /// Uncompressed counts.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Number of pixels inside (`rleArea`).
    pub fn area(&self) -> u64 {
        self.counts.iter().skip(1).step_by(2).map(|&c| c as u64).sum()
    }

    /// Bounding box `[x, y, w, h]` as pycocotools' `toBbox` (all zeros for an empty mask).
    pub fn bbox(&self) -> [f64; 4] {
        let h = self.height as u64;
        let m = self.counts.len() / 2 * 2;
        if m == 0 || h == 0 {
            return [0.0; 4];
        }
        let (mut xs, mut ys, mut xe, mut ye) = (self.width as u64, h, 0u64, 0u64);
        let (mut cc, mut xp) = (0u64, 0u64);
        for j in 0..m {
            cc += self.counts[j] as u64;
            // Last pixel of a run of 1s, first pixel of the following run of 0s.
            let t = cc - (j % 2) as u64;
            let (x, y) = (t / h, t % h);
            if j % 2 == 0 {
                xp = x;
            } else if xp < x {
                // The run wraps a column: it covers every row.
                ys = 0;
                ye = h - 1;
            }
            xs = xs.min(x);
            xe = xe.max(x);
            ys = ys.min(y);
            ye = ye.max(y);
        }
        [xs as f64, ys as f64, (xe - xs + 1) as f64, (ye - ys + 1) as f64]
    }

    /// Decodes to a dense mask.
    pub fn to_mask(&self) -> Mask {
        let (h, w) = (self.height as usize, self.width as usize);
        let mut data = vec![0u8; h * w];
        let mut position = 0usize;
        for (i, &count) in self.counts.iter().enumerate() {
            let end = position + count as usize;
            if i % 2 == 1 {
                for index in position..end {
                    // Column-major index to row-major.
                    data[(index % h) * w + index / h] = 1;
                }
            }
            position = end;
        }
        Mask { height: self.height, width: self.width, data }
    }

    /// One polygon rasterised as pycocotools' `rleFrPoly`: the outline is walked on a 5× grid,
    /// its crossings of pixel-centre columns are collected, and each column is filled between
    /// crossings (even-odd). `None` when the outline has more than `MAX_OUTLINE_POINTS` points.
    fn from_polygon(height: u32, width: u32, xy: &[f64]) -> Option<Self> {
        const SCALE: f64 = 5.0;
        let (h, w) = (height as i64, width as i64);
        let k = xy.len() / 2;
        // C's `(int)` truncates towards zero, as `as` does.
        let mut xs: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j] + 0.5) as i32 as i64).collect();
        let mut ys: Vec<i64> = (0..k).map(|j| (SCALE * xy[2 * j + 1] + 0.5) as i32 as i64).collect();
        xs.push(xs[0]);
        ys.push(ys[0]);
        let points: i64 = (0..k).map(|j| (xs[j] - xs[j + 1]).abs().max((ys[j] - ys[j + 1]).abs()) + 1).sum();
        if points > MAX_OUTLINE_POINTS {
            return None;
        }

        // Dense points along every edge.
        let (mut u, mut v) = (Vec::new(), Vec::new());
        for j in 0..k {
            let (mut x0, mut x1, mut y0, mut y1) = (xs[j], xs[j + 1], ys[j], ys[j + 1]);
            let dx = (x1 - x0).abs();
            let dy = (y0 - y1).abs();
            let flip = (dx >= dy && x0 > x1) || (dx < dy && y0 > y1);
            if flip {
                std::mem::swap(&mut x0, &mut x1);
                std::mem::swap(&mut y0, &mut y1);
            }
            if dx >= dy {
                let s = if dx == 0 { 0.0 } else { (y1 - y0) as f64 / dx as f64 };
                for d in 0..=dx {
                    let t = if flip { dx - d } else { d };
                    u.push(t + x0);
                    v.push((y0 as f64 + s * t as f64 + 0.5) as i32 as i64);
                }
            } else {
                let s = (x1 - x0) as f64 / dy as f64;
                for d in 0..=dy {
                    let t = if flip { dy - d } else { d };
                    v.push(t + y0);
                    u.push((x0 as f64 + s * t as f64 + 0.5) as i32 as i64);
                }
            }
        }

        // Points where the outline crosses a pixel-centre column, back on the pixel grid.
        let mut starts: Vec<u64> = Vec::new();
        for j in 1..u.len() {
            if u[j] == u[j - 1] {
                continue;
            }
            let xd = (if u[j] < u[j - 1] { u[j] } else { u[j] - 1 }) as f64;
            let xd = (xd + 0.5) / SCALE - 0.5;
            if xd.floor() != xd || xd < 0.0 || xd > (w - 1) as f64 {
                continue;
            }
            let yd = (if v[j] < v[j - 1] { v[j] } else { v[j - 1] }) as f64;
            let yd = ((yd + 0.5) / SCALE - 0.5).clamp(0.0, h as f64).ceil();
            starts.push((xd as i64 * h + yd as i64) as u64);
        }
        starts.push((h * w) as u64);
        starts.sort_unstable();

        // Differences between sorted crossings are the runs; a zero run merges its neighbours.
        let mut previous = 0u64;
        let runs: Vec<u64> = starts
            .iter()
            .map(|&s| {
                let run = s - previous;
                previous = s;
                run
            })
            .collect();
        let mut counts: Vec<u32> = vec![runs[0] as u32];
        let mut j = 1;
        while j < runs.len() {
            if runs[j] > 0 {
                counts.push(runs[j] as u32);
                j += 1;
            } else {
                j += 1;
                if j < runs.len() {
                    *counts.last_mut().expect("counts starts non-empty. This is a bug.") += runs[j] as u32;
                    j += 1;
                }
            }
        }
        Some(Self { height, width, counts })
    }
}

impl From<&Mask> for Rle {
    fn from(mask: &Mask) -> Self {
        mask.to_rle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_small_mask() {
        // Rows [0 1], [1 1], [0 0]: column-major the pixels read 0 1 0 | 1 1 0.
        let mask = Mask::from_row_major(3, 2, &[0, 1, 1, 1, 0, 0]).unwrap();
        let rle = mask.to_rle();
        assert_eq!(rle.counts(), &[1, 1, 1, 2, 1]);
        assert_eq!(rle.area(), 3);
        assert_eq!(rle.to_mask(), mask);
        let text = rle.to_compressed();
        assert_eq!(Rle::from_compressed(3, 2, &text).unwrap(), rle);
    }

    #[test]
    fn refuses_counts_that_do_not_cover_the_mask() {
        assert_eq!(
            Rle::from_counts(2, 2, vec![1, 2]),
            Err(MaskError::CountsSum { sum: 3, height: 2, width: 2, pixels: 4 })
        );
    }

    #[test]
    fn refuses_bad_strings() {
        assert!(matches!(Rle::from_compressed(2, 2, "1~"), Err(MaskError::BadCharacter { position: 1, .. })));
        // 'P' (0x50 - 0x30 = 0x20) has the continuation bit set and nothing follows.
        assert_eq!(Rle::from_compressed(2, 2, "P"), Err(MaskError::Truncated));
        assert!(matches!(Rle::from_compressed(2, 2, "PPPPPPPP0"), Err(MaskError::Overflow { .. })));
        // A count of -1 ('O' is 31: data bits 1111 with the sign bit, no continuation).
        assert!(matches!(Rle::from_compressed(2, 2, "O"), Err(MaskError::NegativeRun { .. })));
        assert_eq!(Rle::from_compressed(2, 2, "o"), Err(MaskError::Truncated));
        assert!(matches!(Rle::from_compressed(2, 2, "é"), Err(MaskError::BadCharacter { .. })));
    }

    #[test]
    fn refuses_bad_polygons_and_boxes() {
        assert_eq!(Mask::from_polygons(4, 4, &[]), Err(MaskError::NoPolygons));
        assert_eq!(
            Mask::from_polygons(4, 4, &[vec![0.0, 0.0, 1.0, 1.0]]),
            Err(MaskError::PolygonLength { index: 0, len: 4 })
        );
        assert_eq!(
            Mask::from_polygons(4, 4, &[vec![0.0, 0.0, 3.0, 0.0, 3.0, f64::NAN]]),
            Err(MaskError::PolygonNotFinite { index: 0 })
        );
        assert!(Mask::from_bbox(4, 4, [0.0, 0.0, -1.0, 2.0]).is_err());
    }

    #[test]
    fn box_covers_whole_pixels() {
        let mask = Mask::from_bbox(6, 8, [1.0, 2.0, 3.0, 2.0]).unwrap();
        assert_eq!(mask.area(), 6);
        assert_eq!(mask.to_rle().bbox(), [1.0, 2.0, 3.0, 2.0]);
    }

    #[test]
    fn size_mismatch_names_both_sizes() {
        let err = Mask::empty(2, 3).check_size(3, 2).unwrap_err();
        assert_eq!(err.to_string(), "mask is 2x3 but the image is 3x2 (height x width)");
    }
}

/// Decodes a mask of the public API, checking that it has the image's size.
pub fn mask_from_proto(
    mask: &osprey_proto::v1::Mask,
    height: u32,
    width: u32,
    limits: &ImageLimits,
) -> Result<Mask, MaskError> {
    use osprey_proto::v1::mask::Format;
    let decoded = match &mask.format {
        Some(Format::Rle(rle)) => {
            // The size first: counts that sum to a huge declared size would allocate it.
            check_declared_size(rle.height, rle.width, height, width)?;
            rle_from_proto(rle)?.to_mask()
        }
        Some(Format::Png(png)) => Mask::from_png(png, limits)?,
        Some(Format::Polygon(polygon)) => {
            check_declared_size(polygon.height, polygon.width, height, width)?;
            let polygons: Vec<Vec<f64>> = polygon.polygons.iter().map(|p| p.xy.clone()).collect();
            Mask::from_polygons(height, width, &polygons)?
        }
        None => return Err(MaskError::MissingFormat),
    };
    decoded.check_size(height, width)?;
    Ok(decoded)
}

/// A mask's declared size must be the image's, checked before its pixels are made.
fn check_declared_size(mask_height: u32, mask_width: u32, height: u32, width: u32) -> Result<(), MaskError> {
    if (mask_height, mask_width) != (height, width) {
        return Err(MaskError::SizeMismatch {
            height,
            width,
            got_height: mask_height,
            got_width: mask_width,
        });
    }
    Ok(())
}

/// A COCO RLE of the API (compressed string or counts), validated.
pub fn rle_from_proto(rle: &osprey_proto::v1::RleMask) -> Result<Rle, MaskError> {
    use osprey_proto::v1::rle_mask::Counts;
    match &rle.counts {
        Some(Counts::Compressed(text)) => Rle::from_compressed(rle.height, rle.width, text),
        Some(Counts::Uncompressed(runs)) => Rle::from_counts(rle.height, rle.width, runs.counts.clone()),
        None => Err(MaskError::MissingFormat),
    }
}

/// The API form of an RLE (compressed string).
pub fn rle_to_proto(rle: &Rle) -> osprey_proto::v1::RleMask {
    osprey_proto::v1::RleMask {
        height: rle.height(),
        width: rle.width(),
        counts: Some(osprey_proto::v1::rle_mask::Counts::Compressed(rle.to_compressed())),
    }
}

/// A worker message's RLE (compressed string), validated.
pub fn rle_from_worker(rle: &osprey_proto::worker::v1::RleMask) -> Result<Rle, MaskError> {
    Rle::from_compressed(rle.height, rle.width, &rle.counts)
}

/// The worker messages' form of an RLE.
pub fn rle_to_worker(rle: &Rle) -> osprey_proto::worker::v1::RleMask {
    osprey_proto::worker::v1::RleMask {
        height: rle.height(),
        width: rle.width(),
        counts: rle.to_compressed(),
    }
}

#[cfg(test)]
mod proto_tests {
    use osprey_proto::v1::{self, mask::Format, rle_mask::Counts};

    use super::*;

    fn rle(height: u32, width: u32, counts: Counts) -> v1::Mask {
        v1::Mask { format: Some(Format::Rle(v1::RleMask { height, width, counts: Some(counts) })) }
    }

    #[test]
    fn every_api_format_decodes_and_is_size_checked() {
        let limits = ImageLimits::default();
        let expected = Mask::from_row_major(2, 3, &[0, 1, 1, 0, 1, 0]).unwrap();
        let compressed = rle(2, 3, Counts::Compressed(expected.to_rle().to_compressed()));
        assert_eq!(mask_from_proto(&compressed, 2, 3, &limits).unwrap(), expected);
        let counts =
            rle(2, 3, Counts::Uncompressed(v1::RunLengths { counts: expected.to_rle().counts().to_vec() }));
        assert_eq!(mask_from_proto(&counts, 2, 3, &limits).unwrap(), expected);
        assert_eq!(rle_from_proto(&rle_to_proto(&expected.to_rle())).unwrap(), expected.to_rle());
        assert_eq!(rle_from_worker(&rle_to_worker(&expected.to_rle())).unwrap(), expected.to_rle());

        assert!(matches!(mask_from_proto(&compressed, 3, 2, &limits), Err(MaskError::SizeMismatch { .. })));
        let square = vec![0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 0.0];
        let polygon = v1::Mask {
            format: Some(Format::Polygon(v1::PolygonMask {
                height: 4,
                width: 4,
                polygons: vec![v1::Polygon { xy: square }],
            })),
        };
        assert_eq!(mask_from_proto(&polygon, 4, 4, &limits).unwrap().area(), 4);
        assert!(matches!(mask_from_proto(&polygon, 5, 4, &limits), Err(MaskError::SizeMismatch { .. })));
        assert_eq!(mask_from_proto(&v1::Mask { format: None }, 2, 2, &limits), Err(MaskError::MissingFormat));
        let png = v1::Mask { format: Some(Format::Png(vec![0x89, b'P', b'N', b'G'])) };
        assert!(matches!(mask_from_proto(&png, 2, 2, &limits), Err(MaskError::Png(_))));
    }
}
