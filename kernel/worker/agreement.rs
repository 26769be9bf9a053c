//! Judge–human agreement on a labelled subset: how often the Virtual
//! Judge's accept/reject matches a person's (or a simulation's truth) on
//! the same annotations, as raw accuracy and as Cohen's kappa (Cohen, 1960,
//! "A coefficient of agreement for nominal scales"), which discounts the
//! agreement two raters would reach by chance given how often each rejects.
//! The paper reports judge–human agreement; kappa is what makes it
//! comparable across data sets with different shares of careless work.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Agreement {
    /// Annotations both rated.
    pub annotations: usize,
    pub both_reject: usize,
    pub judge_only_rejects: usize,
    pub human_only_rejects: usize,
    pub both_accept: usize,
    /// Share of annotations on which the two agree.
    pub accuracy: f64,
    /// (accuracy − chance agreement) / (1 − chance agreement); 0 when
    /// chance agreement is 1 (both raters gave one answer throughout).
    pub kappa: f64,
}

impl Agreement {
    /// From (judge rejects, human rejects) pairs, one per annotation.
    pub fn from_pairs(pairs: impl IntoIterator<Item = (bool, bool)>) -> Self {
        let mut a = Agreement::default();
        for (judge, human) in pairs {
            a.annotations += 1;
            match (judge, human) {
                (true, true) => a.both_reject += 1,
                (true, false) => a.judge_only_rejects += 1,
                (false, true) => a.human_only_rejects += 1,
                (false, false) => a.both_accept += 1,
            }
        }
        if a.annotations == 0 {
            return a;
        }
        let n = a.annotations as f64;
        a.accuracy = (a.both_reject + a.both_accept) as f64 / n;
        let judge_rejects = (a.both_reject + a.judge_only_rejects) as f64 / n;
        let human_rejects = (a.both_reject + a.human_only_rejects) as f64 / n;
        let chance = judge_rejects * human_rejects + (1.0 - judge_rejects) * (1.0 - human_rejects);
        a.kappa = if chance >= 1.0 { 0.0 } else { (a.accuracy - chance) / (1.0 - chance) };
        a
    }

    /// Agreement on the annotations `human` rated: `human` maps annotation
    /// id → the person accepted it; `rejected` holds the judge's rejections.
    /// Annotations the person did not rate are left out.
    pub fn on_subset<V>(rejected: &HashMap<String, V>, human: &BTreeMap<String, bool>) -> Self {
        Agreement::from_pairs(human.iter().map(|(id, accepted)| (rejected.contains_key(id), !accepted)))
    }
}

/// A file of human verdicts: a JSON object of annotation id → `true`
/// (accepted) or `false` (rejected), or → `"accept"` / `"reject"`.
pub fn read_human_verdicts(path: &std::path::Path) -> Result<BTreeMap<String, bool>> {
    let text = std::fs::read(path).map_err(|e| Error::NotFound(format!("{}: {e}", path.display())))?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(&text).map_err(|e| Error::InvalidArgument(format!("{}: {e}", path.display())))?;
    raw.into_iter()
        .map(|(id, v)| {
            let accepted = match &v {
                serde_json::Value::Bool(b) => *b,
                serde_json::Value::String(s) if s == "accept" || s == "accepted" => true,
                serde_json::Value::String(s) if s == "reject" || s == "rejected" => false,
                other => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: {id}: {other} is neither true/false nor \"accept\"/\"reject\"",
                        path.display()
                    )));
                }
            };
            Ok((id, accepted))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hand computation, ten annotations:
    ///
    /// |               | human rejects | human accepts |
    /// |---------------|---------------|---------------|
    /// | judge rejects | 3             | 1             |
    /// | judge accepts | 2             | 4             |
    ///
    /// accuracy = (3 + 4) / 10 = 0.7; the judge rejects 4/10, the human 5/10;
    /// chance agreement = 0.4·0.5 + 0.6·0.5 = 0.5; κ = (0.7 − 0.5) / (1 − 0.5) = 0.4.
    #[test]
    fn kappa_matches_the_hand_computation() {
        let pairs =
            [(true, true); 3].into_iter().chain([(true, false)]).chain([(false, true); 2]).chain([(false, false); 4]);
        let a = Agreement::from_pairs(pairs);
        assert_eq!((a.both_reject, a.judge_only_rejects, a.human_only_rejects, a.both_accept), (3, 1, 2, 4));
        assert!((a.accuracy - 0.7).abs() < 1e-12, "{a:?}");
        assert!((a.kappa - 0.4).abs() < 1e-12, "{a:?}");
    }

    #[test]
    fn perfect_and_chance_agreement() {
        // Perfect: κ = 1. Both raters always accepting: chance agreement 1, κ defined as 0.
        let a = Agreement::from_pairs([(true, true), (false, false)]);
        assert_eq!((a.accuracy, a.kappa), (1.0, 1.0));
        let a = Agreement::from_pairs([(false, false), (false, false)]);
        assert_eq!((a.accuracy, a.kappa), (1.0, 0.0));
        // Opposite on every one of a balanced pair: accuracy 0, chance ½, κ = −1.
        let a = Agreement::from_pairs([(true, false), (false, true)]);
        assert_eq!((a.accuracy, a.kappa), (0.0, -1.0));
    }

    #[test]
    fn a_subset_of_human_verdicts_is_scored_on_its_own_ids() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("human.json");
        std::fs::write(&path, r#"{"a": "reject", "b": true, "c": false}"#).unwrap();
        let human = read_human_verdicts(&path).unwrap();
        let rejected: HashMap<String, Vec<String>> =
            [("a".to_string(), vec![]), ("z".to_string(), vec![])].into_iter().collect();
        let a = Agreement::on_subset(&rejected, &human);
        // a: both reject; b: both accept; c: only the human rejects; z is not rated.
        assert_eq!((a.annotations, a.both_reject, a.both_accept, a.human_only_rejects), (3, 1, 1, 1));
        std::fs::write(&path, r#"{"a": 3}"#).unwrap();
        assert!(read_human_verdicts(&path).is_err());
    }
}
