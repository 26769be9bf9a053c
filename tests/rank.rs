//! Rank end to end over gRPC with a real cross-encoder (the small fixture
//! model): scores equal the model's own, order and top_n, the three kinds of
//! candidates, precise errors, the interaction in the log, annotations on
//! what Rank showed, and a ranker swapped while the server runs.

mod common;

use std::{ops::ControlFlow, path::PathBuf, time::SystemTime};

use aitl::{
    backend::Device,
    engine::{EncoderOptions, Ranker},
    model::cross_encoder::{CrossEncoder, CrossEncoderOptions},
    proto::{
        self, RankRequest, SubmitAnnotationRequest, UpsertKnowledgeRequest, log_record::Body, rank_request::Candidates,
    },
    trainlog::LogReader,
};
use common::*;
use tonic::Code;

fn fixture_model(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

const QUERY: &str = "How long does a refund take?";

fn passages() -> Vec<String> {
    [
        "Refunds reach the original card within five business days.",
        "Breakfast is served from seven to ten.",
        "Parking is free for guests.",
        "Refunds for gift cards are issued as store credit.",
        "Our help desk answers around the clock.",
    ]
    .map(String::from)
    .to_vec()
}

/// What the model itself says, outside the server.
fn direct_scores(model: &CrossEncoder, texts: &[&str]) -> Vec<f32> {
    let pairs = model.tokenize_pairs(QUERY, texts).unwrap();
    pairs.iter().map(|p| model.ranking_score(&model.score_tokens(&Device::Cpu, &[p]).unwrap()[0])).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rank_scores_orders_logs_and_swaps_its_model() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = config(dir.path());
    config.models.ranker = fixture_model("cross-encoder-1").display().to_string();
    let server = aitl::server::start(config).await.unwrap();
    let (mut support, mut kb) = clients(&server).await;
    let model = CrossEncoder::load(&Device::Cpu, &fixture_model("cross-encoder-1"), &Default::default()).unwrap();

    // Raw passages: the model's scores, best first, with their input positions.
    let texts = passages();
    let request = RankRequest {
        query: QUERY.into(),
        candidates: Some(Candidates::Passages(proto::Passages { texts: texts.clone() })),
        ..Default::default()
    };
    let answer = support.rank(request.clone()).await.unwrap().into_inner();
    let want = direct_scores(&model, &texts.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(answer.items.len(), texts.len());
    for (position, item) in answer.items.iter().enumerate() {
        assert_eq!(item.rank, position as u32 + 1);
        assert!(item.knowledge.is_none());
        assert!((item.score - want[item.passage_index as usize]).abs() <= 1e-6, "{item:?} vs {want:?}");
    }
    assert!(answer.items.windows(2).all(|w| w[0].score >= w[1].score));
    let mut indexes: Vec<u32> = answer.items.iter().map(|i| i.passage_index).collect();
    indexes.sort();
    assert_eq!(indexes, [0, 1, 2, 3, 4]);
    let models = answer.models.clone().unwrap();
    assert_eq!(models.ranker, model.version());
    assert!(models.embedder.is_empty());

    // Concurrent calls share the worker's batches and get the same scores.
    let calls: Vec<_> = (0..8)
        .map(|_| {
            let mut support = support.clone();
            let request = request.clone();
            tokio::spawn(async move { support.rank(request).await.unwrap().into_inner() })
        })
        .collect();
    for call in calls {
        let concurrent = call.await.unwrap();
        for (a, b) in concurrent.items.iter().zip(&answer.items) {
            assert_eq!(a.passage_index, b.passage_index);
            assert!((a.score - b.score).abs() <= 1e-5);
        }
    }

    let top = support.rank(RankRequest { top_n: 2, ..request.clone() }).await.unwrap().into_inner();
    assert_eq!(top.items.len(), 2);
    assert_eq!(top.items[0].passage_index, answer.items[0].passage_index);

    // Knowledge ids: objects come back with their scores.
    let objects: Vec<proto::KnowledgeObject> =
        texts.iter().enumerate().map(|(i, t)| knowledge(&format!("k{i}"), t)).collect();
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects }])).await.unwrap();
    let by_id = RankRequest {
        candidates: Some(Candidates::KnowledgeIds(proto::KnowledgeIds {
            ids: vec!["k2".into(), "k0".into(), "k4".into()],
        })),
        top_n: 2,
        ..request.clone()
    };
    let ranked = support.rank(by_id.clone()).await.unwrap().into_inner();
    let shown_ids: Vec<String> =
        ranked.items.iter().map(|i| i.knowledge.as_ref().unwrap().knowledge.as_ref().unwrap().id.clone()).collect();
    let mut want_ids = [("k2", want[2]), ("k0", want[0]), ("k4", want[4])];
    want_ids.sort_by(|a, b| b.1.total_cmp(&a.1));
    assert_eq!(shown_ids, want_ids[..2].iter().map(|(id, _)| id.to_string()).collect::<Vec<_>>());
    assert_eq!(ranked.items[0].knowledge.as_ref().unwrap().rank, 1);

    // Agents can judge what Rank showed, and only that.
    let shown_at = SystemTime::now() - std::time::Duration::from_secs(5);
    let relevance = |annotation_id: &str, knowledge_id: &str| SubmitAnnotationRequest {
        annotation: Some(proto::Annotation {
            annotation_id: annotation_id.into(),
            interaction_id: ranked.interaction_id.clone(),
            agent_id: "agent-2".into(),
            shown_at: Some(shown_at.into()),
            annotated_at: Some((shown_at + std::time::Duration::from_secs(2)).into()),
            kind: Some(proto::annotation::Kind::Relevance(proto::KnowledgeRelevance {
                judgements: vec![proto::KnowledgeJudgement {
                    knowledge_id: knowledge_id.into(),
                    label: proto::RelevanceLabel::Relevant as i32,
                }],
            })),
            ..Default::default()
        }),
    };
    support.submit_annotation(relevance("rank-rel-1", &shown_ids[0])).await.unwrap();
    let not_shown = ["k0", "k2", "k4"].into_iter().find(|id| !shown_ids.iter().any(|s| s == id)).unwrap();
    assert_eq!(
        support.submit_annotation(relevance("rank-rel-2", not_shown)).await.unwrap_err().code(),
        Code::InvalidArgument
    );

    // Precise errors.
    let unknown = RankRequest {
        candidates: Some(Candidates::KnowledgeIds(proto::KnowledgeIds { ids: vec!["k0".into(), "nope".into()] })),
        ..request.clone()
    };
    let status = support.rank(unknown).await.unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert!(status.message().contains("knowledge_ids.ids[1]"), "{}", status.message());
    let no_interaction =
        RankRequest { candidates: Some(Candidates::RetrieveInteractionId("ix-0000".into())), ..request.clone() };
    assert_eq!(support.rank(no_interaction).await.unwrap_err().code(), Code::NotFound);
    let long_query = RankRequest { query: "refund ".repeat(100), ..request.clone() };
    let status = support.rank(long_query).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("never truncates the query"), "{}", status.message());

    // A new ranker takes over between calls; the response names it.
    let swapped = Ranker::cross_encoder(
        Device::Cpu,
        &fixture_model("cross-encoder-3"),
        &CrossEncoderOptions::default(),
        EncoderOptions::default(),
    )
    .unwrap();
    let new_version = swapped.version().to_string();
    let old = server.state.ranker.swap(Some(swapped)).expect("a ranker was serving");
    assert_eq!(old.version(), model.version());
    let after = support.rank(request.clone()).await.unwrap().into_inner();
    assert_eq!(after.models.unwrap().ranker, new_version);
    assert_ne!(new_version, model.version());
    server.shutdown().await.unwrap();

    // The log holds the Rank interaction: what it showed, in order, and who ranked.
    let mut logged = None;
    LogReader::new(dir.path().join("log"))
        .read_from(1, |record| {
            if let Some(Body::Interaction(ix)) = record.body
                && ix.interaction_id == ranked.interaction_id
            {
                logged = Some(ix);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    let logged = logged.expect("the Rank interaction is logged");
    assert_eq!(logged.kind(), proto::InteractionKind::Rank);
    assert_eq!(logged.shown_knowledge.iter().map(|k| k.knowledge_id.clone()).collect::<Vec<_>>(), shown_ids);
    assert_eq!(logged.models.unwrap().ranker, model.version());
    assert_eq!(logged.request, Some(proto::interaction_record::Request::Rank(by_id)));
}
