//! The worker's durable state: `worker/journal.jsonl`, one [`Row`] per line,
//! appended in log order and fsynced before the log cursor moves past the
//! records it came from. On start the journal is read back whole; a torn
//! last line (a crash mid-append) is cut off, and the worker resumes after
//! the last log sequence the journal holds, whatever the cursor says, so a
//! crash between the journal's fsync and the cursor's commit neither loses
//! nor duplicates a row. Annotations are also keyed by id: one resubmitted
//! under a new sequence (the server accepts identical resubmissions) is
//! journaled once.

use std::{
    collections::{HashMap, HashSet},
    fs::{self, File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
};

use super::rows::{AnnotationRow, InteractionRow, Row, Verdict};
use crate::error::{Error, Result};

pub struct Journal {
    path: PathBuf,
    file: File,
    pub interactions: HashMap<String, InteractionRow>,
    /// In log order.
    pub annotations: Vec<AnnotationRow>,
    annotation_ids: HashSet<String>,
    /// Interaction id → positions in `annotations`.
    by_interaction: HashMap<String, Vec<usize>>,
    /// Staged rows' text, not yet durable.
    staged: String,
    pub verdicts: Vec<Verdict>,
    /// The last log sequence journaled.
    pub last_sequence: u64,
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Internal(format!("worker journal {}: {e}", path.display()))
}

impl Journal {
    pub fn open(dir: &Path) -> Result<Self> {
        fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        let path = dir.join("journal.jsonl");
        let mut journal = Journal {
            file: OpenOptions::new().create(true).read(true).append(true).open(&path).map_err(|e| io(&path, e))?,
            path,
            interactions: HashMap::new(),
            annotations: Vec::new(),
            annotation_ids: HashSet::new(),
            by_interaction: HashMap::new(),
            staged: String::new(),
            verdicts: Vec::new(),
            last_sequence: 0,
        };
        let mut good_bytes = 0u64;
        let mut reader = BufReader::new(File::open(&journal.path).map_err(|e| io(&journal.path, e))?);
        let mut line = String::new();
        loop {
            line.clear();
            let read = reader.read_line(&mut line).map_err(|e| io(&journal.path, e))?;
            // A line without its newline is a torn append.
            if read == 0 || !line.ends_with('\n') {
                break;
            }
            let row: Row = serde_json::from_str(&line).map_err(|e| {
                Error::Internal(format!("worker journal {} at byte {good_bytes}: {e}", journal.path.display()))
            })?;
            journal.apply(row);
            good_bytes += read as u64;
        }
        if journal.file.metadata().map_err(|e| io(&journal.path, e))?.len() > good_bytes {
            tracing::warn!(path = %journal.path.display(), good_bytes, "cutting a torn line off the worker journal");
            journal.file.set_len(good_bytes).map_err(|e| io(&journal.path, e))?;
        }
        Ok(journal)
    }

    fn apply(&mut self, row: Row) {
        match row {
            Row::Interaction(i) => {
                self.last_sequence = self.last_sequence.max(i.sequence);
                self.interactions.insert(i.interaction_id.clone(), i);
            }
            Row::Annotation(a) => {
                self.last_sequence = self.last_sequence.max(a.sequence);
                self.annotation_ids.insert(a.annotation_id.clone());
                self.by_interaction.entry(a.interaction_id.clone()).or_default().push(self.annotations.len());
                self.annotations.push(a);
            }
            Row::Verdict(v) => self.verdicts.push(v),
        }
    }

    pub fn has_annotation(&self, id: &str) -> bool {
        self.annotation_ids.contains(id)
    }

    /// The annotations on one interaction, in log order.
    pub fn annotations_on(&self, interaction_id: &str) -> impl Iterator<Item = &AnnotationRow> {
        self.by_interaction.get(interaction_id).into_iter().flatten().map(|&i| &self.annotations[i])
    }

    /// Applies `row` in memory and queues it for [`Journal::flush`]. If the
    /// flush then fails, memory is ahead of disk: the caller must stop
    /// (the worker exits, and a restart reads the journal back).
    pub fn stage(&mut self, row: Row) -> Result<()> {
        self.staged.push_str(&serde_json::to_string(&row).map_err(|e| Error::Internal(e.to_string()))?);
        self.staged.push('\n');
        self.apply(row);
        Ok(())
    }

    /// Makes the staged rows durable.
    pub fn flush(&mut self) -> Result<()> {
        if self.staged.is_empty() {
            return Ok(());
        }
        self.file.write_all(self.staged.as_bytes()).map_err(|e| io(&self.path, e))?;
        self.file.sync_data().map_err(|e| io(&self.path, e))?;
        self.staged.clear();
        Ok(())
    }

    /// The latest verdict of each (annotation, check).
    pub fn latest_verdicts(&self) -> HashMap<(&str, &str), &Verdict> {
        let mut latest = HashMap::new();
        for v in &self.verdicts {
            latest.insert((v.annotation_id.as_str(), v.check.as_str()), v);
        }
        latest
    }
}
