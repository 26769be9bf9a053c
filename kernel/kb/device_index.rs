//! [`VectorIndex`] with its vectors resident on a GPU: the host keeps the
//! entries (ids, versions, kinds, metadata) and a copy of each vector, the
//! device keeps the rows it scores. Writes reach the device lazily, slot by
//! slot, before the next search; a search runs under the host index's read
//! lock, so the slots it reports are the slots it scored.

use std::sync::{Arc, Mutex};

use super::index::{ExactIndex, Hit, IndexEntry, Query, Slots, VectorIndex};
use crate::backend::cuda::{
    CudaDevice, CudaError,
    search::{DeviceQuery, DeviceVectors, VectorPrecision},
};

pub struct DeviceIndex {
    host: ExactIndex,
    gpu: Arc<CudaDevice>,
    mirror: Mutex<DeviceVectors>,
}

impl DeviceIndex {
    pub fn new(
        gpu: Arc<CudaDevice>,
        dimension: usize,
        model_version: impl Into<String>,
        precision: VectorPrecision,
    ) -> Result<Self, CudaError> {
        let mirror = Mutex::new(gpu.vectors(dimension, precision)?);
        Ok(DeviceIndex { host: ExactIndex::mirrored(dimension, model_version), gpu, mirror })
    }

    /// Bytes the index holds on the GPU.
    pub fn device_bytes(&self) -> usize {
        self.mirror.lock().unwrap_or_else(|p| p.into_inner()).device_bytes()
    }

    fn search_on_device(&self, queries: &[Query]) -> Result<Vec<Vec<Hit>>, CudaError> {
        let mut mirror = self.mirror.lock().unwrap_or_else(|p| p.into_inner());
        self.host.read_with_changes(|slots, changed| {
            if let Err(e) = write_changes(&self.gpu, &mut mirror, slots, changed, self.host.dimension()) {
                // The changes are taken: rewrite everything next time.
                mirror.forget();
                return Err(e);
            }
            let words = slots.entries.len().div_ceil(32);
            let filters: Vec<(u32, Option<Vec<u32>>)> = queries.iter().map(|q| filter_masks(slots, q, words)).collect();
            let device_queries: Vec<DeviceQuery> = queries
                .iter()
                .zip(&filters)
                .map(|(q, (kind_mask, allow))| DeviceQuery {
                    vector: &q.vector,
                    k: q.k,
                    kind_mask: *kind_mask,
                    allow: allow.as_deref(),
                })
                .collect();
            let valid: Vec<bool> = queries.iter().map(|q| q.k > 0 && q.vector.len() == self.host.dimension()).collect();
            let asked: Vec<DeviceQuery> =
                device_queries.into_iter().zip(&valid).filter(|(_, ok)| **ok).map(|(q, _)| q).collect();
            let mut found = self.gpu.search(&mirror, &asked)?.into_iter();
            Ok(valid
                .iter()
                .map(|ok| if *ok { found.next().unwrap_or_default() } else { Vec::new() })
                .map(|best| {
                    best.into_iter()
                        .filter_map(|(score, slot)| {
                            let entry = slots.entries.get(slot as usize)?.as_ref()?;
                            Some(Hit { id: entry.id.clone(), version: entry.version, score })
                        })
                        .collect()
                })
                .collect())
        })
    }
}

/// Copies the changed slots' rows, kinds and live flags to the device, in
/// runs of consecutive slots.
fn write_changes(
    gpu: &CudaDevice,
    mirror: &mut DeviceVectors,
    slots: &Slots,
    mut changed: Vec<usize>,
    dim: usize,
) -> Result<(), CudaError> {
    // Slots the mirror has never held are written whole.
    changed.extend(mirror.slots()..slots.entries.len());
    for run in runs(changed) {
        let entries = &slots.entries[run.clone()];
        let kinds: Vec<u32> = entries.iter().map(|e| e.as_ref().map_or(u32::MAX, |e| e.kind as u32)).collect();
        let live: Vec<u8> = entries.iter().map(|e| u8::from(e.is_some())).collect();
        gpu.write_slots(mirror, run.start, &slots.vectors[run.start * dim..run.end * dim], &kinds, &live)?;
    }
    Ok(())
}

/// Slot numbers (any order, repeats allowed) as sorted runs of consecutive slots.
fn runs(mut slots: Vec<usize>) -> Vec<std::ops::Range<usize>> {
    slots.sort_unstable();
    slots.dedup();
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    for slot in slots {
        match runs.last_mut() {
            Some(run) if run.end == slot => run.end += 1,
            _ => runs.push(slot..slot + 1),
        }
    }
    runs
}

/// The kernel's filters for `query`: a kind bit mask (0: any kind) and,
/// for metadata filters or kinds beyond the mask's 32 bits, one allow bit
/// per slot computed here from the entries.
fn filter_masks(slots: &Slots, query: &Query, words: usize) -> (u32, Option<Vec<u32>>) {
    let filter = &query.filter;
    let kinds_fit = filter.kinds.iter().all(|&k| (0..32).contains(&k));
    if filter.metadata.is_empty() && kinds_fit {
        return (filter.kinds.iter().fold(0, |mask, &k| mask | (1u32 << k)), None);
    }
    let mut bits = vec![0u32; words];
    for (slot, entry) in slots.entries.iter().enumerate() {
        if entry.as_ref().is_some_and(|e| e.matches(filter)) {
            bits[slot / 32] |= 1 << (slot % 32);
        }
    }
    (0, Some(bits))
}

impl VectorIndex for DeviceIndex {
    fn dimension(&self) -> usize {
        self.host.dimension()
    }

    fn model_version(&self) -> &str {
        self.host.model_version()
    }

    fn upsert(&self, entry: IndexEntry, vector: &[f32]) {
        self.host.upsert(entry, vector)
    }

    fn remove(&self, id: &str) {
        self.host.remove(id)
    }

    fn search(&self, query: &[f32], k: usize, filter: &crate::proto::KnowledgeFilter) -> Vec<Hit> {
        let query = Query { vector: query.to_vec(), k, filter: filter.clone() };
        self.search_many(std::slice::from_ref(&query)).pop().unwrap_or_default()
    }

    /// On the GPU; should it fail there, the host copy answers the same
    /// search, and the failure is logged.
    fn search_many(&self, queries: &[Query]) -> Vec<Vec<Hit>> {
        match self.search_on_device(queries) {
            Ok(hits) => hits,
            Err(e) => {
                tracing::error!(error = %e, "vector search on the GPU failed; the host index answers");
                self.host.search_many(queries)
            }
        }
    }

    fn vector(&self, id: &str, version: u64) -> Option<Vec<f32>> {
        self.host.vector(id, version)
    }

    fn entries(&self) -> Vec<(String, u64)> {
        self.host.entries()
    }

    fn len(&self) -> usize {
        self.host.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::KnowledgeFilter;

    #[test]
    fn changed_slots_become_sorted_runs() {
        assert!(runs(Vec::new()).is_empty());
        assert_eq!(runs(vec![5, 3, 4, 4, 9, 0]), vec![0..1, 3..6, 9..10]);
        assert_eq!(runs((0..1000).rev().collect()), vec![0..1000]);
    }

    #[test]
    fn filters_become_kind_masks_or_allow_bits() {
        let index = ExactIndex::mirrored(2, "v");
        let entry = |id: &str, kind: i32, lang: &str| IndexEntry {
            id: id.into(),
            version: 1,
            kind,
            metadata: [("lang".to_string(), lang.to_string())].into(),
        };
        for (i, (kind, lang)) in [(1, "en"), (2, "de"), (1, "de"), (40, "en")].into_iter().enumerate() {
            index.upsert(entry(&format!("o{i}"), kind, lang), &[1.0, 0.0]);
        }
        index.remove("o0");
        let query = |kinds: Vec<i32>, metadata: &[(&str, &str)]| Query {
            vector: vec![1.0, 0.0],
            k: 3,
            filter: KnowledgeFilter {
                kinds,
                metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            },
        };
        index.read_with_changes(|slots, changed| {
            assert_eq!(changed, vec![0, 1, 2, 3, 0], "every write and the removal, in order");
            assert_eq!(filter_masks(slots, &query(vec![], &[]), 1), (0, None));
            assert_eq!(filter_masks(slots, &query(vec![1, 2], &[]), 1), (0b110, None));
            // Metadata: bits of the live slots that match (slot 0 was removed).
            assert_eq!(filter_masks(slots, &query(vec![], &[("lang", "de")]), 1), (0, Some(vec![0b0110])));
            // A kind past the mask's 32 bits goes to allow bits as well.
            assert_eq!(filter_masks(slots, &query(vec![40], &[]), 1), (0, Some(vec![0b1000])));
        });
        index.read_with_changes(|_, changed| assert!(changed.is_empty(), "changes are taken once"));
    }
}
