//! The client every program uses to reach the reference: a fleet of one or more replicas
//! (`--server` is one URL, a comma-separated list, or a `dns:///` name re-resolved every
//! [`targets::DNS_REFRESH`]), calls balanced over them by tower's power-of-two-choices
//! balancer on calls in flight, and every call retried through failures.
//!
//! Every call a client makes (scoring, generating, `ModelInfo`) only reads, so a call that
//! failed for any reason but the server's verdict on it ([`ClientError::is_retryable`]) is
//! made again on another replica; the one it failed on is ejected until its probe finds it
//! SERVING again ([`replica`]). A call gives up once no replica has answered it for the
//! client's patience. Every replica must serve the same model: the first fingerprint seen
//! is pinned, a replica reporting another is refused (at connect, an error naming both), and
//! a replica that comes back with another model is never used again.

mod replica;
pub mod targets;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tower::balance::p2c::Balance;
use tower::discover::Change;
use tower::Service;

use crate::client::{ClientError, ClientOptions, ModelInfo, ReplicaClient};
pub use replica::Phase;
use replica::{Lease, Replica, ReplicaService};
use targets::Target;

/// How long [`RefClient::connect_waiting`] waits, once one replica serves, for the other
/// replicas found so far to answer, so that a replica serving another model is an error at
/// connect rather than a line in the log later.
const JOIN_GRACE: Duration = Duration::from_secs(2);

type Discovery = tokio_stream::wrappers::UnboundedReceiverStream<
    Result<Change<String, ReplicaService>, Infallible>,
>;

/// A client of a reference fleet. Cheap to clone; clones share the replicas, their
/// connections and counters. Background tasks (probes, DNS) end with the last clone.
#[derive(Clone)]
pub struct RefClient {
    shared: Arc<Shared>,
    patience: Duration,
}

pub(crate) struct Shared {
    /// `--server` as given, for messages.
    name: String,
    options: ClientOptions,
    balancer: tokio::sync::Mutex<Balance<Discovery, ()>>,
    changes: mpsc::UnboundedSender<Result<Change<String, ReplicaService>, Infallible>>,
    /// Every replica ever found, removed ones too (their counts stay in the summary).
    replicas: Mutex<BTreeMap<String, Arc<Replica>>>,
    /// The first model fingerprint a replica reported, and which replica reported it.
    pinned: Mutex<Option<(String, String)>>,
    retries: AtomicU64,
    /// How long one probe round waits for a replica before it starts again.
    probe_patience: Duration,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl Drop for Shared {
    fn drop(&mut self) {
        for task in self.tasks.get_mut().expect("task list lock").drain(..) {
            task.abort();
        }
    }
}

/// One replica's part in a client's calls, for a run's summary.
#[derive(Debug, Clone)]
pub struct ReplicaStats {
    pub url: String,
    /// Calls sent to it (attempts, retries included).
    pub calls: u64,
    /// Calls that failed on it and ejected it.
    pub failures: u64,
    pub phase: Phase,
}

impl Shared {
    /// Checks a replica's model against the fleet's: the first one pins it.
    fn admit(&self, url: &str, fingerprint: &str) -> Result<(), ClientError> {
        let mut pinned = self.pinned.lock().expect("pinned model lock");
        match &*pinned {
            None => {
                *pinned = Some((fingerprint.to_string(), url.to_string()));
                Ok(())
            }
            Some((expected, _)) if expected == fingerprint => Ok(()),
            Some((expected, by)) if by == url => Err(ClientError::ModelChanged {
                url: url.to_string(),
                expected: expected.clone(),
                found: fingerprint.to_string(),
            }),
            Some((expected, by)) => Err(ClientError::ReplicaMismatch {
                url: url.to_string(),
                found: fingerprint.to_string(),
                other_url: by.clone(),
                expected: expected.clone(),
            }),
        }
    }

    fn live_replicas(&self) -> Vec<Arc<Replica>> {
        let replicas = self.replicas.lock().expect("replica list lock");
        replicas.values().filter(|r| !matches!(r.phase(), Phase::Removed)).cloned().collect()
    }

    /// The error to end a call with when no replica can ever take it: every replica found
    /// is refused (another model, or a verdict such as UNAUTHENTICATED).
    fn refusal_if_none_can_serve(&self) -> Option<ClientError> {
        let live = self.live_replicas();
        let mut refusal = None;
        for r in &live {
            match r.phase() {
                Phase::Refused(e) => refusal = Some(e.copy()),
                _ => return None,
            }
        }
        refusal
    }

    /// The most telling reason the fleet is not answering: a replica that answered (up
    /// but not SERVING) over one that did not.
    fn last_error(&self) -> (bool, String) {
        let mut best: Option<(bool, String)> = None;
        for r in self.live_replicas() {
            if let Some((reason, answered)) = r.last_error() {
                let reason = format!("{}: {reason}", r.url);
                if best.as_ref().is_none_or(|(a, _)| answered && !a) {
                    best = Some((answered, reason));
                }
            }
        }
        best.unwrap_or((false, "no replica found yet".into()))
    }

    /// Adds a replica found at `url` (its probe admits it) unless it is known already.
    fn add(self: &Arc<Self>, target: &Target, url: String) {
        let mut replicas = self.replicas.lock().expect("replica list lock");
        if let Some(r) = replicas.get(&url) {
            if !matches!(r.phase(), Phase::Removed) {
                return;
            }
        }
        let replica =
            Replica::new(url.clone(), targets::replica_options(&self.options, target, url.clone()));
        replicas.insert(url.clone(), Arc::clone(&replica));
        drop(replicas);
        let _ = self.changes.send(Ok(Change::Insert(url, ReplicaService(Arc::clone(&replica)))));
        let probe = tokio::spawn(replica.probe(Arc::downgrade(self), self.probe_patience));
        self.tasks.lock().expect("task list lock").push(probe.abort_handle());
    }

    /// Removes the replica at `url` (its address no longer resolves).
    fn remove(&self, url: &str) {
        if let Some(r) = self.replicas.lock().expect("replica list lock").get(url) {
            tracing::info!("reference replica {url} left the fleet");
            r.remove();
        }
        let _ = self.changes.send(Ok(Change::Remove(url.to_string())));
    }
}

/// Resolves a `dns:///` name now and every [`targets::DNS_REFRESH`], adding the replicas
/// that appear and removing those that are gone. A failed lookup keeps the replicas known.
async fn follow_dns(fleet: Weak<Shared>, target: Target, tls: bool) {
    let Target::Dns { host, port } = &target else { return };
    let mut known = std::collections::BTreeSet::new();
    loop {
        let resolved = targets::resolve(host, *port, tls).await;
        let Some(shared) = fleet.upgrade() else { return };
        match resolved {
            Ok(urls) => {
                for url in urls.difference(&known) {
                    tracing::info!("reference replica {url} found through dns:///{host}:{port}");
                    shared.add(&target, url.clone());
                }
                for url in known.difference(&urls) {
                    shared.remove(url);
                }
                known = urls;
            }
            Err(e) => tracing::warn!("cannot resolve dns:///{host}:{port}: {e}"),
        }
        drop(shared);
        tokio::time::sleep(targets::DNS_REFRESH).await;
    }
}

enum PickFailure {
    /// No replica took the call before the deadline.
    TimedOut,
    /// No replica can ever take it.
    Refused(ClientError),
}

impl RefClient {
    /// Finds the fleet `opts.url` names and waits, up to `opts.connect_timeout`, until a
    /// replica is SERVING ([`wait_until_serving`](Self::wait_until_serving)).
    pub async fn connect_waiting(opts: &ClientOptions) -> Result<RefClient, ClientError> {
        Self::wait_until_serving(opts, opts.connect_timeout).await
    }

    /// Finds the fleet `opts.url` names and waits, up to `patience`, until one replica
    /// reports SERVING with its model pinned; then gives the other replicas found so far a
    /// moment to answer, so that two replicas serving different models fail here. Errors
    /// waiting cannot fix (a bad URL, CA file or token) return at once; running out of time
    /// is [`ClientError::NotServing`] naming `--server` and the last reason. The client's
    /// calls keep retrying for `patience` too (see [`with_patience`](Self::with_patience)).
    pub async fn wait_until_serving(
        opts: &ClientOptions,
        patience: Duration,
    ) -> Result<RefClient, ClientError> {
        let started = Instant::now();
        let name = opts.url.trim().to_string();
        if name.is_empty() {
            return Err(ClientError::NoServer);
        }
        let targets = targets::parse(&name)?;
        let tls = opts.ca_cert.is_some();
        for target in &targets {
            // What waiting cannot fix fails now, before any wait.
            let url = match target {
                Target::Url(url) => url.clone(),
                Target::Dns { port, .. } => {
                    format!("{}://127.0.0.1:{port}", if tls { "https" } else { "http" })
                }
            };
            ReplicaClient::prepare(&targets::replica_options(opts, target, url))?;
        }
        let (changes, discovered) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            name: name.clone(),
            options: opts.clone(),
            balancer: tokio::sync::Mutex::new(Balance::new(Discovery::new(discovered))),
            changes,
            replicas: Mutex::default(),
            pinned: Mutex::default(),
            retries: AtomicU64::new(0),
            probe_patience: patience.max(Duration::from_secs(1)),
            tasks: Mutex::default(),
        });
        for target in &targets {
            match target {
                Target::Url(url) => shared.add(target, url.clone()),
                Target::Dns { .. } => {
                    let task =
                        tokio::spawn(follow_dns(Arc::downgrade(&shared), target.clone(), tls));
                    shared.tasks.lock().expect("task list lock").push(task.abort_handle());
                }
            }
        }
        let client = RefClient { shared, patience };
        // One replica serving with the pinned model.
        let deadline = started + patience;
        match client.pick(deadline).await {
            Ok(lease) => drop(lease),
            Err(PickFailure::Refused(e)) => return Err(e),
            Err(PickFailure::TimedOut) => return Err(client.not_serving(started)),
        }
        // The others found so far: each serving the same model, refused, or still away.
        let grace = Instant::now() + JOIN_GRACE;
        loop {
            let replicas = client.shared.live_replicas();
            if let Some(refused) = replicas.iter().find_map(|r| match r.phase() {
                Phase::Refused(e) => Some(e.copy()),
                _ => None,
            }) {
                return Err(refused);
            }
            let joining = replicas.iter().any(|r| matches!(r.phase(), Phase::Joining));
            if !joining || Instant::now() >= grace {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(client)
    }

    /// Sets how long a call keeps retrying while no replica answers it (by default the
    /// patience the client was made with).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    pub fn patience(&self) -> Duration {
        self.patience
    }

    /// `--server` as given: one URL, a list or a `dns:///` name.
    pub fn url(&self) -> &str {
        &self.shared.name
    }

    /// Attempts repeated after a failure so far, over all clones.
    pub fn retries(&self) -> u64 {
        self.shared.retries.load(Ordering::Relaxed)
    }

    /// Each replica found so far, with its share of the calls.
    pub fn replicas(&self) -> Vec<ReplicaStats> {
        let replicas = self.shared.replicas.lock().expect("replica list lock");
        replicas
            .values()
            .map(|r| ReplicaStats {
                url: r.url.clone(),
                calls: r.calls.load(Ordering::Relaxed),
                failures: r.failures.load(Ordering::Relaxed),
                phase: r.phase(),
            })
            .collect()
    }

    /// The pinned model's `ModelInfo`, from any replica.
    pub async fn model_info(&self) -> Result<ModelInfo, ClientError> {
        self.retrying("asking for ModelInfo", |c| async move { c.model_info().await }).await
    }

    /// Runs the idempotent call `op` on a replica chosen by the balancer, retrying every
    /// failure that is not the server's verdict ([`ClientError::is_retryable`]) on another
    /// replica (or the same one once its probe admits it again), for at most the client's
    /// patience counted from the first failure; then [`ClientError::NotServing`] names
    /// `--server` and the last reason. A verdict, or a fleet where every replica is
    /// refused (another model), ends the call at once. `what` names the call in the log.
    pub async fn retrying<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, ClientError>
    where
        F: FnMut(ReplicaClient) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let mut first_failure: Option<Instant> = None;
        loop {
            let since = first_failure.unwrap_or_else(Instant::now);
            let lease = match self.pick(since + self.patience).await {
                Ok(lease) => lease,
                Err(PickFailure::Refused(e)) => return Err(e),
                Err(PickFailure::TimedOut) => return Err(self.not_serving(since)),
            };
            lease.record_call();
            let err = match op(lease.client.clone()).await {
                Ok(v) => {
                    lease.succeeded();
                    if let Some(t) = first_failure {
                        tracing::info!(
                            "{what}: reference replica {} answered after {:.1}s of failures",
                            lease.url(),
                            t.elapsed().as_secs_f64()
                        );
                    }
                    return Ok(v);
                }
                Err(e) if e.is_retryable() => e,
                Err(e @ ClientError::ModelChanged { .. }) => {
                    // That replica is out for good; the others (if any) take the call.
                    tracing::error!("{what}: {e}; sending it no more requests");
                    lease.refuse(e);
                    continue;
                }
                Err(e) => return Err(e),
            };
            lease.failed(&err);
            drop(lease);
            first_failure.get_or_insert_with(Instant::now);
            self.shared.retries.fetch_add(1, Ordering::Relaxed);
            let others = self.shared.live_replicas().len() > 1;
            tracing::warn!(
                "{what}: {err}; retrying {}",
                if others { "on another replica" } else { "once the server is back" }
            );
        }
    }

    /// A lease on the replica the balancer picks, waiting until `deadline` for one to be
    /// admitted.
    async fn pick(&self, deadline: Instant) -> Result<Lease, PickFailure> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let mut balancer = tokio::time::timeout_at(deadline, self.shared.balancer.lock())
            .await
            .map_err(|_| PickFailure::TimedOut)?;
        let ready = std::future::poll_fn(|cx| {
            if let Some(refusal) = self.shared.refusal_if_none_can_serve() {
                return std::task::Poll::Ready(Err(refusal));
            }
            // Pending until a replica is admitted: replicas wake it as they change.
            balancer.poll_ready(cx).map(|r| {
                r.expect("replicas never fail to be ready");
                Ok(())
            })
        });
        match tokio::time::timeout_at(deadline, ready).await {
            Err(_) => return Err(PickFailure::TimedOut),
            Ok(Err(refusal)) => return Err(PickFailure::Refused(refusal)),
            Ok(Ok(())) => {}
        }
        Ok(balancer.call(()).await.expect("a replica hands out a lease without failing"))
    }

    fn not_serving(&self, since: Instant) -> ClientError {
        let (answered, last) = self.shared.last_error();
        ClientError::NotServing {
            url: self.shared.name.clone(),
            waited: since.elapsed(),
            answered,
            last,
        }
    }
}

#[cfg(test)]
mod tests;
