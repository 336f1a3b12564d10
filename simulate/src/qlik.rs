//! `--qlik-api`: a fake Qlik Sense site consistent with the traffic, so that the service's
//! reconciliation can be watched end to end without Qlik Sense. The site is testkit's
//! ([`session_monitor_testkit::qlik`], faithful to Qlik's documented API); here it only gets
//! one node per simulated proxy and the sessions the traffic has open.

use std::io;
use std::path::Path;
use std::time::{Duration, Instant};

use session_monitor_testkit::qlik::{Casing, FakeQlik, FakeSession, NodeSpec, QlikCerts, Site};

use crate::Traffic;

/// The session lists follow the traffic at most this late; far less than any reconcile interval.
const UPDATE_EVERY: Duration = Duration::from_millis(100);

pub struct SimulatedSite {
    fake: FakeQlik,
    certs: QlikCerts,
    hosts: Vec<String>,
    updated: std::cell::Cell<Option<Instant>>,
}

impl SimulatedSite {
    /// Certificates into `dir` (created if need be), the repository on the first proxy's node.
    pub fn start(dir: &Path, traffic: &Traffic) -> io::Result<SimulatedSite> {
        std::fs::create_dir_all(dir)?;
        let hosts = traffic.proxy_api_hosts();
        let names: Vec<&str> = hosts.iter().map(String::as_str).collect();
        let certs = QlikCerts::generate(dir, &names);
        let site = Site {
            nodes: hosts
                .iter()
                .map(|host| NodeSpec::new(host, &[""], Casing::Pascal))
                .collect(),
        };
        let fake = FakeQlik::start(&certs, site);
        Ok(SimulatedSite {
            fake,
            certs,
            hosts,
            updated: std::cell::Cell::new(None),
        })
    }

    /// The service settings that reconcile with this site, as flags.
    pub fn service_flags(&self) -> Vec<String> {
        let resolve: Vec<String> = self
            .hosts
            .iter()
            .map(|h| format!("{h}=127.0.0.1"))
            .collect();
        let path = |p: &Path| p.display().to_string();
        vec![
            format!(
                "--qlik-repository-url=https://{}:{}",
                self.hosts[0],
                self.fake.qrs_port()
            ),
            format!("--qlik-resolve={}", resolve.join(",")),
            format!("--qlik-client-cert-file={}", path(&self.certs.client_cert)),
            format!("--qlik-client-key-file={}", path(&self.certs.client_key)),
            format!("--qlik-ca-file={}", path(&self.certs.root)),
        ]
    }

    /// Lists the traffic's open sessions on their proxies' nodes, at most every 100 ms.
    pub fn update(&self, traffic: &Traffic) {
        if self
            .updated
            .get()
            .is_none_or(|at| at.elapsed() >= UPDATE_EVERY)
        {
            self.sync(traffic);
        }
    }

    /// Lists the traffic's open sessions on their proxies' nodes now.
    pub fn sync(&self, traffic: &Traffic) {
        self.updated.set(Some(Instant::now()));
        let mut by_proxy: Vec<Vec<FakeSession>> = vec![Vec::new(); self.hosts.len()];
        for s in traffic.open_sessions() {
            by_proxy[s.proxy].push(FakeSession::new(
                &s.user_directory,
                &s.user_id,
                &s.api_session_id,
            ));
        }
        for (node, sessions) in by_proxy.into_iter().enumerate() {
            self.fake.set_sessions(node, "", sessions);
        }
    }
}
