//! End to end over gRPC on loopback: the happy path of every RPC and each
//! validation error the API documents.

mod common;

use std::{
    ops::ControlFlow,
    time::{Duration, SystemTime},
};

use aitl::{
    proto::{
        self, DeleteKnowledgeRequest, GenerateRequest, GetKnowledgeRequest, KnowledgeFilter, KnowledgeIds,
        ListKnowledgeRequest, RankRequest, RetrieveRequest, SubmitAnnotationRequest, UpsertKnowledgeRequest,
        annotation::Kind, log_record::Body,
    },
    trainlog::LogReader,
};
use common::*;
use tonic::Code;

fn turn(speaker: proto::Speaker, text: &str) -> proto::ConversationTurn {
    proto::ConversationTurn { speaker: speaker as i32, text: text.into() }
}

fn assert_status<T: std::fmt::Debug>(result: Result<T, tonic::Status>, code: Code, needle: &str) {
    let status = result.expect_err("call should fail");
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(needle), "message {:?} lacks {needle:?}", status.message());
}

#[tokio::test]
async fn knowledge_service_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (_, mut kb) = clients(&server).await;

    let batches = vec![
        UpsertKnowledgeRequest {
            objects: vec![
                knowledge("refund-1", "Refunds within 30 days."),
                knowledge("refund-2", "No refunds on sale items."),
            ],
        },
        UpsertKnowledgeRequest {
            objects: vec![proto::KnowledgeObject {
                kind: proto::KnowledgeKind::Policy as i32,
                metadata: [("domain".to_string(), "shipping".to_string())].into(),
                ..knowledge("ship-1", "Free shipping over $50.")
            }],
        },
    ];
    let totals = kb.upsert_knowledge(tokio_stream::iter(batches)).await.unwrap().into_inner();
    assert_eq!((totals.inserted, totals.updated, totals.unchanged, totals.batches), (3, 0, 0, 2));

    let changed = vec![UpsertKnowledgeRequest {
        objects: vec![
            knowledge("refund-1", "Refunds within 60 days."),
            knowledge("refund-2", "No refunds on sale items."),
        ],
    }];
    let totals = kb.upsert_knowledge(tokio_stream::iter(changed)).await.unwrap().into_inner();
    assert_eq!((totals.inserted, totals.updated, totals.unchanged), (0, 1, 1));
    let get = |id: &str, version: u64| GetKnowledgeRequest { id: id.into(), version, include_deleted: false };
    let latest = kb.get_knowledge(get("refund-1", 0)).await.unwrap().into_inner();
    assert_eq!((latest.version, latest.text.as_str()), (2, "Refunds within 60 days."));
    assert_eq!(kb.get_knowledge(get("refund-1", 1)).await.unwrap().into_inner().text, "Refunds within 30 days.");
    assert_eq!(kb.get_knowledge(get("refund-2", 0)).await.unwrap().into_inner().version, 1);
    assert_status(kb.get_knowledge(get("refund-1", 7)).await, Code::NotFound, "no version 7");

    let billing =
        KnowledgeFilter { metadata: [("domain".to_string(), "billing".to_string())].into(), ..Default::default() };
    let page = kb
        .list_knowledge(ListKnowledgeRequest { page_size: 1, filter: Some(billing.clone()), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.objects.iter().map(|o| o.id.as_str()).collect::<Vec<_>>(), ["refund-1"]);
    assert!(!page.next_page_token.contains("refund-1"), "page tokens are opaque: {}", page.next_page_token);
    let token = &page.next_page_token;
    let last = if token.ends_with('0') { "1" } else { "0" };
    for forged in ["refund-1".to_string(), "p1".into(), format!("{}{last}", &token[..token.len() - 1])] {
        let list = ListKnowledgeRequest { page_size: 1, page_token: forged.into(), ..Default::default() };
        assert_status(
            kb.list_knowledge(list).await,
            Code::InvalidArgument,
            "page_token: is not a token this server issued",
        );
    }
    let page = kb
        .list_knowledge(ListKnowledgeRequest {
            page_size: 1,
            page_token: page.next_page_token,
            filter: Some(billing),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.objects[0].id, "refund-2");
    let policies = KnowledgeFilter { kinds: vec![proto::KnowledgeKind::Policy as i32], ..Default::default() };
    let page = kb
        .list_knowledge(ListKnowledgeRequest { filter: Some(policies), ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.objects.len(), 1);
    assert!(page.next_page_token.is_empty());

    let deleted = kb.delete_knowledge(DeleteKnowledgeRequest { id: "ship-1".into() }).await.unwrap().into_inner();
    assert_eq!(deleted.version, 2);
    assert_status(kb.get_knowledge(get("ship-1", 0)).await, Code::NotFound, "deleted");
    let tombstone = kb
        .get_knowledge(GetKnowledgeRequest { id: "ship-1".into(), version: 0, include_deleted: true })
        .await
        .unwrap()
        .into_inner();
    assert!(tombstone.deleted);
    // Its old versions went with it (the proto's contract), unless asked for.
    assert_status(kb.get_knowledge(get("ship-1", 1)).await, Code::NotFound, "deleted");
    let old = GetKnowledgeRequest { id: "ship-1".into(), version: 1, include_deleted: true };
    assert!(!kb.get_knowledge(old).await.unwrap().into_inner().deleted);
    let all = kb.list_knowledge(ListKnowledgeRequest::default()).await.unwrap().into_inner();
    assert_eq!(all.objects.len(), 2, "tombstones are not listed");

    assert_status(kb.delete_knowledge(DeleteKnowledgeRequest { id: "nope".into() }).await, Code::NotFound, "\"nope\"");
    let duplicate_ids = vec![UpsertKnowledgeRequest { objects: vec![knowledge("a", "x"), knowledge("a", "y")] }];
    assert_status(kb.upsert_knowledge(tokio_stream::iter(duplicate_ids)).await, Code::InvalidArgument, "objects[1].id");
    let blank = vec![UpsertKnowledgeRequest { objects: vec![knowledge("a", "  ")] }];
    assert_status(kb.upsert_knowledge(tokio_stream::iter(blank)).await, Code::InvalidArgument, "objects[0].text");
    let no_kind =
        vec![UpsertKnowledgeRequest { objects: vec![proto::KnowledgeObject { kind: 0, ..knowledge("a", "x") }] }];
    assert_status(kb.upsert_knowledge(tokio_stream::iter(no_kind)).await, Code::InvalidArgument, "objects[0].kind");
    let huge = vec![UpsertKnowledgeRequest { objects: vec![knowledge("a", &"x".repeat(70_000))] }];
    assert_status(kb.upsert_knowledge(tokio_stream::iter(huge)).await, Code::InvalidArgument, "limit is 65536 bytes");
    assert_status(
        kb.list_knowledge(ListKnowledgeRequest { page_size: 5000, ..Default::default() }).await,
        Code::InvalidArgument,
        "page_size",
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn model_calls_validate_then_name_the_missing_model() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (mut support, mut kb) = clients(&server).await;
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest {
        objects: vec![knowledge("k1", "Refunds.")],
    }]))
    .await
    .unwrap();

    let retrieve = RetrieveRequest { query: "Can I get a refund?".into(), top_k: 75, ..Default::default() };
    assert_status(
        support.retrieve(RetrieveRequest { query: " ".into(), ..Default::default() }).await,
        Code::InvalidArgument,
        "query",
    );
    assert_status(
        support.retrieve(RetrieveRequest { top_k: 1001, ..retrieve.clone() }).await,
        Code::InvalidArgument,
        "top_k",
    );
    assert_status(
        support
            .retrieve(RetrieveRequest { context: vec![turn(proto::Speaker::Unspecified, "hi")], ..retrieve.clone() })
            .await,
        Code::InvalidArgument,
        "context[0].speaker",
    );
    assert_status(support.retrieve(retrieve).await, Code::Unavailable, "embedding model");

    let rank = |candidates| RankRequest { query: "refund?".into(), candidates: Some(candidates), ..Default::default() };
    let ids = |ids: &[&str]| {
        proto::rank_request::Candidates::KnowledgeIds(KnowledgeIds { ids: ids.iter().map(|s| s.to_string()).collect() })
    };
    assert_status(support.rank(rank(ids(&["k1", "missing"]))).await, Code::NotFound, "knowledge_ids.ids[1]");
    assert_status(
        support.rank(RankRequest { candidates: None, ..rank(ids(&["k1"])) }).await,
        Code::InvalidArgument,
        "candidates",
    );
    let generate_ix = generate_interaction(&["k1"]);
    server.state.interactions.record(generate_ix.clone()).await.unwrap();
    assert_status(
        support
            .rank(rank(proto::rank_request::Candidates::RetrieveInteractionId(generate_ix.interaction_id.clone())))
            .await,
        Code::InvalidArgument,
        "retrieve_interaction_id",
    );
    assert_status(
        support.rank(rank(proto::rank_request::Candidates::RetrieveInteractionId("ix-unknown".into()))).await,
        Code::NotFound,
        "ix-unknown",
    );
    assert_status(support.rank(rank(ids(&["k1"]))).await, Code::Unavailable, "ranker");

    let generate = GenerateRequest {
        conversation: vec![turn(proto::Speaker::Customer, "Hi, I want a refund.")],
        grounding: Some(proto::generate_request::Grounding::KnowledgeIds(KnowledgeIds { ids: vec!["k1".into()] })),
        ..Default::default()
    };
    let ends_with_agent = GenerateRequest {
        conversation: vec![turn(proto::Speaker::Customer, "Hi"), turn(proto::Speaker::Agent, "Hello")],
        ..generate.clone()
    };
    assert_status(support.generate(ends_with_agent).await, Code::InvalidArgument, "customer's turn");
    assert_status(
        support.generate(GenerateRequest { num_candidates: 9, ..generate.clone() }).await,
        Code::InvalidArgument,
        "num_candidates",
    );
    let bad_sampling = proto::SamplingParams { top_p: 1.5, ..Default::default() };
    assert_status(
        support.generate(GenerateRequest { sampling: Some(bad_sampling), ..generate.clone() }).await,
        Code::InvalidArgument,
        "sampling.top_p",
    );
    assert_status(support.generate(generate.clone()).await, Code::Unavailable, "generator");
    assert_status(support.generate_stream(generate).await, Code::Unavailable, "generator");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn annotations_of_all_kinds_are_validated_deduplicated_and_logged() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (mut support, mut kb) = clients(&server).await;
    let objects = vec![knowledge("k1", "Refunds."), knowledge("k2", "Returns."), knowledge("k3", "Not shown.")];
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects }])).await.unwrap();
    let ix = generate_interaction(&["k1", "k2"]);
    server.state.interactions.record(ix.clone()).await.unwrap();
    let submit = |annotation: proto::Annotation| SubmitAnnotationRequest { annotation: Some(annotation) };
    let with_kind = |id: &str, kind: Kind| proto::Annotation { kind: Some(kind), ..preference(id, &ix, "") };

    // Preference: accepted once, then flagged duplicate with the same sequence.
    let first =
        support.submit_annotation(submit(preference("a-pref", &ix, "cites the policy"))).await.unwrap().into_inner();
    assert!(!first.duplicate);
    assert!(first.log_sequence > 0);
    assert_eq!(first.annotation_delay, Some(prost_types::Duration { seconds: 3, nanos: 0 }));
    let again =
        support.submit_annotation(submit(preference("a-pref", &ix, "cites the policy"))).await.unwrap().into_inner();
    assert!(again.duplicate);
    assert_eq!(again.log_sequence, first.log_sequence);
    assert_status(
        support.submit_annotation(submit(preference("a-pref", &ix, "changed my mind"))).await,
        Code::AlreadyExists,
        "a-pref",
    );

    // Adoption, relevance, missing knowledge.
    let adoption = |decision: proto::AdoptionDecision, sent: &str| {
        Kind::Adoption(proto::Adoption {
            candidate_id: ix.candidates[1].candidate_id.clone(),
            decision: decision as i32,
            sent_text: sent.into(),
            rationale: "tone".into(),
        })
    };
    support
        .submit_annotation(submit(with_kind("a-adopt", adoption(proto::AdoptionDecision::Edited, "Edited reply"))))
        .await
        .unwrap();
    let relevance = |ids: &[&str]| {
        Kind::Relevance(proto::KnowledgeRelevance {
            judgements: ids
                .iter()
                .map(|id| proto::KnowledgeJudgement {
                    knowledge_id: id.to_string(),
                    label: proto::RelevanceLabel::Relevant as i32,
                })
                .collect(),
        })
    };
    support.submit_annotation(submit(with_kind("a-rel", relevance(&["k1", "k2"])))).await.unwrap();
    let missing =
        |source| Kind::MissingKnowledge(proto::MissingKnowledge { source: Some(source), note: "needed".into() });
    support
        .submit_annotation(submit(with_kind(
            "a-miss",
            missing(proto::missing_knowledge::Source::KnowledgeId("k3".into())),
        )))
        .await
        .unwrap();
    // A retry stays OK even once what it refers to is gone.
    kb.delete_knowledge(DeleteKnowledgeRequest { id: "k3".into() }).await.unwrap();
    let retry = support
        .submit_annotation(submit(with_kind(
            "a-miss",
            missing(proto::missing_knowledge::Source::KnowledgeId("k3".into())),
        )))
        .await
        .unwrap()
        .into_inner();
    assert!(retry.duplicate);
    let external = proto::ExternalReference {
        title: "Carrier FAQ".into(),
        uri: "https://example.com/faq".into(),
        excerpt: String::new(),
    };
    support
        .submit_annotation(submit(with_kind("a-ext", missing(proto::missing_knowledge::Source::External(external)))))
        .await
        .unwrap();

    // Each validation error names the field.
    let unknown = proto::Annotation { interaction_id: "ix-nope".into(), ..preference("e1", &ix, "") };
    assert_status(support.submit_annotation(submit(unknown)).await, Code::NotFound, "ix-nope");
    let not_shown = Kind::Preference(proto::PairwisePreference {
        preferred_candidate_id: "someone-else/c0".into(),
        other_candidate_id: ix.candidates[1].candidate_id.clone(),
        strength: proto::PreferenceStrength::SlightlyBetter as i32,
        rationale: String::new(),
    });
    assert_status(
        support.submit_annotation(submit(with_kind("e2", not_shown))).await,
        Code::InvalidArgument,
        "preferred_candidate_id",
    );
    assert_status(
        support.submit_annotation(submit(with_kind("e3", relevance(&["k1", "k3"])))).await,
        Code::InvalidArgument,
        "judgements[1].knowledge_id",
    );
    assert_status(
        support.submit_annotation(submit(preference("e4", &ix, &"x".repeat(5000)))).await,
        Code::InvalidArgument,
        "limit is 4096 bytes",
    );
    assert_status(
        support.submit_annotation(submit(with_kind("e5", adoption(proto::AdoptionDecision::Edited, "")))).await,
        Code::InvalidArgument,
        "sent_text",
    );
    assert_status(
        support
            .submit_annotation(submit(with_kind(
                "e6",
                missing(proto::missing_knowledge::Source::KnowledgeId("k404".into())),
            )))
            .await,
        Code::NotFound,
        "k404",
    );
    let backwards = proto::Annotation {
        annotated_at: Some(timestamp(SystemTime::now() - Duration::from_secs(60))),
        ..preference("e7", &ix, "")
    };
    assert_status(
        support.submit_annotation(submit(backwards)).await,
        Code::InvalidArgument,
        "before annotation.shown_at",
    );
    let future = proto::Annotation {
        annotated_at: Some(timestamp(SystemTime::now() + Duration::from_secs(3600))),
        ..preference("e8", &ix, "")
    };
    assert_status(
        support.submit_annotation(submit(future)).await,
        Code::InvalidArgument,
        "ahead of the server's clock",
    );
    let no_time = proto::Annotation { shown_at: None, ..preference("e9", &ix, "") };
    assert_status(support.submit_annotation(submit(no_time)).await, Code::InvalidArgument, "annotation.shown_at");
    let year_zero = prost_types::Timestamp { seconds: -62_135_596_801, nanos: 0 };
    let ancient = proto::Annotation { shown_at: Some(year_zero), ..preference("e11", &ix, "") };
    assert_status(support.submit_annotation(submit(ancient)).await, Code::InvalidArgument, "outside years 1 to 9999");
    let mut bad_nanos = timestamp(SystemTime::now());
    bad_nanos.nanos = 1_000_000_000;
    let bad_nanos = proto::Annotation { annotated_at: Some(bad_nanos), ..preference("e12", &ix, "") };
    assert_status(
        support.submit_annotation(submit(bad_nanos)).await,
        Code::InvalidArgument,
        "annotation.annotated_at: has nanos 1000000000",
    );
    let before_answer = SystemTime::now() - Duration::from_secs(3_600);
    let before_answer = proto::Annotation {
        shown_at: Some(timestamp(before_answer)),
        annotated_at: Some(timestamp(before_answer + Duration::from_secs(5))),
        ..preference("e13", &ix, "")
    };
    assert_status(support.submit_annotation(submit(before_answer)).await, Code::InvalidArgument, "before interaction");
    let blank_agent = proto::Annotation { agent_id: " \t ".into(), ..preference("e14", &ix, "") };
    assert_status(
        support.submit_annotation(submit(blank_agent)).await,
        Code::InvalidArgument,
        "annotation.agent_id: is blank",
    );
    let no_kind = proto::Annotation { kind: None, ..preference("e10", &ix, "") };
    assert_status(support.submit_annotation(submit(no_kind)).await, Code::InvalidArgument, "annotation.kind");
    assert_status(
        support.submit_annotation(SubmitAnnotationRequest { annotation: None }).await,
        Code::InvalidArgument,
        "annotation",
    );

    // The log holds the interaction and each accepted annotation once, with its delay.
    server.shutdown().await.unwrap();
    let mut annotations = Vec::new();
    let mut interactions = 0;
    LogReader::new(dir.path().join("log"))
        .read_from(1, |record| {
            match record.body {
                Some(Body::Annotation(a)) => annotations.push(a),
                Some(Body::Interaction(_)) => interactions += 1,
                None => {}
            }
            ControlFlow::Continue(())
        })
        .unwrap();
    assert_eq!(interactions, 1);
    let ids: Vec<_> = annotations.iter().map(|a| a.annotation.as_ref().unwrap().annotation_id.as_str()).collect();
    assert_eq!(ids, ["a-pref", "a-adopt", "a-rel", "a-miss", "a-ext"]);
    assert!(annotations.iter().all(|a| a.delay == Some(prost_types::Duration { seconds: 3, nanos: 0 })));
}

#[tokio::test]
async fn idempotency_holds_under_concurrency_and_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (support, _) = clients(&server).await;
    let ix = seed_generate(&server, vec![knowledge("k1", "Refunds.")]).await;
    let calls = (0..16).map(|_| {
        let mut support = support.clone();
        let request = SubmitAnnotationRequest { annotation: Some(preference("same", &ix, "r")) };
        tokio::spawn(async move { support.submit_annotation(request).await.unwrap().into_inner() })
    });
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.duplicate).count(), 1);
    assert!(answers.iter().all(|a| a.log_sequence == answers[0].log_sequence));
    server.shutdown().await.unwrap();

    let server = start(dir.path()).await;
    let (mut support, _) = clients(&server).await;
    let request = SubmitAnnotationRequest { annotation: Some(preference("same", &ix, "r")) };
    let answer = support.submit_annotation(request).await.unwrap().into_inner();
    assert!(answer.duplicate, "the rebuilt index remembers the annotation");
    assert_eq!(answer.log_sequence, answers[0].log_sequence);
    let other = SubmitAnnotationRequest { annotation: Some(preference("fresh", &ix, "r")) };
    assert!(
        !support.submit_annotation(other).await.unwrap().into_inner().duplicate,
        "the interaction is known after restart"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn health_and_reflection() {
    use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let channel = channel(&server).await;
    let mut health = HealthClient::new(channel.clone());
    for service in ["", "aitl.v1.SupportService", "aitl.v1.KnowledgeService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner().status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
    let mut reflection = ServerReflectionClient::new(channel);
    let requests = vec![
        ServerReflectionRequest {
            message_request: Some(MessageRequest::ListServices(String::new())),
            ..Default::default()
        },
        ServerReflectionRequest {
            message_request: Some(MessageRequest::FileContainingSymbol("aitl.v1.SupportService".into())),
            ..Default::default()
        },
    ];
    let mut responses = reflection.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected a service list")
    };
    let names: Vec<_> = list.service.iter().map(|s| s.name.as_str()).collect();
    for expected in ["aitl.v1.SupportService", "aitl.v1.KnowledgeService", "grpc.health.v1.Health"] {
        assert!(names.contains(&expected), "{names:?} lacks {expected}");
    }
    let Some(MessageResponse::FileDescriptorResponse(files)) =
        responses.message().await.unwrap().unwrap().message_response
    else {
        panic!("expected file descriptors")
    };
    assert!(!files.file_descriptor_proto.is_empty());
    server.shutdown().await.unwrap();
}
