//! The score store: reference scores kept across requests, runs and restarts, so that a
//! response asked for again — by the next run of a sweep, or by a concurrent one — is
//! answered without a forward pass.
//!
//! [`key`] (what a score is addressed by), [`db`] (the redb file: entries, eviction,
//! the checks that refuse a file of another model or a corrupt one), [`single_flight`]
//! (concurrent requests for one response wait for one computation) and [`stats`] (the
//! counters `ModelInfo` reports). The engine puts them together (`Engine::score`).

pub mod db;
pub mod key;
pub mod single_flight;
pub mod stats;

pub use db::{OpenedStore, ScoreStore, StoreError};
pub use key::{KeyContext, ScoreKey};
pub use single_flight::SingleFlight;
pub use stats::{ScoreStats, ScoreStatsSnapshot};
