//! The Osprey vision side's view of a checkpoint (docs/MODEL.md#checkpoints-and-weight-names).
//!
//! Reading weight files is the shared [`osprey_checkpoint`] crate (re-exported here);
//! [`OspreyVisionResolver`] is the mapping of the vision side: the trunk comes from the Osprey
//! checkpoint or, when absent there, from the Open-CLIP file named by `mm_vision_tower`, and the
//! layer scale may be stored as `gamma` or `weight`.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use osprey_checkpoint::{Checkpoint, LoadErrors, Resolve, WeightsError, var_builder};

/// Prefix of the ConvNeXt trunk inside an Osprey checkpoint.
pub const OSPREY_TRUNK_PREFIX: &str = "model.vision_tower.vision_tower.visual.trunk.";
/// Prefix of the same trunk inside the Open-CLIP file (`open_clip_pytorch_model.bin`).
pub const OPEN_CLIP_TRUNK_PREFIX: &str = "visual.trunk.";

/// Resolves Osprey checkpoint names (as listed in docs/MODEL.md#clip-convnext-l-trunk and
/// docs/MODEL.md#mask-extractor) for the vision side.
///
/// Trunk tensors (`model.vision_tower.vision_tower.visual.trunk.*`) come from the Osprey
/// checkpoint when it holds any trunk tensor, otherwise from the Open-CLIP file named by
/// `mm_vision_tower` (`visual.trunk.*`), opened on first use. A layer scale asked for as
/// `blocks.N.gamma` is also found under `blocks.N.weight`, the name Hugging Face's loader gives it.
/// Other names are looked up unchanged in the Osprey checkpoint.
pub struct OspreyVisionResolver {
    main: Checkpoint,
    trunk_in_main: bool,
    fallback_path: Option<PathBuf>,
    fallback: OnceLock<Result<Checkpoint, String>>,
}

impl OspreyVisionResolver {
    /// `mm_vision_tower` is the config's value; a relative path is taken relative to `dir`.
    pub fn open(dir: &Path, mm_vision_tower: Option<&str>) -> Result<Self, WeightsError> {
        let main = Checkpoint::open_dir(dir)?;
        let trunk_in_main = main.has_prefix(OSPREY_TRUNK_PREFIX);
        let fallback_path = mm_vision_tower.map(|name| {
            let p = Path::new(name);
            let joined = dir.join(p);
            // Upstream resolves the name against the working directory (e.g. "demo/...");
            // here the file is expected next to the checkpoint, so also try its bare name.
            match p.file_name() {
                Some(file) if !joined.exists() && p.is_relative() => dir.join(file),
                _ => joined,
            }
        });
        Ok(Self { main, trunk_in_main, fallback_path, fallback: OnceLock::new() })
    }

    /// The Osprey checkpoint.
    pub fn main(&self) -> &Checkpoint {
        &self.main
    }

    /// The Open-CLIP checkpoint, opened on first call (`Ok(None)` when the config names none).
    pub fn fallback(&self) -> Result<Option<&Checkpoint>, WeightsError> {
        let Some(path) = &self.fallback_path else { return Ok(None) };
        let opened = self.fallback.get_or_init(|| {
            if !path.is_file() {
                return Err(format!(
                    "the checkpoint has no vision trunk ({OSPREY_TRUNK_PREFIX}*) and the Open-CLIP file \
                     named by mm_vision_tower does not exist"
                ));
            }
            Checkpoint::open_files(std::slice::from_ref(path)).map_err(|e| e.to_string())
        });
        match opened {
            Ok(c) => Ok(Some(c)),
            Err(msg) => Err(WeightsError::BadFile { path: path.clone(), msg: msg.clone() }),
        }
    }
}

/// `...blocks.N.gamma` -> `...blocks.N.weight` (Hugging Face renames `gamma` parameters).
fn layer_scale_alias(key: &str) -> Option<String> {
    let stem = key.strip_suffix(".gamma")?;
    let (blocks, index) = stem.rsplit_once('.')?;
    (blocks.ends_with("blocks") && index.parse::<usize>().is_ok()).then(|| format!("{stem}.weight"))
}

fn find<'a>(checkpoint: &'a Checkpoint, candidates: &[String]) -> Option<(&'a Checkpoint, String)> {
    candidates.iter().find(|k| checkpoint.contains(k)).map(|k| (checkpoint, k.clone()))
}

impl Resolve for OspreyVisionResolver {
    fn resolve(&self, name: &str) -> Result<(&Checkpoint, String), WeightsError> {
        let Some(rest) = name.strip_prefix(OSPREY_TRUNK_PREFIX) else {
            return find(&self.main, &[name.to_string()]).ok_or_else(|| WeightsError::MissingKey {
                key: name.to_string(),
                files: self.main.describe_files(),
            });
        };
        let with_alias = |prefix: &str| {
            let key = format!("{prefix}{rest}");
            let alias = layer_scale_alias(&key);
            std::iter::once(key).chain(alias).collect::<Vec<_>>()
        };
        if self.trunk_in_main {
            let keys = with_alias(OSPREY_TRUNK_PREFIX);
            return find(&self.main, &keys).ok_or_else(|| WeightsError::MissingKey {
                key: keys.join(" or "),
                files: self.main.describe_files(),
            });
        }
        let keys = with_alias(OPEN_CLIP_TRUNK_PREFIX);
        match self.fallback()? {
            Some(fallback) => find(fallback, &keys).ok_or_else(|| WeightsError::MissingKey {
                key: keys.join(" or "),
                files: fallback.describe_files(),
            }),
            None => Err(WeightsError::MissingKey {
                key: format!(
                    "{name} (no vision trunk in the checkpoint and no mm_vision_tower in config.json)"
                ),
                files: self.main.describe_files(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(layout: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/vision/tiny").join(layout)
    }

    #[test]
    fn layer_scale_alias_only_for_block_gamma() {
        assert_eq!(
            layer_scale_alias("a.stages.0.blocks.12.gamma").as_deref(),
            Some("a.stages.0.blocks.12.weight")
        );
        assert_eq!(layer_scale_alias("a.blocks.1.norm.gamma"), None);
        assert_eq!(layer_scale_alias("a.blocks.x.gamma"), None);
        assert_eq!(layer_scale_alias("a.blocks.1.weight"), None);
    }

    /// Where the fixture layouts keep the trunk (the generic reading is tested in osprey-checkpoint).
    #[test]
    fn fixture_layouts_keep_the_trunk_where_expected() {
        for layout in ["tiny_st", "tiny_bin"] {
            assert!(Checkpoint::open_dir(&tiny(layout)).unwrap().has_prefix(OSPREY_TRUNK_PREFIX), "{layout}");
        }
        let split = Checkpoint::open_dir(&tiny("tiny_split")).unwrap();
        assert!(!split.has_prefix(OSPREY_TRUNK_PREFIX));
        let r = OspreyVisionResolver::open(&tiny("tiny_split"), Some("open_clip_pytorch_model.bin")).unwrap();
        let oc = r.fallback().unwrap().expect("a fallback file");
        assert!(oc.has_prefix(OPEN_CLIP_TRUNK_PREFIX));
        assert!(oc.contains("visual.trunk.stem.0.weight"));
    }

    #[test]
    fn resolver_maps_trunk_names() {
        let name = "model.vision_tower.vision_tower.visual.trunk.stages.2.blocks.1.gamma";
        let r = OspreyVisionResolver::open(&tiny("tiny_bin"), Some("open_clip_pytorch_model.bin")).unwrap();
        assert_eq!(r.resolve(name).unwrap().1, name.replace(".gamma", ".weight"));
        let r = OspreyVisionResolver::open(&tiny("tiny_split"), Some("open_clip_pytorch_model.bin")).unwrap();
        assert_eq!(r.resolve(name).unwrap().1, "visual.trunk.stages.2.blocks.1.gamma");
        assert_eq!(r.resolve("mask_extractor.res2.bias").unwrap().1, "mask_extractor.res2.bias");
        let err = r.resolve("mask_extractor.res9.bias").unwrap_err().to_string();
        assert!(err.contains("mask_extractor.res9.bias") && err.contains("model.safetensors"), "{err}");
        // No fallback file: a clear error naming the file.
        let r = OspreyVisionResolver::open(&tiny("tiny_split"), Some("missing.bin")).unwrap();
        let err = r.resolve(name).unwrap_err().to_string();
        assert!(err.contains("missing.bin") && err.contains("mm_vision_tower"), "{err}");
        let r = OspreyVisionResolver::open(&tiny("tiny_split"), None).unwrap();
        let err = r.resolve(name).unwrap_err().to_string();
        assert!(err.contains(name), "{err}");
    }
}
