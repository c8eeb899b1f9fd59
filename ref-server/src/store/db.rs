//! The score store's file: a redb database (transactional, crash-safe, one writer process
//! at a time — redb locks the file) of stored scores, bounded in bytes with least recently
//! used eviction.
//!
//! Tables: `scores` (key → entry: last-use tick, summed log-prob as f64, per-token
//! log-probs as f32, all little-endian), `by_age` (tick → key, the eviction order: the
//! oldest tick is the least recently used entry), `meta` (schema version, the model
//! fingerprint the store belongs to) and `counters` (entries, bytes, next tick), kept in the
//! same transactions as the entries so that they never disagree.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use redb::{
    Database, DatabaseError, Durability, ReadableDatabase, ReadableTable, StorageError,
    TableDefinition,
};

use super::key::ScoreKey;
use crate::batcher::Scored;

const SCORES: TableDefinition<&[u8; 32], &[u8]> = TableDefinition::new("scores");
const BY_AGE: TableDefinition<u64, &[u8; 32]> = TableDefinition::new("by_age");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// The layout of the tables and entries; a store written with another is refused.
pub const SCHEMA_VERSION: u64 = 1;

/// Bytes an entry accounts for beyond its value: its key in `scores` and its row in
/// `by_age` (tick and key).
const ENTRY_OVERHEAD: u64 = 32 + 8 + 32;
/// Entry header: last-use tick and summed log-prob.
const HEADER: usize = 16;

/// Hits only move entries in the eviction order, which a crash may lose harmlessly: such
/// commits skip the disk flush, but one at least this often is durable (redb reclaims the
/// pages of non-durable commits only at a durable one).
const DURABLE_EVERY: Duration = Duration::from_secs(1);

/// Why the store cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the score store {path} is open in another process (another ref-server?); give each \
         server its own --score-store file"
    )]
    InUse { path: PathBuf },
    #[error(
        "the score store {path} is not a usable score store ({why}); delete it, or start with \
         --score-store-reset to rebuild it"
    )]
    Unusable { path: PathBuf, why: String },
    #[error(
        "the score store {path} holds scores of the model {stored}, but this server serves \
         {served}; use another --score-store file, or --score-store-reset (or delete the file) \
         to rebuild it for this model"
    )]
    OtherModel { path: PathBuf, stored: String, served: String },
    #[error("the score store {path}: {source}")]
    Db {
        path: PathBuf,
        #[source]
        source: redb::Error,
    },
}

/// The store's size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreSize {
    pub entries: u64,
    pub bytes: u64,
}

/// What one [`ScoreStore::record`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    pub size: StoreSize,
    pub evicted: u64,
}

/// An open score store, bound to one model.
pub struct ScoreStore {
    db: Database,
    path: PathBuf,
    max_bytes: u64,
    last_durable: Mutex<Instant>,
}

/// A store file opened and checked for its schema, not yet bound to a model: what can be
/// checked before the model is loaded (minutes for a large one) is checked first.
pub struct OpenedStore {
    db: Database,
    path: PathBuf,
}

impl OpenedStore {
    /// Opens (or creates) the store at `path`; with `reset`, whatever is there is replaced
    /// by an empty store — unless another process has it open.
    pub fn open(path: &Path, reset: bool) -> Result<OpenedStore, StoreError> {
        if reset && path.exists() {
            match Database::create(path) {
                Err(DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(StoreError::InUse { path: path.into() })
                }
                // Readable or not, it goes; the open database (if any) is closed first.
                _ => std::fs::remove_file(path).map_err(|e| StoreError::Unusable {
                    path: path.into(),
                    why: format!("cannot delete it to reset it: {e}"),
                })?,
            }
            tracing::info!("score store {} reset (--score-store-reset)", path.display());
        }
        let db = Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => StoreError::InUse { path: path.into() },
            // redb reports a file that is not redb's ("magic number mismatch") as
            // invalid data; other I/O errors (permissions, a missing directory) are not the
            // file's fault.
            DatabaseError::Storage(StorageError::Io(io))
                if io.kind() != std::io::ErrorKind::InvalidData =>
            {
                StoreError::Db { path: path.into(), source: redb::Error::Io(io) }
            }
            other => StoreError::Unusable { path: path.into(), why: other.to_string() },
        })?;
        let opened = OpenedStore { db, path: path.into() };
        opened.check_schema()?;
        Ok(opened)
    }

    /// Creates the tables of a new store; refuses a redb file that is not a score store
    /// or one of another schema version.
    fn check_schema(&self) -> Result<(), StoreError> {
        let unusable = |why: String| StoreError::Unusable { path: self.path.clone(), why };
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let tables: Vec<String> = txn
            .list_tables()
            .map_err(|e| self.db_error(e))?
            .map(|t| redb::TableHandle::name(&t).to_string())
            .collect();
        {
            let mut meta = txn.open_table(META).map_err(|e| unusable(e.to_string()))?;
            let version = meta
                .get("schema_version")
                .map_err(|e| self.db_error(e))?
                .map(|v| v.value().to_string());
            match version {
                Some(v) if v == SCHEMA_VERSION.to_string() => {}
                Some(v) => {
                    return Err(unusable(format!(
                        "its schema version is {v}; this server reads version {SCHEMA_VERSION}"
                    )))
                }
                None if tables.is_empty() => {
                    meta.insert("schema_version", SCHEMA_VERSION.to_string().as_str())
                        .map_err(|e| self.db_error(e))?;
                }
                None => {
                    return Err(unusable(format!(
                        "a redb database without score store metadata (tables: {})",
                        tables.join(", ")
                    )))
                }
            }
            // Created here if new; a wrong type in an existing file is refused.
            txn.open_table(SCORES).map_err(|e| unusable(e.to_string()))?;
            txn.open_table(BY_AGE).map_err(|e| unusable(e.to_string()))?;
            txn.open_table(COUNTERS).map_err(|e| unusable(e.to_string()))?;
        }
        txn.commit().map_err(|e| self.db_error(e))
    }

    /// Binds the store to the served model: a new store records `fingerprint`, an existing
    /// one must have been written for it.
    pub fn for_model(self, fingerprint: &str, max_bytes: u64) -> Result<ScoreStore, StoreError> {
        let txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        {
            let mut meta = txn.open_table(META).map_err(|e| self.db_error(e))?;
            let stored = meta
                .get("fingerprint")
                .map_err(|e| self.db_error(e))?
                .map(|v| v.value().to_string());
            match stored {
                Some(stored) if stored != fingerprint => {
                    return Err(StoreError::OtherModel {
                        path: self.path.clone(),
                        stored,
                        served: fingerprint.into(),
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("fingerprint", fingerprint).map_err(|e| self.db_error(e))?;
                }
            }
        }
        txn.commit().map_err(|e| self.db_error(e))?;
        Ok(ScoreStore {
            db: self.db,
            path: self.path,
            max_bytes,
            last_durable: Mutex::new(Instant::now()),
        })
    }

    fn db_error(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db { path: self.path.clone(), source: e.into() }
    }
}

impl ScoreStore {
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn db_error(&self, e: impl Into<redb::Error>) -> StoreError {
        StoreError::Db { path: self.path.clone(), source: e.into() }
    }

    /// Entries and bytes held now.
    pub fn size(&self) -> Result<StoreSize, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let counters = txn.open_table(COUNTERS).map_err(|e| self.db_error(e))?;
        let get = |name: &str| -> Result<u64, StoreError> {
            Ok(counters.get(name).map_err(|e| self.db_error(e))?.map_or(0, |v| v.value()))
        };
        Ok(StoreSize { entries: get("entries")?, bytes: get("bytes")? })
    }

    /// The stored score of each key, `None` where there is none. Reads only: recording a
    /// hit's use is [`ScoreStore::record`]'s, in the request's one write transaction.
    pub fn lookup(&self, keys: &[ScoreKey]) -> Result<Vec<Option<Scored>>, StoreError> {
        let txn = self.db.begin_read().map_err(|e| self.db_error(e))?;
        let scores = txn.open_table(SCORES).map_err(|e| self.db_error(e))?;
        keys.iter()
            .map(|k| {
                let entry = scores.get(&k.0).map_err(|e| self.db_error(e))?;
                entry
                    .map(|v| decode(v.value()))
                    .transpose()
                    .map_err(|why| StoreError::Unusable { path: self.path.clone(), why })
            })
            .collect()
    }

    /// One write transaction per request: `used` (hits) become the most recently used
    /// entries, `new` scores are added, and the least recently used entries are evicted
    /// while the store is over its bound.
    pub fn record(
        &self,
        used: &[ScoreKey],
        new: &[(ScoreKey, &Scored)],
    ) -> Result<Recorded, StoreError> {
        let mut txn = self.db.begin_write().map_err(|e| self.db_error(e))?;
        let durable = {
            let mut last = self.last_durable.lock().unwrap_or_else(|p| p.into_inner());
            let durable = !new.is_empty() || last.elapsed() >= DURABLE_EVERY;
            if durable {
                *last = Instant::now();
            }
            durable
        };
        if !durable {
            txn.set_durability(Durability::None).map_err(|e| self.db_error(e))?;
        }
        let recorded = self.record_in(&txn, used, new).map_err(|e| self.db_error(e))?;
        txn.commit().map_err(|e| self.db_error(e))?;
        Ok(recorded)
    }

    fn record_in(
        &self,
        txn: &redb::WriteTransaction,
        used: &[ScoreKey],
        new: &[(ScoreKey, &Scored)],
    ) -> Result<Recorded, redb::Error> {
        let mut scores = txn.open_table(SCORES)?;
        let mut by_age = txn.open_table(BY_AGE)?;
        let mut counters = txn.open_table(COUNTERS)?;
        let read = |c: &redb::Table<&str, u64>, name: &str| -> Result<u64, redb::Error> {
            Ok(c.get(name)?.map_or(0, |v| v.value()))
        };
        let (mut entries, mut bytes, mut tick) =
            (read(&counters, "entries")?, read(&counters, "bytes")?, read(&counters, "next_tick")?);
        for key in used {
            touch(&mut scores, &mut by_age, key, &mut tick)?;
        }
        for (key, score) in new {
            // Present already (written since the lookup): only its use counts.
            if touch(&mut scores, &mut by_age, key, &mut tick)? {
                continue;
            }
            let entry = encode(tick, score);
            scores.insert(&key.0, entry.as_slice())?;
            by_age.insert(tick, &key.0)?;
            tick += 1;
            entries += 1;
            bytes += entry.len() as u64 + ENTRY_OVERHEAD;
        }
        let mut evicted = 0;
        while bytes > self.max_bytes {
            let Some(oldest) = by_age.pop_first()? else { break };
            let key = *oldest.1.value();
            drop(oldest);
            if let Some(entry) = scores.remove(&key)? {
                bytes = bytes.saturating_sub(entry.value().len() as u64 + ENTRY_OVERHEAD);
                entries = entries.saturating_sub(1);
                evicted += 1;
            }
        }
        counters.insert("entries", entries)?;
        counters.insert("bytes", bytes)?;
        counters.insert("next_tick", tick)?;
        Ok(Recorded { size: StoreSize { entries, bytes }, evicted })
    }
}

/// Makes `key`'s entry the most recently used (`tick`, then advanced); false if absent.
fn touch(
    scores: &mut redb::Table<&[u8; 32], &[u8]>,
    by_age: &mut redb::Table<u64, &[u8; 32]>,
    key: &ScoreKey,
    tick: &mut u64,
) -> Result<bool, redb::Error> {
    let Some(mut entry) = scores.get(&key.0)?.map(|v| v.value().to_vec()) else {
        return Ok(false);
    };
    if entry.len() >= HEADER {
        let old = u64::from_le_bytes(entry[..8].try_into().expect("8 bytes"));
        by_age.remove(old)?;
        entry[..8].copy_from_slice(&tick.to_le_bytes());
        scores.insert(&key.0, entry.as_slice())?;
        by_age.insert(*tick, &key.0)?;
        *tick += 1;
    }
    Ok(true)
}

fn encode(tick: u64, score: &Scored) -> Vec<u8> {
    let mut entry = Vec::with_capacity(HEADER + 4 * score.per_token.len());
    entry.extend_from_slice(&tick.to_le_bytes());
    entry.extend_from_slice(&score.logprob.to_le_bytes());
    for x in &score.per_token {
        entry.extend_from_slice(&x.to_le_bytes());
    }
    entry
}

fn decode(entry: &[u8]) -> Result<Scored, String> {
    if entry.len() < HEADER || !(entry.len() - HEADER).is_multiple_of(4) {
        return Err(format!("an entry of {} bytes is malformed", entry.len()));
    }
    let logprob = f64::from_le_bytes(entry[8..16].try_into().expect("8 bytes"));
    let per_token = entry[HEADER..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    Ok(Scored { logprob, per_token })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> ScoreKey {
        super::super::key::KeyContext::new("fp", "float32", "cpu").key(&[i], &[i + 1])
    }

    fn scored(i: u32, tokens: usize) -> Scored {
        let per_token: Vec<f32> = (0..tokens).map(|t| -(i as f32) - 0.1 * t as f32).collect();
        Scored { logprob: per_token.iter().map(|&x| x as f64).sum(), per_token }
    }

    fn open(path: &Path, max_bytes: u64) -> ScoreStore {
        OpenedStore::open(path, false).unwrap().for_model("fp", max_bytes).unwrap()
    }

    #[test]
    fn scores_come_back_bit_for_bit_after_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let s = scored(3, 5);
        {
            let store = open(&path, 1 << 20);
            assert_eq!(store.lookup(&[key(1)]).unwrap(), vec![None]);
            let r = store.record(&[], &[(key(1), &s)]).unwrap();
            assert_eq!(r.size.entries, 1);
            assert_eq!(r.size.bytes, (HEADER + 20) as u64 + ENTRY_OVERHEAD);
        }
        let store = open(&path, 1 << 20);
        let got = store.lookup(&[key(1), key(2)]).unwrap();
        assert_eq!(got[0].as_ref().unwrap().logprob.to_bits(), s.logprob.to_bits());
        assert_eq!(got[0].as_ref().unwrap().per_token, s.per_token);
        assert_eq!(got[1], None);
        assert_eq!(store.size().unwrap().entries, 1);
    }

    #[test]
    fn the_least_recently_used_entries_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let one = (HEADER + 4 * 4) as u64 + ENTRY_OVERHEAD;
        let store = open(&dir.path().join("s.redb"), 3 * one);
        let s: Vec<Scored> = (0..5).map(|i| scored(i, 4)).collect();
        store.record(&[], &[(key(0), &s[0]), (key(1), &s[1]), (key(2), &s[2])]).unwrap();
        // 0 is used again: 1 is now the least recently used.
        store.record(&[key(0)], &[]).unwrap();
        let r = store.record(&[], &[(key(3), &s[3])]).unwrap();
        assert_eq!((r.evicted, r.size.entries, r.size.bytes), (1, 3, 3 * one));
        let present: Vec<bool> = store
            .lookup(&[key(0), key(1), key(2), key(3)])
            .unwrap()
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(present, vec![true, false, true, true]);
        // Two more: 2 then 0 go.
        let r = store.record(&[key(3)], &[(key(4), &s[4]), (key(1), &s[1])]).unwrap();
        assert_eq!(r.evicted, 2);
        let present: Vec<bool> = store
            .lookup(&[key(0), key(2), key(3), key(4), key(1)])
            .unwrap()
            .iter()
            .map(Option::is_some)
            .collect();
        assert_eq!(present, vec![false, false, true, true, true]);
    }

    #[test]
    fn a_store_of_another_model_is_refused_naming_both() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        drop(open(&path, 1 << 20));
        let err = OpenedStore::open(&path, false)
            .unwrap()
            .for_model("other", 1 << 20)
            .err()
            .expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("fp") && msg.contains("other"), "{msg}");
        assert!(msg.contains(&path.display().to_string()) && msg.contains("--score-store-reset"));
        // A reset rebuilds it for the new model.
        let store = OpenedStore::open(&path, true).unwrap().for_model("other", 1 << 20).unwrap();
        assert_eq!(store.size().unwrap().entries, 0);
    }

    #[test]
    fn a_file_that_is_not_a_store_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        std::fs::write(&path, b"not a database, just some text that is long enough".repeat(100))
            .unwrap();
        let err = OpenedStore::open(&path, false).err().expect("refused").to_string();
        assert!(err.contains("not a usable score store") && err.contains("s.redb"), "{err}");
        // Another redb database is not a score store either.
        let other = dir.path().join("other.redb");
        {
            let db = Database::create(&other).unwrap();
            let txn = db.begin_write().unwrap();
            txn.open_table(TableDefinition::<u64, u64>::new("x")).unwrap();
            txn.commit().unwrap();
        }
        let err = OpenedStore::open(&other, false).err().expect("refused").to_string();
        assert!(err.contains("without score store metadata"), "{err}");
        assert!(OpenedStore::open(&path, true).is_ok(), "a reset replaces it");
    }

    #[test]
    fn a_second_opener_is_told_the_file_is_in_use() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let _first = open(&path, 1 << 20);
        let err = OpenedStore::open(&path, false).err().expect("refused").to_string();
        assert!(err.contains("open in another process"), "{err}");
        let err = OpenedStore::open(&path, true).err().expect("no reset under a user");
        assert!(matches!(err, StoreError::InUse { .. }));
    }
}
