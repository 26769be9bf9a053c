//! What a simulation knows and the server does not: which annotator model
//! each simulated agent follows, and which annotations are wrong and why.
//! The simulator writes it beside the training log; `aitl eval feedback
//! --truth` scores the Virtual Judge against it (precision and recall per
//! failure mode, false rejections of careful agents' annotations).

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// The annotator model of an agent who makes no mistakes.
pub const CAREFUL: &str = "careful";

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Truth {
    /// Agents whose model is not [`CAREFUL`].
    pub careless_agents: Vec<String>,
    /// Every wrong annotation id: the keys of `faults`.
    pub careless_annotations: HashSet<String>,
    /// Agent id → annotator model name (`careful`, `random`, `position_bias`, ...).
    #[serde(default)]
    pub agent_models: BTreeMap<String, String>,
    /// Wrong annotation id → the failure mode that made it wrong. An
    /// annotation is wrong when it differs from what a careful agent would
    /// have sent; a careless agent's annotation that happens to be right is
    /// not listed.
    #[serde(default)]
    pub faults: BTreeMap<String, String>,
    pub annotations: usize,
    pub by_kind: BTreeMap<String, usize>,
}

impl Truth {
    /// Records `annotation` as wrong because of `fault`.
    pub fn wrong(&mut self, annotation: &str, fault: &str) {
        self.careless_annotations.insert(annotation.to_string());
        self.faults.insert(annotation.to_string(), fault.to_string());
    }

    /// The failure mode of `annotation`, if it is wrong. Truth files
    /// written before failure modes were recorded name none: `unknown`.
    pub fn fault(&self, annotation: &str) -> Option<&str> {
        match self.faults.get(annotation) {
            Some(fault) => Some(fault),
            None => self.careless_annotations.contains(annotation).then_some("unknown"),
        }
    }
}
