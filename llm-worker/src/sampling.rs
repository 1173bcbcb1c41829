//! Next-token selection: greedy, or sampling with temperature, top-k and top-p in the order
//! transformers' `generate(do_sample=True)` applies them (temperature, top-k, top-p), from a
//! per-sequence seeded generator so a sequence's tokens do not depend on what it is batched with.

/// How to pick tokens and when to stop.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`; 1 = off.
    pub top_p: f32,
    /// Keep the `top_k` most likely tokens (ties at the boundary included); 0 = off.
    pub top_k: usize,
    /// Seed of this sequence's generator.
    pub seed: u64,
    /// Generate at most this many tokens.
    pub max_new_tokens: usize,
    /// Stop at the end-of-sequence token (it is not emitted).
    pub stop_at_eos: bool,
}

impl SamplingParams {
    /// Greedy decoding of up to `max_new_tokens`, stopping at EOS (how parity is checked).
    pub fn greedy(max_new_tokens: usize) -> Self {
        Self { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, max_new_tokens, stop_at_eos: true }
    }

    /// The official scripts' settings (docs/MODEL.md#generation-and-post-processing): T = 0.2,
    /// 1024 new tokens, top-p 0.6 from Vicuna's `generation_config.json` [unverified there] and
    /// the HF top-k 50.
    pub fn osprey_default(seed: u64) -> Self {
        Self { temperature: 0.2, top_p: 0.6, top_k: 50, seed, max_new_tokens: 1024, stop_at_eos: true }
    }

    /// Rejects values no sampler can honour.
    pub fn validate(&self) -> Result<(), String> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(format!("temperature must be finite and >= 0, got {}", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(format!("top_p must be in (0, 1], got {}", self.top_p));
        }
        if self.max_new_tokens == 0 {
            return Err("max_new_tokens must be at least 1".into());
        }
        Ok(())
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced the end-of-sequence token.
    Eos,
    /// `max_new_tokens` were generated.
    Length,
}

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast and good enough to drive a categorical draw.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1) with 53 random bits.
    fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks tokens for one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = SplitMix64(params.seed);
        Self { params, rng }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token for these logits (one row over the vocabulary).
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature == 0.0 || logits.len() <= 1 {
            return argmax(logits);
        }
        let t = self.params.temperature;
        let mut scores: Vec<f32> = logits.iter().map(|&l| l / t).collect();
        let k = self.params.top_k;
        if k > 0 && k < scores.len() {
            // TopKLogitsWarper: remove scores below the k-th largest.
            let mut sorted = scores.clone();
            sorted.sort_unstable_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            for s in &mut scores {
                if *s < kth {
                    *s = f32::NEG_INFINITY;
                }
            }
        }
        if self.params.top_p < 1.0 {
            // TopPLogitsWarper: sort ascending, drop tokens whose cumulative probability is
            // <= 1 - top_p, always keep the most likely one.
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
            let probs = softmax(&scores);
            let mut cum = 0.0f32;
            let last = order.len() - 1;
            for (rank, &i) in order.iter().enumerate() {
                cum += probs[i];
                if rank < last && cum <= 1.0 - self.params.top_p {
                    scores[i] = f32::NEG_INFINITY;
                }
            }
        }
        let probs = softmax(&scores);
        let u = self.rng.next_f64() as f32;
        let mut acc = 0.0f32;
        let mut fallback = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                acc += p;
                fallback = i;
                if u < acc {
                    return i as u32;
                }
            }
        }
        // Rounding left `acc` just under 1: the last token with mass.
        fallback as u32
    }
}

/// First index of the largest value (NaN never wins).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] || values[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> =
        scores.iter().map(|&s| if s == f32::NEG_INFINITY { 0.0 } else { (s - max).exp() }).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed, max_new_tokens: 1, stop_at_eos: true }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(1));
        assert_eq!(s.sample(&[0.1, 2.0, 2.0, -1.0]), 1);
        assert_eq!(argmax(&[f32::NAN, 1.0]), 1);
    }

    #[test]
    fn top_k_and_top_p_restrict_the_support() {
        let logits = [3.0, 2.9, 0.0, -5.0, 2.95];
        let mut s = Sampler::new(params(1.0, 2, 1.0, 7));
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 0 | 4));
        }
        // Probabilities ~[0.35, 0.32, 0.02, 0.0, 0.33]: top_p 0.5 keeps the two most likely.
        let mut s = Sampler::new(params(1.0, 0, 0.5, 7));
        for _ in 0..200 {
            assert!(matches!(s.sample(&logits), 0 | 4));
        }
        // A tiny top_p keeps only the best.
        let mut s = Sampler::new(params(1.0, 0, 1e-6, 7));
        assert!((0..50).all(|_| s.sample(&logits) == 0));
    }

    #[test]
    fn sampling_is_seeded_and_follows_the_distribution() {
        let logits = [0.0f32, (3.0f32).ln()]; // p = [0.25, 0.75]
        let draw = |seed| {
            let mut s = Sampler::new(params(1.0, 0, 1.0, seed));
            (0..4000).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(draw(1), draw(1));
        assert_ne!(draw(1), draw(2));
        let ones = draw(3).iter().filter(|&&t| t == 1).count() as f64 / 4000.0;
        assert!((ones - 0.75).abs() < 0.03, "{ones}");
        // Low temperature sharpens towards the argmax.
        let mut s = Sampler::new(params(0.05, 0, 1.0, 5));
        assert!((0..100).all(|_| s.sample(&logits) == 1));
    }

    #[test]
    fn validation() {
        assert!(SamplingParams::osprey_default(0).validate().is_ok());
        assert!(params(-1.0, 0, 1.0, 0).validate().is_err());
        assert!(params(1.0, 0, 0.0, 0).validate().is_err());
        assert!(params(f32::NAN, 0, 1.0, 0).validate().is_err());
        assert!(SamplingParams::greedy(0).validate().is_err());
    }
}
