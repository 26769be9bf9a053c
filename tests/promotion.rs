//! The promotion gate on real models over a real knowledge base: a
//! retriever that finds what agents labelled is promoted, a worse one is
//! refused and the registry keeps the better one; and the one-command
//! flywheel demo runs end to end on a small DSTC11-shaped data set
//! (simulation, judge, export, training with held-out metrics, gate,
//! promotion into the running server, evaluation).

mod common;

use std::path::Path;

use aitl::{
    kb::KnowledgeStore,
    registry::{Registry, Role, manifest::TrainedManifest},
    worker::{datasets::KnowledgeSource, round, train_bert::Schedule},
};

/// A trained-version folder: `model`'s files and a manifest naming `dataset`.
fn trained_version(data: &Path, name: &str, model: &Path, dataset: &Path) {
    let folder = aitl::registry::trained_dir(data).join(name);
    std::fs::create_dir_all(folder.join("1_Pooling")).unwrap();
    for entry in walk(model) {
        let relative = entry.strip_prefix(model).unwrap();
        std::fs::create_dir_all(folder.join(relative).parent().unwrap()).unwrap();
        std::fs::copy(&entry, folder.join(relative)).unwrap();
    }
    let manifest = TrainedManifest {
        role: Role::Retriever,
        version: aitl::model::hf_folder::model_version(&folder).unwrap(),
        parent: "test".into(),
        training_set: "handmade".into(),
        training_set_dir: dataset.to_owned(),
        examples: 0,
        hyperparameters: serde_json::Value::Null,
        steps: 0,
        resumed_at: 0,
        first_loss: None,
        last_loss: None,
        seconds: 0.0,
        device: None,
        created_ms: 0,
        heldout: None,
    };
    manifest.write(&folder).unwrap();
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}

/// An export folder whose held-out queries are the data set's questions,
/// labelled with their FAQ (what agents would have marked relevant).
fn handmade_export(dir: &Path, dataset: &Path) {
    let queries = aitl::eval::dstc11::read_queries(dataset, aitl::eval::dstc11::Split::All).unwrap();
    let rows: Vec<String> = queries
        .iter()
        .step_by(3)
        .map(|q| {
            serde_json::json!({
                "interaction_id": q.id,
                "query": q.query,
                "context": q.context.iter().map(|t| serde_json::json!({
                    "speaker": if t.speaker == aitl::proto::Speaker::Agent as i32 { "agent" } else { "customer" },
                    "text": t.text,
                })).collect::<Vec<_>>(),
                "relevant": q.relevant,
                "irrelevant": [],
            })
            .to_string()
        })
        .collect();
    std::fs::create_dir_all(dir.join("heldout")).unwrap();
    std::fs::write(dir.join("heldout/queries.jsonl"), rows.join("\n") + "\n").unwrap();
    // Trained on the next of every three questions.
    let trained: Vec<String> = queries
        .iter()
        .skip(1)
        .step_by(3)
        .map(|q| {
            serde_json::json!({"interaction_id": q.id, "query": q.query, "relevant": q.relevant, "irrelevant": [],
                "context": q.context.iter().map(|t| serde_json::json!({
                    "speaker": if t.speaker == aitl::proto::Speaker::Agent as i32 { "agent" } else { "customer" },
                    "text": t.text,
                })).collect::<Vec<_>>()})
            .to_string()
        })
        .collect();
    std::fs::create_dir_all(dir.join("train")).unwrap();
    std::fs::write(dir.join("train/queries.jsonl"), trained.join("\n") + "\n").unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_promotes_a_better_retriever_and_refuses_a_worse_one() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    common::mini_dstc11(&dataset, 30);
    let data = dir.path().join("data");
    let store = KnowledgeStore::open(&data.join("knowledge.redb")).unwrap();
    store.upsert_batch(aitl::tenancy::DEFAULT_TENANT, aitl::kb::read_dstc11(&dataset).unwrap()).unwrap();
    let knowledge = store.live_objects().unwrap();
    assert_eq!(knowledge.len(), 120, "more objects than the 75 Recall@75 looks at");
    drop(store);
    let export = dir.path().join("export");
    handmade_export(&export, &dataset);
    let tiny = dir.path().join("tiny");
    std::fs::create_dir_all(&tiny).unwrap();
    common::tiny_embedder(&tiny);
    trained_version(&data, "retriever-minilm", &common::default_embedder_dir(), &export);
    trained_version(&data, "retriever-tiny", &tiny, &export);

    let mut config = common::config(&data);
    config.models.embedder = tiny.display().to_string();
    config.models.ranker = "similarity".into();

    let better = round::promote(&config, "retriever-minilm", knowledge.clone(), false).await.unwrap();
    let gate = better.gate.as_ref().unwrap();
    assert!(better.promoted && gate.accepted, "{gate}");
    assert!(gate.heldout.candidate > gate.heldout.serving + 0.1, "{gate}");
    assert_eq!(gate.heldout.queries, 40);
    assert_eq!(Registry::load(&data).unwrap().retriever.serving.as_deref(), Some("retriever-minilm"));

    // Against the promoted model, the tiny random one loses.
    let worse = round::promote(&config, "retriever-tiny", knowledge.clone(), false).await.unwrap();
    let gate = worse.gate.as_ref().unwrap();
    assert!(!worse.promoted && !gate.accepted, "{gate}");
    assert!(gate.reasons[0].contains("below the required gain"), "{gate}");
    assert_eq!(Registry::load(&data).unwrap().retriever.serving.as_deref(), Some("retriever-minilm"));
    // A guard that holds the questions the candidate was trained on refuses without being scored.
    let mut overlapping = config.clone();
    overlapping.promotion.guard_dataset = dataset.clone();
    overlapping.promotion.guard_split = "all".into();
    overlapping.promotion.min_gain = -1.0;
    let refused = round::promote(&overlapping, "retriever-tiny", knowledge.clone(), false).await.unwrap();
    let gate = refused.gate.as_ref().unwrap();
    assert!(!refused.promoted && gate.guard.is_none(), "{gate}");
    let overlap = gate.guard_overlap.as_ref().unwrap();
    assert_eq!((overlap.guard_queries, overlap.shared_queries), (120, 40), "{gate}");
    assert!(gate.reasons.iter().any(|r| r.contains("40 of 120 guard questions were trained on")), "{gate}");
    // Forced past the gate, it serves, and rollback puts the better one back.
    assert!(round::promote(&config, "retriever-tiny", knowledge, true).await.unwrap().promoted);
    let mut registry = Registry::load(&data).unwrap();
    assert_eq!(registry.rollback(Role::Retriever).unwrap().as_deref(), Some("retriever-minilm"));
    assert!(registry.events.iter().any(|e| e.note.starts_with("forced past the gate")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_flywheel_demo_runs_a_round_end_to_end_on_a_beir_data_set() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    common::mini_beir(&dataset, 25);
    let data = dir.path().join("data");
    let mut config = common::config_with_embedder(&data);
    config.models.ranker = "similarity".into();
    // Two training steps cannot be expected to beat MiniLM by a margin (the
    // ranker's head is fresh): the gate runs and reports, but lets them through.
    config.promotion.min_gain = -1.0;
    config.promotion.guard_tolerance = 1.0;
    let options = aitl::worker::demo::DemoOptions {
        dataset: dataset.clone(),
        agents: 4,
        careless_share: 0.25,
        annotators: Default::default(),
        judge: true,
        generate_share: 0.0,
        limit: None,
        seed: 5,
        retriever: aitl::worker::train_retriever::RetrieverTraining {
            schedule: Schedule { batch_size: 8, max_steps: 2, max_tokens: 48, ..Default::default() },
            ..Default::default()
        },
        ranker: Some(aitl::worker::train_ranker::RankerTraining {
            schedule: Schedule { batch_size: 8, max_steps: 2, max_tokens: 64, ..Default::default() },
            ..Default::default()
        }),
        // No Generate share, so no preference pairs: the generator's step says so and is skipped.
        generator: Some(Default::default()),
    };
    let report = aitl::worker::demo::run(&config, &options).await.unwrap();
    assert_eq!(report.simulation.questions, 81, "90% of 100 questions are history, 9 of them the guard's");
    assert_eq!((report.before.metrics.queries, report.after.metrics.queries), (10, 10));
    // Every held-out question's FAQ is its own: all ten are about objects history never touched.
    for evaluation in [&report.before, &report.after] {
        assert_eq!(evaluation.subsets.len(), 1);
        assert_eq!(evaluation.subsets[0].metrics.queries, 10, "{evaluation}");
    }
    assert!(report.training_set.rejected > 0, "the judge rejects some careless annotations");
    assert_eq!(report.gates.len(), 2);
    assert!(report.generator_gate.is_none(), "no preference pairs, no generator gate");
    // The demo guards with the data set's guard split, which no agent annotated.
    for gate in &report.gates {
        assert!(gate.guard.as_ref().is_some_and(|guard| guard.queries == 9), "{gate}");
        assert_eq!(gate.guard_overlap.as_ref().map(|o| o.shared_queries), Some(0), "{gate}");
    }
    // Agents' labels cover what they were shown: the ranker is scored on condensed lists.
    let ranker_gate = report.gates.iter().find(|g| g.role == Role::Ranker).unwrap();
    assert_eq!(ranker_gate.heldout.metric, "ndcg@10 over judged objects", "{ranker_gate}");
    assert_eq!(ranker_gate.guard.as_ref().unwrap().metric, "precision@8", "the guard's labels are complete");
    let registry = Registry::load(&data).unwrap();
    let (retriever, ranker) = (registry.retriever.serving.unwrap(), registry.ranker.serving.unwrap());
    assert_eq!(report.promoted, [retriever.clone(), ranker.clone()]);
    // The evaluation after the round was served by the promoted versions.
    assert!(report.after.embedder.starts_with(&format!("{retriever}@")), "{}", report.after.embedder);
    assert!(report.after.ranked.as_ref().unwrap().ranker.starts_with(&format!("{ranker}@")));
    for version in [&retriever, &ranker] {
        let manifest = TrainedManifest::read(&aitl::registry::trained_dir(&data).join(version)).unwrap().unwrap();
        let heldout = manifest.heldout.expect("held-out metrics in the manifest");
        assert!(heldout.model.queries > 0 && heldout.parent.queries == heldout.model.queries);
        assert_eq!(manifest.steps, 2);
    }
    let stages: Vec<&str> = report.stages.iter().map(|s| s.stage.as_str()).collect();
    assert!(stages.contains(&"server switches its retriever") && stages.contains(&"server switches its ranker"));
    print!("{report}");
}

/// The judge ablation: one round with and one without the judge per seed,
/// each from an empty data dir, summarised per arm over the seeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_ablation_runs_both_arms_per_seed() {
    let dir = tempfile::tempdir().unwrap();
    let dataset = dir.path().join("dataset");
    common::mini_beir(&dataset, 12);
    let mut config = common::config_with_embedder(&dir.path().join("data"));
    config.models.ranker = "similarity".into();
    config.promotion.min_gain = -1.0;
    config.promotion.guard_tolerance = 1.0;
    let options = aitl::worker::demo::DemoOptions {
        dataset: dataset.clone(),
        agents: 4,
        careless_share: 0.0,
        annotators: aitl::worker::annotators::AnnotatorMix::parse("always_relevant:0.25,copy_first:0.25", &[]).unwrap(),
        judge: true,
        generate_share: 0.0,
        limit: None,
        seed: 0,
        retriever: aitl::worker::train_retriever::RetrieverTraining {
            schedule: Schedule { batch_size: 8, max_steps: 1, max_tokens: 48, ..Default::default() },
            ..Default::default()
        },
        ranker: None,
        generator: None,
    };
    let report = aitl::worker::ablation::run(&config, &options, &[3, 4]).await.unwrap();
    print!("{report}");
    assert_eq!(report.runs.len(), 4);
    let arms: Vec<(u64, bool)> = report.runs.iter().map(|r| (r.seed, r.judge)).collect();
    assert_eq!(arms, [(3, true), (3, false), (4, true), (4, false)]);
    assert!(report.runs.iter().all(|r| r.wrong_annotations > 0), "the mix makes wrong annotations");
    assert!(report.runs.iter().filter(|r| !r.judge).all(|r| r.rejected == 0), "no judge, no rejections");
    for arm in [&report.with_judge, &report.without_judge] {
        assert_eq!(arm[0].metric, "Recall@75");
        assert!(arm.iter().all(|s| s.low <= s.mean && s.mean <= s.high));
    }
    for seed in [3, 4] {
        for name in ["judge", "no-judge"] {
            assert!(dir.path().join(format!("data/ablation/{name}-seed{seed}/log")).exists());
        }
    }
}
