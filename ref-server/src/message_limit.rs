//! The request-size limit (`--max-message-bytes`) reported like every other limit: as
//! `INVALID_ARGUMENT` naming the limit.
//!
//! The limit itself is tonic's decoding limit, which reads a message's 5-byte length
//! prefix and refuses it before allocating anything, so an oversized message is never
//! buffered. Tonic reports that refusal as `OUT_OF_RANGE` ("decoded message length too
//! large"), and before our handler runs for a unary request, so the status is rewritten on
//! its way out: by [`MessageLimit`] around the service for unary requests (where tonic
//! answers with a trailers-only response, the status in the headers), and by the
//! `ScoreStream` handler, which reads its request stream itself, through [`rewrite`].

use tonic::codegen::{http, BoxFuture, Context, Poll, Service};
use tonic::server::NamedService;
use tonic::{Code, Status};

const GRPC_STATUS: &str = "grpc-status";
const GRPC_MESSAGE: &str = "grpc-message";

/// The `INVALID_ARGUMENT` status for tonic's "message too large" refusal under a limit of
/// `limit` bytes; `None` for any other status.
pub fn oversized(status: &Status, limit: usize) -> Option<Status> {
    if status.code() != Code::OutOfRange || !status.message().contains("message length too large") {
        return None;
    }
    // tonic says "... found N bytes, the limit is: L bytes".
    let found = status
        .message()
        .split("found ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    let size = match found {
        Some(n) => format!("is {n} bytes, more than"),
        None => "exceeds".into(),
    };
    Some(Status::invalid_argument(format!(
        "the request message {size} the limit of {limit} bytes (max_message_bytes, set by the \
         server's --max-message-bytes); split the request"
    )))
}

/// [`oversized`]'s status for a message-size refusal, else `status` unchanged.
pub fn rewrite(status: Status, limit: usize) -> Status {
    oversized(&status, limit).unwrap_or(status)
}

/// Wraps a tonic service so that a unary request over the decoding limit is answered
/// `INVALID_ARGUMENT` (see the module doc). Set the same `limit` as the wrapped service's
/// `max_decoding_message_size`.
#[derive(Clone)]
pub struct MessageLimit<S> {
    inner: S,
    limit: usize,
}

impl<S> MessageLimit<S> {
    pub fn new(inner: S, limit: usize) -> Self {
        MessageLimit { inner, limit }
    }
}

impl<S, B, ResBody> Service<http::Request<B>> for MessageLimit<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let response = self.inner.call(req);
        let limit = self.limit;
        Box::pin(async move {
            let mut response = response.await?;
            rewrite_trailers_only(&mut response, limit);
            Ok(response)
        })
    }
}

impl<S: NamedService> NamedService for MessageLimit<S> {
    const NAME: &'static str = S::NAME;
}

/// Rewrites the status of a trailers-only response (status in the headers), the form tonic
/// answers a request it could not decode with. A normal response carries its status in
/// trailers, after the messages, and is left alone.
fn rewrite_trailers_only<B>(response: &mut http::Response<B>, limit: usize) {
    let out_of_range = (Code::OutOfRange as i32).to_string();
    let is_out_of_range = response
        .headers()
        .get(GRPC_STATUS)
        .is_some_and(|v| v.as_bytes() == out_of_range.as_bytes());
    if !is_out_of_range {
        return;
    }
    let Some(new) = Status::from_header_map(response.headers()).and_then(|s| oversized(&s, limit))
    else {
        return;
    };
    let headers = response.headers_mut();
    headers.remove(GRPC_MESSAGE);
    if new.add_header(headers).is_err() {
        // Cannot happen (our message is plain text); the original status then stands.
        tracing::warn!("could not rewrite an oversized-message status");
        return;
    }
    response.extensions_mut().insert(new);
}

#[cfg(test)]
mod tests {
    use super::*;

    const TONIC: &str =
        "Error, decoded message length too large: found 10034 bytes, the limit is: 8192 bytes";

    #[test]
    fn tonic_refusal_becomes_invalid_argument_naming_the_limit() {
        let s = oversized(&Status::out_of_range(TONIC), 8192).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("10034 bytes"), "{}", s.message());
        assert!(s.message().contains("limit of 8192 bytes"), "{}", s.message());
        assert!(s.message().contains("--max-message-bytes"), "{}", s.message());
        // Any other status passes untouched.
        assert!(oversized(&Status::out_of_range("something else"), 8192).is_none());
        assert!(oversized(&Status::invalid_argument(TONIC), 8192).is_none());
        assert_eq!(rewrite(Status::internal("x"), 8192).code(), Code::Internal);
    }

    #[test]
    fn only_trailers_only_out_of_range_responses_are_rewritten() {
        let mut refused: http::Response<()> = Status::out_of_range(TONIC).into_http();
        rewrite_trailers_only(&mut refused, 8192);
        let s = Status::from_header_map(refused.headers()).unwrap();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("--max-message-bytes"));
        assert_eq!(refused.extensions().get::<Status>().unwrap().code(), Code::InvalidArgument);

        let mut ok = http::Response::new(());
        rewrite_trailers_only(&mut ok, 8192);
        assert!(ok.headers().get(GRPC_STATUS).is_none());
        let mut other: http::Response<()> = Status::out_of_range("index 7").into_http();
        rewrite_trailers_only(&mut other, 8192);
        assert_eq!(Status::from_header_map(other.headers()).unwrap().code(), Code::OutOfRange);
    }
}
