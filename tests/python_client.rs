//! The generated Python client against a live server: stubs from
//! clients/python, run in a virtualenv that this test creates on first use
//! (target/pyenv, from clients/python/requirements.txt).

mod common;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use aitl::proto::UpsertKnowledgeRequest;
use common::*;

fn run(cmd: &mut Command) -> Result<(), String> {
    let output = cmd.output().map_err(|e| format!("{cmd:?}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{cmd:?} failed ({})\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    ))
}

/// A virtualenv with the pinned client requirements; rebuilt when they change.
fn python_env(repo: &Path) -> PathBuf {
    let env = repo.join("target/pyenv");
    let python = env.join("bin/python");
    let requirements = repo.join("clients/python/requirements.txt");
    let stamp = env.join("requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).unwrap();
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        let _ = std::fs::remove_dir_all(&env);
        run(Command::new("python3").args(["-m", "venv"]).arg(&env))
            .unwrap_or_else(|e| panic!("this test needs python3 with venv: {e}"));
        run(Command::new(&python).args(["-m", "pip", "install", "-q", "-r"]).arg(&requirements))
            .unwrap_or_else(|e| panic!("installing the Python client's requirements (PyPI must be reachable): {e}"));
        std::fs::write(&stamp, wanted).unwrap();
    }
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let python = tokio::task::spawn_blocking({
        let repo = repo.to_path_buf();
        move || python_env(&repo)
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path()).await;
    let (_, mut kb) = clients(&server).await;
    let objects = vec![knowledge("py-k1", "Refunds within 30 days."), knowledge("py-k2", "Exchanges are free.")];
    kb.upsert_knowledge(tokio_stream::iter(vec![UpsertKnowledgeRequest { objects }])).await.unwrap();
    let ix = generate_interaction(&["py-k1", "py-k2"]);
    server.state.interactions.record(ix.clone()).await.unwrap();
    let seed = serde_json::json!({
        "interaction_id": ix.interaction_id,
        "candidate_ids": ix.candidates.iter().map(|c| c.candidate_id.clone()).collect::<Vec<_>>(),
        "knowledge_ids": ["py-k1", "py-k2"],
    });
    let addr = server.addr.to_string();
    let result = tokio::task::spawn_blocking({
        let repo = repo.to_path_buf();
        move || {
            run(Command::new(python)
                .current_dir(&repo)
                .args(["clients/python/tests/test_live.py", "-v"])
                .env("AITL_ADDR", addr)
                .env("AITL_SEED_JSON", seed.to_string()))
        }
    })
    .await
    .unwrap();
    server.shutdown().await.unwrap();
    if let Err(e) = result {
        panic!("Python client tests failed:\n{e}");
    }
}
