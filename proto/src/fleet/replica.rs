//! One replica of a fleet: its connection, whether it may take calls now, and the probe that
//! admits it. A replica joins (or comes back after a failure) only once its health check
//! reports SERVING and its `ModelInfo` reports the fleet's model; a call that fails on it
//! for a reason that may pass later ejects it until the probe admits it again, after a
//! pause that doubles with each failure in a row (outlier ejection, as service meshes do it).
//!
//! To the balancer ([`tower::balance::p2c::Balance`]) a replica is a service that is ready
//! while admitted and pending otherwise, whose load is its calls in flight; calling it hands
//! out a [`Lease`] on its connection.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::sync::Notify;

use super::Shared;
use crate::client::{ClientError, ClientOptions, ReplicaClient};

/// The pause before probing a replica that failed, doubling with each failure in a row.
const FIRST_EJECTION: Duration = Duration::from_millis(100);
const MAX_EJECTION: Duration = Duration::from_secs(2);
/// A replica serving another model is asked again this rarely (it may be redeployed).
const REFUSED_PAUSE: Duration = Duration::from_secs(10);

/// Where a replica stands.
#[derive(Debug, Clone)]
pub enum Phase {
    /// Found, not yet SERVING with the fleet's model.
    Joining,
    /// Takes calls.
    Serving,
    /// A call failed on it; waiting for the probe to admit it again.
    Ejected,
    /// Serves another model than the fleet's, or refuses the client for good (the error
    /// says which).
    Refused(Arc<ClientError>),
    /// Gone from the fleet (its address no longer resolves).
    Removed,
}

pub(crate) struct Replica {
    pub(crate) url: String,
    options: ClientOptions,
    state: Mutex<State>,
    /// Calls holding a lease now: the balancer's load metric.
    in_flight: AtomicUsize,
    /// Calls made on it, and those that failed in a way that ejected it.
    pub(crate) calls: AtomicU64,
    pub(crate) failures: AtomicU64,
    /// Wakes the probe when the replica is ejected or removed.
    probe_needed: Notify,
}

struct State {
    phase: Phase,
    /// The connection of the last admission; kept while ejected (leases in flight use it).
    client: Option<ReplicaClient>,
    /// The balancer task waiting for this replica to be admitted.
    waker: Option<Waker>,
    failures_in_a_row: u32,
    /// Why the last probe or call failed, for the fleet's error when it runs out of time.
    last_error: Option<(String, bool)>,
}

impl Replica {
    pub(crate) fn new(url: String, options: ClientOptions) -> Arc<Replica> {
        Arc::new(Replica {
            url,
            options,
            state: Mutex::new(State {
                phase: Phase::Joining,
                client: None,
                waker: None,
                failures_in_a_row: 0,
                last_error: None,
            }),
            in_flight: AtomicUsize::new(0),
            calls: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            probe_needed: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("replica state lock")
    }

    pub(crate) fn phase(&self) -> Phase {
        self.state().phase.clone()
    }

    /// Why the last probe or call failed, and whether the server answered at all.
    pub(crate) fn last_error(&self) -> Option<(String, bool)> {
        self.state().last_error.clone()
    }

    fn set_phase(&self, phase: Phase) {
        let mut s = self.state();
        s.phase = phase;
        // The balancer polls again: to use it, or to see that no replica is left.
        if let Some(w) = s.waker.take() {
            w.wake();
        }
    }

    pub(crate) fn remove(&self) {
        self.set_phase(Phase::Removed);
        self.probe_needed.notify_one();
    }

    /// A call on this replica failed in a way that may pass later: no further calls until
    /// the probe admits it again.
    fn eject(&self, error: &ClientError) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut s = self.state();
        s.last_error = Some((error.reason(), matches!(error, ClientError::Status { .. })));
        if matches!(s.phase, Phase::Serving) {
            s.phase = Phase::Ejected;
            s.failures_in_a_row += 1;
            drop(s);
            self.probe_needed.notify_one();
        }
    }

    /// Admits (or re-admits) the replica, or refuses it, until it is removed. Runs as a
    /// task of its own; holds the fleet weakly so that dropping the last client ends it.
    pub(crate) async fn probe(self: Arc<Self>, fleet: Weak<Shared>, patience: Duration) {
        loop {
            let pause = {
                let s = self.state();
                match &s.phase {
                    Phase::Removed => return,
                    Phase::Serving => None,
                    Phase::Joining => Some(Duration::ZERO),
                    Phase::Ejected => Some(ejection_pause(s.failures_in_a_row)),
                    Phase::Refused(_) => Some(REFUSED_PAUSE),
                }
            };
            let Some(pause) = pause else {
                self.probe_needed.notified().await;
                continue;
            };
            tokio::time::sleep(pause).await;
            if matches!(self.phase(), Phase::Removed) {
                return;
            }
            // One backoff loop for every wait on a server: the replica client's.
            let admitted = match ReplicaClient::wait_until_serving(&self.options, patience).await {
                Ok(client) => match client.model_info().await {
                    Ok(info) => Ok((client, info.fingerprint)),
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            };
            let Some(fleet) = fleet.upgrade() else { return };
            match admitted {
                Ok((client, fingerprint)) => match fleet.admit(&self.url, &fingerprint) {
                    Ok(()) => {
                        let was = self.phase();
                        self.state().client = Some(client);
                        if matches!(was, Phase::Ejected) {
                            tracing::info!("reference replica {} is serving again", self.url);
                        }
                        self.set_phase(Phase::Serving);
                    }
                    Err(refusal) => {
                        tracing::error!("{refusal}; sending it no requests");
                        self.state().last_error = Some((refusal.to_string(), true));
                        self.set_phase(Phase::Refused(Arc::new(refusal)));
                    }
                },
                Err(e) => {
                    let answered = matches!(e, ClientError::Status { .. })
                        || matches!(e, ClientError::NotServing { answered: true, .. });
                    self.state().last_error = Some((e.reason(), answered));
                    if !e.is_retryable() {
                        // A bad URL, CA file or token: nothing a later probe can change.
                        tracing::error!("reference replica {}: {e}", self.url);
                        self.set_phase(Phase::Refused(Arc::new(e)));
                    }
                }
            }
        }
    }
}

fn ejection_pause(failures_in_a_row: u32) -> Duration {
    let doublings = failures_in_a_row.saturating_sub(1).min(16);
    (FIRST_EJECTION * 2u32.pow(doublings)).min(MAX_EJECTION)
}

/// A replica as the balancer sees it.
pub(crate) struct ReplicaService(pub(crate) Arc<Replica>);

impl tower::Service<()> for ReplicaService {
    type Response = Lease;
    type Error = Infallible;
    type Future = std::future::Ready<Result<Lease, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        let mut s = self.0.state();
        if matches!(s.phase, Phase::Serving) && s.client.is_some() {
            Poll::Ready(Ok(()))
        } else {
            s.waker = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    fn call(&mut self, _: ()) -> Self::Future {
        let replica = Arc::clone(&self.0);
        let client = replica.state().client.clone().expect("called only when ready");
        replica.in_flight.fetch_add(1, Ordering::Relaxed);
        std::future::ready(Ok(Lease { replica, client }))
    }
}

impl tower::load::Load for ReplicaService {
    type Metric = usize;

    fn load(&self) -> usize {
        self.0.in_flight.load(Ordering::Relaxed)
    }
}

/// One call's use of a replica; counts as its load until dropped.
pub(crate) struct Lease {
    replica: Arc<Replica>,
    pub(crate) client: ReplicaClient,
}

impl Lease {
    pub(crate) fn url(&self) -> &str {
        &self.replica.url
    }

    /// A call is made on the replica (attempts count, retries too).
    pub(crate) fn record_call(&self) {
        self.replica.calls.fetch_add(1, Ordering::Relaxed);
    }

    /// The call failed in a way another replica (or this one, later) may not.
    pub(crate) fn failed(&self, error: &ClientError) {
        self.replica.eject(error);
    }

    /// The replica answered for another model: never use it again.
    pub(crate) fn refuse(&self, error: ClientError) {
        self.replica.failures.fetch_add(1, Ordering::Relaxed);
        self.replica.state().last_error = Some((error.to_string(), true));
        self.replica.set_phase(Phase::Refused(Arc::new(error)));
    }

    /// The call succeeded: the replica's next ejection starts from the shortest pause.
    pub(crate) fn succeeded(&self) {
        self.replica.state().failures_in_a_row = 0;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.replica.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_pauses_double_up_to_the_cap() {
        assert_eq!(ejection_pause(1), FIRST_EJECTION);
        assert_eq!(ejection_pause(2), FIRST_EJECTION * 2);
        assert_eq!(ejection_pause(3), FIRST_EJECTION * 4);
        assert_eq!(ejection_pause(40), MAX_EJECTION);
    }
}
