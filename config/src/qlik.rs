//! The Qlik API section of the configuration: validated from [`Settings`], with its defaults
//! beside it.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::{AuthorityError, ConfigError, Secret, Settings, invalid, split_authority};

/// The repository service's port on the central node.
pub const QRS_PORT: u16 = 4242;
/// The proxy service's API port on every proxy node.
pub const QPS_PORT: u16 = 4243;
pub const RECONCILE_INTERVAL: Duration = Duration::from_secs(60);
/// Longer than a datagram takes to arrive and log4net takes to send it, short enough that a
/// session whose stop was lost leaves soon after the next reconcile.
pub const RECONCILE_GRACE: Duration = Duration::from_secs(30);
/// Long enough that the idle users of a working node have made some event (a new tab, a
/// session's start or stop), short enough to learn of a dead appender within the hour.
pub const SILENT_AFTER: Duration = Duration::from_secs(10 * 60);
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QlikConfig {
    pub sources: Sources,
    pub tls: QlikTls,
    /// `None`: reconcile once, at start.
    pub interval: Option<Duration>,
    pub grace: Duration,
    /// A node with listed sessions and no event since start is silent after this long.
    pub silent_after: Duration,
    pub startup_timeout: Duration,
    pub request_timeout: Duration,
    pub host_aliases: HostAliases,
    /// Host name → address, for names this machine cannot resolve.
    pub resolve: Vec<(String, IpAddr)>,
}

/// Where the proxies' APIs are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sources {
    /// Asked of the repository at every reconcile, so new nodes and virtual proxies are found.
    Discovery { repository: ApiAddress },
    /// As configured.
    Static(Vec<ProxyTarget>),
}

/// An HTTPS endpoint of a Qlik service.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ApiAddress {
    pub host: String,
    pub port: u16,
}

impl std::fmt::Display for ApiAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.host.contains(':') {
            true => write!(f, "https://[{}]:{}", self.host, self.port),
            false => write!(f, "https://{}:{}", self.host, self.port),
        }
    }
}

/// One virtual proxy of one proxy node: a session list of its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProxyTarget {
    pub node: ApiAddress,
    /// The virtual proxy's prefix; empty for the default one.
    pub prefix: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QlikTls {
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    pub key_passphrase: Option<Passphrase>,
    /// `None` only with `verify` off.
    pub ca_file: Option<PathBuf>,
    pub verify: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Passphrase {
    File(PathBuf),
    Value(Secret),
}

/// Node names as the API gives them → names as the proxies log them (`%hostname`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostAliases(Vec<(String, String)>);

impl HostAliases {
    /// The logged name configured for a node, if any (names compared in any case).
    pub fn get(&self, api_name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(from, _)| from.eq_ignore_ascii_case(api_name))
            .map(|(_, to)| to.as_str())
    }
}

impl QlikConfig {
    /// `None` when neither a repository nor proxies are configured: events only.
    pub fn from_settings(s: &Settings) -> Result<Option<QlikConfig>, ConfigError> {
        let sources = match (&s.qlik_repository_url, &s.qlik_proxies) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "qlik_proxies",
                    "set either qlik_repository_url (discovery) or qlik_proxies, not both",
                ));
            }
            (Some(url), None) => {
                let (repository, path) = parse_https("qlik_repository_url", url, QRS_PORT)?;
                if !path.is_empty() {
                    return Err(invalid(
                        "qlik_repository_url",
                        format!(
                            "{url:?}: give the repository's address only, like https://central:4242"
                        ),
                    ));
                }
                Sources::Discovery { repository }
            }
            (None, Some(urls)) if urls.is_empty() => {
                return Err(invalid("qlik_proxies", "the list is empty"));
            }
            (None, Some(urls)) => {
                let mut targets = Vec::with_capacity(urls.len());
                for url in urls {
                    let (node, prefix) = parse_https("qlik_proxies", url, QPS_PORT)?;
                    if !is_prefix(&prefix) {
                        return Err(invalid(
                            "qlik_proxies",
                            format!(
                                "{url:?}: {prefix:?} is not a virtual proxy prefix (letters, digits, '-', '_', '.')"
                            ),
                        ));
                    }
                    let target = ProxyTarget { node, prefix };
                    if targets.contains(&target) {
                        return Err(invalid("qlik_proxies", format!("{url:?} is listed twice")));
                    }
                    targets.push(target);
                }
                Sources::Static(targets)
            }
            (None, None) => {
                let set = [
                    ("qlik_client_cert_file", s.qlik_client_cert_file.is_some()),
                    ("qlik_client_key_file", s.qlik_client_key_file.is_some()),
                    ("qlik_ca_file", s.qlik_ca_file.is_some()),
                    ("qlik_host_aliases", s.qlik_host_aliases.is_some()),
                    ("qlik_resolve", s.qlik_resolve.is_some()),
                    (
                        "qlik_reconcile_interval",
                        s.qlik_reconcile_interval.is_some(),
                    ),
                ];
                if let Some((key, _)) = set.iter().find(|(_, set)| *set) {
                    return Err(invalid(key, "needs qlik_repository_url or qlik_proxies"));
                }
                return Ok(None);
            }
        };
        let verify = !s.qlik_insecure_skip_tls_verify.unwrap_or(false);
        let required = |key: &'static str, value: &Option<PathBuf>| {
            value.clone().ok_or_else(|| {
                invalid(
                    key,
                    "the Qlik APIs need the certificates exported from the QMC (client.pem, client_key.pem, root.pem)",
                )
            })
        };
        let tls = QlikTls {
            client_cert: required("qlik_client_cert_file", &s.qlik_client_cert_file)?,
            client_key: required("qlik_client_key_file", &s.qlik_client_key_file)?,
            key_passphrase: match (
                &s.qlik_client_key_passphrase,
                &s.qlik_client_key_passphrase_file,
            ) {
                (Some(value), _) => Some(Passphrase::Value(value.clone())),
                (None, Some(path)) => Some(Passphrase::File(path.clone())),
                (None, None) => None,
            },
            ca_file: match verify {
                true => Some(required("qlik_ca_file", &s.qlik_ca_file)?),
                false => s.qlik_ca_file.clone(),
            },
            verify,
        };
        let interval = match s.qlik_reconcile_interval {
            Some(Duration::ZERO) => None,
            Some(i) if i < Duration::from_secs(1) => {
                return Err(invalid(
                    "qlik_reconcile_interval",
                    "must be at least 1s (or 0s: only at start)",
                ));
            }
            Some(i) if i > Duration::from_secs(24 * 3600) => {
                return Err(invalid("qlik_reconcile_interval", "must be at most 1day"));
            }
            Some(i) => Some(i),
            None => Some(RECONCILE_INTERVAL),
        };
        let bounded =
            |key: &'static str, value: Option<Duration>, default: Duration, min: Duration| {
                match value {
                    Some(v) if v < min || v > Duration::from_secs(3600) => Err(invalid(
                        key,
                        format!("must be from {} to 1h", humantime::format_duration(min)),
                    )),
                    Some(v) => Ok(v),
                    None => Ok(default),
                }
            };
        let ms = Duration::from_millis(1);
        Ok(Some(QlikConfig {
            sources,
            tls,
            interval,
            grace: bounded(
                "qlik_reconcile_grace",
                s.qlik_reconcile_grace,
                RECONCILE_GRACE,
                Duration::ZERO,
            )?,
            silent_after: bounded(
                "qlik_silent_after",
                s.qlik_silent_after,
                SILENT_AFTER,
                Duration::ZERO,
            )?,
            startup_timeout: bounded(
                "qlik_startup_timeout",
                s.qlik_startup_timeout,
                STARTUP_TIMEOUT,
                Duration::ZERO,
            )?,
            request_timeout: bounded(
                "qlik_request_timeout",
                s.qlik_request_timeout,
                REQUEST_TIMEOUT,
                ms,
            )?,
            host_aliases: HostAliases(pairs("qlik_host_aliases", s.qlik_host_aliases.as_deref())?),
            resolve: pairs("qlik_resolve", s.qlik_resolve.as_deref())?
                .into_iter()
                .map(|(host, ip)| match ip.parse::<IpAddr>() {
                    Ok(ip) => Ok((host, ip)),
                    Err(_) => Err(invalid(
                        "qlik_resolve",
                        format!("{ip:?} is not an IP address"),
                    )),
                })
                .collect::<Result<_, _>>()?,
        }))
    }
}

/// `NAME=VALUE` entries, both sides non-empty.
fn pairs(
    key: &'static str,
    entries: Option<&[String]>,
) -> Result<Vec<(String, String)>, ConfigError> {
    entries
        .unwrap_or_default()
        .iter()
        .map(|entry| match entry.split_once('=') {
            Some((from, to)) if !from.trim().is_empty() && !to.trim().is_empty() => {
                Ok((from.trim().to_owned(), to.trim().to_owned()))
            }
            _ => Err(invalid(key, format!("{entry:?} is not NAME=VALUE"))),
        })
        .collect()
}

/// A virtual proxy prefix as the QMC allows it: one path segment.
fn is_prefix(prefix: &str) -> bool {
    prefix
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// `https://HOST[:PORT][/PATH]` → the address and the path without its slashes.
fn parse_https(
    key: &'static str,
    url: &str,
    default_port: u16,
) -> Result<(ApiAddress, String), ConfigError> {
    let rest = match url.split_once("://") {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("https") => rest,
        Some((scheme, _)) => {
            return Err(invalid(
                key,
                format!("{url:?}: the Qlik APIs speak https, not {scheme}"),
            ));
        }
        None => {
            return Err(invalid(
                key,
                format!("{url:?} is not a URL like https://qlik-node:{default_port}"),
            ));
        }
    };
    if rest.contains(['?', '#', '@']) {
        return Err(invalid(
            key,
            format!("{url:?}: no query, fragment or credentials"),
        ));
    }
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = split_authority(authority, default_port).map_err(|e| match e {
        AuthorityError::Port(port) => invalid(
            key,
            format!("{url:?}: port {port:?} is not a number from 1 to 65535"),
        ),
        AuthorityError::EmptyHost => invalid(key, format!("{url:?}: the host is empty")),
    })?;
    Ok((
        ApiAddress {
            host: host.to_owned(),
            port,
        },
        path.trim_matches('/').to_owned(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qlik(s: Settings) -> Result<Option<QlikConfig>, String> {
        QlikConfig::from_settings(&s).map_err(|e| e.to_string())
    }

    fn with_certs(s: Settings) -> Settings {
        Settings {
            qlik_client_cert_file: Some("client.pem".into()),
            qlik_client_key_file: Some("client_key.pem".into()),
            qlik_ca_file: Some("root.pem".into()),
            ..s
        }
    }

    #[test]
    fn off_unless_a_source_is_given() {
        assert_eq!(qlik(Settings::default()).unwrap(), None);
        let e = qlik(with_certs(Settings::default())).unwrap_err();
        assert!(
            e.contains("qlik_client_cert_file") && e.contains("qlik_repository_url"),
            "{e}"
        );
    }

    #[test]
    fn discovery_with_defaults() {
        let c = qlik(with_certs(Settings {
            qlik_repository_url: Some("https://Central.corp.local".into()),
            ..Settings::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(
            c.sources,
            Sources::Discovery {
                repository: ApiAddress {
                    host: "Central.corp.local".into(),
                    port: 4242
                }
            }
        );
        assert_eq!(c.interval, Some(Duration::from_secs(60)));
        assert_eq!(c.grace, Duration::from_secs(30));
        assert_eq!(c.startup_timeout, Duration::from_secs(10));
        assert!(c.tls.verify);
    }

    #[test]
    fn static_proxies_name_their_virtual_proxy_by_path() {
        let c = qlik(with_certs(Settings {
            qlik_proxies: Some(vec![
                "https://node1:4243/".into(),
                "https://node1:4243/sales".into(),
                "https://[::1]:9000".into(),
            ]),
            qlik_reconcile_interval: Some(Duration::ZERO),
            ..Settings::default()
        }))
        .unwrap()
        .unwrap();
        let Sources::Static(targets) = c.sources else {
            panic!()
        };
        assert_eq!(targets[0].prefix, "");
        assert_eq!(targets[1].prefix, "sales");
        assert_eq!(
            targets[2].node,
            ApiAddress {
                host: "::1".into(),
                port: 9000
            }
        );
        assert_eq!(c.interval, None);
    }

    #[test]
    fn bad_values_name_their_setting() {
        let cases = [
            (
                Settings {
                    qlik_repository_url: Some("http://central:4242".into()),
                    ..Settings::default()
                },
                "qlik_repository_url",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n/a/b".into()]),
                    ..Settings::default()
                },
                "qlik_proxies",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n".into(), "https://n:4243/".into()]),
                    ..Settings::default()
                },
                "listed twice",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n:0".into()]),
                    ..Settings::default()
                },
                "qlik_proxies",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n".into()]),
                    qlik_host_aliases: Some(vec!["a".into()]),
                    ..Settings::default()
                },
                "qlik_host_aliases",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n".into()]),
                    qlik_resolve: Some(vec!["n=host".into()]),
                    ..Settings::default()
                },
                "qlik_resolve",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n".into()]),
                    qlik_reconcile_interval: Some(Duration::from_millis(10)),
                    ..Settings::default()
                },
                "qlik_reconcile_interval",
            ),
            (
                Settings {
                    qlik_proxies: Some(vec!["https://n".into()]),
                    qlik_request_timeout: Some(Duration::ZERO),
                    ..Settings::default()
                },
                "qlik_request_timeout",
            ),
        ];
        for (s, expected) in cases {
            let e = qlik(with_certs(s)).unwrap_err();
            assert!(e.contains(expected), "{e} lacks {expected}");
        }
        let e = qlik(Settings {
            qlik_proxies: Some(vec!["https://n".into()]),
            ..Settings::default()
        })
        .unwrap_err();
        assert!(
            e.contains("qlik_client_cert_file") && e.contains("client.pem"),
            "{e}"
        );
    }

    #[test]
    fn the_root_certificate_is_needed_unless_verification_is_off() {
        let s = Settings {
            qlik_proxies: Some(vec!["https://n".into()]),
            qlik_ca_file: None,
            ..with_certs(Settings::default())
        };
        assert!(qlik(s.clone()).unwrap_err().contains("qlik_ca_file"));
        let c = qlik(Settings {
            qlik_insecure_skip_tls_verify: Some(true),
            ..s
        })
        .unwrap()
        .unwrap();
        assert!(!c.tls.verify);
    }

    #[test]
    fn aliases_match_in_any_case() {
        let c = qlik(with_certs(Settings {
            qlik_proxies: Some(vec!["https://n".into()]),
            qlik_host_aliases: Some(vec!["qs-node1.corp.local=PROXY1".into()]),
            qlik_resolve: Some(vec!["qs-node1.corp.local=10.0.0.5".into()]),
            ..Settings::default()
        }))
        .unwrap()
        .unwrap();
        assert_eq!(c.host_aliases.get("QS-NODE1.corp.local"), Some("PROXY1"));
        assert_eq!(c.host_aliases.get("qs-node2"), None);
        assert_eq!(
            c.resolve,
            vec![("qs-node1.corp.local".into(), "10.0.0.5".parse().unwrap())]
        );
    }
}
