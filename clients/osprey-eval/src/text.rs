//! The reference scripts' text handling: answer clean-up, ground-truth names, Semantic IoU.

/// Python's `str.isspace()` for one char (Unicode White_Space plus U+001C..U+001F), which is what
/// `str.strip()` and `str.split()` without arguments use.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python's `str.split()` without arguments.
pub fn py_split(text: &str) -> impl Iterator<Item = &str> {
    text.split(is_py_space).filter(|w| !w.is_empty())
}

/// What every script does first with the decoded answer: strip, drop a trailing `</s>`, strip.
pub fn strip_answer(raw: &str) -> String {
    let text = raw.trim_matches(is_py_space);
    let text = text.strip_suffix("</s>").unwrap_or(text);
    text.trim_matches(is_py_space).to_string()
}

/// `if ':' in outputs: outputs = outputs.split(':')[1]` (the text between the first two colons).
pub fn after_colon(text: &str) -> String {
    match text.split(':').nth(1) {
        Some(part) => part.to_string(),
        None => text.to_string(),
    }
}

/// `lvis_paco_eval.py`'s prediction: stripped, after the colon, `.`, `:` and `,` turned into spaces.
pub fn category_prediction(raw: &str) -> String {
    after_colon(&strip_answer(raw)).replace(['.', ':', ','], " ")
}

/// `lvis_paco_eval.py`'s ground truth: `_` and `:` turned into spaces (`"mug:handle"` → `"mug handle"`).
pub fn category_ground_truth(name: &str) -> String {
    name.replace(['_', ':'], " ")
}

/// `SemanticIOU(pred.lower(), gt.lower())`: |words(pred) ∩ words(gt)| / |words(pred) ∪ words(gt)|.
/// The reference divides by zero when both are empty; that case counts 0 here.
pub fn semantic_iou(prediction: &str, ground_truth: &str) -> f64 {
    let (p, g) = (prediction.to_lowercase(), ground_truth.to_lowercase());
    let p: std::collections::HashSet<&str> = py_split(&p).collect();
    let g: std::collections::HashSet<&str> = py_split(&g).collect();
    let union = p.union(&g).count();
    if union == 0 { 0.0 } else { p.intersection(&g).count() as f64 / union as f64 }
}

/// `refcocog_eval.py`'s caption: stripped, after the colon, each `.` followed by a newline.
pub fn refcocog_caption(raw: &str) -> String {
    after_colon(&strip_answer(raw)).replace('.', ".\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_clean_up_follows_the_script() {
        assert_eq!(category_prediction("  Category: cat.</s> "), " cat ");
        assert_eq!(category_prediction("a, b. c"), "a  b  c");
        assert_eq!(category_prediction("x:y:z"), "y");
        assert_eq!(category_ground_truth("mug:handle"), "mug handle");
        assert_eq!(category_ground_truth("car_(automobile)"), "car (automobile)");
    }

    #[test]
    fn semantic_iou_by_hand() {
        assert_eq!(semantic_iou("Red Car", "car"), 0.5);
        assert_eq!(semantic_iou("teddy bear", "teddy bear"), 1.0);
        assert_eq!(semantic_iou("a dog a", "dog cat"), 1.0 / 3.0);
        assert_eq!(semantic_iou("", "cat"), 0.0);
        assert_eq!(semantic_iou("", ""), 0.0);
    }

    #[test]
    fn refcocog_caption_breaks_sentences() {
        assert_eq!(refcocog_caption("A man. In red.</s>"), "A man.\n In red.\n");
    }
}
