//! Checkpoint reading shared by the Osprey workers.
//!
//! A [`Checkpoint`] is a set of weight files read lazily: safetensors (memory-mapped) and PyTorch
//! zip pickles (`torch.save`, any of f32/f16/bf16, read through `candle_core::pickle`), single
//! files or shards listed by a Hugging Face `*.index.json`. [`var_builder`] turns one or more
//! checkpoints into a candle `VarBuilder` whose names the caller maps onto checkpoint keys with a
//! [`Resolve`] implementation, so model code keeps plain `vb.pp("...")` names; only the tensors a
//! model asks for are read (keys nobody asks for, such as the `rotary_emb.inv_freq` buffers old
//! transformers saved, are left unread), and a missing or mis-shaped tensor is a [`WeightsError`]
//! naming the key and the file. A [`Checkpoint`] is itself the identity [`Resolve`]r.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

mod device;
pub mod hub;
pub mod pickle_guard;
pub use device::{parse_device, parse_dtype};

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
    pickle_guard::check_archive(path)
        .map_err(|msg| WeightsError::BadFile { path: path.to_path_buf(), msg })?;
    // candle indexes into tensor records without checking their length; a malformed one panics.
    let opened = std::panic::catch_unwind(|| PthTensors::new(path, None)).map_err(|_| {
        WeightsError::BadFile { path: path.to_path_buf(), msg: "malformed tensor record".into() }
    })?;
    let pth = opened.map_err(bad)?;
    let file_len = std::fs::metadata(path).map_err(io)?.len();
    for (key, info) in pth.tensor_infos() {
        check_tensor_fits(key, info, file_len)
            .map_err(|msg| WeightsError::BadFile { path: path.to_path_buf(), msg })?;
    }
    Ok(Reader::Pth(pth))
}

/// A tensor's declared bytes must fit in the file before candle allocates them.
fn check_tensor_fits(key: &str, info: &candle_core::pickle::TensorInfo, file_len: u64) -> Result<(), String> {
    let elements = info.layout.dims().iter().try_fold(1u64, |n, &d| n.checked_mul(d as u64));
    let bytes = elements
        .and_then(|n| n.checked_mul(info.dtype.size_in_bytes() as u64))
        .and_then(|n| n.checked_add(info.layout.start_offset() as u64));
    match bytes {
        Some(bytes) if bytes <= file_len => Ok(()),
        _ => Err(format!(
            "tensor {key} declares shape {:?} of {:?} at offset {}, more than the file's {file_len} bytes",
            info.layout.dims(),
            info.dtype,
            info.layout.start_offset()
        )),
    }
}

/// Maps the names a model asks for onto checkpoint keys.
pub trait Resolve: Send + Sync {
    /// The checkpoint and key of the tensor the model calls `name`, or `MissingKey` naming the
    /// keys and files searched.
    fn resolve(&self, name: &str) -> Result<(&Checkpoint, String), WeightsError>;
}

/// A checkpoint resolves every name to the key of the same name.
impl Resolve for Checkpoint {
    fn resolve(&self, name: &str) -> Result<(&Checkpoint, String), WeightsError> {
        if self.contains(name) {
            Ok((self, name.to_string()))
        } else {
            Err(WeightsError::MissingKey { key: name.to_string(), files: self.describe_files() })
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn tiny(layout: &str) -> PathBuf {
        fixtures().join("vision/tiny").join(layout)
    }

    #[test]
    fn opens_all_three_layouts() {
        let st = Checkpoint::open_dir(&tiny("tiny_st")).unwrap();
        assert_eq!(st.files().count(), 1);
        assert!(st.contains("model.vision_tower.vision_tower.visual.trunk.stem.0.weight"));
        assert_eq!(st.shape("mask_extractor.res2.weight"), Some(vec![16, 8]));
        assert_eq!(
            st.file_of("mask_extractor.res2.weight"),
            Some(tiny("tiny_st").join(SAFETENSORS).as_path())
        );

        let bin = Checkpoint::open_dir(&tiny("tiny_bin")).unwrap();
        assert_eq!(bin.files().count(), 2);
        let key = "model.vision_tower.vision_tower.visual.trunk.stages.0.blocks.0.weight";
        let t = bin.get(key).unwrap();
        assert_eq!(t.dtype(), DType::BF16);
        assert_eq!(t.dims(), [8]);
        assert_eq!(bin.shape(key), Some(vec![8]));
        assert!(bin.contains("model.layers.0.self_attn.rotary_emb.inv_freq"));
        // The bf16 values are exactly the bf16 rounding of the f32 ones.
        let f32_key = "model.vision_tower.vision_tower.visual.trunk.stages.0.blocks.0.gamma";
        let want = st.get(f32_key).unwrap().to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
        let got = t.to_dtype(DType::F32).unwrap();
        assert_eq!(want.to_vec1::<f32>().unwrap(), got.to_vec1::<f32>().unwrap());

        // A single torch.save file, with a 0-d tensor.
        let oc = Checkpoint::open_files(&[tiny("tiny_split").join("open_clip_pytorch_model.bin")]).unwrap();
        assert!(oc.contains("visual.trunk.stem.0.weight"));
        assert!(oc.has_prefix("visual.trunk."));
        assert!(!oc.has_prefix("model."));
        assert_eq!(oc.get("logit_scale").unwrap().dims(), [] as [usize; 0]);
        assert_eq!(oc.shape("logit_scale"), Some(vec![]));
    }

    /// The LLM fixture's bf16 shards hold the bf16 rounding of its safetensors weights, plus the
    /// `rotary_emb.inv_freq` buffers transformers 4.31 saved.
    #[test]
    fn llm_bf16_shards_hold_the_rounded_weights() {
        let st = Checkpoint::open_dir(&fixtures().join("llm/tiny")).unwrap();
        let bin = Checkpoint::open_dir(&fixtures().join("llm/tiny_bin")).unwrap();
        let extra: Vec<&str> = bin.keys().into_iter().filter(|k| !st.contains(k)).collect();
        assert!(!extra.is_empty());
        assert!(extra.iter().all(|k| k.ends_with(".rotary_emb.inv_freq")), "{extra:?}");
        for key in st.keys() {
            let want = st.get(key).unwrap().to_dtype(DType::BF16).unwrap();
            let got = bin.get(key).unwrap();
            assert_eq!(got.dtype(), DType::BF16, "{key}");
            assert_eq!(bin.shape(key), Some(want.dims().to_vec()), "{key}");
            let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{key}");
        }
    }

    #[test]
    fn var_builder_converts_and_reports_keys_and_files() {
        let dir = fixtures().join("llm/tiny_bin");
        let checkpoint = Checkpoint::open_dir(&dir).unwrap();
        let shard1 = dir.join("pytorch_model-00001-of-00002.bin");
        let (vb, errors) = var_builder(checkpoint, DType::F32, &Device::Cpu);
        let t = vb.get((40, 32), "model.embed_tokens.weight").unwrap();
        assert_eq!(t.dtype(), DType::F32);
        assert_eq!(vb.get_unchecked("model.norm.weight").unwrap().dims(), [32]);
        assert!(vb.contains_tensor("lm_head.weight"));
        assert!(!vb.contains_tensor("lm_head.bias"));

        let err = vb.get((3, 3), "model.embed_tokens.weight").unwrap_err();
        assert!(err.to_string().contains("model.embed_tokens.weight"), "{err}");
        match errors.explain(err) {
            WeightsError::Shape { key, file, expected, got } => {
                assert_eq!(
                    (key.as_str(), file, expected, got),
                    ("model.embed_tokens.weight", shard1, vec![3, 3], vec![40, 32])
                );
            }
            other => panic!("{other:?}"),
        }

        let err = vb.pp("model.layers.7").get(4, "input_layernorm.weight").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("model.layers.7.input_layernorm.weight")
                && msg.contains("pytorch_model-00002-of-00002.bin"),
            "{msg}"
        );
        assert!(matches!(errors.explain(err), WeightsError::MissingKey { .. }));
        // Once explained, a candle error without a recorded one is a build error.
        let other = candle_core::Error::Msg("elsewhere".into());
        assert!(matches!(errors.explain(other), WeightsError::Build(_)));
    }

    #[test]
    fn bad_indexes_are_refused() {
        let dir = std::env::temp_dir().join(format!("osprey-checkpoint-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let shard = fixtures().join("llm/tiny_bin/pytorch_model-00001-of-00002.bin");
        std::fs::copy(&shard, dir.join("a.bin")).unwrap();
        let index = dir.join(PTH_INDEX);
        let cases = [
            (r#"{"weight_map": {"lm_head.weight": "a.bin"}}"#, "lm_head.weight is listed in a.bin"),
            (r#"{"weight_map": {"x": "../a.bin"}}"#, "plain file name"),
            (r#"{"weights": {}}"#, "weight_map"),
            (r#"{"weight_map": {"x": 1}}"#, "not a string"),
            ("not json", "expected"),
        ];
        for (text, want) in cases {
            std::fs::write(&index, text).unwrap();
            let err = Checkpoint::open_dir(&dir).unwrap_err();
            assert!(matches!(err, WeightsError::BadFile { .. }), "{err:?}");
            let msg = err.to_string();
            assert!(msg.contains(want) && msg.contains(PTH_INDEX), "{msg}");
        }
        std::fs::write(&index, r#"{"weight_map": {"model.embed_tokens.weight": "b.bin"}}"#).unwrap();
        let err = Checkpoint::open_dir(&dir).unwrap_err();
        assert!(matches!(err, WeightsError::Io { .. }) && err.to_string().contains("b.bin"), "{err:?}");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn missing_dir_and_bad_files_are_errors() {
        let err = Checkpoint::open_dir(Path::new("/nonexistent")).unwrap_err();
        assert!(matches!(err, WeightsError::NotFound { .. }));
        let err = Checkpoint::open_files(&[tiny("tiny_st").join("config.json")]).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }
}
