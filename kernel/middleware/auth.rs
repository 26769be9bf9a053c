//! Authentication and roles, in one tower layer in front of the others: a
//! call presents `authorization: Bearer aitl_…` (or `x-api-key`); the key's
//! [`Caller`] and its [`crate::tenancy::Tenant`] go into the request's
//! extensions for the services. Health
//! and reflection stay open. With no live key configured the layer lets
//! everything through (the quick start on loopback; the server says so).

use std::{
    path::PathBuf,
    sync::{Arc, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use futures_util::future::BoxFuture;
use tonic::{Status, body::Body};

use crate::keys::{Caller, KeyStore, Refusal, Role};

/// Which role may call which method (`/package.Service/Method`).
pub fn allowed(role: Role, path: &str) -> bool {
    let (service, method) = path.trim_start_matches('/').split_once('/').unwrap_or((path, ""));
    let knowledge_read = service == "aitl.v1.KnowledgeService" && matches!(method, "GetKnowledge" | "ListKnowledge");
    let gaps = service == "aitl.v1.FlywheelService" && method == "ListKnowledgeGaps";
    match role {
        Role::Operator => true,
        Role::Agent => service == "aitl.v1.SupportService" || knowledge_read || gaps,
        Role::KnowledgeEditor => service == "aitl.v1.KnowledgeService" || gaps,
        Role::Reader => knowledge_read || service == "aitl.v1.FlywheelService",
    }
}

fn open(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

/// The key store in force, reloaded when its file changes.
#[derive(Clone)]
pub struct Keys {
    store: Arc<RwLock<Arc<KeyStore>>>,
}

impl Keys {
    pub fn new(store: KeyStore) -> Self {
        Keys { store: Arc::new(RwLock::new(Arc::new(store))) }
    }

    pub fn current(&self) -> Arc<KeyStore> {
        self.store.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Reads `{data_dir}/keys.json` again whenever its modification time
    /// changes; a file that does not parse keeps the previous keys.
    pub fn follow(&self, data_dir: PathBuf, every: Duration) -> tokio::task::JoinHandle<()> {
        let keys = self.clone();
        tokio::spawn(async move {
            let modified = |dir: &PathBuf| std::fs::metadata(KeyStore::path(dir)).and_then(|m| m.modified()).ok();
            let mut seen: Option<SystemTime> = modified(&data_dir);
            loop {
                tokio::time::sleep(every).await;
                let now = modified(&data_dir);
                if now == seen {
                    continue;
                }
                seen = now;
                match KeyStore::load(&data_dir) {
                    Ok(store) => {
                        tracing::info!(keys = store.keys.len(), enforced = store.enforced(), "API keys reloaded");
                        *keys.store.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(store);
                    }
                    Err(e) => tracing::warn!(error = %e, "API keys not reloaded; the previous ones stay in force"),
                }
            }
        })
    }
}

#[derive(Clone)]
pub struct AuthLayer {
    keys: Keys,
}

impl AuthLayer {
    pub fn new(keys: Keys) -> Self {
        AuthLayer { keys }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService { inner, keys: self.keys.clone() }
    }
}

#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    keys: Keys,
}

/// The key a request presents, if any.
fn presented(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(value) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        return Some(value.strip_prefix("Bearer ").unwrap_or(value).trim());
    }
    headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::trim)
}

fn check(store: &KeyStore, path: &str, headers: &http::HeaderMap) -> Result<Option<Caller>, Status> {
    if !store.enforced() || open(path) {
        return Ok(None);
    }
    let key = presented(headers).ok_or_else(|| {
        Status::unauthenticated(
            "this server requires an API key: send the metadata `authorization: Bearer aitl_…` \
             (an operator makes one with `aitl keys create`)",
        )
    })?;
    let caller = store.verify(key).map_err(|refusal| match refusal {
        Refusal::Malformed => Status::unauthenticated("the API key is malformed: keys look like aitl_<id>_<secret>"),
        Refusal::Unknown => Status::unauthenticated("the API key is not known to this server"),
        Refusal::Revoked { at } => Status::unauthenticated(format!(
            "the API key was revoked (at Unix time {at}); ask an operator for a new one"
        )),
    })?;
    if !allowed(caller.role, path) {
        return Err(Status::permission_denied(format!(
            "key {} has the role {}, which may not call {path}; use a key with a role that may \
             (agent: SupportService; knowledge-editor: KnowledgeService; reader: reads; operator: all)",
            caller.key_id,
            caller.role.name()
        )));
    }
    Ok(Some(caller))
}

impl<S> tower::Service<http::Request<Body>> for AuthService<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<Body>) -> Self::Future {
        let store = self.keys.current();
        let path = request.uri().path();
        let checked = check(&store, path, request.headers()).and_then(|caller| {
            // Health and reflection act for no tenant: a bad tenant header cannot fail them.
            let tenant = match open(path) {
                true => crate::tenancy::Tenant(crate::tenancy::DEFAULT_TENANT.to_string()),
                false => crate::tenancy::resolve(caller.as_ref(), request.headers()).map_err(Status::from)?,
            };
            Ok((caller, tenant))
        });
        match checked {
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
            Ok((caller, tenant)) => {
                request.extensions_mut().insert(tenant);
                if let Some(caller) = caller {
                    request.extensions_mut().insert(caller);
                }
                Box::pin(super::take_ready(&mut self.inner).call(request))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_role_table() {
        let support = "/aitl.v1.SupportService/SubmitAnnotation";
        let upsert = "/aitl.v1.KnowledgeService/UpsertKnowledge";
        let list = "/aitl.v1.KnowledgeService/ListKnowledge";
        let models = "/aitl.v1.FlywheelService/GetServingModels";
        let gaps = "/aitl.v1.FlywheelService/ListKnowledgeGaps";
        let table = [
            (Role::Agent, [true, false, true, false, true]),
            (Role::KnowledgeEditor, [false, true, true, false, true]),
            (Role::Reader, [false, false, true, true, true]),
            (Role::Operator, [true, true, true, true, true]),
        ];
        for (role, want) in table {
            let got = [support, upsert, list, models, gaps].map(|p| allowed(role, p));
            assert_eq!(got, want, "{role:?}");
        }
    }
}
