//! Splicing a prompt (docs/MODEL.md, "Splicing"): token ids with the `-200` image sentinel and
//! `<mask><pos>` pairs become one sequence of input embeddings, the projected image tokens and
//! each region's two tokens in place of the placeholders.

use candle_core::Tensor;

use super::config::Config;
use super::model::OspreyLlama;
use crate::error::LlmError;
use crate::prompt::{Location, PromptError};
use crate::tokenizer::IMAGE_TOKEN_INDEX;

/// A piece of a prompt after splicing (docs/MODEL.md, "Splicing").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Ordinary token ids at `ids[range]`.
    Text(std::ops::Range<usize>),
    /// The image tokens (at the -200 sentinel).
    Image,
    /// Region `k`'s `<mask>` then `<pos>` token.
    Region(usize),
}

/// Splits prompt ids into text runs, the image and region pairs, checking the structure: every
/// `<mask>` is immediately followed by `<pos>`, no `<pos>` stands alone, every other id is in the
/// vocabulary. Counts are checked by the caller against what was sent.
pub fn splice_plan(ids: &[i64], cfg: &Config) -> Result<Vec<Segment>, PromptError> {
    let (mask, pos) = (i64::from(cfg.mask_token_id), i64::from(cfg.pos_token_id));
    let mut segments = Vec::new();
    let mut regions = 0;
    let mut start = 0;
    let mut i = 0;
    while i < ids.len() {
        let id = ids[i];
        let special = id == IMAGE_TOKEN_INDEX || id == mask || id == pos;
        if !special {
            if id < 0 || id as u64 >= cfg.vocab_size as u64 {
                return Err(PromptError::TokenOutOfRange {
                    id,
                    at: Location::Token(i),
                    vocab_size: cfg.vocab_size,
                });
            }
            i += 1;
            continue;
        }
        if start < i {
            segments.push(Segment::Text(start..i));
        }
        if id == IMAGE_TOKEN_INDEX {
            segments.push(Segment::Image);
            i += 1;
        } else if id == mask {
            if ids.get(i + 1) != Some(&pos) {
                return Err(PromptError::MaskWithoutPos { at: Location::Token(i) });
            }
            segments.push(Segment::Region(regions));
            regions += 1;
            i += 2;
        } else {
            return Err(PromptError::PosWithoutMask { at: Location::Token(i) });
        }
        start = i;
    }
    if start < ids.len() {
        segments.push(Segment::Text(start..ids.len()));
    }
    Ok(segments)
}

/// Number of images and regions in a plan.
pub fn plan_counts(plan: &[Segment]) -> (usize, usize) {
    let images = plan.iter().filter(|s| **s == Segment::Image).count();
    let regions = plan.iter().filter(|s| matches!(s, Segment::Region(_))).count();
    (images, regions)
}

impl OspreyLlama {
    /// Input embeddings for prompt `ids` (docs/MODEL.md, "Splicing"): text ids embedded, the
    /// projected image tokens `[T, hidden]` at the -200 sentinel, region `k`'s `mask_tokens[k]`
    /// and `pos_tokens[k]` (`[N, hidden]`, not projected) at its `<mask><pos>` pair. The number of
    /// sentinels must equal whether `image` is given and the pairs must equal N.
    pub fn splice(
        &self,
        ids: &[i64],
        image: Option<&Tensor>,
        mask_tokens: &Tensor,
        pos_tokens: &Tensor,
    ) -> Result<Tensor, LlmError> {
        let plan = splice_plan(ids, self.config())?;
        let (images, regions) = plan_counts(&plan);
        let hidden = self.config().hidden_size;
        if images != usize::from(image.is_some()) {
            return Err(
                PromptError::ImageCount { found: images, expected: usize::from(image.is_some()) }.into()
            );
        }
        let n = check_regions(mask_tokens, pos_tokens, hidden)?;
        if regions != n {
            return Err(PromptError::RegionCount { pairs: regions, regions: n }.into());
        }
        if let Some(img) = image
            && !matches!(img.dims(), [_, h] if *h == hidden)
        {
            return Err(LlmError::InvalidInput(format!(
                "projected image must be [T, {hidden}], got {:?}",
                img.dims()
            )));
        }
        let cast = |t: &Tensor| -> candle_core::Result<Tensor> {
            t.to_device(self.device())?.to_dtype(self.dtype())
        };
        let (mask_tokens, pos_tokens) = (cast(mask_tokens)?, cast(pos_tokens)?);
        let mut parts = Vec::with_capacity(plan.len() * 2);
        for seg in &plan {
            match seg {
                Segment::Text(r) => {
                    let t: Vec<u32> = ids[r.clone()].iter().map(|&i| i as u32).collect();
                    parts.push(self.embed_ids(&t)?);
                }
                Segment::Image => parts.push(cast(image.expect("checked above. This is a bug."))?),
                Segment::Region(k) => {
                    parts.push(mask_tokens.narrow(0, *k, 1)?);
                    parts.push(pos_tokens.narrow(0, *k, 1)?);
                }
            }
        }
        if parts.is_empty() {
            return Ok(Tensor::zeros((0, hidden), self.dtype(), self.device())?);
        }
        Ok(Tensor::cat(&parts, 0)?)
    }
}

/// Checks region tokens `[N, hidden]` (mask and pos alike) and returns N.
fn check_regions(mask_tokens: &Tensor, pos_tokens: &Tensor, hidden: usize) -> Result<usize, LlmError> {
    match (mask_tokens.dims(), pos_tokens.dims()) {
        ([n, a], [m, b]) if n == m && *a == hidden && *b == hidden => Ok(*n),
        (a, b) => Err(LlmError::InvalidInput(format!(
            "mask_tokens and pos_tokens must both be [N, {hidden}], got {a:?} and {b:?}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> Config {
        Config { vocab_size: 40, mask_token_id: 38, pos_token_id: 39, ..Config::osprey_7b() }
    }

    #[test]
    fn splice_plan_segments_and_errors() {
        let c = cfg();
        let plan = splice_plan(&[1, 5, -200, 6, 38, 39, 7, 38, 39], &c).unwrap();
        assert_eq!(
            plan,
            vec![
                Segment::Text(0..2),
                Segment::Image,
                Segment::Text(3..4),
                Segment::Region(0),
                Segment::Text(6..7),
                Segment::Region(1)
            ]
        );
        assert_eq!(plan_counts(&plan), (1, 2));
        assert_eq!(splice_plan(&[1, 38, 5], &c), Err(PromptError::MaskWithoutPos { at: Location::Token(1) }));
        assert_eq!(splice_plan(&[1, 38], &c), Err(PromptError::MaskWithoutPos { at: Location::Token(1) }));
        assert_eq!(splice_plan(&[1, 39], &c), Err(PromptError::PosWithoutMask { at: Location::Token(1) }));
        assert_eq!(
            splice_plan(&[1, 40], &c),
            Err(PromptError::TokenOutOfRange { id: 40, at: Location::Token(1), vocab_size: 40 })
        );
        assert_eq!(
            splice_plan(&[-3], &c),
            Err(PromptError::TokenOutOfRange { id: -3, at: Location::Token(0), vocab_size: 40 })
        );
        // The real ids 32000/32001 are outside the 32000-row vocabulary but are placeholders.
        let real = Config::osprey_7b();
        assert_eq!(plan_counts(&splice_plan(&[1, -200, 32000, 32001], &real).unwrap()), (1, 1));
    }
}
