//! Weights by model id against a mirror of the hub's file layout served from loopback: the files
//! land in the standard cache layout (`models--owner--name/{blobs,refs,snapshots}`), the snapshot
//! loads as a checkpoint, and offline mode serves the same paths from the cache alone.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use osprey_checkpoint::Checkpoint;
use osprey_checkpoint::hub::{HubConfig, resolve_dir_with, resolve_file_with};
use osprey_test_support::fixtures;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// One repo of the mirror: file name in the repo → bytes.
type Repo = BTreeMap<String, Vec<u8>>;

fn repo_from_dir(dir: &Path, prefix: &str) -> Repo {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            (format!("{prefix}{name}"), std::fs::read(&path).unwrap())
        })
        .collect()
}

/// What the hub answers on `/api/models/{repo}/revision/{rev}` and `/{repo}/resolve/{rev}/{file}`
/// with the headers `hf-hub` reads: `x-repo-commit`, `etag`, and `Content-Range` on ranged GETs.
struct Mirror {
    port: u16,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Mirror {
    fn start(repos: BTreeMap<String, Repo>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::SeqCst) {
                    break;
                }
                count.fetch_add(1, Ordering::SeqCst);
                let _ = answer(stream.unwrap(), &repos);
            }
        });
        Self { port, requests, stop }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn answer(stream: TcpStream, repos: &BTreeMap<String, Repo>) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("range")
        {
            range = value.trim().strip_prefix("bytes=").map(str::to_string);
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut out = stream;
    let respond = |out: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]| {
        let mut head =
            format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        out.write_all(head.as_bytes())?;
        out.write_all(body)?;
        out.flush()
    };
    if let Some(rest) = path.strip_prefix("/api/models/") {
        // {owner}/{name}/revision/{rev}
        let Some((repo, _rev)) = rest.split_once("/revision/") else {
            return respond(&mut out, "404 Not Found", &[], b"");
        };
        let Some(files) = repos.get(repo) else { return respond(&mut out, "404 Not Found", &[], b"") };
        let siblings: Vec<serde_json::Value> =
            files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo, "sha": COMMIT, "siblings": siblings }).to_string();
        return respond(
            &mut out,
            "200 OK",
            &[("Content-Type".into(), "application/json".into())],
            body.as_bytes(),
        );
    }
    // /{owner}/{name}/resolve/{rev}/{file...}
    let parts: Vec<&str> = path.trim_start_matches('/').splitn(5, '/').collect();
    let [owner, name, "resolve", _rev, file] = parts.as_slice() else {
        return respond(&mut out, "404 Not Found", &[], b"");
    };
    let Some(bytes) = repos.get(&format!("{owner}/{name}")).and_then(|r| r.get(*file)) else {
        return respond(&mut out, "404 Not Found", &[("X-Error-Code".into(), "EntryNotFound".into())], b"");
    };
    let etag = format!("\"{}\"", blake3::hash(bytes).to_hex());
    let mut headers = vec![("x-repo-commit".to_string(), COMMIT.to_string()), ("ETag".to_string(), etag)];
    let size = bytes.len();
    let (start, end) = match range.as_deref().and_then(|r| r.split_once('-')) {
        Some((start, end)) => {
            let start: usize = start.parse().unwrap_or(0);
            let end: usize = end.parse().map(|e: usize| e.min(size - 1)).unwrap_or(size - 1);
            (start, end)
        }
        None => (0, size - 1),
    };
    if range.is_some() {
        headers.push(("Content-Range".into(), format!("bytes {start}-{end}/{size}")));
        respond(&mut out, "206 Partial Content", &headers, &bytes[start..=end])
    } else {
        respond(&mut out, "200 OK", &headers, bytes)
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("osprey-hub-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config(cache: &Path, endpoint: String, offline: bool) -> HubConfig {
    HubConfig { cache_dir: cache.to_path_buf(), endpoint, token: None, offline }
}

#[test]
fn checkpoint_directories_and_files_by_repo_id() {
    let osprey = fixtures().join("llm/tiny_bin");
    let vision = fixtures().join("vision/tiny/tiny_split");
    let sam = fixtures().join("sam/tiny_sam.pth");
    let mut repos = BTreeMap::new();
    let mut osprey_repo = repo_from_dir(&osprey, "");
    osprey_repo.insert("training_args.bin".into(), b"not a weight file".to_vec());
    repos.insert("sunshine-lwt/Osprey-7b".to_string(), osprey_repo);
    repos.insert("org/osprey-split".to_string(), repo_from_dir(&vision, ""));
    let mut sam_repo = Repo::new();
    sam_repo.insert("checkpoints/sam_vit_b_01ec64.pth".into(), std::fs::read(&sam).unwrap());
    sam_repo.insert("README.md".into(), b"# SAM".to_vec());
    repos.insert("ybelkada/segment-anything".to_string(), sam_repo);
    let mirror = Mirror::start(repos);
    let cache = temp_dir("cache");
    let online = config(&cache, mirror.endpoint(), false);

    // A sharded .bin checkpoint: config, index and both shards, nothing else.
    let dir = resolve_dir_with(Path::new("sunshine-lwt/Osprey-7b"), &online).unwrap();
    assert_eq!(dir, cache.join("models--sunshine-lwt--Osprey-7b/snapshots").join(COMMIT));
    let mut got: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    got.sort();
    let mut want: Vec<String> =
        std::fs::read_dir(&osprey).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    want.sort();
    assert_eq!(got, want, "training_args.bin must not be fetched");
    let refs = std::fs::read_to_string(cache.join("models--sunshine-lwt--Osprey-7b/refs/main")).unwrap();
    assert_eq!(refs.trim(), COMMIT);
    // hf-hub leaves a `.lock` file next to each blob.
    let blobs = std::fs::read_dir(cache.join("models--sunshine-lwt--Osprey-7b/blobs"))
        .unwrap()
        .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".lock"))
        .count();
    assert_eq!(blobs, want.len());

    // The snapshot loads exactly like the local directory.
    let from_hub = Checkpoint::open_dir(&dir).unwrap();
    let local = Checkpoint::open_dir(&osprey).unwrap();
    assert_eq!(from_hub.keys(), local.keys());
    for key in local.keys() {
        let (a, b) = (from_hub.get(key).unwrap(), local.get(key).unwrap());
        let diff = (a.to_dtype(candle_core::DType::F32).unwrap()
            - b.to_dtype(candle_core::DType::F32).unwrap())
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

    // A safetensors checkpoint with the Open-CLIP file that config.json's mm_vision_tower names.
    let split = resolve_dir_with(Path::new("org/osprey-split@main"), &online).unwrap();
    for name in ["config.json", "model.safetensors", "open_clip_pytorch_model.bin"] {
        assert_eq!(
            std::fs::read(split.join(name)).unwrap(),
            std::fs::read(vision.join(name)).unwrap(),
            "{name}"
        );
    }

    // One file by name, and by being the repo's only weight file.
    let named =
        resolve_file_with(Path::new("ybelkada/segment-anything:checkpoints/sam_vit_b_01ec64.pth"), &online)
            .unwrap();
    assert!(named.ends_with("checkpoints/sam_vit_b_01ec64.pth"));
    assert_eq!(std::fs::read(&named).unwrap(), std::fs::read(&sam).unwrap());
    let sole = resolve_file_with(Path::new("ybelkada/segment-anything"), &online).unwrap();
    assert_eq!(sole, named);
    assert!(!Checkpoint::open_files(std::slice::from_ref(&named)).unwrap().keys().is_empty());

    // Errors name the repo and the problem.
    let err = resolve_dir_with(Path::new("nobody/missing"), &online).unwrap_err().to_string();
    assert!(err.contains("nobody/missing@main") && err.contains("repo listing"), "{err}");
    let err = resolve_dir_with(Path::new("ybelkada/segment-anything"), &online).unwrap_err().to_string();
    assert!(err.contains("no config.json"), "{err}");

    // Offline: the same paths from the cache, without a single request.
    let before = mirror.requests.load(Ordering::SeqCst);
    let offline = config(&cache, mirror.endpoint(), true);
    assert_eq!(resolve_dir_with(Path::new("sunshine-lwt/Osprey-7b"), &offline).unwrap(), dir);
    let offline_file = Path::new("ybelkada/segment-anything:checkpoints/sam_vit_b_01ec64.pth");
    assert_eq!(resolve_file_with(offline_file, &offline).unwrap(), named);
    assert_eq!(mirror.requests.load(Ordering::SeqCst), before, "offline mode made requests");
    let err = resolve_dir_with(Path::new("other/never-fetched"), &offline).unwrap_err().to_string();
    assert!(err.contains("HF_HUB_OFFLINE") && err.contains("other/never-fetched"), "{err}");

    // The hub unreachable: the cached snapshot of that revision still serves.
    let endpoint = mirror.endpoint();
    drop(mirror);
    let unreachable = config(&cache, endpoint, false);
    assert_eq!(resolve_dir_with(Path::new("sunshine-lwt/Osprey-7b"), &unreachable).unwrap(), dir);
    let err = resolve_dir_with(Path::new("other/never-fetched"), &unreachable).unwrap_err().to_string();
    assert!(err.contains("download") && err.contains("other/never-fetched"), "{err}");

    std::fs::remove_dir_all(&cache).unwrap();
}

#[test]
fn the_mirror_answers_ranges_like_the_hub() {
    // Guards the test server itself: hf-hub's metadata probe is a GET with `Range: bytes=0-0`.
    let mut repos = BTreeMap::new();
    repos.insert("a/b".to_string(), Repo::from([("f.json".to_string(), b"{\"x\": 1}".to_vec())]));
    let mirror = Mirror::start(repos);
    let mut stream = TcpStream::connect(("127.0.0.1", mirror.port)).unwrap();
    stream
        .write_all(b"GET /a/b/resolve/main/f.json HTTP/1.1\r\nHost: x\r\nRange: bytes=0-0\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).unwrap();
    assert!(text.starts_with("HTTP/1.1 206"), "{text}");
    assert!(text.contains("Content-Range: bytes 0-0/8") && text.contains(COMMIT), "{text}");
    assert!(text.ends_with("\r\n\r\n{"), "{text}");
}

#[test]
fn a_download_locked_by_another_process_is_awaited() {
    // Two workers sharing one cache volume start together: the second must wait for the first's
    // download (hf-hub itself gives up on a held lock after 5 s), then use the cached file.
    let bytes = b"weights held by another process".to_vec();
    let mut repos = BTreeMap::new();
    repos.insert("a/locked".to_string(), Repo::from([("w.pth".to_string(), bytes.clone())]));
    let mirror = Mirror::start(repos);
    let cache = temp_dir("lock");
    let blobs = cache.join("models--a--locked/blobs");
    std::fs::create_dir_all(&blobs).unwrap();
    let lock_path = blobs.join(format!("{}.lock", blake3::hash(&bytes).to_hex()));
    let lock = std::fs::File::create(&lock_path).unwrap();
    lock.lock().unwrap();
    let held = std::time::Duration::from_secs(7);
    let release = std::thread::spawn(move || {
        std::thread::sleep(held);
        lock.unlock().unwrap();
    });
    let start = std::time::Instant::now();
    let path =
        resolve_file_with(Path::new("a/locked:w.pth"), &config(&cache, mirror.endpoint(), false)).unwrap();
    assert!(start.elapsed() >= held, "returned before the lock was released");
    assert_eq!(std::fs::read(path).unwrap(), bytes);
    release.join().unwrap();
    std::fs::remove_dir_all(&cache).unwrap();
}
