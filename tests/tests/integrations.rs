//! The annotation-tool back ends on the gateway's HTTP side (`--http-listen`), against the real
//! binaries with the real MobileSAM weights: Label Studio's ML back end and X-AnyLabeling's remote
//! server. Each answer is checked against the same request made over gRPC with the prompt in
//! pixels, so a coordinate mistake (percent of the wrong axis, a box corner taken for its centre,
//! the stored instead of the EXIF-rotated size) changes the mask and fails the test.

use base64::Engine;
use osprey_common::mask::{Mask, rle_from_proto};
use osprey_e2e::{
    Process, TestImage, Workers, client, gateway, llm_worker, loopback, mobile_sam_worker, vision_worker,
    wait_all,
};
use osprey_proto::v1;
use serde_json::{Value, json};

const KEY: &str = "integration-key";
/// A region of the sample photo (x0, y0, x1, y1, ...) the CVAT describe-masks script describes.
const POLYGON: &str = "20,15,90,10,110,60,60,95,15,70";

struct Cluster {
    _workers: Vec<Process>,
    gateway: Process,
    http: String,
}

/// Workers, MobileSAM and a gateway serving HTTP on `ip`, behind `KEY`; `extra` gateway flags.
async fn cluster(n: u8, extra: &[&str]) -> Cluster {
    let ip = loopback(n);
    let http_port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
    let http_listen = format!("{ip}:{http_port}");
    let mut vision = vision_worker(ip, &[]).unwrap();
    let mut llm = llm_worker(ip, &[]).unwrap();
    let mut sam = mobile_sam_worker(ip, &[]).unwrap();
    wait_all(&mut [&mut vision, &mut llm, &mut sam]).await.unwrap();
    let workers = Workers { vision: vec![&vision], llm: vec![&llm], sam: vec![&sam] };
    let mut flags = vec!["--api-key", KEY, "--http-listen", &http_listen];
    flags.extend(extra);
    let mut gateway = gateway(ip, &workers, &flags).unwrap();
    gateway.wait_ready().await.unwrap();
    Cluster { _workers: vec![vision, llm, sam], gateway, http: format!("http://{http_listen}") }
}

/// An HTTP call; the status and the JSON body (or the text as a JSON string).
fn call(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&str>) -> (u16, Value) {
    let mut request = ureq::request(method, url);
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = match body {
        Some(body) => request.set("Content-Type", "application/json").send_string(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => panic!("{method} {url}: {other}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn post(url: &str, headers: &[(&str, &str)], body: &Value) -> (u16, Value) {
    call("POST", url, headers, Some(&body.to_string()))
}

fn data_url(image: &TestImage) -> String {
    let mime = if image.name.ends_with(".png") { "image/png" } else { "image/jpeg" };
    format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(&image.bytes))
}

/// The gRPC reference: Describe (short) of one SAM prompt, and its mask.
async fn reference(gateway: &Process, image: &TestImage, prompt: v1::SamPrompt) -> (Mask, String) {
    let mut client = client(gateway, Some(KEY)).await.unwrap();
    let region = v1::Region { source: Some(v1::region::Source::Prompt(prompt)), label: String::new() };
    let request = osprey_e2e::describe_request(image, vec![region], 1024);
    let request = v1::DescribeRequest { parameters: None, ..request };
    let results = osprey_e2e::describe(&mut client, request).await.unwrap();
    let mask = rle_from_proto(results[0].mask.as_ref().unwrap()).unwrap().to_mask();
    (mask, results[0].text.clone())
}

fn point(x: f32, y: f32, foreground: bool) -> v1::Point {
    let label = if foreground { v1::PointLabel::Foreground } else { v1::PointLabel::Background };
    v1::Point { x, y, label: label as i32 }
}

/// Label Studio's brush RLE decoded to a mask (alpha channel), as its front end reads it.
fn brush_mask(rle: &Value, height: u32, width: u32) -> Mask {
    let bytes: Vec<u8> = rle.as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u8).collect();
    let values = gateway::integrations::brush_rle::decode(&bytes).unwrap();
    assert_eq!(values.len(), (height * width * 4) as usize);
    let alpha: Vec<u8> = values.chunks_exact(4).map(|px| px[3]).collect();
    Mask::from_row_major(height, width, &alpha).unwrap()
}

fn iou(a: &Mask, b: &Mask) -> f64 {
    let (mut both, mut either) = (0u64, 0u64);
    for (x, y) in a.data().iter().zip(b.data()) {
        both += (*x & *y) as u64;
        either += (*x | *y) as u64;
    }
    both as f64 / either.max(1) as f64
}

const BRUSH_CONFIG: &str = r#"<View>
  <Image name="image" value="$image"/>
  <KeyPointLabels name="tag" toName="image" smart="true"><Label value="Object" smart="true"/></KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true"><Label value="Object"/></RectangleLabels>
  <BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>
  <TextArea name="description" toName="image" perRegion="true" editable="true"/>
  <Choices name="category" toName="image" perRegion="true"><Choice value="cat"/><Choice value="other"/></Choices>
</View>"#;

fn predict_request(config: &str, image: &str, context: Value) -> Value {
    json!({
        "tasks": [{"id": 7, "data": {"image": image}}],
        "label_config": config,
        "project": "1.1700000000",
        "params": {"login": null, "password": null, "context": context},
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn label_studio_backend_answers_as_grpc_does() {
    let cluster = cluster(171, &["--max-image-bytes", "1000000"]).await;
    let url = |path: &str| format!("{}/label-studio{path}", cluster.http);
    let auth = [("Authorization", &*format!("Token {KEY}"))];
    let auth: Vec<(&str, &str)> = auth.iter().map(|(n, v)| (*n, *v)).collect();

    let (status, health) = call("GET", &url("/health"), &auth, None);
    assert_eq!((status, health["status"].as_str()), (200, Some("UP")), "{health}");
    // A small point grid for pre-annotation (the connection's extra params), to keep the test short.
    let extra = json!({"points_per_side": 4, "max_regions": 4});
    let setup_request = json!({"project": "1.1", "schema": BRUSH_CONFIG, "extra_params": extra});
    let (status, setup) = post(&url("/setup"), &auth, &setup_request);
    assert_eq!(status, 200, "{setup}");
    assert!(setup["model_version"].as_str().unwrap().starts_with("osprey-"), "{setup}");

    // EXIF orientation 6: stored landscape, shown (and annotated) portrait.
    let image = TestImage::load("images/chelsea_exif_orient6.jpg").unwrap();
    assert!(image.width < image.height, "{}x{}", image.width, image.height);
    let (w, h) = (image.width as f32, image.height as f32);
    // A positive keypoint, a negative one and a box, in percent of the shown size.
    let context = json!({"result": [
        {"type": "keypointlabels", "is_positive": true, "original_width": image.width, "original_height": image.height,
         "from_name": "tag", "to_name": "image", "value": {"x": 40.0, "y": 30.0, "width": 0.6, "keypointlabels": ["Object"]}},
        {"type": "keypointlabels", "is_positive": false, "from_name": "tag", "to_name": "image",
         "value": {"x": 90.0, "y": 90.0, "keypointlabels": ["Object"]}},
        {"type": "rectanglelabels", "from_name": "box", "to_name": "image",
         "value": {"x": 10.0, "y": 5.0, "width": 70.0, "height": 50.0, "rotation": 0, "rectanglelabels": ["Object"]}}
    ]});
    let (status, answer) =
        post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, &data_url(&image), context));
    assert_eq!(status, 200, "{answer}");
    let prediction = &answer["results"][0];
    let items = prediction["result"].as_array().unwrap();
    let prompt = v1::SamPrompt {
        points: vec![point(0.4 * w, 0.3 * h, true), point(0.9 * w, 0.9 * h, false)],
        r#box: Some(v1::Box { x0: 0.1 * w, y0: 0.05 * h, x1: 0.8 * w, y1: 0.55 * h }),
        ..Default::default()
    };
    let (expected_mask, expected_text) = reference(&cluster.gateway, &image, prompt).await;
    let brush = items.iter().find(|i| i["type"] == "brushlabels").expect("a brush region");
    assert_eq!(brush["original_width"], image.width);
    assert_eq!(brush["original_height"], image.height);
    assert_eq!(brush["from_name"], "mask");
    assert_eq!(brush["value"]["brushlabels"], json!(["Object"]));
    assert_eq!(brush["value"]["format"], "rle");
    let mask = brush_mask(&brush["value"]["rle"], image.height, image.width);
    assert!(mask.area() > 0);
    assert_eq!(mask, expected_mask, "the brush mask is the gRPC mask of the same prompt in pixels");
    // MobileSAM's mask holds the positive click.
    let (cx, cy) = ((0.4 * w) as usize, (0.3 * h) as usize);
    assert_eq!(mask.data()[cy * image.width as usize + cx], 1, "the clicked pixel is in the mask");
    let text = items.iter().find(|i| i["type"] == "textarea").expect("a description");
    assert_eq!(text["id"], brush["id"], "the description belongs to the region");
    assert_eq!(text["from_name"], "description");
    assert_eq!(text["value"]["text"], json!([expected_text]));
    // The category is given only when it matches a choice (the demo LLM's answers rarely do).
    for choice in items.iter().filter(|i| i["type"] == "choices") {
        assert_eq!(choice["id"], brush["id"]);
        assert!(["cat", "other"].contains(&choice["value"]["choices"][0].as_str().unwrap()), "{choice}");
    }

    // Polygons: the outline in percent of the shown size covers the same pixels.
    let polygon_config = BRUSH_CONFIG.replace("BrushLabels", "PolygonLabels");
    let point_only = json!({"result": [{"type": "keypointlabels", "is_positive": true,
        "value": {"x": 40.0, "y": 30.0, "keypointlabels": ["Object"]}}]});
    let (status, answer) =
        post(&url("/predict"), &auth, &predict_request(&polygon_config, &data_url(&image), point_only));
    assert_eq!(status, 200, "{answer}");
    let items = answer["results"][0]["result"].as_array().unwrap();
    let polygon = items.iter().find(|i| i["type"] == "polygonlabels").expect("a polygon region");
    let xy: Vec<f64> = polygon["value"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| [p[0].as_f64().unwrap() / 100.0 * w as f64, p[1].as_f64().unwrap() / 100.0 * h as f64])
        .collect();
    let (point_mask, _) = reference(
        &cluster.gateway,
        &image,
        v1::SamPrompt { points: vec![point(0.4 * w, 0.3 * h, true)], ..Default::default() },
    )
    .await;
    let drawn = Mask::from_polygons(image.height, image.width, &[xy]).unwrap();
    let overlap = iou(&drawn, &point_mask);
    assert!(overlap > 0.85, "polygon vs mask IoU {overlap}");

    // Pre-annotation: everything mode, one region and description each.
    let photo = osprey_e2e::photo();
    let (status, answer) =
        post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, &data_url(&photo), json!(null)));
    assert_eq!(status, 200, "{answer}");
    let items = answer["results"][0]["result"].as_array().unwrap();
    let regions = items.iter().filter(|i| i["type"] == "brushlabels").count();
    let texts = items.iter().filter(|i| i["type"] == "textarea").count();
    assert!((1..=4).contains(&regions) && texts == regions, "{regions} regions, {texts} texts");
    let mut client = client(&cluster.gateway, Some(KEY)).await.unwrap();
    let everything = v1::DescribeRequest {
        everything: Some(v1::EverythingParams {
            points_per_side: Some(4),
            max_masks: Some(4),
            ..Default::default()
        }),
        parameters: None,
        ..osprey_e2e::describe_request(&photo, Vec::new(), 1)
    };
    let expected = osprey_e2e::describe(&mut client, everything).await.unwrap();
    assert_eq!(regions, expected.len(), "as many regions as gRPC's everything mode");

    // Bad requests get Label Studio's error shape with a clear message.
    let detail = |status: u16, body: &Value, expected_status: u16, words: &str| {
        assert_eq!(status, expected_status, "{body}");
        assert_eq!(body["status"], expected_status, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains(words), "{detail:?} should say {words:?}");
    };
    let (status, body) = call("POST", &url("/predict"), &auth, Some("{not json"));
    detail(status, &body, 400, "not valid JSON");
    let rectangles_only = r#"<View><Image name="image" value="$image"/><RectangleLabels name="r" toName="image"><Label value="A"/></RectangleLabels></View>"#;
    let (status, body) =
        post(&url("/predict"), &auth, &predict_request(rectangles_only, &data_url(&photo), json!(null)));
    detail(status, &body, 400, "no <BrushLabels> or <PolygonLabels>");
    let (status, body) = post(&url("/setup"), &auth, &json!({"project": "2.1", "schema": rectangles_only}));
    detail(status, &body, 400, "no <BrushLabels> or <PolygonLabels>");
    let (status, body) =
        post(&url("/setup"), &auth, &json!({"project": "2.1", "extra_params": {"points_per_side": 0}}));
    detail(status, &body, 400, "extra_params.points_per_side");
    let big = format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(vec![0u8; 1_100_000])
    );
    let (status, body) = post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, &big, json!(null)));
    detail(status, &body, 400, "over the limit of 1000000 bytes");
    let not_an_image =
        format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(b"hello"));
    let (status, body) =
        post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, &not_an_image, json!(null)));
    detail(status, &body, 400, "unrecognised image format");
    let (status, body) =
        post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, "/data/upload/1/cat.png", json!(null)));
    detail(status, &body, 400, "set LABEL_STUDIO_URL");
    let outside = json!({"result": [{"type": "keypointlabels", "value": {"x": 140.0, "y": 30.0, "keypointlabels": ["Object"]}}]});
    let (status, body) =
        post(&url("/predict"), &auth, &predict_request(BRUSH_CONFIG, &data_url(&photo), outside));
    detail(status, &body, 400, "outside");

    // The API key: missing or wrong is 401 with a basic-auth challenge; basic auth and Bearer open.
    let (status, body) = post(&url("/setup"), &[], &json!({"project": "3.1"}));
    detail(status, &body, 401, "API key");
    let (status, _) = post(&url("/setup"), &[("Authorization", "Token wrong")], &json!({"project": "3.1"}));
    assert_eq!(status, 401);
    let basic =
        format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(format!("labelstudio:{KEY}")));
    let (status, body) = post(&url("/setup"), &[("Authorization", &basic)], &json!({"project": "3.1"}));
    assert_eq!(status, 200, "{body}");
    let bearer = format!("Bearer {KEY}");
    let (status, body) = post(&url("/setup"), &[("Authorization", &bearer)], &json!({"project": "3.1"}));
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn x_anylabeling_server_answers_as_grpc_does() {
    let cluster = cluster(172, &[]).await;
    let url = |path: &str| format!("{}/x-anylabeling{path}", cluster.http);
    let auth = [("Token", KEY)];

    // Health is open, as the reference server's; the rest needs the key.
    let (status, health) = call("GET", &url("/health"), &[], None);
    assert_eq!((status, health["status"].as_str()), (200, Some("healthy")), "{health}");
    let (status, body) = call("GET", &url("/v1/models"), &[], None);
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "UNAUTHORIZED");
    let (status, models) = call("GET", &url("/v1/models"), &auth, None);
    assert_eq!(status, 200, "{models}");
    assert_eq!(models["success"], true);
    assert!(models["data"]["osprey"]["display_name"].is_string(), "{models}");

    // The sample photo (157 x 103): a box given bottom-right corner first, a positive and a
    // negative point, in pixels.
    let photo = osprey_e2e::photo();
    let image = base64::engine::general_purpose::STANDARD.encode(&photo.bytes);
    let marks = json!([
        {"type": "point", "data": [60.0, 50.0], "label": 1},
        {"type": "point", "data": [140.0, 20.0], "label": 0},
        {"type": "rectangle", "data": [120.0, 90.0, 20.0, 10.0]}
    ]);
    let request =
        json!({"model": "osprey", "image": image, "params": {"marks": marks, "image_id": "photo.png"}});
    let (status, answer) = post(&url("/v1/predict"), &auth, &request);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["success"], true, "{answer}");
    let shapes = answer["data"]["shapes"].as_array().unwrap();
    assert!(!shapes.is_empty(), "{answer}");
    let (expected_mask, expected_text) = reference(
        &cluster.gateway,
        &photo,
        v1::SamPrompt {
            points: vec![point(60.0, 50.0, true), point(140.0, 20.0, false)],
            r#box: Some(v1::Box { x0: 20.0, y0: 10.0, x1: 120.0, y1: 90.0 }),
            ..Default::default()
        },
    )
    .await;
    let polygons: Vec<Vec<f64>> = shapes
        .iter()
        .map(|shape| {
            assert_eq!(shape["shape_type"], "polygon");
            assert_eq!(shape["description"], expected_text.as_str());
            assert!(!shape["label"].as_str().unwrap().is_empty());
            let points = shape["points"].as_array().unwrap();
            assert_eq!(points.first(), points.last(), "closed as the reference server closes polygons");
            points.iter().flat_map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()]).collect()
        })
        .collect();
    let drawn = Mask::from_polygons(photo.height, photo.width, &polygons).unwrap();
    let overlap = iou(&drawn, &expected_mask);
    assert!(overlap > 0.85, "polygons vs gRPC mask IoU {overlap}");
    assert_eq!(answer["data"]["description"], expected_text.as_str());

    // The same image again is found by its bytes (no second decode) and answers the same.
    let (_, again) = post(&url("/v1/predict"), &auth, &request);
    assert_eq!(again["data"]["shapes"], answer["data"]["shapes"]);

    // data.image_id is the gateway's image key; sent back as params.image_id, it stands for the
    // image, which then need not be sent again.
    assert_eq!(answer["data"]["image_id"], photo.key.as_str(), "{answer}");
    let by_id = json!({"model": "osprey", "params": {"marks": marks, "image_id": photo.key}});
    let (status, by_id) = post(&url("/v1/predict"), &auth, &by_id);
    assert_eq!(status, 200, "{by_id}");
    assert_eq!(by_id["data"]["shapes"], answer["data"]["shapes"], "{by_id}");
    assert_eq!(by_id["data"]["image_id"], photo.key.as_str());
    // Image bytes win over an image_id: another image sent with the photo's id is that image.
    let other = TestImage::load("images/chelsea_rgba.png").unwrap();
    let other_request = json!({
        "model": "osprey",
        "image": data_url(&other),
        "params": {"marks": marks, "image_id": photo.key},
    });
    let (status, other_answer) = post(&url("/v1/predict"), &auth, &other_request);
    assert_eq!(status, 200, "{other_answer}");
    assert_eq!(other_answer["data"]["image_id"], other.key.as_str(), "{other_answer}");
    let (other_mask, other_text) = reference(
        &cluster.gateway,
        &other,
        v1::SamPrompt {
            points: vec![point(60.0, 50.0, true), point(140.0, 20.0, false)],
            r#box: Some(v1::Box { x0: 20.0, y0: 10.0, x1: 120.0, y1: 90.0 }),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(other_answer["data"]["description"], other_text.as_str());
    let other_polygons: Vec<Vec<f64>> = other_answer["data"]["shapes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|shape| {
            let points = shape["points"].as_array().unwrap();
            points.iter().flat_map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()]).collect()
        })
        .collect();
    let drawn = Mask::from_polygons(other.height, other.width, &other_polygons).unwrap();
    let overlap = iou(&drawn, &other_mask);
    assert!(overlap > 0.85, "the other image's polygons vs its gRPC mask IoU {overlap}");
    assert_ne!(other.key, photo.key);

    // Errors in the reference server's shape.
    let error = |body: &Value, code: &str, words: &str| {
        assert_eq!(body["success"], false, "{body}");
        assert_eq!(body["error"]["code"], code, "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(words), "{message:?} should say {words:?}");
    };
    let (_, body) = post(&url("/v1/predict"), &auth, &json!({"model": "yolo", "image": image}));
    error(&body, "MODEL_NOT_FOUND", "yolo");
    let (_, body) = post(&url("/v1/predict"), &auth, &json!({"model": "osprey", "image": "@@@"}));
    error(&body, "INVALID_IMAGE", "base64");
    let garbage = base64::engine::general_purpose::STANDARD.encode(b"not an image");
    let (_, body) = post(&url("/v1/predict"), &auth, &json!({"model": "osprey", "image": garbage}));
    error(&body, "INVALID_IMAGE", "unrecognised image format");
    let (_, body) = post(
        &url("/v1/predict"),
        &auth,
        &json!({"model": "osprey", "image": image, "params": {"marks": [{"type": "point", "data": [1]}]}}),
    );
    error(&body, "INVALID_REQUEST", "marks[0]");
    let (_, body) = post(
        &url("/v1/predict"),
        &auth,
        &json!({"model": "osprey", "image": image, "params": {"marks": [{"type": "point", "data": [500, 5], "label": 1}]}}),
    );
    error(&body, "INVALID_REQUEST", "outside");
    let unknown = json!({"model": "osprey", "params": {"marks": marks, "image_id": "no-such-image"}});
    let (_, body) = post(&url("/v1/predict"), &auth, &unknown);
    error(&body, "INVALID_IMAGE", "params.image_id");
    let (_, body) = post(&url("/v1/predict"), &auth, &json!({"model": "osprey", "params": {"marks": marks}}));
    error(&body, "INVALID_REQUEST", "image is required");
    let (status, body) = call("POST", &url("/v1/predict"), &auth, Some("[1, 2"));
    assert_eq!(status, 422);
    error(&body, "INVALID_REQUEST", "not valid JSON");

    // CVAT's functions (deploy/cvat/): their nuclio handler, run with Python against this gateway.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = std::process::Command::new(root.join(".venv-ci/bin/python"))
        .arg(root.join("tools/cvat_function_check.py"))
        .args(["--gateway", &url(""), "--key", KEY])
        .arg("--image")
        .arg(root.join("tests/fixtures/vision/photo.png"))
        .args(["--point", "60,50", "--negative", "140,20", "--box", "120,90,20,10"])
        .args(["--grpc", cluster.gateway.url().trim_start_matches("http://"), "--polygon", POLYGON])
        .arg("--stubs")
        .arg(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("osprey-stubs"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let cvat: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(cvat["identical_handlers"], true, "both functions ship the same main.py");
    let interactor = &cvat["interactor"];
    assert_eq!(interactor["status"], 200, "{interactor}");
    assert_eq!(interactor["body"]["description"], expected_text.as_str());
    let ring: Vec<f64> = interactor["body"]["points"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| [p[0].as_f64().unwrap(), p[1].as_f64().unwrap()])
        .collect();
    let drawn = Mask::from_polygons(photo.height, photo.width, &[ring]).unwrap();
    let largest_part = iou(&drawn, &expected_mask);
    assert!(largest_part > 0.5, "CVAT interactor polygon vs gRPC mask IoU {largest_part}");
    assert_eq!(cvat["interactor_as_bytes"]["body"], interactor["body"]);
    let detections = cvat["detector"]["body"].as_array().unwrap();
    assert_eq!(cvat["detector"]["status"], 200, "{}", cvat["detector"]);
    assert!(!detections.is_empty());
    for detection in detections {
        assert_eq!(detection["type"], "polygon");
        assert_eq!(detection["label"], "object");
        assert!(detection["points"].as_array().unwrap().len() >= 6, "{detection}");
        let names: Vec<&str> =
            detection["attributes"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["description", "category"]);
    }
    // The cvat-sdk auto-annotation function: polygons of label 0 with both text attributes.
    let auto = &cvat["auto_annotation"];
    assert_eq!(auto["label"], "object");
    assert_eq!(auto["attributes"], json!(["description", "category"]));
    let shapes = auto["shapes"].as_array().unwrap();
    assert!(!shapes.is_empty(), "{auto}");
    for shape in shapes {
        assert_eq!(
            (shape["type"].as_str(), shape["label_id"].as_u64()),
            (Some("polygon"), Some(0)),
            "{shape}"
        );
        assert!(shape["points"].as_array().unwrap().len() >= 6, "{shape}");
        let spec_ids: Vec<u64> =
            shape["attributes"].as_array().unwrap().iter().map(|a| a["spec_id"].as_u64().unwrap()).collect();
        assert_eq!(spec_ids, [0, 1], "{shape}");
    }
    // Describing the shapes already in a task (deploy/cvat/osprey_describe_masks.py): the polygon
    // and the mask shape whose description is empty get the gRPC description of the same region;
    // a shape described by hand, one whose label has no description attribute and a rectangle
    // are left alone.
    let polygon: Vec<f64> = POLYGON.split(',').map(|v| v.parse().unwrap()).collect();
    // The script's mask shape (tools/cvat_function_check.py): in the box of columns 40-109 and
    // rows 30-69, the pixels with x - 40 < 2 * (y - 30) + 10.
    let pixels: Vec<u8> = (0..photo.height * photo.width)
        .map(|i| {
            let (x, y) = ((i % photo.width) as i64, (i / photo.width) as i64);
            u8::from((40..110).contains(&x) && (30..70).contains(&y) && x - 40 < 2 * (y - 30) + 10)
        })
        .collect();
    let box_mask = Mask::from_row_major(photo.height, photo.width, &pixels).unwrap();
    let masks = [Mask::from_polygons(photo.height, photo.width, &[polygon]).unwrap(), box_mask];
    let mut grpc = client(&cluster.gateway, Some(KEY)).await.unwrap();
    let request = v1::DescribeRequest {
        parameters: None,
        ..osprey_e2e::describe_request(&photo, osprey_e2e::mask_regions(&masks), 1024)
    };
    let texts: Vec<String> =
        osprey_e2e::describe(&mut grpc, request).await.unwrap().into_iter().map(|r| r.text).collect();
    let described = &cvat["describe_masks"];
    assert_eq!(described["written"], json!({"11": texts[0], "12": texts[1]}), "{described}");
    let updates = described["updates"].as_array().unwrap();
    assert_eq!(updates.len(), 1, "one update for the task: {described}");
    let shapes = updates[0]["shapes"].as_array().unwrap();
    let ids: Vec<u64> = shapes.iter().map(|s| s["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, [11, 12], "{described}");
    for (shape, text) in shapes.iter().zip(&texts) {
        assert_eq!(shape["attributes"], json!([{"spec_id": 5, "value": text}]), "{shape}");
    }
    assert_eq!(shapes[1]["type"], "mask", "the mask stays a mask: {}", shapes[1]);

    for (case, status, words) in [
        ("no_points", 400, "positive point or a box"),
        ("bad_image", 400, "INVALID_IMAGE"),
        ("wrong_key", 401, "UNAUTHORIZED"),
        ("not_json", 400, "not JSON"),
    ] {
        assert_eq!(cvat[case]["status"], status, "{case}: {}", cvat[case]);
        let message = cvat[case]["body"]["error"].as_str().unwrap();
        assert!(message.contains(words), "{case}: {message:?} should say {words:?}");
    }
}
