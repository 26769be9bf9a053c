//! The peers' fixed workloads (../shared/peers/workloads), shared by the
//! benches so aitl and the peers measure the same texts.

use std::path::Path;

/// The `text` field of each line of a JSON-lines workload.
pub fn texts(name: &str) -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/peers/workloads").join(name);
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (the peers' workloads)", path.display()));
    text.lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["text"].as_str().unwrap().to_string())
        .collect()
}
