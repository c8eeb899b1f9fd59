//! Explains a GGUF file candle cannot read because a tensor uses a quantization it does
//! not know: candle's header reader names only the type number, so the header is walked
//! again here to find the tensor and name both.

use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::error::Error;

/// candle rejects a GGUF with a quantization it does not know while reading the header,
/// naming only the type number; find the tensor and name both.
pub(super) fn read_error(path: &Path, e: candle_core::Error) -> Error {
    let msg = e.to_string();
    if msg.contains("unknown dtype") {
        if let Ok(Some((tensor, ty))) = first_unsupported_tensor(path) {
            return Error::Unsupported(format!(
                "{}: tensor `{tensor}` is quantized as {} (ggml type {ty}), which candle cannot \
                 dequantize (supported: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1, \
                 Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K)",
                path.display(),
                ggml_type_name(ty)
            ));
        }
    }
    Error::file(path, format!("not a readable GGUF file: {msg}"))
}

fn ggml_type_name(ty: u32) -> String {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(ty as usize).map_or_else(|| format!("type {ty}"), |s| s.to_string())
}

/// Walks the GGUF header (skipping metadata) to the first tensor whose ggml type candle
/// does not know. Only used to explain a failed read, so any oddity just yields `None`.
fn first_unsupported_tensor(path: &Path) -> std::io::Result<Option<(String, u32)>> {
    const KNOWN: [u32; 15] = [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 30];
    let mut r = BufReader::new(File::open(path)?);
    let u32_ = |r: &mut BufReader<File>| -> std::io::Result<u32> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b)?;
        Ok(u32::from_le_bytes(b))
    };
    let u64_ = |r: &mut BufReader<File>| -> std::io::Result<u64> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b)?;
        Ok(u64::from_le_bytes(b))
    };
    if u32_(&mut r)? != 0x4655_4747 {
        return Ok(None);
    }
    let v1 = u32_(&mut r)? == 1;
    let len = |r: &mut BufReader<File>| if v1 { u32_(r).map(u64::from) } else { u64_(r) };
    let (n_tensors, n_kv) = (len(&mut r)?, len(&mut r)?);
    fn skip_value(
        r: &mut BufReader<File>,
        ty: u32,
        len: &dyn Fn(&mut BufReader<File>) -> std::io::Result<u64>,
        depth: u32,
    ) -> std::io::Result<bool> {
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => {
                let n = len(r)?;
                r.seek(SeekFrom::Current(n as i64))?;
                return Ok(true);
            }
            9 if depth < 4 => {
                let mut b = [0u8; 4];
                r.read_exact(&mut b)?;
                let elem = u32::from_le_bytes(b);
                let n = len(r)?;
                for _ in 0..n {
                    if !skip_value(r, elem, len, depth + 1)? {
                        return Ok(false);
                    }
                }
                return Ok(true);
            }
            _ => return Ok(false),
        };
        r.seek(SeekFrom::Current(fixed))?;
        Ok(true)
    }
    for _ in 0..n_kv {
        let klen = len(&mut r)?;
        r.seek(SeekFrom::Current(klen as i64))?;
        let ty = u32_(&mut r)?;
        if !skip_value(&mut r, ty, &len, 0)? {
            return Ok(None);
        }
    }
    for _ in 0..n_tensors {
        let nlen = len(&mut r)?;
        if nlen > 1 << 16 {
            return Ok(None);
        }
        let mut name = vec![0u8; nlen as usize];
        r.read_exact(&mut name)?;
        let n_dims = u32_(&mut r)?;
        if n_dims > 8 {
            return Ok(None);
        }
        for _ in 0..n_dims {
            len(&mut r)?;
        }
        let ty = u32_(&mut r)?;
        u64_(&mut r)?;
        if !KNOWN.contains(&ty) {
            return Ok(Some((String::from_utf8_lossy(&name).into_owned(), ty)));
        }
    }
    Ok(None)
}
