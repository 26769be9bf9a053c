//! Labelled data sets in BEIR's layout: the DSTC11 importer's output
//! against the shared reference numbers (../shared/data/README.md: exact
//! cosine search with all-MiniLM-L6-v2, 3 context turns, held-out 213
//! queries: Recall@75 .665, Precision@8 .087), read back through the same
//! reader every other data set goes through.

mod common;

use std::path::Path;

use aitl::eval::{
    dataset::{self, Split},
    dstc11,
    retrieval::{self, Evaluator},
};

fn dstc11_dir() -> std::path::PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/dstc11-track5");
    assert!(dir.join("knowledge.json").exists(), "this test reads ../shared/data/dstc11-track5, which is absent");
    dir
}

#[test]
fn the_dstc11_import_keeps_ids_splits_and_texts() {
    let imported = dstc11::import(&dstc11_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    imported.write(dir.path()).unwrap();
    let back = dataset::open(dir.path()).unwrap();
    assert_eq!(back.queries, imported.queries);
    assert_eq!(back.guard, imported.guard);
    assert_eq!(back.corpus, imported.corpus);
    // The counts of ../shared/data/README.md: 2,129 labelled queries, 213 held out,
    // 1,916 history of which every tenth (191) is now the guard's.
    let count = |split| back.split(split).len();
    assert_eq!((count(Split::All), count(Split::Eval)), (2_129, 213));
    assert_eq!((count(Split::History), count(Split::Guard)), (1_725, 191));
    let eval = back.split(Split::Eval);
    assert_eq!((eval[0].id.as_str(), eval[212].id.as_str()), ("d11v-3762", "d11v-4171"));
    assert_eq!(back.corpus.len(), 10_882);
    let faq = back.corpus.iter().find(|o| o.id == "hotel:0:faq:0").unwrap();
    assert!(faq.text.starts_with("A AND B GUEST HOUSE. Q: Are children welcomed"), "{}", faq.text);
    // No guard query is a history query, and the unseen-relevant subset is held out.
    let history: Vec<String> = back.split(Split::History).into_iter().map(|q| q.id).collect();
    assert!(back.guard.iter().all(|id| !history.contains(id)));
    let unseen = back.unseen_relevant();
    assert!(!unseen.is_empty() && unseen.iter().all(|q| eval.iter().any(|e| e.id == q.id)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_imported_dstc11_reproduces_the_reference_numbers() {
    let imported = dstc11::import(&dstc11_dir()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let beir = dir.path().join("dstc11-beir");
    imported.write(&beir).unwrap();
    let config = common::config_with_embedder(&dir.path().join("data"));
    let evaluator = aitl::eval_server::LoopbackEvaluator::new(&config);
    let eval = retrieval::DatasetEval::open(&beir, Split::Eval).unwrap();
    let report = evaluator.evaluate(&evaluator.configured(), &eval.set(), 3, false).await.unwrap();
    common::say(&report.to_string());
    assert_eq!(report.metrics.queries, 213);
    // The reference table rounds to three decimals: within half a unit of the last digit.
    let recall = report.metrics.recall_at(75).unwrap();
    let precision = report.metrics.precision_at(8).unwrap();
    assert!((recall - 0.665).abs() <= 0.0005, "Recall@75 {recall}");
    assert!((precision - 0.087).abs() <= 0.0005, "Precision@8 {precision}");
    let unseen = &report.subsets[0];
    assert_eq!(unseen.name, retrieval::UNSEEN_RELEVANT);
    assert_eq!(unseen.metrics.queries, imported.unseen_relevant().len());
}
