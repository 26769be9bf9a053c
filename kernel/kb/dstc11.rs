//! Importer for DSTC11 Track 5 (`knowledge.json`), with the id scheme that
//! evaluations and the training log rely on (see ../shared/data/README.md):
//! FAQ `{domain}:{entity_id}:faq:{doc_id}`, review sentence
//! `{domain}:{entity_id}:review:{doc_id}:{sent_id}`.

use std::{collections::BTreeMap, path::Path};

use serde::Deserialize;

use crate::{
    error::{Error, Result},
    proto::{KnowledgeKind, KnowledgeObject},
};

#[derive(Deserialize)]
struct Entity {
    name: String,
    #[serde(default)]
    faqs: BTreeMap<String, Faq>,
    #[serde(default)]
    reviews: BTreeMap<String, Review>,
}

#[derive(Deserialize)]
struct Faq {
    question: String,
    answer: String,
}

#[derive(Deserialize)]
struct Review {
    traveler_type: String,
    sentences: BTreeMap<String, String>,
}

/// Numeric ids sort as numbers so objects come out in the data set's order.
fn numeric_order<V>(map: BTreeMap<String, V>) -> Vec<(String, V)> {
    let mut entries: Vec<_> = map.into_iter().collect();
    entries.sort_by_key(|(k, _)| (k.parse::<u64>().unwrap_or(u64::MAX), k.clone()));
    entries
}

/// Reads `dir/knowledge.json` into knowledge objects.
pub fn read_dstc11(dir: &Path) -> Result<Vec<KnowledgeObject>> {
    let path = dir.join("knowledge.json");
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::NotFound(format!("cannot read DSTC11 knowledge at {}: {e}", path.display())))?;
    let domains: BTreeMap<String, BTreeMap<String, Entity>> = serde_json::from_str(&text)
        .map_err(|e| Error::InvalidArgument(format!("{} is not DSTC11 knowledge.json: {e}", path.display())))?;
    let mut objects = Vec::new();
    for (domain, entities) in domains {
        for (entity_id, Entity { name, faqs, reviews }) in numeric_order(entities) {
            let metadata: std::collections::HashMap<String, String> =
                [("domain", domain.as_str()), ("entity_id", entity_id.as_str()), ("entity_name", name.as_str())]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            let object = |id: String, kind: KnowledgeKind, text: String| KnowledgeObject {
                id,
                kind: kind as i32,
                title: name.clone(),
                text,
                metadata: metadata.clone(),
                ..Default::default()
            };
            for (doc_id, faq) in numeric_order(faqs) {
                let text = format!("{name}. Q: {} A: {}", faq.question, faq.answer);
                objects.push(object(format!("{domain}:{entity_id}:faq:{doc_id}"), KnowledgeKind::Faq, text));
            }
            for (doc_id, review) in numeric_order(reviews) {
                for (sent_id, sentence) in numeric_order(review.sentences) {
                    let text = format!("{name} (review by {}): {sentence}", review.traveler_type);
                    let id = format!("{domain}:{entity_id}:review:{doc_id}:{sent_id}");
                    objects.push(object(id, KnowledgeKind::Case, text));
                }
            }
        }
    }
    Ok(objects)
}
