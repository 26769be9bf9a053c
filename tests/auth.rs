//! API keys and roles over gRPC: with keys configured (by `aitl keys
//! create`), every RPC refuses a missing, malformed or revoked key with
//! UNAUTHENTICATED and a key of the wrong role with PERMISSION_DENIED, lets
//! the right role through to the service, keeps health open, binds
//! annotations to the key's agent, and a revocation takes effect while the
//! server runs.

mod common;

use std::{collections::BTreeMap, time::Duration};

use aitl::proto::{
    self, DeleteKnowledgeRequest, GenerateRequest, GetKnowledgeRequest, GetServingModelsRequest,
    ListKnowledgeGapsRequest, ListKnowledgeRequest, RankRequest, RetrieveRequest, SubmitAnnotationRequest,
    UpsertKnowledgeRequest, flywheel_service_client::FlywheelServiceClient,
    knowledge_service_client::KnowledgeServiceClient, support_service_client::SupportServiceClient,
};
use common::*;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

fn with_key<T>(message: T, key: Option<&str>) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    if let Some(key) = key {
        request.metadata_mut().insert("authorization", format!("Bearer {key}").parse().unwrap());
    }
    request
}

fn code<T>(result: Result<T, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Every RPC once with `key`: the code each answered.
async fn every_rpc(channel: &Channel, key: Option<&str>) -> BTreeMap<&'static str, Code> {
    let mut support = SupportServiceClient::new(channel.clone());
    let mut kb = KnowledgeServiceClient::new(channel.clone());
    let mut flywheel = FlywheelServiceClient::new(channel.clone());
    let mut codes = BTreeMap::new();
    let retrieve = RetrieveRequest { query: "refund?".into(), ..Default::default() };
    codes.insert("Retrieve", code(support.retrieve(with_key(retrieve, key)).await));
    codes.insert("Rank", code(support.rank(with_key(RankRequest::default(), key)).await));
    codes.insert("Generate", code(support.generate(with_key(GenerateRequest::default(), key)).await));
    codes.insert("GenerateStream", code(support.generate_stream(with_key(GenerateRequest::default(), key)).await));
    let annotation = SubmitAnnotationRequest::default();
    codes.insert("SubmitAnnotation", code(support.submit_annotation(with_key(annotation, key)).await));
    let upsert =
        tokio_stream::iter(vec![UpsertKnowledgeRequest { objects: vec![knowledge("k1", "Refunds in 14 days.")] }]);
    codes.insert("UpsertKnowledge", code(kb.upsert_knowledge(with_key(upsert, key)).await));
    let get = GetKnowledgeRequest { id: "k1".into(), ..Default::default() };
    codes.insert("GetKnowledge", code(kb.get_knowledge(with_key(get, key)).await));
    codes.insert("ListKnowledge", code(kb.list_knowledge(with_key(ListKnowledgeRequest::default(), key)).await));
    let delete = DeleteKnowledgeRequest { id: "nope".into() };
    codes.insert("DeleteKnowledge", code(kb.delete_knowledge(with_key(delete, key)).await));
    let gaps = ListKnowledgeGapsRequest::default();
    codes.insert("ListKnowledgeGaps", code(flywheel.list_knowledge_gaps(with_key(gaps, key)).await));
    let models = GetServingModelsRequest::default();
    codes.insert("GetServingModels", code(flywheel.get_serving_models(with_key(models, key)).await));
    codes
}

fn passed_auth(code: Code) -> bool {
    !matches!(code, Code::Unauthenticated | Code::PermissionDenied)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_and_roles_guard_every_rpc() {
    let dir = tempfile::tempdir().unwrap();
    let key = |role: &str, agent: Option<&str>| {
        let mut args = vec!["keys", "create", "--tenant", "acme", "--role", role];
        if let Some(agent) = agent {
            args.extend(["--agent", agent]);
        }
        aitl_ok(dir.path(), &args).trim().to_string()
    };
    let agent = key("agent", Some("agent-7"));
    let editor = key("knowledge-editor", None);
    let reader = key("reader", None);
    let operator = key("operator", None);
    let listed = aitl_ok(dir.path(), &["keys", "list"]);
    assert_eq!(listed.lines().count(), 4, "{listed}");
    assert!(!listed.contains(agent.rsplit('_').next().unwrap()), "list never shows a secret");

    let server = aitl::server::start(config(dir.path())).await.unwrap();
    let channel = channel(&server).await;

    let health = HealthClient::new(channel.clone()).check(HealthCheckRequest::default()).await.unwrap();
    assert_eq!(health.into_inner().status, 1, "health needs no key");
    for key in [None, Some("aitl_nope"), Some("not-a-key")] {
        let codes = every_rpc(&channel, key).await;
        assert!(codes.values().all(|c| *c == Code::Unauthenticated), "{key:?}: {codes:?}");
        assert_eq!(codes.len(), 11);
    }
    let missing = KnowledgeServiceClient::new(channel.clone()).list_knowledge(ListKnowledgeRequest::default()).await;
    assert!(missing.unwrap_err().message().contains("authorization: Bearer"));

    let allowed = |codes: &BTreeMap<&str, Code>| -> Vec<String> {
        codes.iter().filter(|(_, c)| passed_auth(**c)).map(|(m, _)| m.to_string()).collect()
    };
    let support = ["Generate", "GenerateStream", "Rank", "Retrieve", "SubmitAnnotation"];
    let reads = ["GetKnowledge", "ListKnowledge"];
    let sorted = |names: &[&[&str]]| {
        let mut all: Vec<String> = names.concat().iter().map(|s| s.to_string()).collect();
        all.sort();
        all
    };
    let cases = [
        (
            &operator,
            sorted(&[
                &support,
                &reads,
                &["DeleteKnowledge", "UpsertKnowledge", "ListKnowledgeGaps", "GetServingModels"],
            ]),
        ),
        (&agent, sorted(&[&support, &reads, &["ListKnowledgeGaps"]])),
        (&editor, sorted(&[&reads, &["DeleteKnowledge", "UpsertKnowledge", "ListKnowledgeGaps"]])),
        (&reader, sorted(&[&reads, &["GetServingModels", "ListKnowledgeGaps"]])),
    ];
    for (key, want) in cases {
        let codes = every_rpc(&channel, Some(key)).await;
        assert_eq!(allowed(&codes), want, "{codes:?}");
        assert!(codes.values().all(|c| *c != Code::Unauthenticated));
    }
    let denied = SupportServiceClient::new(channel.clone())
        .retrieve(with_key(RetrieveRequest { query: "q".into(), ..Default::default() }, Some(&editor)))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    assert!(denied.message().contains("role knowledge-editor"), "{}", denied.message());

    // An agent's key annotates only as that agent.
    let record = aitl::proto::InteractionRecord { tenant: "acme".into(), ..generate_interaction(&["k1"]) };
    server.state.interactions.record(record.clone()).await.unwrap();
    let mut support = SupportServiceClient::new(channel.clone());
    let as_other = proto::Annotation { agent_id: "agent-8".into(), ..preference("a-1", &record, "") };
    let refused = support
        .submit_annotation(with_key(SubmitAnnotationRequest { annotation: Some(as_other) }, Some(&agent)))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    let as_self = proto::Annotation { agent_id: "agent-7".into(), ..preference("a-2", &record, "") };
    support
        .submit_annotation(with_key(SubmitAnnotationRequest { annotation: Some(as_self) }, Some(&agent)))
        .await
        .unwrap();

    // Revoked while the server runs: refused within the reload interval.
    let agent_id = agent.split('_').nth(1).unwrap().to_string();
    aitl_ok(dir.path(), &["keys", "revoke", &agent_id]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listed = KnowledgeServiceClient::new(channel.clone())
            .list_knowledge(with_key(ListKnowledgeRequest::default(), Some(&agent)))
            .await;
        match listed {
            Err(status) if status.code() == Code::Unauthenticated => {
                assert!(status.message().contains("revoked"), "{}", status.message());
                break;
            }
            _ => assert!(std::time::Instant::now() < deadline, "the revocation never took effect"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let still = every_rpc(&channel, Some(&operator)).await;
    assert!(still.values().all(|c| passed_auth(*c)), "other keys keep working: {still:?}");
    server.shutdown().await.unwrap();
}

/// aitl's own clients present the key in `AITL_API_KEY` (kernel/remote.rs):
/// `aitl load` against a server with keys is refused without it, and with
/// it passes authentication (Retrieve then answers UNAVAILABLE: this server
/// has no embedding model).
#[tokio::test(flavor = "multi_thread")]
async fn aitl_load_presents_the_key_in_aitl_api_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = aitl_ok(dir.path(), &["keys", "create", "--tenant", "acme", "--role", "agent"]).trim().to_string();
    let data = tempfile::tempdir().unwrap();
    mini_beir(data.path(), 3);
    let server = aitl::server::start(config(dir.path())).await.unwrap();
    let url = format!("http://{}", server.addr);
    let load = |key: Option<String>| {
        let (url, dataset) = (url.clone(), data.path().to_path_buf());
        tokio::task::spawn_blocking(move || {
            let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_aitl"));
            command
                .args(["load", "--server", &url, "--pattern", "retrieve", "--agents", "1", "--max-turns", "3"])
                .args(["--warmup", "0", "--duration", "10", "--think-ms", "0", "--format", "json", "--dataset"])
                .arg(&dataset)
                .env("AITL_LOG", "warn")
                .env_remove("AITL_API_KEY");
            if let Some(key) = key {
                command.env("AITL_API_KEY", key);
            }
            let output = command.output().unwrap();
            assert!(output.status.success(), "aitl load: {}", String::from_utf8_lossy(&output.stderr));
            String::from_utf8(output.stdout).unwrap()
        })
    };
    let without = load(None).await.unwrap();
    assert!(without.contains("\"Unauthenticated\": 3"), "{without}");
    let with = load(Some(key)).await.unwrap();
    assert!(!with.contains("Unauthenticated") && with.contains("\"Unavailable\": 3"), "{with}");
    server.shutdown().await.unwrap();
}
