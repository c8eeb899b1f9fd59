//! One connection to one `dpo.v1.Reference` server: connection set-up (plain or TLS,
//! bearer token), waiting for a server that is still loading its model or not listening yet
//! ([`ReplicaClient::wait_until_serving`]), the calls the trainer and the scoring CLI make,
//! and errors that name the server and say whether retrying can help. Clients reach a
//! fleet of such servers through [`crate::fleet::RefClient`]. The wire types stay in
//! [`crate::v1`]; callers that only score DPO pairs never touch them
//! ([`ReplicaClient::score_pairs`]).

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Code, Request, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::token::TokenError;
use crate::v1;
use crate::v1::reference_client::ReferenceClient;

/// What the server reports about its model and limits.
pub type ModelInfo = v1::ModelInfoResponse;

/// Where the server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `http://host:port` or `https://host:port`.
    pub url: String,
    /// Bearer token, sent as `authorization: Bearer <token>` on every Reference call.
    pub token: Option<String>,
    /// PEM CA certificate to trust for `https://` (default: the system's roots).
    pub ca_cert: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the URL's host).
    pub tls_domain: Option<String>,
    /// How long one connection attempt may take; [`crate::fleet::RefClient::connect_waiting`]
    /// also waits this long, in all, for a replica to report SERVING.
    pub connect_timeout: Duration,
    /// Largest message sent or accepted, in bytes.
    pub max_message_bytes: usize,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            url: "http://127.0.0.1:50051".into(),
            token: None,
            ca_cert: None,
            tls_domain: None,
            connect_timeout: Duration::from_secs(10),
            max_message_bytes: 64 << 20,
        }
    }
}

/// One DPO pair as token ids. The responses include EOS already (it is scored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenPair {
    pub prompt_ids: Vec<u32>,
    pub chosen_ids: Vec<u32>,
    pub rejected_ids: Vec<u32>,
}

/// The reference log-probs (nats, summed over response tokens) of one pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairScore {
    pub chosen: f64,
    pub rejected: f64,
    pub chosen_tokens: u32,
    pub rejected_tokens: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("invalid reference server URL `{url}`: {message}")]
    BadUrl { url: String, message: String },

    #[error("cannot read the CA certificate {}: {source}", path.display())]
    CaCert {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    #[error("invalid bearer token: {0}")]
    BadToken(String),

    #[error(transparent)]
    Token(#[from] TokenError),

    #[error("no reference server URL given (--server)")]
    NoServer,

    #[error("cannot reach reference server at {url}: {message}")]
    Connect { url: String, message: String },

    /// The server's verdict on the request.
    #[error("reference server at {url} refused the request: {}: {message}", code_name(*code))]
    Status { url: String, code: Code, message: String },

    /// The call failed on the way (connection refused or reset, h2 GOAWAY, ...): a status
    /// the client made itself from a transport error, not one the server sent.
    #[error("lost the connection to reference server at {url}: {}: {message}", code_name(*code))]
    Transport { url: String, code: Code, message: String },

    /// The server came back after a failure with another model than it had at connect.
    #[error(
        "reference server at {url} now serves another model: fingerprint {found}, but it \
         served {expected} when the client connected; refusing to mix the two models' scores"
    )]
    ModelChanged { url: String, expected: String, found: String },

    /// Two replicas of one fleet serve different models.
    #[error(
        "reference replicas serve different models: {url} has fingerprint {found}, but \
         {other_url} has {expected}; every replica must load the same model"
    )]
    ReplicaMismatch { url: String, found: String, other_url: String, expected: String },

    #[error("reference server at {url} sent an unexpected reply: {message}")]
    Protocol { url: String, message: String },

    /// [`ReplicaClient::wait_until_serving`] or a retried call
    /// ([`crate::fleet::RefClient::retrying`]) ran
    /// out of time; `last` is why the last attempt failed (connection refused, still
    /// loading, ...).
    /// `answered`: whether the server answered at all on the last attempt (it was up but
    /// not SERVING) or stayed unreachable.
    #[error(
        "reference server at {url} {} for {}s; last: {last}",
        if *answered { "was up but not SERVING" } else { "was unreachable" },
        waited.as_secs_f64().round()
    )]
    NotServing { url: String, waited: Duration, answered: bool, last: String },
}

impl ClientError {
    /// Whether the same call may succeed later: every failure that is not the server's
    /// verdict on the request (the server down, restarting, still loading, overloaded or
    /// slow; the connection lost on the way). A request or configuration the server
    /// refuses (INVALID_ARGUMENT, UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION,
    /// ...), a bad URL or token, or a changed model will fail again and is not retried.
    /// The one classification every client's retries use.
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::NotServing { .. }
            | ClientError::Transport { .. } => true,
            ClientError::Status { code, .. } => retryable_code(*code),
            ClientError::BadUrl { .. }
            | ClientError::CaCert { .. }
            | ClientError::BadToken(_)
            | ClientError::Token(_)
            | ClientError::NoServer
            | ClientError::Protocol { .. }
            | ClientError::ModelChanged { .. }
            | ClientError::ReplicaMismatch { .. } => false,
        }
    }

    /// A copy, for an error that more than one call must report (a replica refused for
    /// good). Errors that own an I/O source (never a replica's refusal) keep their message.
    pub(crate) fn copy(&self) -> ClientError {
        match self {
            ClientError::Status { url, code, message } => {
                ClientError::Status { url: url.clone(), code: *code, message: message.clone() }
            }
            ClientError::ModelChanged { url, expected, found } => ClientError::ModelChanged {
                url: url.clone(),
                expected: expected.clone(),
                found: found.clone(),
            },
            ClientError::ReplicaMismatch { url, found, other_url, expected } => {
                ClientError::ReplicaMismatch {
                    url: url.clone(),
                    found: found.clone(),
                    other_url: other_url.clone(),
                    expected: expected.clone(),
                }
            }
            ClientError::BadUrl { url, message } => {
                ClientError::BadUrl { url: url.clone(), message: message.clone() }
            }
            other => ClientError::Protocol { url: String::new(), message: other.to_string() },
        }
    }

    /// The gRPC status code, when the server answered with one.
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The message without the server's URL, for an error that names the server itself.
    pub(crate) fn reason(&self) -> String {
        match self {
            ClientError::Connect { message, .. } | ClientError::Protocol { message, .. } => {
                message.clone()
            }
            ClientError::Status { code, message, .. }
            | ClientError::Transport { code, message, .. } => {
                format!("{}: {message}", code_name(*code))
            }
            other => other.to_string(),
        }
    }

    fn from_status(url: &str, s: Status) -> Self {
        let url = url.to_string();
        // tonic attaches the underlying error (hyper, h2, io) as the source of a status it
        // makes on the client when the call fails on the way, with whatever code it could
        // infer (often UNKNOWN); a status the server sent has no source.
        match std::error::Error::source(&s) {
            Some(cause) => {
                let message = with_causes(s.message().to_string(), Some(cause));
                ClientError::Transport { url, code: s.code(), message }
            }
            None => ClientError::Status { url, code: s.code(), message: s.message().into() },
        }
    }
}

/// Codes a server sends when the same request may succeed later: it is unavailable
/// (stopping, still loading, behind a proxy whose upstream is down), overloaded, too slow
/// for the deadline, or aborted the call. Everything else is its verdict on the request.
fn retryable_code(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::DeadlineExceeded | Code::ResourceExhausted | Code::Aborted
    )
}

/// Adds the bearer token to every request.
#[derive(Clone)]
struct BearerAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        Ok(req)
    }
}

type Inner = ReferenceClient<InterceptedService<Channel, BearerAuth>>;

/// A client's options, checked and ready to connect ([`ReplicaClient::prepare`]).
pub(crate) struct Prepared {
    url: String,
    endpoint: Endpoint,
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

/// Pauses between attempts while waiting for a server: short at first, since a small model
/// loads in about a second, doubling up to [`MAX_PAUSE`] so a long load is not polled hard.
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);
/// The least time one attempt gets, however close the deadline.
const MIN_ATTEMPT: Duration = Duration::from_secs(1);

/// A connection to one reference server (one replica of a fleet). Cheap to clone; clones
/// share the connection. Clients use [`crate::fleet::RefClient`], which balances over
/// replicas and retries; each attempt gets one of these.
#[derive(Clone)]
pub struct ReplicaClient {
    pub(crate) url: String,
    inner: Inner,
    health: HealthClient<Channel>,
    /// The fingerprint of this connection's first `ModelInfo` answer. The channel
    /// reconnects by itself, so a server restarted behind the same address with another
    /// model would go unnoticed; every answer names its model
    /// ([`MODEL_FINGERPRINT_HEADER`]) and one naming another is [`ClientError::ModelChanged`].
    model: Arc<OnceLock<String>>,
}

/// Response metadata in which the server names the model that answered (its fingerprint).
pub const MODEL_FINGERPRINT_HEADER: &str = "dpo-model-fingerprint";

impl ReplicaClient {
    /// Connects (TLS for `https://`), failing with [`ClientError::Connect`] when the server
    /// cannot be reached within `connect_timeout`.
    pub async fn connect(opts: &ClientOptions) -> Result<ReplicaClient, ClientError> {
        let Prepared { url, endpoint, header } = Self::prepare(opts)?;
        let channel = endpoint
            .connect()
            .await
            .map_err(|e| ClientError::Connect { url: url.clone(), message: error_chain(&e) })?;
        let inner = ReferenceClient::with_interceptor(channel.clone(), BearerAuth { header })
            .max_decoding_message_size(opts.max_message_bytes)
            .max_encoding_message_size(opts.max_message_bytes);
        let health = HealthClient::new(channel);
        Ok(ReplicaClient { url, inner, health, model: Arc::default() })
    }

    /// Everything about `opts` that can be wrong without asking the network: the URL, the
    /// TLS set-up (the CA file is read here) and the bearer token. Waiting for a server
    /// cannot fix these, so every client checks them before it waits.
    pub(crate) fn prepare(opts: &ClientOptions) -> Result<Prepared, ClientError> {
        let url = opts.url.trim().to_string();
        let bad_url = |message: String| ClientError::BadUrl { url: url.clone(), message };
        let endpoint = Endpoint::from_shared(url.clone())
            .map_err(|e| bad_url(e.to_string()))?
            .connect_timeout(opts.connect_timeout)
            .tcp_nodelay(true);
        let endpoint = if url.starts_with("https://") {
            let mut tls = ClientTlsConfig::new();
            tls = match &opts.ca_cert {
                Some(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|source| ClientError::CaCert { path: path.clone(), source })?;
                    tls.ca_certificate(Certificate::from_pem(pem))
                }
                None => tls.with_native_roots(),
            };
            if let Some(d) = &opts.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            endpoint.tls_config(tls).map_err(|e| bad_url(format!("TLS set-up: {e}")))?
        } else if url.starts_with("http://") {
            if opts.ca_cert.is_some() {
                return Err(bad_url(
                    "a CA certificate was given but the URL is http://; use https:// for TLS"
                        .into(),
                ));
            }
            endpoint
        } else {
            return Err(bad_url("expected http://host:port or https://host:port".into()));
        };
        let header = match &opts.token {
            None => None,
            Some(t) => Some(
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| ClientError::BadToken("not printable ASCII".into()))?,
            ),
        };
        Ok(Prepared { url, endpoint, header })
    }

    /// Connects and waits until the server's health check reports SERVING, for at most
    /// `patience` (each attempt limited by `opts.connect_timeout` as well). Errors that
    /// waiting cannot fix (a bad URL, CA file or token) return at once; running out of
    /// time is [`ClientError::NotServing`], naming the URL and the last reason.
    pub async fn wait_until_serving(
        opts: &ClientOptions,
        patience: Duration,
    ) -> Result<ReplicaClient, ClientError> {
        let started = Instant::now();
        let deadline = started + patience;
        let mut pause = FIRST_PAUSE;
        let mut announced = false;
        loop {
            // Each attempt gets at least a moment, so that a zero patience still tries once.
            let limit = deadline.saturating_duration_since(Instant::now()).max(MIN_ATTEMPT);
            let (answered, last) =
                match tokio::time::timeout(limit, Self::connect_if_serving(opts)).await {
                    Ok(Ok(client)) => {
                        if announced {
                            tracing::info!(
                                "reference server at {} is SERVING after {:.1}s",
                                client.url,
                                started.elapsed().as_secs_f64()
                            );
                        }
                        return Ok(client);
                    }
                    Ok(Err(e)) if !e.is_retryable() => return Err(e),
                    Ok(Err(e)) => (matches!(e, ClientError::Status { .. }), e.reason()),
                    Err(_) => (false, format!("no answer within {:.1}s", limit.as_secs_f64())),
                };
            let url = opts.url.trim();
            let now = Instant::now();
            if now >= deadline {
                return Err(ClientError::NotServing {
                    url: url.to_string(),
                    waited: started.elapsed(),
                    answered,
                    last,
                });
            }
            if !announced {
                tracing::info!(
                    "waiting up to {}s for the reference server at {url}: {last}",
                    patience.as_secs()
                );
                announced = true;
            }
            // The last attempt comes at the deadline itself.
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// One attempt of [`wait_until_serving`](Self::wait_until_serving): a server that
    /// answers but is not SERVING yet is a retryable `UNAVAILABLE`.
    async fn connect_if_serving(opts: &ClientOptions) -> Result<ReplicaClient, ClientError> {
        let client = Self::connect(opts).await?;
        if client.health().await? {
            Ok(client)
        } else {
            Err(ClientError::Status {
                url: client.url.clone(),
                code: Code::Unavailable,
                message: "health check reports NOT_SERVING (the model is still loading)".into(),
            })
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The server's model and limits. The first answer pins the model this connection's
    /// later answers must come from.
    pub async fn model_info(&self) -> Result<ModelInfo, ClientError> {
        let mut c = self.inner.clone();
        let info = c
            .model_info(v1::ModelInfoRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| ClientError::from_status(&self.url, s))?;
        self.check_model(&info.fingerprint)?;
        Ok(info)
    }

    /// Whether `found` is the model this connection pinned (the first one it saw).
    fn check_model(&self, found: &str) -> Result<(), ClientError> {
        let expected = self.model.get_or_init(|| found.to_string());
        if expected == found {
            Ok(())
        } else {
            Err(ClientError::ModelChanged {
                url: self.url.clone(),
                expected: expected.clone(),
                found: found.to_string(),
            })
        }
    }

    /// Checks the model an answer names; a server that names none is taken at its word.
    fn check_answer(&self, metadata: &tonic::metadata::MetadataMap) -> Result<(), ClientError> {
        match metadata.get(MODEL_FINGERPRINT_HEADER).and_then(|v| v.to_str().ok()) {
            Some(found) => self.check_model(found),
            None => Ok(()),
        }
    }

    /// Scores any request; the response has one item per request item, checked here.
    pub async fn score(&self, req: v1::ScoreRequest) -> Result<v1::ScoreResponse, ClientError> {
        let shape: Vec<usize> = req.items.iter().map(item_responses).collect();
        let mut c = self.inner.clone();
        let resp = c.score(req).await.map_err(|s| ClientError::from_status(&self.url, s))?;
        self.check_answer(resp.metadata())?;
        let resp = resp.into_inner();
        let got: Vec<usize> = resp.items.iter().map(|i| i.responses.len()).collect();
        if got != shape {
            return Err(ClientError::Protocol {
                url: self.url.clone(),
                message: format!("responses per item {got:?} do not match the request's {shape:?}"),
            });
        }
        Ok(resp)
    }

    /// Starts a generation; the stream yields token deltas, then a last message with the
    /// finish reason and the whole output (see `GenerateResponse`).
    pub async fn generate(
        &self,
        req: v1::GenerateRequest,
    ) -> Result<tonic::Streaming<v1::GenerateResponse>, ClientError> {
        let mut c = self.inner.clone();
        let resp = c.generate(req).await.map_err(|s| ClientError::from_status(&self.url, s))?;
        self.check_answer(resp.metadata())?;
        Ok(resp.into_inner())
    }

    /// [`generate`](Self::generate) to the end: (the streamed text joined, the last message).
    pub async fn generate_text(
        &self,
        req: v1::GenerateRequest,
    ) -> Result<(String, v1::GenerateResponse), ClientError> {
        let mut stream = self.generate(req).await?;
        let mut streamed = String::new();
        loop {
            match stream.message().await {
                Ok(Some(m)) if !m.finish_reason.is_empty() => return Ok((streamed, m)),
                Ok(Some(m)) => streamed.push_str(&m.text),
                Ok(None) => {
                    return Err(ClientError::Protocol {
                        url: self.url.clone(),
                        message: "the generation stream ended without a finish reason".into(),
                    })
                }
                Err(s) => return Err(ClientError::from_status(&self.url, s)),
            }
        }
    }

    /// Scores DPO pairs sent as token ids (the prompt travels once per pair).
    pub async fn score_pairs(&self, pairs: &[TokenPair]) -> Result<Vec<PairScore>, ClientError> {
        let items = pairs
            .iter()
            .map(|p| v1::ScoreItem {
                input: Some(v1::score_item::Input::Tokens(v1::TokenInput {
                    prompt_ids: p.prompt_ids.clone(),
                    responses: vec![
                        v1::TokenIds { ids: p.chosen_ids.clone() },
                        v1::TokenIds { ids: p.rejected_ids.clone() },
                    ],
                })),
            })
            .collect();
        let resp = self.score(v1::ScoreRequest { items, per_token: false, request_id: 0 }).await?;
        Ok(resp
            .items
            .iter()
            .map(|i| PairScore {
                chosen: i.responses[0].logprob,
                rejected: i.responses[1].logprob,
                chosen_tokens: i.responses[0].tokens,
                rejected_tokens: i.responses[1].tokens,
            })
            .collect())
    }

    /// True when the server's standard health check reports SERVING (model loaded).
    pub async fn health(&self) -> Result<bool, ClientError> {
        let mut h = self.health.clone();
        let resp = h
            .check(HealthCheckRequest { service: String::new() })
            .await
            .map_err(|s| ClientError::from_status(&self.url, s))?;
        Ok(resp.into_inner().status == ServingStatus::Serving as i32)
    }
}

/// The canonical upper-case name of a gRPC code, as grpcurl and the gRPC docs write it.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn item_responses(item: &v1::ScoreItem) -> usize {
    match &item.input {
        Some(v1::score_item::Input::Text(t)) => t.responses.len(),
        Some(v1::score_item::Input::Tokens(t)) => t.responses.len(),
        None => 0,
    }
}

/// A transport error's message with its causes ("transport error: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `message`, then each cause from `cause` on that it does not say already.
fn with_causes(mut message: String, mut cause: Option<&dyn std::error::Error>) -> String {
    while let Some(c) = cause {
        let m = c.to_string();
        if !message.contains(&m) {
            message.push_str(": ");
            message.push_str(&m);
        }
        cause = c.source();
    }
    message
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn retryable_codes() {
        let st = |code| ClientError::Status { url: "u".into(), code, message: "m".into() };
        assert!(st(Code::Unavailable).is_retryable());
        assert!(st(Code::DeadlineExceeded).is_retryable());
        assert!(st(Code::ResourceExhausted).is_retryable());
        assert!(!st(Code::InvalidArgument).is_retryable());
        assert!(!st(Code::Unauthenticated).is_retryable());
        assert!(!st(Code::PermissionDenied).is_retryable());
        let c = ClientError::Connect { url: "http://x:1".into(), message: "refused".into() };
        assert!(c.is_retryable());
        assert!(c.to_string().contains("cannot reach reference server at http://x:1"));
        let s = st(Code::InvalidArgument).to_string();
        assert!(s.contains("refused the request: INVALID_ARGUMENT: m"), "{s}");
    }

    /// Which failures every client retries: all that are not the server's verdict.
    #[test]
    fn only_the_servers_verdicts_are_final() {
        let st = |code| ClientError::Status { url: "u".into(), code, message: "m".into() };
        for code in
            [Code::Unavailable, Code::DeadlineExceeded, Code::ResourceExhausted, Code::Aborted]
        {
            assert!(st(code).is_retryable(), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::OutOfRange,
            Code::Unimplemented,
            Code::Internal,
            Code::Unknown,
            Code::DataLoss,
        ] {
            assert!(!st(code).is_retryable(), "{code:?}");
        }
        // A status tonic made on the client from a dead connection, whatever its code.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let dead = ClientError::from_status("http://h:1", Status::from_error(Box::new(reset)));
        assert!(matches!(dead, ClientError::Transport { code: Code::Unknown, .. }), "{dead}");
        assert!(dead.is_retryable() && dead.code().is_none());
        assert!(dead.to_string().contains("connection reset"), "{dead}");
        // The same code sent by the server is its verdict.
        let sent = ClientError::from_status("http://h:1", Status::unknown("transport error"));
        assert!(!sent.is_retryable(), "{sent}");
        assert!(ClientError::NotServing {
            url: "u".into(),
            waited: Duration::ZERO,
            answered: true,
            last: "loading".into()
        }
        .is_retryable());
        let changed = ClientError::ModelChanged {
            url: "http://h:1".into(),
            expected: "aaa".into(),
            found: "bbb".into(),
        };
        assert!(!changed.is_retryable());
        let msg = changed.to_string();
        assert!(msg.contains("aaa") && msg.contains("bbb") && msg.contains("http://h:1"), "{msg}");
        for e in [
            ClientError::BadToken("x".into()),
            ClientError::NoServer,
            ClientError::Protocol { url: "u".into(), message: "m".into() },
        ] {
            assert!(!e.is_retryable(), "{e}");
        }
    }

    #[tokio::test]
    async fn unreachable_server_is_a_retryable_connect_error() {
        // Port 1 on loopback: nothing listens there.
        let opts = ClientOptions {
            url: "http://127.0.0.1:1".into(),
            connect_timeout: Duration::from_secs(2),
            ..ClientOptions::default()
        };
        let err = ReplicaClient::connect(&opts).await.err().expect("connect must fail");
        assert!(err.is_retryable(), "{err}");
        assert!(err.to_string().contains("127.0.0.1:1"), "{err}");
    }

    /// A stand-in server with only the health service, NOT_SERVING (loading) until
    /// `serving_after`, on `listener`; stops when the returned sender is dropped.
    pub(crate) fn health_server(
        listener: tokio::net::TcpListener,
        serving_after: Duration,
    ) -> tokio::sync::oneshot::Sender<()> {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (reporter, health) = tonic_health::server::health_reporter();
            reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            tokio::spawn(async move {
                tokio::time::sleep(serving_after).await;
                reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            });
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(
                    tonic::transport::server::TcpIncoming::from(listener),
                    async {
                        let _ = stopped.await;
                    },
                )
                .await
                .expect("health server");
        });
        stop
    }

    pub(crate) fn options(addr: std::net::SocketAddr, timeout: Duration) -> ClientOptions {
        ClientOptions {
            url: format!("http://{addr}"),
            connect_timeout: timeout,
            ..ClientOptions::default()
        }
    }

    #[tokio::test]
    async fn waits_for_a_loading_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = options(listener.local_addr().unwrap(), Duration::from_secs(20));
        let _stop = health_server(listener, Duration::from_millis(600));
        // Up but loading: a plain connect answers NOT_SERVING, the waiting one waits.
        let early = ReplicaClient::connect(&opts).await.unwrap();
        assert!(!early.health().await.unwrap());
        let t = Instant::now();
        let client = ReplicaClient::wait_until_serving(&opts, opts.connect_timeout).await.unwrap();
        assert!(client.health().await.unwrap());
        assert!(t.elapsed() >= Duration::from_millis(300), "{:?}", t.elapsed());
    }

    #[tokio::test]
    async fn waits_for_a_server_that_is_not_listening_yet() {
        // A free port, closed again; the server binds it only after the client has started.
        let addr = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        let opts = options(addr, Duration::from_secs(20));
        let waiting = tokio::spawn(async move {
            ReplicaClient::wait_until_serving(&opts, opts.connect_timeout).await
        });
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert!(!waiting.is_finished());
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let _stop = health_server(listener, Duration::ZERO);
        let client = waiting.await.unwrap().unwrap();
        assert!(client.health().await.unwrap());
    }

    #[tokio::test]
    async fn gives_up_at_the_deadline_naming_the_server_and_why() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _stop = health_server(listener, Duration::from_secs(3600));
        let t = Instant::now();
        let err = ReplicaClient::wait_until_serving(
            &options(addr, Duration::from_secs(1)),
            Duration::from_secs(1),
        )
        .await
        .err()
        .expect("never SERVING");
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let msg = err.to_string();
        assert!(msg.contains(&format!("http://{addr}")), "{msg}");
        assert!(msg.contains("NOT_SERVING") && msg.contains("up but not SERVING"), "{msg}");
        assert!(matches!(err, ClientError::NotServing { answered: true, .. }));

        // Nothing listening: the last reason is the refused connection.
        let err = ReplicaClient::wait_until_serving(
            &options("127.0.0.1:1".parse().unwrap(), Duration::from_secs(2)),
            Duration::from_millis(500),
        )
        .await
        .err()
        .expect("nothing listens there");
        let msg = err.to_string();
        assert!(msg.contains("127.0.0.1:1") && msg.contains("unreachable"), "{msg}");
    }

    #[tokio::test]
    async fn errors_waiting_cannot_fix_return_at_once() {
        let t = Instant::now();
        let opts = ClientOptions {
            url: "http://127.0.0.1:1".into(),
            token: Some("bad\ntoken".into()),
            connect_timeout: Duration::from_secs(30),
            ..ClientOptions::default()
        };
        let err = ReplicaClient::wait_until_serving(&opts, opts.connect_timeout)
            .await
            .err()
            .expect("bad token");
        assert!(matches!(err, ClientError::BadToken(_)), "{err}");
        let opts = ClientOptions { url: "ftp://x".into(), ..opts };
        let err = ReplicaClient::wait_until_serving(&opts, opts.connect_timeout)
            .await
            .err()
            .expect("bad URL");
        assert!(matches!(err, ClientError::BadUrl { .. }), "{err}");
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn bad_urls_are_not_retryable() {
        let opts = ClientOptions { url: "ftp://x".into(), ..ClientOptions::default() };
        let err = ReplicaClient::connect(&opts).await.err().expect("must fail");
        assert!(!err.is_retryable());
    }
}
