//! A fake Qlik Sense site for tests: the Qlik Repository Service (QRS, on the central node) and
//! each proxy node's Qlik Proxy Service API (QPS), over real sockets, behaving as Qlik's API
//! reference documents them, since Qlik Sense itself cannot run here.
//!
//! Owns: a site's certificates, made with the `openssl` tool ([`QlikCerts`]: a root CA, a
//! certificate per node host name, the client certificate Qlik's QMC exports, and the same from
//! an unrelated CA for negative tests); the servers ([`FakeQlik`]), which require mutual TLS with
//! that root, check the Xrfkey (and, on the QRS, the `X-Qlik-User` header) and answer
//! `GET /qrs/proxyservice/full` and the QPS session endpoints from sessions the test sets; and
//! the switches that make a node (or the QRS) slow, failing or down at run time.
//!
//! The servers run on a runtime of their own in a background thread, so that synchronous
//! `#[test]`s and `#[tokio::test]`s alike can use them; dropping the [`FakeQlik`] stops them.
//!
//! Node 0 of a [`Site`] is the central node: the QRS runs there, with node 0's certificate.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::certs::{issue, make_ca, openssl};

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A site's certificates as files in `dir`, named as Qlik's QMC exports them (`root.pem`,
/// `client.pem`, `client_key.pem`), plus a root and client certificate from an unrelated CA.
/// RSA 2048 keys, as Qlik's own; valid for two days.
#[derive(Clone, Debug)]
pub struct QlikCerts {
    pub dir: PathBuf,
    /// The site's root CA certificate (`root.pem`).
    pub root: PathBuf,
    /// The client certificate every Qlik service and tool uses (`client.pem`, CN=QlikClient).
    pub client_cert: PathBuf,
    /// Its key, unencrypted PKCS#8 (`client_key.pem`).
    pub client_key: PathBuf,
    /// The root of an unrelated CA, which did not issue the site's server certificates.
    pub other_root: PathBuf,
    /// A client certificate and key from that unrelated CA: the site refuses them.
    pub other_client_cert: PathBuf,
    pub other_client_key: PathBuf,
    /// Per host name, the server certificate and key a node presents.
    servers: BTreeMap<String, (PathBuf, PathBuf)>,
}

/// The extensions of a client certificate; X.509 v3 at all because webpki rejects v1.
const CLIENT_EXTENSIONS: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

impl QlikCerts {
    /// The service's flags for these files: `--qlik-client-cert-file=…`, `…-key-file`, `…-ca-file`.
    pub fn service_flags(&self) -> Vec<String> {
        vec![
            format!("--qlik-client-cert-file={}", self.client_cert.display()),
            format!("--qlik-client-key-file={}", self.client_key.display()),
            format!("--qlik-ca-file={}", self.root.display()),
        ]
    }

    /// Makes the site's root CA, one server certificate per host name (each valid for its name,
    /// `localhost` and 127.0.0.1), the client certificate, and the unrelated CA's pair. The
    /// first host name is the central node's: Qlik names the root `<central node>-CA`.
    pub fn generate(dir: &Path, host_names: &[&str]) -> QlikCerts {
        let central = host_names
            .first()
            .expect("QlikCerts::generate needs at least the central node's host name");
        let central_label = central.split('.').next().unwrap_or(central);
        make_ca(dir, "root", &format!("{central_label}-CA"));
        make_ca(dir, "other_root", "unrelated-CA");
        issue(dir, "root", "client", "QlikClient", CLIENT_EXTENSIONS);
        issue(
            dir,
            "other_root",
            "other_client",
            "QlikClient",
            CLIENT_EXTENSIONS,
        );
        let servers = host_names
            .iter()
            .map(|host| {
                let name = format!("server_{host}");
                issue(dir, "root", &name, host, &server_extensions(host));
                let files = (
                    dir.join(format!("{name}.pem")),
                    dir.join(format!("{name}_key.pem")),
                );
                (host.to_string(), files)
            })
            .collect();
        QlikCerts {
            dir: dir.to_owned(),
            root: dir.join("root.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client_key.pem"),
            other_root: dir.join("other_root.pem"),
            other_client_cert: dir.join("other_client.pem"),
            other_client_key: dir.join("other_client_key.pem"),
            servers,
        }
    }

    /// The client key again, as encrypted PKCS#8 PEM (`BEGIN ENCRYPTED PRIVATE KEY`, AES-256-CBC
    /// with PBKDF2), in a new file on every call so that earlier paths stay valid.
    pub fn encrypted_client_key(&self, passphrase: &str) -> PathBuf {
        let path = self.unused_path("client_key_encrypted");
        let (input, output) = (file_arg(&self.client_key), file_arg(&path));
        let pass = format!("pass:{passphrase}");
        openssl(
            &self.dir,
            &[
                "pkcs8",
                "-topk8",
                "-v2",
                "aes-256-cbc",
                "-in",
                &input,
                "-out",
                &output,
                "-passout",
                &pass,
            ],
        );
        path
    }

    /// The client key again, unencrypted in the traditional PKCS#1 form
    /// (`BEGIN RSA PRIVATE KEY`), which older exports and tools produce.
    pub fn pkcs1_client_key(&self) -> PathBuf {
        let path = self.dir.join("client_key_pkcs1.pem");
        let (input, output) = (file_arg(&self.client_key), file_arg(&path));
        openssl(
            &self.dir,
            &["rsa", "-in", &input, "-traditional", "-out", &output],
        );
        path
    }

    /// The server certificate and key of `host`, which [`QlikCerts::generate`] must have had.
    fn server(&self, host: &str) -> &(PathBuf, PathBuf) {
        self.servers.get(host).unwrap_or_else(|| {
            panic!(
                "no server certificate for {host:?}: pass it to QlikCerts::generate (it has {:?})",
                self.servers.keys().collect::<Vec<_>>()
            )
        })
    }

    fn unused_path(&self, stem: &str) -> PathBuf {
        (1..)
            .map(|n| self.dir.join(format!("{stem}_{n}.pem")))
            .find(|path| !path.exists())
            .expect("an unused file name")
    }
}

fn server_extensions(host: &str) -> String {
    format!(
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:{host},DNS:localhost,IP:127.0.0.1\n"
    )
}

fn file_arg(path: &Path) -> String {
    path.to_str().expect("a UTF-8 path").to_owned()
}

// ---------------------------------------------------------------------------------------------
// The site, as the test describes it
// ---------------------------------------------------------------------------------------------

/// The proxy nodes of a site; node 0 is the central node, which also runs the QRS.
#[derive(Clone, Debug)]
pub struct Site {
    pub nodes: Vec<NodeSpec>,
}

#[derive(Clone, Debug)]
pub struct NodeSpec {
    /// The node's host name as the QRS reports it, e.g. `qs-node1.corp.local`; its server
    /// certificate is the one [`QlikCerts::generate`] made for this name.
    pub host_name: String,
    /// The prefixes of the virtual proxies linked to the node's proxy; `""` is the default one.
    pub virtual_proxies: Vec<String>,
    /// How the node's QPS spells the keys of a session.
    pub casing: Casing,
}

impl NodeSpec {
    pub fn new(host_name: &str, virtual_proxies: &[&str], casing: Casing) -> NodeSpec {
        NodeSpec {
            host_name: host_name.into(),
            virtual_proxies: virtual_proxies.iter().map(|p| p.to_string()).collect(),
            casing,
        }
    }
}

/// The keys of the QPS session bodies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Casing {
    /// `UserDirectory`, `UserId`, ...: what real servers return.
    Pascal,
    /// `userDirectory`, `userId`, ...: what Qlik's generated API reference shows.
    Camel,
}

/// A proxy session as the test sets it; the QPS adds the user name and attributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FakeSession {
    pub user_directory: String,
    pub user_id: String,
    pub session_id: String,
}

impl FakeSession {
    pub fn new(user_directory: &str, user_id: &str, session_id: &str) -> FakeSession {
        FakeSession {
            user_directory: user_directory.into(),
            user_id: user_id.into(),
            session_id: session_id.into(),
        }
    }
}

/// How a node's QPS (or the QRS) answers, switchable while the test runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Behaviour {
    Normal,
    /// Waits this long (after counting the request) before answering as usual.
    Slow(Duration),
    /// Answers every request that passes the Xrfkey check with this HTTP status and a text body.
    Failing(u16),
    /// Nothing listens on the port: connecting is refused, and open connections are cut.
    Down,
}

// ---------------------------------------------------------------------------------------------
// The fake
// ---------------------------------------------------------------------------------------------

/// The running site. Dropping it stops every server and closes every port.
pub struct FakeQlik {
    shared: Arc<Shared>,
    qrs_port: u16,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// What the servers and the test share.
struct Shared {
    nodes: Vec<NodeSpec>,
    node_ports: Vec<u16>,
    qrs: Endpoint,
    proxies: Vec<Endpoint>,
    /// Per node, per virtual proxy prefix.
    sessions: Mutex<Vec<BTreeMap<String, Vec<FakeSession>>>>,
    /// Requests answered 403, on the QRS and every node.
    forbidden: AtomicUsize,
}

/// One listening port's switch and counter.
struct Endpoint {
    behaviour: watch::Sender<Behaviour>,
    /// Whether the port is listening: [`Endpoint::set`] waits for it to follow `Down`, so that
    /// the test's next connection already sees the new state.
    listening: AtomicBool,
    requests: AtomicUsize,
}

/// How long switching a port off or on may take before the test fails.
const SWITCH_DEADLINE: Duration = Duration::from_secs(10);

impl Endpoint {
    fn new() -> Endpoint {
        Endpoint {
            behaviour: watch::Sender::new(Behaviour::Normal),
            listening: AtomicBool::new(false),
            requests: AtomicUsize::new(0),
        }
    }

    fn set(&self, behaviour: Behaviour) {
        if let Behaviour::Failing(status) = behaviour {
            StatusCode::from_u16(status)
                .unwrap_or_else(|_| panic!("Behaviour::Failing({status}) is no HTTP status"));
        }
        self.behaviour.send_replace(behaviour);
        let listening = behaviour != Behaviour::Down;
        let deadline = Instant::now() + SWITCH_DEADLINE;
        while self.listening.load(Ordering::SeqCst) != listening {
            assert!(
                Instant::now() < deadline,
                "the fake Qlik port did not switch to {behaviour:?}"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

impl FakeQlik {
    /// Starts the QRS and every node's QPS on free ports of 127.0.0.1, all listening when this
    /// returns.
    pub fn start(certs: &QlikCerts, site: Site) -> FakeQlik {
        FakeQlik::start_on(Ipv4Addr::LOCALHOST, certs, site)
    }

    /// [`FakeQlik::start`] on another address of this machine, e.g. the address pods of a
    /// test cluster reach the host at.
    pub fn start_on(ip: Ipv4Addr, certs: &QlikCerts, site: Site) -> FakeQlik {
        assert!(
            !site.nodes.is_empty(),
            "a site has at least its central node"
        );
        // Reserve the ports first: the QRS must report each node's actual port.
        let qrs_reservation = reserve_port(ip);
        let node_reservations: Vec<_> = site.nodes.iter().map(|_| reserve_port(ip)).collect();
        let qrs_port = qrs_reservation.1.port();
        let qrs_tls = tls_acceptor(certs, &site.nodes[0].host_name);
        let node_tls: Vec<_> = site
            .nodes
            .iter()
            .map(|node| tls_acceptor(certs, &node.host_name))
            .collect();
        let sessions = site
            .nodes
            .iter()
            .map(|node| {
                let prefixes = node.virtual_proxies.iter();
                prefixes
                    .map(|prefix| (prefix.clone(), Vec::new()))
                    .collect()
            })
            .collect();
        let shared = Arc::new(Shared {
            node_ports: node_reservations
                .iter()
                .map(|(_, address)| address.port())
                .collect(),
            proxies: site.nodes.iter().map(|_| Endpoint::new()).collect(),
            nodes: site.nodes,
            qrs: Endpoint::new(),
            sessions: Mutex::new(sessions),
            forbidden: AtomicUsize::new(0),
        });

        let mut ports = vec![(qrs_reservation, qrs_tls, Role::Repository)];
        for (node, (reservation, tls)) in node_reservations.into_iter().zip(node_tls).enumerate() {
            ports.push((reservation, tls, Role::Proxy(node)));
        }
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (shutdown, shutdown_rx) = oneshot::channel();
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fake-qlik".into())
            .spawn(move || run_site(thread_shared, ports, ready_tx, shutdown_rx))
            .expect("spawn the fake Qlik thread");
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the fake Qlik site cannot listen: {e}"),
            Err(_) => panic!("the fake Qlik thread ended before it listened"),
        }
        FakeQlik {
            shared,
            qrs_port,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// The QRS's port (4242 on a real site).
    pub fn qrs_port(&self) -> u16 {
        self.qrs_port
    }

    /// Node `node`'s QPS port (4243 on a real site), as the QRS reports it.
    pub fn node_port(&self, node: usize) -> u16 {
        self.shared.node_ports[self.shared.node_index(node)]
    }

    /// Replaces the sessions of the virtual proxy `prefix` on `node`.
    pub fn set_sessions(&self, node: usize, prefix: &str, sessions: Vec<FakeSession>) {
        *self
            .shared
            .sessions_of(&mut self.shared.sessions(), node, prefix) = sessions;
    }

    /// The sessions of the virtual proxy `prefix` on `node` now (after any `DELETE`s).
    pub fn sessions(&self, node: usize, prefix: &str) -> Vec<FakeSession> {
        self.shared
            .sessions_of(&mut self.shared.sessions(), node, prefix)
            .clone()
    }

    /// Switches node `node`'s QPS; `Down` and back take effect before this returns.
    pub fn set_behaviour(&self, node: usize, behaviour: Behaviour) {
        self.shared.proxies[self.shared.node_index(node)].set(behaviour);
    }

    /// Switches the QRS, as [`FakeQlik::set_behaviour`] does a node.
    pub fn set_qrs_behaviour(&self, behaviour: Behaviour) {
        self.shared.qrs.set(behaviour);
    }

    /// The HTTP requests node `node`'s QPS received (counted on arrival, rejected ones too).
    pub fn requests(&self, node: usize) -> usize {
        let endpoint = &self.shared.proxies[self.shared.node_index(node)];
        endpoint.requests.load(Ordering::SeqCst)
    }

    /// The HTTP requests the QRS received (counted on arrival, rejected ones too).
    pub fn qrs_requests(&self) -> usize {
        self.shared.qrs.requests.load(Ordering::SeqCst)
    }

    /// The requests answered 403 (bad Xrfkey, or no repository user), on the QRS and all nodes.
    pub fn forbidden(&self) -> usize {
        self.shared.forbidden.load(Ordering::SeqCst)
    }
}

impl Drop for FakeQlik {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            // A panic there has already been printed; a second one here would abort.
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn node_index(&self, node: usize) -> usize {
        assert!(
            node < self.nodes.len(),
            "the fake Qlik site has {} nodes, not a node {node}",
            self.nodes.len()
        );
        node
    }

    fn sessions(&self) -> MutexGuard<'_, Vec<BTreeMap<String, Vec<FakeSession>>>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// For the test's calls: an unknown node or prefix is a mistake in the test.
    fn sessions_of<'a>(
        &self,
        all: &'a mut [BTreeMap<String, Vec<FakeSession>>],
        node: usize,
        prefix: &str,
    ) -> &'a mut Vec<FakeSession> {
        let node = self.node_index(node);
        let host = &self.nodes[node].host_name;
        all[node]
            .get_mut(prefix)
            .unwrap_or_else(|| panic!("node {node} ({host}) has no virtual proxy {prefix:?}"))
    }
}

// ---------------------------------------------------------------------------------------------
// Ports, TLS and connections
// ---------------------------------------------------------------------------------------------

/// Which API a port serves.
#[derive(Clone, Copy, Debug)]
enum Role {
    Repository,
    Proxy(usize),
}

/// A socket bound to a free port of 127.0.0.1 that never listens: it keeps the port ours while
/// the endpoint is `Down` (nothing listens, so connecting is refused) and lets the listener bind
/// it again afterwards (both set `SO_REUSEADDR`, and only the listener listens).
fn reserve_port(ip: Ipv4Addr) -> (TcpSocket, SocketAddr) {
    let reserve = || -> io::Result<(TcpSocket, SocketAddr)> {
        let socket = TcpSocket::new_v4()?;
        socket.set_reuseaddr(true)?;
        socket.bind(SocketAddr::from((ip, 0)))?;
        let address = socket.local_addr()?;
        Ok((socket, address))
    };
    reserve().unwrap_or_else(|e| panic!("reserve a port on {ip}: {e}"))
}

fn listen(address: SocketAddr) -> io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

/// Mutual TLS as a Qlik node has it: the node's certificate, and a client certificate issued
/// by the site's root required of every client (none, or another CA's, fails the handshake).
fn tls_acceptor(certs: &QlikCerts, host_name: &str) -> TlsAcceptor {
    // Explicitly ring: no process-wide default provider is assumed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for cert in read_certs(&certs.root) {
        roots.add(cert).expect("the site root is a CA certificate");
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .expect("a client certificate verifier");
    let (cert, key) = certs.server(host_name);
    let key = PrivateKeyDer::from_pem_file(key)
        .unwrap_or_else(|e| panic!("read the server key {}: {e}", key.display()));
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_client_cert_verifier(verifier)
        .with_single_cert(read_certs(cert), key)
        .expect("a usable server certificate and key");
    TlsAcceptor::from(Arc::new(config))
}

fn read_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .unwrap_or_else(|e| panic!("read the certificates in {}: {e}", path.display()))
}

type Port = ((TcpSocket, SocketAddr), TlsAcceptor, Role);

/// The fake's thread: one runtime for all its ports, which listen before `ready` is told, and
/// which all stop (with their connections) when `shutdown` fires or the handle is gone.
fn run_site(
    shared: Arc<Shared>,
    ports: Vec<Port>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
    shutdown: oneshot::Receiver<()>,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            let _ = ready.send(Err(format!("cannot build a runtime: {e}")));
            return;
        }
    };
    runtime.block_on(async move {
        for ((reservation, port), acceptor, role) in ports {
            let listener = match listen(port) {
                Ok(listener) => listener,
                Err(e) => {
                    let _ = ready.send(Err(format!("cannot listen on port {port}: {e}")));
                    return;
                }
            };
            let api = Api {
                shared: shared.clone(),
                role,
            };
            // Both before `ready`: a switch the test makes right after `start` is not missed.
            api.endpoint().listening.store(true, Ordering::SeqCst);
            let behaviour = api.endpoint().behaviour.subscribe();
            tokio::spawn(run_port(
                reservation,
                port,
                listener,
                behaviour,
                acceptor,
                api,
            ));
        }
        let _ = ready.send(Ok(()));
        let _ = shutdown.await;
    });
    // Dropping the runtime here drops every task: listeners, connections, sleeps.
}

/// One port for the fake's lifetime: it serves while its endpoint is up, and while it is
/// `Down` it neither listens nor keeps any connection.
async fn run_port(
    _reservation: TcpSocket,
    port: SocketAddr,
    mut listener: TcpListener,
    mut behaviour: watch::Receiver<Behaviour>,
    acceptor: TlsAcceptor,
    api: Api,
) {
    let endpoint = api.endpoint();
    loop {
        accept_until_down(&listener, &mut behaviour, &acceptor, &api).await;
        drop(listener);
        endpoint.listening.store(false, Ordering::SeqCst);
        if !wait_until_up(&mut behaviour).await {
            return;
        }
        listener = listen_again(port).await;
        endpoint.listening.store(true, Ordering::SeqCst);
    }
}

/// Serves connections until the endpoint goes `Down`; returning drops them all, mid-request.
async fn accept_until_down(
    listener: &TcpListener,
    behaviour: &mut watch::Receiver<Behaviour>,
    acceptor: &TlsAcceptor,
    api: &Api,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                if let Ok((tcp, _)) = accepted {
                    connections.spawn(serve_connection(tcp, acceptor.clone(), api.clone()));
                }
            }
            changed = behaviour.changed() => {
                if changed.is_err() || *behaviour.borrow_and_update() == Behaviour::Down {
                    return;
                }
            }
            // Reaps finished connections so that the set does not grow.
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Whether the endpoint came back up (false: the fake is going away).
async fn wait_until_up(behaviour: &mut watch::Receiver<Behaviour>) -> bool {
    while *behaviour.borrow_and_update() == Behaviour::Down {
        if behaviour.changed().await.is_err() {
            return false;
        }
    }
    true
}

/// Listens on the reserved port again, retrying briefly should the kernel not have let go yet.
async fn listen_again(port: SocketAddr) -> TcpListener {
    let mut attempts = 0;
    loop {
        match listen(port) {
            Ok(listener) => return listener,
            Err(e) if attempts < 100 => {
                attempts += 1;
                eprintln!("fake Qlik: cannot listen on port {port} again yet: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("fake Qlik: cannot listen on port {port} again: {e}"),
        }
    }
}

async fn serve_connection(tcp: TcpStream, acceptor: TlsAcceptor, api: Api) {
    // A missing or foreign client certificate ends here: rustls has sent the client an alert.
    let Ok(tls) = acceptor.accept(tcp).await else {
        return;
    };
    let service = service_fn(move |request| handle(api.clone(), request));
    // Errors here are the client's doing (it hung up, sent garbage): nothing to report.
    let _ = http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

// ---------------------------------------------------------------------------------------------
// The APIs
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Api {
    shared: Arc<Shared>,
    role: Role,
}

type Reply = Response<Full<Bytes>>;

/// The QRS answers only requests made as a user; the exported certificates go with this one.
const REPOSITORY_USER: (&str, &str) = ("INTERNAL", "sa_repository");
/// What Qlik answers when the Xrfkey check fails.
const XSRF_FAILED: &str = "XSRF prevention check failed. Possible XSRF discovered.";

impl Api {
    fn endpoint(&self) -> &Endpoint {
        match self.role {
            Role::Repository => &self.shared.qrs,
            Role::Proxy(node) => &self.shared.proxies[node],
        }
    }
}

/// Every request: counted, delayed if `Slow`, checked (403), failed if `Failing`, then routed.
async fn handle(api: Api, request: Request<Incoming>) -> Result<Reply, Infallible> {
    let endpoint = api.endpoint();
    endpoint.requests.fetch_add(1, Ordering::SeqCst);
    let behaviour = *endpoint.behaviour.borrow();
    if let Behaviour::Slow(delay) = behaviour {
        tokio::time::sleep(delay).await;
    }
    if let Err(why) = check_request(&request, api.role) {
        api.shared.forbidden.fetch_add(1, Ordering::SeqCst);
        return Ok(text(StatusCode::FORBIDDEN, why));
    }
    if let Behaviour::Failing(status) = behaviour {
        let status = StatusCode::from_u16(status).expect("checked when set");
        return Ok(text(status, "The fake Qlik service is failing on purpose."));
    }
    let (method, path) = (request.method(), request.uri().path());
    Ok(match api.role {
        Role::Repository => repository(&api.shared, method, path),
        Role::Proxy(node) => proxy(&api.shared, node, method, path),
    })
}

/// The checks both APIs make before anything else, and the QRS's user header.
fn check_request(request: &Request<Incoming>, role: Role) -> Result<(), &'static str> {
    check_xrfkey(request)?;
    if let Role::Repository = role {
        let user = request.headers().get("X-Qlik-User");
        if !user
            .and_then(|v| v.to_str().ok())
            .is_some_and(is_repository_user)
        {
            return Err("X-Qlik-User must be UserDirectory=INTERNAL; UserId=sa_repository.");
        }
    }
    Ok(())
}

/// Qlik's cross-site request forgery guard: the `Xrfkey` query parameter and the
/// `X-Qlik-Xrfkey` header, equal, and 16 characters of `0-9a-zA-Z`.
fn check_xrfkey(request: &Request<Incoming>) -> Result<(), &'static str> {
    let query = request.uri().query().unwrap_or("").split('&');
    let in_query = query
        .filter_map(|pair| pair.split_once('='))
        .find_map(|(name, value)| name.eq_ignore_ascii_case("xrfkey").then_some(value));
    let in_header = request
        .headers()
        .get("X-Qlik-Xrfkey")
        .map(HeaderValue::as_bytes);
    match (in_query, in_header) {
        (Some(key), Some(header)) if key.as_bytes() == header && is_xrfkey(key) => Ok(()),
        _ => Err(XSRF_FAILED),
    }
}

fn is_xrfkey(key: &str) -> bool {
    key.len() == 16 && key.bytes().all(|b| b.is_ascii_alphanumeric())
}

/// `UserDirectory=INTERNAL; UserId=sa_repository`, in any order, any case, any spaces.
fn is_repository_user(header: &str) -> bool {
    let (mut directory, mut user) = (None, None);
    for part in header.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = part.split_once('=') else {
            return false;
        };
        match name.trim().to_ascii_lowercase().as_str() {
            "userdirectory" => directory = Some(value.trim()),
            "userid" => user = Some(value.trim()),
            _ => {}
        }
    }
    directory.is_some_and(|d| d.eq_ignore_ascii_case(REPOSITORY_USER.0))
        && user.is_some_and(|u| u.eq_ignore_ascii_case(REPOSITORY_USER.1))
}

// The QRS ------------------------------------------------------------------------------------

/// Only `GET /qrs/proxyservice/full` (QRS paths are case-insensitive).
fn repository(shared: &Shared, method: &Method, path: &str) -> Reply {
    let path = path.trim_end_matches('/').to_ascii_lowercase();
    match (method, path.as_str()) {
        (&Method::GET, "/qrs/proxyservice/full") => {
            json_reply(StatusCode::OK, proxy_services(shared))
        }
        _ => not_found(),
    }
}

/// Every proxy service of the site, as the QRS describes them in full (the fields a client
/// would use, and a few around them that it must not mistake for them).
fn proxy_services(shared: &Shared) -> Value {
    // A virtual proxy is one object, linked to every proxy that has it: one id per prefix.
    let mut prefixes: Vec<&String> = shared
        .nodes
        .iter()
        .flat_map(|n| &n.virtual_proxies)
        .collect();
    prefixes.sort();
    prefixes.dedup();
    let services = shared.nodes.iter().zip(&shared.node_ports).enumerate();
    let services = services.map(|(index, (node, port))| {
        let virtual_proxies: Vec<Value> = node
            .virtual_proxies
            .iter()
            .map(|prefix| {
                let id = prefixes
                    .iter()
                    .position(|p| *p == prefix)
                    .expect("listed above");
                virtual_proxy(prefix, id)
            })
            .collect();
        json!({
            "id": guid(1, index),
            "serverNodeConfiguration": {
                "id": guid(2, index),
                "name": if index == 0 { "Central" } else { first_label(&node.host_name) },
                "hostName": node.host_name,
                "isCentral": index == 0,
            },
            "settings": {
                "id": guid(3, index),
                "listenPort": 443,
                "unencryptedListenPort": 80,
                "allowHttp": false,
                "restListenPort": port,
                "virtualProxies": virtual_proxies,
            },
        })
    });
    Value::Array(services.collect())
}

fn virtual_proxy(prefix: &str, id: usize) -> Value {
    let (description, cookie) = match prefix {
        "" => (
            "Central Proxy (Default)".to_owned(),
            "X-Qlik-Session".to_owned(),
        ),
        prefix => (
            format!("{prefix} virtual proxy"),
            format!("X-Qlik-Session-{prefix}"),
        ),
    };
    json!({
        "id": guid(4, id),
        "prefix": prefix,
        "description": description,
        "sessionCookieHeaderName": cookie,
        "sessionInactivityTimeout": 30,
    })
}

/// A stable, well-formed id: the kind of object, and its index among its kind.
fn guid(kind: u32, index: usize) -> String {
    format!("{kind:08x}-0000-4000-8000-{index:012x}")
}

fn first_label(host: &str) -> &str {
    host.split('.').next().unwrap_or(host)
}

// The QPS ------------------------------------------------------------------------------------

/// `/qps/{prefix/}session`, `/qps/{prefix/}session/{id}` (GET, DELETE) and
/// `/qps/{prefix/}user/{directory}/{id}`; the prefix is left out for the default virtual proxy.
fn proxy(shared: &Shared, node: usize, method: &Method, path: &str) -> Reply {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();
    let Some(("qps", rest)) = segments.split_first().map(|(first, rest)| (*first, rest)) else {
        return not_found();
    };
    // The default virtual proxy's paths go straight to the resource.
    let (prefix, resource) = match rest {
        [first, ..] if *first == "session" || *first == "user" => ("", rest),
        [prefix, resource @ ..] => (*prefix, resource),
        [] => return not_found(),
    };
    let casing = shared.nodes[node].casing;
    let mut all = shared.sessions();
    let Some(sessions) = all[node].get_mut(prefix) else {
        return text(StatusCode::NOT_FOUND, "No such virtual proxy.");
    };
    match (method, resource) {
        (&Method::GET, ["session"]) => session_list(sessions.iter(), casing),
        (&Method::GET, ["session", id]) => match sessions.iter().find(|s| s.session_id == *id) {
            Some(session) => json_reply(StatusCode::OK, session_json(session, casing)),
            None => not_found(),
        },
        (&Method::DELETE, ["session", id]) => {
            match sessions.iter().position(|s| s.session_id == *id) {
                Some(at) => json_reply(StatusCode::OK, session_json(&sessions.remove(at), casing)),
                None => not_found(),
            }
        }
        (&Method::GET, ["user", directory, user]) => session_list(
            sessions.iter().filter(|s| {
                // Qlik compares user directories and ids without regard to case.
                s.user_directory.eq_ignore_ascii_case(directory)
                    && s.user_id.eq_ignore_ascii_case(user)
            }),
            casing,
        ),
        _ => not_found(),
    }
}

fn session_list<'a>(sessions: impl Iterator<Item = &'a FakeSession>, casing: Casing) -> Reply {
    let list = sessions.map(|s| session_json(s, casing)).collect();
    json_reply(StatusCode::OK, Value::Array(list))
}

/// A session as the QPS describes it; the user name is the user id, and every user has one
/// attribute, so that a client meets the nested array it has to skip.
fn session_json(session: &FakeSession, casing: Casing) -> Value {
    let FakeSession {
        user_directory,
        user_id,
        session_id,
    } = session;
    match casing {
        Casing::Pascal => json!({
            "UserDirectory": user_directory,
            "UserId": user_id,
            "UserName": user_id,
            "Attributes": [{"Group": "Everyone"}],
            "SessionId": session_id,
        }),
        Casing::Camel => json!({
            "userDirectory": user_directory,
            "userId": user_id,
            "userName": user_id,
            "attributes": [{"group": "Everyone"}],
            "sessionId": session_id,
        }),
    }
}

/// `%XX` escapes in a path segment (user ids may hold spaces, `@`, `\`); anything malformed is
/// kept as it is.
fn percent_decode(segment: &str) -> String {
    let bytes = segment.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| segment.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                i += 3;
            }
            None => {
                decoded.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&decoded).into_owned()
}

// Replies ------------------------------------------------------------------------------------

fn json_reply(status: StatusCode, body: Value) -> Reply {
    reply(status, "application/json; charset=utf-8", body.to_string())
}

fn text(status: StatusCode, body: &str) -> Reply {
    reply(status, "text/plain; charset=utf-8", body.to_owned())
}

fn not_found() -> Reply {
    text(StatusCode::NOT_FOUND, "Not found.")
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}
