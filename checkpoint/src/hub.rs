//! Weights by model id, as TEI and TGI take them: a `--weights`-style value that is not an
//! existing local path but reads as a Hugging Face repo id is downloaded with `hf-hub` into the
//! standard hub cache (`$HF_HOME/hub`, default `~/.cache/huggingface/hub`) and replaced by the
//! local path of its snapshot.
//!
//! Syntax: `owner/name[@revision][:path/in/repo]`, e.g. `sunshine-lwt/Osprey-7b` (a checkpoint
//! directory) or `ybelkada/segment-anything:checkpoints/sam_vit_b_01ec64.pth` (one file).
//! `HF_ENDPOINT` points at a mirror, `HF_TOKEN` authenticates, and `HF_HUB_OFFLINE=1` uses the
//! cache only. When the hub cannot be reached, an already cached snapshot of the same revision is
//! used. Processes sharing one cache wait for each other's downloads of the same file.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hf_hub::api::sync::{ApiBuilder, ApiError, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};

/// Why a repo id could not be turned into local files.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{spec}: {msg}")]
    Spec { spec: String, msg: String },
    #[error("{spec}: download of {file} from {endpoint} failed: {source}")]
    Download {
        spec: String,
        file: String,
        endpoint: String,
        #[source]
        source: Box<ApiError>,
    },
    #[error("{spec}: HF_HUB_OFFLINE is set and {what} is not in the cache {cache}")]
    NotCached { spec: String, what: String, cache: PathBuf },
}

/// A parsed `owner/name[@revision][:file]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubSpec {
    pub repo: String,
    pub revision: String,
    pub file: Option<String>,
}

impl HubSpec {
    /// Parses `value` as a repo id; `None` when it cannot be one (an absolute or `./` path, more
    /// than one `/` before the file part, characters the hub does not allow in names).
    pub fn parse(value: &str) -> Option<Self> {
        let (repo_rev, file) = match value.split_once(':') {
            Some((head, file)) if !file.is_empty() && !file.starts_with('/') && !file.contains("..") => {
                (head, Some(file.to_string()))
            }
            Some(_) => return None,
            None => (value, None),
        };
        let (repo, revision) = match repo_rev.split_once('@') {
            Some((repo, rev)) if !rev.is_empty() => (repo, rev),
            Some(_) => return None,
            None => (repo_rev, "main"),
        };
        let (owner, name) = repo.split_once('/')?;
        let name_ok = |s: &str| {
            !s.is_empty()
                && !s.starts_with(['.', '-'])
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        if !name_ok(owner) || !name_ok(name) || revision.contains("..") {
            return None;
        }
        Some(Self { repo: repo.to_string(), revision: revision.to_string(), file })
    }

    fn repo(&self) -> Repo {
        Repo::with_revision(self.repo.clone(), RepoType::Model, self.revision.clone())
    }
}

/// Where and how to reach the hub; [`HubConfig::from_env`] reads the standard variables.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// The hub cache (`$HF_HOME/hub`).
    pub cache_dir: PathBuf,
    /// `HF_ENDPOINT`, default `https://huggingface.co`.
    pub endpoint: String,
    /// `HF_TOKEN` (else the token file `huggingface-cli login` writes into the cache).
    pub token: Option<String>,
    /// `HF_HUB_OFFLINE`: never touch the network.
    pub offline: bool,
}

impl HubConfig {
    pub fn from_env() -> Self {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from a variable lookup (the process environment in
    /// [`HubConfig::from_env`]).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let cache = match var("HF_HOME") {
            Some(home) => Cache::new(PathBuf::from(home).join("hub")),
            None => Cache::default(),
        };
        let truthy = |v: String| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on");
        Self {
            token: var("HF_TOKEN").filter(|t| !t.is_empty()).or_else(|| cache.token()),
            cache_dir: cache.path().clone(),
            endpoint: var("HF_ENDPOINT")
                .filter(|e| !e.is_empty())
                .unwrap_or_else(|| "https://huggingface.co".into())
                .trim_end_matches('/')
                .to_string(),
            offline: var("HF_HUB_OFFLINE").is_some_and(truthy),
        }
    }

    fn api(&self, spec: &HubSpec) -> Result<ApiRepo, HubError> {
        let api = ApiBuilder::new()
            .with_cache_dir(self.cache_dir.clone())
            .with_endpoint(self.endpoint.clone())
            .with_token(self.token.clone())
            .with_progress(false)
            .with_retries(3)
            .build()
            .map_err(|e| self.download_error(spec, "(client setup)", e))?;
        Ok(api.repo(spec.repo()))
    }

    fn download_error(&self, spec: &HubSpec, file: &str, source: ApiError) -> HubError {
        HubError::Download {
            spec: spec_text(spec),
            file: file.to_string(),
            endpoint: self.endpoint.clone(),
            source: Box::new(source),
        }
    }

    /// The cached snapshot directory of `spec`'s revision, if any.
    fn cached_snapshot(&self, spec: &HubSpec) -> Option<PathBuf> {
        let repo_dir = self.cache_dir.join(spec.repo().folder_name());
        let commit = std::fs::read_to_string(repo_dir.join("refs").join(&spec.revision))
            .map(|c| c.trim().to_string())
            .unwrap_or_else(|_| spec.revision.clone());
        let dir = repo_dir.join("snapshots").join(commit);
        dir.is_dir().then_some(dir)
    }
}

fn spec_text(spec: &HubSpec) -> String {
    let mut text = format!("{}@{}", spec.repo, spec.revision);
    if let Some(file) = &spec.file {
        text.push(':');
        text.push_str(file);
    }
    text
}

/// A checkpoint-directory flag (`--weights` of the vision and LLM workers): an existing path, or
/// a repo id whose config, tokenizer and weight files are fetched into the cache; the snapshot
/// directory is returned. Anything else is returned unchanged for the loader to report.
pub fn resolve_dir(value: &Path) -> Result<PathBuf, HubError> {
    resolve_dir_with(value, &HubConfig::from_env())
}

/// A single-file flag (`--weights`/`--config` of the SAM worker): an existing path, or
/// `owner/name[@revision]:file` (the file part may be left out when the repo has exactly one
/// `.pth` or `.safetensors` file).
pub fn resolve_file(value: &Path) -> Result<PathBuf, HubError> {
    resolve_file_with(value, &HubConfig::from_env())
}

/// [`resolve_dir`] with an explicit configuration.
pub fn resolve_dir_with(value: &Path, config: &HubConfig) -> Result<PathBuf, HubError> {
    let Some(spec) = as_spec(value) else { return Ok(value.to_path_buf()) };
    if spec.file.is_some() {
        return Err(HubError::Spec {
            spec: spec_text(&spec),
            msg: "this flag takes a checkpoint directory: give the repo id without `:file`".into(),
        });
    }
    if config.offline {
        return cached_dir(&spec, config);
    }
    match download_dir(&spec, config) {
        Ok(dir) => Ok(dir),
        Err(err) => cached_dir(&spec, config).map_err(|_| err),
    }
}

/// [`resolve_file`] with an explicit configuration.
pub fn resolve_file_with(value: &Path, config: &HubConfig) -> Result<PathBuf, HubError> {
    let Some(spec) = as_spec(value) else { return Ok(value.to_path_buf()) };
    if config.offline {
        return cached_file(&spec, config);
    }
    match download_file(&spec, config) {
        Ok(path) => Ok(path),
        Err(err) => cached_file(&spec, config).map_err(|_| err),
    }
}

/// How long to wait for another process that is downloading the same file (two workers sharing
/// one cache volume start together).
const LOCK_WAIT: Duration = Duration::from_secs(3600);

/// `repo.get(file)`, waiting while another process holds the file's download lock: hf-hub gives
/// up after 5 s, and once the other download is done the file is in the cache.
fn fetch(repo: &ApiRepo, file: &str) -> Result<PathBuf, ApiError> {
    let deadline = Instant::now() + LOCK_WAIT;
    loop {
        match repo.get(file) {
            Err(ApiError::LockAcquisition(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_secs(2))
            }
            other => return other,
        }
    }
}

/// A repo id, unless `value` exists locally (a local path always wins).
fn as_spec(value: &Path) -> Option<HubSpec> {
    if value.exists() {
        return None;
    }
    HubSpec::parse(value.to_str()?)
}

/// The weight files a checkpoint directory needs, in the order `Checkpoint::open_dir` looks for
/// them: one of the single files, or the shards an index lists.
fn weight_files(
    dir_listing: &[String],
    fetch_json: impl Fn(&str) -> Option<serde_json::Value>,
) -> Vec<String> {
    for name in [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ] {
        if !dir_listing.iter().any(|f| f == name) {
            continue;
        }
        if !name.ends_with(".index.json") {
            return vec![name.to_string()];
        }
        let mut shards: Vec<String> = fetch_json(name)
            .and_then(|index| {
                index.get("weight_map")?.as_object().map(|map| {
                    map.values().filter_map(|f| f.as_str().map(str::to_string)).collect::<Vec<_>>()
                })
            })
            .unwrap_or_default();
        shards.sort();
        shards.dedup();
        return shards;
    }
    Vec::new()
}

/// Small files a checkpoint directory may need: configs, tokenizer, added tokens.
fn is_small_file(name: &str) -> bool {
    !name.contains('/') && (name.ends_with(".json") || name == "tokenizer.model")
}

fn download_dir(spec: &HubSpec, config: &HubConfig) -> Result<PathBuf, HubError> {
    let repo = config.api(spec)?;
    let info = repo.info().map_err(|e| config.download_error(spec, "(repo listing)", e))?;
    let listing: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    if !listing.iter().any(|f| f == "config.json") {
        return Err(HubError::Spec { spec: spec_text(spec), msg: "the repo has no config.json".into() });
    }
    let get = |file: &str| fetch(&repo, file).map_err(|e| config.download_error(spec, file, e));
    let mut snapshot = None;
    for file in listing.iter().filter(|f| is_small_file(f)) {
        let path = get(file)?;
        if file == "config.json" {
            snapshot = path.parent().map(Path::to_path_buf);
        }
    }
    let snapshot = snapshot.expect("config.json was fetched above");
    let read_json = |name: &str| {
        let text = std::fs::read_to_string(snapshot.join(name)).ok()?;
        serde_json::from_str::<serde_json::Value>(&text).ok()
    };
    let mut wanted = weight_files(&listing, read_json);
    if wanted.is_empty() {
        return Err(HubError::Spec {
            spec: spec_text(spec),
            msg: "no model.safetensors[.index.json] or pytorch_model.bin[.index.json] in the repo".into(),
        });
    }
    // The Open-CLIP file named by `mm_vision_tower`, when the repo carries it (the vision
    // worker's fallback for the trunk).
    if let Some(tower) = read_json("config.json")
        .and_then(|c| c.get("mm_vision_tower")?.as_str().map(|t| t.trim_start_matches("./").to_string()))
        && listing.contains(&tower)
    {
        wanted.push(tower);
    }
    for file in &wanted {
        get(file)?;
    }
    Ok(snapshot)
}

fn download_file(spec: &HubSpec, config: &HubConfig) -> Result<PathBuf, HubError> {
    let repo = config.api(spec)?;
    let file = match &spec.file {
        Some(file) => file.clone(),
        None => {
            let info = repo.info().map_err(|e| config.download_error(spec, "(repo listing)", e))?;
            let weights: Vec<String> = info
                .siblings
                .into_iter()
                .map(|s| s.rfilename)
                .filter(|f| f.ends_with(".pth") || f.ends_with(".safetensors"))
                .collect();
            match weights.as_slice() {
                [one] => one.clone(),
                _ => {
                    return Err(HubError::Spec {
                        spec: spec_text(spec),
                        msg: format!("name the file (`{}:FILE`), the repo holds {weights:?}", spec.repo),
                    });
                }
            }
        }
    };
    fetch(&repo, &file).map_err(|e| config.download_error(spec, &file, e))
}

fn cached_dir(spec: &HubSpec, config: &HubConfig) -> Result<PathBuf, HubError> {
    config.cached_snapshot(spec).filter(|dir| dir.join("config.json").is_file()).ok_or_else(|| {
        HubError::NotCached {
            spec: spec_text(spec),
            what: "a snapshot with config.json".into(),
            cache: config.cache_dir.clone(),
        }
    })
}

fn cached_file(spec: &HubSpec, config: &HubConfig) -> Result<PathBuf, HubError> {
    let not_cached = |what: &str| HubError::NotCached {
        spec: spec_text(spec),
        what: what.to_string(),
        cache: config.cache_dir.clone(),
    };
    let file = spec.file.as_deref().ok_or_else(|| not_cached("the file (name it as `repo:FILE` offline)"))?;
    let path = config.cached_snapshot(spec).map(|dir| dir.join(file)).ok_or_else(|| not_cached(file))?;
    if path.is_file() { Ok(path) } else { Err(not_cached(file)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_repo_ids_and_rejects_paths() {
        let spec = HubSpec::parse("sunshine-lwt/Osprey-7b").unwrap();
        assert_eq!(
            (spec.repo.as_str(), spec.revision.as_str(), spec.file),
            ("sunshine-lwt/Osprey-7b", "main", None)
        );
        let spec = HubSpec::parse(
            "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup@v1:open_clip_pytorch_model.bin",
        )
        .unwrap();
        assert_eq!(spec.repo, "laion/CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft-soup");
        assert_eq!(spec.revision, "v1");
        assert_eq!(spec.file.as_deref(), Some("open_clip_pytorch_model.bin"));
        let spec = HubSpec::parse("ybelkada/segment-anything:checkpoints/sam_vit_b_01ec64.pth").unwrap();
        assert_eq!(spec.file.as_deref(), Some("checkpoints/sam_vit_b_01ec64.pth"));
        for path in
            ["/data/Osprey-7b", "./x/y", "Osprey-7b", "a/b/c", "../a/b", "a/b:../x", "a/b@", "a/b:", "a /b"]
        {
            assert_eq!(HubSpec::parse(path), None, "{path}");
        }
    }

    #[test]
    fn config_reads_the_standard_variables() {
        let vars = |name: &str| match name {
            "HF_HOME" => Some("/models/hf".to_string()),
            "HF_ENDPOINT" => Some("http://127.0.0.1:9/".to_string()),
            "HF_HUB_OFFLINE" => Some("1".to_string()),
            "HF_TOKEN" => Some("hf_x".to_string()),
            _ => None,
        };
        let config = HubConfig::from_vars(vars);
        assert_eq!(config.cache_dir, PathBuf::from("/models/hf/hub"));
        assert_eq!(config.endpoint, "http://127.0.0.1:9");
        assert!(config.offline);
        assert_eq!(config.token.as_deref(), Some("hf_x"));
        let config = HubConfig::from_vars(|name| (name == "HF_HOME").then(|| "/h".to_string()));
        assert_eq!(config.endpoint, "https://huggingface.co");
        assert!(!config.offline);
    }

    #[test]
    fn an_existing_local_path_is_never_a_repo_id() {
        let dir = std::env::temp_dir().join(format!("osprey-hub-local-{}", std::process::id()));
        let nested = dir.join("owner/name");
        std::fs::create_dir_all(&nested).unwrap();
        let config = HubConfig::from_vars(|_| None);
        let cwd_relative = nested.strip_prefix(&dir).unwrap();
        assert!(as_spec(cwd_relative).is_some(), "not existing relative to the cwd: a repo id");
        assert_eq!(resolve_dir_with(&nested, &config).unwrap(), nested);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
