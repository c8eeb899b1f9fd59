//! A small RFC 4180 CSV reader: quoted fields, `""` escapes, commas and newlines inside
//! quotes, CRLF or LF line ends. Enough for MMLU and SimpleSafetyTests files without
//! another dependency.

use anyhow::{bail, Result};

/// Every record of `text`, each a list of fields. A blank line is no record.
pub fn parse(text: &str) -> Result<Vec<Vec<String>>> {
    let mut records = Vec::new();
    let mut record = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    let mut in_quotes = false;
    let mut quoted = false; // the current field was quoted
    while let Some(c) = chars.next() {
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                '\n' => {
                    line += 1;
                    field.push(c);
                }
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' if field.is_empty() && !quoted => {
                in_quotes = true;
                quoted = true;
            }
            '"' => bail!("line {line}: a quote inside an unquoted field"),
            ',' => {
                record.push(std::mem::take(&mut field));
                quoted = false;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                line += 1;
                if !(record.is_empty() && field.is_empty() && !quoted) {
                    record.push(std::mem::take(&mut field));
                    records.push(std::mem::take(&mut record));
                }
                quoted = false;
            }
            _ if quoted => bail!("line {line}: text after a closing quote"),
            _ => field.push(c),
        }
    }
    if in_quotes {
        bail!("line {line}: a quoted field is never closed");
    }
    if !(record.is_empty() && field.is_empty() && !quoted) {
        record.push(field);
        records.push(record);
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escapes_and_line_ends() {
        let text = "a,\"b, c\",\"say \"\"hi\"\"\"\r\n\nx,\"multi\nline\",\n";
        let r = parse(text).unwrap();
        assert_eq!(r, vec![vec!["a", "b, c", "say \"hi\""], vec!["x", "multi\nline", ""]]);
        assert_eq!(parse("a,b").unwrap(), vec![vec!["a", "b"]]);
        assert!(parse("\"open").is_err());
        assert!(parse("\"a\"b,c").is_err());
    }
}
