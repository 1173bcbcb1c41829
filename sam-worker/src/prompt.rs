//! Prompts for one SAM prediction, as `SamPredictor.predict` takes them, and their validation.

use serde::{Deserialize, Serialize};

use crate::error::SamError;
use crate::models::sam::prompt_encoder::PointLabel;

/// One prompt. Coordinates are pixels of the original image, `(x, y)`; labels are 1 (foreground)
/// or 0 (background). Also the element type of the `sam-worker dump --prompts` JSON list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prompt {
    /// Names the prompt in errors and in dump outputs.
    pub name: String,
    #[serde(default)]
    pub point_coords: Option<Vec<Vec<f64>>>,
    #[serde(default)]
    pub point_labels: Option<Vec<f64>>,
    /// `[x0, y0, x1, y1]`.
    #[serde(default, rename = "box")]
    pub box_xyxy: Option<Vec<f64>>,
    /// Three masks (tokens 1..) instead of one (token 0). SamPredictor's default is true.
    #[serde(default = "default_true")]
    pub multimask_output: bool,
    /// Low-resolution logits of an earlier prediction (`[L, L]`, row-major, L = 256 for the official
    /// models), as `mask_input` of `SamPredictor.predict`.
    #[serde(skip)]
    pub mask_input: Option<Vec<f32>>,
}

fn default_true() -> bool {
    true
}

impl Prompt {
    /// A prompt with nothing set but its name (and multimask output, SamPredictor's default).
    pub fn named(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            point_coords: None,
            point_labels: None,
            box_xyxy: None,
            multimask_output: true,
            mask_input: None,
        }
    }
}

/// A prompt that passed [`Prompt::validate`].
#[derive(Debug, Clone, PartialEq)]
pub struct ValidPrompt {
    pub points: Option<(Vec<[f64; 2]>, Vec<PointLabel>)>,
    pub box_xyxy: Option<[f64; 4]>,
    pub mask_input: Option<Vec<f32>>,
    pub multimask_output: bool,
}

impl Prompt {
    /// Checks the prompt against the image it is for, `original = (height, width)` in pixels, on
    /// top of [`Prompt::validate`]. Coordinates are continuous pixel positions: the image spans
    /// `0..=width` by `0..=height`, so a point on the border is inside and kept as it is; a point
    /// outside is an error. A box must overlap the image with a positive area; the part outside
    /// is clipped off (the model only sees what is in the image).
    pub fn validate_in_image(
        &self,
        low_res_size: usize,
        original: (usize, usize),
    ) -> Result<ValidPrompt, SamError> {
        let mut valid = self.validate(low_res_size)?;
        let err = |field, problem: String| SamError::prompt(&self.name, field, problem);
        let (height, width) = (original.0 as f64, original.1 as f64);
        if let Some((points, _)) = &valid.points {
            for (i, &[x, y]) in points.iter().enumerate() {
                if !(0.0..=width).contains(&x) {
                    return Err(err(
                        "point_coords",
                        format!("point {i}: x={x} is outside the image (width {width}, 0 <= x <= {width})"),
                    ));
                }
                if !(0.0..=height).contains(&y) {
                    return Err(err(
                        "point_coords",
                        format!(
                            "point {i}: y={y} is outside the image (height {height}, 0 <= y <= {height})"
                        ),
                    ));
                }
            }
        }
        if let Some([x0, y0, x1, y1]) = valid.box_xyxy {
            if x0 >= width || y0 >= height || x1 <= 0.0 || y1 <= 0.0 {
                return Err(err(
                    "box",
                    format!("[{x0}, {y0}, {x1}, {y1}] lies entirely outside the image ({width}x{height})"),
                ));
            }
            valid.box_xyxy = Some([x0.max(0.0), y0.max(0.0), x1.min(width), y1.min(height)]);
        }
        Ok(valid)
    }

    /// Checks shapes and values that need no image; `low_res_size` is the side of the model's
    /// low-resolution logits. A prompt needs points or a box: a mask input alone (or nothing) is
    /// refused, since SAM would make a mask from nothing the user pointed at.
    pub fn validate(&self, low_res_size: usize) -> Result<ValidPrompt, SamError> {
        let err = |field, problem: String| SamError::prompt(&self.name, field, problem);
        if self.point_coords.is_none() && self.point_labels.is_none() && self.box_xyxy.is_none() {
            return Err(err("points", "neither points nor a box is set; a prompt needs one or both".into()));
        }
        let points = match (&self.point_coords, &self.point_labels) {
            (None, None) => None,
            (Some(_), None) => return Err(err("point_labels", "required when point_coords is given".into())),
            (None, Some(_)) => return Err(err("point_coords", "required when point_labels is given".into())),
            (Some(coords), Some(labels)) => {
                if coords.is_empty() {
                    return Err(err("point_coords", "is empty (use null for no points)".into()));
                }
                if coords.len() != labels.len() {
                    return Err(err(
                        "point_labels",
                        format!("has {} labels for {} points", labels.len(), coords.len()),
                    ));
                }
                let mut xy = Vec::with_capacity(coords.len());
                for (i, c) in coords.iter().enumerate() {
                    if c.len() != 2 {
                        return Err(err(
                            "point_coords",
                            format!("point {i} has {} values, expected [x, y]", c.len()),
                        ));
                    }
                    if !c.iter().all(|v| v.is_finite()) {
                        return Err(err("point_coords", format!("point {i} is not finite: {c:?}")));
                    }
                    xy.push([c[0], c[1]]);
                }
                let mut ls = Vec::with_capacity(labels.len());
                for (i, &l) in labels.iter().enumerate() {
                    ls.push(if l == 1.0 {
                        PointLabel::Foreground
                    } else if l == 0.0 {
                        PointLabel::Background
                    } else {
                        return Err(err("point_labels", format!("label {i} is {l}; expected 0 or 1")));
                    });
                }
                Some((xy, ls))
            }
        };
        let box_xyxy = match &self.box_xyxy {
            None => None,
            Some(b) => {
                if b.len() != 4 {
                    return Err(err("box", format!("has {} values, expected [x0, y0, x1, y1]", b.len())));
                }
                if !b.iter().all(|v| v.is_finite()) {
                    return Err(err("box", format!("is not finite: {b:?}")));
                }
                if b[2] < b[0] {
                    return Err(err("box", format!("x1 = {} is left of x0 = {}", b[2], b[0])));
                }
                if b[3] < b[1] {
                    return Err(err("box", format!("y1 = {} is above y0 = {}", b[3], b[1])));
                }
                if b[2] == b[0] || b[3] == b[1] {
                    return Err(err("box", format!("{b:?} has zero area")));
                }
                Some([b[0], b[1], b[2], b[3]])
            }
        };
        let mask_input = match &self.mask_input {
            None => None,
            Some(m) => {
                let want = low_res_size * low_res_size;
                if m.len() != want {
                    return Err(err(
                        "mask_input",
                        format!("has {} values, expected {low_res_size}x{low_res_size} = {want}", m.len()),
                    ));
                }
                if !m.iter().all(|v| v.is_finite()) {
                    return Err(err("mask_input", "has non-finite values".into()));
                }
                Some(m.clone())
            }
        };
        Ok(ValidPrompt { points, box_xyxy, mask_input, multimask_output: self.multimask_output })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn points(coords: Vec<Vec<f64>>, labels: Vec<f64>) -> Prompt {
        Prompt { point_coords: Some(coords), point_labels: Some(labels), ..Prompt::named("p1") }
    }

    fn field_of(p: &Prompt) -> &'static str {
        match p.validate(4) {
            Err(SamError::InvalidPrompt { prompt, field, .. }) => {
                assert_eq!(prompt, "p1");
                field
            }
            other => panic!("expected an invalid prompt, got {other:?}"),
        }
    }

    #[test]
    fn valid_prompts_pass() {
        let v = points(vec![vec![1.0, 2.0], vec![3.0, 4.0]], vec![1.0, 0.0]).validate(4).unwrap();
        assert_eq!(v.points.unwrap().1, vec![PointLabel::Foreground, PointLabel::Background]);
        let b = Prompt { box_xyxy: Some(vec![1.0, 2.0, 3.0, 5.0]), ..Prompt::named("p1") };
        assert_eq!(b.validate(4).unwrap().box_xyxy, Some([1.0, 2.0, 3.0, 5.0]));
        let m = Prompt { mask_input: Some(vec![0.5; 16]), ..points(vec![vec![1.0, 2.0]], vec![1.0]) };
        assert!(m.validate(4).unwrap().mask_input.is_some());
    }

    #[test]
    fn a_prompt_needs_points_or_a_box() {
        assert_eq!(field_of(&Prompt::named("p1")), "points");
        let mask_only = Prompt { mask_input: Some(vec![0.5; 16]), ..Prompt::named("p1") };
        assert_eq!(field_of(&mask_only), "points");
        let err = Prompt::named("p1").validate(4).unwrap_err().to_string();
        assert!(err.contains("neither"), "{err}");
    }

    #[test]
    fn zero_area_boxes_are_errors() {
        for b in [vec![1.0, 2.0, 1.0, 5.0], vec![1.0, 2.0, 3.0, 2.0], vec![4.0, 4.0, 4.0, 4.0]] {
            let p = Prompt { box_xyxy: Some(b), ..Prompt::named("p1") };
            assert_eq!(field_of(&p), "box");
            assert!(p.validate(4).unwrap_err().to_string().contains("zero area"));
        }
    }

    /// The field named by `validate_in_image` on a 640x480 image, and the message.
    fn in_image_error(p: &Prompt) -> (&'static str, String) {
        match p.validate_in_image(4, (480, 640)) {
            Err(e @ SamError::InvalidPrompt { .. }) => {
                let message = e.to_string();
                let SamError::InvalidPrompt { field, .. } = e else { unreachable!() };
                (field, message)
            }
            other => panic!("expected an invalid prompt, got {other:?}"),
        }
    }

    #[test]
    fn points_outside_the_image_are_errors() {
        let (field, message) = in_image_error(&points(vec![vec![-3.0, 10.0]], vec![1.0]));
        assert_eq!(field, "point_coords");
        assert_eq!(
            message,
            "prompt \"p1\": field `point_coords`: point 0: x=-3 is outside the image (width 640, 0 <= x <= 640)"
        );
        let (field, message) =
            in_image_error(&points(vec![vec![5.0, 5.0], vec![10.0, 480.5]], vec![1.0, 0.0]));
        assert_eq!(field, "point_coords");
        assert!(message.contains("point 1: y=480.5 is outside the image (height 480"), "{message}");
        assert_eq!(in_image_error(&points(vec![vec![640.01, 0.0]], vec![1.0])).0, "point_coords");
        assert_eq!(in_image_error(&points(vec![vec![0.0, -0.5]], vec![1.0])).0, "point_coords");
    }

    #[test]
    fn points_on_the_border_are_kept_unchanged() {
        let corners = vec![vec![0.0, 0.0], vec![640.0, 480.0], vec![640.0, 0.0], vec![0.0, 480.0]];
        let valid = points(corners, vec![1.0, 1.0, 0.0, 0.0]).validate_in_image(4, (480, 640)).unwrap();
        let (xy, _) = valid.points.unwrap();
        assert_eq!(xy, vec![[0.0, 0.0], [640.0, 480.0], [640.0, 0.0], [0.0, 480.0]]);
    }

    #[test]
    fn boxes_entirely_outside_are_errors() {
        for b in [
            vec![-20.0, 10.0, -5.0, 50.0],
            vec![-20.0, 10.0, 0.0, 50.0],
            vec![640.0, 10.0, 700.0, 50.0],
            vec![10.0, 500.0, 50.0, 600.0],
            vec![10.0, -50.0, 50.0, -1.0],
        ] {
            let p = Prompt { box_xyxy: Some(b.clone()), ..Prompt::named("p1") };
            let (field, message) = in_image_error(&p);
            assert_eq!(field, "box", "{b:?}");
            assert!(message.contains("entirely outside the image (640x480)"), "{message}");
        }
    }

    #[test]
    fn boxes_partly_outside_are_clipped_to_the_image() {
        let p = Prompt { box_xyxy: Some(vec![-10.0, 20.0, 700.0, 500.0]), ..Prompt::named("p1") };
        assert_eq!(p.validate_in_image(4, (480, 640)).unwrap().box_xyxy, Some([0.0, 20.0, 640.0, 480.0]));
        let inside = Prompt { box_xyxy: Some(vec![1.5, 2.0, 639.0, 480.0]), ..Prompt::named("p1") };
        assert_eq!(inside.validate_in_image(4, (480, 640)).unwrap().box_xyxy, Some([1.5, 2.0, 639.0, 480.0]));
    }

    #[test]
    fn in_image_checks_keep_the_shape_checks() {
        assert_eq!(in_image_error(&Prompt::named("p1")).0, "points");
        assert_eq!(in_image_error(&points(vec![vec![f64::NAN, 2.0]], vec![1.0])).0, "point_coords");
    }

    #[test]
    fn bad_labels_are_errors() {
        assert_eq!(field_of(&points(vec![vec![1.0, 2.0]], vec![2.0])), "point_labels");
        assert_eq!(field_of(&points(vec![vec![1.0, 2.0]], vec![-1.0])), "point_labels");
        assert_eq!(field_of(&points(vec![vec![1.0, 2.0]], vec![0.5])), "point_labels");
    }

    #[test]
    fn mismatched_or_missing_points_are_errors() {
        assert_eq!(field_of(&points(vec![vec![1.0, 2.0]], vec![1.0, 0.0])), "point_labels");
        assert_eq!(field_of(&points(vec![], vec![])), "point_coords");
        assert_eq!(field_of(&points(vec![vec![1.0, 2.0, 3.0]], vec![1.0])), "point_coords");
        let no_labels = Prompt { point_coords: Some(vec![vec![1.0, 2.0]]), ..Prompt::named("p1") };
        assert_eq!(field_of(&no_labels), "point_labels");
        let no_coords = Prompt { point_labels: Some(vec![1.0]), ..Prompt::named("p1") };
        assert_eq!(field_of(&no_coords), "point_coords");
    }

    #[test]
    fn non_finite_values_are_errors() {
        assert_eq!(field_of(&points(vec![vec![f64::NAN, 2.0]], vec![1.0])), "point_coords");
        assert_eq!(field_of(&points(vec![vec![1.0, f64::INFINITY]], vec![1.0])), "point_coords");
        let b = Prompt { box_xyxy: Some(vec![0.0, 0.0, f64::NAN, 1.0]), ..Prompt::named("p1") };
        assert_eq!(field_of(&b), "box");
        let m = Prompt { mask_input: Some(vec![f32::NAN; 16]), ..points(vec![vec![1.0, 2.0]], vec![1.0]) };
        assert_eq!(field_of(&m), "mask_input");
    }

    #[test]
    fn bad_boxes_and_masks_are_errors() {
        for b in [vec![5.0, 0.0, 4.0, 1.0], vec![0.0, 5.0, 1.0, 4.0], vec![0.0, 0.0, 1.0]] {
            let p = Prompt { box_xyxy: Some(b), ..Prompt::named("p1") };
            assert_eq!(field_of(&p), "box");
        }
        let m = Prompt { mask_input: Some(vec![0.0; 15]), ..points(vec![vec![1.0, 2.0]], vec![1.0]) };
        assert_eq!(field_of(&m), "mask_input");
    }

    #[test]
    fn error_message_names_prompt_and_field() {
        let err = points(vec![vec![1.0, 2.0]], vec![3.0]).validate(4).unwrap_err();
        assert_eq!(err.to_string(), "prompt \"p1\": field `point_labels`: label 0 is 3; expected 0 or 1");
    }

    #[test]
    fn json_uses_box_and_defaults() {
        let p: Prompt = serde_json::from_str(r#"{"name": "a", "box": [1, 2, 3, 4]}"#).unwrap();
        assert_eq!(p.box_xyxy, Some(vec![1.0, 2.0, 3.0, 4.0]));
        assert!(p.multimask_output && p.point_coords.is_none());
    }
}
