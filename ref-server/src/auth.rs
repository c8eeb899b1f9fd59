//! Optional bearer-token authentication for the `Reference` service (health and reflection
//! stay open so probes and `grpcurl list` work without a token). The token is loaded by
//! `dpo_proto::token::load_token` (shared with the clients); it is compared in constant time.

use std::sync::Arc;

use tonic::{Request, Status};

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
