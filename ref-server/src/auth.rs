//! Optional bearer-token authentication for the `Reference` service (health and reflection
//! stay open so probes and `grpcurl list` work without a token). The token comes from a
//! file or `DPO_AUTH_TOKEN`; it is compared in constant time.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use tonic::{Request, Status};

/// Reads the token from `file`, else from `DPO_AUTH_TOKEN`; `None` when neither is set.
/// Surrounding whitespace (a trailing newline) is not part of the token.
pub fn load_token(file: Option<&Path>) -> Result<Option<String>> {
    let (token, from) = match file {
        Some(path) => (
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the auth token file {}", path.display()))?,
            path.display().to_string(),
        ),
        None => match std::env::var("DPO_AUTH_TOKEN") {
            Ok(t) => (t, "DPO_AUTH_TOKEN".to_string()),
            Err(_) => return Ok(None),
        },
    };
    let token = token.trim().to_string();
    if token.is_empty() {
        bail!("the auth token from {from} is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        bail!("the auth token from {from} must be printable ASCII without spaces");
    }
    Ok(Some(token))
}

/// Equality whose running time depends only on `expected`'s length, not on where `given`
/// first differs.
fn constant_time_eq(given: &[u8], expected: &[u8]) -> bool {
    let mut diff = (given.len() != expected.len()) as u8;
    for (i, &e) in expected.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ e;
    }
    diff == 0
}

/// Checks `authorization: Bearer <token>` on every request when a token is configured.
#[derive(Clone)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl BearerAuth {
    pub fn new(token: Option<String>) -> Self {
        BearerAuth { token: token.map(Arc::from) }
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else { return Ok(req) };
        let Some(value) = req.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "this server requires a bearer token: send `authorization: Bearer <token>` \
                 metadata",
            ));
        };
        let given = value.as_bytes().strip_prefix(b"Bearer ").unwrap_or(b"");
        if constant_time_eq(given, expected.as_bytes()) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("invalid bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    #[test]
    fn compares_whole_tokens() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abd", b"abc"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"abcd", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
    }

    #[test]
    fn interceptor_refuses_missing_and_wrong_tokens() {
        let mut auth = BearerAuth::new(Some("s3cret".into()));
        let with = |v: &str| {
            let mut r = Request::new(());
            r.metadata_mut().insert("authorization", v.parse().unwrap());
            r
        };
        let e = auth.call(Request::new(())).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("Bearer"));
        assert!(auth.call(with("Bearer nope")).is_err());
        assert!(auth.call(with("s3cret")).is_err());
        assert!(auth.call(with("Bearer s3cret")).is_ok());
        assert!(BearerAuth::new(None).call(Request::new(())).is_ok());
    }
}
