//! The Qlik APIs' side of reconciliation, pure: request paths and headers, the bodies, and
//! which registry host a proxy node is.

use std::collections::HashMap;

use serde::Deserialize;

use super::settings::{ApiAddress, HostAliases, ProxyTarget};
use crate::registry::ListedUser;

/// The QRS answers only requests made as a user; the repository's own service account is the
/// one every Qlik tool uses with the exported certificates.
pub const QRS_USER_HEADER: &str = "UserDirectory=INTERNAL; UserId=sa_repository";
pub const PROXY_SERVICES_PATH: &str = "/qrs/proxyservice/full";

/// Qlik's cross-site request forgery guard: 16 characters of `0-9a-zA-Z`, sent both as the
/// `Xrfkey` query parameter and the `X-Qlik-Xrfkey` header. A fresh one per request.
pub fn xrfkey(rng: &mut fastrand::Rng) -> String {
    const ALPHABET: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..16)
        .map(|_| ALPHABET[rng.usize(..ALPHABET.len())] as char)
        .collect()
}

/// The session list of one virtual proxy: `/qps/session` for the default one.
pub fn sessions_path(prefix: &str) -> String {
    match prefix {
        "" => "/qps/session".to_owned(),
        prefix => format!("/qps/{prefix}/session"),
    }
}

/// One session as `GET /qps/{prefix}/session` lists it. Real servers answer in PascalCase;
/// Qlik's generated reference shows camelCase: both are read.
#[derive(Debug, Deserialize, PartialEq, Eq)]
pub struct ApiSession {
    #[serde(alias = "UserDirectory", alias = "userDirectory")]
    pub user_directory: String,
    #[serde(alias = "UserId", alias = "userId")]
    pub user_id: String,
    #[serde(default, alias = "SessionId", alias = "sessionId")]
    pub session_id: Option<String>,
}

pub fn parse_sessions(body: &[u8]) -> Result<Vec<ApiSession>, serde_json::Error> {
    serde_json::from_slice(body)
}

/// One proxy service as `GET /qrs/proxyservice/full` describes it (only what is used here).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxyService {
    server_node_configuration: ServerNode,
    settings: ProxySettings,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServerNode {
    host_name: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProxySettings {
    rest_listen_port: u16,
    #[serde(default)]
    virtual_proxies: Vec<VirtualProxy>,
}

#[derive(Debug, Deserialize)]
struct VirtualProxy {
    #[serde(default)]
    prefix: String,
}

/// Every virtual proxy of every proxy node the repository knows, sorted, without duplicates
/// (a virtual proxy linked to several proxies appears under each).
pub fn parse_proxy_services(body: &[u8]) -> Result<Vec<ProxyTarget>, serde_json::Error> {
    let services: Vec<ProxyService> = serde_json::from_slice(body)?;
    let mut targets: Vec<ProxyTarget> = services
        .into_iter()
        .flat_map(|s| {
            let node = ApiAddress {
                host: s.server_node_configuration.host_name,
                port: s.settings.rest_listen_port,
            };
            let mut prefixes: Vec<String> = s
                .settings
                .virtual_proxies
                .into_iter()
                .map(|vp| vp.prefix.trim_matches('/').to_owned())
                .collect();
            // Every proxy has its default virtual proxy, whether or not the body lists it.
            if !prefixes.iter().any(String::is_empty) {
                prefixes.push(String::new());
            }
            prefixes.into_iter().map(move |prefix| ProxyTarget {
                node: node.clone(),
                prefix,
            })
        })
        .collect();
    targets.sort();
    targets.dedup();
    Ok(targets)
}

/// The name a proxy logs as `%hostname` (its machine name) for a node the API names `api_host`
/// (which may be a fully qualified name): an alias if one is configured, else a host the
/// registry already knows with the same first label in any case, else that first label. An IP
/// address is kept whole.
pub fn logged_host_name(api_host: &str, aliases: &HostAliases, known_hosts: &[String]) -> String {
    if let Some(alias) = aliases.get(api_host) {
        return alias.to_owned();
    }
    if api_host.parse::<std::net::IpAddr>().is_ok() {
        return api_host.to_owned();
    }
    let label = first_label(api_host);
    known_hosts
        .iter()
        .find(|known| first_label(known).eq_ignore_ascii_case(label))
        .cloned()
        .unwrap_or_else(|| label.to_owned())
}

fn first_label(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

/// One node's virtual proxies' lists as one list of users, each with all their sessions on
/// the node (one browser per virtual proxy is one session each).
pub fn listed_users(lists: impl IntoIterator<Item = Vec<ApiSession>>) -> Vec<ListedUser> {
    let mut users: HashMap<String, ListedUser> = HashMap::new();
    for session in lists.into_iter().flatten() {
        if session.user_directory.is_empty() && session.user_id.is_empty() {
            continue;
        }
        let key = format!("{}\\{}", session.user_directory, session.user_id).to_lowercase();
        users
            .entry(key)
            .or_insert_with(|| ListedUser {
                directory: session.user_directory,
                user_id: session.user_id,
                session_ids: Vec::new(),
            })
            .session_ids
            .push(session.session_id.unwrap_or_default());
    }
    let mut users: Vec<ListedUser> = users.into_values().collect();
    users.sort_by(|a, b| (&a.directory, &a.user_id).cmp(&(&b.directory, &b.user_id)));
    users
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xrfkeys_are_sixteen_alphanumerics_and_differ() {
        let mut rng = fastrand::Rng::with_seed(7);
        let (a, b) = (xrfkey(&mut rng), xrfkey(&mut rng));
        assert_eq!(a.len(), 16);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn session_paths() {
        assert_eq!(sessions_path(""), "/qps/session");
        assert_eq!(sessions_path("sales"), "/qps/sales/session");
    }

    #[test]
    fn sessions_in_both_casings() {
        let pascal = br#"[{"UserDirectory":"LAB","UserId":"joe","UserName":"Joe","Attributes":[{"Group":"a"}],"SessionId":"s1"}]"#;
        let camel = br#"[{"userDirectory":"LAB","userId":"joe","userName":"Joe","attributes":[],"sessionId":"s1"}]"#;
        let expected = vec![ApiSession {
            user_directory: "LAB".into(),
            user_id: "joe".into(),
            session_id: Some("s1".into()),
        }];
        assert_eq!(parse_sessions(pascal).unwrap(), expected);
        assert_eq!(parse_sessions(camel).unwrap(), expected);
        assert!(parse_sessions(b"{}").is_err());
        assert!(parse_sessions(b"[]").unwrap().is_empty());
    }

    #[test]
    fn discovery_lists_every_virtual_proxy_of_every_node() {
        let body = br#"[
          {"id":"1","serverNodeConfiguration":{"name":"Central","hostName":"qs-central.corp.local"},
           "settings":{"restListenPort":4243,"virtualProxies":[
             {"prefix":"","sessionInactivityTimeout":30},{"prefix":"sales","sessionInactivityTimeout":30}]}},
          {"id":"2","serverNodeConfiguration":{"name":"Rim","hostName":"qs-rim1.corp.local"},
           "settings":{"restListenPort":4244,"virtualProxies":[{"prefix":"/sales/"}]}}
        ]"#;
        let targets = parse_proxy_services(body).unwrap();
        let names: Vec<String> = targets
            .iter()
            .map(|t| format!("{}:{}/{}", t.node.host, t.node.port, t.prefix))
            .collect();
        assert_eq!(
            names,
            [
                "qs-central.corp.local:4243/",
                "qs-central.corp.local:4243/sales",
                "qs-rim1.corp.local:4244/",
                "qs-rim1.corp.local:4244/sales"
            ]
        );
    }

    #[test]
    fn node_names_match_the_logged_machine_name() {
        let none = HostAliases::default();
        let known = vec!["QS-RIM1".to_owned()];
        assert_eq!(
            logged_host_name("qs-rim1.corp.local", &none, &known),
            "QS-RIM1"
        );
        assert_eq!(
            logged_host_name("qs-rim2.corp.local", &none, &known),
            "qs-rim2"
        );
        assert_eq!(logged_host_name("10.0.0.5", &none, &known), "10.0.0.5");
    }

    #[test]
    fn one_user_on_two_virtual_proxies_has_two_sessions() {
        let s = |d: &str, u: &str, id: &str| ApiSession {
            user_directory: d.into(),
            user_id: u.into(),
            session_id: Some(id.into()),
        };
        let users = listed_users([
            vec![s("LAB", "joe", "a")],
            vec![s("lab", "JOE", "b"), s("LAB", "ann", "c")],
        ]);
        assert_eq!(users.len(), 2);
        let joe = users.iter().find(|u| u.user_id == "joe").unwrap();
        assert_eq!(joe.session_ids, ["a", "b"]);
    }
}
