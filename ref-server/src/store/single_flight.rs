//! Single flight: while one request computes a response (looks it up in the store, or
//! scores it), every other request that asks for the same response waits for that result
//! instead of computing it again.
//!
//! A request [`claim`](SingleFlight::claim)s the keys it needs: the keys nobody is working
//! on it leads ([`Leading`]), the others it waits for ([`Waiting`]). A leader publishes each
//! key's outcome and then releases the keys (after the store has the scores, so that a
//! request arriving in between still finds the result). A leader that goes away without
//! publishing — its client cancelled the request — marks its keys abandoned on drop, and
//! their waiters claim them again: nobody waits forever.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use super::key::ScoreKey;
use crate::batcher::{BatchError, Scored};

/// A key's state as its waiters see it.
#[derive(Debug, Clone)]
enum Flight {
    Running,
    Done(Scored),
    Failed(BatchError),
    /// The leader went away without a result: claim the key again.
    Abandoned,
}

/// The keys being computed in this process.
#[derive(Debug, Default)]
pub struct SingleFlight {
    running: Mutex<HashMap<ScoreKey, watch::Receiver<Flight>>>,
}

/// The keys a request computes itself. Dropping it releases every key, marking those
/// without a published outcome abandoned.
pub struct Leading {
    flights: Arc<SingleFlight>,
    senders: HashMap<ScoreKey, watch::Sender<Flight>>,
}

/// A key another request is computing.
pub struct Waiting {
    pub key: ScoreKey,
    rx: watch::Receiver<Flight>,
}

/// What waiting for a key gave.
#[derive(Debug)]
pub enum Waited {
    Done(Scored),
    Failed(BatchError),
    /// Its leader went away: claim it again.
    Abandoned,
}

impl SingleFlight {
    /// Splits `keys` (distinct) into those this request leads and those it waits for.
    pub fn claim(self: &Arc<Self>, keys: &[ScoreKey]) -> (Leading, Vec<Waiting>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let mut senders = HashMap::new();
        let mut waits = Vec::new();
        for &key in keys {
            match running.get(&key) {
                Some(rx) => waits.push(Waiting { key, rx: rx.clone() }),
                None => {
                    let (tx, rx) = watch::channel(Flight::Running);
                    running.insert(key, rx);
                    senders.insert(key, tx);
                }
            }
        }
        (Leading { flights: Arc::clone(self), senders }, waits)
    }

    /// Keys being computed now.
    pub fn len(&self) -> usize {
        self.running.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Leading {
    /// The keys this request leads.
    pub fn keys(&self) -> impl Iterator<Item = &ScoreKey> {
        self.senders.keys()
    }

    pub fn leads(&self, key: &ScoreKey) -> bool {
        self.senders.contains_key(key)
    }

    /// Wakes `key`'s waiters with its score.
    pub fn publish(&self, key: &ScoreKey, score: &Scored) {
        if let Some(tx) = self.senders.get(key) {
            tx.send_replace(Flight::Done(score.clone()));
        }
    }

    /// Wakes the waiters of every key still running with `error`.
    pub fn fail(&self, error: &BatchError) {
        for tx in self.senders.values() {
            tx.send_if_modified(|f| {
                let running = matches!(f, Flight::Running);
                if running {
                    *f = Flight::Failed(error.clone());
                }
                running
            });
        }
    }
}

impl Drop for Leading {
    fn drop(&mut self) {
        let mut running = self.flights.running.lock().unwrap_or_else(|p| p.into_inner());
        for (key, tx) in self.senders.drain() {
            tx.send_if_modified(|f| {
                let unfinished = matches!(f, Flight::Running);
                if unfinished {
                    *f = Flight::Abandoned;
                }
                unfinished
            });
            running.remove(&key);
        }
    }
}

impl Waiting {
    pub async fn wait(mut self) -> Waited {
        match self.rx.wait_for(|f| !matches!(f, Flight::Running)).await {
            Ok(f) => match &*f {
                Flight::Done(s) => Waited::Done(s.clone()),
                Flight::Failed(e) => Waited::Failed(e.clone()),
                Flight::Running | Flight::Abandoned => Waited::Abandoned,
            },
            // The sender is gone without an outcome (cannot happen: drop marks it).
            Err(_) => Waited::Abandoned,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> ScoreKey {
        ScoreKey([b; 32])
    }

    fn scored(x: f64) -> Scored {
        Scored { logprob: x, per_token: vec![x as f32] }
    }

    #[tokio::test]
    async fn the_second_request_waits_for_the_first() {
        let flights = Arc::new(SingleFlight::default());
        let (lead, waits) = flights.claim(&[key(1), key(2)]);
        assert!(waits.is_empty());
        let (lead2, waits2) = flights.claim(&[key(2), key(3)]);
        assert_eq!(waits2.iter().map(|w| w.key).collect::<Vec<_>>(), vec![key(2)]);
        assert!(lead2.leads(&key(3)) && !lead2.leads(&key(2)));
        let waiter = tokio::spawn(waits2.into_iter().next().unwrap().wait());
        lead.publish(&key(2), &scored(-1.5));
        match waiter.await.unwrap() {
            Waited::Done(s) => assert_eq!(s, scored(-1.5)),
            other => panic!("{other:?}"),
        }
        drop(lead);
        drop(lead2);
        assert!(flights.is_empty(), "released keys are no longer running");
    }

    #[tokio::test]
    async fn a_published_key_still_answers_until_released() {
        let flights = Arc::new(SingleFlight::default());
        let (lead, _) = flights.claim(&[key(1)]);
        lead.publish(&key(1), &scored(-2.0));
        // A request arriving after the result but before the release gets it at once.
        let (_, waits) = flights.claim(&[key(1)]);
        assert!(matches!(waits.into_iter().next().unwrap().wait().await, Waited::Done(_)));
    }

    #[tokio::test]
    async fn a_failure_reaches_every_waiter() {
        let flights = Arc::new(SingleFlight::default());
        let (lead, _) = flights.claim(&[key(1)]);
        let (_, waits) = flights.claim(&[key(1)]);
        lead.fail(&BatchError::Forward("out of memory".into()));
        match waits.into_iter().next().unwrap().wait().await {
            Waited::Failed(BatchError::Forward(m)) => assert_eq!(m, "out of memory"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_leader_gone_without_a_result_lets_the_waiter_lead() {
        let flights = Arc::new(SingleFlight::default());
        let (lead, _) = flights.claim(&[key(1)]);
        let (_, waits) = flights.claim(&[key(1)]);
        let waiter = tokio::spawn(waits.into_iter().next().unwrap().wait());
        drop(lead); // its client cancelled
        assert!(matches!(waiter.await.unwrap(), Waited::Abandoned));
        let (lead, waits) = flights.claim(&[key(1)]);
        assert!(waits.is_empty() && lead.leads(&key(1)));
    }
}
