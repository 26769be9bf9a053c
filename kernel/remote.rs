//! aitl's own clients of a running server (`aitl load`, `aitl simulate`,
//! `aitl eval retrieval --server`, the worker's knowledge from `--server`):
//! one way to connect, presenting the API key a server with keys requires.
//! The key comes from `AITL_API_KEY` (an environment variable rather than a
//! flag, so it stays out of shell history and process lists) and goes on
//! every call as `authorization: Bearer …`; without it calls carry none.

use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::Channel,
};

use crate::error::{Error, Result};

/// Where aitl's clients read the key they present.
pub const API_KEY_ENV: &str = "AITL_API_KEY";

/// The `authorization` value every call carries, if any.
#[derive(Clone, Default)]
pub struct ApiKey(Option<MetadataValue<Ascii>>);

impl std::fmt::Debug for ApiKey {
    // Never the secret itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "ApiKey(set)" } else { "ApiKey(none)" })
    }
}

impl ApiKey {
    /// `key` as sent (blank means none).
    pub fn new(key: Option<&str>) -> Result<ApiKey> {
        let Some(key) = key.map(str::trim).filter(|k| !k.is_empty()) else { return Ok(ApiKey(None)) };
        let value = format!("Bearer {key}").parse().map_err(|_| {
            Error::invalid(API_KEY_ENV, "an API key is printable ASCII (as `aitl keys create` prints it)".to_string())
        })?;
        Ok(ApiKey(Some(value)))
    }

    /// The key in `AITL_API_KEY`, or none.
    pub fn from_env() -> Result<ApiKey> {
        ApiKey::new(std::env::var(API_KEY_ENV).ok().as_deref())
    }
}

impl Interceptor for ApiKey {
    fn call(&mut self, mut request: Request<()>) -> std::result::Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A connection to a server that presents the key on every call; generated
/// clients take it as they take a `Channel`.
pub type Remote = InterceptedService<Channel, ApiKey>;

/// Connects to the server at `url` with the key from `AITL_API_KEY`; `what`
/// names the setting the URL came from in errors (`--server`, `load --server`).
pub async fn connect(url: &str, what: &str) -> Result<Remote> {
    let key = ApiKey::from_env()?;
    let channel = Channel::from_shared(url.to_string())
        .map_err(|e| Error::InvalidArgument(format!("{what} {url:?}: {e}")))?
        .connect()
        .await
        .map_err(|e| Error::Unavailable(format!("cannot reach the server at {url}: {e}")))?;
    Ok(InterceptedService::new(channel, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_goes_on_every_call_and_blank_means_none() {
        let mut key = ApiKey::new(Some(" aitl_abc ")).unwrap();
        let request = key.call(Request::new(())).unwrap();
        assert_eq!(request.metadata().get("authorization").unwrap(), "Bearer aitl_abc");
        let mut none = ApiKey::new(Some("  ")).unwrap();
        assert!(none.call(Request::new(())).unwrap().metadata().get("authorization").is_none());
        assert_eq!(format!("{key:?}"), "ApiKey(set)", "Debug never shows the secret");
        let err = ApiKey::new(Some("aitl_\u{7}")).unwrap_err().to_string();
        assert!(err.contains(API_KEY_ENV), "{err}");
    }
}
