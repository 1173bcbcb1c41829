//! What the gateway keeps in the shared cache: the keys of its entries and their byte formats
//! (feature blobs, registered pixels, answers). The store itself is the `cache` module, which
//! knows nothing of them.

use osprey_common::ServiceError;
use osprey_common::image::RgbImage;
use osprey_common::mask::Mask;
use osprey_proto::v1;
use osprey_proto::worker::v1 as worker;
use prost::Message;

/// The cache key of an image's vision features.
pub fn features_key(image_key: &str) -> String {
    format!("features:{image_key}")
}

/// The cache key of an image's decoded pixels (registered images).
pub fn pixels_key(image_key: &str) -> String {
    format!("pixels:{image_key}")
}

/// The cache key of one answer: a digest of everything the answer depends on (the image key,
/// which includes the model revision, the masks, the question, earlier turns and the generation
/// parameters), written by the caller as `parts`.
pub fn result_key(parts: &[&[u8]]) -> String {
    let mut hasher = blake3::Hasher::new();
    for part in parts {
        // Length-prefixed, so that parts cannot run into each other.
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    format!("result:{}", hasher.finalize().to_hex())
}

/// The result-cache key of `question` (tagged with its kind) about `masks` of image `image_key`,
/// after `history`, generated with `parameters`.
pub fn answer_key(
    model_revision: &str,
    image_key: &str,
    masks: &[&Mask],
    question: &str,
    history: &[v1::Turn],
    parameters: Option<&worker::GenerationParameters>,
) -> String {
    let mask_digests: Vec<[u8; 32]> = masks
        .iter()
        .map(|mask| {
            let mut hasher = blake3::Hasher::new();
            hasher.update(&mask.height().to_le_bytes());
            hasher.update(&mask.width().to_le_bytes());
            hasher.update(mask.data());
            *hasher.finalize().as_bytes()
        })
        .collect();
    let counts = [masks.len() as u64, history.len() as u64].map(u64::to_le_bytes);
    let parameters = parameters.map(Message::encode_to_vec).unwrap_or_default();
    let mut parts: Vec<&[u8]> =
        vec![b"osprey-answer-v1", model_revision.as_bytes(), image_key.as_bytes(), &counts[0], &counts[1]];
    parts.extend(mask_digests.iter().map(|d| d.as_slice()));
    parts.push(question.as_bytes());
    for turn in history {
        parts.push(turn.question.as_bytes());
        parts.push(turn.answer.as_bytes());
    }
    parts.push(&parameters);
    result_key(&parts)
}

/// Every entry starts with this tag and the BLAKE3 digest of its cache key and the rest, so that a
/// truncated or altered entry (a bad Redis, a flipped bit, another program writing our keys) is
/// detected and treated as missing: recomputed, never served. The key is in the digest so that an
/// intact entry found under another key (another image's features, answer or pixels) is refused
/// too. Entries of an older format (`osp1`, digest of the payload alone) are misses.
const ENTRY_TAG: &[u8; 4] = b"osp2";
/// Bytes of the tag and the digest in front of every entry's payload.
pub const SEAL_BYTES: usize = ENTRY_TAG.len() + blake3::OUT_LEN;

/// The digest that seals `payload` stored under cache key `key`.
fn digest(key: &str, payload: &[u8]) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&(key.len() as u64).to_le_bytes());
    hasher.update(key.as_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// An entry for cache key `key` of `capacity` payload bytes written by `fill`, sealed with the
/// tag and its digest.
fn sealed(key: &str, capacity: usize, fill: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(SEAL_BYTES + capacity);
    bytes.extend_from_slice(ENTRY_TAG);
    bytes.extend_from_slice(&[0; blake3::OUT_LEN]);
    fill(&mut bytes);
    let digest = digest(key, &bytes[SEAL_BYTES..]);
    bytes[ENTRY_TAG.len()..SEAL_BYTES].copy_from_slice(digest.as_bytes());
    bytes
}

/// The payload of the entry found under `key`, or `None` when the tag or the digest does not match.
/// A refused entry is counted in `osprey_cache_damaged_entries_total{kind}` (`kind`: the key's
/// prefix, e.g. `features`), so that damage is seen even though it costs no request.
fn unsealed<'a>(key: &str, bytes: &'a [u8]) -> Option<&'a [u8]> {
    let payload = checked_payload(key, bytes);
    if payload.is_none() {
        let kind = match key.split_once(':') {
            Some(("features", _)) => "features",
            Some(("pixels", _)) => "pixels",
            Some(("result", _)) => "result",
            _ => "other",
        };
        metrics::counter!("osprey_cache_damaged_entries_total", "kind" => kind).increment(1);
    }
    payload
}

fn checked_payload<'a>(key: &str, bytes: &'a [u8]) -> Option<&'a [u8]> {
    let (seal, payload) = bytes.split_at_checked(SEAL_BYTES)?;
    let (tag, seal_digest) = seal.split_at(ENTRY_TAG.len());
    (tag == ENTRY_TAG && digest(key, payload) == *<&[u8; blake3::OUT_LEN]>::try_from(seal_digest).ok()?)
        .then_some(payload)
}

/// What the result cache keeps under `key` of an answer: the LLM's final response without its
/// timings.
pub fn answer_to_bytes(key: &str, response: &worker::GenerateResponse) -> Vec<u8> {
    let stored = worker::GenerateResponse {
        question_index: 0,
        text: String::new(),
        finished: true,
        timing: None,
        prefix_cache_hit: false,
        ..response.clone()
    };
    sealed(key, stored.encoded_len(), |bytes| {
        stored.encode(bytes).expect("a Vec grows as needed. This is a bug.")
    })
}

pub fn answer_from_bytes(key: &str, bytes: &[u8]) -> Option<worker::GenerateResponse> {
    worker::GenerateResponse::decode(unsealed(key, bytes)?).ok()
}

/// Cached blob under `key`: the feature revision (length-prefixed) then the safetensors bytes,
/// sealed.
pub fn blob_to_bytes(key: &str, blob: &worker::FeatureBlob) -> Vec<u8> {
    let revision = blob.feature_revision.as_bytes();
    sealed(key, 4 + revision.len() + blob.safetensors.len(), |bytes| {
        bytes.extend_from_slice(&(revision.len() as u32).to_le_bytes());
        bytes.extend_from_slice(revision);
        bytes.extend_from_slice(&blob.safetensors);
    })
}

pub fn blob_from_bytes(key: &str, bytes: &[u8]) -> Option<worker::FeatureBlob> {
    let bytes = unsealed(key, bytes)?;
    let n = u32::from_le_bytes(bytes.get(..4)?.try_into().ok()?) as usize;
    let revision = std::str::from_utf8(bytes.get(4..4 + n)?).ok()?.to_string();
    Some(worker::FeatureBlob { safetensors: bytes.get(4 + n..)?.to_vec(), feature_revision: revision })
}

/// Bytes before the pixels of a registered image: the seal, then its width and height. Reading
/// the size alone cannot check the digest; the pixels are checked when they are read.
pub const PIXELS_HEADER_BYTES: usize = SEAL_BYTES + 8;

/// Registered pixels under `key`: width and height (u32 little-endian) then RGB8, sealed.
pub fn pixels_to_bytes(key: &str, image: &RgbImage) -> Vec<u8> {
    sealed(key, 8 + image.pixels().len(), |bytes| {
        bytes.extend_from_slice(&image.width().to_le_bytes());
        bytes.extend_from_slice(&image.height().to_le_bytes());
        bytes.extend_from_slice(image.pixels());
    })
}

/// Width and height from the first [`PIXELS_HEADER_BYTES`] of registered pixels.
pub fn size_from_header(header: &[u8]) -> Result<(u32, u32), ServiceError> {
    let word = |at: usize| {
        header.get(at..at + 4).map(|b| u32::from_le_bytes(b.try_into().expect("four bytes. This is a bug.")))
    };
    match (header.get(..ENTRY_TAG.len()), word(SEAL_BYTES), word(SEAL_BYTES + 4)) {
        (Some(tag), Some(width), Some(height)) if tag == ENTRY_TAG => Ok((width, height)),
        _ => Err(corrupt()),
    }
}

pub fn pixels_from_bytes(key: &str, bytes: &[u8]) -> Result<RgbImage, ServiceError> {
    let (width, height) = size_from_header(bytes)?;
    let pixels = unsealed(key, bytes).ok_or_else(corrupt)?;
    RgbImage::from_raw(width, height, pixels[8..].to_vec()).map_err(|_| corrupt())
}

/// The client's pixels cannot be recomputed: the client registers the image again.
fn corrupt() -> ServiceError {
    ServiceError::FailedPrecondition("the registered image is damaged in the cache; register it again".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_round_trip() {
        let blob = worker::FeatureBlob { safetensors: vec![1, 2, 3], feature_revision: "rev".into() };
        assert_eq!(blob_from_bytes("k", &blob_to_bytes("k", &blob)), Some(blob));
        assert_eq!(blob_from_bytes("k", &[9, 0, 0, 0, b'x']), None);

        let image = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let bytes = pixels_to_bytes("k", &image);
        assert_eq!(size_from_header(&bytes[..PIXELS_HEADER_BYTES]).unwrap(), (2, 1));
        let back = pixels_from_bytes("k", &bytes).unwrap();
        assert_eq!((back.width(), back.height(), back.pixels()), (2, 1, image.pixels()));
        assert!(pixels_from_bytes("k", &bytes[..PIXELS_HEADER_BYTES + 2]).is_err());
        assert!(size_from_header(&bytes[..5]).is_err());
    }

    #[test]
    fn damaged_entries_are_refused() {
        let blob = worker::FeatureBlob { safetensors: vec![7; 64], feature_revision: "rev".into() };
        let image = RgbImage::from_raw(2, 1, vec![1, 2, 3, 4, 5, 6]).unwrap();
        let answer = worker::GenerateResponse { answer: "a cat".into(), ..Default::default() };
        let key = "features:img";
        let entries =
            [blob_to_bytes(key, &blob), pixels_to_bytes(key, &image), answer_to_bytes(key, &answer)];
        let readable_under = |key: &str, bytes: &[u8]| {
            [
                blob_from_bytes(key, bytes).is_some(),
                pixels_from_bytes(key, bytes).is_ok(),
                answer_from_bytes(key, bytes).is_some(),
            ]
        };
        let readable = |bytes: &[u8]| readable_under(key, bytes);
        for (kind, entry) in entries.iter().enumerate() {
            assert!(readable(entry)[kind], "entry {kind} reads back");
            // Every single flipped bit, anywhere, and every truncation is caught.
            for at in 0..entry.len() {
                let mut flipped = entry.clone();
                flipped[at] ^= 0x10;
                assert!(!readable(&flipped)[kind], "entry {kind}, byte {at} flipped");
            }
            for len in 0..entry.len() {
                assert!(!readable(&entry[..len])[kind], "entry {kind} cut to {len} bytes");
            }
            // An entry without the seal (an old format) is a miss, not a misread.
            assert!(!readable(&entry[SEAL_BYTES..])[kind]);
            // An intact entry under another key (another image's, say) is a miss too.
            assert!(!readable_under("features:img2", entry)[kind], "entry {kind} under another key");
        }
    }

    #[test]
    fn refused_entries_are_counted_by_kind() {
        let blob = worker::FeatureBlob { safetensors: vec![7; 8], feature_revision: "rev".into() };
        let entry = blob_to_bytes("features:img", &blob);
        let counted = osprey_test_support::counted(|| {
            assert!(blob_from_bytes("features:img", &entry).is_some());
            assert!(blob_from_bytes("features:img", &entry[..entry.len() - 1]).is_none());
            assert!(answer_from_bytes("result:abc", &entry).is_none());
        });
        assert_eq!(
            counted,
            [
                ("osprey_cache_damaged_entries_total{kind=features}".to_string(), 1),
                ("osprey_cache_damaged_entries_total{kind=result}".to_string(), 1)
            ]
        );
    }

    #[test]
    fn answer_keys_change_with_every_input() {
        let a = Mask::empty(2, 2);
        let b = Mask::from_row_major(2, 2, &[1, 0, 0, 0]).unwrap();
        let turn = v1::Turn { question: "q".into(), answer: "a".into() };
        let greedy = worker::GenerationParameters { max_new_tokens: Some(5), ..Default::default() };
        let base = answer_key("r", "img", &[&a], "task:0", &[], None);
        assert_eq!(base, answer_key("r", "img", &[&a], "task:0", &[], None));
        for other in [
            answer_key("r2", "img", &[&a], "task:0", &[], None),
            answer_key("r", "img2", &[&a], "task:0", &[], None),
            answer_key("r", "img", &[&b], "task:0", &[], None),
            answer_key("r", "img", &[&a, &a], "task:0", &[], None),
            answer_key("r", "img", &[&a], "task:1", &[], None),
            answer_key("r", "img", &[&a], "task:0", &[turn], None),
            answer_key("r", "img", &[&a], "task:0", &[], Some(&greedy)),
        ] {
            assert_ne!(base, other);
        }
        // The same words asked as a question or verbatim, and other generation limits, differ too.
        assert_ne!(
            answer_key("r", "img", &[&a], "text:q", &[], None),
            answer_key("r", "img", &[&a], "verbatim:q", &[], None)
        );
        let longer = worker::GenerationParameters { max_new_tokens: Some(6), ..Default::default() };
        assert_ne!(
            answer_key("r", "img", &[&a], "task:0", &[], Some(&greedy)),
            answer_key("r", "img", &[&a], "task:0", &[], Some(&longer))
        );
        assert!(base.starts_with("result:"));
    }

    #[test]
    fn stored_answers_drop_timings() {
        let response = worker::GenerateResponse {
            question_index: 3,
            answer: "a cat".into(),
            timing: Some(worker::Timing { decode_ns: 5, ..Default::default() }),
            prefix_cache_hit: true,
            ..Default::default()
        };
        let stored = answer_from_bytes("k", &answer_to_bytes("k", &response)).unwrap();
        assert_eq!(stored.answer, "a cat");
        assert!(stored.finished && stored.timing.is_none() && !stored.prefix_cache_hit);
        assert_eq!(stored.question_index, 0);
    }
}
