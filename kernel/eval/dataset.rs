//! Labelled data sets in BEIR's layout, the one format evaluation,
//! simulation, the demo and the promotion gate's guard set read:
//!
//! - `corpus.jsonl`: one knowledge object per line, `{"_id", "title",
//!   "text", "metadata": {..}, "kind"?}` (kind: policy, case, faq, other;
//!   default other). Texts are used as given.
//! - `queries.jsonl`: `{"_id", "text", "context"?: [{"speaker": "customer" |
//!   "agent", "text"}], "reference_reply"?, "time"?}`; `time` is Unix
//!   seconds or an RFC 3339 timestamp. Without it, file order is time.
//! - `qrels/*.tsv`: BEIR's `query-id corpus-id score` (tab-separated, an
//!   optional header line); a score above 0 is relevant. Every file is read;
//!   a query with no relevant object is not a labelled query.
//!
//! Splits, in time order over every labelled query: the first 90% are the
//! history agents annotate, the last 10% are held out for evaluation. The
//! queries of `qrels/guard.tsv` are the guard set the promotion gate scores
//! candidates on: they leave whichever part they fall in, so no simulated
//! agent annotates them and no training set holds them.
//!
//! A DSTC11 Track 5 folder (`knowledge.json`, `val/`) reads through its
//! importer ([`super::dstc11::import`]), so both layouts work wherever a
//! data set is asked for; `aitl data import-dstc11` writes the BEIR files.

use std::{
    collections::{HashMap, HashSet},
    io::Write,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    error::{Error, Result},
    kb::jsonl::{parse_kind, read_lines},
    proto::{ConversationTurn, KnowledgeKind, KnowledgeObject, Speaker},
};

/// The qrels file whose queries form the guard set.
pub const GUARD_QRELS: &str = "guard";
/// The qrels file the importers write every other label to (BEIR's name).
pub const LABELS_QRELS: &str = "test";

#[derive(Debug, Clone, PartialEq)]
pub struct LabelledQuery {
    pub id: String,
    /// Position in time order among the data set's queries.
    pub index: usize,
    pub query: String,
    pub context: Vec<ConversationTurn>,
    pub relevant: Vec<String>,
    /// None: the labels are complete, every object not in `relevant` is
    /// irrelevant (a labelled data set). Some: only `relevant` and these were
    /// judged (agents' feedback on what they were shown), so rankings are
    /// scored as condensed lists ([`LabelledQuery::judged_only`]).
    pub judged_irrelevant: Option<Vec<String>>,
    pub reference_reply: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Split {
    /// The first 90% of labelled queries, less the guard's: what agents annotate.
    History,
    /// The last 10%, less the guard's: held out for evaluation.
    Eval,
    /// `qrels/guard.tsv`'s queries: what the promotion gate guards with.
    Guard,
    /// Every labelled query.
    All,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::History => "history",
            Split::Eval => "eval",
            Split::Guard => "guard",
            Split::All => "all",
        }
    }

    pub fn parse(name: &str) -> Result<Split> {
        match name {
            "history" => Ok(Split::History),
            "eval" => Ok(Split::Eval),
            "guard" => Ok(Split::Guard),
            "all" => Ok(Split::All),
            other => Err(Error::InvalidArgument(format!("split {other:?} is not history, eval, guard or all"))),
        }
    }
}

/// A knowledge base with labelled queries in time order.
#[derive(Debug, Clone, Default)]
pub struct LabelledSet {
    pub corpus: Vec<KnowledgeObject>,
    /// Every labelled query, in time order (`index` is the position).
    pub queries: Vec<LabelledQuery>,
    /// Ids of the guard set's queries.
    pub guard: HashSet<String>,
}

impl LabelledSet {
    /// The queries of `split`, in time order.
    pub fn split(&self, split: Split) -> Vec<LabelledQuery> {
        let history = self.queries.len() * 9 / 10;
        let keep = |(i, q): (usize, &LabelledQuery)| {
            let guard = self.guard.contains(&q.id);
            let wanted = match split {
                Split::History => i < history && !guard,
                Split::Eval => i >= history && !guard,
                Split::Guard => guard,
                Split::All => true,
            };
            wanted.then(|| q.clone())
        };
        self.queries.iter().enumerate().filter_map(keep).collect()
    }

    /// The held-out queries none of whose relevant objects is relevant to a
    /// history query: what a model can only answer by generalising, not by
    /// remembering what agents labelled.
    pub fn unseen_relevant(&self) -> Vec<LabelledQuery> {
        let seen: HashSet<String> = self.split(Split::History).into_iter().flat_map(|q| q.relevant).collect();
        self.split(Split::Eval).into_iter().filter(|q| q.relevant.iter().all(|id| !seen.contains(id))).collect()
    }

    /// Writes the BEIR layout into `dir` (created).
    pub fn write(&self, dir: &Path) -> Result<()> {
        let io = |path: &Path, e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(dir.join("qrels")).map_err(|e| io(dir, e))?;
        let corpus = self.corpus.iter().map(|o| CorpusLine {
            id: o.id.clone(),
            title: o.title.clone(),
            text: o.text.clone(),
            metadata: o.metadata.clone(),
            kind: Some(kind_name(o.kind).to_string()),
        });
        write_lines(&dir.join("corpus.jsonl"), corpus)?;
        let queries = self.queries.iter().map(|q| QueryLine {
            id: q.id.clone(),
            text: q.query.clone(),
            context: q
                .context
                .iter()
                .map(|t| TurnLine { speaker: speaker_name(t.speaker).into(), text: t.text.clone() })
                .collect(),
            reference_reply: q.reference_reply.clone(),
            time: Some(Time::Seconds(q.index as f64)),
        });
        write_lines(&dir.join("queries.jsonl"), queries)?;
        for (name, guard) in [(LABELS_QRELS, false), (GUARD_QRELS, true)] {
            let path = dir.join("qrels").join(format!("{name}.tsv"));
            let mut out = String::from("query-id\tcorpus-id\tscore\n");
            for q in self.queries.iter().filter(|q| self.guard.contains(&q.id) == guard) {
                for id in &q.relevant {
                    out.push_str(&format!("{}\t{id}\t1\n", q.id));
                }
            }
            std::fs::write(&path, out).map_err(|e| io(&path, e))?;
        }
        Ok(())
    }
}

/// Whether `dir` holds a DSTC11 Track 5 folder rather than the BEIR layout.
fn is_dstc11(dir: &Path) -> bool {
    !dir.join("corpus.jsonl").exists() && dir.join("knowledge.json").exists() && dir.join("val").is_dir()
}

/// Reads the labelled data set in `dir`: the BEIR layout, or a DSTC11
/// Track 5 folder through its importer.
pub fn open(dir: &Path) -> Result<LabelledSet> {
    if is_dstc11(dir) {
        return super::dstc11::import(dir);
    }
    if !dir.join("corpus.jsonl").exists() {
        return Err(Error::NotFound(format!(
            "{} holds no labelled data set: expected BEIR's corpus.jsonl, queries.jsonl and qrels/*.tsv, \
             or a DSTC11 Track 5 folder (knowledge.json, val/)",
            dir.display()
        )));
    }
    let corpus = read_corpus(&dir.join("corpus.jsonl"))?;
    let qrels = read_qrels(&dir.join("qrels"))?;
    let lines: Vec<QueryLine> = read_lines(&dir.join("queries.jsonl"))?;
    let known: HashSet<&str> = lines.iter().map(|q| q.id.as_str()).collect();
    if let Some(id) = qrels.keys().find(|id| !known.contains(id.as_str())) {
        return Err(Error::InvalidArgument(format!(
            "{}: qrels name query {id:?}, which queries.jsonl does not hold",
            dir.display()
        )));
    }
    let mut timed = Vec::with_capacity(lines.len());
    for (position, line) in lines.into_iter().enumerate() {
        let Some(labels) = qrels.get(&line.id) else { continue };
        let time = match &line.time {
            None => position as f64,
            Some(time) => time.seconds().map_err(|e| {
                Error::InvalidArgument(format!(
                    "{}: query {:?}: time {e}",
                    dir.join("queries.jsonl").display(),
                    line.id
                ))
            })?,
        };
        timed.push((time, position, line, labels));
    }
    // Stable: equal times keep file order.
    timed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let mut guard = HashSet::new();
    let mut queries = Vec::with_capacity(timed.len());
    for (index, (_, _, line, labels)) in timed.into_iter().enumerate() {
        if labels.guard {
            guard.insert(line.id.clone());
        }
        let context = line
            .context
            .iter()
            .map(|t| {
                parse_speaker(&t.speaker)
                    .map(|speaker| ConversationTurn { speaker: speaker as i32, text: t.text.clone() })
            })
            .collect::<Result<Vec<_>>>()
            .map_err(|e| Error::InvalidArgument(format!("{}: query {:?}: {e}", dir.display(), line.id)))?;
        queries.push(LabelledQuery {
            id: line.id,
            index,
            query: line.text,
            context,
            relevant: labels.relevant.clone(),
            judged_irrelevant: None,
            reference_reply: line.reference_reply,
        });
    }
    Ok(LabelledSet { corpus, queries, guard })
}

/// The queries of `split` of the data set in `dir`.
pub fn read_queries(dir: &Path, split: Split) -> Result<Vec<LabelledQuery>> {
    Ok(open(dir)?.split(split))
}

/// The knowledge objects of the data set in `dir`.
pub fn read_corpus_of(dir: &Path) -> Result<Vec<KnowledgeObject>> {
    if is_dstc11(dir) {
        return crate::kb::read_dstc11(dir);
    }
    read_corpus(&dir.join("corpus.jsonl"))
}

/// A query's identity across data sets and training logs: its context and
/// question, lower-cased, with whitespace collapsed. Question text alone is
/// not enough ("Do they have free wifi?" recurs about many hotels).
pub fn query_key(context: &[String], query: &str) -> String {
    let mut key = String::new();
    for text in context.iter().map(String::as_str).chain([query]) {
        for word in text.split_whitespace() {
            if !key.is_empty() {
                key.push(' ');
            }
            key.extend(word.chars().flat_map(char::to_lowercase));
        }
        key.push_str(" |");
    }
    key
}

impl LabelledQuery {
    pub fn key(&self) -> String {
        let context: Vec<String> = self.context.iter().map(|t| t.text.clone()).collect();
        query_key(&context, &self.query)
    }

    /// `ranked` as it is scored: whole when the labels are complete; else
    /// only the objects someone judged, in their order (a condensed list,
    /// Sakai 2007). Agents judge what the serving ranker showed them, so on
    /// full lists any other ranker looks worse merely for putting objects
    /// nobody judged first; on condensed lists two rankers are compared on
    /// how they order the same judged objects.
    pub fn judged_only<'a>(&self, ranked: &'a [String]) -> Vec<&'a str> {
        match &self.judged_irrelevant {
            None => ranked.iter().map(String::as_str).collect(),
            Some(irrelevant) => ranked
                .iter()
                .filter(|id| self.relevant.contains(id) || irrelevant.contains(id))
                .map(String::as_str)
                .collect(),
        }
    }
}

#[derive(Serialize, Deserialize)]
struct CorpusLine {
    #[serde(rename = "_id")]
    id: String,
    #[serde(default)]
    title: String,
    text: String,
    #[serde(default)]
    metadata: HashMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct TurnLine {
    speaker: String,
    text: String,
}

#[derive(Serialize, Deserialize)]
struct QueryLine {
    #[serde(rename = "_id")]
    id: String,
    text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    context: Vec<TurnLine>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    reference_reply: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    time: Option<Time>,
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum Time {
    Seconds(f64),
    Timestamp(String),
}

impl Time {
    fn seconds(&self) -> std::result::Result<f64, String> {
        match self {
            Time::Seconds(s) if s.is_finite() => Ok(*s),
            Time::Seconds(s) => Err(format!("{s} is not a finite number of seconds")),
            Time::Timestamp(text) => text
                .parse::<prost_types::Timestamp>()
                .map(|t| t.seconds as f64 + t.nanos as f64 * 1e-9)
                .map_err(|_| format!("{text:?} is neither Unix seconds nor an RFC 3339 timestamp")),
        }
    }
}

/// One query's labels from the qrels files.
#[derive(Default)]
struct QueryLabels {
    relevant: Vec<String>,
    guard: bool,
}

fn write_lines<T: Serialize>(path: &Path, rows: impl Iterator<Item = T>) -> Result<()> {
    let io = |e: std::io::Error| Error::Internal(format!("{}: {e}", path.display()));
    let mut out = std::io::BufWriter::new(std::fs::File::create(path).map_err(io)?);
    for row in rows {
        serde_json::to_writer(&mut out, &row).map_err(|e| Error::Internal(e.to_string()))?;
        out.write_all(b"\n").map_err(io)?;
    }
    out.flush().map_err(io)
}

fn read_corpus(path: &Path) -> Result<Vec<KnowledgeObject>> {
    let lines: Vec<CorpusLine> = read_lines(path)?;
    let mut seen = HashSet::new();
    lines
        .into_iter()
        .map(|line| {
            if !seen.insert(line.id.clone()) {
                return Err(Error::InvalidArgument(format!("{}: _id {:?} appears twice", path.display(), line.id)));
            }
            let kind = match line.kind.as_deref() {
                None => KnowledgeKind::Other,
                Some(k) => parse_kind(k).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "{}: _id {:?}: kind {k:?} is not one of policy, case, faq, other",
                        path.display(),
                        line.id
                    ))
                })?,
            };
            Ok(KnowledgeObject {
                id: line.id,
                kind: kind as i32,
                title: line.title,
                text: line.text,
                metadata: line.metadata,
                ..Default::default()
            })
        })
        .collect()
}

/// Every `qrels/*.tsv`, merged per query (relevant objects in file order).
fn read_qrels(dir: &Path) -> Result<HashMap<String, QueryLabels>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::NotFound(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "tsv"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(Error::NotFound(format!("{} holds no qrels (*.tsv)", dir.display())));
    }
    let mut labels: HashMap<String, QueryLabels> = HashMap::new();
    for path in files {
        let guard = path.file_stem().is_some_and(|s| s == GUARD_QRELS);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| Error::NotFound(format!("cannot read {}: {e}", path.display())))?;
        for (n, line) in text.lines().enumerate() {
            let fields: Vec<&str> = line.split('\t').map(str::trim).collect();
            if line.trim().is_empty() || (n == 0 && fields.first() == Some(&"query-id")) {
                continue;
            }
            let [query, object, score] = fields[..] else {
                return Err(Error::InvalidArgument(format!(
                    "{}:{}: expected query-id, corpus-id and score separated by tabs",
                    path.display(),
                    n + 1
                )));
            };
            let score: f64 = score.parse().map_err(|_| {
                Error::InvalidArgument(format!("{}:{}: score {score:?} is not a number", path.display(), n + 1))
            })?;
            let entry = labels.entry(query.to_string()).or_default();
            entry.guard |= guard;
            if score > 0.0 && !entry.relevant.iter().any(|id| id == object) {
                entry.relevant.push(object.to_string());
            }
        }
    }
    labels.retain(|_, l| !l.relevant.is_empty());
    Ok(labels)
}

fn kind_name(kind: i32) -> &'static str {
    match KnowledgeKind::try_from(kind).unwrap_or(KnowledgeKind::Other) {
        KnowledgeKind::Policy => "policy",
        KnowledgeKind::Case => "case",
        KnowledgeKind::Faq => "faq",
        _ => "other",
    }
}

fn speaker_name(speaker: i32) -> &'static str {
    if speaker == Speaker::Agent as i32 { "agent" } else { "customer" }
}

fn parse_speaker(name: &str) -> Result<Speaker> {
    match name.to_ascii_lowercase().as_str() {
        "customer" | "user" | "u" => Ok(Speaker::Customer),
        "agent" | "assistant" | "s" => Ok(Speaker::Agent),
        other => Err(Error::InvalidArgument(format!("speaker {other:?} is not customer or agent"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// Ten labelled queries q0..q9 with times given out of file order, one
    /// unlabelled, q4 in the guard.
    fn fixture(dir: &Path) {
        write(
            dir,
            "corpus.jsonl",
            "{\"_id\":\"a\",\"title\":\"A\",\"text\":\"alpha\",\"kind\":\"faq\"}\n{\"_id\":\"b\",\"text\":\"beta\",\"metadata\":{\"x\":\"1\"}}\n",
        );
        let mut queries = String::new();
        for i in (0..10).rev() {
            queries.push_str(&format!(
                "{{\"_id\":\"q{i}\",\"text\":\"question {i}\",\"time\":\"2026-01-{:02}T10:00:00Z\",\"context\":[{{\"speaker\":\"customer\",\"text\":\"hi\"}},{{\"speaker\":\"agent\",\"text\":\"hello\"}}]}}\n",
                i + 1
            ));
        }
        queries.push_str("{\"_id\":\"unlabelled\",\"text\":\"no labels\"}\n");
        write(dir, "queries.jsonl", &queries);
        let mut qrels = String::from("query-id\tcorpus-id\tscore\n");
        for i in (0..10).filter(|&i| i != 4) {
            qrels.push_str(&format!("q{i}\t{}\t1\n", if i == 9 { "b" } else { "a" }));
        }
        qrels.push_str("q3\tb\t0\n");
        write(dir, "qrels/test.tsv", &qrels);
        write(dir, "qrels/guard.tsv", "q4\ta\t1\n");
    }

    #[test]
    fn beir_layout_reads_in_time_order_with_a_disjoint_guard() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let set = open(dir.path()).unwrap();
        assert_eq!(set.corpus.len(), 2);
        assert_eq!(set.corpus[0].kind, KnowledgeKind::Faq as i32);
        assert_eq!(set.corpus[1].metadata["x"], "1");
        let ids = |qs: Vec<LabelledQuery>| qs.into_iter().map(|q| q.id).collect::<Vec<_>>();
        // Time order reverses the file's; the unlabelled query is dropped; score 0 is not relevant.
        assert_eq!(ids(set.split(Split::All)), (0..10).map(|i| format!("q{i}")).collect::<Vec<_>>());
        assert_eq!(set.queries[3].relevant, vec!["a".to_string()]);
        // 90/10 over all ten; the guard's q4 leaves the history.
        assert_eq!(ids(set.split(Split::History)), ["q0", "q1", "q2", "q3", "q5", "q6", "q7", "q8"]);
        assert_eq!(ids(set.split(Split::Eval)), ["q9"]);
        assert_eq!(ids(set.split(Split::Guard)), ["q4"]);
        // q9's only relevant object, b, no history query has.
        assert_eq!(ids(set.unseen_relevant()), ["q9"]);
        assert_eq!(set.queries[0].context[1].speaker, Speaker::Agent as i32);
    }

    #[test]
    fn writing_and_reading_back_keeps_everything() {
        let dir = tempfile::tempdir().unwrap();
        fixture(dir.path());
        let set = open(dir.path()).unwrap();
        let copy = tempfile::tempdir().unwrap();
        set.write(copy.path()).unwrap();
        let back = open(copy.path()).unwrap();
        assert_eq!(back.queries, set.queries);
        assert_eq!(back.guard, set.guard);
        assert_eq!(back.corpus, set.corpus.iter().cloned().collect::<Vec<_>>());
    }

    #[test]
    fn bad_input_names_file_line_and_field() {
        let dir = tempfile::tempdir().unwrap();
        let err = open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("corpus.jsonl") && err.contains("DSTC11"), "{err}");
        fixture(dir.path());
        write(dir.path(), "qrels/extra.tsv", "ghost\ta\t1\n");
        let err = open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"ghost\""), "{err}");
        write(dir.path(), "qrels/extra.tsv", "q1 a 1\n");
        let err = open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("extra.tsv:1") && err.contains("tabs"), "{err}");
        std::fs::remove_file(dir.path().join("qrels/extra.tsv")).unwrap();
        write(dir.path(), "queries.jsonl", "{\"_id\":\"q1\",\"text\":\"x\",\"time\":\"yesterday\"}\n");
        write(dir.path(), "qrels/test.tsv", "q1\ta\t1\n");
        write(dir.path(), "qrels/guard.tsv", "");
        let err = open(dir.path()).unwrap_err().to_string();
        assert!(err.contains("\"yesterday\"") && err.contains("RFC 3339"), "{err}");
    }

    #[test]
    fn agents_labels_score_condensed_lists_and_complete_labels_whole_ones() {
        let ids = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut query = LabelledQuery {
            id: "q".into(),
            index: 0,
            query: "wifi?".into(),
            context: Vec::new(),
            relevant: ids(&["r1", "r2"]),
            judged_irrelevant: None,
            reference_reply: String::new(),
        };
        let ranked = ids(&["u1", "r1", "i1", "u2", "r2", "i2"]);
        assert_eq!(query.judged_only(&ranked), ["u1", "r1", "i1", "u2", "r2", "i2"]);
        query.judged_irrelevant = Some(ids(&["i1", "i2", "i3"]));
        assert_eq!(query.judged_only(&ranked), ["r1", "i1", "r2", "i2"], "unjudged u1, u2 leave, order stays");
        // The serving ranker put an unjudged object first; on the condensed list it is not penalised for that.
        let relevant: HashSet<&str> = ["r1", "r2"].into();
        let full = crate::eval::metrics::score_query(&ranked.iter().map(String::as_str).collect::<Vec<_>>(), &relevant);
        let condensed = crate::eval::metrics::score_query(&query.judged_only(&ranked), &relevant);
        let one = |s: &crate::eval::metrics::QueryScores| crate::eval::metrics::average(std::slice::from_ref(s));
        assert_eq!((one(&full).mrr, one(&condensed).mrr), (0.5, 1.0));
    }

    #[test]
    fn query_keys_ignore_case_and_spacing_but_not_context() {
        let a = query_key(&["About the  Acorn".into()], "Do they have WiFi?");
        assert_eq!(a, query_key(&["about the acorn".into()], "do they  have wifi?"));
        assert_ne!(a, query_key(&["about the bridge".into()], "do they have wifi?"));
        assert_ne!(query_key(&["a b".into()], "c"), query_key(&["a".into()], "b c"));
    }
}
