//! Tenants: one deployment serves several brands or clients, and each sees
//! only its own knowledge, interactions, annotations and knowledge gaps.
//! The tenant of a call is its API key's. A server without keys trusts
//! the `x-aitl-tenant` metadata (loopback, the quick start) and otherwise
//! serves the default tenant. Another tenant's ids are NOT_FOUND, exactly
//! like ids that do not exist: a caller cannot learn what others hold.

use crate::{
    error::{Error, Result},
    keys::Caller,
};

/// As the API's other short ids (`api::convert::MAX_SHORT_ID_BYTES`).
const MAX_NAME_BYTES: usize = 128;

/// The tenant of calls that name none, and of data from before tenants.
pub const DEFAULT_TENANT: &str = "default";

/// [`DEFAULT_TENANT`], owned: what rows written before tenants read as.
pub fn default_tenant() -> String {
    DEFAULT_TENANT.to_string()
}

/// Metadata that names the tenant on a server without API keys.
pub const TENANT_HEADER: &str = "x-aitl-tenant";

/// The tenant a call acts for: a request extension set by the auth layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

/// The tenant of a call from its key, or else from its metadata.
pub fn resolve(caller: Option<&Caller>, headers: &http::HeaderMap) -> Result<Tenant> {
    let named = match headers.get(TENANT_HEADER) {
        None => None,
        Some(value) => {
            let value = value.to_str().map_err(|_| Error::invalid(TENANT_HEADER, "must be visible ASCII"))?;
            check_name(TENANT_HEADER, value)?;
            Some(value)
        }
    };
    match (caller, named) {
        (Some(caller), Some(named)) if named != caller.tenant => Err(Error::PermissionDenied(format!(
            "{TENANT_HEADER} names tenant {named:?}, but API key {} belongs to tenant {:?}; \
             use a key of that tenant",
            caller.key_id, caller.tenant
        ))),
        (Some(caller), _) => Ok(Tenant(caller.tenant.clone())),
        (None, named) => Ok(Tenant(named.unwrap_or(DEFAULT_TENANT).to_string())),
    }
}

/// The tenant a handler acts for.
pub fn of<T>(request: &tonic::Request<T>) -> String {
    request.extensions().get::<Tenant>().map_or_else(|| DEFAULT_TENANT.to_string(), |t| t.0.clone())
}

/// A tenant a record names, where records from before tenants name none.
pub fn of_record(tenant: &str) -> &str {
    if tenant.is_empty() { DEFAULT_TENANT } else { tenant }
}

/// An id made unique across tenants, for stores that pool every tenant's
/// rows (the worker's journal): another tenant's id is prefixed with its
/// tenant and `/`; the default tenant's ids stay as they are, unless they
/// hold a `/` themselves ("default/" then comes first); empty stays empty.
/// Tenant names hold
/// no `/`, so two tenants' ids never meet.
pub fn scoped(tenant: &str, id: &str) -> String {
    let tenant = of_record(tenant);
    if id.is_empty() || (tenant == DEFAULT_TENANT && !id.contains('/')) {
        id.to_string()
    } else {
        format!("{tenant}/{id}")
    }
}

/// The id a tenant's client used, from [`scoped`].
pub fn unscoped(id: &str) -> &str {
    id.split_once('/').map_or(id, |(_, id)| id)
}

/// Refuses a tenant name that [`scoped`] could not keep apart.
pub fn check_name(field: &str, tenant: &str) -> Result<()> {
    if tenant.is_empty() || tenant.len() > MAX_NAME_BYTES {
        return Err(Error::invalid(field, format!("names a tenant in 1 to {MAX_NAME_BYTES} bytes")));
    }
    if tenant.contains('/') || tenant.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(Error::invalid(
            field,
            "names a tenant: use letters, digits, '-', '_' or '.', without '/' or spaces",
        ));
    }
    Ok(())
}

/// A tenant field in a request body (`request_context.tenant`,
/// `annotation.tenant`): free attribution on a server without keys; with a
/// key it must be empty or the key's own tenant.
pub fn check_declared<T>(request: &tonic::Request<T>, field: &str, declared: &str) -> Result<()> {
    let Some(caller) = request.extensions().get::<Caller>() else { return Ok(()) };
    if declared.is_empty() || declared == caller.tenant {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "{field} is {declared:?}, but API key {} belongs to tenant {:?}; leave it empty or name that tenant",
        caller.key_id, caller.tenant
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::Role;

    fn headers(tenant: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(tenant) = tenant {
            headers.insert(TENANT_HEADER, tenant.parse().unwrap());
        }
        headers
    }

    #[test]
    fn the_key_decides_and_metadata_serves_only_without_keys() {
        let caller = Caller { key_id: "k1".into(), tenant: "acme".into(), role: Role::Agent, agent: None };
        assert_eq!(resolve(None, &headers(None)).unwrap().0, DEFAULT_TENANT);
        assert_eq!(resolve(None, &headers(Some("globex"))).unwrap().0, "globex");
        assert_eq!(resolve(Some(&caller), &headers(None)).unwrap().0, "acme");
        assert_eq!(resolve(Some(&caller), &headers(Some("acme"))).unwrap().0, "acme");
        let err = resolve(Some(&caller), &headers(Some("globex"))).unwrap_err();
        assert!(matches!(err, Error::PermissionDenied(_)), "{err}");
        for bad in [" ", "acme/eu"] {
            let err = resolve(None, &headers(Some(bad))).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?}: {err}");
        }
    }

    #[test]
    fn scoped_ids_of_two_tenants_never_meet() {
        let cases = [("", "n1"), ("default", "n1"), ("default", "acme/n1"), ("acme", "n1"), ("acme", "acme/n1")];
        let scoped: Vec<String> = cases.iter().map(|(t, id)| scoped(t, id)).collect();
        assert_eq!(scoped, ["n1", "n1", "default/acme/n1", "acme/n1", "acme/acme/n1"]);
        assert_eq!(super::scoped("acme", ""), "");
        for (i, (_, id)) in cases.iter().enumerate() {
            assert_eq!(unscoped(&scoped[i]), *id);
        }
    }
}
