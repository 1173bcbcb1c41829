//! `osprey-annotate`: sends a folder of images (regions from SAM's everything mode) or a COCO
//! JSON file (regions from its annotations' masks, or everything mode) through a gateway's
//! `Annotate` stream and writes COCO-style JSON with the answers.
//!
//! Resumable: every finished image is appended (and synced) as one line to a journal next to the
//! output, `OUT.journal.jsonl`, before it counts as done. A rerun with the same options skips the
//! images in the journal and the output is merged from it at the end, so an interruption loses
//! nothing and duplicates nothing.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use osprey_client::coco::Segmentation;
use osprey_client::journal::Journal;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_proto::v1::{self, annotate_response::Event};
use serde_json::{Value, json};
use tokio_stream::wrappers::ReceiverStream;

/// The command line.
#[derive(Parser, Debug, Clone)]
#[command(version, about = "Annotate images or a COCO file through a running gateway (resumable)")]
struct AnnotateArgs {
    /// The gateway, e.g. `http://localhost:50051` (`https://` needs `--ca-cert`).
    #[arg(long, env = "OSPREY_ENDPOINT")]
    endpoint: String,
    /// A folder of images (PNG, JPEG, WebP) to annotate; needs `--everything`.
    #[arg(long, required_unless_present = "coco", conflicts_with = "coco")]
    images: Option<PathBuf>,
    /// A COCO JSON file: its images and, unless `--everything`, its annotations' masks
    /// (polygons or RLE) as regions.
    #[arg(long)]
    coco: Option<PathBuf>,
    /// Folder the COCO file's `file_name`s are relative to (default: the file's folder).
    #[arg(long, requires = "coco")]
    image_root: Option<PathBuf>,
    /// Describe every object SAM's automatic mask generation finds.
    #[arg(long)]
    everything: bool,
    /// Everything mode: points sampled along each side (the SAM worker's default when unset).
    #[arg(long, requires = "everything")]
    points_per_side: Option<u32>,
    /// Everything mode: keep masks whose predicted IoU is at least this.
    #[arg(long, requires = "everything")]
    pred_iou_thresh: Option<f32>,
    /// Everything mode: keep masks whose stability score is at least this.
    #[arg(long, requires = "everything")]
    stability_score_thresh: Option<f32>,
    /// Everything mode: keep at most this many masks per image.
    #[arg(long, requires = "everything")]
    max_masks: Option<u32>,
    /// What to say about each region.
    #[arg(long, value_parser = parse_task, default_value = "short")]
    task: v1::DescribeTask,
    /// Longest answer, in tokens (the LLM worker's default when unset).
    #[arg(long)]
    max_new_tokens: Option<u32>,
    /// Sent as `authorization: Bearer KEY`.
    #[arg(long, env = "OSPREY_API_KEY")]
    api_key: Option<String>,
    /// PEM certificate of the CA that signed the gateway's TLS certificate.
    #[arg(long)]
    ca_cert: Option<PathBuf>,
    /// The COCO-style JSON to write; `OUT.journal.jsonl` next to it records finished images.
    #[arg(long)]
    out: PathBuf,
}

/// `--task short|detailed|category`: the public API's task, named as its values are.
fn parse_task(name: &str) -> Result<v1::DescribeTask, String> {
    v1::DescribeTask::from_str_name(&format!("DESCRIBE_TASK_{}", name.to_uppercase()))
        .ok_or_else(|| format!("unknown task {name:?}: short, detailed or category"))
}

/// One image to annotate.
#[derive(Clone)]
struct Item {
    id: String,
    path: PathBuf,
    /// Its COCO `images` entry (width and height filled in when it is read, for folders).
    image: Value,
    /// Regions from the COCO file, with the annotations they came from.
    regions: Vec<(v1::Region, Value)>,
}

/// The journal of an output path: `OUT.journal.jsonl`.
fn journal_path(out: &Path) -> PathBuf {
    let mut name = out.as_os_str().to_owned();
    name.push(".journal.jsonl");
    PathBuf::from(name)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = AnnotateArgs::parse();
    if args.images.is_some() && !args.everything {
        bail!("--images needs --everything (a folder has no masks; use --coco for given masks)");
    }
    let (items, coco) = match (&args.images, &args.coco) {
        (Some(dir), _) => (folder_items(dir)?, None),
        (None, Some(file)) => {
            let bytes = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let coco: Value =
                serde_json::from_slice(&bytes).with_context(|| format!("{} is not JSON", file.display()))?;
            let root = args
                .image_root
                .clone()
                .unwrap_or_else(|| file.parent().map(Path::to_path_buf).unwrap_or_default());
            (coco_items(&coco, &root, args.everything)?, Some(coco))
        }
        (None, None) => bail!("give --images DIR or --coco FILE"),
    };
    let header = json!({
        "osprey_annotate_journal": 1,
        "input": args.images.as_ref().or(args.coco.as_ref()).map(|p| p.display().to_string()),
        "everything": args.everything.then(|| json!({
            "points_per_side": args.points_per_side,
            "pred_iou_thresh": args.pred_iou_thresh,
            "stability_score_thresh": args.stability_score_thresh,
            "max_masks": args.max_masks,
        })),
        "task": format!("{:?}", args.task).to_lowercase(),
        "max_new_tokens": args.max_new_tokens,
    });
    let journal_path = journal_path(&args.out);
    let (mut journal, records) = Journal::open(&journal_path, Some(&header))?;
    let mut done = by_item(records);
    let pending: Vec<Item> = items.iter().filter(|i| !done.contains_key(&i.id)).cloned().collect();
    eprintln!(
        "annotate: {} images, {} already done (journal {}), {} to go",
        items.len(),
        items.len() - pending.len(),
        journal_path.display(),
        pending.len()
    );
    let mut failed = 0;
    if !pending.is_empty() {
        failed = run(&args, pending, &mut journal, items.len() - done.len()).await?;
        done = by_item(Journal::read(&journal_path, Some(&header))?);
    }
    let output = merge(coco.as_ref(), &items, &done, args.everything);
    let mut temporary = args.out.as_os_str().to_owned();
    temporary.push(".partial");
    std::fs::write(&temporary, serde_json::to_vec_pretty(&output)?)
        .with_context(|| format!("writing {}", args.out.display()))?;
    std::fs::rename(&temporary, &args.out)?;
    let missing = items.iter().filter(|i| !done.contains_key(&i.id)).count();
    eprintln!("annotate: wrote {} ({} images annotated)", args.out.display(), items.len() - missing);
    if missing > 0 {
        bail!("{missing} images are not annotated ({failed} failed this run); run again to retry them");
    }
    Ok(())
}

/// Images of a folder, by file name; ids 1, 2, ... in that order.
fn folder_items(dir: &Path) -> anyhow::Result<Vec<Item>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_type().map(|t| t.is_file()).unwrap_or(false))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            let lower = name.to_lowercase();
            [".png", ".jpg", ".jpeg", ".webp"].iter().any(|ext| lower.ends_with(ext))
        })
        .collect();
    names.sort();
    Ok(names
        .into_iter()
        .enumerate()
        .map(|(i, name)| Item {
            id: name.clone(),
            path: dir.join(&name),
            image: json!({"id": i + 1, "file_name": name}),
            regions: vec![],
        })
        .collect())
}

/// Images of a COCO file with the masks of their annotations as regions (images without
/// annotations are left out unless in everything mode).
fn coco_items(coco: &Value, root: &Path, everything: bool) -> anyhow::Result<Vec<Item>> {
    let images = coco["images"].as_array().context("the COCO file has no `images` list")?;
    let mut annotations: HashMap<String, Vec<&Value>> = HashMap::new();
    if !everything {
        for (k, annotation) in coco["annotations"].as_array().into_iter().flatten().enumerate() {
            let image_id =
                annotation.get("image_id").with_context(|| format!("annotations[{k}]: no image_id"))?;
            annotations.entry(image_id.to_string()).or_default().push(annotation);
        }
    }
    let mut items = Vec::with_capacity(images.len());
    for (k, image) in images.iter().enumerate() {
        let id = image.get("id").with_context(|| format!("images[{k}]: no id"))?.to_string();
        let name = image["file_name"].as_str().with_context(|| format!("images[{k}]: no file_name"))?;
        let side = |field: &str| {
            image[field].as_u64().map(|v| v as u32).with_context(|| format!("images[{k}]: no {field}"))
        };
        let (height, width) = (side("height")?, side("width")?);
        let mut regions = Vec::new();
        for annotation in annotations.remove(&id).unwrap_or_default() {
            let label = annotation.get("id").map(Value::to_string).unwrap_or_default();
            let mask = Segmentation::parse(&annotation["segmentation"])
                .with_context(|| format!("annotation {label} of image {id}"))?
                .to_proto(height, width);
            let region = v1::Region { source: Some(v1::region::Source::Mask(mask)), label };
            regions.push((region, annotation.clone()));
        }
        if regions.is_empty() && !everything {
            continue; // nothing to ask about this image
        }
        items.push(Item { id, path: root.join(name), image: image.clone(), regions });
    }
    Ok(items)
}

/// Finished images by item id, from the journal's records.
fn by_item(records: Vec<Value>) -> BTreeMap<String, Value> {
    records.into_iter().filter_map(|record| Some((record["item"].as_str()?.to_string(), record))).collect()
}

/// An image sent and not yet done: its COCO entry and the answers so far.
struct InFlight {
    image: Value,
    results: Vec<v1::RegionResult>,
}

type InFlightMap = Arc<Mutex<HashMap<String, InFlight>>>;

fn lock(map: &InFlightMap) -> std::sync::MutexGuard<'_, HashMap<String, InFlight>> {
    map.lock().expect("in-flight map poisoned. This is a bug.")
}

/// Streams `pending` through the gateway, journaling each image when it is done; returns how
/// many failed. `remaining` counts the images not done before this run, for the progress line.
async fn run(
    args: &AnnotateArgs,
    pending: Vec<Item>,
    journal: &mut Journal,
    remaining: usize,
) -> anyhow::Result<usize> {
    let options = osprey_client::ConnectOptions {
        endpoint: args.endpoint.clone(),
        api_key: args.api_key.clone(),
        ca_cert: args.ca_cert.clone(),
        ..Default::default()
    };
    let mut client = osprey_client::connect(&options).await?;

    let in_flight = InFlightMap::default();
    // Images are read as they are sent, a couple ahead of the gateway.
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let producer = {
        let in_flight = in_flight.clone();
        let task = args.task as i32;
        let everything = args.everything.then(|| v1::EverythingParams {
            points_per_side: args.points_per_side,
            pred_iou_thresh: args.pred_iou_thresh,
            stability_score_thresh: args.stability_score_thresh,
            max_masks: args.max_masks,
            ..Default::default()
        });
        let parameters = args
            .max_new_tokens
            .map(|n| v1::GenerationParameters { max_new_tokens: Some(n), ..Default::default() });
        tokio::spawn(async move {
            for item in pending {
                // Blocking reads and decodes are fine here: this is the only work on this thread.
                let bytes =
                    std::fs::read(&item.path).with_context(|| format!("reading {}", item.path.display()))?;
                let mut image = item.image;
                if image.get("width").is_none() {
                    let decoded = decode_image(&bytes, &ImageLimits::default())
                        .with_context(|| format!("decoding {}", item.path.display()))?;
                    image["width"] = decoded.width().into();
                    image["height"] = decoded.height().into();
                }
                let regions = item.regions.into_iter().map(|(region, _)| region).collect();
                lock(&in_flight).insert(item.id.clone(), InFlight { image, results: vec![] });
                let request = v1::AnnotateRequest {
                    item_id: item.id,
                    image: Some(v1::Image { source: Some(v1::image::Source::Encoded(bytes)) }),
                    regions,
                    everything,
                    task,
                    parameters,
                };
                if tx.send(request).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        })
    };

    let mut events = client.annotate(ReceiverStream::new(rx)).await?.into_inner();
    let start = Instant::now();
    let (mut done, mut failed, mut regions) = (0usize, 0usize, 0usize);
    let progress = |done: usize, failed: usize, regions: usize| {
        let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-3);
        eprint!(
            "\rannotate: {done}/{remaining} images, {regions} regions, {failed} failed, {rate:.1} images/s   "
        );
    };
    while let Some(response) = events.message().await? {
        let id = response.item_id;
        match response.event {
            Some(Event::Region(result)) => {
                regions += 1;
                if let Some(item) = lock(&in_flight).get_mut(&id) {
                    item.results.push(result);
                }
            }
            Some(Event::Done(_)) => {
                let Some(mut item) = lock(&in_flight).remove(&id) else { continue };
                item.results.sort_by_key(|r| r.region_index);
                let regions: Vec<Value> = item.results.iter().map(region_json).collect();
                journal.append(&json!({"item": id, "image": item.image, "regions": regions}))?;
                done += 1;
            }
            Some(Event::Error(error)) => {
                lock(&in_flight).remove(&id);
                failed += 1;
                eprintln!("\rannotate: {id}: {} (gRPC code {})", error.message, error.code);
            }
            None => {}
        }
        progress(done, failed, regions);
    }
    eprintln!();
    producer.await.context("the image reader stopped")??;
    let unanswered = lock(&in_flight).len();
    if unanswered > 0 {
        bail!("the gateway ended the stream with {unanswered} images unanswered; run again to continue");
    }
    Ok(failed)
}

/// One region's answer as the journal keeps it.
fn region_json(result: &v1::RegionResult) -> Value {
    let mut region = json!({
        "index": result.region_index,
        "label": result.label,
        "answer": result.text,
        "raw_answer": result.raw_text,
        "generated_tokens": result.generated_tokens,
        "area": result.area,
        "bbox": result.bbox,
    });
    if let Some(mask) = &result.mask {
        let counts = match &mask.counts {
            Some(v1::rle_mask::Counts::Compressed(text)) => json!(text),
            Some(v1::rle_mask::Counts::Uncompressed(runs)) => json!(runs.counts),
            None => Value::Null,
        };
        region["segmentation"] = json!({"size": [mask.height, mask.width], "counts": counts});
    }
    region
}

/// The COCO-style output: the input file with answers on its annotations, or (everything mode,
/// folders) new annotations from SAM's masks; images in input order, annotation ids in order.
fn merge(coco: Option<&Value>, items: &[Item], done: &BTreeMap<String, Value>, everything: bool) -> Value {
    let mut output = coco.cloned().unwrap_or_else(|| json!({"categories": []}));
    let mut images = Vec::new();
    let mut annotations = Vec::new();
    for item in items {
        let Some(record) = done.get(&item.id) else { continue };
        images.push(record["image"].clone());
        for answer in record["regions"].as_array().into_iter().flatten() {
            if everything {
                annotations.push(json!({
                    "id": annotations.len() + 1,
                    "image_id": record["image"]["id"],
                    "segmentation": answer["segmentation"],
                    "area": answer["area"],
                    "bbox": answer["bbox"],
                    "iscrowd": 0,
                    "answer": answer["answer"],
                    "raw_answer": answer["raw_answer"],
                    "generated_tokens": answer["generated_tokens"],
                }));
            } else if let Some((_, annotation)) =
                answer["index"].as_u64().and_then(|i| item.regions.get(i as usize))
            {
                let mut annotation = annotation.clone();
                for field in ["answer", "raw_answer", "generated_tokens"] {
                    annotation[field] = answer[field].clone();
                }
                annotations.push(annotation);
            }
        }
    }
    output["images"] = Value::Array(images);
    output["annotations"] = Value::Array(annotations);
    output
}

#[cfg(test)]
mod tests {
    /// Every flag read from the environment reads `OSPREY_<FLAG>` (or OpenTelemetry's names).
    #[test]
    fn flags_read_their_osprey_variables() {
        osprey_test_support::assert_env_names(&<super::AnnotateArgs as clap::CommandFactory>::command());
    }
}
