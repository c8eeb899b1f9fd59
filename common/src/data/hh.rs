//! Anthropic HH (`hh-rlhf`) conversations. Only single-turn conversations are used for DPO:
//! exactly one `\n\nHuman:` and one `\n\nAssistant:` turn in both the chosen and the
//! rejected text.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::error::{Error, Result};

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// A single-turn preference pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub instruction: String,
    pub chosen: String,
    pub rejected: String,
}

fn single_turn(text: &str) -> Option<(&str, &str)> {
    if text.matches(HUMAN).count() != 1 || text.matches(ASSISTANT).count() != 1 {
        return None;
    }
    let after_human = text.split_once(HUMAN)?.1;
    let (instruction, response) = after_human.split_once(ASSISTANT)?;
    Some((instruction.trim(), response.trim()))
}

/// The pair, when both sides are single-turn conversations.
pub fn parse_single_turn(chosen: &str, rejected: &str) -> Option<Pair> {
    let (instruction, c) = single_turn(chosen)?;
    let (_, r) = single_turn(rejected)?;
    Some(Pair { instruction: instruction.into(), chosen: c.into(), rejected: r.into() })
}

/// The lines of a `.jsonl` or `.jsonl.gz` file.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let reader: Box<dyn Read> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else {
        Box::new(file)
    };
    BufReader::new(reader).lines().collect::<std::io::Result<_>>().map_err(|e| Error::file(path, e))
}

/// The single-turn pairs of an HH file, in file order, with the number of lines skipped
/// because they were multi-turn. A line that is not an HH record is an error naming it.
pub fn read_single_turn(path: &Path) -> Result<(Vec<Pair>, usize)> {
    let mut pairs = Vec::new();
    let mut multi_turn = 0;
    for (i, line) in read_lines(path)?.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(line)
            .map_err(|e| Error::file(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        let field = |k: &str| {
            v.get(k).and_then(|x| x.as_str()).ok_or_else(|| {
                Error::file(path, format!("line {}: missing string field `{k}`", i + 1))
            })
        };
        match parse_single_turn(field("chosen")?, field("rejected")?) {
            Some(p) => pairs.push(p),
            None => multi_turn += 1,
        }
    }
    Ok((pairs, multi_turn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_single_turn_conversation() {
        let p = parse_single_turn(
            "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water. ",
            "\n\nHuman: How do I bake bread?\n\nAssistant: No.",
        )
        .unwrap();
        assert_eq!(p.instruction, "How do I bake bread?");
        assert_eq!(p.chosen, "Mix flour and water.");
        assert_eq!(p.rejected, "No.");
        let two = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d";
        assert!(parse_single_turn(two, two).is_none());
    }

    #[test]
    fn harmless_base_test_has_661_single_turn_pairs() {
        let path = crate::testing::shared_data().join("hh/harmless-base/test.jsonl.gz");
        let (pairs, multi) = read_single_turn(&path).unwrap();
        assert_eq!(pairs.len(), 661);
        assert_eq!(pairs.len() + multi, 2312);
    }
}
