//! Promotions reach a running server through the registry: under concurrent
//! Retrieve, Rank and knowledge writes, a new retriever (which re-embeds the
//! knowledge base first) and a new ranker swap in without a failed request,
//! every response is scored by one model's query encoder against the same
//! model's index, rollback restores the previous model, a model that cannot
//! load leaves the old one serving and says why, a generator challenger
//! writes one of the two candidates of its share of Generate requests, and a
//! LoRA adapter promoted under Generate traffic fails no request.

mod common;

use std::{
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aitl::{
    backend::Device,
    model::sentence::SentenceEmbedder,
    proto::{
        GenerateRequest, GetServingModelsRequest, RankRequest, RetrieveRequest, ServingModel, UpsertKnowledgeRequest,
        flywheel_service_client::FlywheelServiceClient, rank_request::Candidates,
    },
    registry::{Registry, Role},
};

fn link(target: &Path, at: &Path) {
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

fn promote(data: &Path, role: Role, version: &str) {
    let mut registry = Registry::load(data).unwrap();
    registry.promote(role, version, "test".into());
    registry.save(data).unwrap();
}

/// Waits until GetServingModels shows `done` for `role`.
async fn wait_for(
    client: &mut FlywheelServiceClient<tonic::transport::Channel>,
    role: &str,
    done: impl Fn(&ServingModel) -> bool,
) -> ServingModel {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let models = client.get_serving_models(GetServingModelsRequest {}).await.unwrap().into_inner().models;
        let model = models.into_iter().find(|m| m.role == role).expect("every role is reported");
        if done(&model) {
            return model;
        }
        assert!(Instant::now() < deadline, "no switch: {model:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What one Retrieve answered: the model, the query, the best hit's text and score.
struct Answer {
    embedder: String,
    query: String,
    top_text: String,
    top_score: f32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retriever_and_ranker_swap_under_traffic_and_roll_back() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    common::mini_dstc11(&dataset, 30);
    let data = dir.path().join("data");
    let store = aitl::kb::KnowledgeStore::open(&data.join("knowledge.redb")).unwrap();
    store.upsert_batch(aitl::tenancy::DEFAULT_TENANT, aitl::kb::read_dstc11(&dataset).unwrap()).unwrap();
    drop(store);
    let tiny = dir.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    common::tiny_embedder(&tiny);
    let trained = aitl::registry::trained_dir(&data);
    link(&common::default_embedder_dir(), &trained.join("retriever-minilm"));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    link(&fixtures.join("cross-encoder-1"), &trained.join("ranker-ce"));

    let mut config = common::config(&data);
    config.models.embedder = tiny.display().to_string();
    config.models.ranker = "similarity".into();
    config.models.registry_poll_ms = 20;
    let server = aitl::server::start(config).await.unwrap();
    let (support, knowledge) = common::clients(&server).await;
    let mut flywheel = FlywheelServiceClient::new(common::channel(&server).await);
    let old = wait_for(&mut flywheel, "retriever", |_| true).await.version;
    assert!(old.starts_with("tiny@"), "{old}");

    // Traffic: Retrieve then Rank of what it found, from four clients; knowledge writes beside.
    let stop = Arc::new(AtomicBool::new(false));
    let mut readers = Vec::new();
    for client_index in 0..4usize {
        let (mut support, stop) = (support.clone(), stop.clone());
        readers.push(tokio::spawn(async move {
            let mut answers = Vec::new();
            let mut ranked = Vec::new();
            let mut i = client_index;
            while !stop.load(Ordering::Relaxed) {
                let topic = ["parking", "breakfast", "pets", "pool"][i % 4];
                let query = format!("Tell me about the {topic} at Hotel Number {}", i % 30);
                i += 4;
                let request = RetrieveRequest { query: query.clone(), top_k: 5, ..Default::default() };
                let answer = support.retrieve(request).await.expect("Retrieve never fails").into_inner();
                let top = &answer.results[0];
                answers.push(Answer {
                    embedder: answer.models.unwrap().embedder,
                    query: query.clone(),
                    top_text: top.knowledge.as_ref().unwrap().text.clone(),
                    top_score: top.score,
                });
                let request = RankRequest {
                    query,
                    candidates: Some(Candidates::RetrieveInteractionId(answer.interaction_id)),
                    ..Default::default()
                };
                let answer = support.rank(request).await.expect("Rank never fails").into_inner();
                let models = answer.models.unwrap();
                ranked.push((models.ranker, models.embedder));
            }
            (answers, ranked)
        }));
    }
    let writer = {
        let (mut knowledge, stop) = (knowledge.clone(), stop.clone());
        tokio::spawn(async move {
            let mut written = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let n = written.len();
                let object = common::knowledge(
                    &format!("extra-{n}"),
                    &format!("Guest house {n} offers a rooftop garden with {} lemon trees", n * 7 + 3),
                );
                let batch = UpsertKnowledgeRequest { objects: vec![object.clone()] };
                knowledge.upsert_knowledge(futures_util::stream::iter([batch])).await.expect("upserts never fail");
                written.push(object);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            written
        })
    };

    tokio::time::sleep(Duration::from_millis(500)).await;
    promote(&data, Role::Retriever, "retriever-minilm");
    let switched = wait_for(&mut flywheel, "retriever", |m| m.registry_version == "retriever-minilm").await;
    assert!(switched.switching_to.is_empty() && switched.last_error.is_empty(), "{switched:?}");
    let new = switched.version;
    tokio::time::sleep(Duration::from_millis(300)).await;
    promote(&data, Role::Ranker, "ranker-ce");
    let ranker = wait_for(&mut flywheel, "ranker", |m| m.registry_version == "ranker-ce").await;
    assert!(ranker.version.starts_with("ranker-ce@"), "{ranker:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);

    let mut answers = Vec::new();
    let mut ranked = Vec::new();
    for reader in readers {
        let (a, r) = reader.await.unwrap();
        answers.extend(a);
        ranked.extend(r);
    }
    let written = writer.await.unwrap();
    assert!(answers.iter().any(|a| a.embedder == old) && answers.iter().any(|a| a.embedder == new));
    assert!(ranked.iter().any(|(r, _)| *r == ranker.version), "Rank served the new cross-encoder");
    for (ranker_version, embedder) in &ranked {
        // The similarity ranker scores with the index it belongs to.
        if let Some(model) = ranker_version.strip_prefix("similarity:") {
            assert_eq!(model, embedder);
            assert!(*embedder == old || *embedder == new, "{embedder}");
        }
    }

    // Each answer's best score is that model's query vector against that model's object vector.
    let models = [(old.clone(), tiny.clone()), (new.clone(), common::default_embedder_dir())];
    for (version, folder) in &models {
        let embedder = SentenceEmbedder::load(&Device::Cpu, folder).unwrap();
        let mine: Vec<&Answer> = answers.iter().filter(|a| a.embedder == *version).collect();
        for answer in mine.iter().step_by((mine.len() / 20).max(1)) {
            let vectors = embedder.embed(&Device::Cpu, &[&answer.query, &answer.top_text], 4_096).unwrap();
            let cosine: f32 = vectors[0].iter().zip(&vectors[1]).map(|(a, b)| a * b).sum();
            assert!(
                (cosine - answer.top_score).abs() < 1e-3,
                "{version}: served {} for {:?}, its own vectors give {cosine}",
                answer.top_score,
                answer.query
            );
        }
    }

    // Every object written before, during or after the switch is searchable with the new model.
    let mut support_after = support.clone();
    assert!(!written.is_empty());
    for object in written.iter().step_by((written.len() / 15).max(1)) {
        let request = RetrieveRequest { query: object.text.clone(), top_k: 1, ..Default::default() };
        let answer = support_after.retrieve(request).await.unwrap().into_inner();
        assert_eq!(answer.models.unwrap().embedder, new);
        assert_eq!(answer.results[0].knowledge.as_ref().unwrap().id, object.id, "{}", object.text);
    }

    // Rollback puts the tiny model back (its vectors were kept, so no re-embedding).
    let mut registry = Registry::load(&data).unwrap();
    assert_eq!(registry.rollback(Role::Retriever).unwrap(), None);
    registry.save(&data).unwrap();
    let back = wait_for(&mut flywheel, "retriever", |m| m.registry_version.is_empty()).await;
    assert_eq!(back.version, old);
    let request = RetrieveRequest { query: "pool".into(), top_k: 3, ..Default::default() };
    assert_eq!(support_after.retrieve(request).await.unwrap().into_inner().models.unwrap().embedder, old);

    // A version whose weights are broken: the error is reported, the old model keeps serving.
    let broken = trained.join("retriever-broken");
    std::fs::create_dir_all(&broken).unwrap();
    for file in ["config.json", "tokenizer.json", "modules.json", "sentence_bert_config.json"] {
        std::fs::copy(tiny.join(file), broken.join(file)).unwrap();
    }
    std::fs::write(broken.join("model.safetensors"), b"not a safetensors file").unwrap();
    promote(&data, Role::Retriever, "retriever-broken");
    let failed = wait_for(&mut flywheel, "retriever", |m| !m.last_error.is_empty()).await;
    assert!(failed.last_error.contains("retriever-broken"), "{}", failed.last_error);
    assert_eq!(failed.version, old);
    let request = RetrieveRequest { query: "parking".into(), top_k: 3, ..Default::default() };
    assert_eq!(support_after.retrieve(request).await.unwrap().into_inner().models.unwrap().embedder, old);
    server.shutdown().await.unwrap();
}

/// Two candidates of three tokens: the tiny model's context is 256 tokens,
/// no room for the default system prompt.
fn tiny_generate() -> GenerateRequest {
    GenerateRequest {
        system_prompt: "Be brief.".into(),
        conversation: vec![aitl::proto::ConversationTurn {
            speaker: aitl::proto::Speaker::Customer as i32,
            text: "Can I bring my dog?".into(),
        }],
        num_candidates: 2,
        sampling: Some(aitl::proto::SamplingParams { max_new_tokens: 3, ..Default::default() }),
        ..Default::default()
    }
}

fn tiny_llama() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-llama")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_challenger_writes_one_candidate_of_its_share_of_requests() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let challenger = dir.path().join("tiny-llama-challenger");
    link(&tiny_llama(), &challenger);
    let mut registry = Registry::default();
    registry.set_challenger(Role::Generator, Some(challenger.display().to_string()), Some(1.0)).unwrap();
    registry.save(&data).unwrap();

    let mut config = common::config(&data);
    config.models.generator = tiny_llama().display().to_string();
    config.models.registry_poll_ms = 20;
    let server = aitl::server::start(config).await.unwrap();
    let (mut support, _) = common::clients(&server).await;
    let mut flywheel = FlywheelServiceClient::new(common::channel(&server).await);
    let generator = wait_for(&mut flywheel, "generator", |_| true).await;
    assert!(generator.version.starts_with("tiny-llama@"), "{generator:?}");
    assert!(generator.challenger.starts_with("tiny-llama-challenger@"), "{generator:?}");

    let generate = tiny_generate;
    let mut first_slot = std::collections::HashSet::new();
    for _ in 0..16 {
        let response = support.generate(generate()).await.unwrap().into_inner();
        let mut versions: Vec<&str> = response.candidates.iter().map(|c| c.model_version.as_str()).collect();
        first_slot.insert(versions[0].to_string());
        versions.sort();
        let mut expected = [generator.version.as_str(), generator.challenger.as_str()];
        expected.sort();
        assert_eq!(versions, expected);
        let timings = response.timings.unwrap();
        assert_eq!(timings.queue_ns + timings.compute_ns, timings.total_ns);
    }
    assert_eq!(first_slot.len(), 2, "the challenger's position is random");

    // Share 0: the champion writes every candidate again.
    let mut registry = Registry::load(&data).unwrap();
    registry.set_challenger(Role::Generator, Some(challenger.display().to_string()), Some(0.0)).unwrap();
    registry.save(&data).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while flywheel.get_serving_models(GetServingModelsRequest {}).await.unwrap().into_inner().challenger_share != 0.0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let response = support.generate(generate()).await.unwrap().into_inner();
    assert!(response.candidates.iter().all(|c| c.model_version == generator.version));
    server.shutdown().await.unwrap();
}

/// A trained adapter (a PEFT folder over the serving base) promoted while
/// Generate requests run: no request fails, every candidate names the
/// version that wrote it (the base, or `{base}+{adapter}`), and after the
/// switch the adapter writes every candidate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_adapter_promoted_under_generate_traffic_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The fixture adapter, in the registry's trained folder, over the base by absolute path.
    let adapter = aitl::registry::trained_dir(&data).join("generator-adapter");
    std::fs::create_dir_all(&adapter).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/orpo-golden/adapter");
    std::fs::copy(fixture.join("adapter_model.safetensors"), adapter.join("adapter_model.safetensors")).unwrap();
    let config_text = std::fs::read_to_string(fixture.join("adapter_config.json"))
        .unwrap()
        .replace("\"tests/fixtures/tiny-llama\"", &format!("{:?}", tiny_llama().display().to_string()));
    std::fs::write(adapter.join("adapter_config.json"), config_text).unwrap();

    let mut config = common::config(&data);
    config.models.generator = tiny_llama().display().to_string();
    config.models.registry_poll_ms = 20;
    let server = aitl::server::start(config).await.unwrap();
    let (support, _) = common::clients(&server).await;
    let mut flywheel = FlywheelServiceClient::new(common::channel(&server).await);
    let base = wait_for(&mut flywheel, "generator", |_| true).await.version;

    let generate = tiny_generate;
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let (mut support, stop) = (support.clone(), stop.clone());
            tokio::spawn(async move {
                let mut versions = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = support.generate(generate()).await.expect("no Generate fails during the swap");
                    let response = response.into_inner();
                    assert_eq!(response.candidates.len(), 2);
                    versions.extend(response.candidates.into_iter().map(|c| c.model_version));
                }
                versions
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    promote(&data, Role::Generator, "generator-adapter");
    let adapted = wait_for(&mut flywheel, "generator", |m| m.version != base).await.version;
    assert!(adapted.starts_with(&format!("{base}+generator-adapter@")), "{adapted}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut seen = std::collections::HashSet::new();
    for client in clients {
        for version in client.await.unwrap() {
            assert!(version == base || version == adapted, "a candidate names {version}");
            seen.insert(version);
        }
    }
    assert!(seen.contains(&adapted), "candidates from the adapter after the switch");
    let response = support.clone().generate(generate()).await.unwrap().into_inner();
    assert!(response.candidates.iter().all(|c| c.model_version == adapted));
    server.shutdown().await.unwrap();
}
