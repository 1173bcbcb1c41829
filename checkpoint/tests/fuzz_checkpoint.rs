//! Malicious checkpoints: mutated `torch.save` archives (the pickle re-zipped so it is what gets
//! read) and mutated safetensors files must open and read as values or errors: no panic, no
//! allocation past what the file holds, no code run (candle's reader only names globals).
//!
//! CI runs proptest's default 256 cases per target; `PROPTEST_CASES=100000` runs longer.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use osprey_checkpoint::{Checkpoint, WeightsError};
use osprey_test_support::fixture;
use proptest::prelude::*;

/// The entries of a zip archive, in order.
fn entries(path: &Path) -> Vec<(String, Vec<u8>)> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(path).unwrap()).unwrap();
    (0..zip.len())
        .map(|i| {
            let mut entry = zip.by_index(i).unwrap();
            let name = entry.name().unwrap().into_owned();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            (name, bytes)
        })
        .collect()
}

fn write_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let options = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    for (name, bytes) in entries {
        zip.start_file(name.as_str(), options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap();
}

/// A fresh path in the temp dir for one case.
fn scratch(extension: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("osprey-fuzz-{}-{n}.{extension}", std::process::id()))
}

/// Opens `path` and reads every tensor; any outcome but a panic or an abort is fine, and a
/// tensor that reads must fit in the file.
fn open_and_read(path: &Path) {
    let file_len = std::fs::metadata(path).unwrap().len();
    if let Ok(checkpoint) = Checkpoint::open_files(&[path.to_path_buf()]) {
        for key in checkpoint.keys() {
            if let Ok(tensor) = checkpoint.get(key) {
                let bytes = tensor.elem_count() as u64 * tensor.dtype().size_in_bytes() as u64;
                assert!(bytes <= file_len, "{key}: {bytes} bytes from a {file_len}-byte file");
            }
        }
    }
}

fn mutate(bytes: &mut Vec<u8>, edits: &[(usize, u8, u8)], cut: Option<usize>) {
    for &(at, kind, value) in edits {
        if bytes.is_empty() {
            break;
        }
        let at = at % bytes.len();
        match kind {
            0 => bytes[at] = value,
            1 => bytes.insert(at, value),
            _ => {
                bytes.remove(at);
            }
        }
    }
    if let Some(cut) = cut {
        bytes.truncate(cut % (bytes.len() + 1));
    }
}

fn edits() -> impl Strategy<Value = (Vec<(usize, u8, u8)>, Option<usize>)> {
    (prop::collection::vec((any::<usize>(), 0u8..3, any::<u8>()), 1..8), prop::option::of(any::<usize>()))
}

proptest! {
    #[test]
    fn mutated_pickles_open_or_fail_cleanly((edits, cut) in edits(), interesting in any::<bool>()) {
        let mut archive = entries(&fixture("llm/tiny_bin/pytorch_model-00001-of-00002.bin"));
        let pickle = archive.iter_mut().find(|(name, _)| name.ends_with("data.pkl")).unwrap();
        if interesting {
            // Aim at the bytes that matter most: opcodes, lengths and small integers.
            let positions: Vec<usize> =
                pickle.1.iter().enumerate().filter(|(_, b)| b.is_ascii_punctuation() || **b < 16).map(|(i, _)| i).collect();
            let edits: Vec<_> = edits.iter().map(|&(at, kind, v)| (positions[at % positions.len()], kind, v)).collect();
            mutate(&mut pickle.1, &edits, None);
        } else {
            mutate(&mut pickle.1, &edits, cut);
        }
        let path = scratch("bin");
        write_zip(&path, &archive);
        open_and_read(&path);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn mutated_archives_open_or_fail_cleanly((edits, cut) in edits()) {
        let mut bytes = std::fs::read(fixture("llm/tiny_bin/pytorch_model-00002-of-00002.bin")).unwrap();
        mutate(&mut bytes, &edits, cut);
        let path = scratch("bin");
        std::fs::write(&path, &bytes).unwrap();
        open_and_read(&path);
        std::fs::remove_file(&path).ok();
    }

    #[test]
    fn mutated_safetensors_open_or_fail_cleanly((edits, cut) in edits(), in_header in any::<bool>()) {
        let mut bytes = std::fs::read(fixture("llm/tiny/model.safetensors")).unwrap();
        if in_header {
            // The 8-byte length and the JSON header are what a loader trusts.
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            let edits: Vec<_> = edits.iter().map(|&(at, kind, v)| (at % header, kind, v)).collect();
            mutate(&mut bytes, &edits, None);
        } else {
            mutate(&mut bytes, &edits, cut);
        }
        let path = scratch("safetensors");
        std::fs::write(&path, &bytes).unwrap();
        open_and_read(&path);
        std::fs::remove_file(&path).ok();
    }
}

/// `{"w": _rebuild_tensor_v2(storage "0" of FloatStorage, 0, size, (1,) * rank, False,
/// OrderedDict())}` as torch.save's protocol 2 pickle (sizes as 4-byte BININT, as candle reads them).
fn state_dict_pickle(size: &[i32]) -> Vec<u8> {
    let mut p = b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
    p.extend_from_slice(
        b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x04tQ",
    );
    p.extend_from_slice(b"K\x00(");
    for dim in size {
        p.push(b'J');
        p.extend_from_slice(&dim.to_le_bytes());
    }
    p.extend_from_slice(b"t(");
    for _ in size {
        p.extend_from_slice(b"K\x01");
    }
    p.extend_from_slice(b"t\x89ccollections\nOrderedDict\n)RtRu.");
    p
}

fn archive_with_pickle(pickle: Vec<u8>) -> PathBuf {
    let entries = vec![
        ("archive/data.pkl".to_string(), pickle),
        ("archive/byteorder".to_string(), b"little".to_vec()),
        ("archive/data/0".to_string(), vec![0u8; 16]),
        ("archive/version".to_string(), b"3\n".to_vec()),
    ];
    let path = scratch("bin");
    write_zip(&path, &entries);
    path
}

#[test]
fn a_hand_made_archive_reads() {
    let path = archive_with_pickle(state_dict_pickle(&[4]));
    let checkpoint = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap();
    assert_eq!(checkpoint.get("w").unwrap().dims(), [4]);
    std::fs::remove_file(&path).ok();
}

#[test]
fn a_tensor_declared_larger_than_the_file_is_refused_before_reading() {
    // 8 GB, and a shape whose byte count overflows u64.
    for size in [&[i32::MAX][..], &[i32::MAX, i32::MAX, i32::MAX]] {
        let path = archive_with_pickle(state_dict_pickle(size));
        let err = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err();
        assert!(
            matches!(err, WeightsError::BadFile { .. }) && err.to_string().contains("more than the file"),
            "{size:?}: {err}"
        );
        std::fs::remove_file(&path).ok();
    }
}

#[test]
fn a_memo_bomb_is_refused() {
    let mut bomb = b"\x80\x02)q\x00".to_vec();
    for _ in 0..40 {
        bomb.extend_from_slice(b"h\x00h\x00\x86q\x00");
    }
    bomb.push(b'.');
    let path = archive_with_pickle(bomb);
    let err = Checkpoint::open_files(std::slice::from_ref(&path)).unwrap_err();
    assert!(err.to_string().contains("objects"), "{err}");
    std::fs::remove_file(&path).ok();
}
