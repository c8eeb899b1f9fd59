//! Turning model outputs into answers: the last number of a GSM8K output, the gold number
//! after `####`, and the letter of an MMLU answer.

/// Every number in `text` (`-1,234.5`, `$18`, `0.5`), in order, thousands separators removed.
fn numbers(text: &str) -> Vec<f64> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let start = i;
            // A minus is a sign only where it cannot be subtraction ("3-4" is 4, "is -3" is -3).
            let neg = start > 0
                && b[start - 1] == b'-'
                && (start == 1 || !b[start - 2].is_ascii_alphanumeric());
            let mut s = String::new();
            while i < b.len() {
                let c = b[i];
                let next_digit = i + 1 < b.len() && b[i + 1].is_ascii_digit();
                if c.is_ascii_digit() {
                    s.push(c as char);
                } else if c == b',' && next_digit && !s.contains('.') {
                    // thousands separator: skip
                } else if c == b'.' && next_digit && !s.contains('.') {
                    s.push('.');
                } else {
                    break;
                }
                i += 1;
            }
            if let Ok(v) = s.parse::<f64>() {
                out.push(if neg { -v } else { v });
            }
        } else {
            i += 1;
        }
    }
    out
}

/// The last number of a generated answer (the course's GSM8K rule), if any.
pub fn last_number(text: &str) -> Option<f64> {
    numbers(text).pop()
}

/// The gold answer of a GSM8K record: the number after the last `####`.
pub fn gold_number(answer: &str) -> Option<f64> {
    let tail = answer.rsplit_once("####")?.1;
    numbers(tail).into_iter().next()
}

/// Whether a parsed prediction equals the gold number (exact up to float noise).
pub fn numbers_match(pred: f64, gold: f64) -> bool {
    (pred - gold).abs() <= 1e-6 * gold.abs().max(1.0)
}

/// The letter an MMLU output picks: after "answer is" (the requested form "The correct
/// answer is B"), else an output that starts with the letter ("B", "B.", "(B)"). `None`
/// when neither is found.
pub fn mmlu_letter(text: &str) -> Option<char> {
    let lower = text.to_lowercase();
    if let Some(pos) = lower.find("answer is") {
        let rest = &text[pos + "answer is".len()..];
        let rest = rest.trim_start_matches(|c: char| c.is_whitespace() || c == ':' || c == '(');
        if let Some(c) = letter_at_start(rest) {
            return Some(c);
        }
    }
    letter_at_start(text.trim_start().trim_start_matches('('))
}

fn letter_at_start(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    let after = chars.next();
    let standalone = after.is_none_or(|a| !a.is_alphanumeric());
    (matches!(c, 'A'..='D') && standalone).then_some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gsm8k_numbers() {
        assert_eq!(last_number("She sold 15 clips."), Some(15.0));
        assert_eq!(last_number("48 + 24 = 72"), Some(72.0));
        assert_eq!(last_number("It costs $1,234.50 in all."), Some(1234.5));
        assert_eq!(last_number("The change is -3 degrees"), Some(-3.0));
        assert_eq!(last_number("pages 3-4"), Some(4.0));
        assert_eq!(last_number("no digits here"), None);
        assert_eq!(last_number("ends with 5."), Some(5.0));
        assert_eq!(last_number("1, 2, 3"), Some(3.0));
        assert_eq!(gold_number("9 * 2 = <<9*2=18>>18\n#### 18"), Some(18.0));
        assert_eq!(gold_number("#### 1,000"), Some(1000.0));
        assert_eq!(gold_number("no marker 5"), None);
        assert!(numbers_match(18.0, 18.0));
        assert!(!numbers_match(18.5, 18.0));
    }

    #[test]
    fn mmlu_letters() {
        assert_eq!(mmlu_letter("The correct answer is B"), Some('B'));
        assert_eq!(mmlu_letter("The correct answer is (C)."), Some('C'));
        assert_eq!(mmlu_letter("the answer is: D, because"), Some('D'));
        assert_eq!(mmlu_letter(" A. Paris"), Some('A'));
        assert_eq!(mmlu_letter("(B) the second"), Some('B'));
        assert_eq!(mmlu_letter("Because of reasons"), None);
        assert_eq!(mmlu_letter("Answer is E"), None);
        assert_eq!(mmlu_letter(""), None);
    }
}
