//! Retrying idempotent calls through a server restart. Every call a client makes (scoring,
//! generating, `ModelInfo`) reads only, so a call that failed for any reason other than
//! the server's verdict on it ([`ClientError::is_retryable`]) is simply made again, with
//! backoff, until the client's patience is spent. The channel reconnects by itself; a
//! server that comes back is first asked for its model, so that scores of another model
//! behind the same address are never mixed into a run.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::client::{ClientError, RefClient};

/// Pauses between attempts: short at first (a connection reset is often over at once),
/// doubling up to [`MAX_PAUSE`] so that a server restarting for minutes is not polled hard.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(2);

impl RefClient {
    /// Sets how long [`retrying`](Self::retrying) keeps retrying a failing call (by
    /// default the connect timeout the client was made with).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// How long [`retrying`](Self::retrying) keeps retrying a failing call.
    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// Attempts repeated by [`retrying`](Self::retrying) so far, over all clones.
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Runs the idempotent call `op` (given a clone of this client), retrying every
    /// failure that is not the server's verdict ([`ClientError::is_retryable`]) with
    /// backoff, for at most the client's patience counted from the first failure; then
    /// [`ClientError::NotServing`] names the server and the last reason. Before a retry a
    /// client that has pinned a model ([`RefClient::model_info`], which every client asks
    /// once it is connected) asks the server for its model again: another fingerprint
    /// ends the call with [`ClientError::ModelChanged`]. `what` names the call in the log.
    pub async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(RefClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut first_failure: Option<Instant> = None;
        let mut pause = FIRST_PAUSE;
        loop {
            let attempt = async {
                if first_failure.is_some() && self.pinned_model.get().is_some() {
                    self.check_model().await?;
                }
                op(self.clone()).await
            };
            let err = match attempt.await {
                Ok(v) => {
                    if let Some(t) = first_failure {
                        tracing::info!(
                            "{what}: reference server {} answered again after {:.1}s",
                            self.url,
                            t.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(v);
                }
                Err(e) if e.is_retryable() => e,
                Err(e) => return Err(e),
            };
            let since = *first_failure.get_or_insert_with(Instant::now);
            let left = self.patience.saturating_sub(since.elapsed());
            if left.is_zero() {
                return Err(ClientError::NotServing {
                    url: self.url.clone(),
                    waited: since.elapsed(),
                    answered: matches!(err, ClientError::Status { .. }),
                    last: err.reason(),
                });
            }
            // The last attempt comes at the deadline itself.
            let wait = pause.min(left);
            tracing::warn!("{what}: {err}; retrying in {:.1}s", wait.as_secs_f64());
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(wait).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }

    /// Asks the server for its model and compares the fingerprint with the pinned one.
    async fn check_model(&self) -> Result<(), ClientError> {
        let found = self.model_info().await?.fingerprint;
        let expected = self.pinned_model.get_or_init(|| found.clone());
        if *expected == found {
            Ok(())
        } else {
            Err(ClientError::ModelChanged {
                url: self.url.clone(),
                expected: expected.clone(),
                found,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use tonic::Code;

    use super::*;
    use crate::client::tests::{health_server, options};

    async fn health_client(patience: Duration) -> (RefClient, tokio::sync::oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let opts = options(listener.local_addr().unwrap(), Duration::from_secs(5));
        let stop = health_server(listener, Duration::ZERO);
        let client = RefClient::connect(&opts).await.unwrap().with_patience(patience);
        (client, stop)
    }

    fn transport_error() -> ClientError {
        ClientError::Transport { url: "u".into(), code: Code::Unknown, message: "reset".into() }
    }

    #[tokio::test]
    async fn retries_until_the_call_passes_and_stops_at_a_verdict() {
        let (client, _stop) = health_client(Duration::from_secs(20)).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&calls);
        let got = client
            .retrying("test call", move |_| {
                let n = c.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n < 2 {
                        Err(transport_error())
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!((got, client.retries()), (2, 2));

        calls.store(0, Ordering::SeqCst);
        let c = Arc::clone(&calls);
        let err = client
            .retrying("test call", move |_| {
                c.fetch_add(1, Ordering::SeqCst);
                async {
                    Err::<(), _>(ClientError::Status {
                        url: "u".into(),
                        code: Code::InvalidArgument,
                        message: "bad".into(),
                    })
                }
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some(Code::InvalidArgument));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "a verdict is not retried");
    }

    #[tokio::test]
    async fn gives_up_after_its_patience_naming_the_last_reason() {
        let (client, _stop) = health_client(Duration::from_millis(400)).await;
        let t = Instant::now();
        let err = client
            .retrying("test call", |_| async { Err::<(), _>(transport_error()) })
            .await
            .unwrap_err();
        assert!(t.elapsed() >= Duration::from_millis(400), "{:?}", t.elapsed());
        assert!(matches!(err, ClientError::NotServing { answered: false, .. }), "{err}");
        assert!(err.to_string().contains("UNKNOWN: reset"), "{err}");
    }

    /// A real server stopped and started again on the same port: the dead connection's
    /// errors are retried and the channel reconnects.
    #[tokio::test]
    async fn a_call_survives_the_server_restarting() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = health_server(listener, Duration::ZERO);
        let opts = options(addr, Duration::from_secs(5));
        let client =
            RefClient::connect_waiting(&opts).await.unwrap().with_patience(Duration::from_secs(20));
        drop(stop);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let down = client.health().await.unwrap_err();
        assert!(down.is_retryable(), "{down}");
        let restarted = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(700)).await;
            let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
            health_server(listener, Duration::ZERO)
        });
        // The restarted stand-in may still say NOT_SERVING: any answer will do.
        let answered = client.retrying("health", |c| async move { c.health().await }).await;
        answered.unwrap();
        assert!(client.retries() > 0);
        drop(restarted.await.unwrap());
    }
}
