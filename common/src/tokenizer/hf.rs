//! A [`LlamaTokenizer`] and Hugging Face files: reading a model directory (`tokenizer.json`
//! plus `tokenizer_config.json` / `special_tokens_map.json`, mirroring how transformers 5's
//! `TokenizersBackend` reads them) and writing those files back so that both this module and
//! transformers read an identical tokenizer.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use tokenizers::Tokenizer;

use super::{add_missing_specials, observe_specials, template_processor, tok_err, LlamaTokenizer};
use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;

impl LlamaTokenizer {
    /// From a Hugging Face dir: `tokenizer.json` (required) plus `tokenizer_config.json` /
    /// `special_tokens_map.json` when present. EOS is the tokenizer's `eos_token` when named
    /// (Llama 3.1 Instruct: `<|eot_id|>`), else `config.eos_token_ids[0]`; BOS likewise.
    /// Whether BOS/EOS are added is what tokenizer.json's post-processor does, unless
    /// tokenizer_config.json sets `add_bos_token`/`add_eos_token` to something else, in which
    /// case the post-processor is rebuilt from those flags as transformers 5 does.
    pub fn from_hf_dir(dir: &Path, config: &LlamaConfig) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        let mut inner = read_tokenizer_json(&tok_path)?;
        let settings = TokenizerSettings::read(dir)?;

        let resolve = |key: &str, fallback: Option<u32>| {
            resolve_special(&inner, &settings, key, fallback, &tok_path)
        };
        let (eos_id, eos_token) = resolve("eos_token", config.eos_token_ids.first().copied())?
            .ok_or_else(|| {
                Error::file(
                    dir,
                    "no EOS token: neither tokenizer_config.json nor config.json names one",
                )
            })?;
        let bos = resolve("bos_token", config.bos_token_id)?;
        let unk_token = settings.name_of("unk_token").map(|(n, _)| n);
        let pad_token = settings.name_of("pad_token").map(|(n, _)| n);

        // transformers adds every named special token the added vocabulary lacks as a special
        // token, which changes how text containing it is split; do the same so ids agree.
        // (A name missing from the vocabulary entirely it appends as a new id beyond the
        // model's embeddings; that we do not copy.)
        let named: Vec<&str> = [Some(eos_token.as_str()), bos.as_ref().map(|(_, n)| n.as_str())]
            .into_iter()
            .chain([unk_token.as_deref(), pad_token.as_deref()])
            .flatten()
            .filter(|n| inner.token_to_id(n).is_some())
            .collect();
        add_missing_specials(&mut inner, &named)?;
        follow_add_flags(&mut inner, &settings, bos.as_ref(), (eos_id, &eos_token))?;

        let (bos_id, bos_token) = bos.unzip();
        let mut t = Self::assemble(inner, bos_id, bos_token, eos_id, eos_token)?;
        t.unk_token = unk_token;
        t.pad_token = pad_token;
        t.model_max_length =
            settings.model_max_length().or(Some(config.max_position_embeddings as u64));
        t.chat_template = settings.chat_template();
        Ok(t)
    }

    /// Writes `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` into
    /// `dir` so that [`Self::from_hf_dir`] reads back an identical tokenizer and
    /// transformers' `AutoTokenizer.from_pretrained(dir)` (4.x and 5.x) tokenizes identically.
    pub fn save_hf(&self, dir: &Path) -> Result<()> {
        let tok_json = self.inner.to_string(true).map_err(|e| tok_err("serializing", e))?;
        write(&dir.join("tokenizer.json"), tok_json.as_bytes())?;

        let mut specials = serde_json::Map::new();
        let mut put = |key: &str, v: &Option<String>| {
            if let Some(v) = v {
                specials.insert(key.to_string(), json!(v));
            }
        };
        put("bos_token", &self.bos_token);
        put("eos_token", &Some(self.eos_token.clone()));
        put("unk_token", &self.unk_token);
        put("pad_token", &self.pad_token);

        let mut cfg = specials.clone();
        cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
        // Decoding in transformers then matches `decode` here (4.x would otherwise strip
        // spaces before punctuation).
        cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
        if self.specials.expressible {
            // transformers 5 rebuilds the post-processor from these; they describe exactly
            // what tokenizer.json's does, so the ids stay the same.
            cfg.insert("add_bos_token".into(), json!(self.specials.add_bos));
            cfg.insert("add_eos_token".into(), json!(self.specials.add_eos));
        }
        if let Some(n) = self.model_max_length {
            cfg.insert("model_max_length".into(), json!(n));
        }
        if let Some(t) = &self.chat_template {
            cfg.insert("chat_template".into(), json!(t));
        }
        write(&dir.join("tokenizer_config.json"), &pretty(&Value::Object(cfg))?)?;
        write(&dir.join("special_tokens_map.json"), &pretty(&Value::Object(specials))?)?;
        Ok(())
    }
}

fn read_tokenizer_json(path: &Path) -> Result<Tokenizer> {
    if !path.is_file() {
        return Err(Error::file(
            path,
            "missing: the model directory needs a tokenizers-format tokenizer.json \
             (a sentencepiece tokenizer.model alone is not supported)",
        ));
    }
    Tokenizer::from_file(path)
        .map_err(|e| Error::file(path, format!("not a valid tokenizer.json: {e}")))
}

/// What a model directory says about its tokenizer beside `tokenizer.json`.
struct TokenizerSettings {
    dir: PathBuf,
    config: Option<Value>,
    config_path: PathBuf,
    special_map: Option<Value>,
    map_path: PathBuf,
}

impl TokenizerSettings {
    fn read(dir: &Path) -> Result<Self> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        let map_path = dir.join("special_tokens_map.json");
        let special_map = read_optional_json(&map_path)?;
        Ok(TokenizerSettings { dir: dir.to_path_buf(), config, config_path, special_map, map_path })
    }

    fn config_value(&self, key: &str) -> Option<&Value> {
        self.config.as_ref().and_then(|c| c.get(key))
    }

    /// The special token named by `key`, with the file that names it.
    fn name_of(&self, key: &str) -> Option<(String, &Path)> {
        // transformers 5 reads special_tokens_map.json only for configs without
        // `added_tokens_decoder` (the "legacy" layout), and then lets it override the config.
        let legacy = self.config.as_ref().is_none_or(|c| c.get("added_tokens_decoder").is_none());
        let from_map = self
            .special_map
            .as_ref()
            .filter(|_| legacy)
            .and_then(|m| token_name(m.get(key)))
            .map(|n| (n, self.map_path.as_path()));
        from_map
            .or_else(|| token_name(self.config_value(key)).map(|n| (n, self.config_path.as_path())))
    }

    fn flag(&self, key: &str) -> Option<bool> {
        self.config_value(key).and_then(Value::as_bool)
    }

    fn model_max_length(&self) -> Option<u64> {
        self.config_value("model_max_length").and_then(Value::as_u64)
    }

    fn chat_template(&self) -> Option<String> {
        self.config_value("chat_template")
            .and_then(Value::as_str)
            .map(str::to_string)
            .or_else(|| std::fs::read_to_string(self.dir.join("chat_template.jinja")).ok())
    }
}

/// The id and name of the special token `key`: by name from the settings, else by the id
/// `fallback` from config.json.
fn resolve_special(
    inner: &Tokenizer,
    settings: &TokenizerSettings,
    key: &str,
    fallback: Option<u32>,
    tok_path: &Path,
) -> Result<Option<(u32, String)>> {
    if let Some((name, file)) = settings.name_of(key) {
        let id = inner.token_to_id(&name).ok_or_else(|| {
            Error::file(file, format!("{key} `{name}` is not in tokenizer.json's vocabulary"))
        })?;
        return Ok(Some((id, name)));
    }
    let Some(id) = fallback else { return Ok(None) };
    let name = inner.id_to_token(id).ok_or_else(|| {
        Error::Config(format!(
            "{key} id {id} from config.json is outside the tokenizer's vocabulary \
             ({} tokens in {})",
            inner.get_vocab_size(true),
            tok_path.display()
        ))
    })?;
    Ok(Some((id, name)))
}

/// Rebuilds the post-processor from `add_bos_token`/`add_eos_token` when they ask for
/// something other than what tokenizer.json's post-processor does.
fn follow_add_flags(
    inner: &mut Tokenizer,
    settings: &TokenizerSettings,
    bos: Option<&(u32, String)>,
    eos: (u32, &str),
) -> Result<()> {
    let (want_bos, want_eos) = (settings.flag("add_bos_token"), settings.flag("add_eos_token"));
    if want_bos.is_none() && want_eos.is_none() {
        return Ok(());
    }
    let observed = observe_specials(inner, bos.map(|b| b.0), eos.0)?;
    // transformers 5 rebuilds the post-processor whenever either flag is given; we only
    // do so when that changes behaviour, so a tokenizer we saved reads back identical.
    let add_bos = want_bos.unwrap_or(false) && bos.is_some();
    let add_eos = want_eos.unwrap_or(false);
    if (add_bos, add_eos) != (observed.add_bos, observed.add_eos) || !observed.expressible {
        tracing::warn!(
            "{}: add_bos_token/add_eos_token ({add_bos}/{add_eos}) override what \
             tokenizer.json's post-processor does; following them as transformers 5 does",
            settings.config_path.display()
        );
        let bos = bos.map(|(i, n)| (*i, n.as_str()));
        inner.with_post_processor(Some(template_processor(bos, eos, add_bos, add_eos)?));
    }
    Ok(())
}

/// A special token's name as tokenizer_config.json / special_tokens_map.json write it: a
/// string, or an AddedToken object with `content`.
fn token_name(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

fn read_optional_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| Error::file(path, format!("invalid JSON: {e}")))
}

fn pretty(v: &Value) -> Result<Vec<u8>> {
    serde_json::to_vec_pretty(v).map_err(|e| Error::Tokenizer(format!("serializing JSON: {e}")))
}

fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|e| Error::io(format!("writing {}", path.display()), e))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{id, tiny_config, tiny_gguf};
    use super::*;

    #[test]
    fn save_and_reload_is_identical() {
        for (pre, bos) in [("smollm", false), ("llama-bpe", true)] {
            let t = LlamaTokenizer::from_gguf(&tiny_gguf(pre, bos, vec![])).unwrap();
            let dir = tempfile::tempdir().unwrap();
            t.save_hf(dir.path()).unwrap();
            let cfg = tiny_config(vec![7]);
            let back = LlamaTokenizer::from_hf_dir(dir.path(), &cfg).unwrap();
            assert_eq!(back.eos_id(), 2, "eos comes from tokenizer_config, not config.json");
            assert_eq!(back.bos_id(), Some(1));
            assert_eq!(back.adds_bos(), bos);
            assert_eq!(back.fingerprint_bytes().unwrap(), t.fingerprint_bytes().unwrap());
            for s in ["hello world 12", "</s> x", ""] {
                assert_eq!(back.encode_prompt(s).unwrap(), t.encode_prompt(s).unwrap());
            }
            assert_eq!(back.model_max_length, Some(4096));
        }
    }

    #[test]
    fn hf_dir_eos_rules() {
        let t = LlamaTokenizer::from_gguf(&tiny_gguf("gpt2", false, vec![])).unwrap();
        let dir = tempfile::tempdir().unwrap();
        t.inner().save(dir.path().join("tokenizer.json"), false).unwrap();

        // No tokenizer_config.json: EOS is config.json's first id, BOS config.json's.
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0, 2])).unwrap();
        assert_eq!((back.eos_id(), back.bos_id()), (0, Some(1)));

        // eos_token as an AddedToken object overrides config.json.
        let cfg = json!({"eos_token": {"content": "</s>", "special": true}});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap();
        assert_eq!(back.eos_id(), 2);

        // special_tokens_map.json wins over a legacy tokenizer_config.json, as in transformers.
        let map = json!({"eos_token": "<|endoftext|>"});
        std::fs::write(dir.path().join("special_tokens_map.json"), map.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![2])).unwrap();
        assert_eq!(back.eos_id(), 0);

        // An explicit add_bos_token that tokenizer.json does not do is followed.
        let cfg = json!({"eos_token": "</s>", "bos_token": "<s>", "add_bos_token": true,
                         "added_tokens_decoder": {}});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let back = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap();
        assert!(back.adds_bos());
        assert_eq!(back.encode_prompt("hello").unwrap(), vec![1, id(&back, "hello")]);

        // A named token that the vocabulary lacks is an error naming the file.
        let cfg = json!({"eos_token": "<nope>"});
        std::fs::write(dir.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
        std::fs::remove_file(dir.path().join("special_tokens_map.json")).unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(
            e.to_string().contains("tokenizer_config.json") && e.to_string().contains("<nope>"),
            "{e}"
        );
    }

    #[test]
    fn missing_tokenizer_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
        std::fs::write(dir.path().join("tokenizer.json"), "{not json").unwrap();
        let e = LlamaTokenizer::from_hf_dir(dir.path(), &tiny_config(vec![0])).unwrap_err();
        assert!(e.to_string().contains("tokenizer.json"), "{e}");
    }
}
