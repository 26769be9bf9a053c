//! Personal data never reaches the disk: a customer's message full of it goes
//! through Retrieve, Rank and Generate (real models over gRPC), agents'
//! annotations quote it, and then neither `aitl log dump`, the worker's
//! journal nor its exported training sets hold any of it, while the near
//! misses (order numbers, dates) stay verbatim. The live calls still see the
//! original text, and a retried annotation is still a duplicate.

mod common;

use std::{path::Path, time::SystemTime};

use aitl::proto::{
    self, Adoption, AdoptionDecision, ConversationTurn, ExternalReference, GenerateRequest, KnowledgeIds,
    KnowledgeJudgement, KnowledgeRelevance, MissingKnowledge, PairwisePreference, Passages, PreferenceStrength,
    RankRequest, RelevanceLabel, RetrieveRequest, SamplingParams, Speaker, SubmitAnnotationRequest,
    UpsertKnowledgeRequest, annotation::Kind, generate_request::Grounding, missing_knowledge::Source,
    rank_request::Candidates,
};
use common::*;

/// What the customer and the agent wrote, each a kind the redactor knows.
const PII: [&str; 8] = [
    "jane.doe@example.com",
    "415-555-0132",
    "5555 5555 5555 4444",
    "cvv 123",
    "078-05-1120",
    "FR14 2004 1010 0505 0001 3M02 606",
    "42 Elm Street",
    "198.51.100.7",
];
/// What looks alike and must stay.
const NEAR_MISSES: [&str; 3] = ["#A-48213-77", "2024-03-15", "INV-2024-00123"];

const MESSAGE: &str = "Order #A-48213-77 (invoice INV-2024-00123, placed 2024-03-15) was charged twice to card \
                       5555 5555 5555 4444 cvv 123. I'm jane.doe@example.com, +1 415-555-0132, SSN 078-05-1120, \
                       42 Elm Street. Refund to IBAN FR14 2004 1010 0505 0001 3M02 606. I logged in from 198.51.100.7.";

fn customer(text: &str) -> ConversationTurn {
    ConversationTurn { speaker: Speaker::Customer as i32, text: text.into() }
}

fn annotation(id: &str, interaction_id: &str, kind: Kind) -> proto::Annotation {
    let now = SystemTime::now();
    proto::Annotation {
        annotation_id: id.into(),
        interaction_id: interaction_id.into(),
        agent_id: "agent-1".into(),
        shown_at: Some((now - std::time::Duration::from_secs(2)).into()),
        annotated_at: Some(now.into()),
        kind: Some(kind),
        ..Default::default()
    }
}

fn files_under(dir: &Path, found: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files_under(&path, found) } else { found.push(path) }
    }
}

fn holds(bytes: &[u8], needle: &str) -> bool {
    bytes.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_redacted_in_everything_persisted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut config = config_with_embedder(&data);
    config.models.generator = default_generator_gguf().display().to_string();
    let server = aitl::server::start(config.clone()).await.unwrap();
    let (mut support, mut kb) = clients(&server).await;
    let objects = vec![
        knowledge("refund", "Refunds go back to the original card within 14 days of the return."),
        knowledge("double", "A double charge is reversed by the bank within 5 business days."),
        knowledge("shipping", "Standard shipping is free on orders over 50 dollars."),
    ];
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects: objects.clone() }])).await.unwrap();

    let context = vec![customer("Hello, my e-mail is jane.doe@example.com"), customer("I was charged twice")];
    let retrieve =
        |query: &str| RetrieveRequest { query: query.into(), context: context.clone(), top_k: 3, ..Default::default() };
    let retrieved = support.retrieve(retrieve(MESSAGE)).await.unwrap().into_inner();
    let ranked = support
        .rank(RankRequest {
            query: MESSAGE.into(),
            candidates: Some(Candidates::Passages(Passages {
                texts: vec![format!("Customer note: card 5555 5555 5555 4444, SSN 078-05-1120"), "Unrelated.".into()],
            })),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let generated = support
        .generate(GenerateRequest {
            conversation: vec![customer(MESSAGE)],
            grounding: Some(Grounding::KnowledgeIds(KnowledgeIds { ids: vec!["refund".into(), "double".into()] })),
            sampling: Some(SamplingParams { max_new_tokens: 8, ..Default::default() }),
            system_prompt: "Agent on duty: reach me at 198.51.100.7".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (c0, c1) = (generated.candidates[0].candidate_id.clone(), generated.candidates[1].candidate_id.clone());

    let annotations = [
        annotation(
            "pref",
            &generated.interaction_id,
            Kind::Preference(PairwisePreference {
                preferred_candidate_id: c0.clone(),
                other_candidate_id: c1,
                strength: PreferenceStrength::Better as i32,
                rationale: "it names the refund to FR14 2004 1010 0505 0001 3M02 606".into(),
            }),
        ),
        annotation(
            "adopt",
            &generated.interaction_id,
            Kind::Adoption(Adoption {
                candidate_id: c0,
                decision: AdoptionDecision::Edited as i32,
                sent_text: "Dear Jane, we reversed the charge on 5555 5555 5555 4444 for order #A-48213-77.".into(),
                rationale: "added the card; she called from +1 415-555-0132".into(),
            }),
        ),
        annotation(
            "relevance",
            &retrieved.interaction_id,
            Kind::Relevance(KnowledgeRelevance {
                judgements: vec![KnowledgeJudgement {
                    knowledge_id: retrieved.results[0].knowledge.as_ref().unwrap().id.clone(),
                    label: RelevanceLabel::Relevant as i32,
                }],
            }),
        ),
        annotation(
            "missing",
            &retrieved.interaction_id,
            Kind::MissingKnowledge(MissingKnowledge {
                source: Some(Source::External(ExternalReference {
                    title: "Ticket of jane.doe@example.com".into(),
                    uri: "https://crm.example/tickets?ssn=078-05-1120".into(),
                    excerpt: "She lives at 42 Elm Street.".into(),
                })),
                note: "see her login from 198.51.100.7".into(),
            }),
        ),
    ];
    let mut sequences = Vec::new();
    for a in &annotations {
        let request = SubmitAnnotationRequest { annotation: Some(a.clone()) };
        let accepted = support.submit_annotation(request).await.unwrap().into_inner();
        assert!(!accepted.duplicate);
        sequences.push(accepted.log_sequence);
    }
    // A retry (the client's original text) is still the same annotation.
    let retry = support.submit_annotation(SubmitAnnotationRequest { annotation: Some(annotations[1].clone()) });
    let retry = retry.await.unwrap().into_inner();
    assert!(retry.duplicate && retry.log_sequence == sequences[1], "{retry:?}");

    // The live call embedded the original: its scores are those of the
    // original text on a server that redacts nothing, not those of the
    // redacted text.
    server.shutdown().await.unwrap();
    let mut verbatim = config_with_embedder(&dir.path().join("verbatim"));
    verbatim.privacy.redact = false;
    let plain_server = aitl::server::start(verbatim).await.unwrap();
    let (mut plain, mut plain_kb) = clients(&plain_server).await;
    plain_kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects }])).await.unwrap();
    let scores = |r: &proto::RetrieveResponse| r.results.iter().map(|s| s.score).collect::<Vec<_>>();
    let plain_answer = plain.retrieve(retrieve(MESSAGE)).await.unwrap().into_inner();
    assert_eq!(scores(&retrieved), scores(&plain_answer));
    let mut counts = aitl::privacy::Redactions::new();
    let redacted_query = aitl::privacy::Redactor::default().redact(MESSAGE, &mut counts).into_owned();
    let redacted_answer = plain.retrieve(retrieve(&redacted_query)).await.unwrap().into_inner();
    assert_ne!(scores(&retrieved), scores(&redacted_answer));
    plain_server.shutdown().await.unwrap();
    assert!(ranked.items.len() == 2);

    // The log holds placeholders and counts.
    let dump = aitl_ok(&data, &["log", "dump"]);
    let first_server: Vec<serde_json::Value> = dump.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(first_server.len(), 3 + annotations.len());
    let first_dump = first_server.iter().map(|r| r.to_string()).collect::<Vec<_>>().join("\n");
    for pii in PII {
        assert!(!first_dump.contains(pii), "the log holds {pii:?}:\n{first_dump}");
    }
    for kept in NEAR_MISSES {
        assert!(first_dump.contains(kept), "{kept:?} was redacted:\n{first_dump}");
    }
    let retrieve_record = &first_server[0]["interaction"];
    assert_eq!(retrieve_record["kind"], "INTERACTION_KIND_RETRIEVE");
    let query = retrieve_record["retrieve"]["query"].as_str().unwrap();
    assert!(query.contains("card [CARD] cvv [CVV]") && query.contains("[NATIONAL_ID]"), "{query}");
    let want = serde_json::json!({
        "EMAIL": 2, "PHONE": 1, "CARD": 1, "CVV": 1, "NATIONAL_ID": 1, "ADDRESS": 1, "IBAN": 1, "IP": 1
    });
    assert_eq!(retrieve_record["redactions"], want, "the retrieve record counts what it replaced");
    let generate_record = &first_server[2]["interaction"];
    assert_eq!(generate_record["generate"]["systemPrompt"], "Agent on duty: reach me at [IP]");
    let adoption = &first_server[4]["annotation"];
    assert_eq!(
        adoption["annotation"]["adoption"]["sentText"],
        "Dear Jane, we reversed the charge on [CARD] for order #A-48213-77."
    );
    assert_eq!(adoption["redactions"], serde_json::json!({"CARD": 1, "PHONE": 1}));

    // The worker's journal and the training sets it exports hold none of it.
    aitl_ok(&data, &["worker", "run"]);
    let exported = aitl_ok(&data, &["worker", "export"]);
    let mut files = Vec::new();
    files_under(&data.join("worker"), &mut files);
    files_under(&data.join("datasets"), &mut files);
    let mut placeholders = 0;
    for file in &files {
        let bytes = std::fs::read(file).unwrap();
        for pii in PII {
            assert!(!holds(&bytes, pii), "{} holds {pii:?}", file.display());
        }
        placeholders += usize::from(holds(&bytes, "[CARD]"));
    }
    assert!(placeholders >= 2, "the journal and an export carry the redacted texts ({exported})");
}
