//! The knowledge-gap queue: what agents had to find outside the knowledge
//! base, grouped by the object or external source they named, with how
//! often, by whom, and for which questions. The judge never filters these:
//! a gap is for people to fill, not a training label to doubt.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{
    journal::Journal,
    rows::{Feedback, Millis},
};

/// Reports made within this many seconds of seeing the interaction count as
/// immediate: the only ones the paper found reliable.
pub const IMMEDIATE_SECONDS: f64 = 60.0;
const EXAMPLES: usize = 3;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KnowledgeGap {
    /// Whose knowledge base lacks it; each tenant has its own gaps.
    #[serde(default = "crate::tenancy::default_tenant")]
    pub tenant: String,
    /// The knowledge id, else the external URI, else its title.
    pub key: String,
    pub knowledge_id: Option<String>,
    pub title: String,
    pub uri: String,
    pub reports: usize,
    pub immediate_reports: usize,
    /// Agents as the journal scopes them (`crate::tenancy::scoped`).
    pub agents: BTreeSet<String>,
    /// Questions it was missing for, first reported first.
    pub example_queries: Vec<String>,
    pub first_ms: Millis,
    pub last_ms: Millis,
}

/// All tenants' gaps, most reported first (ties by tenant and key).
pub fn knowledge_gaps(journal: &Journal) -> Vec<KnowledgeGap> {
    let mut gaps: BTreeMap<(String, String), KnowledgeGap> = BTreeMap::new();
    for a in &journal.annotations {
        let Feedback::Missing { knowledge_id, title, uri, .. } = &a.feedback else { continue };
        let key = knowledge_id.clone().unwrap_or_else(|| if uri.is_empty() { title.clone() } else { uri.clone() });
        let gap = gaps.entry((a.tenant.clone(), key.clone())).or_insert_with(|| KnowledgeGap {
            tenant: a.tenant.clone(),
            key,
            knowledge_id: knowledge_id.clone(),
            title: title.clone(),
            uri: uri.clone(),
            reports: 0,
            immediate_reports: 0,
            agents: BTreeSet::new(),
            example_queries: Vec::new(),
            first_ms: a.annotated_ms,
            last_ms: a.annotated_ms,
        });
        gap.reports += 1;
        gap.immediate_reports += usize::from(a.delay_seconds() <= IMMEDIATE_SECONDS);
        gap.agents.insert(a.agent_id.clone());
        gap.first_ms = gap.first_ms.min(a.annotated_ms);
        gap.last_ms = gap.last_ms.max(a.annotated_ms);
        if let Some(query) = journal.interactions.get(&a.interaction_id).map(|i| &i.query)
            && gap.example_queries.len() < EXAMPLES
            && !gap.example_queries.contains(query)
        {
            gap.example_queries.push(query.clone());
        }
    }
    let mut out: Vec<KnowledgeGap> = gaps.into_values().collect();
    out.sort_by(|a, b| b.reports.cmp(&a.reports).then_with(|| (&a.tenant, &a.key).cmp(&(&b.tenant, &b.key))));
    out
}

/// The queue as the worker last wrote it, for the server to serve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GapSnapshot {
    pub updated_ms: Millis,
    pub log_sequence: u64,
    pub gaps: Vec<KnowledgeGap>,
}

pub const SNAPSHOT_FILE: &str = "gaps.json";

/// Writes the snapshot beside the journal (temporary file, then rename, so
/// a reader never sees half of it).
pub fn write_snapshot(worker_dir: &std::path::Path, journal: &Journal) -> crate::error::Result<()> {
    let snapshot = GapSnapshot {
        updated_ms: super::rows::now_millis(),
        log_sequence: journal.last_sequence,
        gaps: knowledge_gaps(journal),
    };
    let path = worker_dir.join(SNAPSHOT_FILE);
    let partial = worker_dir.join(format!("{SNAPSHOT_FILE}.partial"));
    let fail = |e: std::io::Error| crate::error::Error::Internal(format!("{}: {e}", path.display()));
    std::fs::write(&partial, serde_json::to_vec(&snapshot).map_err(|e| crate::error::Error::Internal(e.to_string()))?)
        .map_err(fail)?;
    std::fs::rename(&partial, &path).map_err(fail)
}

/// The snapshot the worker last wrote; UNAVAILABLE when no worker has run.
pub fn read_snapshot(worker_dir: &std::path::Path) -> crate::error::Result<GapSnapshot> {
    let path = worker_dir.join(SNAPSHOT_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| crate::error::Error::Internal(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(crate::error::Error::Unavailable(
            "no knowledge-gap queue yet: run `aitl worker run` on this data dir first".into(),
        )),
        Err(e) => Err(crate::error::Error::Internal(format!("{}: {e}", path.display()))),
    }
}
