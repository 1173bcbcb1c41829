//! Running each protocol through the gateway and scoring the recorded answers.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use anyhow::Context;
use osprey_common::image::{ImageLimits, decode_image};
use osprey_common::mask::{Mask, rle_to_proto};
use osprey_proto::v1::{self, DescribeTask, GenerationParameters};
use serde_json::{Value, json};

use crate::answers::{Answer, AnswerLog};
use crate::cider;
use crate::coco_ap::{self, GroundTruth, PixelSet};
use crate::data::{self, id_text};
use crate::embed::{SentenceEmbedder, cosine};
use crate::panoptic::{self, Category, ClassifiedSegment, Confusion, Panoptic, SegmentInfo, SegmentMap};
use crate::pope;
use crate::text;

/// The protocols of the paper's tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// Referring object classification on LVIS (`lvis_val_1k_category.json`): SS and S-IoU.
    Lvis,
    /// Referring object classification on PACO (`paco_val_1k_category.json`): SS and S-IoU.
    Paco,
    /// POPE (random / popular / adversarial question files): accuracy, precision, recall, F1, yes-ratio.
    Pope,
    /// Open-vocabulary panoptic segmentation with ground-truth masks on Cityscapes: PQ, mIoU, AP.
    Cityscapes,
    /// Open-vocabulary panoptic segmentation with ground-truth masks on ADE20K-150: PQ, mIoU, AP.
    Ade20k,
    /// Region captioning on RefCOCOg: captions and references in pycocoevalcap's format.
    Refcocog,
}

/// The user messages the reference scripts send, verbatim (`AskRequest.verbatim`): the scripts
/// write `"<image>.\nThis provides..."` and LLaVA's `preprocess_multimodal` moves `<image>` to the
/// front, leaving `"<image>\n.\n"` (docs/MODEL.md#evaluation-prompts).
pub const OPENSEG_QUESTION: &str =
    "<image>\n.\nThis provides an overview of the picture.\nWhat is in <mask><pos>? Using a short phrase.";
pub const REFCOCOG_QUESTION: &str = "<image>\n.\nThis provides an overview of the picture.\nPlease give me a short description of <mask><pos>.";

pub struct RunOptions {
    pub endpoint: String,
    pub api_key: Option<String>,
    pub data: PathBuf,
    pub images: PathBuf,
    /// Panoptic PNGs (segmentation protocols).
    pub masks: Option<PathBuf>,
    /// Class synonyms file (segmentation protocols).
    pub class_names: Option<PathBuf>,
    pub out: PathBuf,
    pub embedder: PathBuf,
    pub parameters: GenerationParameters,
    /// Questions in flight at once (`Ask` protocols).
    pub concurrency: usize,
    /// Most regions per `Describe` call (the gateway caps regions per request).
    pub regions_per_call: usize,
}

/// The gateway client (API key, retries on UNAVAILABLE) and the registered-image keys.
struct Gateway {
    client: osprey_client::Client,
    retry: osprey_client::Retry,
    keys: HashMap<PathBuf, String>,
}

impl Gateway {
    async fn connect(endpoint: &str, api_key: Option<&str>) -> anyhow::Result<Self> {
        let options = osprey_client::ConnectOptions {
            endpoint: endpoint.to_string(),
            api_key: api_key.map(String::from),
            ..Default::default()
        };
        let client = osprey_client::connect(&options).await?;
        Ok(Self { client, retry: options.retry, keys: HashMap::new() })
    }

    /// Registers an image once per run and returns it by key.
    async fn image(&mut self, path: &Path) -> anyhow::Result<v1::Image> {
        if !self.keys.contains_key(path) {
            let encoded = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
            let request = v1::RegisterImageRequest { encoded, warm_features: false };
            let key = self
                .retry
                .run(|| {
                    let (mut client, request) = (self.client.clone(), request.clone());
                    async move { client.register_image(request).await }
                })
                .await
                .with_context(|| format!("RegisterImage {}", path.display()))?
                .into_inner()
                .key;
            self.keys.insert(path.to_path_buf(), key);
        }
        Ok(v1::Image { source: Some(v1::image::Source::Key(self.keys[path].clone())) })
    }

    /// One `Describe` call; the results in region order.
    async fn describe(
        &mut self,
        image: v1::Image,
        masks: Vec<v1::Mask>,
        task: DescribeTask,
        parameters: &GenerationParameters,
    ) -> anyhow::Result<Vec<v1::RegionResult>> {
        let n = masks.len();
        let regions = masks
            .into_iter()
            .map(|m| v1::Region { source: Some(v1::region::Source::Mask(m)), label: String::new() })
            .collect();
        let request = v1::DescribeRequest {
            image: Some(image),
            regions,
            everything: None,
            task: task as i32,
            parameters: Some(*parameters),
        };
        // A stream is retried only until it starts: an answer cut short is an error.
        let describe = || {
            let (mut client, request) = (self.client.clone(), request.clone());
            async move { client.describe(request).await }
        };
        let mut stream = self.retry.run(describe).await.context("Describe")?.into_inner();
        let mut results = Vec::with_capacity(n);
        while let Some(result) = stream.message().await.context("Describe stream")? {
            results.push(result);
        }
        results.sort_by_key(|r| r.region_index);
        anyhow::ensure!(results.len() == n, "Describe answered {} of {n} regions", results.len());
        Ok(results)
    }

    /// Runs `ask` jobs with at most `limit` in flight, recording each answer as it arrives.
    fn asker(
        &self,
        parameters: &GenerationParameters,
        limit: usize,
        protocol: Protocol,
        total: usize,
    ) -> Asker {
        Asker {
            protocol,
            total,
            client: self.client.clone(),
            retry: self.retry,
            parameters: *parameters,
            limit: limit.max(1),
            in_flight: tokio::task::JoinSet::new(),
        }
    }
}

/// One verbatim question for `Ask` about the regions given as masks (one `<mask><pos>` each).
struct AskJob {
    id: String,
    image: v1::Image,
    masks: Vec<v1::Mask>,
    question: String,
}

/// `Ask` calls with bounded concurrency.
struct Asker {
    protocol: Protocol,
    /// Items of the protocol, for the progress line.
    total: usize,
    client: osprey_client::Client,
    retry: osprey_client::Retry,
    parameters: GenerationParameters,
    limit: usize,
    in_flight: tokio::task::JoinSet<anyhow::Result<(AskJob, v1::AskResponse)>>,
}

impl Asker {
    /// Starts a job, first waiting (and recording answers) while `limit` are in flight.
    async fn submit(&mut self, job: AskJob, log: &mut AnswerLog) -> anyhow::Result<()> {
        while self.in_flight.len() >= self.limit {
            self.collect_one(log).await?;
        }
        let (client, retry) = (self.client.clone(), self.retry);
        let request = v1::AskRequest {
            image: Some(job.image.clone()),
            regions: job
                .masks
                .iter()
                .map(|m| v1::Region {
                    source: Some(v1::region::Source::Mask(m.clone())),
                    label: String::new(),
                })
                .collect(),
            question: job.question.clone(),
            parameters: Some(self.parameters),
            verbatim: true,
        };
        self.in_flight.spawn(async move {
            let ask = || {
                let (mut client, request) = (client.clone(), request.clone());
                async move { client.ask(request).await }
            };
            let response = retry.run(ask).await.with_context(|| format!("Ask for item {}", job.id))?;
            Ok((job, response.into_inner()))
        });
        Ok(())
    }

    async fn collect_one(&mut self, log: &mut AnswerLog) -> anyhow::Result<()> {
        if let Some(done) = self.in_flight.join_next().await {
            let (job, response) = done??;
            log.record(Answer {
                id: job.id,
                question: job.question,
                raw: response.raw_text,
                text: response.text,
            })?;
            progress(self.protocol, log.len(), self.total);
        }
        Ok(())
    }

    /// Waits for every job still in flight.
    async fn finish(&mut self, log: &mut AnswerLog) -> anyhow::Result<()> {
        while !self.in_flight.is_empty() {
            self.collect_one(log).await?;
        }
        Ok(())
    }
}

fn progress(protocol: Protocol, done: usize, total: usize) {
    if done.is_multiple_of(50) || done == total {
        eprintln!("{protocol:?}: {done}/{total} answered");
    }
}

/// Runs the protocol: asks what the log does not hold yet, then scores every logged answer.
/// Returns the metrics as JSON.
pub async fn run(protocol: Protocol, options: &RunOptions) -> anyhow::Result<Value> {
    let mut log = AnswerLog::open(&options.out)?;
    match protocol {
        Protocol::Lvis | Protocol::Paco => run_category(protocol, options, &mut log).await,
        Protocol::Pope => run_pope(options, &mut log).await,
        Protocol::Cityscapes | Protocol::Ade20k => run_openseg(protocol, options, &mut log).await,
        Protocol::Refcocog => run_refcocog(options, &mut log).await,
    }
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() { 0.0 } else { values.iter().sum::<f64>() / values.len() as f64 }
}

/// Embeds each distinct text once.
struct EmbeddingCache<'a> {
    embedder: &'a SentenceEmbedder,
    cache: HashMap<String, Vec<f32>>,
}

impl<'a> EmbeddingCache<'a> {
    fn new(embedder: &'a SentenceEmbedder) -> Self {
        Self { embedder, cache: HashMap::new() }
    }

    fn get(&mut self, text: &str) -> anyhow::Result<&[f32]> {
        if !self.cache.contains_key(text) {
            let embedding = self.embedder.embed(text)?;
            self.cache.insert(text.to_string(), embedding);
        }
        Ok(&self.cache[text])
    }
}

async fn run_category(
    protocol: Protocol,
    options: &RunOptions,
    log: &mut AnswerLog,
) -> anyhow::Result<Value> {
    let images = data::read_category(&options.data)?;
    let total: usize = images.iter().map(|i| i.annotations.len()).sum();
    let id = |image: usize, object: usize| format!("{image}/{object}");
    let pending =
        images.iter().enumerate().any(|(i, im)| (0..im.annotations.len()).any(|o| !log.contains(&id(i, o))));
    if pending {
        let mut gateway = Gateway::connect(&options.endpoint, options.api_key.as_deref()).await?;
        for (i, image) in images.iter().enumerate() {
            let todo: Vec<usize> =
                (0..image.annotations.len()).filter(|&o| !log.contains(&id(i, o))).collect();
            if todo.is_empty() {
                continue;
            }
            let key = gateway.image(&options.images.join(&image.file_name)).await?;
            let masks = todo
                .iter()
                .map(|&o| image.annotations[o].segmentation.to_proto(image.height, image.width))
                .collect();
            let results = gateway.describe(key, masks, DescribeTask::Category, &options.parameters).await?;
            for (&o, result) in todo.iter().zip(results) {
                log.record(Answer {
                    id: id(i, o),
                    question: "DESCRIBE_TASK_CATEGORY".into(),
                    raw: result.raw_text,
                    text: result.text,
                })?;
            }
            progress(protocol, log.len(), total);
        }
    }

    let embedder = SentenceEmbedder::load(&options.embedder)?;
    let mut embeddings = EmbeddingCache::new(&embedder);
    let (mut ss, mut siou) = (Vec::new(), Vec::new());
    for (i, image) in images.iter().enumerate() {
        for (o, category) in image.categories.iter().enumerate() {
            let Some(answer) = log.get(&id(i, o)) else { continue };
            let prediction = text::category_prediction(&answer.raw);
            let truth = text::category_ground_truth(category);
            let p = embeddings.get(&prediction)?.to_vec();
            ss.push(cosine(&p, embeddings.get(&truth)?));
            siou.push(text::semantic_iou(&prediction, &truth));
        }
    }
    Ok(json!({
        "protocol": format!("{protocol:?}").to_lowercase(),
        "objects": total,
        "answered": ss.len(),
        "semantic_similarity": 100.0 * mean(&ss),
        "semantic_iou": 100.0 * mean(&siou),
    }))
}

async fn run_pope(options: &RunOptions, log: &mut AnswerLog) -> anyhow::Result<Value> {
    let questions = data::read_pope(&options.data)?;
    let ids: Vec<String> = questions.iter().map(|q| id_text(&q.question_id)).collect();
    if ids.iter().any(|id| !log.contains(id)) {
        let mut gateway = Gateway::connect(&options.endpoint, options.api_key.as_deref()).await?;
        let mut asker =
            gateway.asker(&options.parameters, options.concurrency, Protocol::Pope, questions.len());
        for (q, id) in questions.iter().zip(&ids) {
            if log.contains(id) {
                continue;
            }
            // The script falls back to the part after the last `_` (COCO_val2014_000….jpg → 000….jpg).
            let mut path = options.images.join(&q.image);
            if !path.exists() {
                path = options.images.join(q.image.rsplit('_').next().unwrap_or(&q.image));
            }
            let image = gateway.image(&path).await?;
            // The script's user message: `"<image>\n" + question`, no regions.
            let question = format!("<image>\n{}", q.text);
            let job = AskJob { id: id.clone(), image, masks: Vec::new(), question };
            asker.submit(job, log).await?;
        }
        asker.finish(log).await?;
    }
    let pairs: Vec<(bool, bool)> = questions
        .iter()
        .zip(&ids)
        .filter_map(|(q, id)| {
            log.get(id).map(|a| (pope::answer_is_yes(&a.raw), pope::label_is_yes(&q.label)))
        })
        .collect();
    let m = pope::pope_metrics(&pairs);
    Ok(json!({
        "protocol": "pope",
        "questions": questions.len(),
        "answered": pairs.len(),
        "tp": m.tp, "fp": m.fp, "tn": m.tn, "fn": m.fn_,
        "accuracy": 100.0 * m.accuracy,
        "precision": 100.0 * m.precision,
        "recall": 100.0 * m.recall,
        "f1": 100.0 * m.f1,
        "yes_ratio": 100.0 * m.yes_ratio,
    }))
}

async fn run_refcocog(options: &RunOptions, log: &mut AnswerLog) -> anyhow::Result<Value> {
    let dataset = data::read_refcocog(&options.data)?;
    let images: HashMap<String, &data::RefImage> =
        dataset.images.iter().map(|i| (id_text(&i.id), i)).collect();
    // The script's order: images, then each image's annotations.
    let mut items: Vec<(&data::RefImage, &data::RefAnnotation)> = Vec::new();
    for image in &dataset.images {
        let id = id_text(&image.id);
        items.extend(dataset.annotations.iter().filter(|a| id_text(&a.image_id) == id).map(|a| (image, a)));
    }
    for a in &dataset.annotations {
        anyhow::ensure!(
            images.contains_key(&id_text(&a.image_id)),
            "annotation {} has no image",
            id_text(&a.id)
        );
    }
    if items.iter().any(|(_, a)| !log.contains(&id_text(&a.id))) {
        let mut gateway = Gateway::connect(&options.endpoint, options.api_key.as_deref()).await?;
        let mut asker =
            gateway.asker(&options.parameters, options.concurrency, Protocol::Refcocog, items.len());
        for (image, ann) in &items {
            let id = id_text(&ann.id);
            if log.contains(&id) {
                continue;
            }
            // The script opens `file_name.split('_')[-1]`.
            let file = image.file_name.rsplit('_').next().unwrap_or(&image.file_name);
            let key = gateway.image(&options.images.join(file)).await?;
            let masks = vec![ann.segmentation.to_proto(image.height, image.width)];
            asker.submit(AskJob { id, image: key, masks, question: REFCOCOG_QUESTION.into() }, log).await?;
        }
        asker.finish(log).await?;
    }
    // The two files `refcocog_eval.py` writes, which pycocoevalcap's COCO / COCOEvalCap read.
    let mut captions = Vec::new();
    let mut references = json!({"images": [], "annotations": []});
    for (image, ann) in &items {
        let id = id_text(&ann.id);
        let Some(answer) = log.get(&id) else { continue };
        captions.push(json!({"image_id": id, "caption": text::refcocog_caption(&answer.raw)}));
        references["annotations"]
            .as_array_mut()
            .unwrap()
            .push(json!({"id": id, "image_id": id, "caption": image.caption}));
        references["images"].as_array_mut().unwrap().push(json!({"id": id}));
    }
    // CIDEr-D on simple tokens: close to, not the same as, pycocoevalcap's PTB-tokenised score.
    let hypotheses: Vec<Vec<String>> =
        captions.iter().map(|c| cider::simple_tokens(c["caption"].as_str().unwrap_or_default())).collect();
    let references_tokens: Vec<Vec<Vec<String>>> = references["annotations"]
        .as_array()
        .map(|a| {
            a.iter().map(|r| vec![cider::simple_tokens(r["caption"].as_str().unwrap_or_default())]).collect()
        })
        .unwrap_or_default();
    let (cider_d, _) = cider::cider_d(&references_tokens, &hypotheses);
    let captions_path = options.out.with_extension("captions.json");
    let references_path = options.out.with_extension("references.json");
    std::fs::write(&captions_path, serde_json::to_vec(&captions)?)?;
    std::fs::write(&references_path, serde_json::to_vec(&references)?)?;
    Ok(json!({
        "protocol": "refcocog",
        "regions": items.len(),
        "answered": captions.len(),
        "captions": captions_path.display().to_string(),
        "references": references_path.display().to_string(),
        "cider_d_approx": 100.0 * cider_d,
        "note": "cider_d_approx tokenises simply; METEOR and the reference CIDEr: clients/osprey-eval/reference/score_captions.py on these files",
    }))
}

/// A decoded panoptic PNG.
fn read_segment_map(path: &Path) -> anyhow::Result<SegmentMap> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let limits = ImageLimits { max_pixels: 1 << 28, ..ImageLimits::default() };
    let image = decode_image(&bytes, &limits).with_context(|| format!("{}", path.display()))?;
    Ok(SegmentMap::from_rgb(image.height(), image.width(), image.pixels()))
}

async fn run_openseg(protocol: Protocol, options: &RunOptions, log: &mut AnswerLog) -> anyhow::Result<Value> {
    let dataset = data::read_panoptic(&options.data)?;
    let masks_dir = options.masks.as_ref().context("--masks (the panoptic PNG directory) is required")?;
    let annotations: HashMap<String, &data::PanopticAnnotation> =
        dataset.annotations.iter().map(|a| (id_text(&a.image_id), a)).collect();
    let categories: Vec<Category> =
        dataset.categories.iter().map(|c| Category { id: c.id, isthing: c.isthing == 1 }).collect();
    let class_of: HashMap<u32, usize> =
        dataset.categories.iter().enumerate().map(|(i, c)| (c.id, i)).collect();
    let synonyms = data::class_synonyms(&dataset.categories, options.class_names.as_deref())?;
    let id = |image: &str, segment: u32| format!("{image}/{segment}");

    let mut maps = Vec::with_capacity(dataset.images.len());
    for image in &dataset.images {
        let image_id = id_text(&image.id);
        let ann =
            annotations.get(&image_id).with_context(|| format!("image {image_id} has no annotation"))?;
        maps.push(read_segment_map(&masks_dir.join(&ann.file_name))?);
    }
    let segment_ids: Vec<Vec<u32>> =
        maps.iter().map(|m| m.segment_ids().into_iter().take(panoptic::NUM_QUERIES).collect()).collect();
    let total: usize = segment_ids.iter().map(Vec::len).sum();
    let pending = dataset
        .images
        .iter()
        .zip(&segment_ids)
        .any(|(im, ids)| ids.iter().any(|&s| !log.contains(&id(&id_text(&im.id), s))));
    if pending {
        let mut gateway = Gateway::connect(&options.endpoint, options.api_key.as_deref()).await?;
        let mut asker = gateway.asker(&options.parameters, options.concurrency, protocol, total);
        for ((image, map), ids) in dataset.images.iter().zip(&maps).zip(&segment_ids) {
            let image_id = id_text(&image.id);
            let key = gateway.image(&options.images.join(&image.file_name)).await?;
            for &segment in ids {
                if log.contains(&id(&image_id, segment)) {
                    continue;
                }
                let values: Vec<u8> = map.ids.iter().map(|&i| (i == segment) as u8).collect();
                let mask = Mask::from_row_major(map.height, map.width, &values)?;
                let mask = v1::Mask { format: Some(v1::mask::Format::Rle(rle_to_proto(&mask.to_rle()))) };
                let job = AskJob {
                    id: id(&image_id, segment),
                    image: key.clone(),
                    masks: vec![mask],
                    question: OPENSEG_QUESTION.into(),
                };
                asker.submit(job, log).await?;
            }
        }
        asker.finish(log).await?;
    }

    let embedder = SentenceEmbedder::load(&options.embedder)?;
    let mut embeddings = EmbeddingCache::new(&embedder);
    let mut class_embeddings: Vec<Vec<Vec<f32>>> = Vec::with_capacity(synonyms.len());
    for names in &synonyms {
        let mut per_class = Vec::with_capacity(names.len());
        for name in names {
            per_class.push(embeddings.get(&panoptic::CLASS_TEMPLATE.replace("{}", name))?.to_vec());
        }
        class_embeddings.push(per_class);
    }

    let mut pq_stats = BTreeMap::new();
    let mut confusion = Confusion::new(categories.len());
    let (mut gts, mut detections, mut image_numbers) = (Vec::new(), Vec::new(), Vec::new());
    let (mut scored_images, mut answered) = (0, 0);
    for (n, ((image, map), ids)) in dataset.images.iter().zip(&maps).zip(&segment_ids).enumerate() {
        let image_id = id_text(&image.id);
        let ann = annotations[&image_id];
        let mut classified = Vec::with_capacity(ids.len());
        for &segment in ids {
            let Some(answer) = log.get(&id(&image_id, segment)) else { break };
            // This script keeps the whole stripped answer (no split at ':').
            let a = embeddings.get(&text::strip_answer(&answer.raw))?.to_vec();
            let cosines = class_embeddings
                .iter()
                .map(|names| names.iter().map(|e| cosine(&a, e)).fold(f64::NEG_INFINITY, f64::max))
                .collect();
            classified.push(ClassifiedSegment { segment_id: segment, cosines });
        }
        answered += classified.len();
        if classified.len() < ids.len() {
            continue; // an image counts only once all its segments are answered
        }
        scored_images += 1;
        let number = n as u64;
        image_numbers.push(number);
        let prediction = panoptic::open_vocab_inference(number, map, &classified, &categories);
        let gt_segments: Vec<SegmentInfo> = ann
            .segments_info
            .iter()
            .map(|s| SegmentInfo {
                id: s.id,
                category_id: s.category_id,
                iscrowd: s.iscrowd == 1,
                area: s.area,
            })
            .collect();
        let gt = Panoptic { map: map.clone(), segments: gt_segments };
        panoptic::pq_accumulate(&mut pq_stats, &gt, &prediction.panoptic, &categories)
            .with_context(|| format!("image {image_id}"))?;

        let info: HashMap<u32, &data::PanopticSegment> =
            ann.segments_info.iter().map(|s| (s.id, s)).collect();
        let semantic_gt: Vec<u32> = map
            .ids
            .iter()
            .map(|i| info.get(i).and_then(|s| class_of.get(&s.category_id)).map_or(255, |&c| c as u32))
            .collect();
        confusion.add(&prediction.semantic, &semantic_gt, 255)?;

        for s in &ann.segments_info {
            if class_of.get(&s.category_id).is_some_and(|&c| categories[c].isthing) {
                let values: Vec<u8> = map.ids.iter().map(|&i| (i == s.id) as u8).collect();
                let mask = PixelSet::from_values(&values);
                let area = s.area.unwrap_or(mask.area()) as f64;
                gts.push(GroundTruth {
                    image_id: number,
                    category_id: s.category_id,
                    mask,
                    area,
                    iscrowd: s.iscrowd == 1,
                });
            }
        }
        detections.extend(prediction.instances);
    }
    let pq = panoptic::pq_summary(&pq_stats, &categories);
    let semseg = confusion.summary();
    let ap = coco_ap::evaluate_segm(&image_numbers, &gts, &detections);
    let pct = |v: f64| if v < 0.0 { v } else { 100.0 * v };
    Ok(json!({
        "protocol": format!("{protocol:?}").to_lowercase(),
        "images": dataset.images.len(),
        "segments": total,
        "answered": answered,
        "scored_images": scored_images,
        "pq": pct(pq.all.pq), "sq": pct(pq.all.sq), "rq": pct(pq.all.rq),
        "pq_things": pct(pq.things.pq), "pq_stuff": pct(pq.stuff.pq),
        "miou": pct(semseg.miou), "fwiou": pct(semseg.fwiou), "macc": pct(semseg.macc), "pacc": pct(semseg.pacc),
        "ap": pct(ap.ap), "ap50": pct(ap.ap50), "ap75": pct(ap.ap75),
    }))
}
