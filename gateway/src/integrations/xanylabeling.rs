//! X-AnyLabeling's remote server protocol (as X-AnyLabeling-Server serves it): `GET /health`,
//! `GET /v1/models`, `POST /v1/predict`.
//!
//! One model, `osprey`: the request's `marks` (points with label 1/0, rectangles as two corners,
//! in pixels) become one SAM prompt; without marks, everything mode. Each mask comes back as a
//! polygon shape with the region's description in `description` and its category as `label`.
//! `data.image_id` is the gateway's key for the image (derived from its content): a request may
//! send it as `params.image_id` instead of the image to skip sending the image again. Image bytes,
//! when sent, always win over `params.image_id`, so a stale or foreign id never answers for
//! another image.
//! Answers are `{"success": true, "data": ...}`; failures `{"success": false, "error": {"code",
//! "message"}}` with the reference server's codes (INVALID_IMAGE, MODEL_NOT_FOUND,
//! INFERENCE_ERROR, UNAUTHORIZED).

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use osprey_proto::v1;
use serde_json::{Value, json};
use tonic::Code;

use crate::auth::Refusal;

use super::calls::{
    Backend, Registered, count, decode_base64_image, json as json_response, mask_region, parse_body,
    result_mask,
};
use super::contours;
use super::coords;

/// The model id X-AnyLabeling selects.
pub const MODEL_ID: &str = "osprey";
/// Most shapes of one everything-mode answer.
pub const MAX_EVERYTHING_SHAPES: u32 = 32;

/// An error in the reference server's shape.
#[derive(Debug)]
struct Error {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl Error {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
}

impl From<tonic::Status> for Error {
    fn from(status: tonic::Status) -> Self {
        // The reference answers model failures with HTTP 200 and success: false, and a full
        // queue with 503.
        let (http, code) = match status.code() {
            Code::InvalidArgument => (StatusCode::OK, "INVALID_REQUEST"),
            Code::Unauthenticated => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            Code::ResourceExhausted | Code::Unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "SERVICE_UNAVAILABLE")
            }
            _ => (StatusCode::OK, "INFERENCE_ERROR"),
        };
        Self::new(http, code, status.message())
    }
}

/// The routes, to be nested under a prefix (the server URL in X-AnyLabeling).
pub fn router(backend: Arc<Backend>) -> Router {
    let (models_backend, predict_backend) = (backend.clone(), backend);
    Router::new()
        .route("/health", get(health))
        .route(
            "/v1/models",
            get(move |headers: HeaderMap| {
                let backend = models_backend.clone();
                async move { answer(&backend, &headers, async { Ok(json!({ MODEL_ID: model_info() })) }).await }
            }),
        )
        .route(
            "/v1/predict",
            post(move |headers: HeaderMap, body: Bytes| {
                let backend = predict_backend.clone();
                async move {
                    let work = predict(&backend, &body);
                    answer(&backend, &headers, work).await
                }
            }),
        )
}

/// Open, as the reference server's: a probe needs no key.
async fn health() -> Response {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    json_response(
        StatusCode::OK,
        &json!({"status": "healthy", "models_loaded": 1, "timestamp": utc_timestamp(now)}),
    )
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ` (the reference server's timestamp form).
fn utc_timestamp(seconds: u64) -> String {
    let (days, rest) = ((seconds / 86_400) as i64, seconds % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rest / 3600, rest / 60 % 60, rest % 60)
}

async fn answer(
    backend: &Backend,
    headers: &HeaderMap,
    work: impl Future<Output = Result<Value, Error>>,
) -> Response {
    let (key, result) = match backend.admit(headers) {
        Ok(key) => (key, work.await),
        Err(refusal) => {
            let error = match refusal {
                Refusal::Unauthenticated => {
                    Error::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "Invalid or missing API Key")
                }
                Refusal::RateLimited { .. } => {
                    Error::new(refusal.http_status(), "RATE_LIMITED", refusal.message())
                }
            };
            (refusal.key_label(), Err(error))
        }
    };
    let (status, body) = match result {
        Ok(data) => (StatusCode::OK, json!({"success": true, "data": data})),
        Err(error) => {
            let body = json!({"success": false, "error": {"code": error.code, "message": error.message}});
            (error.status, body)
        }
    };
    count("x-anylabeling", &key, status);
    json_response(status, &body)
}

/// What `/v1/models` says about the model: X-AnyLabeling shows these widgets.
fn model_info() -> Value {
    let widgets: Vec<Value> = [
        "button_add_point",
        "button_remove_point",
        "button_add_rect",
        "button_clear",
        "button_finish_object",
    ]
    .iter()
    .map(|name| json!({"name": name, "value": null}))
    .collect();
    json!({
        "display_name": "Osprey (SAM masks with region descriptions)",
        "widgets": widgets,
        "params": {},
        "capabilities": {},
        "batch_processing_mode": "default",
    })
}

async fn predict(backend: &Backend, body: &[u8]) -> Result<Value, Error> {
    let invalid = |message: String| Error::new(StatusCode::UNPROCESSABLE_ENTITY, "INVALID_REQUEST", message);
    let request = parse_body(body).map_err(invalid)?;
    let model =
        request.get("model").and_then(Value::as_str).ok_or_else(|| invalid("model is required".into()))?;
    if model != MODEL_ID {
        return Err(Error::new(
            StatusCode::OK,
            "MODEL_NOT_FOUND",
            format!("Model '{model}' not loaded (this server has '{MODEL_ID}')"),
        ));
    }
    let params = request.get("params").cloned().unwrap_or(json!({}));
    let image = request.get("image").and_then(Value::as_str).filter(|image| !image.is_empty());
    let image_id = match params.get("image_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(id)) => Some(id.as_str()),
        Some(_) => {
            return Err(invalid(
                "params.image_id must be a string (an earlier answer's data.image_id)".into(),
            ));
        }
    };
    let prompt = prompt_from_marks(params.get("marks"))
        .map_err(|m| Error::new(StatusCode::OK, "INVALID_REQUEST", m))?;
    let registered = match (image, image_id) {
        (Some(image), _) => {
            let encoded = decode_base64_image(image, backend.max_image_bytes()).map_err(|m| {
                Error::new(StatusCode::OK, "INVALID_IMAGE", format!("Failed to decode image: {m}"))
            })?;
            backend.register(encoded).await.map_err(|s| {
                Error::new(
                    StatusCode::OK,
                    "INVALID_IMAGE",
                    format!("Failed to decode image: {}", s.message()),
                )
            })?
        }
        // The pipeline checks the key; its size is not needed here (marks are in pixels).
        (None, Some(id)) => Registered { key: id.to_string(), width: 0, height: 0 },
        (None, None) => {
            return Err(invalid(
                "image is required (or params.image_id, an earlier answer's data.image_id)".into(),
            ));
        }
    };
    let unknown_id = |status: tonic::Status| match (image, status.code()) {
        (None, Code::FailedPrecondition | Code::InvalidArgument) => Error::new(
            StatusCode::OK,
            "INVALID_IMAGE",
            format!("params.image_id {:?}: {}; send the image", registered.key, status.message()),
        ),
        _ => status.into(),
    };
    let results = match prompt {
        Some(prompt) => {
            let region =
                v1::Region { source: Some(v1::region::Source::Prompt(prompt)), label: String::new() };
            backend
                .describe_regions(&registered, vec![region], None, v1::DescribeTask::Short)
                .await
                .map_err(unknown_id)?
        }
        None => {
            let number =
                |name: &str| params.get(name).and_then(Value::as_u64).filter(|n| (1..=1024).contains(n));
            let everything = v1::EverythingParams {
                points_per_side: number("points_per_side").map(|n| n as u32),
                max_masks: Some(number("max_shapes").map_or(MAX_EVERYTHING_SHAPES, |n| n as u32)),
                ..Default::default()
            };
            backend
                .describe_regions(&registered, Vec::new(), Some(everything), v1::DescribeTask::Short)
                .await
                .map_err(unknown_id)?
        }
    };
    let regions: Vec<v1::Region> = results.iter().filter_map(mask_region).collect();
    let categories = if regions.is_empty() {
        Vec::new()
    } else {
        backend.describe_regions(&registered, regions, None, v1::DescribeTask::Category).await?
    };
    let mut shapes = Vec::new();
    for (index, result) in results.iter().enumerate() {
        let label =
            categories.get(index).map(|c| c.text.trim()).filter(|t| !t.is_empty()).unwrap_or("object");
        shapes.extend(shapes_of(result, label)?);
    }
    let description =
        results.first().map(|r| r.text.clone()).filter(|_| results.len() == 1).unwrap_or_default();
    Ok(json!({"shapes": shapes, "description": description, "replace": false, "image_id": registered.key}))
}

/// The SAM prompt of the marks: every point, and at most one rectangle. None without marks.
fn prompt_from_marks(marks: Option<&Value>) -> Result<Option<v1::SamPrompt>, String> {
    let marks = match marks {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(marks)) if marks.is_empty() => return Ok(None),
        Some(Value::Array(marks)) => marks,
        Some(_) => return Err("params.marks must be a list".into()),
    };
    let mut prompt = v1::SamPrompt::default();
    for (index, mark) in marks.iter().enumerate() {
        let numbers: Vec<f64> = mark
            .get("data")
            .and_then(Value::as_array)
            .map(|d| d.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        match mark.get("type").and_then(Value::as_str) {
            Some("point") => {
                let [x, y] = numbers[..] else {
                    return Err(format!("params.marks[{index}]: a point's data is [x, y] in pixels"));
                };
                let positive = match mark.get("label") {
                    None => true,
                    Some(label) => label.as_i64() == Some(1) || label.as_bool() == Some(true),
                };
                prompt.points.push(coords::point(x, y, positive));
            }
            Some("rectangle") => {
                let [x1, y1, x2, y2] = numbers[..] else {
                    return Err(format!(
                        "params.marks[{index}]: a rectangle's data is [x1, y1, x2, y2] in pixels"
                    ));
                };
                if prompt.r#box.is_some() {
                    return Err("one rectangle per prompt: finish the object before drawing another".into());
                }
                prompt.r#box = Some(coords::corner_box([x1, y1], [x2, y2]));
            }
            other => {
                return Err(format!(
                    "params.marks[{index}]: type {other:?} is not a prompt (point or rectangle)"
                ));
            }
        }
    }
    Ok(Some(prompt))
}

/// A mask as polygon shapes (one per component, largest first).
fn shapes_of(result: &v1::RegionResult, label: &str) -> Result<Vec<Value>, Error> {
    let mask = result_mask(result).map_err(|f| Error::new(StatusCode::OK, "INFERENCE_ERROR", f.message))?;
    Ok(contours::outlines(&mask, contours::DEFAULT_TOLERANCE)
        .into_iter()
        .map(|outline| {
            let mut points: Vec<[f64; 2]> = outline;
            // Closed as the reference server closes them: the first point repeated.
            points.push(points[0]);
            json!({
                "label": label,
                "shape_type": "polygon",
                "points": points,
                "score": null,
                "attributes": {},
                "description": result.text,
                "difficult": false,
                "direction": 0,
                "flags": null,
                "group_id": null,
                "kie_linking": [],
            })
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_become_a_pixel_prompt() {
        let marks = json!([
            {"type": "point", "data": [300.0, 20.5], "label": 1},
            {"type": "point", "data": [10, 90], "label": 0},
            {"type": "rectangle", "data": [250.0, 80.0, 40.0, 10.0]}
        ]);
        let prompt = prompt_from_marks(Some(&marks)).unwrap().unwrap();
        let points: Vec<(f32, f32, i32)> = prompt.points.iter().map(|p| (p.x, p.y, p.label)).collect();
        assert_eq!(
            points,
            vec![
                (300.0, 20.5, v1::PointLabel::Foreground as i32),
                (10.0, 90.0, v1::PointLabel::Background as i32)
            ]
        );
        let b = prompt.r#box.unwrap();
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (40.0, 10.0, 250.0, 80.0));
        assert!(prompt_from_marks(None).unwrap().is_none());
        assert!(prompt_from_marks(Some(&json!([]))).unwrap().is_none());
    }

    #[test]
    fn bad_marks_say_which_and_why() {
        for (marks, expected) in [
            (json!({"type": "point"}), "must be a list"),
            (json!([{"type": "point", "data": [1]}]), "marks[0]: a point's data is [x, y]"),
            (
                json!([{"type": "point", "data": [1, 2]}, {"type": "rectangle", "data": [1, 2, 3]}]),
                "marks[1]",
            ),
            (json!([{"type": "polygon", "data": [1, 2]}]), "is not a prompt"),
            (
                json!([{"type": "rectangle", "data": [1, 2, 3, 4]}, {"type": "rectangle", "data": [1, 2, 3, 4]}]),
                "one rectangle",
            ),
        ] {
            let err = prompt_from_marks(Some(&marks)).unwrap_err();
            assert!(err.contains(expected), "{marks}: {err}");
        }
    }

    #[test]
    fn timestamps_are_utc_iso_8601() {
        assert_eq!(utc_timestamp(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_timestamp(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(utc_timestamp(1_796_645_045), "2026-12-07T12:04:05Z");
    }

    #[test]
    fn models_lists_the_one_model_with_its_widgets() {
        let info = model_info();
        assert_eq!(info["batch_processing_mode"], "default");
        let widgets: Vec<&str> =
            info["widgets"].as_array().unwrap().iter().map(|w| w["name"].as_str().unwrap()).collect();
        assert!(widgets.contains(&"button_add_point") && widgets.contains(&"button_add_rect"));
    }
}
