//! Label Studio's brush RLE: the `rle` of a `brushlabels` result.
//!
//! Label Studio stores a brush region as an RGBA bitmap of the image's size, flattened row by
//! row (4 bytes per pixel), packed as a bit stream: a 32-bit value count, a 5-bit word size minus
//! one, four 4-bit run-length field widths minus one, then blocks. A block starts with one bit:
//! 1 = a run (a 2-bit width index, the run length minus one in that many bits, one word), 0 = a
//! literal block (the same index and length, then that many words). The stream is zero-padded
//! to whole bytes, which are sent as a list of numbers.
//!
//! We write exactly what the Label Studio SDK's `brush.mask2rle` writes for a 0/255 mask (word
//! size 8, widths 3, 4, 8 and 16 bits, one block per run, at least one padding bit), so that
//! `tests/fixtures/integrations/label_studio_brush_rle.json`, made with that encoder, matches byte
//! for byte.

use osprey_common::mask::Mask;

/// Run-length field widths in bits, as the SDK encoder chooses them.
const RUN_WIDTHS: [u32; 4] = [3, 4, 8, 16];
/// Bits per value.
const WORD_BITS: u32 = 8;

/// Appends bits, most significant first.
struct BitWriter {
    bytes: Vec<u8>,
    bits: u64,
}

impl BitWriter {
    fn new() -> Self {
        Self { bytes: Vec::new(), bits: 0 }
    }

    fn push(&mut self, value: u32, width: u32) {
        for shift in (0..width).rev() {
            let bit = ((value >> shift) & 1) as u8;
            if self.bits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            if bit == 1 {
                let last = self.bytes.len() - 1;
                self.bytes[last] |= 0x80 >> (self.bits % 8);
            }
            self.bits += 1;
        }
    }

    /// The bytes, after the SDK's padding: 8 - (bits mod 8) zero bits, so a whole extra zero
    /// byte when the stream already ends on a byte boundary.
    fn finish(mut self) -> Vec<u8> {
        if self.bits.is_multiple_of(8) {
            self.bytes.push(0);
        }
        self.bytes
    }
}

/// One run of `length` equal `value`s.
fn push_run(out: &mut BitWriter, value: u8, length: usize) {
    let value = value as u32;
    if length == 1 {
        // A literal block of one word.
        out.push(0, 1);
        out.push(0, 2);
        out.push(0, RUN_WIDTHS[0]);
        out.push(value, WORD_BITS);
        return;
    }
    let mut left = length;
    // Runs longer than the widest field are split into full 65,536-value runs first.
    while left > 1 << 16 {
        out.push(1, 1);
        out.push(3, 2);
        out.push((1 << 16) - 1, 16);
        out.push(value, WORD_BITS);
        left -= 1 << 16;
    }
    let index = RUN_WIDTHS.iter().position(|&bits| left <= 1 << bits).unwrap_or(3);
    out.push(1, 1);
    out.push(index as u32, 2);
    out.push((left - 1) as u32, RUN_WIDTHS[index]);
    out.push(value, WORD_BITS);
}

/// Encodes flattened values (the SDK's `encode_rle`).
pub fn encode_values(values: &[u8]) -> Vec<u8> {
    let mut out = BitWriter::new();
    out.push(values.len() as u32, 32);
    out.push(WORD_BITS - 1, 5);
    for bits in RUN_WIDTHS {
        out.push(bits - 1, 4);
    }
    let mut start = 0;
    while start < values.len() {
        let value = values[start];
        let end = values[start..].iter().position(|&v| v != value).map_or(values.len(), |n| start + n);
        push_run(&mut out, value, end - start);
        start = end;
    }
    out.finish()
}

/// A mask as Label Studio's brush RLE: every channel 255 inside, 0 outside. Runs are counted
/// over the RGBA values without building the 4-bytes-per-pixel bitmap.
pub fn encode_mask(mask: &Mask) -> Vec<u8> {
    let data = mask.data();
    let mut out = BitWriter::new();
    out.push((data.len() * 4) as u32, 32);
    out.push(WORD_BITS - 1, 5);
    for bits in RUN_WIDTHS {
        out.push(bits - 1, 4);
    }
    let mut start = 0;
    while start < data.len() {
        let inside = data[start];
        let end = data[start..].iter().position(|&v| v != inside).map_or(data.len(), |n| start + n);
        push_run(&mut out, if inside != 0 { 255 } else { 0 }, (end - start) * 4);
        start = end;
    }
    out.finish()
}

/// Decodes a brush RLE to its flattened values (what Label Studio's front end does), for tests
/// and for reading brush regions back.
pub fn decode(bytes: &[u8]) -> Result<Vec<u8>, String> {
    let mut position = 0u64;
    let total_bits = bytes.len() as u64 * 8;
    let mut read = |width: u32| -> Result<u32, String> {
        if position + width as u64 > total_bits {
            return Err("brush RLE ends in the middle of a block".into());
        }
        let mut value = 0u32;
        for _ in 0..width {
            let bit = (bytes[(position / 8) as usize] >> (7 - position % 8)) & 1;
            value = (value << 1) | bit as u32;
            position += 1;
        }
        Ok(value)
    };
    let count = read(32)? as usize;
    let word = read(5)? + 1;
    let widths = [read(4)? + 1, read(4)? + 1, read(4)? + 1, read(4)? + 1];
    if count > bytes.len().saturating_mul(8 << 16) {
        return Err(format!("brush RLE declares {count} values, more than its size can hold"));
    }
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        let is_run = read(1)? == 1;
        let width = widths[read(2)? as usize];
        let length = read(width)? as usize + 1;
        let length = length.min(count - out.len());
        if is_run {
            let value = read(word)? as u8;
            out.extend(std::iter::repeat_n(value, length));
        } else {
            for _ in 0..length {
                out.push(read(word)? as u8);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Cases made by the Label Studio SDK's encoder (`tools/make_label_studio_fixtures.py`).
    const FIXTURE: &str = include_str!("../../../tests/fixtures/integrations/label_studio_brush_rle.json");

    #[test]
    fn matches_the_sdk_encoder_byte_for_byte() {
        let cases: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let cases = cases.as_array().unwrap();
        assert!(cases.len() >= 4);
        for case in cases {
            let name = case["name"].as_str().unwrap();
            let height = case["height"].as_u64().unwrap() as u32;
            let width = case["width"].as_u64().unwrap() as u32;
            let mask: Vec<u8> =
                case["mask"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
            let expected: Vec<u8> =
                case["rle"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
            let mask = Mask::from_row_major(height, width, &mask).unwrap();
            assert_eq!(encode_mask(&mask), expected, "{name}");
            let rgba: Vec<u8> = mask.data().iter().flat_map(|&v| [v * 255; 4]).collect();
            assert_eq!(encode_values(&rgba), expected, "{name}");
            assert_eq!(decode(&expected).unwrap(), rgba, "{name}");
        }
    }

    #[test]
    fn long_runs_and_single_values_round_trip() {
        let mut values = vec![0u8; 70_000];
        values.extend([5, 6, 6, 7]);
        values.extend(vec![255u8; 300]);
        values.extend(vec![1u8; 12]);
        assert_eq!(decode(&encode_values(&values)).unwrap(), values);
    }

    #[test]
    fn truncated_input_is_an_error() {
        let bytes = encode_values(&[1, 2, 3, 4, 5]);
        assert!(decode(&bytes[..bytes.len() - 3]).is_err());
        assert!(decode(&[]).is_err());
    }
}
