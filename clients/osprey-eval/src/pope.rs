//! POPE (`osprey/eval/pope/evaluate.py`): yes/no parsing of free answers and the binary metrics.

use serde::Serialize;

/// The reference parsing of one answer (`pope_eval.py` stores `outputs.lower()`): keep the text
/// before the first `.`, drop commas, split on single spaces; "no" when a word is `no`, `not` or
/// `No`, otherwise "yes".
pub fn answer_is_yes(raw: &str) -> bool {
    let text = raw.to_lowercase();
    let first = text.split('.').next().unwrap_or_default().replace(',', "");
    !first.split(' ').any(|w| w == "no" || w == "not" || w == "No")
}

/// The reference's label parsing: `"no"` is negative, anything else positive.
pub fn label_is_yes(label: &str) -> bool {
    label != "no"
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PopeMetrics {
    pub tp: usize,
    pub fp: usize,
    pub tn: usize,
    pub fn_: usize,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub yes_ratio: f64,
}

/// `(predicted yes, labelled yes)` pairs → the reference's metrics. Where the reference would divide
/// by zero (no positive predictions or labels), the ratio is 0.
pub fn pope_metrics(pairs: &[(bool, bool)]) -> PopeMetrics {
    let count = |p: bool, l: bool| pairs.iter().filter(|&&x| x == (p, l)).count();
    let (tp, fp, tn, fn_) = (count(true, true), count(true, false), count(false, false), count(false, true));
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) };
    PopeMetrics {
        tp,
        fp,
        tn,
        fn_,
        accuracy: ratio(tp + tn, pairs.len()),
        precision,
        recall,
        f1,
        yes_ratio: ratio(tp + fp, pairs.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_by_hand() {
        assert!(answer_is_yes("Yes, there is a dog in the image."));
        assert!(!answer_is_yes("No, there is no dog."));
        assert!(!answer_is_yes("There is not a dog"));
        // Only the first sentence counts.
        assert!(answer_is_yes("Yes. No dog is hiding."));
        // Words are split on single spaces: "no," loses its comma, "no\n" stays a different word.
        assert!(!answer_is_yes("no, none"));
        assert!(answer_is_yes("no\nway"));
        assert!(answer_is_yes("nothing here"));
    }

    #[test]
    fn metrics_by_hand() {
        // 3 TP, 1 FP, 2 TN, 2 FN.
        let pairs = [
            (true, true),
            (true, true),
            (true, true),
            (true, false),
            (false, false),
            (false, false),
            (false, true),
            (false, true),
        ];
        let m = pope_metrics(&pairs);
        assert_eq!((m.tp, m.fp, m.tn, m.fn_), (3, 1, 2, 2));
        assert_eq!(m.accuracy, 5.0 / 8.0);
        assert_eq!(m.precision, 0.75);
        assert_eq!(m.recall, 0.6);
        assert!((m.f1 - 2.0 * 0.75 * 0.6 / 1.35).abs() < 1e-12);
        assert_eq!(m.yes_ratio, 0.5);
    }
}
