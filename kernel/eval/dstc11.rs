//! The DSTC11 Track 5 importer into the labelled data-set layout
//! ([`super::dataset`]), in the conversion every part of aitl uses
//! (../shared/data/README.md): knowledge objects from `knowledge.json`
//! (`kb::read_dstc11`); only `target: true` prefixes are queries, id
//! `d11v-{index:04d}`, query = last customer turn, context = the turns before
//! it, file order is time (the first 90% are history, the last 10% held out:
//! the same 1,916 and 213 queries as before the layout existed). The guard
//! set is every tenth history query (positions 9, 19, …: 191 queries),
//! spread over time; the simulator leaves them to the gate.

use std::path::Path;

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    proto::{ConversationTurn, Speaker},
};

// Callers that predate the layout name these here.
use super::dataset::LabelledSet;
pub use super::dataset::{LabelledQuery, Split, read_queries};

/// Every tenth history query is the guard's.
const GUARD_EVERY: usize = 10;

#[derive(Deserialize)]
struct Turn {
    speaker: String,
    text: String,
}

#[derive(Deserialize)]
struct Label {
    target: bool,
    #[serde(default)]
    knowledge: Vec<KnowledgeRef>,
    #[serde(default)]
    response: String,
}

#[derive(Deserialize)]
struct KnowledgeRef {
    domain: String,
    entity_id: u64,
    doc_type: String,
    doc_id: u64,
    sent_id: Option<u64>,
}

impl KnowledgeRef {
    fn id(&self) -> String {
        match (self.doc_type.as_str(), self.sent_id) {
            ("review", Some(sent)) => format!("{}:{}:review:{}:{}", self.domain, self.entity_id, self.doc_id, sent),
            _ => format!("{}:{}:{}:{}", self.domain, self.entity_id, self.doc_type, self.doc_id),
        }
    }
}

fn read<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).map_err(|e| Error::NotFound(format!("cannot read {}: {e}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))
}

/// The DSTC11 Track 5 folder `dir` (the one holding `knowledge.json` and
/// `val/`) as a labelled data set.
pub fn import(dir: &Path) -> Result<LabelledSet> {
    let mut queries = Vec::new();
    let logs: Vec<Vec<Turn>> = read(&dir.join("val/logs.json"))?;
    let labels: Vec<Label> = read(&dir.join("val/labels.json"))?;
    if logs.len() != labels.len() {
        return Err(Error::InvalidArgument(format!("{}: logs and labels differ in length", dir.display())));
    }
    for (position, (mut turns, label)) in logs.into_iter().zip(labels).enumerate() {
        if !label.target || label.knowledge.is_empty() {
            continue;
        }
        let Some(last) = turns.pop() else { continue };
        let context = turns
            .into_iter()
            .map(|t| ConversationTurn {
                speaker: if t.speaker == "U" { Speaker::Customer } else { Speaker::Agent } as i32,
                text: t.text,
            })
            .collect();
        let mut relevant: Vec<String> = Vec::with_capacity(label.knowledge.len());
        for id in label.knowledge.iter().map(KnowledgeRef::id) {
            if !relevant.contains(&id) {
                relevant.push(id);
            }
        }
        queries.push(LabelledQuery {
            id: format!("d11v-{position:04}"),
            index: queries.len(),
            query: last.text,
            context,
            relevant,
            judged_irrelevant: None,
            reference_reply: label.response,
        });
    }
    let history = queries.len() * 9 / 10;
    let guard = queries.iter().take(history).skip(GUARD_EVERY - 1).step_by(GUARD_EVERY).map(|q| q.id.clone()).collect();
    Ok(LabelledSet { corpus: crate::kb::read_dstc11(dir)?, queries, guard })
}
