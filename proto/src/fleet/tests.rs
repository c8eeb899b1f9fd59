//! The fleet against stand-in replicas on loopback: each serves the health check and a
//! `Reference` service that reports a given fingerprint and scores a pair as minus the
//! sums of its ids, counting the calls it answers.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicUsize;

use tokio::net::TcpListener;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

use super::*;
use crate::client::TokenPair;
use crate::v1;
use crate::v1::reference_server::{Reference, ReferenceServer};

struct StandIn {
    fingerprint: String,
    calls: Arc<AtomicUsize>,
    /// Each Score call takes this long (so that calls overlap).
    delay: Duration,
}

impl StandIn {
    fn answer<T>(&self, body: T) -> Response<T> {
        let mut response = Response::new(body);
        let value = self.fingerprint.parse().unwrap();
        response.metadata_mut().insert(crate::client::MODEL_FINGERPRINT_HEADER, value);
        response
    }
}

type Never<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl Reference for StandIn {
    async fn score(
        &self,
        request: Request<v1::ScoreRequest>,
    ) -> Result<Response<v1::ScoreResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(self.delay).await;
        let items = request
            .into_inner()
            .items
            .into_iter()
            .map(|item| match item.input {
                Some(v1::score_item::Input::Tokens(t)) => v1::ItemScore {
                    responses: t
                        .responses
                        .iter()
                        .map(|r| v1::ResponseScore {
                            logprob: -(r.ids.iter().map(|&i| i as f64).sum::<f64>()),
                            tokens: r.ids.len() as u32,
                            token_logprobs: vec![],
                        })
                        .collect(),
                },
                _ => v1::ItemScore::default(),
            })
            .collect();
        Ok(self.answer(v1::ScoreResponse { request_id: 0, items, error: None }))
    }

    type ScoreStreamStream = Never<v1::ScoreResponse>;

    async fn score_stream(
        &self,
        _: Request<Streaming<v1::ScoreRequest>>,
    ) -> Result<Response<Self::ScoreStreamStream>, Status> {
        Err(Status::unimplemented("not in the stand-in"))
    }

    async fn model_info(
        &self,
        _: Request<v1::ModelInfoRequest>,
    ) -> Result<Response<v1::ModelInfoResponse>, Status> {
        Ok(self.answer(v1::ModelInfoResponse {
            fingerprint: self.fingerprint.clone(),
            ..Default::default()
        }))
    }

    type GenerateStream = Never<v1::GenerateResponse>;

    async fn generate(
        &self,
        _: Request<v1::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        Err(Status::unimplemented("not in the stand-in"))
    }
}

/// A running stand-in replica; dropping it stops the server (its connections close).
struct Running {
    addr: SocketAddr,
    calls: Arc<AtomicUsize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Running {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

async fn replica_on(listener: TcpListener, fingerprint: &str, delay: Duration) -> Running {
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let service = StandIn { fingerprint: fingerprint.into(), calls: Arc::clone(&calls), delay };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(ReferenceServer::new(service))
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
            .expect("stand-in replica");
    });
    Running { addr, calls, _stop: stop }
}

/// Stops a stand-in: it closes its port and its connections once their calls are done.
async fn stop(replica: Running) {
    drop(replica);
    tokio::time::sleep(Duration::from_millis(200)).await;
}

async fn replica(fingerprint: &str, delay: Duration) -> Running {
    replica_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), fingerprint, delay).await
}

fn options(url: String, timeout: Duration) -> ClientOptions {
    ClientOptions { url, connect_timeout: timeout, ..ClientOptions::default() }
}

fn pair(n: u32) -> TokenPair {
    TokenPair { prompt_ids: vec![1], chosen_ids: vec![n, 1], rejected_ids: vec![n] }
}

async fn score(client: &RefClient, n: u32) -> Result<f64, ClientError> {
    let p = vec![pair(n)];
    let got = client
        .retrying("scoring", |c| {
            let p = p.clone();
            async move { c.score_pairs(&p).await }
        })
        .await?;
    Ok(got[0].chosen)
}

fn list(replicas: &[&Running]) -> String {
    replicas.iter().map(|r| r.url()).collect::<Vec<_>>().join(",")
}

#[tokio::test]
async fn calls_spread_over_three_replicas() {
    let delay = Duration::from_millis(20);
    let (a, b, c) =
        (replica("fp", delay).await, replica("fp", delay).await, replica("fp", delay).await);
    let client = RefClient::connect_waiting(&options(list(&[&a, &b, &c]), Duration::from_secs(10)))
        .await
        .unwrap();
    let calls: Vec<_> = (0..90)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { score(&client, n).await })
        })
        .collect();
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), -(n as f64 + 1.0));
    }
    let counts = [a.calls(), b.calls(), c.calls()];
    assert_eq!(counts.iter().sum::<usize>(), 90, "{counts:?}");
    // Power of two choices on calls in flight: every replica takes a real share.
    assert!(counts.iter().all(|&n| n >= 15), "{counts:?}");
    let stats = client.replicas();
    assert_eq!(stats.iter().map(|s| s.calls).sum::<u64>(), 90);
    assert_eq!(client.retries(), 0);
}

#[tokio::test]
async fn a_replica_killed_mid_run_loses_no_call() {
    let delay = Duration::from_millis(30);
    let (a, b) = (replica("fp", delay).await, replica("fp", delay).await);
    let b_url = b.url();
    let client = RefClient::connect_waiting(&options(list(&[&a, &b]), Duration::from_secs(10)))
        .await
        .unwrap()
        .with_patience(Duration::from_secs(20));
    let mut b = Some(b);
    let mut calls = Vec::new();
    for n in 0..40 {
        let client = client.clone();
        calls.push(tokio::spawn(async move { score(&client, n).await }));
        if n == 10 {
            // Some of b's calls are in flight now: they fail on the way and go to a.
            tokio::time::sleep(Duration::from_millis(10)).await;
            drop(b.take());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for (n, call) in calls.into_iter().enumerate() {
        assert_eq!(call.await.unwrap().unwrap(), -(n as f64 + 1.0), "call {n}");
    }
    let stats = client.replicas();
    let b_stats = stats.iter().find(|s| s.url == b_url).unwrap();
    assert!(b_stats.failures >= 1, "{stats:?}");
    assert!(!matches!(b_stats.phase, Phase::Serving), "{stats:?}");
    assert!(a.calls() > 20, "a took over: {}", a.calls());
}

#[tokio::test]
async fn replicas_serving_different_models_are_refused_at_connect() {
    let (a, b) =
        (replica("sha256:aaa", Duration::ZERO).await, replica("sha256:bbb", Duration::ZERO).await);
    let err = RefClient::connect_waiting(&options(list(&[&a, &b]), Duration::from_secs(10)))
        .await
        .err()
        .expect("two models in one fleet");
    assert!(matches!(err, ClientError::ReplicaMismatch { .. }), "{err}");
    let msg = err.to_string();
    for needle in ["sha256:aaa", "sha256:bbb", &a.url(), &b.url(), "same model"] {
        assert!(msg.contains(needle), "{needle}: {msg}");
    }
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn a_server_back_with_another_model_ends_the_call() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = replica_on(listener, "sha256:old", Duration::ZERO).await;
    let client = RefClient::connect_waiting(&options(first.url(), Duration::from_secs(10)))
        .await
        .unwrap()
        .with_patience(Duration::from_secs(30));
    score(&client, 1).await.unwrap();
    stop(first).await;
    let _second =
        replica_on(TcpListener::bind(addr).await.unwrap(), "sha256:new", Duration::ZERO).await;
    let t = Instant::now();
    let err = score(&client, 2).await.unwrap_err();
    assert!(matches!(err, ClientError::ModelChanged { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains("sha256:old") && msg.contains("sha256:new"), "{msg}");
    assert!(t.elapsed() < Duration::from_secs(10), "not at once: {:?}", t.elapsed());
}

#[tokio::test]
async fn a_call_survives_the_only_server_restarting() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let first = replica_on(listener, "fp", Duration::ZERO).await;
    let client = RefClient::connect_waiting(&options(first.url(), Duration::from_secs(10)))
        .await
        .unwrap()
        .with_patience(Duration::from_secs(20));
    score(&client, 1).await.unwrap();
    stop(first).await;
    let restarted = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(700)).await;
        replica_on(TcpListener::bind(addr).await.unwrap(), "fp", Duration::ZERO).await
    });
    assert_eq!(score(&client, 2).await.unwrap(), -3.0);
    assert!(client.retries() > 0);
    drop(restarted.await.unwrap());
}

#[tokio::test]
async fn gives_up_after_its_patience_naming_the_fleet() {
    let a = replica("fp", Duration::ZERO).await;
    let (b_listener, c_listener) = (
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    );
    // Two addresses nothing listens on any more.
    let spec = format!(
        "{},http://{},http://{}",
        a.url(),
        b_listener.local_addr().unwrap(),
        c_listener.local_addr().unwrap()
    );
    drop((b_listener, c_listener));
    let client = RefClient::connect_waiting(&options(spec.clone(), Duration::from_secs(5)))
        .await
        .unwrap()
        .with_patience(Duration::from_millis(600));
    score(&client, 1).await.unwrap();
    stop(a).await;
    let t = Instant::now();
    let err = score(&client, 2).await.unwrap_err();
    assert!(t.elapsed() >= Duration::from_millis(600), "{:?}", t.elapsed());
    assert!(matches!(err, ClientError::NotServing { answered: false, .. }), "{err}");
    assert!(err.to_string().contains(&spec), "{err}");
}

#[tokio::test]
async fn a_verdict_is_not_retried() {
    let a = replica("fp", Duration::ZERO).await;
    let client =
        RefClient::connect_waiting(&options(a.url(), Duration::from_secs(5))).await.unwrap();
    let attempts = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&attempts);
    let err = client
        .retrying("test call", move |c| {
            seen.fetch_add(1, Ordering::SeqCst);
            async move {
                // The stand-in does not stream: UNIMPLEMENTED is its verdict.
                c.generate(v1::GenerateRequest::default()).await.map(|_| ())
            }
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_dns_name_finds_its_replicas() {
    let a = replica("fp", Duration::ZERO).await;
    // `localhost` may also resolve to ::1, where nothing listens: that replica never joins.
    let spec = format!("dns:///localhost:{}", a.addr.port());
    let client =
        RefClient::connect_waiting(&options(spec.clone(), Duration::from_secs(10))).await.unwrap();
    assert_eq!(score(&client, 4).await.unwrap(), -5.0);
    assert_eq!(client.url(), spec);
    let urls: Vec<String> = client.replicas().into_iter().map(|r| r.url).collect();
    assert!(urls.contains(&a.url()), "{urls:?}");
}

#[tokio::test]
async fn an_unreachable_fleet_is_named_with_the_last_reason() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    let err = RefClient::connect_waiting(&options(url.clone(), Duration::from_millis(300)))
        .await
        .err()
        .expect("nothing listens");
    let msg = err.to_string();
    assert!(matches!(err, ClientError::NotServing { answered: false, .. }), "{msg}");
    assert!(msg.contains(&url) && msg.contains("unreachable"), "{msg}");
}

/// A replica that appears later (as through `dns:///`) with another model is refused and
/// never called; the fleet goes on with the others.
#[tokio::test]
async fn a_replica_appearing_with_another_model_is_never_used() {
    let a = replica("sha256:aaa", Duration::ZERO).await;
    let b = replica("sha256:bbb", Duration::ZERO).await;
    let client =
        RefClient::connect_waiting(&options(a.url(), Duration::from_secs(10))).await.unwrap();
    client.shared.add(&Target::Url(b.url()), b.url());
    let refused = Instant::now() + Duration::from_secs(10);
    while !client
        .replicas()
        .iter()
        .any(|r| r.url == b.url() && matches!(r.phase, Phase::Refused(_)))
    {
        assert!(Instant::now() < refused, "{:?}", client.replicas());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in 0..20 {
        score(&client, n).await.unwrap();
    }
    assert_eq!(b.calls(), 0, "a replica of another model was called");
    let stats = client.replicas();
    let Phase::Refused(why) = &stats.iter().find(|r| r.url == b.url()).unwrap().phase else {
        unreachable!()
    };
    let why = why.to_string();
    assert!(why.contains("sha256:aaa") && why.contains("sha256:bbb"), "{why}");
}
