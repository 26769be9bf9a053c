//! `aitl ingest FILE.jsonl`: one knowledge object per line,
//! `{"id", "kind": "policy"|"case"|"faq"|"other", "title", "text", "metadata": {..}}`.

use std::{collections::HashMap, io::BufRead, path::Path};

use serde::{Deserialize, de::DeserializeOwned};

use crate::{
    error::{Error, Result},
    proto::{KnowledgeKind, KnowledgeObject},
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    id: String,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    title: String,
    text: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
}

pub fn parse_kind(kind: &str) -> Option<KnowledgeKind> {
    match kind.to_ascii_lowercase().as_str() {
        "policy" => Some(KnowledgeKind::Policy),
        "case" => Some(KnowledgeKind::Case),
        "faq" => Some(KnowledgeKind::Faq),
        "other" => Some(KnowledgeKind::Other),
        _ => None,
    }
}

/// Every non-blank line of a JSON-lines file, parsed, with its line number
/// (from 1); errors name the file and the line.
pub fn read_numbered<T: DeserializeOwned>(path: &Path) -> Result<Vec<(usize, T)>> {
    let file =
        std::fs::File::open(path).map_err(|e| Error::NotFound(format!("cannot open {}: {e}", path.display())))?;
    let mut rows = Vec::new();
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = || format!("{}:{}", path.display(), n + 1);
        let line = line.map_err(|e| Error::InvalidArgument(format!("{}: {e}", at())))?;
        if line.trim().is_empty() {
            continue;
        }
        rows.push((n + 1, serde_json::from_str(&line).map_err(|e| Error::InvalidArgument(format!("{}: {e}", at())))?));
    }
    Ok(rows)
}

/// [`read_numbered`] without the line numbers.
pub fn read_lines<T: DeserializeOwned>(path: &Path) -> Result<Vec<T>> {
    Ok(read_numbered(path)?.into_iter().map(|(_, row)| row).collect())
}

pub fn read_jsonl(path: &Path) -> Result<Vec<KnowledgeObject>> {
    read_numbered::<Line>(path)?
        .into_iter()
        .map(|(n, parsed)| {
            let kind = match parsed.kind.as_deref() {
                None => KnowledgeKind::Other,
                Some(k) => parse_kind(k).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}:{n}: kind {k:?} is not one of policy, case, faq, other",
                        path.display()
                    ))
                })?,
            };
            Ok(KnowledgeObject {
                id: parsed.id,
                kind: kind as i32,
                title: parsed.title,
                text: parsed.text,
                metadata: parsed.metadata,
                ..Default::default()
            })
        })
        .collect()
}
