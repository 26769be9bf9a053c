//! Knowledge objects in redb: a pure-Rust, transactional, crash-safe B-tree
//! store in one file. Chosen over SQLite because it needs no C library or
//! system package, and our access is key/value (by id, by id+version, in id
//! order), which needs no SQL.
//!
//! Every key starts with the tenant, so one tenant's objects are one range
//! and another tenant's ids are simply absent. Tables: `tenant_latest`
//! (tenant, id) → encoded `KnowledgeObject` (tombstones included);
//! `tenant_versions` (tenant, id, version) → encoded `KnowledgeObject`;
//! `tenant_vectors` (model, tenant, id) → the latest version's embedding.
//! A file from before tenants has its objects moved to the default tenant
//! when it is first opened.

use std::{path::Path, time::SystemTime};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition, TableHandle};

use crate::{
    proto::{KnowledgeFilter, KnowledgeObject},
    tenancy::DEFAULT_TENANT,
};

const LATEST: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("tenant_latest");
const VERSIONS: TableDefinition<(&str, &str, u64), &[u8]> = TableDefinition::new("tenant_versions");
/// (embedding model version, tenant, id) → embedding of the latest version:
/// knowledge version (u64 LE), model-version length (u32 LE), model version
/// (UTF-8), f32 LE values. Keyed by model too, so a retriever switch fills
/// the new model's vectors while the old model's stay for a restart or a
/// rollback.
const VECTORS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("tenant_vectors");

/// The tables of a store written before tenants.
mod legacy {
    use redb::TableDefinition;
    pub const LATEST: TableDefinition<&str, &[u8]> = TableDefinition::new("latest");
    pub const VERSIONS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("versions");
    pub const VECTORS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("model_vectors");
}

#[derive(Debug, thiserror::Error)]
pub enum KbError {
    #[error("knowledge object {0:?} does not exist")]
    NotFound(String),
    #[error("knowledge object {id:?} has no version {version} (latest is {latest})")]
    VersionNotFound { id: String, version: u64, latest: u64 },
    #[error("knowledge object {id:?} was deleted (tombstone version {version})")]
    Deleted { id: String, version: u64 },
    #[error("knowledge base at {path} is in use by another process (is an `aitl serve` running on this data dir?)")]
    Locked { path: String },
    #[error("knowledge base storage error: {0}")]
    Storage(String),
}

fn storage(e: impl std::fmt::Display) -> KbError {
    KbError::Storage(e.to_string())
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct UpsertOutcome {
    pub inserted: u64,
    pub updated: u64,
    pub unchanged: u64,
}

pub struct ListPage {
    pub objects: Vec<KnowledgeObject>,
    /// Id to continue after; None on the last page.
    pub next_after: Option<String>,
}

pub struct KnowledgeStore {
    db: Database,
}

fn same_content(a: &KnowledgeObject, b: &KnowledgeObject) -> bool {
    a.kind == b.kind && a.title == b.title && a.text == b.text && a.metadata == b.metadata && !a.deleted
}

pub fn matches(object: &KnowledgeObject, filter: &KnowledgeFilter) -> bool {
    (filter.kinds.is_empty() || filter.kinds.contains(&object.kind))
        && filter.metadata.iter().all(|(k, v)| object.metadata.get(k) == Some(v))
}

/// A live object as stored: its tenant, and its vector when current.
pub struct StoredObject {
    pub tenant: String,
    pub object: KnowledgeObject,
    pub vector: Option<Vec<f32>>,
}

fn decode(bytes: &[u8]) -> Result<KnowledgeObject, KbError> {
    KnowledgeObject::decode(bytes).map_err(storage)
}

impl KnowledgeStore {
    pub fn open(path: &Path) -> Result<KnowledgeStore, KbError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(storage)?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => KbError::Locked { path: path.display().to_string() },
            other => storage(format!("{}: {other}", path.display())),
        })?;
        let txn = db.begin_write().map_err(storage)?;
        txn.open_table(LATEST).map_err(storage)?;
        txn.open_table(VERSIONS).map_err(storage)?;
        txn.open_table(VECTORS).map_err(storage)?;
        let moved = move_legacy_tables(&txn)?;
        txn.commit().map_err(storage)?;
        if moved > 0 {
            tracing::info!(
                objects = moved,
                tenant = DEFAULT_TENANT,
                "knowledge from before tenants moved to the default tenant"
            );
        }
        Ok(KnowledgeStore { db })
    }

    /// Writes a batch of one tenant's objects atomically. Objects must be
    /// validated (ids unique within the batch). Unchanged objects keep their
    /// version. Returns the counts and the objects written (new versions),
    /// for indexing.
    pub fn upsert_batch(
        &self,
        tenant: &str,
        objects: Vec<KnowledgeObject>,
    ) -> Result<(UpsertOutcome, Vec<KnowledgeObject>), KbError> {
        let now = Some(prost_types::Timestamp::from(SystemTime::now()));
        let mut outcome = UpsertOutcome::default();
        let mut written = Vec::new();
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut latest = txn.open_table(LATEST).map_err(storage)?;
            let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
            for mut object in objects {
                let previous = latest
                    .get((tenant, object.id.as_str()))
                    .map_err(storage)?
                    .map(|b| decode(b.value()))
                    .transpose()?;
                object.deleted = false;
                object.version = match &previous {
                    Some(prev) if same_content(prev, &object) => {
                        outcome.unchanged += 1;
                        continue;
                    }
                    Some(prev) => {
                        outcome.updated += 1;
                        prev.version + 1
                    }
                    None => {
                        outcome.inserted += 1;
                        1
                    }
                };
                object.updated_at = now;
                let bytes = object.encode_to_vec();
                latest.insert((tenant, object.id.as_str()), bytes.as_slice()).map_err(storage)?;
                versions.insert((tenant, object.id.as_str(), object.version), bytes.as_slice()).map_err(storage)?;
                written.push(object);
            }
        }
        txn.commit().map_err(storage)?;
        Ok((outcome, written))
    }

    /// Leaves a tombstone; returns its version.
    pub fn delete(&self, tenant: &str, id: &str) -> Result<u64, KbError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let version = {
            let mut latest = txn.open_table(LATEST).map_err(storage)?;
            let mut versions = txn.open_table(VERSIONS).map_err(storage)?;
            let previous = latest
                .get((tenant, id))
                .map_err(storage)?
                .map(|b| decode(b.value()))
                .transpose()?
                .ok_or_else(|| KbError::NotFound(id.into()))?;
            if previous.deleted {
                return Err(KbError::Deleted { id: id.into(), version: previous.version });
            }
            let tombstone = KnowledgeObject {
                id: id.into(),
                kind: previous.kind,
                version: previous.version + 1,
                updated_at: Some(SystemTime::now().into()),
                deleted: true,
                ..Default::default()
            };
            let bytes = tombstone.encode_to_vec();
            latest.insert((tenant, id), bytes.as_slice()).map_err(storage)?;
            versions.insert((tenant, id, tombstone.version), bytes.as_slice()).map_err(storage)?;
            tombstone.version
        };
        txn.commit().map_err(storage)?;
        Ok(version)
    }

    /// The latest version (`version` 0) or a given one.
    pub fn get(&self, tenant: &str, id: &str, version: u64, include_deleted: bool) -> Result<KnowledgeObject, KbError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let latest = txn.open_table(LATEST).map_err(storage)?;
        let current = latest
            .get((tenant, id))
            .map_err(storage)?
            .map(|b| decode(b.value()))
            .transpose()?
            .ok_or_else(|| KbError::NotFound(id.into()))?;
        let tombstone = current.deleted.then_some(current.version);
        let object = if version == 0 || version == current.version {
            current
        } else {
            let versions = txn.open_table(VERSIONS).map_err(storage)?;
            versions
                .get((tenant, id, version))
                .map_err(storage)?
                .map(|b| decode(b.value()))
                .transpose()?
                .ok_or(KbError::VersionNotFound { id: id.into(), version, latest: current.version })?
        };
        // A deleted object's old versions go with it: the proto promises
        // NOT_FOUND for any version once the latest is a tombstone.
        if let Some(version) = tombstone
            && !include_deleted
        {
            return Err(KbError::Deleted { id: id.into(), version });
        }
        Ok(object)
    }

    /// A tenant's objects in id order after `after`, at most `limit`,
    /// matching `filter`.
    pub fn list(
        &self,
        tenant: &str,
        after: Option<&str>,
        limit: usize,
        filter: &KnowledgeFilter,
        include_deleted: bool,
    ) -> Result<ListPage, KbError> {
        use std::ops::Bound::{Excluded, Included, Unbounded};
        let txn = self.db.begin_read().map_err(storage)?;
        let latest = txn.open_table(LATEST).map_err(storage)?;
        let start = match after {
            Some(after) => Excluded((tenant, after)),
            None => Included((tenant, "")),
        };
        let range = latest.range::<(&str, &str)>((start, Unbounded)).map_err(storage)?;
        let mut objects = Vec::new();
        let mut last_seen = None;
        for entry in range {
            let (key, bytes) = entry.map_err(storage)?;
            let (owner, id) = key.value();
            if owner != tenant {
                break;
            }
            last_seen = Some(id.to_string());
            let object = decode(bytes.value())?;
            if (include_deleted || !object.deleted) && matches(&object, filter) {
                objects.push(object);
                if objects.len() == limit {
                    break;
                }
            }
        }
        // A full page may be the last one; the next call then returns empty.
        let next_after = (objects.len() == limit).then_some(last_seen).flatten();
        Ok(ListPage { objects, next_after })
    }

    /// Stores embeddings made by `model_version` for a tenant's
    /// `(id, knowledge version)`.
    pub fn put_vectors(
        &self,
        model_version: &str,
        tenant: &str,
        entries: &[(String, u64, Vec<f32>)],
    ) -> Result<(), KbError> {
        let txn = self.db.begin_write().map_err(storage)?;
        {
            let mut vectors = txn.open_table(VECTORS).map_err(storage)?;
            let mut bytes = Vec::new();
            for (id, version, vector) in entries {
                encode_vector(&mut bytes, model_version, *version, vector);
                vectors.insert((model_version, tenant, id.as_str()), bytes.as_slice()).map_err(storage)?;
            }
        }
        txn.commit().map_err(storage)
    }

    /// Every tenant's live objects, each with its stored vector when that
    /// vector is current: made by `model_version` from the object's latest
    /// version.
    pub fn objects_with_vectors(&self, model_version: &str) -> Result<Vec<StoredObject>, KbError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let latest = txn.open_table(LATEST).map_err(storage)?;
        let vectors = txn.open_table(VECTORS).map_err(storage)?;
        let mut out = Vec::new();
        for entry in latest.iter().map_err(storage)? {
            let (key, bytes) = entry.map_err(storage)?;
            let (tenant, id) = key.value();
            let object = decode(bytes.value())?;
            if object.deleted {
                continue;
            }
            let vector = vectors
                .get((model_version, tenant, id))
                .map_err(storage)?
                .and_then(|stored| decode_vector(stored.value(), model_version, object.version));
            out.push(StoredObject { tenant: tenant.to_string(), object, vector });
        }
        Ok(out)
    }

    /// Deletes the stored vectors of every embedding model not in `keep`;
    /// returns how many it deleted.
    pub fn retain_vector_models(&self, keep: &[&str]) -> Result<u64, KbError> {
        let txn = self.db.begin_write().map_err(storage)?;
        let mut deleted = 0;
        {
            let mut vectors = txn.open_table(VECTORS).map_err(storage)?;
            let mut doomed: Vec<(String, String, String)> = Vec::new();
            for entry in vectors.iter().map_err(storage)? {
                let (key, _) = entry.map_err(storage)?;
                let (model, tenant, id) = key.value();
                if !keep.contains(&model) {
                    doomed.push((model.to_string(), tenant.to_string(), id.to_string()));
                }
            }
            for (model, tenant, id) in &doomed {
                vectors.remove((model.as_str(), tenant.as_str(), id.as_str())).map_err(storage)?;
                deleted += 1;
            }
        }
        txn.commit().map_err(storage)?;
        Ok(deleted)
    }

    /// Live (not deleted) objects, of all tenants.
    pub fn count_live(&self) -> Result<u64, KbError> {
        let txn = self.db.begin_read().map_err(storage)?;
        let latest = txn.open_table(LATEST).map_err(storage)?;
        let mut live = 0;
        for entry in latest.iter().map_err(storage)? {
            let (_, bytes) = entry.map_err(storage)?;
            live += u64::from(!decode(bytes.value())?.deleted);
        }
        Ok(live)
    }
}

/// Moves the objects, versions and vectors of a store from before tenants
/// into the default tenant, in the caller's transaction; returns how many
/// objects it moved.
fn move_legacy_tables(txn: &redb::WriteTransaction) -> Result<u64, KbError> {
    let names: Vec<String> = txn.list_tables().map_err(storage)?.map(|t| t.name().to_string()).collect();
    let has = |table: &str| names.iter().any(|n| n == table);
    let mut moved = 0;
    if has(legacy::LATEST.name()) {
        let old = txn.open_table(legacy::LATEST).map_err(storage)?;
        let mut new = txn.open_table(LATEST).map_err(storage)?;
        for entry in old.iter().map_err(storage)? {
            let (key, bytes) = entry.map_err(storage)?;
            new.insert((DEFAULT_TENANT, key.value()), bytes.value()).map_err(storage)?;
            moved += 1;
        }
        drop(old);
        txn.delete_table(legacy::LATEST).map_err(storage)?;
    }
    if has(legacy::VERSIONS.name()) {
        let old = txn.open_table(legacy::VERSIONS).map_err(storage)?;
        let mut new = txn.open_table(VERSIONS).map_err(storage)?;
        for entry in old.iter().map_err(storage)? {
            let (key, bytes) = entry.map_err(storage)?;
            let (id, version) = key.value();
            new.insert((DEFAULT_TENANT, id, version), bytes.value()).map_err(storage)?;
        }
        drop(old);
        txn.delete_table(legacy::VERSIONS).map_err(storage)?;
    }
    if has(legacy::VECTORS.name()) {
        let old = txn.open_table(legacy::VECTORS).map_err(storage)?;
        let mut new = txn.open_table(VECTORS).map_err(storage)?;
        for entry in old.iter().map_err(storage)? {
            let (key, bytes) = entry.map_err(storage)?;
            let (model, id) = key.value();
            new.insert((model, DEFAULT_TENANT, id), bytes.value()).map_err(storage)?;
        }
        drop(old);
        txn.delete_table(legacy::VECTORS).map_err(storage)?;
    }
    Ok(moved)
}

fn encode_vector(bytes: &mut Vec<u8>, model_version: &str, version: u64, vector: &[f32]) {
    bytes.clear();
    bytes.extend_from_slice(&version.to_le_bytes());
    bytes.extend_from_slice(&(model_version.len() as u32).to_le_bytes());
    bytes.extend_from_slice(model_version.as_bytes());
    for v in vector {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
}

/// The vector in a `vectors` value, if it was made by `model_version`
/// from knowledge version `version`.
fn decode_vector(bytes: &[u8], model_version: &str, version: u64) -> Option<Vec<f32>> {
    let stored_version = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let len = u32::from_le_bytes(bytes.get(8..12)?.try_into().ok()?) as usize;
    let model = bytes.get(12..12 + len)?;
    if stored_version != version || model != model_version.as_bytes() {
        return None;
    }
    let values = bytes.get(12 + len..)?;
    Some(values.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "acme";

    fn object(id: &str, text: &str) -> KnowledgeObject {
        KnowledgeObject { id: id.into(), kind: 3, title: "t".into(), text: text.into(), ..Default::default() }
    }

    #[test]
    fn versions_tombstones_and_history() {
        let dir = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(&dir.path().join("kb.redb")).unwrap();
        let (outcome, _) = store.upsert_batch(T, vec![object("a", "one"), object("b", "two")]).unwrap();
        assert_eq!(outcome, UpsertOutcome { inserted: 2, updated: 0, unchanged: 0 });
        let (outcome, _) = store.upsert_batch(T, vec![object("a", "one"), object("b", "TWO")]).unwrap();
        assert_eq!(outcome, UpsertOutcome { inserted: 0, updated: 1, unchanged: 1 });
        assert_eq!(store.get(T, "b", 0, false).unwrap().version, 2);
        assert_eq!(store.get(T, "b", 1, false).unwrap().text, "two");
        assert_eq!(store.delete(T, "a").unwrap(), 2);
        assert!(matches!(store.get(T, "a", 0, false), Err(KbError::Deleted { version: 2, .. })));
        assert!(
            matches!(store.get(T, "a", 1, false), Err(KbError::Deleted { version: 2, .. })),
            "a deleted object's old versions are deleted too"
        );
        assert_eq!(store.get(T, "a", 1, true).unwrap().text, "one");
        assert_eq!(store.count_live().unwrap(), 1);
        drop(store);
        let store = KnowledgeStore::open(&dir.path().join("kb.redb")).unwrap();
        assert_eq!(store.get(T, "b", 0, false).unwrap().text, "TWO");
    }

    #[test]
    fn vectors_are_current_only_for_their_model_and_version() {
        let dir = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(&dir.path().join("kb.redb")).unwrap();
        store.upsert_batch(T, vec![object("a", "one"), object("b", "two")]).unwrap();
        store.put_vectors("m@1", T, &[("a".into(), 1, vec![0.5, -0.25]), ("b".into(), 1, vec![1.0, 0.0])]).unwrap();
        store.upsert_batch(T, vec![object("b", "changed")]).unwrap();
        let found = store.objects_with_vectors("m@1").unwrap();
        assert_eq!(found[0].vector.as_deref(), Some(&[0.5, -0.25][..]));
        assert_eq!(found[1].vector, None, "b changed since it was embedded");
        assert!(store.objects_with_vectors("m@2").unwrap().iter().all(|o| o.vector.is_none()));
        store.delete(T, "a").unwrap();
        assert_eq!(store.objects_with_vectors("m@1").unwrap().len(), 1);
    }

    #[test]
    fn tenants_share_ids_and_never_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = KnowledgeStore::open(&dir.path().join("kb.redb")).unwrap();
        store.upsert_batch("acme", vec![object("refund", "acme refunds"), object("z", "last")]).unwrap();
        store.upsert_batch("acme-eu", vec![object("refund", "eu refunds")]).unwrap();
        store.upsert_batch("globex", vec![object("refund", "globex refunds"), object("a", "first")]).unwrap();
        assert_eq!(store.get("acme", "refund", 0, false).unwrap().text, "acme refunds");
        assert_eq!(store.get("globex", "refund", 0, false).unwrap().text, "globex refunds");
        assert!(matches!(store.get("acme", "a", 0, false), Err(KbError::NotFound(_))));
        assert!(matches!(store.delete("acme", "a"), Err(KbError::NotFound(_))));
        let ids = |tenant: &str, limit| -> Vec<String> {
            let page = store.list(tenant, None, limit, &KnowledgeFilter::default(), true).unwrap();
            page.objects.into_iter().map(|o| o.id).collect()
        };
        assert_eq!(ids("acme", 10), ["refund", "z"], "a prefix tenant's objects stay out");
        assert_eq!(ids("globex", 10), ["a", "refund"]);
        let page = store.list("acme", Some("refund"), 10, &KnowledgeFilter::default(), true).unwrap();
        assert_eq!(page.objects.len(), 1);
        let last = store.list("acme", Some("z"), 10, &KnowledgeFilter::default(), true).unwrap();
        assert!(last.objects.is_empty() && last.next_after.is_none(), "paging stops at the tenant's end");
        assert_eq!(store.delete("globex", "refund").unwrap(), 2);
        assert_eq!(store.get("acme", "refund", 0, false).unwrap().version, 1, "the other tenant's object lives on");
        let tenants: Vec<String> = store.objects_with_vectors("m").unwrap().into_iter().map(|o| o.tenant).collect();
        assert_eq!(tenants, ["acme", "acme", "acme-eu", "globex"]);
    }

    #[test]
    fn a_store_from_before_tenants_moves_to_the_default_tenant() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kb.redb");
        {
            let db = Database::create(&path).unwrap();
            let txn = db.begin_write().unwrap();
            {
                let (one, two) =
                    (object("a", "one").encode_to_vec(), KnowledgeObject { version: 2, ..object("a", "two") });
                let two = two.encode_to_vec();
                txn.open_table(legacy::LATEST).unwrap().insert("a", two.as_slice()).unwrap();
                let mut versions = txn.open_table(legacy::VERSIONS).unwrap();
                versions.insert(("a", 1), one.as_slice()).unwrap();
                versions.insert(("a", 2), two.as_slice()).unwrap();
                let mut bytes = Vec::new();
                encode_vector(&mut bytes, "m@1", 2, &[0.5, 0.25]);
                txn.open_table(legacy::VECTORS).unwrap().insert(("m@1", "a"), bytes.as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        let store = KnowledgeStore::open(&path).unwrap();
        assert_eq!(store.get(DEFAULT_TENANT, "a", 1, false).unwrap().text, "one");
        assert_eq!(store.get(DEFAULT_TENANT, "a", 0, false).unwrap().text, "two");
        let found = store.objects_with_vectors("m@1").unwrap();
        assert_eq!(found[0].vector.as_deref(), Some(&[0.5, 0.25][..]));
        drop(store);
        let store = KnowledgeStore::open(&path).unwrap();
        assert_eq!(store.count_live().unwrap(), 1, "moved once, not again");
        let txn = store.db.begin_read().unwrap();
        let tables: Vec<String> = txn.list_tables().unwrap().map(|t| t.name().to_string()).collect();
        for legacy in [legacy::LATEST.name(), legacy::VERSIONS.name(), legacy::VECTORS.name()] {
            assert!(
                !tables.iter().any(|t| t == legacy),
                "the legacy table {legacy} is gone after the move: {tables:?}"
            );
        }
    }
}
