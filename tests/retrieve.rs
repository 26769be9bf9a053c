//! Retrieve end to end with the real default embedding model: semantic
//! search over what was upserted, context composition, filters, interaction
//! logging, annotations on what was shown, and vectors that survive restart.

mod common;

use std::{ops::ControlFlow, time::SystemTime};

use aitl::{
    proto::{
        self, DeleteKnowledgeRequest, KnowledgeFilter, KnowledgeKind, RankRequest, RetrieveRequest,
        SubmitAnnotationRequest, UpsertKnowledgeRequest, log_record::Body,
    },
    trainlog::LogReader,
};
use common::*;
use tonic::Code;

fn object(id: &str, kind: KnowledgeKind, text: &str, entity: &str) -> proto::KnowledgeObject {
    proto::KnowledgeObject {
        id: id.into(),
        kind: kind as i32,
        title: entity.into(),
        text: text.into(),
        metadata: [("entity".to_string(), entity.to_string())].into(),
        ..Default::default()
    }
}

fn corpus() -> Vec<proto::KnowledgeObject> {
    vec![
        object(
            "refund",
            KnowledgeKind::Policy,
            "Refunds are issued to the original payment method within 14 days of a return.",
            "shop",
        ),
        object("shipping", KnowledgeKind::Policy, "Standard shipping is free on orders over 50 dollars.", "shop"),
        object(
            "parking-a",
            KnowledgeKind::Faq,
            "Acorn Hotel. Q: Is there parking? A: Yes, free private parking on site.",
            "acorn",
        ),
        object(
            "parking-b",
            KnowledgeKind::Faq,
            "Bridge Inn. Q: Is there parking? A: No, guests use the public car park.",
            "bridge",
        ),
        object(
            "bath-a",
            KnowledgeKind::Case,
            "Acorn Hotel (review): the bathroom was spotless and the shower strong.",
            "acorn",
        ),
        object(
            "bath-b",
            KnowledgeKind::Case,
            "Bridge Inn (review): our bathroom was dirty and the sink leaked.",
            "bridge",
        ),
        object("pets", KnowledgeKind::Faq, "Dogs are welcome for a fee of 10 dollars per night.", "acorn"),
    ]
}

fn customer(text: &str) -> proto::ConversationTurn {
    proto::ConversationTurn { speaker: proto::Speaker::Customer as i32, text: text.into() }
}

fn ids(response: &proto::RetrieveResponse) -> Vec<&str> {
    response.results.iter().map(|r| r.knowledge.as_ref().unwrap().id.as_str()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retrieve_searches_logs_and_accepts_annotations_on_what_it_showed() {
    let dir = tempfile::tempdir().unwrap();
    let server = aitl::server::start(config_with_embedder(dir.path())).await.unwrap();
    let (mut support, mut kb) = clients(&server).await;
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects: corpus() }])).await.unwrap();

    let request = RetrieveRequest {
        query: "Can I get my money back after returning an item?".into(),
        top_k: 3,
        ..Default::default()
    };
    let answer = support.retrieve(request.clone()).await.unwrap().into_inner();
    assert_eq!(ids(&answer)[0], "refund");
    assert_eq!(answer.results.len(), 3);
    assert!(answer.results.windows(2).all(|w| w[0].score >= w[1].score));
    assert_eq!(answer.results.iter().map(|r| r.rank).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(answer.interaction_id.starts_with("ix-"));
    let models = answer.models.clone().unwrap();
    assert!(models.embedder.starts_with("all-MiniLM-L6-v2@"), "{}", models.embedder);
    let timings = answer.timings.as_ref().unwrap();
    assert!(timings.total_ns > 0);
    // auto: a GPU where one answers, else the CPU; either way, named.
    assert!(timings.device == "cpu" || timings.device.starts_with("cuda:"), "device {:?}", timings.device);

    // The question names no hotel; the conversation does.
    let in_context = RetrieveRequest {
        query: "Are their bathrooms clean?".into(),
        context: vec![customer("I am looking at the Bridge Inn for next weekend.")],
        top_k: 2,
        ..Default::default()
    };
    let answer_b = support.retrieve(in_context).await.unwrap().into_inner();
    assert_eq!(ids(&answer_b)[0], "bath-b", "{:?}", ids(&answer_b));

    let faqs_only = RetrieveRequest {
        filter: Some(KnowledgeFilter { kinds: vec![KnowledgeKind::Faq as i32], ..Default::default() }),
        top_k: 10,
        ..request.clone()
    };
    let filtered = support.retrieve(faqs_only).await.unwrap().into_inner();
    assert_eq!(filtered.results.len(), 3);
    assert!(filtered.results.iter().all(|r| r.knowledge.as_ref().unwrap().kind == KnowledgeKind::Faq as i32));

    // Annotations are checked against what this Retrieve showed.
    let shown_at = SystemTime::now() - std::time::Duration::from_secs(5);
    let relevance = |id: &str, labelled: &[&str]| SubmitAnnotationRequest {
        annotation: Some(proto::Annotation {
            annotation_id: id.into(),
            interaction_id: answer.interaction_id.clone(),
            agent_id: "agent-1".into(),
            shown_at: Some(shown_at.into()),
            annotated_at: Some((shown_at + std::time::Duration::from_secs(1)).into()),
            kind: Some(proto::annotation::Kind::Relevance(proto::KnowledgeRelevance {
                judgements: labelled
                    .iter()
                    .map(|k| proto::KnowledgeJudgement {
                        knowledge_id: k.to_string(),
                        label: proto::RelevanceLabel::Relevant as i32,
                    })
                    .collect(),
            })),
            ..Default::default()
        }),
    };
    support.submit_annotation(relevance("rel-1", &[ids(&answer)[0], ids(&answer)[1]])).await.unwrap();
    let not_shown = corpus().into_iter().map(|o| o.id).find(|id| !ids(&answer).contains(&id.as_str())).unwrap();
    let status = support.submit_annotation(relevance("rel-2", &[&not_shown])).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);

    // Cold start: Rank scores with the embedding model's similarity and says
    // so; on what Retrieve showed it keeps Retrieve's order and scores.
    let rank = RankRequest {
        query: request.query.clone(),
        candidates: Some(proto::rank_request::Candidates::RetrieveInteractionId(answer.interaction_id.clone())),
        ..Default::default()
    };
    let ranked = support.rank(rank).await.unwrap().into_inner();
    let ranked_models = ranked.models.unwrap();
    assert_eq!(ranked_models.ranker, format!("similarity:{}", models.embedder));
    assert_eq!(ranked_models.embedder, models.embedder);
    let ranked_ids: Vec<&str> =
        ranked.items.iter().map(|i| i.knowledge.as_ref().unwrap().knowledge.as_ref().unwrap().id.as_str()).collect();
    assert_eq!(ranked_ids, ids(&answer));
    for (item, retrieved) in ranked.items.iter().zip(&answer.results) {
        assert!((item.score - retrieved.score).abs() <= 1e-5, "{} vs {}", item.score, retrieved.score);
    }
    // Raw passages are embedded on the spot.
    let passages = RankRequest {
        query: request.query.clone(),
        candidates: Some(proto::rank_request::Candidates::Passages(proto::Passages {
            texts: vec!["Breakfast is served from seven.".into(), "Refunds go back to your card.".into()],
        })),
        ..Default::default()
    };
    let by_text = support.rank(passages).await.unwrap().into_inner();
    assert_eq!(by_text.items[0].passage_index, 1);

    // Deleted objects leave the results.
    kb.delete_knowledge(DeleteKnowledgeRequest { id: "refund".into() }).await.unwrap();
    let after_delete = support.retrieve(request.clone()).await.unwrap().into_inner();
    assert!(!ids(&after_delete).contains(&"refund"));

    let bad = RetrieveRequest { top_k: 1001, ..request.clone() };
    assert_eq!(support.retrieve(bad).await.unwrap_err().code(), Code::InvalidArgument);
    server.shutdown().await.unwrap();

    // The interaction was logged with what it showed and the model version.
    let mut logged = Vec::new();
    LogReader::new(dir.path().join("log"))
        .read_from(1, |record| {
            if let Some(Body::Interaction(ix)) = record.body {
                logged.push(ix);
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    let first = logged.iter().find(|ix| ix.interaction_id == answer.interaction_id).expect("interaction logged");
    assert_eq!(first.shown_knowledge.iter().map(|k| k.knowledge_id.as_str()).collect::<Vec<_>>(), ids(&answer));
    assert_eq!(first.shown_knowledge[0].version, 1);
    assert_eq!(first.models.as_ref().unwrap().embedder, models.embedder);
    assert!(matches!(first.request, Some(proto::interaction_record::Request::Retrieve(_))));

    // Stored vectors are reused at restart: same results, same scores.
    let server = aitl::server::start(config_with_embedder(dir.path())).await.unwrap();
    let (mut support, _) = clients(&server).await;
    let again = support
        .retrieve(RetrieveRequest {
            query: "Is there parking at the Acorn Hotel?".into(),
            top_k: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ids(&again)[0], "parking-a");
    server.shutdown().await.unwrap();
}
