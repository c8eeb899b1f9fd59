//! `ref-server score`: scores a JSONL file of `{"prompt","response"}` or
//! `{"prompt","chosen","rejected"}` lines, against a running server or a local model, and
//! writes each line back (extra fields kept, order kept) with the log-probs and token
//! counts added. Local scoring goes through the same [`Engine`] as the server.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use dpo_common::template::Template;
use dpo_proto::fleet::RefClient;
use dpo_proto::v1;
use serde_json::{Map, Value};

use crate::engine::Engine;

/// Where scores come from.
pub enum Scorer {
    /// A server; each request is retried through a restart of it, up to the client's
    /// patience (`--connect-timeout`).
    Remote(Box<RefClient>),
    Local(Arc<Engine>),
}

impl Scorer {
    /// Scores from the server `client` is connected to; pins its model, which a server
    /// coming back after a failure must still hold.
    pub async fn remote(client: RefClient) -> Result<Scorer> {
        client.model_info().await?;
        Ok(Scorer::Remote(Box::new(client)))
    }

    async fn score(&self, req: v1::ScoreRequest) -> Result<v1::ScoreResponse> {
        match self {
            Scorer::Remote(c) => {
                let what = format!("scoring {} lines", req.items.len());
                Ok(c.retrying(&what, |c| {
                    let req = req.clone();
                    async move { c.score(req).await }
                })
                .await?)
            }
            Scorer::Local(e) => Ok(e.score(req).await?),
        }
    }
}

/// One input line, parsed.
struct Line {
    fields: Map<String, Value>,
    pair: bool,
}

fn parse_line(n: usize, text: &str) -> Result<Line> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| anyhow!("line {n}: not valid JSON: {e}"))?;
    let Value::Object(fields) = value else {
        bail!(
            "line {n}: expected a JSON object, got {}",
            text.chars().take(40).collect::<String>()
        );
    };
    let is_str = |k: &str| fields.get(k).map(Value::is_string);
    if is_str("prompt") != Some(true) {
        bail!("line {n}: needs a string field `prompt`");
    }
    let pair = match (is_str("response"), is_str("chosen"), is_str("rejected")) {
        (Some(true), None, None) => false,
        (None, Some(true), Some(true)) => true,
        _ => bail!(
            "line {n}: expected string fields `response`, or `chosen` and `rejected` (not both \
             forms)"
        ),
    };
    Ok(Line { fields, pair })
}

fn text_item(line: &Line, template: Template) -> v1::ScoreItem {
    let s = |k: &str| line.fields.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
    let responses = if line.pair { vec![s("chosen"), s("rejected")] } else { vec![s("response")] };
    v1::ScoreItem {
        input: Some(v1::score_item::Input::Text(v1::TextInput {
            prompt: s("prompt"),
            responses,
            template: match template {
                Template::Alpaca => v1::Template::Alpaca as i32,
                Template::Raw => v1::Template::Raw as i32,
            },
        })),
    }
}

fn read_input(input: &Path) -> Result<Vec<(usize, String)>> {
    let reader: Box<dyn BufRead> = if input == Path::new("-") {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(input)
                .with_context(|| format!("cannot open {}", input.display()))?,
        ))
    };
    let mut lines = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        let line =
            line.with_context(|| format!("reading line {} of {}", i + 1, input.display()))?;
        if !line.trim().is_empty() {
            lines.push((i + 1, line));
        }
    }
    Ok(lines)
}

pub struct ScoreOptions {
    pub input: PathBuf,
    pub output: PathBuf,
    pub template: Template,
    /// Input lines per request.
    pub batch_size: usize,
}

/// Scores every line; returns how many were scored.
pub async fn run(scorer: &Scorer, opts: &ScoreOptions) -> Result<usize> {
    let raw = read_input(&opts.input)?;
    let lines: Vec<Line> =
        raw.iter().map(|(n, text)| parse_line(*n, text)).collect::<Result<_>>()?;
    let mut out: Box<dyn Write> = if opts.output == Path::new("-") {
        Box::new(std::io::BufWriter::new(std::io::stdout().lock()))
    } else {
        Box::new(std::io::BufWriter::new(
            std::fs::File::create(&opts.output)
                .with_context(|| format!("cannot create {}", opts.output.display()))?,
        ))
    };
    let progress = indicatif::ProgressBar::new(lines.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} lines ({per_sec}, eta {eta})",
        )
        .expect("valid progress template")
        .progress_chars("=> "),
    );
    if lines.len() < 2 * opts.batch_size.max(1) {
        progress.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let batch_size = opts.batch_size.max(1);
    for (chunk_no, chunk) in lines.chunks(batch_size).enumerate() {
        let first = chunk_no * batch_size;
        let (from, to) = (raw[first].0, raw[first + chunk.len() - 1].0);
        let items = chunk.iter().map(|l| text_item(l, opts.template)).collect();
        let resp = scorer
            .score(v1::ScoreRequest { items, per_token: false, request_id: chunk_no as u64 })
            .await
            .with_context(|| format!("scoring lines {from}-{to}"))?;
        if resp.items.len() != chunk.len() {
            bail!("lines {from}-{to}: {} scores for {} lines", resp.items.len(), chunk.len());
        }
        for (line, item) in chunk.iter().zip(&resp.items) {
            let mut fields = line.fields.clone();
            let r = &item.responses;
            if line.pair {
                fields.insert("chosen_logprob".into(), r[0].logprob.into());
                fields.insert("chosen_tokens".into(), r[0].tokens.into());
                fields.insert("rejected_logprob".into(), r[1].logprob.into());
                fields.insert("rejected_tokens".into(), r[1].tokens.into());
            } else {
                fields.insert("logprob".into(), r[0].logprob.into());
                fields.insert("tokens".into(), r[0].tokens.into());
            }
            serde_json::to_writer(&mut out, &Value::Object(fields)).context("writing output")?;
            out.write_all(b"\n").context("writing output")?;
        }
        progress.inc(chunk.len() as u64);
    }
    out.flush().context("writing output")?;
    progress.finish_and_clear();
    Ok(lines.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_lines_name_their_number() {
        assert!(parse_line(3, "{")
            .err()
            .unwrap()
            .to_string()
            .starts_with("line 3: not valid JSON"));
        assert!(parse_line(4, "[1]").err().unwrap().to_string().contains("line 4"));
        let e = parse_line(5, r#"{"prompt":"p","response":"r","chosen":"c"}"#).err().unwrap();
        assert!(e.to_string().contains("line 5"));
        assert!(parse_line(6, r#"{"response":"r"}"#).err().unwrap().to_string().contains("prompt"));
        assert!(!parse_line(1, r#"{"prompt":"p","response":""}"#).unwrap().pair);
        assert!(parse_line(1, r#"{"prompt":"p","chosen":"a","rejected":"b","x":1}"#).unwrap().pair);
    }
}
