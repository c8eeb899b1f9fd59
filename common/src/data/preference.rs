//! A generic preference file for users' own data: JSON lines
//! `{"prompt": .., "chosen": .., "rejected": ..}` (other fields are ignored). The texts are
//! used exactly as given: the prompt is the instruction the template wraps, the responses
//! are what follows it.

use std::path::Path;

use super::jsonl::{read_records, string_field, LoadReport};
use super::PreferencePair;
use crate::error::Result;

/// The pairs of a preference JSONL file (`.jsonl` or `.jsonl.gz`), in file order, each with
/// the file name as its source, and the account of every line.
pub fn read_preference_jsonl(path: &Path) -> Result<(Vec<PreferencePair>, LoadReport)> {
    let source = path
        .file_name()
        .map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
    read_records(path, &source, |v, source| {
        Ok(Ok(PreferencePair {
            prompt: string_field(v, "prompt")?.to_string(),
            chosen: string_field(v, "chosen")?.to_string(),
            rejected: string_field(v, "rejected")?.to_string(),
            source: source.to_string(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pairs_ignoring_extra_fields_and_reporting_bad_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mine.jsonl");
        std::fs::write(
            &path,
            "{\"prompt\": \"Say hi.\", \"chosen\": \" Hi!\", \"rejected\": \"No\", \"id\": 7}\n\
             {\"prompt\": \"x\", \"chosen\": \"y\"}\n",
        )
        .unwrap();
        let (pairs, report) = read_preference_jsonl(&path).unwrap();
        assert_eq!(
            pairs,
            [PreferencePair {
                prompt: "Say hi.".into(),
                chosen: " Hi!".into(),
                rejected: "No".into(),
                source: "mine.jsonl".into()
            }]
        );
        assert_eq!((report.lines, report.kept, report.malformed), (2, 1, 1));
        assert_eq!(report.malformed_lines[0].line, 2);
        assert!(report.malformed_lines[0].reason.contains("`rejected`"), "{report}");
    }
}
