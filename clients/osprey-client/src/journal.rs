//! The append-only JSON-lines journal that makes a client's long run resumable: one record per
//! finished item, synced to disk before the item counts as done. A rerun reads the records back
//! and skips those items, so an interruption loses nothing and repeats nothing. The annotate CLI
//! journals finished images (with a header line naming its options), osprey-eval raw answers.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// A journal open for appending.
pub struct Journal {
    path: PathBuf,
    file: std::fs::File,
}

impl Journal {
    /// The records of the journal at `path` (none when it does not exist), in order. With a
    /// `header`, the journal's first line must be that header: a journal written for other
    /// options is refused. A last line without its newline was cut short by an interruption and
    /// is left out; any other line that is not a record is an error.
    pub fn read<T: DeserializeOwned>(path: &Path, header: Option<&Value>) -> anyhow::Result<Vec<T>> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
        };
        let complete = &text[..text.rfind('\n').map_or(0, |end| end + 1)];
        let mut lines = complete.lines().enumerate();
        if let Some(header) = header
            && let Some((_, first)) = lines.next()
        {
            let first: Value = serde_json::from_str(first).unwrap_or(Value::Null);
            if &first != header {
                bail!(
                    "{} was written for other options ({first}); remove it or choose another output",
                    path.display()
                );
            }
        }
        lines
            .filter(|(_, line)| !line.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{}: line {} is not a journal record", path.display(), i + 1))
            })
            .collect()
    }

    /// Opens the journal at `path` for appending, creating it (and its folder) with `header` as its
    /// first line when it does not exist, and returns the records already in it ([`Self::read`]).
    /// A line cut short by an interruption is removed so that the next record starts a line.
    pub fn open<T: DeserializeOwned>(path: &Path, header: Option<&Value>) -> anyhow::Result<(Self, Vec<T>)> {
        let records = Self::read(path, header)?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let existing = std::fs::read(path).unwrap_or_default();
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("opening {}", path.display()))?;
        let complete = existing.iter().rposition(|&b| b == b'\n').map_or(0, |end| end + 1);
        if complete < existing.len() {
            file.set_len(complete as u64)?;
        }
        let mut journal = Self { path: path.to_path_buf(), file };
        if complete == 0
            && let Some(header) = header
        {
            journal.append(header)?;
        }
        Ok((journal, records))
    }

    /// Appends one record and returns once it is on disk.
    pub fn append(&mut self, record: &impl Serialize) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        self.file.write_all(&line).with_context(|| format!("writing {}", self.path.display()))?;
        self.file.sync_data().with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("osprey-client-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir.join("sub/run.jsonl")
    }

    #[test]
    fn records_survive_reopening_and_a_cut_line_is_dropped() {
        let path = scratch("resume");
        assert!(Journal::read::<Value>(&path, None).unwrap().is_empty(), "no journal, no records");
        let header = json!({"journal": 1, "task": "short"});
        {
            let (mut journal, records) = Journal::open::<Value>(&path, Some(&header)).unwrap();
            assert!(records.is_empty());
            journal.append(&json!({"item": "a"})).unwrap();
            journal.append(&json!({"item": "b"})).unwrap();
        }
        // A kill in the middle of a write leaves half a line.
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"item":"c"#).unwrap();
        drop(file);
        let read: Vec<Value> = Journal::read(&path, Some(&header)).unwrap();
        assert_eq!(read, [json!({"item": "a"}), json!({"item": "b"})]);

        let (mut journal, records) = Journal::open::<Value>(&path, Some(&header)).unwrap();
        assert_eq!(records.len(), 2);
        journal.append(&json!({"item": "c"})).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [header.to_string().as_str(), r#"{"item":"a"}"#, r#"{"item":"b"}"#, r#"{"item":"c"}"#]
        );
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn a_journal_for_other_options_or_a_broken_line_is_refused() {
        let path = scratch("refuse");
        let (mut journal, _) = Journal::open::<Value>(&path, Some(&json!({"task": "short"}))).unwrap();
        journal.append(&json!({"item": "a"})).unwrap();
        drop(journal);
        let err = Journal::read::<Value>(&path, Some(&json!({"task": "category"}))).unwrap_err();
        assert!(err.to_string().contains("written for other options"), "{err}");

        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"not json\n").unwrap();
        drop(file);
        let err = Journal::read::<Value>(&path, Some(&json!({"task": "short"}))).unwrap_err();
        assert!(err.to_string().contains("line 3 is not a journal record"), "{err}");
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }

    #[test]
    fn without_a_header_every_line_is_a_record() {
        #[derive(serde::Deserialize, Serialize, PartialEq, Debug)]
        struct Answer {
            id: String,
        }
        let path = scratch("plain");
        let (mut journal, records) = Journal::open::<Answer>(&path, None).unwrap();
        assert!(records.is_empty());
        journal.append(&Answer { id: "1".into() }).unwrap();
        drop(journal);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "{\"id\":\"1\"}\n");
        let (_, records) = Journal::open::<Answer>(&path, None).unwrap();
        assert_eq!(records, [Answer { id: "1".into() }]);
        let _ = std::fs::remove_dir_all(path.parent().unwrap().parent().unwrap());
    }
}
