//! Label Studio's ML back-end protocol (as `label-studio-ml-backend` serves it): `GET /health`,
//! `POST /setup` and `POST /predict`.
//!
//! - Interactive: the annotator's smart keypoints (positive/negative) and rectangle, in percent
//!   of the image, become one SAM prompt; the answer is the mask as a `brushlabels` region (brush
//!   RLE) or a `polygonlabels` region, with the region's description in a per-region `TextArea`
//!   and its category in a per-region `Choices` when the labeling config has them.
//! - Pre-annotation (no context): everything mode over the task's image, one region and text
//!   for each mask.
//!
//! Errors are label-studio-ml-backend's shape: `{"status": <HTTP status>, "detail": <message>}`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use osprey_proto::v1;
use serde_json::{Value, json};

use crate::auth::Refusal;

use super::brush_rle;
use super::calls::{
    Backend, Failure, Registered, count, json as json_response, mask_region, match_option, parse_body,
    result_mask,
};
use super::contours;
use super::coords;
use super::fetch::{self, LabelStudioAccess};
use super::label_config::{LabelConfig, RegionKind};

/// Most regions of one pre-annotated task by default (everything mode's `max_masks`).
pub const MAX_PREANNOTATION_REGIONS: u32 = 32;

struct State {
    backend: Arc<Backend>,
    /// From the environment (`LABEL_STUDIO_URL`, `LABEL_STUDIO_API_KEY`); these win over what
    /// Label Studio says in `/setup`.
    access: LabelStudioAccess,
    /// Per project id, what Label Studio sent to `/setup`.
    projects: Mutex<HashMap<String, Project>>,
}

/// What `/setup` told about a project: where Label Studio is, and the connection's extra params.
#[derive(Debug, Clone, Default)]
struct Project {
    access: LabelStudioAccess,
    everything: Everything,
}

/// Pre-annotation settings, from the model connection's "extra params" JSON in Label Studio:
/// `{"points_per_side": 16, "max_regions": 32}`.
#[derive(Debug, Clone, Copy)]
struct Everything {
    points_per_side: Option<u32>,
    max_regions: u32,
}

impl Default for Everything {
    fn default() -> Self {
        Self { points_per_side: None, max_regions: MAX_PREANNOTATION_REGIONS }
    }
}

impl Everything {
    fn from_extra_params(extra: Option<&Value>) -> Result<Self, Failure> {
        let number = |name: &str| -> Result<Option<u32>, Failure> {
            match extra.and_then(|e| e.get(name)) {
                None | Some(Value::Null) => Ok(None),
                Some(v) => {
                    v.as_u64().filter(|n| (1..=1024).contains(n)).map(|n| Some(n as u32)).ok_or_else(|| {
                        Failure::bad_request(format!(
                            "extra_params.{name} must be a whole number from 1 to 1024"
                        ))
                    })
                }
            }
        };
        Ok(Self {
            points_per_side: number("points_per_side")?,
            max_regions: number("max_regions")?.unwrap_or(MAX_PREANNOTATION_REGIONS),
        })
    }

    fn params(self) -> v1::EverythingParams {
        v1::EverythingParams {
            points_per_side: self.points_per_side,
            max_masks: Some(self.max_regions),
            ..Default::default()
        }
    }
}

impl State {
    /// How to fetch the images of `project` ("<id>.<timestamp>", as Label Studio sends it).
    fn project(&self, project: Option<&str>) -> Project {
        let id = project.and_then(|p| p.split('.').next()).unwrap_or("");
        let projects = self.projects.lock().unwrap_or_else(|e| e.into_inner());
        let told = projects.get(id).cloned().unwrap_or_default();
        // The operator's settings win: Label Studio may call itself localhost.
        let access = LabelStudioAccess {
            url: self.access.url.clone().or(told.access.url),
            token: self.access.token.clone().or(told.access.token),
        };
        Project { access, everything: told.everything }
    }
}

/// The routes, to be nested under a prefix (the back end's URL in Label Studio).
pub fn router(backend: Arc<Backend>) -> Router {
    router_with(backend, LabelStudioAccess::from_env())
}

/// As [`router`], with Label Studio's address and token given.
pub fn router_with(backend: Arc<Backend>, access: LabelStudioAccess) -> Router {
    let state = Arc::new(State { backend, access, projects: Mutex::new(HashMap::new()) });
    let health =
        || async { json_response(StatusCode::OK, &json!({"status": "UP", "model_class": "Osprey"})) };
    let (setup_state, validate_state, predict_state) = (state.clone(), state.clone(), state);
    Router::new()
        .route("/", get(health))
        .route("/health", get(health))
        .route("/metrics", get(|| async { json_response(StatusCode::OK, &json!({})) }))
        .route(
            "/setup",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = setup_state.clone();
                async move { answer(&state, &headers, &body, setup).await }
            }),
        )
        .route(
            "/validate",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = validate_state.clone();
                async move { answer(&state, &headers, &body, validate).await }
            }),
        )
        .route(
            "/predict",
            post(move |headers: HeaderMap, body: Bytes| {
                let state = predict_state.clone();
                async move { answer(&state, &headers, &body, predict).await }
            }),
        )
        // Training events: nothing to train, acknowledged as the reference server does.
        .route(
            "/webhook",
            post(|| async { json_response(StatusCode::OK, &json!({"status": "Unknown event"})) }),
        )
}

/// Checks the key, parses the body, runs `work`, and answers in Label Studio's shape.
async fn answer<'a, F, Fut>(state: &'a State, headers: &HeaderMap, body: &[u8], work: F) -> Response
where
    F: FnOnce(&'a State, Value) -> Fut,
    Fut: std::future::Future<Output = Result<Value, Failure>>,
{
    let (key, result) = match state.backend.admit(headers) {
        Err(refusal) => {
            let message = match refusal {
                Refusal::Unauthenticated => "missing or wrong API key: connect the model with basic auth \
                                             (any user name, the gateway's API key as password), or send \
                                             Authorization: Token KEY"
                    .into(),
                Refusal::RateLimited { .. } => refusal.message(),
            };
            (refusal.key_label(), Err(Failure { status: refusal.http_status(), message }))
        }
        Ok(key) => match parse_body(body) {
            Ok(request) => (key, work(state, request).await),
            Err(message) => (key, Err(Failure::bad_request(message))),
        },
    };
    match result {
        Ok(body) => {
            count("label-studio", &key, StatusCode::OK);
            json_response(StatusCode::OK, &body)
        }
        Err(failure) => {
            count("label-studio", &key, failure.status);
            let body = json!({"status": failure.status.as_u16(), "detail": failure.message});
            let mut response = json_response(failure.status, &body);
            if failure.status == StatusCode::UNAUTHORIZED {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, "Basic realm=\"osprey\"".parse().unwrap());
            }
            response.into_response()
        }
    }
}

fn model_version(state: &State) -> String {
    format!("osprey-{}", state.backend.osprey.0.model_revision)
}

/// `/setup`: Label Studio connects the back end; the labeling config (`schema`) is checked here
/// so that a config this back end cannot serve is reported when connecting.
async fn setup(state: &State, request: Value) -> Result<Value, Failure> {
    if let Some(schema) = request.get("schema").and_then(Value::as_str) {
        LabelConfig::parse(schema).map_err(Failure::bad_request)?;
    }
    // Label Studio says where it is and which token reads its files; kept for the project's
    // predictions (memory only: after a gateway restart the environment's values apply until
    // Label Studio calls /setup again).
    let text =
        |name: &str| request.get(name).and_then(Value::as_str).map(str::trim).filter(|v| !v.is_empty());
    let everything = Everything::from_extra_params(request.get("extra_params"))?;
    if let Some(project) = text("project") {
        let id = project.split('.').next().unwrap_or(project).to_string();
        let access = LabelStudioAccess {
            url: text("hostname").map(|h| h.trim_end_matches('/').to_string()),
            token: text("access_token").map(str::to_string),
        };
        state.projects.lock().unwrap_or_else(|e| e.into_inner()).insert(id, Project { access, everything });
    }
    Ok(json!({"model_version": model_version(state)}))
}

/// `/validate` (Label Studio calls it when a labeling config changes): whether this back end
/// can serve the config.
async fn validate(_state: &State, request: Value) -> Result<Value, Failure> {
    let config = request.get("config").and_then(Value::as_str).unwrap_or("");
    LabelConfig::parse(config).map_err(Failure::bad_request)?;
    Ok(json!({"status": "ok"}))
}

/// `/predict`: one prediction per task (only the first task in interactive mode).
async fn predict(state: &State, request: Value) -> Result<Value, Failure> {
    let label_config = request.get("label_config").and_then(Value::as_str).ok_or_else(|| {
        Failure::bad_request("the request has no label_config (the project's labeling config)")
    })?;
    let config = LabelConfig::parse(label_config).map_err(Failure::bad_request)?;
    let tasks = request
        .get("tasks")
        .and_then(Value::as_array)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| Failure::bad_request("the request has no tasks"))?;
    let context = request.pointer("/params/context").or_else(|| request.get("context"));
    let prompt_items: Vec<Value> =
        context.and_then(|c| c.get("result")).and_then(Value::as_array).cloned().unwrap_or_default();
    let project = state.project(request.get("project").and_then(Value::as_str));
    let mut predictions = Vec::new();
    if prompt_items.is_empty() {
        for task in tasks {
            predictions.push(predict_task(state, &project, &config, task, None).await?);
        }
    } else {
        predictions.push(predict_task(state, &project, &config, &tasks[0], Some(&prompt_items)).await?);
    }
    Ok(json!({"results": predictions, "model_version": model_version(state)}))
}

async fn predict_task(
    state: &State,
    project: &Project,
    config: &LabelConfig,
    task: &Value,
    prompt_items: Option<&[Value]>,
) -> Result<Value, Failure> {
    let task_id = task.get("id").map(Value::to_string).unwrap_or_else(|| "without id".into());
    let reference =
        task.pointer(&format!("/data/{}", config.image_field)).and_then(Value::as_str).ok_or_else(|| {
            Failure::bad_request(format!(
                "task {task_id} has no image in data.{} (the <Image> tag's value)",
                config.image_field
            ))
        })?;
    let backend = &state.backend;
    let bytes = fetch::image_bytes(reference, &project.access, backend.max_image_bytes())
        .await
        .map_err(|message| Failure { status: image_failure_status(&message), message })?;
    let image = backend.register(bytes).await?;
    let (results, chosen_label) = match prompt_items {
        Some(items) => {
            let (prompt, label) = prompt_from_context(items, &image)?;
            let region =
                v1::Region { source: Some(v1::region::Source::Prompt(prompt)), label: String::new() };
            let results =
                backend.describe_regions(&image, vec![region], None, v1::DescribeTask::Short).await?;
            (results, label)
        }
        None => {
            let everything = project.everything.params();
            (
                backend
                    .describe_regions(&image, Vec::new(), Some(everything), v1::DescribeTask::Short)
                    .await?,
                None,
            )
        }
    };
    // The category, when a Choices tag wants it or the label must be chosen among several.
    let label_given = chosen_label.as_ref().is_some_and(|l| config.regions.values.contains(l));
    let wants_category = config.category.is_some() || (!label_given && config.regions.values.len() > 1);
    let categories = if wants_category && !results.is_empty() {
        let regions: Vec<v1::Region> = results.iter().filter_map(mask_region).collect();
        backend.describe_regions(&image, regions, None, v1::DescribeTask::Category).await?
    } else {
        Vec::new()
    };
    let mut items = Vec::new();
    for (index, result) in results.iter().enumerate() {
        let category = categories.get(index).map(|c| c.text.as_str()).unwrap_or("");
        let label = if label_given {
            chosen_label.clone().unwrap_or_default()
        } else {
            match_option(category, &config.regions.values).unwrap_or(&config.regions.values[0]).clone()
        };
        let choice = config.category.as_ref().and_then(|c| match_option(category, &c.values)).cloned();
        items.extend(region_items(config, &image, result, &label, choice)?);
    }
    Ok(json!({"result": items, "model_version": model_version(state)}))
}

/// Fetch problems the client can fix are 400; a Label Studio that cannot be reached is 502.
fn image_failure_status(message: &str) -> StatusCode {
    if message.contains("failed") { StatusCode::BAD_GATEWAY } else { StatusCode::BAD_REQUEST }
}

/// The SAM prompt of the annotator's smart keypoints and rectangle, and the label they carry.
fn prompt_from_context(
    items: &[Value],
    image: &Registered,
) -> Result<(v1::SamPrompt, Option<String>), Failure> {
    let mut prompt = v1::SamPrompt::default();
    let mut label = None;
    for (index, item) in items.iter().enumerate() {
        let kind = item.get("type").and_then(Value::as_str).unwrap_or("");
        let value = item
            .get("value")
            .ok_or_else(|| Failure::bad_request(format!("context.result[{index}] has no value")))?;
        let number = |name: &str| {
            value.get(name).and_then(Value::as_f64).ok_or_else(|| {
                Failure::bad_request(format!(
                    "context.result[{index}].value.{name} must be a number (percent)"
                ))
            })
        };
        if item.get("image_rotation").and_then(Value::as_f64).is_some_and(|r| r != 0.0) {
            return Err(Failure::bad_request(
                "the image is rotated in Label Studio (image_rotation); reset the rotation to prompt SAM",
            ));
        }
        match kind {
            "keypointlabels" => {
                let x = coords::percent_to_pixels(number("x")?, image.width);
                let y = coords::percent_to_pixels(number("y")?, image.height);
                // Label Studio marks negative keypoints with is_positive: false (Alt-click).
                let positive = item.get("is_positive").and_then(Value::as_bool).unwrap_or(true);
                prompt.points.push(coords::point(x, y, positive));
            }
            "rectanglelabels" => {
                if prompt.r#box.is_some() {
                    return Err(Failure::bad_request(
                        "SAM takes one rectangle per prompt; the context has several",
                    ));
                }
                let rotation = value.get("rotation").and_then(Value::as_f64).unwrap_or(0.0);
                let (x, y, w, h) = (number("x")?, number("y")?, number("width")?, number("height")?);
                prompt.r#box =
                    Some(coords::label_studio_box(x, y, w, h, rotation, image.width, image.height));
            }
            _ => continue,
        }
        if label.is_none() {
            label = value.get(kind).and_then(|l| l.get(0)).and_then(Value::as_str).map(str::to_string);
        }
    }
    if prompt.points.is_empty() && prompt.r#box.is_none() {
        return Err(Failure::bad_request(
            "the context has no keypointlabels or rectanglelabels result to prompt SAM with \
             (use <KeyPointLabels smart=\"true\"> or <RectangleLabels smart=\"true\">)",
        ));
    }
    Ok((prompt, label))
}

/// A process-wide counter for region ids, so repeated clicks never reuse one.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

fn region_id(image: &Registered) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    let digest = blake3::hash(format!("{}:{n}:{nanos}", image.key).as_bytes()).to_hex();
    format!("osprey_{}", &digest[..10])
}

/// The result items of one region: the region itself, then its description and category (same
/// id, which is how Label Studio ties per-region controls to a region).
fn region_items(
    config: &LabelConfig,
    image: &Registered,
    result: &v1::RegionResult,
    label: &str,
    choice: Option<String>,
) -> Result<Vec<Value>, Failure> {
    let mask = result_mask(result)?;
    let (width, height) = (image.width, image.height);
    let id = region_id(image);
    let value = match config.region_kind {
        RegionKind::Brush => {
            json!({"format": "rle", "rle": brush_rle::encode_mask(&mask), "brushlabels": [label]})
        }
        RegionKind::Polygon => {
            // Label Studio's polygon is one ring: the largest component's outline.
            let Some(outline) = contours::outlines(&mask, contours::DEFAULT_TOLERANCE).into_iter().next()
            else {
                return Ok(Vec::new());
            };
            let points: Vec<[f64; 2]> = outline
                .iter()
                .map(|p| [coords::pixels_to_percent(p[0], width), coords::pixels_to_percent(p[1], height)])
                .collect();
            json!({"points": points, "closed": true, "polygonlabels": [label]})
        }
    };
    let item = |from_name: &str, kind: &str, value: Value| {
        json!({
            "id": id,
            "from_name": from_name,
            "to_name": config.image_name,
            "type": kind,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": value,
        })
    };
    let mut items = vec![item(&config.regions.name, config.region_kind.result_type(), value)];
    if let Some(description) = &config.description {
        items.push(item(&description.name, "textarea", json!({"text": [result.text]})));
    }
    if let (Some(category), Some(choice)) = (&config.category, choice) {
        items.push(item(&category.name, "choices", json!({"choices": [choice]})));
    }
    Ok(items)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(width: u32, height: u32) -> Registered {
        Registered { key: "k".into(), width, height }
    }

    #[test]
    fn context_keypoints_and_rectangles_become_one_prompt_in_pixels() {
        // A 400 x 100 image: x percents are of 400, y percents of 100.
        let items: Vec<Value> = serde_json::from_value(json!([
            {"type": "keypointlabels", "is_positive": true, "original_width": 400, "original_height": 100,
             "value": {"x": 25.0, "y": 50.0, "width": 0.5, "keypointlabels": ["Cat"]}},
            {"type": "keypointlabels", "is_positive": false,
             "value": {"x": 75.0, "y": 10.0, "keypointlabels": ["Cat"]}},
            {"type": "rectanglelabels",
             "value": {"x": 10.0, "y": 20.0, "width": 50.0, "height": 60.0, "rotation": 0, "rectanglelabels": ["Cat"]}}
        ]))
        .unwrap();
        let (prompt, label) = prompt_from_context(&items, &image(400, 100)).unwrap();
        assert_eq!(label.as_deref(), Some("Cat"));
        let points: Vec<(f32, f32, i32)> = prompt.points.iter().map(|p| (p.x, p.y, p.label)).collect();
        assert_eq!(
            points,
            vec![
                (100.0, 50.0, v1::PointLabel::Foreground as i32),
                (300.0, 10.0, v1::PointLabel::Background as i32)
            ]
        );
        let b = prompt.r#box.unwrap();
        assert_eq!((b.x0, b.y0, b.x1, b.y1), (40.0, 20.0, 240.0, 80.0));
    }

    #[test]
    fn unusable_contexts_are_bad_requests() {
        for (items, expected) in [
            (
                json!([{"type": "choices", "value": {"choices": ["a"]}}]),
                "no keypointlabels or rectanglelabels",
            ),
            (json!([{"type": "keypointlabels", "value": {"x": "left", "y": 1}}]), "value.x must be a number"),
            (json!([{"type": "keypointlabels", "value": {"y": 1}}]), "value.x must be a number"),
            (json!([{"type": "keypointlabels"}]), "has no value"),
            (
                json!([{"type": "keypointlabels", "image_rotation": 90, "value": {"x": 1, "y": 1}}]),
                "rotated in Label Studio",
            ),
            (
                json!([{"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 2, "height": 2}},
                       {"type": "rectanglelabels", "value": {"x": 1, "y": 1, "width": 2, "height": 2}}]),
                "one rectangle",
            ),
        ] {
            let items: Vec<Value> = serde_json::from_value(items).unwrap();
            let failure = prompt_from_context(&items, &image(10, 10)).unwrap_err();
            assert_eq!(failure.status, StatusCode::BAD_REQUEST);
            assert!(failure.message.contains(expected), "{}", failure.message);
        }
    }
}
