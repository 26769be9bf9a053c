//! Shared by the integration tests: a real server on 127.0.0.1:0 over a
//! temporary data dir, generated clients, and seeded interactions.
#![allow(dead_code)]

use std::{path::Path, time::SystemTime};

use aitl::{
    config::Config,
    feedback::new_interaction_id,
    proto::{
        self, Candidate, InteractionKind, InteractionRecord, KnowledgeKind, KnowledgeObject, ModelVersions,
        ShownKnowledge, knowledge_service_client::KnowledgeServiceClient, support_service_client::SupportServiceClient,
    },
    server::RunningServer,
};
use tonic::transport::Channel;

pub mod chat;
pub mod parity;

/// `aitl --data-dir DIR ARGS…` with no models configured: whether it
/// succeeded, its stdout and its stderr.
pub fn run_aitl(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_aitl"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("AITL_LOG", "warn")
        .env("AITL_EMBEDDER", "none")
        .env("AITL_GENERATOR", "none")
        .output()
        .unwrap();
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

/// [`run_aitl`]'s stdout; panics with its stderr when it fails.
pub fn aitl_ok(data_dir: &Path, args: &[&str]) -> String {
    let (ok, stdout, stderr) = run_aitl(data_dir, args);
    assert!(ok, "aitl {args:?}: {stderr}");
    stdout
}

/// `aitl serve` as a child process on 127.0.0.1:0, with no models and
/// optionally a config file; the child and the address it bound.
pub fn serve_process(data_dir: &Path, config: Option<&Path>) -> (std::process::Child, String) {
    use std::io::BufRead;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_aitl"));
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    let mut child = command
        .args(["--data-dir", data_dir.to_str().unwrap(), "serve", "--listen", "127.0.0.1:0"])
        .env("AITL_LOG", "warn")
        .env("AITL_EMBEDDER", "none")
        .env("AITL_GENERATOR", "none")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split_whitespace().nth(3).unwrap_or_else(|| panic!("server did not start: {line:?}")).to_string();
    (child, addr)
}

/// A server without models: the spine alone.
pub fn config(data_dir: &Path) -> Config {
    let mut config =
        Config { listen: "127.0.0.1:0".parse().unwrap(), data_dir: data_dir.to_path_buf(), ..Config::default() };
    config.models.embedder = "none".into();
    config.models.generator = "none".into();
    config
}

/// A server with the default embedding model (from the shared test cache).
pub fn config_with_embedder(data_dir: &Path) -> Config {
    let mut config = config(data_dir);
    config.models.embedder = default_embedder_dir().display().to_string();
    config
}

pub async fn start(data_dir: &Path) -> RunningServer {
    aitl::server::start(config(data_dir)).await.expect("server starts")
}

pub async fn channel(server: &RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.addr)).unwrap().connect().await.expect("connects")
}

pub async fn clients(server: &RunningServer) -> (SupportServiceClient<Channel>, KnowledgeServiceClient<Channel>) {
    let channel = channel(server).await;
    (SupportServiceClient::new(channel.clone()), KnowledgeServiceClient::new(channel))
}

pub fn knowledge(id: &str, text: &str) -> KnowledgeObject {
    KnowledgeObject {
        id: id.into(),
        kind: KnowledgeKind::Faq as i32,
        title: "Refunds".into(),
        text: text.into(),
        metadata: [("domain".to_string(), "billing".to_string())].into(),
        ..Default::default()
    }
}

/// A Generate interaction as the decoder engine records it: two candidates
/// grounded in `knowledge_ids` (which must exist in the knowledge base).
pub fn generate_interaction(knowledge_ids: &[&str]) -> InteractionRecord {
    let interaction_id = new_interaction_id();
    let candidates = (0..2)
        .map(|i| Candidate {
            candidate_id: format!("{interaction_id}/c{i}"),
            text: format!("Candidate reply {i} [1]"),
            model_version: "test-generator@1".into(),
            ..Default::default()
        })
        .collect();
    InteractionRecord {
        interaction_id,
        kind: InteractionKind::Generate as i32,
        created_at: Some(SystemTime::now().into()),
        shown_knowledge: knowledge_ids
            .iter()
            .enumerate()
            .map(|(i, id)| ShownKnowledge { knowledge_id: id.to_string(), version: 1, score: 1.0, rank: i as u32 + 1 })
            .collect(),
        candidates,
        models: Some(ModelVersions { generator: "test-generator@1".into(), ..Default::default() }),
        ..Default::default()
    }
}

pub fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    at.into()
}

/// When the seeded interactions were shown: fixed per test process, so a
/// resubmitted annotation is byte-for-byte the same, as a client's retry is.
pub fn shown_at() -> SystemTime {
    static SHOWN_AT: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *SHOWN_AT.get_or_init(|| SystemTime::now() - std::time::Duration::from_secs(10))
}

/// Upserts `objects` through the API, then records a Generate interaction
/// that showed them (as the decoder engine will).
pub async fn seed_generate(server: &RunningServer, objects: Vec<KnowledgeObject>) -> InteractionRecord {
    let (_, mut kb) = clients(server).await;
    let ids: Vec<String> = objects.iter().map(|o| o.id.clone()).collect();
    kb.upsert_knowledge(tokio_stream::iter(vec![proto::UpsertKnowledgeRequest { objects }])).await.unwrap();
    let record = generate_interaction(&ids.iter().map(String::as_str).collect::<Vec<_>>());
    server.state.interactions.record(record.clone()).await.unwrap();
    record
}

/// A valid pairwise preference about a seeded interaction.
pub fn preference(annotation_id: &str, record: &InteractionRecord, rationale: &str) -> proto::Annotation {
    // Shown when the interaction was answered: the same for every retry.
    let shown_at = record.created_at.and_then(|t| SystemTime::try_from(t).ok()).unwrap_or_else(shown_at);
    proto::Annotation {
        annotation_id: annotation_id.into(),
        interaction_id: record.interaction_id.clone(),
        agent_id: "agent-7".into(),
        shown_at: Some(timestamp(shown_at)),
        annotated_at: Some(timestamp(shown_at + std::time::Duration::from_secs(3))),
        kind: Some(proto::annotation::Kind::Preference(proto::PairwisePreference {
            preferred_candidate_id: record.candidates[0].candidate_id.clone(),
            other_candidate_id: record.candidates[1].candidate_id.clone(),
            strength: proto::PreferenceStrength::Better as i32,
            rationale: rationale.into(),
        })),
        ..Default::default()
    }
}

/// The default embedding model folder, fetched into the shared test cache on
/// first use (as `aitl serve` does into its data dir).
pub fn default_embedder_dir() -> std::path::PathBuf {
    if let Ok(dir) = std::env::var("AITL_TEST_EMBEDDER") {
        return dir.into();
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models");
    aitl::provision::ensure(&aitl::provision::DEFAULT_EMBEDDER, &cache).expect("default embedding model is available")
}

/// The default generator's GGUF file (SmolLM2-135M-Instruct Q4_1), fetched
/// into the shared test cache on first use.
pub fn default_generator_gguf() -> std::path::PathBuf {
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-models");
    let model = aitl::provision::DEFAULT_GENERATOR;
    aitl::provision::ensure(&model, &cache).expect("default generator is available").join(model.weights)
}

/// How often each annotation_id appears in the training log at `log_dir`.
pub fn annotation_counts(log_dir: &Path) -> std::collections::HashMap<String, usize> {
    let mut counts = std::collections::HashMap::new();
    aitl::trainlog::LogReader::new(log_dir)
        .read_from(1, |record| {
            if let Some(proto::log_record::Body::Annotation(a)) = record.body {
                *counts.entry(a.annotation.unwrap_or_default().annotation_id).or_default() += 1;
            }
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
    counts
}

/// A small data set in DSTC11's layout: `entities` hotels with four FAQs each,
/// one question per FAQ (the relevant one), each after a greeting turn.
pub fn mini_dstc11(dir: &Path, entities: usize) {
    let topics = [
        ("Is parking free?", "Yes, parking is free for guests.", "parking"),
        ("Is breakfast included?", "Breakfast is included in every rate.", "breakfast"),
        ("Do you allow pets?", "Pets are welcome for a small fee.", "pets"),
        ("Is there a pool?", "The hotel has an indoor pool open until 10 pm.", "pool"),
    ];
    let mut hotels = serde_json::Map::new();
    let (mut logs, mut labels) = (Vec::new(), Vec::new());
    for e in 0..entities {
        let name = format!("Hotel Number {e}");
        let faqs: serde_json::Map<String, serde_json::Value> = topics
            .iter()
            .enumerate()
            .map(|(i, (q, a, _))| (i.to_string(), serde_json::json!({"question": q, "answer": a})))
            .collect();
        hotels.insert(e.to_string(), serde_json::json!({"name": name, "faqs": faqs, "reviews": {}}));
        for (i, (_, answer, topic)) in topics.iter().enumerate() {
            logs.push(serde_json::json!([
                {"speaker": "U", "text": format!("I am staying at {name}.")},
                {"speaker": "S", "text": "Great, how can I help?"},
                {"speaker": "U", "text": format!("Tell me about the {topic} there.")},
            ]));
            labels.push(serde_json::json!({"target": true, "response": answer,
                "knowledge": [{"domain": "hotel", "entity_id": e, "doc_type": "faq", "doc_id": i}]}));
        }
    }
    std::fs::create_dir_all(dir.join("val")).unwrap();
    std::fs::write(dir.join("knowledge.json"), serde_json::json!({"hotel": hotels}).to_string()).unwrap();
    std::fs::write(dir.join("val/logs.json"), serde_json::Value::from(logs).to_string()).unwrap();
    std::fs::write(dir.join("val/labels.json"), serde_json::Value::from(labels).to_string()).unwrap();
}

/// A small data set in BEIR's layout, about software rather than hotels:
/// `products` products with four FAQs each, one question per FAQ (its
/// relevant object) after a greeting, timed a minute apart but written to
/// queries.jsonl newest first (time, not file order, is the order); every
/// tenth question of the first 90% is the guard's (`qrels/guard.tsv`).
pub fn mini_beir(dir: &Path, products: usize) {
    let topics = [
        (
            "How do I reset my password?",
            "Use Forgot password on the sign-in page; the link lasts one hour.",
            "reset the password",
        ),
        ("Can I export my data?", "Settings, then Export, writes every project as a ZIP file.", "export my projects"),
        (
            "Is two-factor sign-in supported?",
            "Yes: authenticator apps and security keys, under Security.",
            "turn on two-factor sign-in",
        ),
        ("How do refunds work?", "Annual plans are refunded in full within 30 days of purchase.", "get a refund"),
    ];
    let (mut corpus, mut queries) = (Vec::new(), Vec::new());
    for p in 0..products {
        let name = format!("Acme Tool {p}");
        for (i, (question, answer, topic)) in topics.iter().enumerate() {
            corpus.push(serde_json::json!({"_id": format!("tool{p}:faq:{i}"), "title": name, "kind": "faq",
                "text": format!("{name}: {question} {answer}"), "metadata": {"product": p.to_string()}}));
            let n = queries.len();
            queries.push(serde_json::json!({"_id": format!("t{p}-{i}"), "text": format!("How do I {topic} in it?"),
                "context": [{"speaker": "customer", "text": format!("I use {name} at work.")},
                            {"speaker": "agent", "text": "Happy to help, what do you need?"}],
                "reference_reply": answer,
                "time": format!("2026-03-01T{:02}:{:02}:00Z", n / 60, n % 60)}));
        }
    }
    let history = queries.len() * 9 / 10;
    let (mut labels, mut guard) = (String::from("query-id\tcorpus-id\tscore\n"), String::new());
    for (n, q) in queries.iter().enumerate() {
        let id = q["_id"].as_str().unwrap();
        let (p, i) = id[1..].split_once('-').unwrap();
        let line = format!("{id}\ttool{p}:faq:{i}\t1\n");
        if n < history && n % 10 == 9 { guard.push_str(&line) } else { labels.push_str(&line) }
    }
    let lines = |rows: Vec<serde_json::Value>| rows.iter().map(|r| r.to_string() + "\n").collect::<String>();
    std::fs::create_dir_all(dir.join("qrels")).unwrap();
    std::fs::write(dir.join("corpus.jsonl"), lines(corpus)).unwrap();
    queries.reverse();
    std::fs::write(dir.join("queries.jsonl"), lines(queries)).unwrap();
    std::fs::write(dir.join("qrels/test.tsv"), labels).unwrap();
    std::fs::write(dir.join("qrels/guard.tsv"), guard).unwrap();
}

/// A sentence-transformers folder around the fixture's BERT: mean pooling, normalised.
pub fn tiny_embedder(dir: &Path) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/cross-encoder-1");
    for file in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(file), dir.join(file)).unwrap();
    }
    std::fs::create_dir_all(dir.join("1_Pooling")).unwrap();
    std::fs::write(
        dir.join("modules.json"),
        r#"[{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 32, "pooling_mode_cls_token": false, "pooling_mode_mean_tokens": true}"#,
    )
    .unwrap();
    std::fs::write(dir.join("sentence_bert_config.json"), r#"{"max_seq_length": 64, "do_lower_case": false}"#).unwrap();
}

/// Printed past the test harness's capture, so a skip shows in the log.
pub fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "{line}");
}

/// GPU 0 for the CUDA side of a parity test, or None with the reason said
/// out loud. `AITL_REQUIRE_GPU` (scripts/gpu-check sets it) turns the skip
/// into a failure.
pub fn cuda_device(test: &str) -> Option<aitl::backend::Device> {
    let cache =
        aitl::backend::cuda::KernelCache::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("target/kernel-cache"));
    match aitl::backend::Device::select(aitl::backend::DeviceChoice::Cuda(0), &cache) {
        Ok((device, _)) => Some(device),
        Err(e) if std::env::var_os("AITL_REQUIRE_GPU").is_some() => panic!("{test}: AITL_REQUIRE_GPU is set: {e}"),
        Err(e) => {
            say(&format!("{test}: skipped, no GPU: {e}"));
            None
        }
    }
}
