//! The bearer token shared by the server (which requires it) and every client (trainer,
//! `ref-server score/health/info`, `dpo-eval`): one loader, so they all agree on where a
//! token comes from and what a valid one is.
//!
//! Rules: a token file wins over the `DPO_AUTH_TOKEN` environment variable; an unset or
//! empty variable means "no token" (so `DPO_AUTH_TOKEN=` switches authentication off);
//! surrounding whitespace (a file's trailing newline) is not part of the token; a token must
//! be non-empty printable ASCII without spaces, since it travels in an HTTP/2 header.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

/// The environment variable read when no token file is given.
pub const TOKEN_ENV: &str = "DPO_AUTH_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read the auth token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// `from` names the file or the variable.
    #[error("the auth token from {from} {problem}; a token must be non-empty printable ASCII without spaces")]
    Invalid { from: String, problem: &'static str },
}

/// Reads the token from `file`, else from `DPO_AUTH_TOKEN`; `None` when there is no file and
/// the variable is unset or empty.
pub fn load_token(file: Option<&Path>) -> Result<Option<String>, TokenError> {
    match file {
        Some(path) => token_from_file(path).map(Some),
        None => token_from_env(std::env::var_os(TOKEN_ENV)),
    }
}

fn token_from_file(path: &Path) -> Result<String, TokenError> {
    let bytes = std::fs::read(path)
        .map_err(|source| TokenError::Read { path: path.to_path_buf(), source })?;
    let from = || format!("file {}", path.display());
    let text = String::from_utf8(bytes)
        .map_err(|_| TokenError::Invalid { from: from(), problem: "is not valid text" })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(TokenError::Invalid { from: from(), problem: "is empty" });
    }
    check(token, from)
}

/// The variable's value as read (`None`: unset).
fn token_from_env(value: Option<OsString>) -> Result<Option<String>, TokenError> {
    let from = || TOKEN_ENV.to_string();
    let Some(value) = value else { return Ok(None) };
    let value = value
        .into_string()
        .map_err(|_| TokenError::Invalid { from: from(), problem: "is not valid text" })?;
    let token = value.trim();
    if token.is_empty() {
        return Ok(None);
    }
    check(token, from).map(Some)
}

fn check(token: &str, from: impl Fn() -> String) -> Result<String, TokenError> {
    if token.bytes().all(|b| b.is_ascii_graphic()) {
        Ok(token.to_string())
    } else {
        Err(TokenError::Invalid {
            from: from(),
            problem: "holds spaces, control or non-ASCII characters",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(content: &[u8]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, content).unwrap();
        (dir, path)
    }

    #[test]
    fn a_file_is_trimmed_and_the_variable_left_unread() {
        let (_d, path) = file_with(b"  s3cret-token\n");
        assert_eq!(token_from_file(&path).unwrap(), "s3cret-token");
        // load_token with a file never looks at the environment.
        assert_eq!(load_token(Some(&path)).unwrap().as_deref(), Some("s3cret-token"));
    }

    #[test]
    fn bad_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let e = token_from_file(&missing).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("nope"), "{e}");
        for (content, problem) in [
            (&b"\n  \n"[..], "is empty"),
            (&b"two words"[..], "spaces"),
            (&b"caf\xc3\xa9"[..], "non-ASCII"),
            (&b"\xff\xfe"[..], "not valid text"),
            (&b"tab\there"[..], "control"),
        ] {
            let (_d, path) = file_with(content);
            let e = token_from_file(&path).unwrap_err().to_string();
            assert!(e.contains(problem), "{content:?}: {e}");
            assert!(e.contains(&path.display().to_string()), "{e}");
            assert!(e.contains("non-empty printable ASCII"), "{e}");
        }
    }

    #[test]
    fn the_variable_unset_or_empty_means_no_token() {
        assert_eq!(token_from_env(None).unwrap(), None);
        assert_eq!(token_from_env(Some("".into())).unwrap(), None);
        assert_eq!(token_from_env(Some("  \n".into())).unwrap(), None);
        assert_eq!(token_from_env(Some(" abc\n".into())).unwrap().as_deref(), Some("abc"));
    }

    #[test]
    fn a_bad_variable_is_an_error_naming_it() {
        let e = token_from_env(Some("a b".into())).unwrap_err().to_string();
        assert!(e.contains(TOKEN_ENV) && e.contains("printable ASCII"), "{e}");
        #[cfg(unix)]
        {
            use std::os::unix::ffi::OsStringExt;
            let e = token_from_env(Some(OsString::from_vec(vec![0xff]))).unwrap_err();
            assert!(e.to_string().contains("not valid text"), "{e}");
        }
    }
}
