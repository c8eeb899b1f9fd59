//! Counts every gRPC call by service, method and status code, and times it: a tower
//! layer on the tonic server, so that refusals made before our handlers run (the bearer
//! token check's UNAUTHENTICATED, the size limit's INVALID_ARGUMENT) are counted like the
//! handlers' own answers.
//!
//! A gRPC status travels in one of two places: in the response headers of a
//! "trailers-only" response (how tonic answers a call refused before any message), or in
//! the trailers after the messages. The layer reads the headers first, and otherwise
//! wraps the body to read its trailers when they pass. A body dropped before its end (the
//! client went away) counts as CANCELLED.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use http_body::{Body, Frame, SizeHint};
use tonic::codegen::{http, BoxFuture, Service};
use tower_layer::Layer;

use super::metrics;

pub const REFERENCE_SERVICE: &str = dpo_proto::v1::reference_server::SERVICE_NAME;
/// The methods of `dpo.v1.Reference`, counted from start-up (at zero until called).
pub const REFERENCE_METHODS: [&str; 4] = ["Score", "ScoreStream", "Generate", "ModelInfo"];

/// The calls labelled by name: those this server implements. Any other path (a client
/// probing for methods that do not exist, answered UNIMPLEMENTED) is counted as
/// `unknown`, so that no client can create series without bound.
const KNOWN_METHODS: [(&str, &str); 8] = [
    (REFERENCE_SERVICE, REFERENCE_METHODS[0]),
    (REFERENCE_SERVICE, REFERENCE_METHODS[1]),
    (REFERENCE_SERVICE, REFERENCE_METHODS[2]),
    (REFERENCE_SERVICE, REFERENCE_METHODS[3]),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("grpc.reflection.v1.ServerReflection", "ServerReflectionInfo"),
    ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo"),
];

const GRPC_STATUS: &str = "grpc-status";

/// The `service` and `method` labels of a request path `/package.Service/Method`.
fn labels(path: &str) -> (&'static str, &'static str) {
    let called = path.strip_prefix('/').and_then(|p| p.split_once('/'));
    KNOWN_METHODS
        .iter()
        .find(|&&known| Some(known) == called)
        .copied()
        .unwrap_or(("unknown", "unknown"))
}

/// The canonical name of a gRPC status code (as the gRPC specification spells it).
pub fn code_name(code: i32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code).ok().and_then(|c| NAMES.get(c)).copied().unwrap_or("UNKNOWN")
}

/// The status code in `headers` (response headers or trailers), if they carry one.
fn status_in(headers: &http::HeaderMap) -> Option<i32> {
    let value = headers.get(GRPC_STATUS)?;
    // A malformed status is the peer's UNKNOWN, as gRPC clients read it.
    Some(value.to_str().ok().and_then(|s| s.trim().parse().ok()).unwrap_or(2))
}

/// One call being served: recorded once, when its status is known or when it is dropped
/// unfinished.
struct Call {
    service: &'static str,
    method: &'static str,
    started: Instant,
    recorded: bool,
}

impl Call {
    fn start(path: &str) -> Call {
        let (service, method) = labels(path);
        Call { service, method, started: Instant::now(), recorded: false }
    }

    fn finish(mut self, code: i32) {
        self.record(code);
    }

    fn record(&mut self, code: i32) {
        if !std::mem::replace(&mut self.recorded, true) {
            let elapsed = self.started.elapsed();
            metrics().grpc_call(self.service, self.method, code_name(code), elapsed);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        // Unfinished: the client cancelled, or the connection went away.
        self.record(tonic::Code::Cancelled as i32);
    }
}

/// The layer to give `tonic::transport::Server::layer`.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = http::Response<CountedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = Call::start(req.uri().path());
        let response = self.inner.call(req);
        Box::pin(async move {
            let response = match response.await {
                Ok(r) => r,
                Err(e) => {
                    call.finish(tonic::Code::Unknown as i32);
                    return Err(e);
                }
            };
            let call = match status_in(response.headers()) {
                // Trailers-only: the status is already known and the body is empty.
                Some(code) => {
                    call.finish(code);
                    None
                }
                // Nothing will follow, so no status either: a gRPC client reads that as
                // UNKNOWN. (The body would not be polled again to tell us.)
                None if response.body().is_end_stream() => {
                    call.finish(tonic::Code::Unknown as i32);
                    None
                }
                None => Some(call),
            };
            Ok(response.map(|inner| CountedBody { inner, call }))
        })
    }
}

/// A response body that records its call when its trailers (or its end) pass.
pub struct CountedBody<B> {
    inner: B,
    call: Option<Call>,
}

impl<B: Body + Unpin> Body for CountedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        let code = match &polled {
            Poll::Ready(Some(Ok(frame))) => frame.trailers_ref().and_then(status_in),
            // The body failed mid-stream: the client sees a reset stream.
            Poll::Ready(Some(Err(_))) => Some(tonic::Code::Unknown as i32),
            // Ended without a status in trailers: nothing said otherwise, so OK.
            Poll::Ready(None) => Some(tonic::Code::Ok as i32),
            Poll::Pending => None,
        };
        if let Some(code) = code {
            if let Some(call) = this.call.take() {
                call.finish(code);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_labelled_by_known_service_and_method() {
        assert_eq!(labels("/dpo.v1.Reference/Score"), ("dpo.v1.Reference", "Score"));
        assert_eq!(labels("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health", "Check"));
        let unknown = ("unknown", "unknown");
        assert_eq!(labels("/evil.Service/Score"), unknown);
        assert_eq!(labels("/dpo.v1.Reference/"), unknown);
        assert_eq!(labels("/dpo.v1.Reference/Scores"), unknown);
        assert_eq!(labels("/dpo.v1.Reference/Score/x"), unknown);
        assert_eq!(labels("/"), unknown);
        assert_eq!(labels(""), unknown);
    }

    #[test]
    fn codes_have_their_canonical_names() {
        assert_eq!(code_name(0), "OK");
        assert_eq!(code_name(tonic::Code::InvalidArgument as i32), "INVALID_ARGUMENT");
        assert_eq!(code_name(tonic::Code::Unauthenticated as i32), "UNAUTHENTICATED");
        assert_eq!(code_name(tonic::Code::Unavailable as i32), "UNAVAILABLE");
        assert_eq!(code_name(99), "UNKNOWN");
        assert_eq!(code_name(-1), "UNKNOWN");
    }

    #[test]
    fn status_is_read_from_headers() {
        let mut h = http::HeaderMap::new();
        assert_eq!(status_in(&h), None);
        h.insert(GRPC_STATUS, "3".parse().unwrap());
        assert_eq!(status_in(&h), Some(3));
        h.insert(GRPC_STATUS, "x".parse().unwrap());
        assert_eq!(status_in(&h), Some(2));
    }
}
