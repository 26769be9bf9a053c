//! The modules' layering, read from the sources: the config, the evaluator
//! and the registry (with its retrieval gate) reach none of the server's
//! modules or the worker's, through any chain of imports. They once formed
//! one circle (config → registry → eval → server → api → serving →
//! registry), so evaluating a model meant starting a server in-process;
//! now evaluation is a gRPC client (`eval::retrieval`) and only
//! `eval_server` and the worker start servers.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

/// What the layers below must never reach.
const SERVER_AND_WORKER: [&str; 6] = ["server", "api", "serving", "feedback", "worker", "eval_server"];

/// The crate's top-level modules named by `crate::` paths in `source`,
/// grouped imports (`use crate::{a::b, c::{d, e}}`) included.
fn imports(source: &str) -> BTreeSet<String> {
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    let mut found = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let (mut depth, mut item_start) = (0usize, true);
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && !c.is_whitespace() => {
                        found.insert(ident(&group[i..]));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            found.insert(ident(rest));
        }
    }
    found.remove("");
    found
}

/// Non-test code only: comments, `mod tests` blocks and `tests.rs` files
/// are not the module's dependencies.
fn code(source: &str) -> String {
    let body = source.split("#[cfg(test)]\nmod tests").next().unwrap_or(source);
    body.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n")
}

fn rust_files(dir: &Path, files: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, files);
        } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
            files.push(path);
        }
    }
}

/// Top-level module → the top-level modules its code imports.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernel");
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    let top = |path: &Path| {
        let first = path.strip_prefix(&root).unwrap().components().next().unwrap();
        first.as_os_str().to_string_lossy().trim_end_matches(".rs").to_string()
    };
    let modules: BTreeSet<String> = files.iter().map(|f| top(f)).filter(|m| m != "lib" && m != "main").collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = modules.iter().map(|m| (m.clone(), BTreeSet::new())).collect();
    for file in &files {
        let Some(edges) = graph.get_mut(&top(file)) else { continue };
        let source = std::fs::read_to_string(file).unwrap();
        edges.extend(imports(&code(&source)).into_iter().filter(|m| modules.contains(m)));
    }
    for (module, edges) in graph.iter_mut() {
        edges.remove(module);
    }
    graph
}

fn reachable(graph: &BTreeMap<String, BTreeSet<String>>, from: &str) -> BTreeMap<String, String> {
    // module → the module it was first reached from, to print the chain.
    let mut via = BTreeMap::new();
    let mut queue = vec![from.to_string()];
    while let Some(module) = queue.pop() {
        for next in graph.get(&module).into_iter().flatten() {
            if next != from && !via.contains_key(next) {
                via.insert(next.clone(), module.clone());
                queue.push(next.clone());
            }
        }
    }
    via
}

fn chain(via: &BTreeMap<String, String>, from: &str, to: &str) -> String {
    let mut path = vec![to.to_string()];
    while let Some(previous) = via.get(path.last().unwrap()).filter(|_| path.last().unwrap() != from) {
        path.push(previous.clone());
    }
    path.reverse();
    path.join(" → ")
}

#[test]
fn the_import_reader_sees_plain_and_grouped_paths_and_skips_tests_and_comments() {
    let source = "use crate::{a::b, c::{d, e},\n    f};\nfn x() { crate::g::h(); }\n// crate::comment\n\
                  #[cfg(test)]\nmod tests { use crate::tested; }";
    let names: Vec<String> = imports(&code(source)).into_iter().collect();
    assert_eq!(names, ["a", "c", "f", "g"]);
}

#[test]
fn config_evaluation_and_registry_reach_no_server_or_worker_module() {
    let graph = graph();
    for (module, edges) in &graph {
        println!("{module} → {}", edges.iter().cloned().collect::<Vec<_>>().join(", "));
    }
    for lower in ["config", "eval", "registry"] {
        assert!(graph.contains_key(lower), "no module {lower}");
        let via = reachable(&graph, lower);
        let reached: Vec<String> =
            SERVER_AND_WORKER.iter().filter(|m| via.contains_key(**m)).map(|m| chain(&via, lower, m)).collect();
        assert!(reached.is_empty(), "{lower} reaches the server or the worker: {}", reached.join("; "));
    }
    // The one bridge from evaluation to a server, as the worker uses it.
    assert!(graph["eval_server"].contains("server") && graph["eval_server"].contains("eval"));
}
