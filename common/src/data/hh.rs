//! Anthropic HH (`hh-rlhf`) preference data, read from the original files.
//!
//! Layout: `DIR/{subset}/{split}.jsonl.gz` (or `.jsonl`) as the dataset ships, for the four
//! training subsets [`HH_SUBSETS`]; for the train split the flat `DIR/{subset}.jsonl.gz` (or
//! `.jsonl`) that course copies use is accepted too. Each line is `{"chosen", "rejected"}`,
//! both full conversations.
//!
//! Only single-turn conversations are used for DPO: exactly one `\n\nHuman:` and one
//! `\n\nAssistant:` turn in both the chosen and the rejected text, with the same human turn in
//! both. The human turn becomes the prompt, the assistant turns the responses (all stripped).

use std::path::{Path, PathBuf};

use super::jsonl::{read_records, string_field, DropReason, LoadReport};
use super::PreferencePair;
use crate::error::{Error, Result};

const HUMAN: &str = "\n\nHuman:";
const ASSISTANT: &str = "\n\nAssistant:";

/// The four HH subsets with helpfulness/harmlessness preferences (the red-team data has
/// another format and is not preference data).
pub const HH_SUBSETS: [&str; 4] =
    ["harmless-base", "helpful-base", "helpful-online", "helpful-rejection-sampled"];

/// The HH splits.
pub const HH_SPLITS: [&str; 2] = ["train", "test"];

/// (human turn, assistant turn), both stripped, of a single-turn conversation.
fn single_turn(text: &str) -> Option<(&str, &str)> {
    if text.matches(HUMAN).count() != 1 || text.matches(ASSISTANT).count() != 1 {
        return None;
    }
    let after_human = text.split_once(HUMAN)?.1;
    let (instruction, response) = after_human.split_once(ASSISTANT)?;
    Some((instruction.trim(), response.trim()))
}

/// The pair a chosen/rejected conversation pair makes, or why it is not used.
pub fn parse_single_turn(
    chosen: &str,
    rejected: &str,
    source: &str,
) -> std::result::Result<PreferencePair, DropReason> {
    let (prompt, c) = single_turn(chosen).ok_or(DropReason::MultiTurn)?;
    let (prompt_r, r) = single_turn(rejected).ok_or(DropReason::MultiTurn)?;
    if prompt != prompt_r {
        return Err(DropReason::PromptMismatch);
    }
    Ok(PreferencePair {
        prompt: prompt.into(),
        chosen: c.into(),
        rejected: r.into(),
        source: source.into(),
    })
}

/// The single-turn pairs of one HH file, in file order, each with `source` (the subset name),
/// and the account of every line.
pub fn read_hh_file(path: &Path, source: &str) -> Result<(Vec<PreferencePair>, LoadReport)> {
    read_records(path, source, |v, source| {
        Ok(parse_single_turn(string_field(v, "chosen")?, string_field(v, "rejected")?, source))
    })
}

/// The files that may hold `subset`'s `split`, in the order they are tried.
pub fn hh_candidates(dir: &Path, subset: &str, split: &str) -> Vec<PathBuf> {
    let mut out = vec![
        dir.join(subset).join(format!("{split}.jsonl.gz")),
        dir.join(subset).join(format!("{split}.jsonl")),
    ];
    if split == "train" {
        out.push(dir.join(format!("{subset}.jsonl.gz")));
        out.push(dir.join(format!("{subset}.jsonl")));
    }
    out
}

/// The single-turn pairs of `split` (`train` or `test`) of the listed HH `subsets` under
/// `dir`, combined in the order listed (file order within each), with one report per file.
/// An empty `subsets` means all of [`HH_SUBSETS`]. Every subset asked for must be present: a
/// missing one is an error naming the files looked for, never a smaller data set.
pub fn read_hh_dir<S: AsRef<str>>(
    dir: &Path,
    split: &str,
    subsets: &[S],
) -> Result<(Vec<PreferencePair>, Vec<LoadReport>)> {
    if !HH_SPLITS.contains(&split) {
        return Err(Error::Input(format!("unknown HH split `{split}` (train or test)")));
    }
    let subsets: Vec<&str> = if subsets.is_empty() {
        HH_SUBSETS.to_vec()
    } else {
        subsets.iter().map(AsRef::as_ref).collect()
    };
    for (i, s) in subsets.iter().enumerate() {
        if !HH_SUBSETS.contains(s) {
            return Err(Error::Input(format!(
                "unknown HH subset `{s}` (known: {})",
                HH_SUBSETS.join(", ")
            )));
        }
        if subsets[..i].contains(s) {
            return Err(Error::Input(format!("HH subset `{s}` is listed twice")));
        }
    }

    let mut files = Vec::new();
    let mut missing = Vec::new();
    for s in &subsets {
        let candidates = hh_candidates(dir, s, split);
        match candidates.iter().find(|p| p.is_file()) {
            Some(p) => files.push((*s, p.clone())),
            None => missing.push(format!(
                "{s} (looked for {})",
                candidates.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            )),
        }
    }
    if !missing.is_empty() {
        return Err(Error::file(
            dir,
            format!(
                "no HH {split} file for {}; list only the subsets you have",
                missing.join("; ")
            ),
        ));
    }

    let mut pairs = Vec::new();
    let mut reports = Vec::new();
    for (subset, path) in files {
        let (p, r) = read_hh_file(&path, subset)?;
        pairs.extend(p);
        reports.push(r);
    }
    if pairs.is_empty() {
        return Err(Error::file(
            dir,
            format!("no single-turn pairs in HH {split} of {}", subsets.join(", ")),
        ));
    }
    Ok((pairs, reports))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_a_single_turn_conversation() {
        let p = parse_single_turn(
            "\n\nHuman: How do I bake bread?\n\nAssistant: Mix flour and water. ",
            "\n\nHuman: How do I bake bread?\n\nAssistant: No.",
            "helpful-base",
        )
        .unwrap();
        assert_eq!(p.prompt, "How do I bake bread?");
        assert_eq!(p.chosen, "Mix flour and water.");
        assert_eq!(p.rejected, "No.");
        assert_eq!(p.source, "helpful-base");
        let two = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d";
        let one = "\n\nHuman: a\n\nAssistant: b";
        assert_eq!(parse_single_turn(two, two, "x"), Err(DropReason::MultiTurn));
        assert_eq!(parse_single_turn(one, two, "x"), Err(DropReason::MultiTurn));
        assert_eq!(parse_single_turn(two, one, "x"), Err(DropReason::MultiTurn));
        let other = "\n\nHuman: z\n\nAssistant: b";
        assert_eq!(parse_single_turn(one, other, "x"), Err(DropReason::PromptMismatch));
    }

    #[test]
    fn harmless_base_test_has_661_single_turn_pairs() {
        let dir = crate::testing::shared_data().join("hh");
        let (pairs, reports) = read_hh_dir(&dir, "test", &["harmless-base"]).unwrap();
        assert_eq!(pairs.len(), 661);
        let r = &reports[0];
        assert_eq!((r.lines, r.kept, r.malformed, r.blank), (2312, 661, 0, 0));
        assert_eq!(r.dropped(DropReason::MultiTurn), 2312 - 661);
        assert_eq!(r.dropped(DropReason::PromptMismatch), 0);
        assert!(pairs.iter().all(|p| p.source == "harmless-base"));
        assert!(r.to_string().starts_with("harmless-base ("), "{r}");
    }

    fn write_gz(path: &Path, text: &str) {
        use std::io::Write;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap();
    }

    fn record(prompt: &str, chosen: &str, rejected: &str) -> String {
        serde_json::json!({
            "chosen": format!("\n\nHuman: {prompt}\n\nAssistant: {chosen}"),
            "rejected": format!("\n\nHuman: {prompt}\n\nAssistant: {rejected}"),
        })
        .to_string()
            + "\n"
    }

    #[test]
    fn combines_subsets_in_both_layouts_and_names_missing_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_gz(&d.join("harmless-base/train.jsonl.gz"), &record("h", "a", "b"));
        std::fs::create_dir_all(d.join("helpful-base")).unwrap();
        std::fs::write(
            d.join("helpful-base/train.jsonl"),
            record("p1", "a", "b") + "not json\n" + &record("p2", "c", "d"),
        )
        .unwrap();
        write_gz(&d.join("helpful-online.jsonl.gz"), &record("o", "a", "b"));
        std::fs::write(d.join("helpful-rejection-sampled.jsonl"), record("r", "a", "b")).unwrap();

        let none: [&str; 0] = [];
        let (pairs, reports) = read_hh_dir(d, "train", &none).unwrap();
        let got: Vec<(&str, &str)> =
            pairs.iter().map(|p| (p.source.as_str(), p.prompt.as_str())).collect();
        assert_eq!(
            got,
            [
                ("harmless-base", "h"),
                ("helpful-base", "p1"),
                ("helpful-base", "p2"),
                ("helpful-online", "o"),
                ("helpful-rejection-sampled", "r")
            ]
        );
        assert_eq!(reports.len(), 4);
        assert_eq!(reports[1].malformed_lines[0].line, 2);

        // The test split has no flat layout: all four are missing, and the error says where
        // it looked.
        let e = read_hh_dir(d, "test", &none).unwrap_err().to_string();
        assert!(e.contains("harmless-base/test.jsonl.gz") && e.contains("helpful-online"), "{e}");
        // Asking only for what is there works.
        std::fs::create_dir_all(d.join("helpful-online")).unwrap();
        std::fs::write(d.join("helpful-online/test.jsonl"), record("t", "a", "b")).unwrap();
        let (pairs, _) = read_hh_dir(d, "test", &["helpful-online"]).unwrap();
        assert_eq!(pairs.len(), 1);

        let e = read_hh_dir(d, "train", &["red-team-attempts"]).unwrap_err().to_string();
        assert!(e.contains("unknown HH subset") && e.contains("helpful-base"), "{e}");
        let e = read_hh_dir(d, "valid", &none).unwrap_err().to_string();
        assert!(e.contains("unknown HH split"), "{e}");
        let e = read_hh_dir(d, "train", &["helpful-base", "helpful-base"]).unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }
}
