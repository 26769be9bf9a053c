//! The flywheel worker on real logs and a real knowledge base: the judge's
//! checks on crafted annotations, the three training-set builders on a small
//! hand-made log (exact rows), the temporal split, the gap queue, and
//! kill -9 mid-run.

mod common;

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use aitl::{
    engine::grounding,
    kb::{KnowledgeStore, QueryComposition},
    proto::{
        self, AnnotationRecord, Candidate, ConversationTurn, InteractionKind, InteractionRecord, KnowledgeJudgement,
        RankRequest, RelevanceLabel, ShownKnowledge, Speaker, annotation, interaction_record, log_record::Body,
        missing_knowledge,
    },
    trainlog::{LogOptions, TrainingLog},
    worker::{
        Worker,
        datasets::{self, GeneratorRow, Message, RankerRow, RetrieverTriplet},
        gaps::knowledge_gaps,
        journal::Journal,
        judge::{Judge, JudgeOptions},
        rows::{AnnotationRow, Decision, Feedback, InteractionRow, Label, Row},
    },
};
use common::knowledge;

const T0: u64 = 1_800_000_000;

fn at(seconds: f64) -> prost_types::Timestamp {
    (SystemTime::UNIX_EPOCH + Duration::from_secs_f64(T0 as f64 + seconds)).into()
}

fn turn(speaker: Speaker, text: &str) -> ConversationTurn {
    ConversationTurn { speaker: speaker as i32, text: text.into() }
}

fn shown(ids: &[&str]) -> Vec<ShownKnowledge> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| ShownKnowledge { knowledge_id: id.to_string(), version: 1, score: 0.5, rank: i as u32 + 1 })
        .collect()
}

fn rank_interaction(id: &str, created: f64, query: &str, ids: &[&str]) -> InteractionRecord {
    InteractionRecord {
        interaction_id: id.into(),
        kind: InteractionKind::Rank as i32,
        created_at: Some(at(created)),
        request: Some(interaction_record::Request::Rank(RankRequest {
            query: query.into(),
            context: vec![turn(Speaker::Customer, "Hi"), turn(Speaker::Agent, "How can I help?")],
            ..Default::default()
        })),
        shown_knowledge: shown(ids),
        ..Default::default()
    }
}

fn generate_interaction(id: &str, created: f64, question: &str, ids: &[&str], replies: &[&str]) -> InteractionRecord {
    InteractionRecord {
        interaction_id: id.into(),
        kind: InteractionKind::Generate as i32,
        created_at: Some(at(created)),
        request: Some(interaction_record::Request::Generate(proto::GenerateRequest {
            conversation: vec![turn(Speaker::Customer, question)],
            ..Default::default()
        })),
        shown_knowledge: shown(ids),
        candidates: replies
            .iter()
            .enumerate()
            .map(|(i, text)| Candidate {
                candidate_id: format!("{id}/c{i}"),
                text: text.to_string(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn annotation(
    id: &str,
    interaction: &str,
    agent: &str,
    shown: f64,
    delay: f64,
    kind: annotation::Kind,
) -> AnnotationRecord {
    AnnotationRecord {
        annotation: Some(proto::Annotation {
            annotation_id: id.into(),
            interaction_id: interaction.into(),
            agent_id: agent.into(),
            shown_at: Some(at(shown)),
            annotated_at: Some(at(shown + delay)),
            kind: Some(kind),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn relevance(labels: &[(&str, RelevanceLabel)]) -> annotation::Kind {
    annotation::Kind::Relevance(proto::KnowledgeRelevance {
        judgements: labels
            .iter()
            .map(|(id, l)| KnowledgeJudgement { knowledge_id: id.to_string(), label: *l as i32 })
            .collect(),
    })
}

fn missing(id: &str) -> annotation::Kind {
    annotation::Kind::MissingKnowledge(proto::MissingKnowledge {
        source: Some(missing_knowledge::Source::KnowledgeId(id.into())),
        note: String::new(),
    })
}

fn preference(preferred: &str, other: &str, rationale: &str) -> annotation::Kind {
    annotation::Kind::Preference(proto::PairwisePreference {
        preferred_candidate_id: preferred.into(),
        other_candidate_id: other.into(),
        strength: proto::PreferenceStrength::Better as i32,
        rationale: rationale.into(),
    })
}

fn adoption(candidate: &str, decision: proto::AdoptionDecision, sent: &str, rationale: &str) -> annotation::Kind {
    annotation::Kind::Adoption(proto::Adoption {
        candidate_id: candidate.into(),
        decision: decision as i32,
        sent_text: sent.into(),
        rationale: rationale.into(),
    })
}

async fn write_log(dir: &Path, bodies: Vec<Body>) {
    let (log, _) = TrainingLog::open(dir, LogOptions::default()).unwrap();
    for chunk in bodies.chunks(512) {
        let appends = chunk.iter().map(|b| log.append(b));
        for result in futures_util::future::join_all(appends).await {
            result.unwrap();
        }
    }
    log.close();
}

const K1: &str = "Refunds reach the original payment method within 14 days.";
const K2: &str = "Shipping is free on orders over 50 dollars.";
const K3: &str = "A damaged parcel is replaced within 3 days.";
const K4: &str = "The shop is open from 9 to 5.";

fn knowledge_base(dir: &Path) -> KnowledgeStore {
    let kb = KnowledgeStore::open(&dir.join("knowledge.redb")).unwrap();
    kb.upsert_batch(
        aitl::tenancy::DEFAULT_TENANT,
        vec![knowledge("k1", K1), knowledge("k2", K2), knowledge("k3", K3), knowledge("k4", K4)],
    )
    .unwrap();
    kb
}

/// Two interactions and four annotations from one careful agent.
fn small_log() -> Vec<Body> {
    use RelevanceLabel::*;
    use proto::AdoptionDecision::Edited;
    vec![
        Body::Interaction(rank_interaction("r1", 0.0, "My parcel is broken", &["k3", "k2", "k4"])),
        Body::Interaction(generate_interaction(
            "g1",
            1.0,
            "My parcel is broken",
            &["k3", "k1"],
            &["We will replace it [1].", "Refunds take 14 days [2]."],
        )),
        Body::Annotation(annotation(
            "a1",
            "r1",
            "agent-1",
            0.0,
            10.0,
            relevance(&[("k3", Relevant), ("k2", Irrelevant), ("k4", PartiallyRelevant)]),
        )),
        Body::Annotation(annotation("a2", "r1", "agent-1", 0.0, 15.0, missing("k1"))),
        Body::Annotation(annotation(
            "a3",
            "g1",
            "agent-1",
            1.0,
            20.0,
            preference("g1/c0", "g1/c1", "c0 answers the broken parcel question"),
        )),
        Body::Annotation(annotation(
            "a4",
            "g1",
            "agent-1",
            1.0,
            30.0,
            adoption("g1/c0", Edited, "We will replace your parcel within 3 days [1].", "added the delivery time"),
        )),
    ]
}

#[tokio::test]
async fn builders_produce_the_expected_rows_from_a_hand_made_log() {
    let dir = tempfile::tempdir().unwrap();
    let kb = knowledge_base(dir.path());
    write_log(&dir.path().join("log"), small_log()).await;
    let mut worker =
        Worker::open(&dir.path().join("worker"), &dir.path().join("log"), JudgeOptions::default()).unwrap();
    let report = worker.run_once(&dir.path().join("log")).unwrap();
    assert_eq!((report.records, report.interactions, report.annotations, report.failed_verdicts), (6, 2, 4, 0));

    let sets = datasets::build(worker.journal(), &kb, QueryComposition { context_turns: 3 }, true).unwrap();
    let anchor = "Hi How can I help? My parcel is broken";
    assert_eq!(
        sets.train.retriever,
        vec![
            RetrieverTriplet { anchor: anchor.into(), positive: K3.into(), negative: K2.into(), weight: 1.0 },
            RetrieverTriplet { anchor: anchor.into(), positive: K1.into(), negative: K2.into(), weight: 1.0 },
        ]
    );
    assert!(sets.train.retriever_pairs.is_empty());
    let row = |passage: &str, label| RankerRow { query: anchor.into(), passage: passage.into(), label, weight: 1.0 };
    assert_eq!(sets.train.ranker, vec![row(K3, 1.0), row(K2, 0.0), row(K4, 0.5), row(K1, 1.0)]);

    let objects = [knowledge("k3", K3), knowledge("k1", K1)];
    let prompt: Vec<Message> = grounding::messages(
        grounding::DEFAULT_SYSTEM_PROMPT,
        &objects,
        &[turn(Speaker::Customer, "My parcel is broken")],
    )
    .into_iter()
    .zip(["system", "user"])
    .map(|((_, content), role)| Message { role: role.into(), content })
    .collect();
    let assistant = |text: &str| vec![Message { role: "assistant".into(), content: text.into() }];
    assert_eq!(
        sets.train.generator,
        vec![
            GeneratorRow {
                prompt: prompt.clone(),
                chosen: assistant("We will replace it [1]."),
                rejected: assistant("Refunds take 14 days [2]."),
                weight: 1.0,
            },
            GeneratorRow {
                prompt,
                chosen: assistant("We will replace your parcel within 3 days [1]."),
                rejected: assistant("We will replace it [1]."),
                weight: 1.0,
            },
        ]
    );
    assert_eq!(sets.manifest.log_sequences, (1, 6));
    assert_eq!(sets.manifest.counts["ranker"], (4, 0));

    // Exported as JSON lines with a manifest.
    let folder = sets.export(&dir.path().join("datasets")).unwrap();
    let text = std::fs::read_to_string(folder.join("train/retriever.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first, serde_json::json!({"anchor": anchor, "positive": K3, "negative": K2, "weight": 1.0}));
    assert!(folder.join("manifest.json").exists() && folder.join("heldout/generator.jsonl").exists());

    let gaps = knowledge_gaps(worker.journal());
    assert_eq!(gaps.len(), 1);
    assert_eq!((gaps[0].key.as_str(), gaps[0].reports, gaps[0].immediate_reports), ("k1", 1, 1));
    assert_eq!(gaps[0].example_queries, ["My parcel is broken"]);
}

/// Twenty interactions, one annotation each: the two latest are held out,
/// whatever order the log holds them in, and building twice is identical.
#[tokio::test]
async fn the_split_holds_out_the_latest_tenth_deterministically() {
    let dir = tempfile::tempdir().unwrap();
    let kb = knowledge_base(dir.path());
    let mut bodies = Vec::new();
    // Logged out of time order: interaction i happened at 100 - 5i seconds.
    for i in 0..20 {
        let id = format!("r{i:02}");
        bodies.push(Body::Interaction(rank_interaction(
            &id,
            100.0 - 5.0 * i as f64,
            &format!("question {i}"),
            &["k1", "k2"],
        )));
        bodies.push(Body::Annotation(annotation(
            &format!("a{i}"),
            &id,
            "agent-1",
            0.0,
            5.0,
            relevance(&[("k1", RelevanceLabel::Relevant), ("k2", RelevanceLabel::Irrelevant)]),
        )));
    }
    write_log(&dir.path().join("log"), bodies).await;
    let mut worker =
        Worker::open(&dir.path().join("worker"), &dir.path().join("log"), JudgeOptions::default()).unwrap();
    worker.run_once(&dir.path().join("log")).unwrap();
    let composition = QueryComposition { context_turns: 0 };
    let sets = datasets::build(worker.journal(), &kb, composition, true).unwrap();
    let heldout: Vec<&str> = sets.heldout.retriever.iter().map(|r| r.anchor.as_str()).collect();
    // The latest two are the last logged: questions 0 (at 100 s) and 1 (95 s).
    assert_eq!(heldout, ["question 1", "question 0"]);
    assert_eq!((sets.manifest.interactions_train, sets.manifest.interactions_heldout), (18, 2));
    let again = datasets::build(worker.journal(), &kb, composition, true).unwrap();
    assert_eq!((again.train, again.heldout, again.manifest.version), (sets.train, sets.heldout, sets.manifest.version));
}

fn interaction_row(id: &str, candidates: &[(&str, &str)]) -> InteractionRow {
    let record = generate_interaction(id, 0.0, "Where is my refund?", &["k1", "k2"], &[]);
    let mut row = InteractionRow::from_record(1, &record);
    row.candidates = candidates
        .iter()
        .map(|(cid, text)| aitl::worker::rows::CandidateRow {
            candidate_id: cid.to_string(),
            text: text.to_string(),
            cited: Vec::new(),
            model_version: String::new(),
        })
        .collect();
    row
}

fn row(id: &str, interaction: &str, agent: &str, delay: f64, feedback: Feedback) -> AnnotationRow {
    AnnotationRow {
        sequence: 0,
        annotation_id: id.into(),
        interaction_id: interaction.into(),
        agent_id: agent.into(),
        case_id: String::new(),
        shown_ms: 0,
        annotated_ms: (delay * 1000.0) as i64,
        feedback,
        tenant: aitl::tenancy::DEFAULT_TENANT.into(),
    }
}

fn pref(rationale: &str) -> Feedback {
    Feedback::Preference { preferred: "c0".into(), other: "c1".into(), strength: 2, rationale: rationale.into() }
}

/// Judges `a` after `earlier` (journaled first); returns `check`'s verdicts as (annotation, pass).
fn verdicts(options: JudgeOptions, earlier: Vec<AnnotationRow>, a: AnnotationRow, check: &str) -> Vec<(String, bool)> {
    let dir = tempfile::tempdir().unwrap();
    let mut journal = Journal::open(dir.path()).unwrap();
    let candidates =
        [("c0", "Your refund arrives within 14 days on your card."), ("c1", "Shipping is free over 50 dollars.")];
    journal.stage(Row::Interaction(interaction_row("g", &candidates))).unwrap();
    let mut judge = Judge::new(options);
    for b in earlier {
        judge.judge(&b, &journal);
        journal.stage(Row::Annotation(b)).unwrap();
    }
    judge.judge(&a, &journal).into_iter().filter(|v| v.check == check).map(|v| (v.annotation_id, v.pass)).collect()
}

#[test]
fn each_judge_check_catches_its_case_and_passes_a_clean_one() {
    let o = JudgeOptions::default;
    let good = "c0 gives the refund timeline the customer asked for";
    // Rationales: empty, boilerplate, repeated, fine.
    assert_eq!(verdicts(o(), vec![], row("a", "g", "x", 9.0, pref("")), "rationale"), [("a".into(), false)]);
    assert_eq!(verdicts(o(), vec![], row("a", "g", "x", 9.0, pref("ok")), "rationale"), [("a".into(), false)]);
    assert_eq!(verdicts(o(), vec![], row("a", "g", "x", 9.0, pref(good)), "rationale"), [("a".into(), true)]);
    let again = |id: &str| row(id, "g", "x", 9.0, pref("the first one is more complete"));
    assert_eq!(verdicts(o(), vec![again("1"), again("2")], again("3"), "rationale"), [("3".into(), false)]);

    // Too fast to have read the candidates.
    assert_eq!(verdicts(o(), vec![], row("a", "g", "x", 1.0, pref(good)), "too_fast"), [("a".into(), false)]);
    assert_eq!(verdicts(o(), vec![], row("a", "g", "x", 8.0, pref(good)), "too_fast"), [("a".into(), true)]);

    // Preferred c0, but sent c1 unchanged: the preference is doubted; an edit of c0 agrees with it.
    let sent = |decision, text: &str| Feedback::Adoption {
        candidate_id: if decision == Decision::AdoptedAsIs { "c1" } else { "c0" }.into(),
        decision,
        sent_text: text.into(),
        rationale: "fits the question best".into(),
    };
    let p = row("p", "g", "x", 9.0, pref(good));
    let contradicting = row("d", "g", "x", 12.0, sent(Decision::AdoptedAsIs, ""));
    assert_eq!(verdicts(o(), vec![p.clone()], contradicting, "preference_vs_adoption"), [("p".into(), false)]);
    let agreeing = row("d", "g", "x", 12.0, sent(Decision::Edited, "Your refund arrives within 14 days."));
    assert_eq!(verdicts(o(), vec![p], agreeing, "preference_vs_adoption"), [("p".into(), true)]);

    // Labelled k1 irrelevant, then reported k1 missing.
    let labels =
        |l: Label| Feedback::Relevance { judgements: vec![("k1".into(), l), ("k2".into(), Label::Irrelevant)] };
    let gap = |id: &str| Feedback::Missing {
        knowledge_id: Some(id.into()),
        title: String::new(),
        uri: String::new(),
        excerpt: String::new(),
        note: String::new(),
    };
    let r = row("r", "g", "x", 5.0, labels(Label::Irrelevant));
    assert_eq!(
        verdicts(o(), vec![r.clone()], row("m", "g", "x", 9.0, gap("k1")), "relevance_vs_missing"),
        [("r".into(), false)]
    );
    assert_eq!(
        verdicts(o(), vec![r], row("m", "g", "x", 9.0, gap("k3")), "relevance_vs_missing"),
        [("r".into(), true)]
    );

    // Everything relevant: one check from an agent without history is no
    // evidence (the agent is compared with the population: the cases that
    // fail are in kernel/worker/judge/tests.rs); too few objects, no verdict.
    let all = |l: Label| Feedback::Relevance { judgements: (0..5).map(|i| (format!("k{i}"), l)).collect() };
    assert_eq!(
        verdicts(o(), vec![], row("u", "g", "x", 9.0, all(Label::Relevant)), "uniform_labels"),
        [("u".into(), true)]
    );
    assert_eq!(verdicts(o(), vec![], row("u", "g", "x", 9.0, labels(Label::Relevant)), "uniform_labels"), []);
    // The same object labelled relevant by three agents, then irrelevant: against the majority.
    let one = |id: &str, agent: &str, l: Label| {
        let mut r = row(id, "g", "x", 9.0, Feedback::Relevance { judgements: vec![("k1".into(), l)] });
        r.agent_id = agent.into();
        r
    };
    let majority = vec![one("1", "a", Label::Relevant), one("2", "b", Label::Relevant), one("3", "c", Label::Relevant)];
    assert_eq!(verdicts(o(), majority.clone(), one("4", "d", Label::Irrelevant), "consistency"), [("4".into(), false)]);
    assert_eq!(verdicts(o(), majority, one("4", "d", Label::Relevant), "consistency"), [("4".into(), true)]);

    // Switched off: no verdicts at all.
    let off = JudgeOptions { enabled: false, ..o() };
    let dir = tempfile::tempdir().unwrap();
    let journal = Journal::open(dir.path()).unwrap();
    assert!(Judge::new(off).judge(&row("a", "g", "x", 0.1, pref("")), &journal).is_empty());
}

/// `aitl worker run` killed with SIGKILL at random moments, then run to the
/// end: every annotation of the log is journaled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_run_resumes_without_duplicates_or_gaps() {
    const INTERACTIONS: usize = 1000;
    const PER_INTERACTION: usize = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut bodies = Vec::new();
    for i in 0..INTERACTIONS {
        let id = format!("r{i}");
        bodies.push(Body::Interaction(rank_interaction(&id, i as f64, "Is breakfast included?", &["k1", "k2"])));
        for j in 0..PER_INTERACTION {
            let label = if (i + j) % 3 == 0 { RelevanceLabel::Relevant } else { RelevanceLabel::Irrelevant };
            let kind = relevance(&[("k1", label), ("k2", RelevanceLabel::Irrelevant)]);
            bodies.push(Body::Annotation(annotation(
                &format!("a{i}-{j}"),
                &id,
                &format!("agent-{}", j % 4),
                i as f64,
                4.0,
                kind,
            )));
        }
    }
    write_log(&dir.path().join("log"), bodies).await;
    let journal_lines =
        || std::fs::read_to_string(dir.path().join("worker/journal.jsonl")).map_or(0, |t| t.lines().count());
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_aitl"))
            .args(["--data-dir", dir.path().to_str().unwrap(), "worker", "run"])
            .env("AITL_LOG", "error")
            .stdout(Stdio::null())
            .spawn()
            .unwrap()
    };
    let mut partial_kills = 0;
    for round in 0..12 {
        let mut child = run();
        std::thread::sleep(Duration::from_millis(15 + 29 * round % 120));
        child.kill().unwrap();
        child.wait().unwrap();
        let journal = Journal::open(&dir.path().join("worker")).unwrap();
        let ids: std::collections::HashSet<&str> =
            journal.annotations.iter().map(|a| a.annotation_id.as_str()).collect();
        assert_eq!(ids.len(), journal.annotations.len(), "a duplicate after kill {round}");
        let total = INTERACTIONS * PER_INTERACTION;
        if journal.annotations.len() > 0 && journal.annotations.len() < total {
            partial_kills += 1;
        }
        if journal.annotations.len() == total {
            break;
        }
    }
    assert!(run().wait().unwrap().success());
    let journal = Journal::open(&dir.path().join("worker")).unwrap();
    let ids: std::collections::HashSet<&str> = journal.annotations.iter().map(|a| a.annotation_id.as_str()).collect();
    assert_eq!(
        (ids.len(), journal.annotations.len()),
        (INTERACTIONS * PER_INTERACTION, INTERACTIONS * PER_INTERACTION)
    );
    assert_eq!(journal.interactions.len(), INTERACTIONS);
    println!("{partial_kills} kills landed mid-run; journal {} lines", journal_lines());
    assert!(partial_kills > 0, "no kill landed mid-run: make the log longer");
}

/// ListKnowledgeGaps over gRPC: UNAVAILABLE until a worker has run, then the
/// queue with the reporting agent and the question.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_lists_the_gap_queue_the_worker_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::start(dir.path()).await;
    let record = common::seed_generate(&server, vec![knowledge("k1", K1), knowledge("k2", K2)]).await;
    let channel = common::channel(&server).await;
    let mut support = proto::support_service_client::SupportServiceClient::new(channel.clone());
    let mut flywheel = proto::flywheel_service_client::FlywheelServiceClient::new(channel);

    let before = flywheel.list_knowledge_gaps(proto::ListKnowledgeGapsRequest { limit: 0 }).await.unwrap_err();
    assert_eq!(before.code(), tonic::Code::Unavailable, "{before:?}");
    assert!(before.message().contains("aitl worker run"), "{}", before.message());

    let mut report = common::preference("gap-1", &record, "");
    report.kind = Some(missing("k2"));
    support.submit_annotation(proto::SubmitAnnotationRequest { annotation: Some(report) }).await.unwrap();
    let log_dir = dir.path().join("log");
    let mut worker = Worker::open(&dir.path().join("worker"), &log_dir, JudgeOptions::default()).unwrap();
    assert_eq!(worker.run_once(&log_dir).unwrap().annotations, 1);

    let listed =
        flywheel.list_knowledge_gaps(proto::ListKnowledgeGapsRequest { limit: 10 }).await.unwrap().into_inner();
    assert_eq!(listed.total, 1);
    let gap = &listed.gaps[0];
    assert_eq!((gap.key.as_str(), gap.knowledge_id.as_str(), gap.reports), ("k2", "k2", 1));
    assert_eq!(gap.agent_ids, ["agent-7"]);
    assert!(listed.log_sequence >= 2 && listed.updated_at.is_some());
    let too_many = flywheel.list_knowledge_gaps(proto::ListKnowledgeGapsRequest { limit: 5_000 }).await.unwrap_err();
    assert_eq!(too_many.code(), tonic::Code::InvalidArgument);
    server.shutdown().await.unwrap();
}

/// The language-model checks on the embedded SmolLM2: probabilities, and a
/// verdict per check with the model's version in its reason.
#[test]
fn the_language_model_judge_scores_relevance_and_preferences() {
    let judge =
        aitl::worker::llm_judge::LlmJudge::load(aitl::backend::Device::Cpu, &common::default_generator_gguf()).unwrap();
    let ask = |knowledge: &str| {
        judge
            .p_yes(
                &aitl::worker::llm_judge::RELEVANCE_PROMPT
                    .replace("{question}", "How long does a refund take?")
                    .replace("{knowledge}", knowledge),
            )
            .unwrap()
    };
    let (refund, parking) = (ask(K1), ask("The hotel has free parking for guests."));
    println!("P(relevant): refund policy {refund:.3}, parking {parking:.3}");
    assert!((0.0..=1.0).contains(&refund) && (0.0..=1.0).contains(&parking));
    assert!(refund > parking, "the refund policy should look more relevant to a refund question");

    let dir = tempfile::tempdir().unwrap();
    let kb = knowledge_base(dir.path());
    let record = generate_interaction("g", 0.0, "How long does a refund take?", &["k1"], &[K1, K4]);
    let interaction = InteractionRow::from_record(1, &record);
    let preference = row(
        "p",
        "g",
        "x",
        9.0,
        Feedback::Preference {
            preferred: "g/c0".into(),
            other: "g/c1".into(),
            strength: 2,
            rationale: "reply A answers the refund question with the 14 days policy".into(),
        },
    );
    let verdicts = judge.judge(&preference, &interaction, &kb, 0.8).unwrap();
    let checks: Vec<&str> = verdicts.iter().map(|v| v.check.as_str()).collect();
    assert_eq!(checks, ["llm_rationale", "llm_grounding"]);
    assert!(verdicts.iter().all(|v| v.reason.contains("SmolLM2")), "{verdicts:?}");
    for v in &verdicts {
        println!("{}: pass {} score {:.3}: {}", v.check, v.pass, v.score, v.reason);
    }
    // Point-wise helpfulness (evaluation), with and without a reference reply.
    for reference in [None, Some("Refunds take 14 days.")] {
        let p = judge.helpfulness("How long does a refund take?", K1, reference).unwrap();
        assert!(p > 0.0 && p < 1.0, "{p}");
    }
    let labels = row("r", "g", "x", 9.0, Feedback::Relevance { judgements: vec![("k1".into(), Label::Relevant)] });
    let verdicts = judge.judge(&labels, &interaction, &kb, 0.8).unwrap();
    assert_eq!((verdicts.len(), verdicts[0].check.as_str()), (1, "llm_relevance"));
}

/// Simulated agents, 40% careless, against a real server with the default
/// embedding model; the worker's judge rejects careless annotations and
/// (almost) no careful ones, and the evaluation sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_agents_feed_the_worker_and_the_judge_separates_the_careless() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    common::mini_dstc11(&dataset, 12);
    let data = dir.path().join("data");
    let store = KnowledgeStore::open(&data.join("knowledge.redb")).unwrap();
    store.upsert_batch(aitl::tenancy::DEFAULT_TENANT, aitl::kb::read_dstc11(&dataset).unwrap()).unwrap();
    drop(store);
    let server = aitl::server::start(common::config_with_embedder(&data)).await.unwrap();

    let options = aitl::worker::simulate::SimulationOptions {
        server: format!("http://{}", server.addr),
        dataset: dataset.clone(),
        agents: 5,
        careless_share: 0.4,
        generate_share: 0.0,
        max_new_tokens: 16,
        late_missing_share: 0.0,
        fatigue_after: None,
        limit: None,
        seed: 3,
        truth: dir.path().join("truth.json"),
        annotators: Default::default(),
    };
    let report = aitl::worker::simulate::run(&options).await.unwrap();
    assert_eq!(report.questions, 39, "90% of 48 questions are history, 4 of them the guard's");
    let truth: aitl::worker::simulate::Truth =
        serde_json::from_slice(&std::fs::read(dir.path().join("truth.json")).unwrap()).unwrap();
    assert_eq!(truth.careless_agents, ["sim-agent-00", "sim-agent-01"]);
    assert_eq!(truth.annotations, report.annotations);

    let log = data.join("log");
    let mut worker = Worker::open(&data.join("worker"), &log, JudgeOptions::default()).unwrap();
    assert_eq!(worker.run_once(&log).unwrap().annotations as usize, report.annotations);
    server.shutdown().await.unwrap();

    let evaluation = aitl::worker::evaluate::evaluate(worker.journal(), Some(&truth), None);
    let separation = evaluation.separation.as_ref().unwrap();
    println!("{evaluation}");
    assert!(separation.careless_annotations > 0);
    // The `consistency` check fails some careful labels here (the majority of
    // a few earlier labels on the same case can be careless ones): 0.80 on this
    // fixture, 0.73 on the DSTC11 run in the README.
    assert!(separation.precision >= 0.75, "{separation:?}");
    assert!(separation.recall >= 0.5, "{separation:?}");
    let rejected = |agent: &str| evaluation.agents[agent].rejected_share;
    assert!(rejected("sim-agent-00") > rejected("sim-agent-04") + 0.3);
    let sets = datasets::build(
        worker.journal(),
        &KnowledgeStore::open(&data.join("knowledge.redb")).unwrap(),
        QueryComposition { context_turns: 3 },
        true,
    )
    .unwrap();
    assert!(sets.manifest.rejected > 0 && !sets.train.ranker.is_empty());
}
