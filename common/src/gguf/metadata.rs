//! Typed access to a GGUF file's key/value metadata. Both readers of a GGUF header — the
//! model config (`llama.*`) and the tokenizer (`tokenizer.ggml.*`) — go through
//! [`Metadata`], so each value kind is parsed one way and every error names its key.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, Value};

use crate::error::{Error, Result};

/// A GGUF file's metadata, read with typed accessors. `get_*` return `Ok(None)` for an
/// absent key and an error for a present key of the wrong kind; `require_*` also fail when
/// the key is absent.
#[derive(Clone, Copy)]
pub struct Metadata<'a> {
    values: &'a HashMap<String, Value>,
    /// Wraps a problem into the error of the reader's concern ([`Error::Config`] for the
    /// model's hyper-parameters, [`Error::Tokenizer`] for the tokenizer), so a caller sees
    /// which part of the model the bad key belongs to.
    error: fn(String) -> Error,
}

impl<'a> Metadata<'a> {
    pub fn new(content: &'a Content, error: fn(String) -> Error) -> Self {
        Metadata { values: &content.metadata, error }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.values.contains_key(key)
    }

    fn problem(&self, key: &str, what: impl std::fmt::Display) -> Error {
        (self.error)(format!("GGUF metadata `{key}` {what}"))
    }

    fn element_problem(&self, key: &str, index: usize, what: impl std::fmt::Display) -> Error {
        (self.error)(format!("GGUF metadata `{key}`[{index}] {what}"))
    }

    fn missing(&self, key: &str) -> Error {
        self.problem(key, "is missing")
    }

    /// A non-negative integer of any GGUF integer type.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>> {
        let Some(v) = self.values.get(key) else { return Ok(None) };
        if let Value::Array(_) = v {
            // llama.cpp writes per-layer hyper-parameters (e.g. head counts) as arrays.
            return Err(Error::Unsupported(format!(
                "GGUF metadata `{key}` is a per-layer array; only one value for all layers is supported"
            )));
        }
        integer(v)
            .and_then(|n| usize::try_from(n).ok())
            .map(Some)
            .ok_or_else(|| self.problem(key, "is not a non-negative integer"))
    }

    pub fn require_usize(&self, key: &str) -> Result<usize> {
        self.get_usize(key)?.ok_or_else(|| self.missing(key))
    }

    /// A float stored as F32 or F64.
    pub fn get_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(_) => Err(self.problem(key, "is not a float")),
        }
    }

    pub fn require_f64(&self, key: &str) -> Result<f64> {
        self.get_f64(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => v.to_bool().map(Some).map_err(|_| self.problem(key, "is not a bool")),
        }
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_string()
                .map(|s| Some(s.as_str()))
                .map_err(|_| self.problem(key, "is not a string")),
        }
    }

    pub fn require_str(&self, key: &str) -> Result<&'a str> {
        self.get_str(key)?.ok_or_else(|| self.missing(key))
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&'a [Value]>> {
        match self.values.get(key) {
            None => Ok(None),
            Some(v) => v
                .to_vec()
                .map(|a| Some(a.as_slice()))
                .map_err(|_| self.problem(key, "is not an array")),
        }
    }

    pub fn require_array(&self, key: &str) -> Result<&'a [Value]> {
        self.get_array(key)?.ok_or_else(|| self.missing(key))
    }

    /// An array whose every element is a string.
    pub fn require_strings(&self, key: &str) -> Result<Vec<String>> {
        self.require_array(key)?
            .iter()
            .enumerate()
            .map(|(i, x)| {
                x.to_string().cloned().map_err(|_| self.element_problem(key, i, "is not a string"))
            })
            .collect()
    }

    /// An array whose every element is an integer (of any sign).
    pub fn get_integers(&self, key: &str) -> Result<Option<Vec<i128>>> {
        let Some(values) = self.get_array(key)? else { return Ok(None) };
        values
            .iter()
            .enumerate()
            .map(|(i, x)| {
                integer(x).ok_or_else(|| {
                    self.element_problem(
                        key,
                        i,
                        format!("is not an integer (found {:?})", x.value_type()),
                    )
                })
            })
            .collect::<Result<_>>()
            .map(Some)
    }

    /// A token id, which must lie inside a `vocab_size`-token vocabulary.
    pub fn get_token_id(&self, key: &str, vocab_size: usize) -> Result<Option<u32>> {
        let Some(v) = self.values.get(key) else { return Ok(None) };
        let id = integer(v).ok_or_else(|| {
            self.problem(key, format!("is not an integer (found {:?})", v.value_type()))
        })?;
        usize::try_from(id)
            .ok()
            .filter(|&i| i < vocab_size)
            .and_then(|i| u32::try_from(i).ok())
            .map(Some)
            .ok_or_else(|| {
                self.problem(key, format!("= {id} is outside the {vocab_size}-token vocabulary"))
            })
    }

    pub fn require_token_id(&self, key: &str, vocab_size: usize) -> Result<u32> {
        self.get_token_id(key, vocab_size)?.ok_or_else(|| self.missing(key))
    }
}

/// The value of any GGUF integer type (`i128` holds every one of them exactly).
fn integer(v: &Value) -> Option<i128> {
    Some(match v {
        Value::U8(x) => *x as i128,
        Value::I8(x) => *x as i128,
        Value::U16(x) => *x as i128,
        Value::I16(x) => *x as i128,
        Value::U32(x) => *x as i128,
        Value::I32(x) => *x as i128,
        Value::U64(x) => *x as i128,
        Value::I64(x) => *x as i128,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::gguf_file::VersionedMagic;

    fn content(values: Vec<(&str, Value)>) -> Content {
        Content {
            magic: VersionedMagic::GgufV3,
            metadata: values.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensor_infos: HashMap::new(),
            tensor_data_offset: 0,
        }
    }

    #[test]
    fn integers_of_every_width_and_errors_naming_the_key() {
        let c = content(vec![
            ("a", Value::U8(3)),
            ("b", Value::I64(7)),
            ("neg", Value::I32(-1)),
            ("s", Value::String("x".into())),
            ("layers", Value::Array(vec![Value::U32(1), Value::U32(2)])),
            ("big", Value::U64(u64::MAX)),
        ]);
        let md = Metadata::new(&c, Error::Config);
        assert_eq!(md.get_usize("a").unwrap(), Some(3));
        assert_eq!(md.require_usize("b").unwrap(), 7);
        assert_eq!(md.get_usize("absent").unwrap(), None);
        for key in ["neg", "s", "absent"] {
            let e = md.require_usize(key).unwrap_err();
            assert!(matches!(e, Error::Config(_)) && e.to_string().contains(key), "{e}");
        }
        assert!(matches!(md.get_usize("layers"), Err(Error::Unsupported(_))));
        assert_eq!(md.get_integers("layers").unwrap(), Some(vec![1, 2]));
        let e = md.get_token_id("big", 10).unwrap_err();
        assert!(e.to_string().contains("big") && e.to_string().contains("outside"), "{e}");
    }

    #[test]
    fn token_ids_are_range_checked() {
        let c = content(vec![("eos", Value::U32(2)), ("bos", Value::I32(-1))]);
        let md = Metadata::new(&c, Error::Tokenizer);
        assert_eq!(md.require_token_id("eos", 3).unwrap(), 2);
        let e = md.require_token_id("eos", 2).unwrap_err();
        assert!(matches!(e, Error::Tokenizer(_)) && e.to_string().contains("eos"), "{e}");
        assert!(md.get_token_id("bos", 3).is_err());
        assert_eq!(md.get_token_id("pad", 3).unwrap(), None);
    }

    #[test]
    fn strings_floats_and_bools() {
        let c = content(vec![
            ("s", Value::String("gpt2".into())),
            ("f", Value::F32(0.5)),
            ("t", Value::Bool(true)),
            ("list", Value::Array(vec![Value::String("a".into()), Value::U8(1)])),
        ]);
        let md = Metadata::new(&c, Error::Tokenizer);
        assert_eq!(md.require_str("s").unwrap(), "gpt2");
        assert_eq!(md.require_f64("f").unwrap(), 0.5);
        assert_eq!(md.get_bool("t").unwrap(), Some(true));
        assert!(md.get_bool("s").is_err() && md.get_f64("s").is_err() && md.get_str("f").is_err());
        let e = md.require_strings("list").unwrap_err();
        assert!(e.to_string().contains("list`[1]"), "{e}");
    }
}
