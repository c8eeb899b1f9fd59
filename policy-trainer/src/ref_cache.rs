//! The reference log-prob cache: the reference model is frozen, so the score of a pair
//! never changes and is asked of the server once per run — validation passes and later
//! epochs read it from here. Persisted as an append-only JSONL file so a restarted
//! (`--resume`d) run, or another run over the same data, reuses it.
//!
//! Entries are keyed by a SHA-256 over the reference fingerprint and the exact token ids
//! scored, so a different reference model, tokenizer, template or truncation can never be
//! served a stale score.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use dpo_common::data::EncodedPair;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Reference log-probs of one pair's two responses (summed over response tokens, nats).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RefScores {
    pub chosen: f64,
    pub rejected: f64,
}

/// Cache key: SHA-256 of (reference fingerprint, prompt, chosen, rejected ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PairKey([u8; 32]);

impl PairKey {
    pub fn new(reference_fingerprint: &str, pair: &EncodedPair) -> Self {
        let mut h = Sha256::new();
        h.update((reference_fingerprint.len() as u64).to_le_bytes());
        h.update(reference_fingerprint.as_bytes());
        // Lengths delimit the three id lists, so no two different pairs hash the same bytes.
        for ids in [&pair.prompt_ids, &pair.chosen_ids, &pair.rejected_ids] {
            h.update((ids.len() as u64).to_le_bytes());
            for id in ids.iter() {
                h.update(id.to_le_bytes());
            }
        }
        PairKey(h.finalize().into())
    }

    fn to_hex(self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn from_hex(s: &str) -> Option<Self> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(PairKey(out))
    }
}

#[derive(Serialize, Deserialize)]
struct Line {
    key: String,
    chosen: f64,
    rejected: f64,
}

/// In-memory map, optionally backed by an append-only file.
pub struct RefCache {
    entries: HashMap<PairKey, RefScores>,
    file: Option<(PathBuf, BufWriter<File>)>,
}

impl RefCache {
    pub fn in_memory() -> Self {
        RefCache { entries: HashMap::new(), file: None }
    }

    /// Opens (creating if needed) a persistent cache. A torn last line — the trace of a
    /// crash mid-append — is cut off with a warning; any other bad line is an error, since
    /// it means the file is not a cache this program wrote.
    pub fn open(path: &Path) -> Result<Self> {
        let cannot = |what: &str| format!("cannot {what} the reference cache {}", path.display());
        let text = match std::fs::read(path) {
            Ok(bytes) => String::from_utf8(bytes).map_err(|_| {
                anyhow::anyhow!("{} is not text; it is not a reference cache", path.display())
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| cannot("read")),
        };
        let mut entries = HashMap::new();
        let mut good_len = 0usize;
        let lines: Vec<&str> = text.split_inclusive('\n').collect();
        for (i, line) in lines.iter().enumerate() {
            let parsed = line
                .strip_suffix('\n')
                .and_then(|l| serde_json::from_str::<Line>(l).ok())
                .and_then(|l| Some((PairKey::from_hex(&l.key)?, l.chosen, l.rejected)));
            match parsed {
                Some((key, chosen, rejected)) => {
                    entries.insert(key, RefScores { chosen, rejected });
                    good_len += line.len();
                }
                None if i + 1 == lines.len() => {
                    tracing::warn!(
                        "reference cache {}: cutting off a torn last line (line {})",
                        path.display(),
                        i + 1
                    );
                }
                None => anyhow::bail!(
                    "reference cache {} line {} is not a cache entry; delete the file or pass \
                     another --ref-cache",
                    path.display(),
                    i + 1
                ),
            }
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| cannot("open"))?;
        if good_len < text.len() {
            file.set_len(good_len as u64).with_context(|| cannot("repair"))?;
        }
        Ok(RefCache { entries, file: Some((path.to_path_buf(), BufWriter::new(file))) })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn get(&self, key: &PairKey) -> Option<RefScores> {
        self.entries.get(key).copied()
    }

    pub fn insert(&mut self, key: PairKey, scores: RefScores) -> Result<()> {
        if self.entries.insert(key, scores).is_none() {
            if let Some((path, w)) = &mut self.file {
                let line =
                    Line { key: key.to_hex(), chosen: scores.chosen, rejected: scores.rejected };
                serde_json::to_writer(&mut *w, &line)?;
                w.write_all(b"\n").with_context(|| {
                    format!("cannot append to the reference cache {}", path.display())
                })?;
            }
        }
        Ok(())
    }

    /// Pushes buffered entries to the file (called at checkpoints and on exit).
    pub fn flush(&mut self) -> Result<()> {
        if let Some((path, w)) = &mut self.file {
            w.flush()
                .with_context(|| format!("cannot write the reference cache {}", path.display()))?;
        }
        Ok(())
    }
}

impl Drop for RefCache {
    fn drop(&mut self) {
        let _ = self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(p: &[u32], c: &[u32], r: &[u32]) -> EncodedPair {
        EncodedPair { prompt_ids: p.to_vec(), chosen_ids: c.to_vec(), rejected_ids: r.to_vec() }
    }

    #[test]
    fn key_depends_on_fingerprint_and_boundaries() {
        let a = pair(&[1, 2], &[3], &[4]);
        let b = pair(&[1], &[2, 3], &[4]);
        assert_ne!(PairKey::new("sha256:x", &a), PairKey::new("sha256:x", &b));
        assert_ne!(PairKey::new("sha256:x", &a), PairKey::new("sha256:y", &a));
        assert_eq!(PairKey::new("sha256:x", &a), PairKey::new("sha256:x", &a.clone()));
    }

    #[test]
    fn persists_exactly_and_survives_a_torn_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache.jsonl");
        let k1 = PairKey::new("f", &pair(&[1], &[2], &[3]));
        let k2 = PairKey::new("f", &pair(&[1], &[2], &[4]));
        let s1 = RefScores { chosen: -1.234_567_890_123_456_7, rejected: -0.1 };
        {
            let mut c = RefCache::open(&path).unwrap();
            c.insert(k1, s1).unwrap();
        }
        // Simulate a crash in the middle of the next append.
        std::fs::write(&path, std::fs::read_to_string(&path).unwrap() + "{\"key\":\"ab").unwrap();
        let mut c = RefCache::open(&path).unwrap();
        assert_eq!(c.get(&k1), Some(s1), "f64 must round-trip bit-exactly");
        c.insert(k2, s1).unwrap();
        drop(c);
        let c = RefCache::open(&path).unwrap();
        assert_eq!(c.len(), 2);

        std::fs::write(&path, "garbage\n{}\n").unwrap();
        let err = RefCache::open(&path).err().unwrap().to_string();
        assert!(err.contains("line 1"), "{err}");
    }
}
