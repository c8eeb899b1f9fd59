//! The scoring counters: one struct of atomics that the engine and the store update, read
//! whole by [`ScoreStats::snapshot`] (for `ModelInfo`, `ref-server info` and metrics).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use dpo_proto::v1;

/// Counters since the server started, plus the store's size.
#[derive(Debug, Default)]
pub struct ScoreStats {
    /// The store's file as given; `None`: no store.
    store_path: Option<String>,
    max_bytes: u64,
    entries: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    single_flight_waits: AtomicU64,
    evictions: AtomicU64,
    forward_tokens: AtomicU64,
}

/// The counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScoreStatsSnapshot {
    pub store_path: Option<String>,
    pub max_bytes: u64,
    pub entries: u64,
    pub bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub single_flight_waits: u64,
    pub evictions: u64,
    pub forward_tokens: u64,
}

impl ScoreStats {
    /// Counters of a server without a store: every response is a miss.
    pub fn without_store() -> ScoreStats {
        ScoreStats::default()
    }

    /// Counters of a server with the store at `path`, bounded to `max_bytes`.
    pub fn with_store(path: String, max_bytes: u64) -> ScoreStats {
        ScoreStats { store_path: Some(path), max_bytes, ..ScoreStats::default() }
    }

    pub fn snapshot(&self) -> ScoreStatsSnapshot {
        ScoreStatsSnapshot {
            store_path: self.store_path.clone(),
            max_bytes: self.max_bytes,
            entries: self.entries.load(Relaxed),
            bytes: self.bytes.load(Relaxed),
            hits: self.hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            single_flight_waits: self.single_flight_waits.load(Relaxed),
            evictions: self.evictions.load(Relaxed),
            forward_tokens: self.forward_tokens.load(Relaxed),
        }
    }

    pub(crate) fn set_size(&self, entries: u64, bytes: u64) {
        self.entries.store(entries, Relaxed);
        self.bytes.store(bytes, Relaxed);
    }

    pub(crate) fn add_hits(&self, n: usize) {
        self.hits.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn add_misses(&self, n: usize) {
        self.misses.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn add_single_flight_waits(&self, n: usize) {
        self.single_flight_waits.fetch_add(n as u64, Relaxed);
    }

    pub(crate) fn add_evictions(&self, n: u64) {
        self.evictions.fetch_add(n, Relaxed);
    }

    pub(crate) fn add_forward_tokens(&self, n: usize) {
        self.forward_tokens.fetch_add(n as u64, Relaxed);
    }
}

impl From<ScoreStatsSnapshot> for v1::ScoreStoreStats {
    fn from(s: ScoreStatsSnapshot) -> Self {
        v1::ScoreStoreStats {
            enabled: s.store_path.is_some(),
            path: s.store_path.unwrap_or_default(),
            entries: s.entries,
            bytes: s.bytes,
            max_bytes: s.max_bytes,
            hits: s.hits,
            misses: s.misses,
            single_flight_waits: s.single_flight_waits,
            evictions: s.evictions,
            forward_tokens: s.forward_tokens,
        }
    }
}
