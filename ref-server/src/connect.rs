//! How a command reaches a running server: the connection flags (`--server`, TLS, bearer
//! token, timeout), declared once and flattened into every command that connects
//! (`ref-server health`, `info`, `score --server`), and the client they make.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use dpo_proto::client::{ClientOptions, RefClient};
use dpo_proto::token::load_token;

/// Where `--server` points when it is not given: `serve`'s default `--listen`.
pub const DEFAULT_SERVER: &str = "http://127.0.0.1:50051";

/// The connection flags, for `#[command(flatten)]`.
///
/// A command where a server is one choice among others (`score`: `--server` or `--model`)
/// drops the default URL, so that "not given" can be told apart, with
/// `#[command(mut_arg("server", |a| a.default_value(None::<&str>)))]` on its own struct.
#[derive(Debug, Clone, clap::Args)]
pub struct ConnectArgs {
    /// Server URL, http://HOST:PORT or https://HOST:PORT.
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
    /// Seconds to wait for the connection.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub connect_timeout: u64,
}

impl ConnectArgs {
    /// The client options these flags describe (the token is read here).
    pub fn options(&self) -> Result<ClientOptions> {
        Ok(ClientOptions {
            url: self.server.clone().context("no server URL (--server) given")?,
            token: load_token(self.auth_token_file.as_deref())?,
            ca_cert: self.tls_ca.clone(),
            tls_domain: self.tls_domain.clone(),
            connect_timeout: Duration::from_secs(self.connect_timeout),
            ..ClientOptions::default()
        })
    }

    pub async fn connect(&self) -> Result<RefClient> {
        Ok(RefClient::connect(&self.options()?).await?)
    }
}
