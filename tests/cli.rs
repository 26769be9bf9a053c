//! The operator commands, run as a user runs them: `aitl ingest` (JSON lines
//! and the DSTC11 importer), `aitl log stats|dump` and the registry's
//! `aitl models list|promote|rollback|challenger`.

mod common;

use std::{path::Path, process::Command};

use aitl::{
    feedback::InteractionBook,
    kb::KnowledgeStore,
    trainlog::{LogOptions, TrainingLog},
};

#[test]
fn ingest_jsonl_reports_counts_and_points_at_bad_lines() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("kb.jsonl");
    std::fs::write(
        &file,
        concat!(
            r#"{"id": "p1", "kind": "policy", "title": "Refunds", "text": "Refunds within 30 days.", "metadata": {"team": "billing"}}"#,
            "\n\n",
            r#"{"id": "f1", "kind": "faq", "text": "Q: Shipping? A: Free over $50."}"#,
            "\n"
        ),
    )
    .unwrap();
    let data = dir.path().join("data");
    let (ok, stdout, stderr) = common::run_aitl(&data, &["ingest", file.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("2 inserted, 0 updated, 0 unchanged"), "{stdout}");
    let (ok, stdout, _) = common::run_aitl(&data, &["ingest", file.to_str().unwrap()]);
    assert!(ok && stdout.contains("0 inserted, 0 updated, 2 unchanged"), "{stdout}");
    let store = KnowledgeStore::open(&data.join("knowledge.redb")).unwrap();
    assert_eq!(store.get(aitl::tenancy::DEFAULT_TENANT, "p1", 0, false).unwrap().metadata["team"], "billing");
    drop(store);

    std::fs::write(&file, "{\"id\": \"x\", \"kind\": \"memo\", \"text\": \"t\"}\n").unwrap();
    let (ok, _, stderr) = common::run_aitl(&data, &["ingest", file.to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("kb.jsonl:1") && stderr.contains("\"memo\""), "{stderr}");
}

#[test]
fn ingest_dstc11_uses_the_shared_id_scheme() {
    let dstc11 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dstc11-track5");
    assert!(dstc11.join("knowledge.json").exists(), "this test reads ../shared/data/dstc11-track5, which is absent");
    let dir = tempfile::tempdir().unwrap();
    let (ok, stdout, stderr) = common::run_aitl(dir.path(), &["ingest", "--dstc11", dstc11.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("ingested 10882 objects for tenant default: 10882 inserted"), "{stdout}");
    let store = KnowledgeStore::open(&dir.path().join("knowledge.redb")).unwrap();
    let faq = store.get(aitl::tenancy::DEFAULT_TENANT, "hotel:0:faq:0", 0, false).unwrap();
    assert_eq!(
        faq.text,
        "A AND B GUEST HOUSE. Q: Are children welcomed at this location? A: Yes, you can stay with children at A and B Guest House."
    );
    assert_eq!(faq.metadata["entity_name"], "A AND B GUEST HOUSE");
    let review = store.get(aitl::tenancy::DEFAULT_TENANT, "hotel:0:review:0:1", 0, false).unwrap();
    assert!(
        review.text.starts_with("A AND B GUEST HOUSE (review by Solo travelers): I stayed on my own"),
        "{}",
        review.text
    );
    assert_eq!(store.count_live().unwrap(), 10_882);
}

#[test]
fn log_stats_and_dump_show_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let (log, _) = TrainingLog::open(&dir.path().join("log"), LogOptions::default()).unwrap();
    let book = InteractionBook::new(log.clone(), Default::default());
    let records: Vec<_> = (0..3).map(|_| common::generate_interaction(&["k1"])).collect();
    let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
    for record in &records {
        rt.block_on(book.record(record.clone())).unwrap();
    }
    let mut cursor = aitl::trainlog::Cursor::open(&dir.path().join("log"), "worker").unwrap();
    cursor.commit(2).unwrap();
    log.close();

    let (ok, stdout, stderr) = common::run_aitl(dir.path(), &["log", "stats", "--json"]);
    assert!(ok, "{stderr}");
    let stats: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(stats["stats"]["records"], 3);
    assert_eq!(stats["stats"]["interactions"], 3);
    assert_eq!(stats["cursors"][0]["name"], "worker");
    assert_eq!(stats["cursors"][0]["lag"], 2);

    let (ok, stdout, stderr) = common::run_aitl(dir.path(), &["log", "dump", "--from", "2"]);
    assert!(ok, "{stderr}");
    let lines: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["sequence"], "2", "protobuf JSON writes uint64 as a string");
    assert_eq!(lines[0]["interaction"]["interactionId"], records[1].interaction_id.as_str());
    assert_eq!(lines[1]["interaction"]["candidates"][1]["candidateId"], records[2].candidates[1].candidate_id.as_str());
}

#[test]
fn models_list_challenger_and_rollback_edit_the_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, _) = common::run_aitl(dir.path(), &["models", "list"]);
    assert!(ok);
    assert!(out.contains("retriever: serving the configured model (none)"), "{out}");

    let (ok, _, err) = common::run_aitl(dir.path(), &["models", "rollback", "retriever"]);
    assert!(!ok);
    assert!(err.contains("has no earlier version to roll back to"), "{err}");
    let (ok, _, err) = common::run_aitl(dir.path(), &["models", "promote", "retriever-nope"]);
    assert!(!ok);
    assert!(err.contains("retriever-nope: no trained model there"), "{err}");

    let challenger = dir.path().join("other.gguf");
    std::fs::write(&challenger, b"GGUF").unwrap();
    let path = challenger.to_str().unwrap();
    let (ok, out, err) = common::run_aitl(dir.path(), &["models", "challenger", "generator", path, "--share", "0.3"]);
    assert!(ok, "{err}");
    assert!(out.contains("share 0.3"), "{out}");
    let (ok, out, _) = common::run_aitl(dir.path(), &["models", "list", "--json"]);
    assert!(ok);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["registry"]["generator"]["challenger"], path);
    assert_eq!(listed["registry"]["challenger_share"], 0.3);
    let (ok, _, err) = common::run_aitl(dir.path(), &["models", "challenger", "generator", "--share", "1.5"]);
    assert!(!ok && err.contains("outside 0 to 1"), "{err}");
}

#[test]
fn dataset_import_and_stats_write_and_read_the_beir_layout() {
    let dstc11 = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dstc11-track5");
    assert!(dstc11.join("knowledge.json").exists(), "this test reads ../shared/data/dstc11-track5, which is absent");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("beir");
    let (ok, stdout, stderr) = common::run_aitl(
        dir.path(),
        &["dataset", "import-dstc11", "--from", dstc11.to_str().unwrap(), "--out", out.to_str().unwrap()],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains("10882 knowledge objects, 2129 labelled queries (191 in the guard set)"), "{stdout}");
    for file in ["corpus.jsonl", "queries.jsonl", "qrels/test.tsv", "qrels/guard.tsv"] {
        assert!(out.join(file).exists(), "{file}");
    }
    let (ok, stdout, stderr) = common::run_aitl(dir.path(), &["dataset", "stats", "--dataset", out.to_str().unwrap()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("history: 1725 queries") && stdout.contains("eval: 213 queries"), "{stdout}");
    std::fs::write(out.join("qrels/test.tsv"), "d11v-0001 hotel:0:faq:0 1\n").unwrap();
    let (ok, _, stderr) = common::run_aitl(dir.path(), &["dataset", "stats", "--dataset", out.to_str().unwrap()]);
    assert!(!ok && stderr.contains("test.tsv:1") && stderr.contains("tabs"), "{stderr}");
}

/// Threads of the running server `pid` whose names start with `prefix`.
fn threads_named(pid: u32, prefix: &str) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter(|task| {
            let comm = std::fs::read_to_string(task.as_ref().unwrap().path().join("comm")).unwrap_or_default();
            comm.starts_with(prefix)
        })
        .count()
}

#[test]
fn compute_threads_bound_the_pool_and_the_team_of_a_running_server() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    for (flag, config, expected) in [(Some("3"), None, 3), (None, Some(1), 1)] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_aitl"));
        command.arg("--data-dir").arg(dir.path());
        if let Some(threads) = config {
            let path = dir.path().join("aitl.toml");
            std::fs::write(&path, format!("[compute]\nthreads = {threads}\n")).unwrap();
            command.arg("--config").arg(path);
        }
        if let Some(threads) = flag {
            command.args(["--threads", threads]);
        }
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .env("AITL_LOG", "warn")
            .env("AITL_EMBEDDER", "none")
            .env("AITL_GENERATOR", "none")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("serving on"), "{line}");
        let (pool, team) = (threads_named(child.id(), "aitl-compute-"), threads_named(child.id(), "aitl-team-"));
        child.kill().unwrap();
        child.wait().unwrap();
        // The caller is the team's last member, so it has one helper thread fewer than the pool.
        assert_eq!((pool, team), (expected, expected - 1), "flag {flag:?}, config {config:?}");
    }
}
