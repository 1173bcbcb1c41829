//! The raw-answer log: one JSON line per answered item, appended as answers arrive (the shared
//! client journal, without a header line), so an interrupted run resumes where it stopped and a
//! finished one is not asked again.

use std::collections::HashMap;
use std::path::Path;

use osprey_client::journal::Journal;
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
    journal: Journal,
}

impl AnswerLog {
    /// Opens (or creates) the log and reads the answers already in it. A last line cut short by an
    /// interruption is dropped; a repeated id keeps its first answer.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let (journal, logged) = Journal::open::<Answer>(path, None)?;
        let mut answers = HashMap::new();
        for answer in logged {
            answers.entry(answer.id.clone()).or_insert(answer);
        }
        Ok(Self { answers, journal })
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

    /// Appends one answer and syncs it to disk, unless the id is answered already.
    pub fn record(&mut self, answer: Answer) -> anyhow::Result<()> {
        if self.answers.contains_key(&answer.id) {
            return Ok(());
        }
        self.journal.append(&answer)?;
        self.answers.insert(answer.id.clone(), answer);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

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
