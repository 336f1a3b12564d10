//! Requests to the Qlik APIs: mutual TLS with the certificates exported from the QMC, the
//! Xrfkey pair, a deadline per request. One connection per request: a reconcile makes a few
//! requests a minute, so a pool would only keep sockets open for nothing.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;

use super::api;
use super::settings::{ApiAddress, Passphrase, QlikConfig, QlikTls};

/// A session list of 100,000 sessions is about 20 MB; anything far beyond is not a Qlik answer.
const MAX_BODY_BYTES: usize = 256 * 1024 * 1024;

/// The certificates could not be loaded; names the setting and the file.
#[derive(Debug, thiserror::Error)]
#[error("{setting} ({path}): {message}")]
pub struct TlsSetupError {
    pub setting: &'static str,
    pub path: String,
    pub message: String,
}

/// Why a request failed, with a closed set of reasons for the metrics.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("cannot resolve {host}: {message}")]
    Resolve { host: String, message: String },
    #[error("cannot connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("no answer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("HTTP: {0}")]
    Http(String),
    #[error("unexpected answer: {0}")]
    Body(String),
}

impl RequestError {
    /// The `reason` label of `qlik_api_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            RequestError::Resolve { .. } => "resolve",
            RequestError::Connect(_) => "connect",
            RequestError::Tls(_) => "tls",
            RequestError::Timeout(_) => "timeout",
            RequestError::Status {
                status: 401 | 403, ..
            } => "forbidden",
            RequestError::Status { .. } => "status",
            RequestError::Http(_) => "http",
            RequestError::Body(_) => "body",
        }
    }

    pub const REASONS: [&'static str; 8] = [
        "resolve",
        "connect",
        "tls",
        "timeout",
        "forbidden",
        "status",
        "http",
        "body",
    ];
}

pub struct QlikClient {
    tls: tokio_rustls::TlsConnector,
    /// For the messages: which files a TLS failure points at.
    files: QlikTls,
    resolve: Vec<(String, IpAddr)>,
    timeout: Duration,
    rng: Mutex<fastrand::Rng>,
}

impl QlikClient {
    pub fn new(config: &QlikConfig) -> Result<QlikClient, TlsSetupError> {
        let tls = tls_config(&config.tls)?;
        Ok(QlikClient {
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
            files: config.tls.clone(),
            resolve: config.resolve.clone(),
            timeout: config.request_timeout,
            rng: Mutex::new(fastrand::Rng::new()),
        })
    }

    /// `GET path` on `address`, as the repository's service account when `as_repository_user`,
    /// within the request timeout; the body of a 2xx answer.
    pub async fn get(
        &self,
        address: &ApiAddress,
        path: &str,
        as_repository_user: bool,
    ) -> Result<Bytes, RequestError> {
        let xrfkey = api::xrfkey(&mut self.rng.lock().unwrap_or_else(|e| e.into_inner()));
        let request = self.request(address, path, &xrfkey, as_repository_user);
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result,
            Err(_) => Err(RequestError::Timeout(self.timeout)),
        }
    }

    async fn request(
        &self,
        address: &ApiAddress,
        path: &str,
        xrfkey: &str,
        as_repository_user: bool,
    ) -> Result<Bytes, RequestError> {
        let ip = self.address_of(&address.host).await?;
        let tcp = TcpStream::connect(SocketAddr::new(ip, address.port))
            .await
            .map_err(RequestError::Connect)?;
        let _ = tcp.set_nodelay(true);
        let server_name = match address.host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(address.host.clone()).map_err(|e| {
                RequestError::Tls(format!("{:?} is not a host name: {e}", address.host))
            })?,
        };
        let tls = self
            .tls
            .connect(server_name, tcp)
            .await
            .map_err(|e| RequestError::Tls(self.explain(&e)))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| self.http_error(&e))?;
        let connection = tokio::spawn(connection);
        let separator = if path.contains('?') { '&' } else { '?' };
        let mut request = http::Request::get(format!("{path}{separator}Xrfkey={xrfkey}"))
            .header(http::header::HOST, address.host.as_str())
            .header("X-Qlik-Xrfkey", xrfkey)
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::USER_AGENT,
                concat!("session-monitor/", env!("CARGO_PKG_VERSION")),
            );
        if as_repository_user {
            request = request.header("X-Qlik-User", api::QRS_USER_HEADER);
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .map_err(|e| RequestError::Http(e.to_string()))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.http_error(&e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|e| RequestError::Body(e.to_string()))?
            .to_bytes();
        connection.abort();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&body[..body.len().min(200)])
                .trim()
                .to_owned();
            return Err(RequestError::Status {
                status: status.as_u16(),
                body: text,
            });
        }
        Ok(body)
    }

    async fn address_of(&self, host: &str) -> Result<IpAddr, RequestError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(ip);
        }
        if let Some((_, ip)) = self
            .resolve
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(host))
        {
            return Ok(*ip);
        }
        let resolve_error = |message: String| RequestError::Resolve {
            host: host.to_owned(),
            message,
        };
        tokio::net::lookup_host((host, 0))
            .await
            .map_err(|e| {
                resolve_error(format!(
                    "{e} (set qlik_resolve if this machine cannot resolve Qlik's names)"
                ))
            })?
            .next()
            .map(|a| a.ip())
            .ok_or_else(|| resolve_error("no address".to_owned()))
    }

    /// An HTTP-phase failure; with TLS 1.3 the server's refusal of our certificate arrives
    /// only now, as an alert inside the I/O error.
    fn http_error(&self, error: &hyper::Error) -> RequestError {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io
                    .get_ref()
                    .and_then(|i| i.downcast_ref::<rustls::Error>())
                    .is_some()
            {
                return RequestError::Tls(self.explain(io));
            }
            source = e.source();
        }
        RequestError::Http(error.to_string())
    }

    /// A TLS failure in words that name the setting to look at.
    fn explain(&self, error: &std::io::Error) -> String {
        let tls = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>());
        let ca = self
            .files
            .ca_file
            .as_deref()
            .map_or("-".into(), |p| p.display().to_string());
        let cert = self.files.client_cert.display();
        match tls {
            Some(rustls::Error::InvalidCertificate(reason)) => format!(
                "the node's certificate is not trusted ({reason:?}); qlik_ca_file ({ca}) must be the site's root.pem"
            ),
            Some(rustls::Error::AlertReceived(alert)) => format!(
                "the node refused the client certificate (alert {alert:?}); qlik_client_cert_file ({cert}) must be the client.pem exported from this site's QMC"
            ),
            Some(other) => format!("{other}"),
            None => error.to_string(),
        }
    }
}

fn tls_config(files: &QlikTls) -> Result<rustls::ClientConfig, TlsSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| setup_error("qlik_client_cert_file", &files.client_cert, e.to_string()))?;
    let builder = match (&files.ca_file, files.verify) {
        (Some(ca), true) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in read_certs("qlik_ca_file", ca)? {
                roots
                    .add(cert)
                    .map_err(|e| setup_error("qlik_ca_file", ca, e.to_string()))?;
            }
            builder.with_root_certificates(roots)
        }
        (_, false) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider))),
        (None, true) => unreachable!("validated: verification needs qlik_ca_file"),
    };
    let chain = read_certs("qlik_client_cert_file", &files.client_cert)?;
    // Checked before rustls, whose answer for it (`UnsupportedCertVersion`, from the key check)
    // would otherwise read as a key that does not fit.
    if let Some(version) = x509_version(&chain[0])
        && version != 3
    {
        return Err(setup_error(
            "qlik_client_cert_file",
            &files.client_cert,
            format!("is an X.509 version {version} certificate, {NOT_V3}"),
        ));
    }
    let key = read_key(files)?;
    builder
        .with_client_auth_cert(chain, key)
        .map_err(|e| match e {
            rustls::Error::InvalidCertificate(reason) => {
                let message = if format!("{reason:?}").contains("UnsupportedCertVersion") {
                    format!("is not an X.509 version 3 certificate, {NOT_V3}")
                } else {
                    format!("the first certificate cannot be used for TLS client authentication ({reason:?})")
                };
                setup_error("qlik_client_cert_file", &files.client_cert, message)
            }
            _ => setup_error(
                "qlik_client_key_file",
                &files.client_key,
                format!("does not fit the client certificate: {e}"),
            ),
        })
}

/// What to do about a client certificate of X.509 version 1 or 2.
const NOT_V3: &str = "which TLS client authentication refuses; export the client certificate from the QMC (Certificates, export, Windows format or PEM), which writes version 3";

/// The X.509 version (1, 2 or 3) of a DER certificate, `None` if it is not DER this reads.
/// `Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] EXPLICIT version DEFAULT v1, ...`:
/// a version 1 certificate has no `[0]` element, a later one holds `INTEGER version - 1`.
fn x509_version(der: &[u8]) -> Option<u8> {
    /// The tag and the contents of the DER element at the start of `input`.
    fn element(input: &[u8]) -> Option<(u8, &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, rest) = rest.split_first()?;
        let (len, rest) = if first < 0x80 {
            (usize::from(first), rest)
        } else {
            let count = usize::from(first & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let len = bytes
                .iter()
                .fold(0usize, |len, &b| (len << 8) | usize::from(b));
            (len, rest)
        };
        rest.get(..len).map(|contents| (tag, contents))
    }
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0; // context-specific, constructed, [0]
    const INTEGER: u8 = 0x02;
    let (SEQUENCE, certificate) = element(der)? else {
        return None;
    };
    let (SEQUENCE, tbs) = element(certificate)? else {
        return None;
    };
    match element(tbs)? {
        (VERSION, explicit) => match element(explicit)? {
            (INTEGER, &[v]) if v <= 2 => Some(v + 1),
            _ => None,
        },
        // serialNumber first: the version is the default, v1.
        (INTEGER, _) => Some(1),
        _ => None,
    }
}

fn setup_error(setting: &'static str, path: &Path, message: String) -> TlsSetupError {
    TlsSetupError {
        setting,
        path: path.display().to_string(),
        message,
    }
}

fn read_certs(
    setting: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| setup_error(setting, path, e.to_string()))?;
    if certs.is_empty() {
        return Err(setup_error(
            setting,
            path,
            "no PEM certificate in it".into(),
        ));
    }
    Ok(certs)
}

/// The client key: PEM, PKCS#8 (encrypted when a passphrase is given), PKCS#1 or SEC1.
fn read_key(files: &QlikTls) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    const SETTING: &str = "qlik_client_key_file";
    let path = &files.client_key;
    let text =
        std::fs::read_to_string(path).map_err(|e| setup_error(SETTING, path, e.to_string()))?;
    if text.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        let passphrase = match &files.key_passphrase {
            Some(Passphrase::Value(secret)) => secret.0.clone(),
            Some(Passphrase::File(file)) => std::fs::read_to_string(file)
                .map_err(|e| setup_error("qlik_client_key_passphrase_file", file, e.to_string()))?
                .trim_end_matches(['\r', '\n'])
                .to_owned(),
            None => {
                return Err(setup_error(
                    SETTING,
                    path,
                    "the key is encrypted: set qlik_client_key_passphrase_file or SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE".into(),
                ));
            }
        };
        use pkcs8::der::pem::PemLabel;
        let (label, der) = pkcs8::der::pem::decode_vec(text.trim().as_bytes())
            .map_err(|e| setup_error(SETTING, path, e.to_string()))?;
        if label != pkcs8::EncryptedPrivateKeyInfo::PEM_LABEL {
            return Err(setup_error(
                SETTING,
                path,
                "one PEM block per key file, please".into(),
            ));
        }
        let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der.as_slice())
            .map_err(|e| setup_error(SETTING, path, e.to_string()))?;
        let plain = info.decrypt(passphrase.as_bytes()).map_err(|_| {
            setup_error(
                SETTING,
                path,
                "cannot decrypt the key: wrong passphrase?".into(),
            )
        })?;
        return Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            plain.as_bytes().to_vec(),
        )));
    }
    if text.contains("Proc-Type: 4,ENCRYPTED") {
        return Err(setup_error(
            SETTING,
            path,
            "an OpenSSL-encrypted key is not read; convert it once: openssl pkcs8 -topk8 -in client_key.pem -out client_key.p8.pem".into(),
        ));
    }
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| setup_error(SETTING, path, e.to_string()))
}

/// `qlik_insecure_skip_tls_verify`: any server certificate is accepted, but signatures are
/// still checked, so the connection is still encrypted to whoever answered.
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `openssl` in `dir`; its standard output.
    fn openssl(dir: &Path, args: &[&str]) -> String {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!("the openssl command is needed to make this test's certificates: {e}")
            });
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn version_line(dir: &Path, pem: &str) -> String {
        openssl(dir, &["x509", "-in", pem, "-noout", "-text"])
            .lines()
            .find(|l| l.trim_start().starts_with("Version:"))
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    /// A self-signed X.509 version 1 certificate, `{name}.pem` and `{name}_key.pem` in `dir`.
    fn make_v1(dir: &Path, name: &str) {
        let (key, csr, pem) = (
            format!("{name}_key.pem"),
            format!("{name}.csr"),
            format!("{name}.pem"),
        );
        openssl(
            dir,
            &[
                "req",
                "-new",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=client",
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
        );
        // Without extensions, `x509 -req` writes version 1 (OpenSSL 3.0).
        openssl(
            dir,
            &[
                "x509", "-req", "-in", &csr, "-days", "1", "-signkey", &key, "-out", &pem,
            ],
        );
        if !version_line(dir, &pem).starts_with("Version: 1") {
            // A later OpenSSL that adds extensions there has `req -x509v1` for version 1.
            openssl(
                dir,
                &[
                    "req",
                    "-x509v1",
                    "-key",
                    &key,
                    "-subj",
                    "/CN=client",
                    "-days",
                    "1",
                    "-out",
                    &pem,
                ],
            );
        }
        let version = version_line(dir, &pem);
        assert!(version.starts_with("Version: 1"), "{pem}: {version}");
    }

    /// A self-signed version 3 certificate, `{name}.pem` and `{name}_key.pem` in `dir`.
    fn make_v3(dir: &Path, name: &str) {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "1",
                "-subj",
                "/CN=client",
                "-keyout",
                &format!("{name}_key.pem"),
                "-out",
                &format!("{name}.pem"),
            ],
        );
        let version = version_line(dir, &format!("{name}.pem"));
        assert!(version.starts_with("Version: 3"), "{name}.pem: {version}");
    }

    fn files(dir: &Path, cert: &str, key: &str) -> QlikTls {
        QlikTls {
            client_cert: dir.join(format!("{cert}.pem")),
            client_key: dir.join(format!("{key}_key.pem")),
            key_passphrase: None,
            ca_file: None,
            verify: false,
        }
    }

    fn first_der(path: &Path) -> CertificateDer<'static> {
        read_certs("test", path).unwrap().remove(0)
    }

    #[test]
    fn a_version_1_client_certificate_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        make_v1(dir.path(), "client");
        assert_eq!(
            x509_version(&first_der(&dir.path().join("client.pem"))),
            Some(1)
        );

        let error = tls_config(&files(dir.path(), "client", "client")).unwrap_err();
        assert_eq!(error.setting, "qlik_client_cert_file", "{error}");
        let text = error.to_string();
        assert!(text.starts_with("qlik_client_cert_file ("), "{text}");
        assert!(text.contains("version 1"), "{text}");
        assert!(
            text.contains("export the client certificate from the QMC"),
            "{text}"
        );
        assert!(!text.contains("qlik_client_key_file"), "{text}");
    }

    #[test]
    fn a_key_of_another_certificate_is_still_the_keys_fault() {
        let dir = tempfile::tempdir().unwrap();
        make_v3(dir.path(), "client");
        make_v3(dir.path(), "other");
        assert_eq!(
            x509_version(&first_der(&dir.path().join("client.pem"))),
            Some(3)
        );

        tls_config(&files(dir.path(), "client", "client")).expect("a matching pair loads");
        let error = tls_config(&files(dir.path(), "client", "other")).unwrap_err();
        assert_eq!(error.setting, "qlik_client_key_file", "{error}");
        assert!(
            error
                .message
                .contains("does not fit the client certificate"),
            "{error}"
        );
    }

    #[test]
    fn the_version_is_read_from_the_der_or_not_at_all() {
        // SEQUENCE { SEQUENCE { [0] { INTEGER 1 } ... } }: version 2.
        assert_eq!(
            x509_version(&[0x30, 0x07, 0x30, 0x05, 0xa0, 0x03, 0x02, 0x01, 0x01]),
            Some(2)
        );
        // Long-form lengths; the serial number first: version 1.
        assert_eq!(
            x509_version(&[0x30, 0x81, 0x05, 0x30, 0x81, 0x02, 0x02, 0x00]),
            Some(1)
        );
        assert_eq!(x509_version(&[]), None);
        assert_eq!(x509_version(&[0x30, 0x05, 0x30]), None);
        assert_eq!(x509_version(b"-----BEGIN CERTIFICATE-----"), None);
    }
}
