//! How a client command reaches a running server: the connection flags (`--server`, TLS,
//! bearer token, timeout), declared once for every client (`ref-server health/info/score`,
//! `dpo-eval --server`, the trainer), and the waiting client they make.
//!
//! Each command flattens [`ConnectArgs`] into its own flags and adjusts what differs with
//! clap's `mut_arg` on its own struct (the argument ids are the field names):
//! - a command where a server is one choice among others (`score`: `--server` or
//!   `--model`) drops the default URL, so that "not given" can be told apart:
//!   `#[command(mut_arg("server", |a| a.default_value(None::<&str>)))]`;
//! - the trainer spells the flags `--ref-server` and `--ref-timeout`:
//!   `#[command(mut_arg("server", |a| a.long("ref-server")),
//!   mut_arg("connect_timeout", |a| a.long("ref-timeout").default_value("300")))]`.

use std::path::PathBuf;
use std::time::Duration;

use crate::client::{ClientError, ClientOptions};
use crate::fleet::RefClient;
use crate::token::load_token;

/// Where `--server` points when it is not given: `ref-server serve`'s default `--listen`.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The connection flags, for `#[command(flatten)]`.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// The reference: a server URL (http://HOST:PORT or https://HOST:PORT), a
    /// comma-separated list of replica URLs, or dns:///HOST:PORT (every address the name
    /// resolves to is a replica; https when --tls-ca is given).
    #[arg(long, value_name = "URL", default_value = DEFAULT_SERVER)]
    pub server: Option<String>,
    /// PEM CA certificate to trust for https:// (default: system roots).
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// Server name to check the certificate against (default: the URL's host).
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
    /// Bearer token file (else env DPO_AUTH_TOKEN).
    #[arg(long, value_name = "FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// Seconds to wait for the server to be reachable and SERVING (a server still loading
    /// its model is waited for).
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

impl ConnectArgs {
    /// The client options these flags describe (the token is read here).
    pub fn options(&self) -> Result<ClientOptions, ClientError> {
        Ok(ClientOptions {
            url: self.server.clone().ok_or(ClientError::NoServer)?,
            token: load_token(self.auth_token_file.as_deref())?,
            ca_cert: self.tls_ca.clone(),
            tls_domain: self.tls_domain.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            ..ClientOptions::default()
        })
    }

    /// Connects and waits, up to `--connect-timeout`, until the server is SERVING
    /// ([`RefClient::connect_waiting`]).
    pub async fn connect(&self) -> Result<RefClient, ClientError> {
        RefClient::connect_waiting(&self.options()?).await
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Client {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    /// The trainer's spelling of the same flags.
    #[derive(Parser)]
    #[command(
        mut_arg("server", |a| a.long("ref-server")),
        mut_arg("connect_timeout", |a| a.long("ref-timeout").default_value("300"))
    )]
    struct Trainer {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    fn parse<P: Parser>(args: &[&str]) -> Result<P, clap::Error> {
        P::try_parse_from(std::iter::once("prog").chain(args.iter().copied()))
    }

    #[test]
    fn the_flags_parse_with_their_defaults() {
        use clap::CommandFactory;
        Client::command().debug_assert();
        let c = parse::<Client>(&[]).unwrap().connect;
        assert_eq!(c.server.as_deref(), Some(DEFAULT_SERVER));
        assert_eq!(c.connect_timeout, 10);
        let c = parse::<Client>(&["--server", "https://h:1", "--tls-ca", "ca.pem"]).unwrap();
        let opts = c.connect.options().unwrap();
        assert_eq!(opts.url, "https://h:1");
        assert_eq!(opts.ca_cert, Some(PathBuf::from("ca.pem")));
        assert_eq!(opts.connect_timeout, Duration::from_secs(10));
    }

    #[test]
    fn the_trainer_spelling_parses() {
        use clap::CommandFactory;
        Trainer::command().debug_assert();
        let t = parse::<Trainer>(&[
            "--ref-server",
            "http://a:2",
            "--ref-timeout",
            "7",
            "--auth-token-file",
            "tok",
            "--tls-domain",
            "d",
        ])
        .unwrap()
        .connect;
        assert_eq!(t.server.as_deref(), Some("http://a:2"));
        assert_eq!(t.connect_timeout, 7);
        assert_eq!(t.auth_token_file, Some(PathBuf::from("tok")));
        assert_eq!(t.tls_domain.as_deref(), Some("d"));
        let defaults = parse::<Trainer>(&[]).unwrap().connect;
        assert_eq!(defaults.server.as_deref(), Some(DEFAULT_SERVER));
        assert_eq!(defaults.connect_timeout, 300);
        // The client spelling is gone there, not added beside it.
        assert!(parse::<Trainer>(&["--server", "http://a:2"]).is_err());
        assert!(parse::<Trainer>(&["--connect-timeout", "2"]).is_err());
    }

    #[test]
    fn no_url_is_an_error_naming_the_flag() {
        let c = ConnectArgs {
            server: None,
            tls_ca: None,
            tls_domain: None,
            auth_token_file: None,
            connect_timeout: 1,
        };
        let err = c.options().unwrap_err().to_string();
        assert!(err.contains("--server"), "{err}");
    }
}
