//! The evaluation data formats, as the reference scripts read them.

use std::path::Path;

use anyhow::Context;
pub use osprey_client::coco::Segmentation;
use serde::Deserialize;

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    serde_json::from_slice(&bytes).with_context(|| format!("{}: not the expected format", path.display()))
}

#[derive(Debug, Clone, Deserialize)]
pub struct Annotation {
    pub segmentation: Segmentation,
}

/// One image of `lvis_val_1k_category.json` / `paco_val_1k_category.json`: object `i` has mask
/// `annotations[i]` and category name `categories[i]`.
#[derive(Debug, Clone, Deserialize)]
pub struct CategoryImage {
    pub file_name: String,
    pub height: u32,
    pub width: u32,
    pub categories: Vec<String>,
    pub annotations: Vec<Annotation>,
}

pub fn read_category(path: &Path) -> anyhow::Result<Vec<CategoryImage>> {
    let images: Vec<CategoryImage> = read_json(path)?;
    for (i, image) in images.iter().enumerate() {
        anyhow::ensure!(
            image.categories.len() == image.annotations.len(),
            "{}: image {i} has {} categories but {} annotations",
            path.display(),
            image.categories.len(),
            image.annotations.len()
        );
    }
    Ok(images)
}

/// One line of `coco_pope_{random,popular,adversarial}.json` (JSON lines).
#[derive(Debug, Clone, Deserialize)]
pub struct PopeQuestion {
    pub question_id: serde_json::Value,
    pub image: String,
    pub text: String,
    pub label: String,
}

pub fn read_pope(path: &Path) -> anyhow::Result<Vec<PopeQuestion>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).with_context(|| format!("{}: line {}", path.display(), i + 1)))
        .collect()
}

/// `finetune_refcocog_val_with_mask.json`: COCO images, each with the referring `caption`, and
/// their annotations.
#[derive(Debug, Clone, Deserialize)]
pub struct RefCocoG {
    pub images: Vec<RefImage>,
    pub annotations: Vec<RefAnnotation>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefImage {
    pub id: serde_json::Value,
    pub file_name: String,
    pub height: u32,
    pub width: u32,
    pub caption: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RefAnnotation {
    pub id: serde_json::Value,
    pub image_id: serde_json::Value,
    pub segmentation: Segmentation,
}

pub fn read_refcocog(path: &Path) -> anyhow::Result<RefCocoG> {
    read_json(path)
}

/// COCO panoptic format (`images`, `annotations` with `segments_info`, `categories`), as
/// detectron2's Cityscapes and ADE20K panoptic registrations use it.
#[derive(Debug, Clone, Deserialize)]
pub struct PanopticDataset {
    pub images: Vec<PanopticImage>,
    pub annotations: Vec<PanopticAnnotation>,
    pub categories: Vec<PanopticCategory>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PanopticImage {
    pub id: serde_json::Value,
    pub file_name: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PanopticAnnotation {
    pub image_id: serde_json::Value,
    /// The panoptic PNG, relative to the masks directory.
    pub file_name: String,
    pub segments_info: Vec<PanopticSegment>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PanopticSegment {
    pub id: u32,
    pub category_id: u32,
    #[serde(default)]
    pub iscrowd: u8,
    pub area: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PanopticCategory {
    pub id: u32,
    pub name: String,
    pub isthing: u8,
}

pub fn read_panoptic(path: &Path) -> anyhow::Result<PanopticDataset> {
    read_json(path)
}

/// Class synonyms, one list per category in `categories` order: from a file in the format of
/// Osprey's `cityscapes_with_prompt_eng.txt` / `ade20k_150_with_prompt_eng.txt` (`index:name,name`,
/// one line per class), or else the category names split at commas (`split_labels`).
pub fn class_synonyms(
    categories: &[PanopticCategory],
    file: Option<&Path>,
) -> anyhow::Result<Vec<Vec<String>>> {
    let split = |names: &str| names.replace(", ", ",").split(',').map(str::to_string).collect::<Vec<_>>();
    let Some(file) = file else {
        return Ok(categories.iter().map(|c| split(&c.name)).collect());
    };
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let lines: Vec<Vec<String>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| split(l.split_once(':').map_or(l, |(_, names)| names)))
        .collect();
    anyhow::ensure!(
        lines.len() == categories.len(),
        "{}: {} classes but the dataset has {} categories",
        file.display(),
        lines.len(),
        categories.len()
    );
    Ok(lines)
}

/// A JSON id (number or string) as text.
pub fn id_text(id: &serde_json::Value) -> String {
    match id {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}
