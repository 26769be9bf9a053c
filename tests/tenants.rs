//! Tenant isolation over gRPC: two tenants with overlapping knowledge ids
//! and annotation ids never see, search, rank, ground in, annotate or
//! delete each other's data; another tenant's ids answer NOT_FOUND exactly
//! as ids that never existed; a key cannot be used to act for another
//! tenant; and the isolation holds after a restart (vectors reload per
//! tenant) and in the worker's knowledge-gap queue.

mod common;

use std::time::{Duration, SystemTime};

use aitl::{
    proto::{
        self, DeleteKnowledgeRequest, GenerateRequest, GetKnowledgeRequest, KnowledgeIds, ListKnowledgeGapsRequest,
        ListKnowledgeRequest, RankRequest, RequestContext, RetrieveRequest, RetrieveResponse, SubmitAnnotationRequest,
        UpsertKnowledgeRequest, annotation, flywheel_service_client::FlywheelServiceClient,
        generate_request::Grounding, knowledge_service_client::KnowledgeServiceClient, missing_knowledge,
        rank_request::Candidates, support_service_client::SupportServiceClient,
    },
    tenancy::TENANT_HEADER,
    worker::{Worker, judge::JudgeOptions},
};
use common::*;
use tonic::{Code, transport::Channel};

/// How a call names who it is: an API key, or (without keys) the tenant
/// metadata, or nothing at all.
#[derive(Clone, Copy)]
enum As<'a> {
    Key(&'a str),
    Header(&'a str),
    Nobody,
}

fn call<T>(message: T, who: As) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    match who {
        As::Key(key) => {
            request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
        }
        As::Header(tenant) => {
            request.metadata_mut().insert(TENANT_HEADER, tenant.parse().unwrap());
        }
        As::Nobody => {}
    }
    request
}

struct Clients {
    support: SupportServiceClient<Channel>,
    kb: KnowledgeServiceClient<Channel>,
    flywheel: FlywheelServiceClient<Channel>,
}

impl Clients {
    async fn of(server: &aitl::server::RunningServer) -> Self {
        let channel = channel(server).await;
        Clients {
            support: SupportServiceClient::new(channel.clone()),
            kb: KnowledgeServiceClient::new(channel.clone()),
            flywheel: FlywheelServiceClient::new(channel),
        }
    }

    async fn upsert(&mut self, who: As<'_>, objects: Vec<proto::KnowledgeObject>) {
        let stream = tokio_stream::iter(vec![UpsertKnowledgeRequest { objects }]);
        self.kb.upsert_knowledge(call(stream, who)).await.unwrap();
    }

    async fn get(&mut self, who: As<'_>, id: &str) -> Result<proto::KnowledgeObject, tonic::Status> {
        let request = GetKnowledgeRequest { id: id.into(), ..Default::default() };
        self.kb.get_knowledge(call(request, who)).await.map(tonic::Response::into_inner)
    }

    async fn list(&mut self, who: As<'_>) -> Vec<(String, String)> {
        let page = self.kb.list_knowledge(call(ListKnowledgeRequest::default(), who)).await.unwrap().into_inner();
        page.objects.into_iter().map(|o| (o.id, o.text)).collect()
    }

    async fn retrieve(&mut self, who: As<'_>, query: &str) -> RetrieveResponse {
        let request = RetrieveRequest { query: query.into(), top_k: 10, ..Default::default() };
        self.support.retrieve(call(request, who)).await.unwrap().into_inner()
    }

    async fn annotate(&mut self, who: As<'_>, annotation: proto::Annotation) -> Result<bool, tonic::Status> {
        let request = SubmitAnnotationRequest { annotation: Some(annotation) };
        self.support.submit_annotation(call(request, who)).await.map(|r| r.into_inner().duplicate)
    }
}

fn texts(response: &RetrieveResponse) -> Vec<(String, String)> {
    response.results.iter().map(|r| r.knowledge.as_ref().unwrap()).map(|k| (k.id.clone(), k.text.clone())).collect()
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    result.err().map_or(Code::Ok, |s| s.code())
}

/// A relevance judgement on the first object a Retrieve showed.
fn relevance(annotation_id: &str, retrieved: &RetrieveResponse) -> proto::Annotation {
    let shown_at = SystemTime::now();
    proto::Annotation {
        annotation_id: annotation_id.into(),
        interaction_id: retrieved.interaction_id.clone(),
        agent_id: "agent-7".into(),
        shown_at: Some(shown_at.into()),
        annotated_at: Some((shown_at + Duration::from_secs(2)).into()),
        kind: Some(annotation::Kind::Relevance(proto::KnowledgeRelevance {
            judgements: vec![proto::KnowledgeJudgement {
                knowledge_id: texts(retrieved)[0].0.clone(),
                label: proto::RelevanceLabel::Relevant as i32,
            }],
        })),
        ..Default::default()
    }
}

/// The same external source reported missing, on a Retrieve interaction.
fn missing_source(annotation_id: &str, retrieved: &RetrieveResponse, agent: &str) -> proto::Annotation {
    let mut annotation = relevance(annotation_id, retrieved);
    annotation.agent_id = agent.into();
    annotation.kind = Some(annotation::Kind::MissingKnowledge(proto::MissingKnowledge {
        source: Some(missing_knowledge::Source::External(proto::ExternalReference {
            title: "Holiday shipping calendar".into(),
            ..Default::default()
        })),
        note: String::new(),
    }));
    annotation
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_with_overlapping_ids_never_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let key = |tenant: &str| {
        aitl_ok(dir.path(), &["keys", "create", "--tenant", tenant, "--role", "operator"]).trim().to_string()
    };
    let (acme_key, globex_key) = (key("acme"), key("globex"));
    let (acme, globex) = (As::Key(&acme_key), As::Key(&globex_key));
    let (refunds, shipping) = ("Refunds are paid back within 14 days of the return.", "Globex ships on Mondays only.");
    let server = aitl::server::start(config_with_embedder(dir.path())).await.unwrap();
    let mut c = Clients::of(&server).await;

    // The same id in both tenants, and an id only acme has.
    c.upsert(acme, vec![knowledge("k1", refunds), knowledge("k2", "Gift cards never expire.")]).await;
    c.upsert(globex, vec![knowledge("k1", shipping)]).await;
    assert_eq!(c.get(acme, "k1").await.unwrap().text, refunds);
    assert_eq!(c.get(globex, "k1").await.unwrap().text, shipping);
    assert_eq!(c.get(globex, "k1").await.unwrap().version, 1, "acme's upsert made no version of globex's k1");
    let hidden = c.get(globex, "k2").await.unwrap_err();
    let never = c.get(globex, "k9").await.unwrap_err();
    assert_eq!((hidden.code(), never.code()), (Code::NotFound, Code::NotFound));
    assert_eq!(
        hidden.message().replace("k2", "ID"),
        never.message().replace("k9", "ID"),
        "another tenant's id reads exactly like one that does not exist"
    );
    assert_eq!(c.list(globex).await, [("k1".to_string(), shipping.to_string())]);
    assert_eq!(c.list(acme).await.len(), 2);

    // Retrieve searches only the caller's objects, at the caller's versions.
    let acme_hits = c.retrieve(acme, "How long until I get my refund?").await;
    assert_eq!(texts(&acme_hits)[0], ("k1".to_string(), refunds.to_string()));
    let globex_hits = c.retrieve(globex, "How long until I get my refund?").await;
    assert_eq!(texts(&globex_hits), [("k1".to_string(), shipping.to_string())]);

    // Rank and Generate cannot reach acme's objects or interactions from globex.
    let rank_ids = |ids: &[&str]| RankRequest {
        query: "refund".into(),
        candidates: Some(Candidates::KnowledgeIds(KnowledgeIds { ids: ids.iter().map(|s| s.to_string()).collect() })),
        ..Default::default()
    };
    assert_eq!(code(c.support.rank(call(rank_ids(&["k1", "k2"]), globex)).await), Code::NotFound);
    let ranked = c.support.rank(call(rank_ids(&["k1"]), globex)).await.unwrap().into_inner();
    assert_eq!(ranked.items[0].knowledge.as_ref().unwrap().knowledge.as_ref().unwrap().text, shipping);
    let rank_retrieved = RankRequest {
        query: "refund".into(),
        candidates: Some(Candidates::RetrieveInteractionId(acme_hits.interaction_id.clone())),
        ..Default::default()
    };
    assert_eq!(code(c.support.rank(call(rank_retrieved.clone(), globex)).await), Code::NotFound);
    assert_eq!(code(c.support.rank(call(rank_retrieved, acme)).await), Code::Ok);
    let generate = |grounding: Grounding| GenerateRequest {
        conversation: vec![proto::ConversationTurn {
            speaker: proto::Speaker::Customer as i32,
            text: "Where is my refund?".into(),
        }],
        grounding: Some(grounding),
        ..Default::default()
    };
    let on_k2 = || generate(Grounding::KnowledgeIds(KnowledgeIds { ids: vec!["k2".into()] }));
    let on_acme_retrieve = || generate(Grounding::GroundingInteractionId(acme_hits.interaction_id.clone()));
    assert_eq!(code(c.support.generate(call(on_k2(), globex)).await), Code::NotFound);
    assert_eq!(code(c.support.generate(call(on_acme_retrieve(), globex)).await), Code::NotFound);
    // Acme's own grounding resolves; the call then needs the generator this server lacks.
    assert_eq!(code(c.support.generate(call(on_k2(), acme)).await), Code::Unavailable);
    assert_eq!(code(c.support.generate(call(on_acme_retrieve(), acme)).await), Code::Unavailable);

    // Annotations: another tenant's interaction is unknown; ids are per tenant.
    let stolen = c.annotate(globex, relevance("a1", &acme_hits)).await.unwrap_err();
    assert_eq!(stolen.code(), Code::NotFound, "{stolen:?}");
    assert!(!c.annotate(acme, relevance("a1", &acme_hits)).await.unwrap(), "acme's a1 is new");
    let globex_a1 = relevance("a1", &globex_hits);
    assert!(!c.annotate(globex, globex_a1.clone()).await.unwrap(), "globex's a1 is its own");
    assert!(c.annotate(globex, globex_a1).await.unwrap(), "a retry is a duplicate");

    // A key acts for its own tenant only, whatever the call says.
    let mut pretend = call(GetKnowledgeRequest { id: "k2".into(), ..Default::default() }, globex);
    pretend.metadata_mut().insert(TENANT_HEADER, "acme".parse().unwrap());
    let refused = c.kb.get_knowledge(pretend).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(refused.message().contains("globex"), "{}", refused.message());
    let in_context = RetrieveRequest {
        query: "refund".into(),
        request_context: Some(RequestContext { tenant: "acme".into(), ..Default::default() }),
        ..Default::default()
    };
    assert_eq!(code(c.support.retrieve(call(in_context, globex)).await), Code::PermissionDenied);
    let mut declared = relevance("a2", &globex_hits);
    declared.tenant = "acme".into();
    assert_eq!(code(c.annotate(globex, declared).await), Code::PermissionDenied);
    let mut own = relevance("a3", &globex_hits);
    own.tenant = "globex".into();
    assert_eq!(code(c.annotate(globex, own).await), Code::Ok, "naming one's own tenant is fine");

    // Deleting globex's k1 leaves acme's k1 alone.
    c.kb.delete_knowledge(call(DeleteKnowledgeRequest { id: "k1".into() }, globex)).await.unwrap();
    assert_eq!(code(c.get(globex, "k1").await), Code::NotFound);
    assert_eq!(c.get(acme, "k1").await.unwrap().text, refunds);
    assert!(texts(&c.retrieve(globex, "refund").await).is_empty());
    assert_eq!(
        code(c.kb.delete_knowledge(call(DeleteKnowledgeRequest { id: "k2".into() }, globex)).await),
        Code::NotFound
    );

    // Both tenants report the same missing source: each sees its own gap.
    c.annotate(acme, missing_source("gap", &acme_hits, "agent-a")).await.unwrap();
    c.annotate(globex, missing_source("gap", &globex_hits, "agent-g")).await.unwrap();
    let log_dir = dir.path().join("log");
    let mut worker = Worker::open(&dir.path().join("worker"), &log_dir, JudgeOptions::default()).unwrap();
    assert_eq!(
        worker.run_once(&log_dir).unwrap().annotations,
        5,
        "every tenant's annotations, none lost as duplicates"
    );
    for (who, agent) in [(acme, "agent-a"), (globex, "agent-g")] {
        let gaps = c.flywheel.list_knowledge_gaps(call(ListKnowledgeGapsRequest::default(), who)).await.unwrap();
        let gaps = gaps.into_inner();
        assert_eq!(gaps.total, 1, "{gaps:?}");
        assert_eq!((gaps.gaps[0].reports, gaps.gaps[0].agent_ids.clone()), (1, vec![agent.to_string()]));
    }

    // After a restart each tenant's vectors load back into its own index.
    let acme_interaction = acme_hits.interaction_id.clone();
    drop(c);
    server.shutdown().await.unwrap();
    let server = aitl::server::start(config_with_embedder(dir.path())).await.unwrap();
    let mut c = Clients::of(&server).await;
    assert_eq!(texts(&c.retrieve(acme, "refund").await)[0], ("k1".to_string(), refunds.to_string()));
    assert!(texts(&c.retrieve(globex, "refund").await).is_empty());
    let after = RankRequest {
        query: "refund".into(),
        candidates: Some(Candidates::RetrieveInteractionId(acme_interaction)),
        ..Default::default()
    };
    assert_eq!(
        code(c.support.rank(call(after.clone(), globex)).await),
        Code::NotFound,
        "replayed interactions keep their tenant"
    );
    assert_eq!(code(c.support.rank(call(after, acme)).await), Code::Ok);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_keys_the_tenant_metadata_scopes_calls() {
    let dir = tempfile::tempdir().unwrap();
    let server = aitl::server::start(config(dir.path())).await.unwrap();
    let mut c = Clients::of(&server).await;
    c.upsert(As::Header("acme"), vec![knowledge("k1", "Acme refunds in 14 days.")]).await;
    c.upsert(As::Nobody, vec![knowledge("k1", "Default refunds in 30 days.")]).await;
    assert_eq!(c.get(As::Header("acme"), "k1").await.unwrap().text, "Acme refunds in 14 days.");
    assert_eq!(c.get(As::Nobody, "k1").await.unwrap().text, "Default refunds in 30 days.");
    assert_eq!(c.get(As::Header("default"), "k1").await.unwrap().text, "Default refunds in 30 days.");
    assert_eq!(code(c.get(As::Header("globex"), "k1").await), Code::NotFound);
    // Without keys a body's tenant field is attribution only, as before tenants.
    let record = seed_generate(&server, vec![knowledge("k2", "Default gift cards.")]).await;
    let mut attributed = preference("p1", &record, "");
    attributed.tenant = "someone".into();
    assert!(!c.annotate(As::Nobody, attributed).await.unwrap());
    assert_eq!(code(c.annotate(As::Header("acme"), preference("p2", &record, "")).await), Code::NotFound);
    let bad = c.get(As::Header("acme/eu"), "k1").await.unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument, "{bad:?}");
    assert!(bad.message().contains(TENANT_HEADER), "{}", bad.message());
    server.shutdown().await.unwrap();
}
