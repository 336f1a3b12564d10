//! The fake Qlik Sense site over real sockets, with a small mutual-TLS client of its own: it
//! must answer as Qlik documents, and refuse what Qlik refuses.

use std::net::TcpStream as StdTcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::{Value, json};
use session_monitor_testkit::qlik::{
    Behaviour, Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

const CENTRAL: &str = "qs-central.corp.local";
const RIM: &str = "qs-rim1.corp.local";
const KEY: &str = "0123456789abcDEF";
const REPOSITORY_USER: (&str, &str) = (
    "X-Qlik-User",
    "UserDirectory=INTERNAL; UserId=sa_repository",
);

fn session(user: &str, id: &str) -> FakeSession {
    FakeSession::new("LAB", user, id)
}

fn node(host_name: &str, virtual_proxies: &[&str], casing: Casing) -> NodeSpec {
    NodeSpec::new(host_name, virtual_proxies, casing)
}

/// A central node (PascalCase, virtual proxies "" and "sales") and a rim node (camelCase, "").
fn two_node_site(dir: &Path) -> (QlikCerts, FakeQlik) {
    let certs = QlikCerts::generate(dir, &[CENTRAL, RIM]);
    let site = Site {
        nodes: vec![
            node(CENTRAL, &["", "sales"], Casing::Pascal),
            node(RIM, &[""], Casing::Camel),
        ],
    };
    let fake = FakeQlik::start(&certs, site);
    (certs, fake)
}

// The client ----------------------------------------------------------------------------------

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// A client that trusts `root` and presents `identity` (certificate, key), if any.
fn client(root: &Path, identity: Option<(&Path, &Path)>) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(root) {
        roots.add(cert).unwrap();
    }
    let builder = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(read_certs(cert), PrivateKeyDer::from_pem_file(key).unwrap())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

fn site_client(certs: &QlikCerts) -> Arc<ClientConfig> {
    client(&certs.root, Some((&certs.client_cert, &certs.client_key)))
}

#[derive(Debug)]
struct Reply {
    status: u16,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        assert_eq!(self.status, 200, "{self:?}");
        serde_json::from_str(&self.body).unwrap()
    }
}

/// One request on a fresh connection to `server_name` at 127.0.0.1:`port`. Any failure, from
/// connecting to reading the body, is an `Err` naming its stage.
async fn request(
    config: &Arc<ClientConfig>,
    server_name: &str,
    port: u16,
    method: Method,
    path_and_query: &str,
    headers: &[(&str, &str)],
) -> Result<Reply, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let name = ServerName::try_from(server_name.to_owned()).unwrap();
    let tls = TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("tls: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(connection);
    let mut builder = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header("Host", format!("{server_name}:{port}"));
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let response = sender
        .send_request(builder.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| format!("request: {e:?}"))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?
        .to_bytes();
    Ok(Reply {
        status,
        body: String::from_utf8(body.to_vec()).unwrap(),
    })
}

/// A well-formed QPS `GET` to node `node` of the two-node site.
async fn qps(fake: &FakeQlik, certs: &QlikCerts, node: usize, path: &str) -> Result<Reply, String> {
    let host = [CENTRAL, RIM][node];
    let path = format!("{path}?Xrfkey={KEY}");
    let headers = [("X-Qlik-Xrfkey", KEY)];
    request(
        &site_client(certs),
        host,
        fake.node_port(node),
        Method::GET,
        &path,
        &headers,
    )
    .await
}

/// A well-formed QRS `GET`.
async fn qrs(fake: &FakeQlik, certs: &QlikCerts, path: &str) -> Result<Reply, String> {
    let path = format!("{path}?xrfkey={KEY}");
    let headers = [("X-Qlik-Xrfkey", KEY), REPOSITORY_USER];
    request(
        &site_client(certs),
        CENTRAL,
        fake.qrs_port(),
        Method::GET,
        &path,
        &headers,
    )
    .await
}

// The APIs ------------------------------------------------------------------------------------

#[tokio::test]
async fn the_repository_lists_every_proxy_node_with_its_port_and_virtual_proxies() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());

    let body = qrs(&fake, &certs, "/qrs/proxyservice/full")
        .await
        .unwrap()
        .json();
    let services = body.as_array().unwrap();
    assert_eq!(services.len(), 2);
    let central = &services[0];
    assert_eq!(central["serverNodeConfiguration"]["hostName"], CENTRAL);
    assert_eq!(central["serverNodeConfiguration"]["name"], "Central");
    assert_eq!(central["settings"]["restListenPort"], fake.node_port(0));
    let proxies = central["settings"]["virtualProxies"].as_array().unwrap();
    assert_eq!(proxies[0]["prefix"], "");
    assert_eq!(proxies[0]["description"], "Central Proxy (Default)");
    assert_eq!(proxies[0]["sessionInactivityTimeout"], 30);
    assert_eq!(proxies[1]["prefix"], "sales");
    let rim = &services[1];
    assert_eq!(rim["serverNodeConfiguration"]["hostName"], RIM);
    assert_eq!(rim["settings"]["restListenPort"], fake.node_port(1));
    // The default virtual proxy is one object, linked to both proxies.
    assert_eq!(rim["settings"]["virtualProxies"][0]["id"], proxies[0]["id"]);
    for id in [
        &central["id"],
        &central["serverNodeConfiguration"]["id"],
        &central["settings"]["id"],
    ] {
        assert_eq!(id.as_str().unwrap().len(), 36, "{id}");
    }

    // Any other path is unknown; the paths are case-insensitive.
    assert_eq!(qrs(&fake, &certs, "/qrs/about").await.unwrap().status, 404);
    assert_eq!(
        qrs(&fake, &certs, "/qrs/ProxyService/full")
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!((fake.qrs_requests(), fake.forbidden()), (3, 0));
}

#[tokio::test]
async fn the_proxies_list_sessions_in_either_casing() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    fake.set_sessions(0, "", vec![session("joe", "c1")]);
    fake.set_sessions(1, "", vec![session("ann", "r1")]);

    let pascal = qps(&fake, &certs, 0, "/qps/session").await.unwrap().json();
    assert_eq!(
        pascal,
        json!([{"UserDirectory": "LAB", "UserId": "joe", "UserName": "joe",
                "Attributes": [{"Group": "Everyone"}], "SessionId": "c1"}])
    );
    let camel = qps(&fake, &certs, 1, "/qps/session").await.unwrap().json();
    assert_eq!(
        camel,
        json!([{"userDirectory": "LAB", "userId": "ann", "userName": "ann",
                "attributes": [{"group": "Everyone"}], "sessionId": "r1"}])
    );
    assert_eq!(
        (fake.requests(0), fake.requests(1), fake.qrs_requests()),
        (1, 1, 0)
    );
}

#[tokio::test]
async fn each_virtual_proxy_has_its_own_sessions_and_users() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    fake.set_sessions(0, "", vec![session("joe", "c1"), session("ann", "c2")]);
    fake.set_sessions(0, "sales", vec![session("joe", "s1")]);

    let sales = qps(&fake, &certs, 0, "/qps/sales/session")
        .await
        .unwrap()
        .json();
    assert_eq!(sales[0]["SessionId"], "s1");
    assert_eq!(sales.as_array().unwrap().len(), 1);
    // A prefix the node does not have, here or anywhere.
    assert_eq!(
        qps(&fake, &certs, 0, "/qps/hr/session")
            .await
            .unwrap()
            .status,
        404
    );
    assert_eq!(
        qps(&fake, &certs, 1, "/qps/sales/session")
            .await
            .unwrap()
            .status,
        404
    );

    let joe = qps(&fake, &certs, 0, "/qps/user/LAB/joe")
        .await
        .unwrap()
        .json();
    assert_eq!(joe.as_array().unwrap().len(), 1);
    assert_eq!(joe[0]["SessionId"], "c1");
    let joe_sales = qps(&fake, &certs, 0, "/qps/sales/user/lab/JOE")
        .await
        .unwrap()
        .json();
    assert_eq!(joe_sales[0]["SessionId"], "s1");
    let nobody = qps(&fake, &certs, 0, "/qps/user/LAB/eve")
        .await
        .unwrap()
        .json();
    assert_eq!(nobody, json!([]));

    let one = qps(&fake, &certs, 0, "/qps/session/c2")
        .await
        .unwrap()
        .json();
    assert_eq!(one["UserId"], "ann");
    assert_eq!(
        qps(&fake, &certs, 0, "/qps/session/nope")
            .await
            .unwrap()
            .status,
        404
    );
}

#[tokio::test]
async fn delete_removes_a_session_and_returns_it() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    fake.set_sessions(0, "sales", vec![session("joe", "s1"), session("ann", "s2")]);
    let config = site_client(&certs);
    let delete = |id: &str| {
        let path = format!("/qps/sales/session/{id}?Xrfkey={KEY}");
        let config = config.clone();
        let port = fake.node_port(0);
        async move {
            let headers = [("X-Qlik-Xrfkey", KEY)];
            request(&config, CENTRAL, port, Method::DELETE, &path, &headers)
                .await
                .unwrap()
        }
    };

    let removed = delete("s1").await.json();
    assert_eq!(
        (&removed["UserId"], &removed["SessionId"]),
        (&json!("joe"), &json!("s1"))
    );
    assert_eq!(fake.sessions(0, "sales"), vec![session("ann", "s2")]);
    assert_eq!(delete("s1").await.status, 404);
    let left = qps(&fake, &certs, 0, "/qps/sales/session")
        .await
        .unwrap()
        .json();
    assert_eq!(left.as_array().unwrap().len(), 1);
}

// The guards ----------------------------------------------------------------------------------

#[tokio::test]
async fn the_xrfkey_must_be_sixteen_alphanumerics_in_both_query_and_header() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    let config = site_client(&certs);
    let port = fake.node_port(0);
    let get = |query: &str, header: Option<&'static str>| {
        let path = format!("/qps/session{query}");
        let headers: Vec<(&str, &str)> = header.map(|h| ("X-Qlik-Xrfkey", h)).into_iter().collect();
        let config = config.clone();
        async move {
            request(&config, CENTRAL, port, Method::GET, &path, &headers)
                .await
                .unwrap()
        }
    };

    let refused = [
        get("?Xrfkey=0123456789abcDEF", Some("0123456789abcDEX")).await, // not the same
        get("?Xrfkey=0123456789abc", Some("0123456789abc")).await,       // too short
        get("?Xrfkey=0123456789abc-EF", Some("0123456789abc-EF")).await, // not alphanumeric
        get("?Xrfkey=0123456789abcDEF", None).await,                     // no header
        get("", Some("0123456789abcDEF")).await,                         // no parameter
    ];
    for reply in &refused {
        assert_eq!(reply.status, 403, "{reply:?}");
        assert!(reply.body.contains("XSRF"), "{reply:?}");
    }
    assert_eq!(get("?Xrfkey=0123456789abcDEF", Some(KEY)).await.status, 200);
    assert_eq!((fake.requests(0), fake.forbidden()), (6, 5));
}

#[tokio::test]
async fn the_repository_answers_only_its_service_account() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    let config = site_client(&certs);
    let port = fake.qrs_port();
    let get = |user: Option<&'static str>| {
        let path = format!("/qrs/proxyservice/full?Xrfkey={KEY}");
        let mut headers = vec![("X-Qlik-Xrfkey", KEY)];
        headers.extend(user.map(|u| ("X-Qlik-User", u)));
        let config = config.clone();
        async move {
            request(&config, CENTRAL, port, Method::GET, &path, &headers)
                .await
                .unwrap()
        }
    };

    assert_eq!(get(None).await.status, 403);
    assert_eq!(get(Some("UserDirectory=LAB; UserId=joe")).await.status, 403);
    assert_eq!(
        get(Some("UserDirectory=INTERNAL;UserId=sa_repository"))
            .await
            .status,
        200
    );
    assert_eq!(
        get(Some("UserDirectory=INTERNAL;   UserId=sa_repository"))
            .await
            .status,
        200
    );
    assert_eq!((fake.qrs_requests(), fake.forbidden()), (4, 2));
}

#[tokio::test]
async fn only_a_client_certificate_of_the_site_gets_through_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    let port = fake.node_port(0);
    let path = format!("/qps/session?Xrfkey={KEY}");
    let get = |config: Arc<ClientConfig>, name: &'static str, port: u16| {
        let path = path.clone();
        async move {
            let headers = [("X-Qlik-Xrfkey", KEY)];
            request(&config, name, port, Method::GET, &path, &headers).await
        }
    };

    // No client certificate, or one of another CA: refused during the handshake (with TLS 1.3
    // the client only learns so when it reads, hence any failure, not just `tls:`).
    let anonymous = get(client(&certs.root, None), CENTRAL, port).await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    let other = client(
        &certs.root,
        Some((&certs.other_client_cert, &certs.other_client_key)),
    );
    let foreign = get(other, CENTRAL, port).await;
    assert!(foreign.is_err(), "{foreign:?}");
    // A client that trusts another root does not trust the node.
    let distrusting = client(
        &certs.other_root,
        Some((&certs.client_cert, &certs.client_key)),
    );
    let distrust = get(distrusting, CENTRAL, port).await.unwrap_err();
    assert!(distrust.starts_with("tls:"), "{distrust}");
    // Each node presents its own certificate: the rim node's is not valid for the central name.
    let wrong_node = get(site_client(&certs), CENTRAL, fake.node_port(1))
        .await
        .unwrap_err();
    assert!(wrong_node.starts_with("tls:"), "{wrong_node}");
    assert_eq!(fake.requests(0) + fake.requests(1), 0);

    // The site's own client, by the node's name, `localhost` or its address.
    for name in [CENTRAL, "localhost", "127.0.0.1"] {
        let reply = get(site_client(&certs), name, port).await.unwrap();
        assert_eq!(reply.status, 200, "{name}: {reply:?}");
    }
}

// The switches --------------------------------------------------------------------------------

#[tokio::test]
async fn a_node_can_be_slow_failing_or_down_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());

    fake.set_behaviour(0, Behaviour::Slow(Duration::from_millis(300)));
    let started = Instant::now();
    assert_eq!(
        qps(&fake, &certs, 0, "/qps/session").await.unwrap().status,
        200
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );
    // The other node is not affected.
    let started = Instant::now();
    assert_eq!(
        qps(&fake, &certs, 1, "/qps/session").await.unwrap().status,
        200
    );
    assert!(
        started.elapsed() < Duration::from_millis(300),
        "{:?}",
        started.elapsed()
    );

    fake.set_behaviour(0, Behaviour::Failing(500));
    let failed = qps(&fake, &certs, 0, "/qps/session").await.unwrap();
    assert_eq!(failed.status, 500, "{failed:?}");

    fake.set_behaviour(0, Behaviour::Down);
    let down = qps(&fake, &certs, 0, "/qps/session").await.unwrap_err();
    assert!(down.starts_with("connect:"), "{down}");
    assert_eq!(fake.requests(0), 2, "a refused connection is no request");

    fake.set_behaviour(0, Behaviour::Normal);
    assert_eq!(
        qps(&fake, &certs, 0, "/qps/session").await.unwrap().status,
        200
    );
}

#[tokio::test]
async fn going_down_cuts_a_request_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    fake.set_behaviour(0, Behaviour::Slow(Duration::from_secs(30)));
    let started = Instant::now();
    let in_flight = {
        let (fake, certs) = (&fake, &certs);
        async move { qps(fake, certs, 0, "/qps/session").await }
    };
    let cut = async {
        while fake.requests(0) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        fake.set_behaviour(0, Behaviour::Down);
    };
    let (reply, ()) = tokio::join!(in_flight, cut);
    assert!(reply.is_err(), "{reply:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn the_repository_has_the_same_switches() {
    let dir = tempfile::tempdir().unwrap();
    let (certs, fake) = two_node_site(dir.path());
    fake.set_qrs_behaviour(Behaviour::Failing(503));
    assert_eq!(
        qrs(&fake, &certs, "/qrs/proxyservice/full")
            .await
            .unwrap()
            .status,
        503
    );
    fake.set_qrs_behaviour(Behaviour::Down);
    let down = qrs(&fake, &certs, "/qrs/proxyservice/full")
        .await
        .unwrap_err();
    assert!(down.starts_with("connect:"), "{down}");
    // The nodes are not affected.
    assert_eq!(
        qps(&fake, &certs, 0, "/qps/session").await.unwrap().status,
        200
    );
    fake.set_qrs_behaviour(Behaviour::Normal);
    assert_eq!(
        qrs(&fake, &certs, "/qrs/proxyservice/full")
            .await
            .unwrap()
            .status,
        200
    );
}

// Use from a synchronous test, and the certificate files ---------------------------------------

#[test]
fn a_synchronous_test_can_use_it_without_a_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL]);
    let fake = FakeQlik::start(
        &certs,
        Site {
            nodes: vec![node(CENTRAL, &[""], Casing::Pascal)],
        },
    );
    fake.set_sessions(0, "", vec![session("joe", "q1")]);
    assert_eq!(fake.sessions(0, ""), vec![session("joe", "q1")]);

    let port = fake.node_port(0);
    StdTcpStream::connect(("127.0.0.1", port)).expect("listening");
    fake.set_behaviour(0, Behaviour::Down);
    let refused = StdTcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    fake.set_behaviour(0, Behaviour::Normal);
    StdTcpStream::connect(("127.0.0.1", port)).expect("listening again");

    drop(fake);
    let closed = StdTcpStream::connect(("127.0.0.1", port)).unwrap_err();
    assert_eq!(closed.kind(), std::io::ErrorKind::ConnectionRefused);
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn the_certificates_are_what_qlik_exports() {
    let dir = tempfile::tempdir().unwrap();
    let certs = QlikCerts::generate(dir.path(), &[CENTRAL, RIM]);
    let first_line = |p: &Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned()
    };

    assert_eq!(first_line(&certs.client_key), "-----BEGIN PRIVATE KEY-----");
    let root = openssl(&[
        "x509",
        "-in",
        path(&certs.root),
        "-noout",
        "-subject",
        "-ext",
        "basicConstraints,keyUsage",
    ]);
    assert!(
        root.contains("CN = qs-central-CA")
            && root.contains("CA:TRUE")
            && root.contains("Certificate Sign"),
        "{root}"
    );
    let client = openssl(&[
        "x509",
        "-in",
        path(&certs.client_cert),
        "-noout",
        "-ext",
        "extendedKeyUsage",
    ]);
    assert!(client.contains("TLS Web Client Authentication"), "{client}");
    let chain = openssl(&[
        "verify",
        "-CAfile",
        path(&certs.root),
        "-purpose",
        "sslclient",
        path(&certs.client_cert),
    ]);
    assert!(chain.contains(": OK"), "{chain}");
    let server = dir.path().join(format!("server_{RIM}.pem"));
    let server = openssl(&[
        "x509",
        "-in",
        path(&server),
        "-noout",
        "-ext",
        "subjectAltName,extendedKeyUsage",
    ]);
    assert!(
        server.contains(&format!("DNS:{RIM}, DNS:localhost, IP Address:127.0.0.1")),
        "{server}"
    );
    assert!(server.contains("TLS Web Server Authentication"), "{server}");

    // The same key, encrypted, and in PKCS#1.
    let encrypted = certs.encrypted_client_key("s3cret pass");
    assert_eq!(
        first_line(&encrypted),
        "-----BEGIN ENCRYPTED PRIVATE KEY-----"
    );
    let decrypted = openssl(&[
        "pkey",
        "-in",
        path(&encrypted),
        "-passin",
        "pass:s3cret pass",
    ]);
    assert_eq!(
        decrypted,
        std::fs::read_to_string(&certs.client_key).unwrap()
    );
    assert_ne!(
        certs.encrypted_client_key("other"),
        encrypted,
        "a new file each time"
    );
    let pkcs1 = certs.pkcs1_client_key();
    assert_eq!(first_line(&pkcs1), "-----BEGIN RSA PRIVATE KEY-----");
}
