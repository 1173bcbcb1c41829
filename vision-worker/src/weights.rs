//! Checkpoint reading shared by the Osprey workers.
//!
//! A [`Checkpoint`] is a set of weight files read lazily: safetensors (memory-mapped) and PyTorch
//! zip pickles (`torch.save`, any of f32/f16/bf16, read through `candle_core::pickle`), single
//! files or shards listed by a Hugging Face `*.index.json`. [`var_builder`] turns one or more
//! checkpoints into a candle `VarBuilder` whose names the caller maps onto checkpoint keys with a
//! [`Resolve`] implementation, so model code keeps plain `vb.pp("...")` names; only the tensors a
//! model asks for are read, and a missing or mis-shaped tensor is a [`WeightsError`] naming the
//! key and the file.
//!
//! [`OspreyVisionResolver`] is the mapping of the Osprey vision side (docs/osprey-model.md §1.5,
//! §7): the trunk comes from the Osprey checkpoint or, when absent there, from the Open-CLIP file
//! named by `mm_vision_tower`, and the layer scale may be stored as `gamma` or `weight`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Why weights could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error(
        "no checkpoint in {dir}: expected model.safetensors, model.safetensors.index.json, \
         pytorch_model.bin or pytorch_model.bin.index.json"
    )]
    NotFound { dir: PathBuf },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {msg}")]
    BadFile { path: PathBuf, msg: String },
    #[error("tensor {key} not found in {files}")]
    MissingKey { key: String, files: String },
    #[error("tensor {key} in {file} has shape {got:?}, expected {expected:?}")]
    Shape { key: String, file: PathBuf, expected: Vec<usize>, got: Vec<usize> },
    /// A model failed to build for a reason other than a tensor lookup (a bug in the model code).
    #[error("building the model: {0}")]
    Build(#[source] Box<candle_core::Error>),
    #[error("tensor {key} in {file}: {source}")]
    Tensor {
        key: String,
        file: PathBuf,
        #[source]
        source: Box<candle_core::Error>,
    },
}

enum Reader {
    SafeTensors(MmapedSafetensors),
    Pth(PthTensors),
}

struct WeightFile {
    path: PathBuf,
    reader: Reader,
}

/// A set of weight files with one namespace of tensor names.
pub struct Checkpoint {
    files: Vec<WeightFile>,
    /// Tensor name to index in `files`. A name in several files resolves to the first.
    keys: HashMap<String, usize>,
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("files", &self.files.iter().map(|f| &f.path).collect::<Vec<_>>())
            .field("tensors", &self.keys.len())
            .finish()
    }
}

const SAFETENSORS: &str = "model.safetensors";
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";
const PTH: &str = "pytorch_model.bin";
const PTH_INDEX: &str = "pytorch_model.bin.index.json";

impl Checkpoint {
    /// Opens the weights of a Hugging Face model directory: the first of `model.safetensors`,
    /// `model.safetensors.index.json`, `pytorch_model.bin`, `pytorch_model.bin.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, WeightsError> {
        for name in [SAFETENSORS, SAFETENSORS_INDEX, PTH, PTH_INDEX] {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            return if name.ends_with(".index.json") {
                Self::open_index(&path)
            } else {
                Self::open_files(&[path])
            };
        }
        Err(WeightsError::NotFound { dir: dir.to_path_buf() })
    }

    /// Opens the shards listed in a Hugging Face `*.index.json` (`{"weight_map": {key: file}}`),
    /// checking that every listed tensor is in its file.
    pub fn open_index(index: &Path) -> Result<Self, WeightsError> {
        let bad = |msg: String| WeightsError::BadFile { path: index.to_path_buf(), msg };
        let text = std::fs::read_to_string(index)
            .map_err(|source| WeightsError::Io { path: index.to_path_buf(), source })?;
        let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
        let mut weight_map = BTreeMap::new();
        for (key, file) in map {
            let file = file.as_str().ok_or_else(|| bad(format!("file of {key} is not a string")))?;
            if file.contains('/') || file.contains('\\') || file == ".." {
                return Err(bad(format!("shard name {file:?} must be a plain file name")));
            }
            weight_map.insert(key.as_str(), file);
        }
        let dir = index.parent().unwrap_or(Path::new("."));
        let mut shards: Vec<PathBuf> = weight_map.values().map(|f| dir.join(f)).collect();
        shards.sort();
        shards.dedup();
        let checkpoint = Self::open_files(&shards)?;
        for (key, file) in weight_map {
            let found = checkpoint.file_of(key);
            if found.and_then(|p| p.file_name()) != Some(std::ffi::OsStr::new(file)) {
                return Err(bad(format!("{key} is listed in {file} but that shard does not hold it")));
            }
        }
        Ok(checkpoint)
    }

    /// Opens weight files: `*.safetensors` by extension, anything else as a `torch.save` zip.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self, WeightsError> {
        let mut files = Vec::with_capacity(paths.len());
        let mut keys = HashMap::new();
        for path in paths {
            let reader = open_reader(path)?;
            let names: Vec<String> = match &reader {
                Reader::SafeTensors(st) => st.tensors().into_iter().map(|(k, _)| k).collect(),
                Reader::Pth(pth) => pth.tensor_infos().keys().cloned().collect(),
            };
            for name in names {
                keys.entry(name).or_insert(files.len());
            }
            files.push(WeightFile { path: path.clone(), reader });
        }
        Ok(Self { files, keys })
    }

    /// All tensor names, sorted.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        keys.sort_unstable();
        keys
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// True when some tensor name starts with `prefix`.
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.keys.keys().any(|k| k.starts_with(prefix))
    }

    /// The files of this checkpoint, in the order they are searched.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().map(|f| f.path.as_path())
    }

    /// The file holding `key`.
    pub fn file_of(&self, key: &str) -> Option<&Path> {
        self.keys.get(key).map(|&i| self.files[i].path.as_path())
    }

    /// The stored shape of `key`, read from the file header only.
    pub fn shape(&self, key: &str) -> Option<Vec<usize>> {
        let file = &self.files[*self.keys.get(key)?];
        match &file.reader {
            Reader::SafeTensors(st) => st.get(key).ok().map(|v| v.shape().to_vec()),
            Reader::Pth(pth) => pth.tensor_infos().get(key).map(|i| i.layout.dims().to_vec()),
        }
    }

    /// Reads `key` on the CPU in its stored dtype.
    pub fn get(&self, key: &str) -> Result<Tensor, WeightsError> {
        let index = *self
            .keys
            .get(key)
            .ok_or_else(|| WeightsError::MissingKey { key: key.to_string(), files: self.describe_files() })?;
        let file = &self.files[index];
        let wrap = |source| WeightsError::Tensor {
            key: key.to_string(),
            file: file.path.clone(),
            source: Box::new(source),
        };
        match &file.reader {
            Reader::SafeTensors(st) => st.load(key, &Device::Cpu).map_err(wrap),
            Reader::Pth(pth) => match pth.get(key).map_err(wrap)? {
                Some(t) => Ok(t),
                None => Err(WeightsError::MissingKey { key: key.to_string(), files: self.describe_files() }),
            },
        }
    }

    /// The file list for error messages.
    pub fn describe_files(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
        names.join(", ")
    }
}

fn open_reader(path: &Path) -> Result<Reader, WeightsError> {
    let io = |source| WeightsError::Io { path: path.to_path_buf(), source };
    let bad = |source: candle_core::Error| WeightsError::BadFile {
        path: path.to_path_buf(),
        msg: source.to_string(),
    };
    if path.extension().is_some_and(|e| e == "safetensors") {
        // SAFETY: the file is mapped read-only; like every mmap-based loader this assumes nobody
        // truncates it while the worker runs.
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(bad)?;
        return Ok(Reader::SafeTensors(st));
    }
    // torch.save has written zip archives since PyTorch 1.6; the older raw pickle format (and
    // anything else) is refused with a clear message instead of a pickle parse error.
    let mut magic = [0_u8; 4];
    File::open(path).and_then(|mut f| f.read_exact(&mut magic)).map_err(io)?;
    if magic != *b"PK\x03\x04" {
        return Err(WeightsError::BadFile {
            path: path.to_path_buf(),
            msg: "not a safetensors file (by extension) nor a torch.save zip archive".into(),
        });
    }
    Ok(Reader::Pth(PthTensors::new(path, None).map_err(bad)?))
}

/// Maps the names a model asks for onto checkpoint keys.
pub trait Resolve: Send + Sync {
    /// The checkpoint and key of the tensor the model calls `name`, or `MissingKey` naming the
    /// keys and files searched.
    fn resolve(&self, name: &str) -> Result<(&Checkpoint, String), WeightsError>;
}

/// The first [`WeightsError`] met while building a model from a [`var_builder`]. candle's
/// `VarBuilder` reports failures as `candle_core::Error` (text only); this keeps the typed error.
#[derive(Clone, Default)]
pub struct LoadErrors(Arc<Mutex<Option<WeightsError>>>);

impl LoadErrors {
    fn record(&self, err: WeightsError) -> candle_core::Error {
        let msg = candle_core::Error::Msg(err.to_string());
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        slot.get_or_insert(err);
        msg
    }

    /// Turns a candle error from model loading into the typed error recorded for it, if any.
    pub fn explain(&self, err: candle_core::Error) -> WeightsError {
        let mut slot = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match slot.take() {
            Some(typed) => typed,
            None => WeightsError::Build(Box::new(err)),
        }
    }
}

struct ResolvingBackend<R> {
    resolver: R,
    errors: LoadErrors,
}

impl<R: Resolve> SimpleBackend for ResolvingBackend<R> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (checkpoint, key) = self.resolver.resolve(name).map_err(|e| self.errors.record(e))?;
        let file = checkpoint.file_of(&key).map(Path::to_path_buf).unwrap_or_default();
        // Check the header before reading the data.
        if let Some(stored) = checkpoint.shape(&key)
            && stored != s.dims()
        {
            let err = WeightsError::Shape { key, file, expected: s.dims().to_vec(), got: stored };
            return Err(self.errors.record(err));
        }
        let convert = |t: Tensor| t.to_dtype(dtype)?.to_device(dev);
        match checkpoint.get(&key) {
            Ok(t) => convert(t).map_err(|source| {
                self.errors.record(WeightsError::Tensor { key, file, source: Box::new(source) })
            }),
            Err(e) => Err(self.errors.record(e)),
        }
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let (checkpoint, key) = self.resolver.resolve(name).map_err(|e| self.errors.record(e))?;
        let t = checkpoint.get(&key).map_err(|e| self.errors.record(e))?;
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.resolver.resolve(name).is_ok()
    }
}

/// A `VarBuilder` reading through `resolver`, converting every tensor to `dtype` on `device`.
/// After a failed model load, pass the candle error to the returned [`LoadErrors::explain`].
pub fn var_builder<R: Resolve + 'static>(
    resolver: R,
    dtype: DType,
    device: &Device,
) -> (VarBuilder<'static>, LoadErrors) {
    let errors = LoadErrors::default();
    let backend = ResolvingBackend { resolver, errors: errors.clone() };
    (VarBuilder::from_backend(Box::new(backend), dtype, device.clone()), errors)
}

/// Prefix of the ConvNeXt trunk inside an Osprey checkpoint.
pub const OSPREY_TRUNK_PREFIX: &str = "model.vision_tower.vision_tower.visual.trunk.";
/// Prefix of the same trunk inside the Open-CLIP file (`open_clip_pytorch_model.bin`).
pub const OPEN_CLIP_TRUNK_PREFIX: &str = "visual.trunk.";

/// Resolves Osprey checkpoint names (as listed in docs/osprey-model.md §1.5, §2, §3) for the
/// vision side.
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

    #[test]
    fn opens_all_three_layouts() {
        let st = Checkpoint::open_dir(&tiny("tiny_st")).unwrap();
        assert!(st.contains("model.vision_tower.vision_tower.visual.trunk.stem.0.weight"));
        assert_eq!(st.shape("mask_extractor.res2.weight"), Some(vec![16, 8]));

        let bin = Checkpoint::open_dir(&tiny("tiny_bin")).unwrap();
        assert_eq!(bin.files().count(), 2);
        let key = "model.vision_tower.vision_tower.visual.trunk.stages.0.blocks.0.weight";
        let t = bin.get(key).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.dims(), [8]);
        assert!(bin.contains("model.layers.0.self_attn.rotary_emb.inv_freq"));
        // The bf16 values are exactly the bf16 rounding of the f32 ones.
        let f32_key = "model.vision_tower.vision_tower.visual.trunk.stages.0.blocks.0.gamma";
        let want = st.get(f32_key).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let got = t.to_dtype(DType::F32).unwrap();
        assert_eq!(want.to_vec1::<f32>().unwrap(), got.to_vec1::<f32>().unwrap());

        let split = Checkpoint::open_dir(&tiny("tiny_split")).unwrap();
        assert!(!split.has_prefix(OSPREY_TRUNK_PREFIX));
        let oc = Checkpoint::open_files(&[tiny("tiny_split").join("open_clip_pytorch_model.bin")]).unwrap();
        assert!(oc.contains("visual.trunk.stem.0.weight"));
        assert!(oc.contains("logit_scale"));
        assert_eq!(oc.get("logit_scale").unwrap().dims(), [] as [usize; 0]);
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

    #[test]
    fn missing_dir_and_bad_files_are_errors() {
        let err = Checkpoint::open_dir(Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(err, WeightsError::NotFound { .. }));
        let err = Checkpoint::open_files(&[tiny("tiny_st").join("config.json")]).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
