//! DSTC11 Track 5 queries with relevance labels, in the conversion every
//! part of aitl uses (../shared/data/README.md): only `target: true`
//! prefixes, id `d11v-{index:04d}`, query = last customer turn, context = the
//! turns before it, file order is time; the first 90% are history.

use std::path::Path;

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    proto::{ConversationTurn, Speaker},
};

#[derive(Debug, Clone)]
pub struct LabelledQuery {
    pub id: String,
    /// Position in logs.json (time order).
    pub index: usize,
    pub query: String,
    pub context: Vec<ConversationTurn>,
    pub relevant: Vec<String>,
    pub reference_reply: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// The first 90% of queries: what agents annotate.
    History,
    /// The last 10%: held out for evaluation.
    Eval,
    All,
}

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

/// Queries of `split` from `dir` (the folder holding `val/`).
pub fn read_queries(dir: &Path, split: Split) -> Result<Vec<LabelledQuery>> {
    let logs: Vec<Vec<Turn>> = read(&dir.join("val/logs.json"))?;
    let labels: Vec<Label> = read(&dir.join("val/labels.json"))?;
    if logs.len() != labels.len() {
        return Err(Error::InvalidArgument(format!("{}: logs and labels differ in length", dir.display())));
    }
    let mut queries = Vec::new();
    for (index, (mut turns, label)) in logs.into_iter().zip(labels).enumerate() {
        if !label.target {
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
        queries.push(LabelledQuery {
            id: format!("d11v-{index:04}"),
            index,
            query: last.text,
            context,
            relevant: label.knowledge.iter().map(KnowledgeRef::id).collect(),
            reference_reply: label.response,
        });
    }
    let history = queries.len() * 9 / 10;
    Ok(match split {
        Split::History => queries.into_iter().take(history).collect(),
        Split::Eval => queries.into_iter().skip(history).collect(),
        Split::All => queries,
    })
}
