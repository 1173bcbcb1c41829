//! CIDEr-D as pycocoevalcap's `Cider` scorer computes it (n-grams 1..4, tf-idf over the reference
//! corpus, clipped similarity, Gaussian length penalty with σ = 6, ×10), on tokenised captions.
//!
//! The official numbers tokenise with Stanford's PTB tokenizer (Java); [`simple_tokens`] only
//! approximates it (lower case, punctuation dropped), so CIDEr from this module is labelled
//! approximate and `score_captions.py` remains the reference.

use std::collections::HashMap;

const N: usize = 4;
const SIGMA: f64 = 6.0;

type Counts = HashMap<Vec<String>, f64>;

/// Lower case; the punctuation the PTB tokenizer wrapper removes becomes separators.
pub fn simple_tokens(caption: &str) -> Vec<String> {
    caption
        .to_lowercase()
        .split(|c: char| c.is_whitespace() || ".,?!:;()[]{}\"`".contains(c))
        .filter(|w| !w.is_empty() && !w.chars().all(|c| c == '-' || c == '\''))
        .map(str::to_string)
        .collect()
}

fn ngram_counts(tokens: &[String]) -> Counts {
    let mut counts = Counts::new();
    for n in 1..=N {
        for gram in tokens.windows(n) {
            *counts.entry(gram.to_vec()).or_default() += 1.0;
        }
    }
    counts
}

/// tf-idf vectors per n, their norms, and the caption length (unigram count).
fn vectors(counts: &Counts, df: &HashMap<Vec<String>, f64>, log_refs: f64) -> (Vec<Counts>, [f64; N], f64) {
    let mut vec = vec![Counts::new(); N];
    let mut norm = [0.0; N];
    let mut length = 0.0;
    for (gram, &tf) in counts {
        let n = gram.len() - 1;
        let idf = log_refs - df.get(gram).copied().unwrap_or(0.0).max(1.0).ln();
        let v = tf * idf;
        vec[n].insert(gram.clone(), v);
        norm[n] += v * v;
        if n == 0 {
            length += tf;
        }
    }
    (vec, norm.map(f64::sqrt), length)
}

/// Corpus CIDEr-D and the per-caption scores. `references[i]` are the tokenised references of
/// caption `hypotheses[i]`.
pub fn cider_d(references: &[Vec<Vec<String>>], hypotheses: &[Vec<String>]) -> (f64, Vec<f64>) {
    let refs: Vec<Vec<Counts>> =
        references.iter().map(|r| r.iter().map(|t| ngram_counts(t)).collect()).collect();
    let mut df: HashMap<Vec<String>, f64> = HashMap::new();
    for image_refs in &refs {
        let mut seen: Vec<&Vec<String>> = image_refs.iter().flat_map(|c| c.keys()).collect();
        seen.sort();
        seen.dedup();
        for gram in seen {
            *df.entry(gram.clone()).or_default() += 1.0;
        }
    }
    let log_refs = (refs.len() as f64).ln();
    let scores: Vec<f64> = hypotheses
        .iter()
        .zip(&refs)
        .map(|(hyp, image_refs)| {
            let (vh, nh, lh) = vectors(&ngram_counts(hyp), &df, log_refs);
            let mut total = [0.0; N];
            for r in image_refs {
                let (vr, nr, lr) = vectors(r, &df, log_refs);
                let delta = lh - lr;
                for n in 0..N {
                    let mut val: f64 = vh[n]
                        .iter()
                        .map(|(gram, &h)| {
                            let r = vr[n].get(gram).copied().unwrap_or(0.0);
                            h.min(r) * r
                        })
                        .sum();
                    if nh[n] != 0.0 && nr[n] != 0.0 {
                        val /= nh[n] * nr[n];
                    }
                    total[n] += val * (-(delta * delta) / (2.0 * SIGMA * SIGMA)).exp();
                }
            }
            total.iter().sum::<f64>() / N as f64 / image_refs.len().max(1) as f64 * 10.0
        })
        .collect();
    let mean = if scores.is_empty() { 0.0 } else { scores.iter().sum::<f64>() / scores.len() as f64 };
    (mean, scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert_eq!(
            simple_tokens("A man, sitting.\n On the -- table!"),
            ["a", "man", "sitting", "on", "the", "table"]
        );
    }

    #[test]
    fn identical_captions_in_a_corpus_of_distinct_images() {
        let t = |s: &str| simple_tokens(s);
        let refs = vec![vec![t("a red car")], vec![t("two dogs play")]];
        let (mean, scores) = cider_d(&refs, &[t("a red car"), t("a cat")]);
        // The exact match has cosine 1 for n = 1..3 and no 4-grams: (1 + 1 + 1 + 0) / 4 × 10. "a cat"
        // shares nothing with "two dogs play".
        assert!((scores[0] - 7.5).abs() < 1e-9, "{scores:?}");
        assert_eq!(scores[1], 0.0);
        assert!((mean - 3.75).abs() < 1e-9);
    }
}
