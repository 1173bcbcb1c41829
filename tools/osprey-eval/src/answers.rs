//! The raw-answer log: one JSON line per answered item, appended as answers arrive, so an
//! interrupted run resumes where it stopped and a finished one is not asked again.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// The item's id within the protocol (stable across runs).
    pub id: String,
    /// The question asked (the task name for Describe tasks).
    pub question: String,
    /// The model output before any post-processing.
    pub raw: String,
    /// The gateway's post-processed text.
    pub text: String,
}

pub struct AnswerLog {
    answers: HashMap<String, Answer>,
    file: std::fs::File,
}

impl AnswerLog {
    /// Opens (or creates) the log and reads the answers already in it. A last line cut short by an
    /// interruption is dropped; a repeated id keeps its first answer.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let mut text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("{}", path.display())),
        };
        if !text.is_empty() && !text.ends_with('\n') {
            text.truncate(text.rfind('\n').map_or(0, |i| i + 1));
            std::fs::write(path, &text).with_context(|| format!("{}", path.display()))?;
        }
        let mut answers = HashMap::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let answer: Answer =
                serde_json::from_str(line).with_context(|| format!("{}: line {}", path.display(), i + 1))?;
            answers.entry(answer.id.clone()).or_insert(answer);
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("{}", path.display()))?;
        Ok(Self { answers, file })
    }

    pub fn get(&self, id: &str) -> Option<&Answer> {
        self.answers.get(id)
    }

    pub fn contains(&self, id: &str) -> bool {
        self.answers.contains_key(id)
    }

    pub fn len(&self) -> usize {
        self.answers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.answers.is_empty()
    }

    /// Appends one answer and flushes it, unless the id is answered already.
    pub fn record(&mut self, answer: Answer) -> anyhow::Result<()> {
        if self.answers.contains_key(&answer.id) {
            return Ok(());
        }
        let mut line = serde_json::to_string(&answer)?;
        line.push('\n');
        self.file.write_all(line.as_bytes())?;
        self.file.flush()?;
        self.answers.insert(answer.id.clone(), answer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(id: &str) -> Answer {
        Answer { id: id.into(), question: "q".into(), raw: "r".into(), text: "t".into() }
    }

    #[test]
    fn resumes_and_drops_a_cut_line() {
        let dir = std::env::temp_dir().join(format!("osprey-eval-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("answers.jsonl");
        let _ = std::fs::remove_file(&path);
        {
            let mut log = AnswerLog::open(&path).unwrap();
            log.record(answer("a")).unwrap();
            log.record(answer("b")).unwrap();
            log.record(answer("a")).unwrap();
        }
        // An interrupted write leaves half a line.
        let mut f = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"c\",\"quest").unwrap();
        drop(f);
        let mut log = AnswerLog::open(&path).unwrap();
        assert_eq!(log.len(), 2);
        assert!(log.contains("a") && log.contains("b") && !log.contains("c"));
        log.record(answer("c")).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
