//! The flywheel worker (`aitl worker`): a separate process that follows the
//! training log the server writes, joins each annotation to the interaction
//! it is about, runs the Virtual Judge's checks, and keeps the result in its
//! journal; from the journal it builds versioned training sets and the
//! knowledge-gap queue. It reads the log through a durable named cursor and
//! is idempotent by annotation id, so a crash or restart processes each
//! annotation exactly once (see `journal.rs` for how).

pub mod ablation;
pub mod agreement;
pub mod annotators;
pub mod datasets;
pub mod demo;
pub mod evaluate;
pub mod gaps;
pub mod generator_gate;
pub mod journal;
pub mod judge;
pub mod knowledge;
pub mod llm_judge;
pub mod round;
pub mod rows;
pub mod simulate;
pub mod stats;
pub mod text;
pub mod train_bert;
pub mod train_generator;
pub mod train_llama;
pub mod train_ranker;
pub mod train_retriever;
pub mod truth;
pub mod weights;

use std::{ops::ControlFlow, path::Path};

use datasets::KnowledgeSource;
use journal::Journal;
use judge::{Judge, JudgeOptions};
use llm_judge::LlmJudge;
use rows::{AnnotationRow, InteractionRow, Row};

use crate::{
    error::Result,
    proto::log_record::Body,
    trainlog::{Cursor, LogReader},
};

/// The cursor the worker reads the log with.
pub const CURSOR: &str = "worker";
/// Log records per journal append (one fsync, then one cursor commit).
const BATCH: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunReport {
    pub records: u64,
    pub interactions: u64,
    pub annotations: u64,
    /// Annotations already journaled (a resubmission, or a replay after a crash).
    pub duplicates: u64,
    pub verdicts: u64,
    pub failed_verdicts: u64,
    /// The log sequence the worker will read next.
    pub next_sequence: u64,
}

pub struct Worker {
    journal: Journal,
    judge: Judge,
    cursor: Cursor,
    dir: std::path::PathBuf,
    /// The language-model checks and the knowledge they read, when switched on.
    llm: Option<(LlmJudge, Box<dyn KnowledgeSource>, f64)>,
}

impl Worker {
    /// Opens the journal in `worker_dir` and the cursor beside the log in `log_dir`.
    pub fn open(worker_dir: &Path, log_dir: &Path, judge: JudgeOptions) -> Result<Self> {
        let journal = Journal::open(worker_dir)?;
        let mut judge = Judge::new(judge);
        judge.replay(&journal);
        Ok(Worker { journal, judge, cursor: Cursor::open(log_dir, CURSOR)?, dir: worker_dir.to_owned(), llm: None })
    }

    /// Adds the language-model checks (`confidence`: see [`llm_judge`]).
    pub fn with_llm_judge(mut self, judge: LlmJudge, knowledge: Box<dyn KnowledgeSource>, confidence: f64) -> Self {
        self.llm = Some((judge, knowledge, confidence));
        self
    }

    pub fn journal(&self) -> &Journal {
        &self.journal
    }

    /// Processes every record the log holds beyond what is journaled.
    pub fn run_once(&mut self, log_dir: &Path) -> Result<RunReport> {
        let start = self.cursor.next_sequence().max(self.journal.last_sequence + 1);
        let mut report = RunReport { next_sequence: start, ..RunReport::default() };
        let mut pending: Vec<(u64, Body)> = Vec::new();
        let mut failure = None;
        LogReader::new(log_dir).read_from(start, |record| {
            if let Some(body) = record.body {
                pending.push((record.sequence, body));
            }
            report.records += 1;
            report.next_sequence = record.sequence + 1;
            if pending.len() >= BATCH {
                if let Err(e) = self.process(std::mem::take(&mut pending), report.next_sequence, &mut report) {
                    failure = Some(e);
                    return ControlFlow::Break(());
                }
            }
            ControlFlow::Continue(())
        })?;
        if let Some(e) = failure {
            return Err(e);
        }
        self.process(pending, report.next_sequence, &mut report)?;
        if report.annotations > 0 || !self.dir.join(gaps::SNAPSHOT_FILE).exists() {
            gaps::write_snapshot(&self.dir, &self.journal)?;
        }
        Ok(report)
    }

    fn process(&mut self, records: Vec<(u64, Body)>, next_sequence: u64, report: &mut RunReport) -> Result<()> {
        for (sequence, body) in records {
            match body {
                Body::Interaction(record) => {
                    report.interactions += 1;
                    self.journal.stage(Row::Interaction(InteractionRow::from_record(sequence, &record)))?;
                }
                Body::Annotation(record) => {
                    let Some(row) = AnnotationRow::from_record(sequence, &record) else { continue };
                    if self.journal.has_annotation(&row.annotation_id) {
                        report.duplicates += 1;
                        continue;
                    }
                    report.annotations += 1;
                    let mut verdicts = self.judge.judge(&row, &self.journal);
                    if let (Some((llm, knowledge, confidence)), Some(interaction)) =
                        (&self.llm, self.journal.interactions.get(&row.interaction_id))
                    {
                        verdicts.extend(llm.judge(&row, interaction, knowledge.as_ref(), *confidence)?);
                    }
                    report.verdicts += verdicts.len() as u64;
                    report.failed_verdicts += verdicts.iter().filter(|v| !v.pass).count() as u64;
                    self.journal.stage(Row::Annotation(row))?;
                    for v in verdicts {
                        self.journal.stage(Row::Verdict(v))?;
                    }
                }
            }
        }
        self.journal.flush()?;
        self.cursor.commit(next_sequence)?;
        Ok(())
    }
}
