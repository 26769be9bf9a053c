//! Each check on a small hand-built journal: it catches the failure mode it
//! is aimed at and passes careful agents, including careful agents on
//! questions with many relevant objects each, which the fixed counts of
//! the old `uniform_labels` (5+ objects all relevant) and `agent_drift`
//! (a 0.3 change of the relevant share between the first and latest 40
//! judgements) rejected.

use std::collections::{BTreeMap, HashMap};

use super::*;
use crate::worker::rows::{CandidateRow, Kind, Row, ShownRow};

/// SplitMix64, so fixtures are the same on every run.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// `k` distinct positions of `0..n`.
    fn choose(&mut self, k: usize, n: usize) -> Vec<usize> {
        let mut all: Vec<usize> = (0..n).collect();
        for i in 0..n {
            let j = i + (self.next() as usize) % (n - i);
            all.swap(i, j);
        }
        all.truncate(k);
        all
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    journal: Journal,
    judge: Judge,
    clock: i64,
}

impl Fixture {
    fn new(options: JudgeOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let journal = Journal::open(dir.path()).unwrap();
        Fixture { _dir: dir, journal, judge: Judge::new(options), clock: 0 }
    }

    /// A Rank interaction showing `shown` in order (rank 1 first).
    fn rank(&mut self, id: &str, case: &str, query: &str, shown: &[String]) {
        let row = InteractionRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            interaction_id: id.into(),
            kind: Kind::Rank,
            created_ms: self.clock,
            agent_id: String::new(),
            case_id: case.into(),
            query: query.into(),
            context: Vec::new(),
            shown: shown
                .iter()
                .enumerate()
                .map(|(i, k)| ShownRow { knowledge_id: k.clone(), version: 1, rank: i as u32 + 1 })
                .collect(),
            candidates: Vec::new(),
            system_prompt: String::new(),
            models: BTreeMap::new(),
        };
        self.journal.stage(Row::Interaction(row)).unwrap();
    }

    /// A Generate interaction with two candidates, `{id}/c0` first.
    fn generate(&mut self, id: &str) {
        let candidate = |n: usize, text: &str| CandidateRow {
            candidate_id: format!("{id}/c{n}"),
            text: text.into(),
            cited: Vec::new(),
            model_version: "m@1".into(),
        };
        let row = InteractionRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            interaction_id: id.into(),
            kind: Kind::Generate,
            created_ms: self.clock,
            agent_id: String::new(),
            case_id: id.into(),
            query: "Is breakfast included?".into(),
            context: Vec::new(),
            shown: Vec::new(),
            candidates: vec![
                candidate(0, "Breakfast is included from seven to ten."),
                candidate(1, "Yes, a continental breakfast comes with every room."),
            ],
            system_prompt: String::new(),
            models: BTreeMap::new(),
        };
        self.journal.stage(Row::Interaction(row)).unwrap();
    }

    /// Judges `feedback` by `agent` on `interaction`, `delay_s` after it was shown; journals both.
    fn annotate(&mut self, id: &str, interaction: &str, agent: &str, delay_s: f64, feedback: Feedback) -> Vec<Verdict> {
        self.clock += 60_000;
        let a = AnnotationRow {
            tenant: crate::tenancy::DEFAULT_TENANT.into(),
            sequence: 0,
            annotation_id: id.into(),
            interaction_id: interaction.into(),
            agent_id: agent.into(),
            case_id: String::new(),
            shown_ms: self.clock,
            annotated_ms: self.clock + (delay_s * 1000.0) as i64,
            feedback,
        };
        let verdicts = self.judge.judge(&a, &self.journal);
        self.journal.stage(Row::Annotation(a)).unwrap();
        for v in &verdicts {
            self.journal.stage(Row::Verdict(v.clone())).unwrap();
        }
        verdicts
    }

    /// A relevance check of the shown objects of `interaction`, `relevant[i]` for the i-th shown.
    fn label(&mut self, id: &str, interaction: &str, agent: &str, relevant: &[bool]) -> Vec<Verdict> {
        let shown: Vec<String> =
            self.journal.interactions[interaction].shown.iter().map(|s| s.knowledge_id.clone()).collect();
        let judgements = shown
            .into_iter()
            .zip(relevant)
            .map(|(k, &r)| (k, if r { Label::Relevant } else { Label::Irrelevant }))
            .collect();
        self.annotate(id, interaction, agent, 20.0, Feedback::Relevance { judgements })
    }

    /// The latest verdict of `check` on each annotation: pass or fail.
    fn outcomes(&self, check: &str) -> HashMap<String, bool> {
        self.journal
            .latest_verdicts()
            .into_iter()
            .filter(|((_, c), _)| *c == check)
            .map(|((a, _), v)| (a.to_string(), v.pass))
            .collect()
    }

    /// Annotations of `agent` that `check` failed, and that it judged.
    fn failed_of(&self, check: &str, agent: &str) -> (usize, usize) {
        let outcomes = self.outcomes(check);
        let mine: Vec<bool> = self
            .journal
            .annotations
            .iter()
            .filter(|a| a.agent_id == agent)
            .filter_map(|a| outcomes.get(&a.annotation_id).copied())
            .collect();
        (mine.iter().filter(|p| !**p).count(), mine.len())
    }
}

fn objects(question: usize, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("q{question}-k{i}")).collect()
}

/// Labels with `k` of `n` relevant at the given positions.
fn relevant_at(positions: &[usize], n: usize) -> Vec<bool> {
    (0..n).map(|i| positions.contains(&i)).collect()
}

/// Careful agents on a data set whose later questions have many relevant
/// objects (6 of 8, every third one all 8), earlier ones few (2 of 8).
/// Round robin over `agents`; `careless` (if any) answers by `label_of`.
fn many_relevant(
    options: JudgeOptions,
    agents: &[&str],
    careless: Option<(&str, &dyn Fn(usize, &[bool]) -> Vec<bool>)>,
) -> Fixture {
    let mut f = Fixture::new(options);
    let mut dice = Dice(7);
    let questions = 200;
    let everyone: Vec<&str> = agents.iter().copied().chain(careless.map(|(a, _)| a)).collect();
    for q in 0..questions {
        let id = format!("r{q}");
        f.rank(&id, &format!("case{q}"), &format!("question number {q}"), &objects(q, 8));
        let truth = if q < 60 {
            relevant_at(&dice.choose(2, 8), 8)
        } else if q % 3 == 0 {
            vec![true; 8]
        } else {
            relevant_at(&dice.choose(6, 8), 8)
        };
        let agent = everyone[q % everyone.len()];
        let labels = match careless {
            Some((who, answer)) if who == agent => answer(q, &truth),
            _ => truth,
        };
        f.label(&format!("a{q}"), &id, agent, &labels);
    }
    f
}

#[test]
fn careful_agents_on_questions_with_many_relevant_objects_pass() {
    let agents = ["ann", "bob", "cat", "dan"];
    let f = many_relevant(JudgeOptions::default(), &agents, None);
    // What the old fixed counts saw: all-relevant checks of 8 objects …
    let uniform = f
        .journal
        .annotations
        .iter()
        .filter(|a| matches!(&a.feedback, Feedback::Relevance { judgements } if judgements.iter().all(|(_, l)| *l == Label::Relevant)))
        .count();
    assert!(uniform >= 40, "{uniform} all-relevant checks: each one the old uniform_labels rejected");
    // … and, for every agent, a change of far more than 0.3 between its first and latest 40 judgements.
    for agent in agents {
        let labels: Vec<bool> = f
            .journal
            .annotations
            .iter()
            .filter(|a| a.agent_id == agent)
            .flat_map(|a| match &a.feedback {
                Feedback::Relevance { judgements } => judgements.iter().map(|(_, l)| *l == Label::Relevant).collect(),
                _ => Vec::new(),
            })
            .collect();
        let share = |s: &[bool]| s.iter().filter(|r| **r).count() as f64 / s.len() as f64;
        let change = share(&labels[labels.len() - 40..]) - share(&labels[..40]);
        assert!(change > 0.3, "{agent}: {change}: the old agent_drift rejected this agent");
    }
    for check in ["uniform_labels", "agent_drift", "position_bias", "fatigue", "consistency"] {
        let outcomes = f.outcomes(check);
        let failed: Vec<&String> = outcomes.iter().filter(|(_, pass)| !**pass).map(|(id, _)| id).collect();
        assert!(failed.is_empty(), "{check} failed careful annotations {failed:?}");
    }
    // The checks did run.
    assert!(f.outcomes("uniform_labels").len() >= uniform);
    assert!(f.outcomes("agent_drift").len() > 50);
    assert!(f.outcomes("position_bias").len() > 100);
}

#[test]
fn an_agent_who_labels_everything_relevant_fails_uniform_labels() {
    let always = |_: usize, truth: &[bool]| vec![true; truth.len()];
    let f = many_relevant(JudgeOptions::default(), &["ann", "bob", "cat", "dan"], Some(("eve", &always)));
    let (failed, judged) = f.failed_of("uniform_labels", "eve");
    // All of eve's 40 checks are all-relevant; those of the questions that
    // are not (two thirds of them from question 60 on, all before) fail,
    // once her rate stands out, together with the earlier ones kept pending.
    assert_eq!(judged, 40);
    assert!(failed >= 36, "eve: {failed} of {judged} failed");
    for careful in ["ann", "bob", "cat", "dan"] {
        assert_eq!(f.failed_of("uniform_labels", careful).0, 0, "{careful}");
    }
    // A single all-relevant check without history is not evidence.
    let mut g = Fixture::new(JudgeOptions::default());
    g.rank("r", "c", "q", &objects(0, 5));
    let verdicts = g.label("u", "r", "x", &[true; 5]);
    assert!(verdicts.iter().any(|v| v.check == "uniform_labels" && v.pass), "{verdicts:?}");
}

#[test]
fn top_positions_labelled_relevant_regardless_fail_position_bias() {
    let mut f = Fixture::new(JudgeOptions::default());
    let mut dice = Dice(11);
    let agents = ["ann", "bob", "cat", "pat"];
    for q in 0..120 {
        let id = format!("r{q}");
        f.rank(&id, &format!("case{q}"), &format!("question {q}"), &objects(q, 8));
        let truth = relevant_at(&dice.choose(1 + q % 3, 8), 8);
        let agent = agents[q % 4];
        let labels = if agent == "pat" { relevant_at(&[0, 1], 8) } else { truth };
        f.label(&format!("a{q}"), &id, agent, &labels);
    }
    let (failed, judged) = f.failed_of("position_bias", "pat");
    assert_eq!((failed, judged), (30, 30), "every one of pat's checks, the early ones once her rate stood out");
    for careful in ["ann", "bob", "cat"] {
        assert_eq!(f.failed_of("position_bias", careful).0, 0, "{careful}");
    }
}

fn preference(interaction: &str, first: bool) -> Feedback {
    let (preferred, other) = if first { ("c0", "c1") } else { ("c1", "c0") };
    Feedback::Preference {
        preferred: format!("{interaction}/{preferred}"),
        other: format!("{interaction}/{other}"),
        strength: 2,
        rationale: format!("answers the breakfast question of {interaction} precisely"),
    }
}

#[test]
fn always_preferring_the_first_candidate_fails_first_candidate() {
    let mut f = Fixture::new(JudgeOptions::default());
    let agents = ["ann", "bob", "cal"];
    for g in 0..60 {
        let id = format!("g{g}");
        f.generate(&id);
        let agent = agents[g % 3];
        // Careful agents pick the first candidate every other time; cal always.
        let first = agent == "cal" || (g / 3) % 2 == 0;
        f.annotate(&format!("p{g}"), &id, agent, 12.0, preference(&id, first));
    }
    // cal: 20 decisions, all first: P = ½¹⁰ < 0.001 from the 10th on; the first nine fail late.
    assert_eq!(f.failed_of("first_candidate", "cal"), (20, 20));
    for careful in ["ann", "bob"] {
        let (failed, judged) = f.failed_of("first_candidate", careful);
        assert_eq!(failed, 0, "{careful}");
        assert!(judged >= 5, "{careful}: the test ran on {judged}");
    }
    // The other checks have nothing against careful preferences.
    assert!(f.outcomes("rationale").values().all(|p| *p));
}

#[test]
fn a_preference_contradicted_by_the_adoption_fails() {
    let mut f = Fixture::new(JudgeOptions::default());
    f.generate("g");
    f.annotate("p", "g", "ann", 12.0, preference("g", true));
    let sent = Feedback::Adoption {
        candidate_id: "g/c1".into(),
        decision: Decision::AdoptedAsIs,
        sent_text: String::new(),
        rationale: String::new(),
    };
    let verdicts = f.annotate("d", "g", "ann", 30.0, sent);
    let check: Vec<(&str, bool)> = verdicts
        .iter()
        .filter(|v| v.check == "preference_vs_adoption")
        .map(|v| (v.annotation_id.as_str(), v.pass))
        .collect();
    assert_eq!(check, [("p", false)]);
}

#[test]
fn boilerplate_rationales_fail_also_on_adoptions_as_is() {
    let mut f = Fixture::new(JudgeOptions::default());
    f.generate("g");
    let adopt = |rationale: &str| Feedback::Adoption {
        candidate_id: "g/c0".into(),
        decision: Decision::AdoptedAsIs,
        sent_text: String::new(),
        rationale: rationale.into(),
    };
    let rationale = |v: Vec<Verdict>| v.into_iter().find(|v| v.check == "rationale").map(|v| v.pass);
    assert_eq!(rationale(f.annotate("a", "g", "x", 9.0, adopt("fine"))), Some(false));
    // An unchanged adoption without a rationale needs none.
    assert_eq!(rationale(f.annotate("b", "g", "x", 9.0, adopt(""))), None);
}

#[test]
fn a_relevant_share_that_jumps_alone_fails_agent_drift() {
    let mut f = Fixture::new(JudgeOptions::default());
    let mut dice = Dice(5);
    let agents = ["ann", "bob", "cat", "zed"];
    for q in 0..160 {
        let id = format!("r{q}");
        f.rank(&id, &format!("case{q}"), &format!("question {q}"), &objects(q, 8));
        let agent = agents[q % 4];
        // zed labels like the others for 20 checks, then 6 of 8 relevant.
        let k = if agent == "zed" && q >= 80 { 6 } else { 2 };
        let labels = relevant_at(&dice.choose(k, 8), 8);
        f.label(&format!("a{q}"), &id, agent, &labels);
    }
    let (failed, judged) = f.failed_of("agent_drift", "zed");
    assert!(judged >= 20 && failed >= 10, "zed: {failed} of {judged}");
    for careful in ["ann", "bob", "cat"] {
        assert_eq!(f.failed_of("agent_drift", careful).0, 0, "{careful}");
    }
}

#[test]
fn rising_default_selections_fail_fatigue() {
    let mut f = Fixture::new(JudgeOptions::default());
    let mut dice = Dice(9);
    let agents = ["ann", "bob", "tim"];
    for q in 0..150 {
        let id = format!("r{q}");
        f.rank(&id, &format!("case{q}"), &format!("question {q}"), &objects(q, 6));
        let agent = agents[q % 3];
        let truth = relevant_at(&dice.choose(1 + q % 2, 6), 6);
        // tim tires after 25 checks: from then on everything relevant.
        let labels = if agent == "tim" && q >= 75 { vec![true; 6] } else { truth };
        f.label(&format!("a{q}"), &id, agent, &labels);
    }
    let outcomes = f.outcomes("fatigue");
    // tim answers questions 2, 5, 8, …
    let tired: Vec<bool> = (77..150).step_by(3).filter_map(|q| outcomes.get(&format!("a{q}")).copied()).collect();
    let failed = tired.iter().filter(|p| !**p).count();
    assert!(failed >= 15, "{failed} of tim's {} tired checks failed", tired.len());
    // Before he tired, nothing.
    assert!((2..75).step_by(3).all(|q| outcomes.get(&format!("a{q}")) != Some(&false)));
    for careful in ["ann", "bob"] {
        assert_eq!(f.failed_of("fatigue", careful).0, 0, "{careful}");
    }
}

#[test]
fn labels_against_the_majority_on_similar_questions_fail_consistency() {
    let mut f = Fixture::new(JudgeOptions::default());
    let shown = vec!["hotel-parking".to_string(), "hotel-wifi".to_string()];
    // Three agents on the same case, and one on a question worded the same in another case.
    for (n, agent) in ["ann", "bob", "cat"].iter().enumerate() {
        f.rank(&format!("r{n}"), "case1", "Is parking free at the hotel?", &shown);
        f.label(&format!("a{n}"), &format!("r{n}"), agent, &[true, false]);
    }
    f.rank("same", "case2", "Is parking free at the hotel?", &shown);
    let verdicts = f.label("mislabel", "same", "eve", &[false, true]);
    let consistency = verdicts.iter().find(|v| v.check == "consistency").unwrap();
    assert!(!consistency.pass, "{consistency:?}");
    f.rank("again", "case1", "Is parking free at the hotel?", &shown);
    let verdicts = f.label("agrees", "again", "dan", &[true, false]);
    assert!(verdicts.iter().find(|v| v.check == "consistency").unwrap().pass);
    // A question about something else is not similar: no evidence, no verdict.
    f.rank("other", "case3", "Do you allow dogs in the rooms?", &shown);
    let verdicts = f.label("unrelated", "other", "eve", &[false, true]);
    assert!(verdicts.iter().all(|v| v.check != "consistency"), "{verdicts:?}");
}

#[test]
fn all_relevant_where_earlier_labels_say_otherwise_fails_uniform_labels() {
    let mut f = Fixture::new(JudgeOptions::default());
    let shown = objects(0, 5);
    for (n, agent) in ["ann", "bob", "cat"].iter().enumerate() {
        f.rank(&format!("r{n}"), "case1", "Which rooms have a balcony?", &shown);
        f.label(&format!("a{n}"), &format!("r{n}"), agent, &[true, false, false, false, false]);
    }
    f.rank("r", "case1", "Which rooms have a balcony?", &shown);
    let verdicts = f.label("all", "r", "eve", &[true; 5]);
    let uniform = verdicts.iter().find(|v| v.check == "uniform_labels").unwrap();
    // Chance (3+1)/(3+2) · ((0+1)/(3+2))⁴ = 0.8 · 0.2⁴ = 0.00128.
    assert!(!uniform.pass && (uniform.score - 0.8 * 0.2f64.powi(4)).abs() < 1e-12, "{uniform:?}");
}

fn missing(id: &str) -> Feedback {
    Feedback::Missing {
        knowledge_id: Some(id.into()),
        title: String::new(),
        uri: String::new(),
        excerpt: String::new(),
        note: String::new(),
    }
}

#[test]
fn late_reports_pass_unless_they_name_what_others_found_irrelevant() {
    let mut f = Fixture::new(JudgeOptions::default());
    let shown = vec!["spa-hours".to_string(), "spa-prices".to_string()];
    for (n, agent) in ["ann", "bob", "cat"].iter().enumerate() {
        f.rank(&format!("r{n}"), "case1", "When does the spa open?", &shown);
        f.label(&format!("a{n}"), &format!("r{n}"), agent, &[true, false]);
    }
    f.rank("r", "case1", "When does the spa open?", &shown);
    let late = |v: Vec<Verdict>| v.into_iter().find(|v| v.check == "late_report").map(|v| v.pass);
    // Two hours late, naming the object the others labelled irrelevant: fails.
    assert_eq!(late(f.annotate("m1", "r", "eve", 7_200.0, missing("spa-prices"))), Some(false));
    // Late, naming an object nobody contradicts: passes (it only weighs less).
    assert_eq!(late(f.annotate("m2", "r", "eve", 7_200.0, missing("spa-hours"))), Some(true));
    assert_eq!(late(f.annotate("m3", "r", "eve", 7_200.0, missing("spa-sauna"))), Some(true));
    // Made at once: no verdict, whatever it names.
    assert_eq!(late(f.annotate("m4", "r", "eve", 30.0, missing("spa-prices"))), None);
}

#[test]
fn switched_off_gives_no_verdicts_and_replay_restores_the_state() {
    let off = JudgeOptions { enabled: false, ..JudgeOptions::default() };
    let always = |_: usize, truth: &[bool]| vec![true; truth.len()];
    let f = many_relevant(off, &["ann", "bob"], Some(("eve", &always)));
    assert!(f.journal.verdicts.is_empty());

    // A judge rebuilt from the journal judges the next annotation as the one that ran.
    let mut f = many_relevant(JudgeOptions::default(), &["ann", "bob", "cat", "dan"], Some(("eve", &always)));
    let mut rebuilt = Judge::new(JudgeOptions::default());
    rebuilt.replay(&f.journal);
    f.rank("next", "case-next", "one more question", &objects(999, 8));
    let a = AnnotationRow {
        tenant: crate::tenancy::DEFAULT_TENANT.into(),
        sequence: 0,
        annotation_id: "next-a".into(),
        interaction_id: "next".into(),
        agent_id: "eve".into(),
        case_id: String::new(),
        shown_ms: 0,
        annotated_ms: 20_000,
        feedback: Feedback::Relevance {
            judgements: objects(999, 8).into_iter().map(|k| (k, Label::Relevant)).collect(),
        },
    };
    let (original, replayed) = (f.judge.judge(&a, &f.journal), rebuilt.judge(&a, &f.journal));
    assert_eq!(original, replayed);
    assert!(original.iter().any(|v| v.check == "uniform_labels" && !v.pass), "{original:?}");
}
