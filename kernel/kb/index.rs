//! Vector search over the knowledge base. [`VectorIndex`] is the seam an
//! approximate index can implement later; [`ExactIndex`] scores every
//! vector (SIMD dot products of unit vectors, both cores) and keeps the
//! top k, with kind and metadata filters applied during the scan.

use std::{
    cmp::Ordering,
    collections::{BinaryHeap, HashMap},
    sync::RwLock,
};

use rayon::prelude::*;

use crate::proto::{KnowledgeFilter, KnowledgeObject};

/// What the index keeps of an object: enough to filter and to cite.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    pub id: String,
    pub version: u64,
    pub kind: i32,
    pub metadata: HashMap<String, String>,
}

impl IndexEntry {
    pub fn of(object: &KnowledgeObject) -> Self {
        IndexEntry {
            id: object.id.clone(),
            version: object.version,
            kind: object.kind,
            metadata: object.metadata.clone(),
        }
    }

    pub(super) fn matches(&self, filter: &KnowledgeFilter) -> bool {
        (filter.kinds.is_empty() || filter.kinds.contains(&self.kind))
            && filter.metadata.iter().all(|(k, v)| self.metadata.get(k) == Some(v))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub id: String,
    pub version: u64,
    pub score: f32,
}

pub trait VectorIndex: Send + Sync {
    fn dimension(&self) -> usize;
    /// The embedding model the vectors come from.
    fn model_version(&self) -> &str;
    fn upsert(&self, entry: IndexEntry, vector: &[f32]);
    fn remove(&self, id: &str);
    /// The `k` best matches for a unit `query`, best first.
    fn search(&self, query: &[f32], k: usize, filter: &KnowledgeFilter) -> Vec<Hit>;
    /// [`VectorIndex::search`] for several queries at once; an index that
    /// reads its vectors once for all of them overrides this.
    fn search_many(&self, queries: &[Query]) -> Vec<Vec<Hit>> {
        queries.iter().map(|q| self.search(&q.vector, q.k, &q.filter)).collect()
    }
    /// The stored vector of `id` if the index holds exactly `version` of it.
    fn vector(&self, id: &str, version: u64) -> Option<Vec<f32>>;
    /// (id, version) of every indexed object.
    fn entries(&self) -> Vec<(String, u64)>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One search of a [`VectorIndex::search_many`] batch.
#[derive(Debug, Clone)]
pub struct Query {
    pub vector: Vec<f32>,
    pub k: usize,
    pub filter: KnowledgeFilter,
}

#[derive(Default)]
pub(super) struct Slots {
    pub(super) entries: Vec<Option<IndexEntry>>,
    pub(super) vectors: Vec<f32>,
    by_id: HashMap<String, usize>,
    free: Vec<usize>,
}

pub struct ExactIndex {
    dimension: usize,
    model_version: String,
    slots: RwLock<Slots>,
    /// Slots written or removed since a mirror of the index (on a GPU) last
    /// took them; `None` when nothing mirrors this index.
    changed: std::sync::Mutex<Option<Vec<usize>>>,
}

/// Rows scored per parallel task.
const ROWS_PER_TASK: usize = 1_024;

#[derive(Clone, Copy, PartialEq)]
struct Scored(f32, usize);

impl Eq for Scored {}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Reversed, so a BinaryHeap is a min-heap holding the best k; ties go to
/// the lower slot so results are deterministic.
impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        other.0.total_cmp(&self.0).then(self.1.cmp(&other.1))
    }
}

fn push_top(heap: &mut BinaryHeap<Scored>, k: usize, item: Scored) {
    if heap.len() < k {
        heap.push(item);
    } else if heap.peek().is_some_and(|worst| item < *worst) {
        heap.pop();
        heap.push(item);
    }
}

impl ExactIndex {
    pub fn new(dimension: usize, model_version: impl Into<String>) -> Self {
        ExactIndex {
            dimension,
            model_version: model_version.into(),
            slots: RwLock::default(),
            changed: Default::default(),
        }
    }

    /// As [`ExactIndex::new`], recording changed slots for a mirror.
    pub(super) fn mirrored(dimension: usize, model_version: impl Into<String>) -> Self {
        let index = ExactIndex::new(dimension, model_version);
        *index.changed.lock().unwrap_or_else(|p| p.into_inner()) = Some(Vec::new());
        index
    }

    /// Runs `f` over the slots under the read lock (no write can happen
    /// meanwhile), with the slots changed since the last call.
    pub(super) fn read_with_changes<R>(&self, f: impl FnOnce(&Slots, Vec<usize>) -> R) -> R {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let changed = self.changed.lock().unwrap_or_else(|p| p.into_inner()).as_mut().map(std::mem::take);
        f(&slots, changed.unwrap_or_default())
    }

    fn record_change(&self, slot: usize) {
        if let Some(changed) = self.changed.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            changed.push(slot);
        }
    }
}

impl VectorIndex for ExactIndex {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn model_version(&self) -> &str {
        &self.model_version
    }

    fn upsert(&self, entry: IndexEntry, vector: &[f32]) {
        assert_eq!(vector.len(), self.dimension, "vector dimension");
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        let dim = self.dimension;
        let slot = match slots.by_id.get(&entry.id) {
            Some(&slot) => slot,
            None => match slots.free.pop() {
                Some(slot) => slot,
                None => {
                    slots.entries.push(None);
                    slots.vectors.extend(std::iter::repeat_n(0.0, dim));
                    slots.entries.len() - 1
                }
            },
        };
        slots.vectors[slot * dim..(slot + 1) * dim].copy_from_slice(vector);
        slots.by_id.insert(entry.id.clone(), slot);
        slots.entries[slot] = Some(entry);
        self.record_change(slot);
    }

    fn vector(&self, id: &str, version: u64) -> Option<Vec<f32>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let slot = *slots.by_id.get(id)?;
        let current = slots.entries[slot].as_ref().is_some_and(|e| e.version == version);
        current.then(|| slots.vectors[slot * self.dimension..(slot + 1) * self.dimension].to_vec())
    }

    fn remove(&self, id: &str) {
        let mut slots = self.slots.write().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.by_id.remove(id) {
            slots.entries[slot] = None;
            slots.free.push(slot);
            self.record_change(slot);
        }
    }

    fn search(&self, query: &[f32], k: usize, filter: &KnowledgeFilter) -> Vec<Hit> {
        let query = Query { vector: query.to_vec(), k, filter: filter.clone() };
        self.search_many(std::slice::from_ref(&query)).pop().unwrap_or_default()
    }

    /// One pass over the vectors for all `queries`: each chunk of rows is
    /// read from memory once and scored against every query while it sits
    /// in cache, so concurrent searches cost little more than one.
    fn search_many(&self, queries: &[Query]) -> Vec<Vec<Hit>> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        let dim = self.dimension;
        let valid = |q: &Query| q.k > 0 && q.vector.len() == dim;
        let heaps: Vec<Vec<BinaryHeap<Scored>>> = slots
            .vectors
            .par_chunks(ROWS_PER_TASK * dim)
            .enumerate()
            .map(|(task, rows)| {
                let mut scores = vec![0f32; rows.len() / dim];
                queries
                    .iter()
                    .map(|q| {
                        let mut heap = BinaryHeap::with_capacity(q.k + 1);
                        if !valid(q) {
                            return heap;
                        }
                        let unfiltered = q.filter.kinds.is_empty() && q.filter.metadata.is_empty();
                        crate::backend::dot_rows(&q.vector, rows, &mut scores);
                        for (i, &score) in scores.iter().enumerate() {
                            let slot = task * ROWS_PER_TASK + i;
                            let live = match &slots.entries[slot] {
                                Some(entry) => unfiltered || entry.matches(&q.filter),
                                None => false,
                            };
                            if live {
                                push_top(&mut heap, q.k, Scored(score, slot));
                            }
                        }
                        heap
                    })
                    .collect()
            })
            .collect();
        queries
            .iter()
            .enumerate()
            .map(|(qi, q)| {
                let mut best = BinaryHeap::with_capacity(q.k + 1);
                for item in heaps.iter().flat_map(|per_query| per_query[qi].iter().copied()) {
                    push_top(&mut best, q.k, item);
                }
                best.into_sorted_vec()
                    .into_iter()
                    .filter_map(|Scored(score, slot)| {
                        slots.entries[slot].as_ref().map(|e| Hit { id: e.id.clone(), version: e.version, score })
                    })
                    .collect()
            })
            .collect()
    }

    fn entries(&self) -> Vec<(String, u64)> {
        let slots = self.slots.read().unwrap_or_else(|p| p.into_inner());
        slots.entries.iter().flatten().map(|e| (e.id.clone(), e.version)).collect()
    }

    fn len(&self) -> usize {
        self.slots.read().unwrap_or_else(|p| p.into_inner()).by_id.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn exact_top_k_with_filters_updates_and_removals() {
        let index = ExactIndex::new(3, "m@1");
        let entry = |id: &str, kind: i32, team: &str| IndexEntry {
            id: id.into(),
            version: 1,
            kind,
            metadata: [("team".to_string(), team.to_string())].into(),
        };
        index.upsert(entry("a", 1, "x"), &unit(&[1.0, 0.0, 0.0]));
        index.upsert(entry("b", 2, "x"), &unit(&[0.9, 0.1, 0.0]));
        index.upsert(entry("c", 2, "y"), &unit(&[0.0, 1.0, 0.0]));
        let q = unit(&[1.0, 0.05, 0.0]);
        let ids = |hits: Vec<Hit>| hits.into_iter().map(|h| h.id).collect::<Vec<_>>();
        assert_eq!(ids(index.search(&q, 2, &KnowledgeFilter::default())), ["a", "b"]);
        assert_eq!(ids(index.search(&q, 10, &KnowledgeFilter { kinds: vec![2], ..Default::default() })), ["b", "c"]);
        let team_y = KnowledgeFilter { metadata: [("team".to_string(), "y".to_string())].into(), ..Default::default() };
        assert_eq!(ids(index.search(&q, 10, &team_y)), ["c"]);
        index.remove("a");
        index.upsert(entry("c", 2, "y"), &unit(&[1.0, 0.0, 0.0]));
        assert_eq!(ids(index.search(&q, 10, &KnowledgeFilter::default())), ["c", "b"]);
        index.upsert(entry("d", 1, "x"), &unit(&[0.0, 0.0, 1.0]));
        assert_eq!(index.len(), 3, "a freed slot is reused");
    }

    #[test]
    fn matches_brute_force_on_many_random_vectors() {
        let dim = 24;
        let index = ExactIndex::new(dim, "m@1");
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        let vectors: Vec<Vec<f32>> = (0..10_000).map(|_| unit(&(0..dim).map(|_| next()).collect::<Vec<_>>())).collect();
        for (i, v) in vectors.iter().enumerate() {
            index.upsert(IndexEntry { id: i.to_string(), version: 1, kind: 1, metadata: HashMap::new() }, v);
        }
        let q = unit(&(0..dim).map(|_| next()).collect::<Vec<_>>());
        let mut brute: Vec<(f32, usize)> =
            vectors.iter().enumerate().map(|(i, v)| (v.iter().zip(&q).map(|(a, b)| a * b).sum(), i)).collect();
        brute.sort_by(|a, b| b.0.total_cmp(&a.0));
        let hits = index.search(&q, 75, &KnowledgeFilter::default());
        assert_eq!(hits.len(), 75);
        for (hit, (score, i)) in hits.iter().zip(&brute) {
            assert_eq!(hit.id, i.to_string());
            assert!((hit.score - score).abs() < 1e-5);
        }
    }

    /// Deterministic pseudo-random unit vectors.
    fn vectors(count: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut state = seed;
        (0..count)
            .map(|_| {
                let v: Vec<f32> = (0..dim)
                    .map(|_| {
                        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
                        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                    })
                    .collect();
                unit(&v)
            })
            .collect()
    }

    #[test]
    fn one_shared_scan_answers_each_query_as_its_own_search_would() {
        let (dim, count) = (16, 5_000);
        let index = ExactIndex::new(dim, "m@1");
        for (i, v) in vectors(count, dim, 1).iter().enumerate() {
            let entry = IndexEntry {
                id: format!("o{i}"),
                version: 1,
                kind: (i % 3) as i32,
                metadata: [("team".to_string(), if i % 2 == 0 { "x" } else { "y" }.to_string())].into(),
            };
            index.upsert(entry, v);
        }
        index.remove("o7");
        let filters = [
            KnowledgeFilter::default(),
            KnowledgeFilter { kinds: vec![2], ..Default::default() },
            KnowledgeFilter { metadata: [("team".to_string(), "y".to_string())].into(), ..Default::default() },
        ];
        let queries: Vec<Query> = vectors(9, dim, 2)
            .into_iter()
            .enumerate()
            .map(|(i, vector)| Query { vector, k: [1, 75, 1_000][i % 3], filter: filters[i / 3].clone() })
            .chain([Query { vector: vec![1.0; 3], k: 5, filter: KnowledgeFilter::default() }])
            .collect();
        let shared = index.search_many(&queries);
        for (q, hits) in queries.iter().zip(&shared).take(9) {
            let alone: Vec<(String, f32)> = {
                // The reference: score every live object and sort.
                let slots = index.slots.read().unwrap();
                let mut all: Vec<(String, f32)> = (0..count)
                    .filter_map(|slot| {
                        let e = slots.entries[slot].as_ref()?;
                        let mut score = [0f32];
                        crate::backend::dot_rows(&q.vector, &slots.vectors[slot * dim..(slot + 1) * dim], &mut score);
                        e.matches(&q.filter).then(|| (e.id.clone(), score[0]))
                    })
                    .collect();
                all.sort_by(|a, b| b.1.total_cmp(&a.1));
                all.truncate(q.k);
                all
            };
            let got: Vec<(String, f32)> = hits.iter().map(|h| (h.id.clone(), h.score)).collect();
            assert_eq!(got, alone, "k {} filter {:?}", q.k, q.filter);
        }
        assert!(shared[9].is_empty(), "a query of the wrong dimension finds nothing");
        assert!(!shared.iter().flatten().any(|h| h.id == "o7"), "removed objects stay out");
    }
}
