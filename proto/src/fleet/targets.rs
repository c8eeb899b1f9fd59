//! What a client's `--server` names: one URL, a comma-separated list of URLs (one per
//! replica), or `dns:///HOST:PORT`, a name that resolves to one address per replica (a
//! Kubernetes headless Service) and is resolved again every [`DNS_REFRESH`].

use std::collections::BTreeSet;
use std::time::Duration;

use crate::client::{ClientError, ClientOptions};

/// How often a `dns:///` name is resolved again, so that replicas added or removed (a
/// `kubectl scale`, a rescheduled pod) are seen within this time.
pub const DNS_REFRESH: Duration = Duration::from_secs(10);

/// One entry of `--server`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `http://host:port` or `https://host:port`: one replica.
    Url(String),
    /// `dns:///host:port`: every address the name resolves to is a replica.
    Dns { host: String, port: u16 },
}

/// Splits `spec` into its targets. Each URL is checked when its replica is prepared; here
/// only the list's shape and the `dns:///` form.
pub fn parse(spec: &str) -> Result<Vec<Target>, ClientError> {
    let bad = |message: String| ClientError::BadUrl { url: spec.trim().to_string(), message };
    let mut targets = Vec::new();
    for part in spec.split(',').map(str::trim) {
        if part.is_empty() {
            return Err(bad("an empty entry in the comma-separated list".into()));
        }
        let target = match part.strip_prefix("dns:") {
            Some(rest) => {
                let name = rest.strip_prefix("///").ok_or_else(|| {
                    bad(format!(
                        "`{part}`: write a DNS name as dns:///HOST:PORT (three slashes; no DNS \
                         server authority is supported)"
                    ))
                })?;
                let (host, port) = name
                    .rsplit_once(':')
                    .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                    .filter(|(h, _)| !h.is_empty())
                    .ok_or_else(|| bad(format!("`{part}`: expected dns:///HOST:PORT")))?;
                Target::Dns { host: host.to_string(), port }
            }
            None => Target::Url(part.to_string()),
        };
        if targets.contains(&target) {
            return Err(bad(format!("`{part}` is listed twice")));
        }
        targets.push(target);
    }
    Ok(targets)
}

/// The options for one replica at `url`. A replica found through `dns:///` is reached at its
/// address, so TLS (chosen by giving a CA file) checks the certificate against the DNS
/// name unless `--tls-domain` says otherwise.
pub fn replica_options(base: &ClientOptions, target: &Target, url: String) -> ClientOptions {
    let mut opts = ClientOptions { url, ..base.clone() };
    if let Target::Dns { host, .. } = target {
        if opts.tls_domain.is_none() && opts.ca_cert.is_some() {
            opts.tls_domain = Some(host.clone());
        }
    }
    opts
}

/// The replica URLs `host:port` resolves to now: `https://` when a CA file is given.
pub async fn resolve(host: &str, port: u16, tls: bool) -> Result<BTreeSet<String>, std::io::Error> {
    let scheme = if tls { "https" } else { "http" };
    let addrs = tokio::net::lookup_host((host, port)).await?;
    // SocketAddr's Display brackets an IPv6 address, as a URL needs.
    Ok(addrs.map(|a| format!("{scheme}://{a}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_url_a_list_and_a_dns_name() {
        assert_eq!(parse("http://a:1").unwrap(), vec![Target::Url("http://a:1".into())]);
        assert_eq!(
            parse(" http://a:1 , https://b:2").unwrap(),
            vec![Target::Url("http://a:1".into()), Target::Url("https://b:2".into())]
        );
        assert_eq!(
            parse("dns:///ref-server.dpo.svc.cluster.local:50051").unwrap(),
            vec![Target::Dns { host: "ref-server.dpo.svc.cluster.local".into(), port: 50051 }]
        );
    }

    #[test]
    fn malformed_lists_name_the_problem() {
        for (spec, says) in [
            ("http://a:1,,http://b:2", "empty entry"),
            ("http://a:1,http://a:1", "listed twice"),
            ("dns://resolver/h:1", "three slashes"),
            ("dns:///h", "dns:///HOST:PORT"),
            ("dns:///:50051", "dns:///HOST:PORT"),
            ("dns:///h:http", "dns:///HOST:PORT"),
        ] {
            let err = parse(spec).unwrap_err().to_string();
            assert!(err.contains(says), "{spec}: {err}");
        }
    }

    #[tokio::test]
    async fn a_name_resolves_to_replica_urls() {
        let urls = resolve("localhost", 7, false).await.unwrap();
        assert!(!urls.is_empty());
        assert!(urls.iter().all(|u| u.starts_with("http://") && u.ends_with(":7")), "{urls:?}");
        let tls = resolve("127.0.0.1", 7, true).await.unwrap();
        assert_eq!(tls.into_iter().collect::<Vec<_>>(), vec!["https://127.0.0.1:7".to_string()]);
    }

    #[test]
    fn tls_through_dns_checks_the_name() {
        let base = ClientOptions { ca_cert: Some("ca.pem".into()), ..ClientOptions::default() };
        let dns = Target::Dns { host: "ref.svc".into(), port: 1 };
        let opts = replica_options(&base, &dns, "https://10.0.0.7:1".into());
        assert_eq!(opts.tls_domain.as_deref(), Some("ref.svc"));
        assert_eq!(opts.url, "https://10.0.0.7:1");
        let url = Target::Url("https://10.0.0.7:1".into());
        assert_eq!(replica_options(&base, &url, "https://10.0.0.7:1".into()).tls_domain, None);
    }
}
