//! API keys: who may call what. A key is `aitl_{id}_{secret}`; the server
//! keeps only the SHA-256 of the secret, in `{data_dir}/keys.json`, and
//! compares in constant time. Each key is bound to a tenant, a [`Role`] and
//! optionally an agent identity. `aitl keys create|list|revoke` edit the
//! file (atomically: written beside, then renamed); a running server reads
//! it again when it changes, so a revocation takes effect within a second.
//! With no live key in the file, authentication is off (the quick start).

use std::{
    path::{Path, PathBuf},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const KEYS_FILE: &str = "keys.json";

/// What a key may do; the table of methods is in `middleware/auth.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The copilot calls and annotations; reads knowledge.
    Agent,
    /// Writes and reads the knowledge base.
    KnowledgeEditor,
    /// Every call.
    Operator,
    /// Reads knowledge, gaps and serving models.
    Reader,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::KnowledgeEditor => "knowledge-editor",
            Role::Operator => "operator",
            Role::Reader => "reader",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    pub tenant: String,
    pub role: Role,
    /// When set, annotations made with this key must name this agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Unix seconds.
    pub created_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// Who a verified key says the caller is; a request extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub key_id: String,
    pub tenant: String,
    pub role: Role,
    pub agent: Option<String>,
}

/// Why a presented key is not accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    Unknown,
    Revoked { at: u64 },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct KeyStore {
    pub keys: Vec<KeyRecord>,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

/// Equal without an early exit, so the time taken says nothing of where
/// two digests differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

fn random_hex(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .map_err(|e| Error::Internal(format!("/dev/urandom: {e}")))?;
    Ok(hex(&buf))
}

impl KeyStore {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(KEYS_FILE)
    }

    /// The store in `data_dir`; empty when there is no file.
    pub fn load(data_dir: &Path) -> Result<KeyStore> {
        let path = Self::path(data_dir);
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| Error::InvalidArgument(format!("{}: not a key store: {e}", path.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(KeyStore::default()),
            Err(e) => Err(Error::Internal(format!("{}: {e}", path.display()))),
        }
    }

    /// Writes beside and renames, so a server reading it never sees half a file.
    pub fn save(&self, data_dir: &Path) -> Result<()> {
        std::fs::create_dir_all(data_dir).map_err(|e| Error::Internal(format!("{}: {e}", data_dir.display())))?;
        let path = Self::path(data_dir);
        let partial = path.with_extension("json.partial");
        let bytes = serde_json::to_vec_pretty(self).expect("keys serialize");
        std::fs::write(&partial, bytes)
            .and_then(|()| std::fs::File::open(&partial)?.sync_all())
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))
    }

    /// Whether any key can still be used: authentication is on.
    pub fn enforced(&self) -> bool {
        self.keys.iter().any(|k| k.revoked_at.is_none())
    }

    /// A new key; returns the full key, the only time it is shown.
    pub fn create(&mut self, tenant: &str, role: Role, agent: Option<&str>) -> Result<(String, KeyRecord)> {
        let bad =
            |what: &str| Error::InvalidArgument(format!("{what}: use 1 to 128 characters, no control characters"));
        crate::tenancy::check_name("--tenant", tenant)?;
        if agent.is_some_and(|a| a.trim().is_empty() || a.len() > 128 || a.chars().any(char::is_control)) {
            return Err(bad("--agent"));
        }
        let id = loop {
            let id = random_hex(4)?;
            if self.keys.iter().all(|k| k.id != id) {
                break id;
            }
        };
        let secret = random_hex(24)?;
        let record = KeyRecord {
            id: id.clone(),
            secret_sha256: digest(&secret),
            tenant: tenant.into(),
            role,
            agent: agent.map(str::to_string),
            created_at: now_s(),
            revoked_at: None,
        };
        self.keys.push(record.clone());
        Ok((format!("aitl_{id}_{secret}"), record))
    }

    pub fn revoke(&mut self, id: &str) -> Result<&KeyRecord> {
        let key = self
            .keys
            .iter_mut()
            .find(|k| k.id == id)
            .ok_or_else(|| Error::NotFound(format!("no key {id:?}; `aitl keys list` shows the ids")))?;
        key.revoked_at.get_or_insert_with(now_s);
        Ok(key)
    }

    /// Who `presented` (a full key) belongs to.
    pub fn verify(&self, presented: &str) -> std::result::Result<Caller, Refusal> {
        let (id, secret) =
            presented.strip_prefix("aitl_").and_then(|rest| rest.split_once('_')).ok_or(Refusal::Malformed)?;
        let key = self.keys.iter().find(|k| k.id == id).ok_or(Refusal::Unknown)?;
        if !constant_time_eq(digest(secret).as_bytes(), key.secret_sha256.as_bytes()) {
            return Err(Refusal::Unknown);
        }
        if let Some(at) = key.revoked_at {
            return Err(Refusal::Revoked { at });
        }
        Ok(Caller { key_id: key.id.clone(), tenant: key.tenant.clone(), role: key.role, agent: key.agent.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_keys_verify_and_revoked_or_wrong_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = KeyStore::load(dir.path()).unwrap();
        assert!(!store.enforced());
        let (key, record) = store.create("acme", Role::Agent, Some("agent-7")).unwrap();
        let (other, _) = store.create("acme", Role::Reader, None).unwrap();
        store.save(dir.path()).unwrap();
        let on_disk = std::fs::read_to_string(KeyStore::path(dir.path())).unwrap();
        assert!(!on_disk.contains(key.rsplit('_').next().unwrap()), "only the secret's digest is stored");

        let store = KeyStore::load(dir.path()).unwrap();
        assert!(store.enforced());
        let caller = store.verify(&key).unwrap();
        assert_eq!(
            (caller.tenant.as_str(), caller.role, caller.agent.as_deref()),
            ("acme", Role::Agent, Some("agent-7"))
        );
        assert_eq!(store.verify(&other).unwrap().role, Role::Reader);
        let mut flipped = key.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(store.verify(std::str::from_utf8(&flipped).unwrap()), Err(Refusal::Unknown));
        assert_eq!(store.verify("Bearer nonsense"), Err(Refusal::Malformed));

        let mut store = store;
        store.revoke(&record.id).unwrap();
        assert!(matches!(store.verify(&key), Err(Refusal::Revoked { .. })));
        assert!(store.revoke("nope").is_err());
        assert!(
            constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"ab", b"abc")
        );
    }
}
