//! The metrics.jsonl log (in progress).
