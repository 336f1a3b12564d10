//! `session-monitor-simulate`: realistic Qlik Sense proxy traffic as UDP datagrams, for demos,
//! manual checks and benchmarks.
//!
//! [`Traffic`] is the pure part: a seeded state machine of user journeys (log in on a proxy, open
//! and close apps, maybe a second session, log out, come back later) rendered in the three wire
//! formats the parser reads, plus a share of deliberately malformed datagrams. [`run`] paces it onto a
//! UDP socket. Every well-formed datagram is consistent with what came before it, so a correct
//! receiver never sees a stop for a session that was not started.

use std::collections::HashSet;
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use session_monitor::parser::{Command, Format};

pub mod datagram;
pub mod qlik;

pub use datagram::Datagram;

/// Options of `session-monitor-simulate`.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "session-monitor-simulate",
    version,
    about = "Sends realistic Qlik Sense proxy traffic (all three formats, some malformed) to a session-monitor"
)]
pub struct SimulateArgs {
    /// Where to send, HOST:PORT
    #[arg(long, default_value = "127.0.0.1:9997")]
    pub target: String,
    /// Distinct users
    #[arg(long, default_value_t = 200)]
    pub users: usize,
    /// Datagrams per second (0 = as fast as possible)
    #[arg(long, default_value_t = 1000)]
    pub rate: u64,
    /// Seconds to run
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Proxy hosts
    #[arg(long, default_value_t = 3)]
    pub proxies: usize,
    /// Share of malformed datagrams, 0.0–1.0
    #[arg(long, default_value_t = 0.01)]
    pub malformed: f64,
    /// Seed for reproducible traffic
    #[arg(long)]
    pub seed: Option<u64>,
    /// Also serve a fake Qlik Sense site (the repository and one proxy API per proxy) listing
    /// the sessions the traffic has open, with its certificates written to this directory; the
    /// service flags that use it are printed at start
    #[arg(long, value_name = "DIR")]
    pub qlik_api: Option<std::path::PathBuf>,
    /// Share of session stops not sent, as if lost on the way, 0.0–1.0: without reconciliation
    /// with the Qlik API, the service's count drifts up
    #[arg(long, default_value_t = 0.0)]
    pub lose_stops: f64,
}

/// What one [`run`] sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulateReport {
    /// All datagrams, malformed ones included.
    pub sent: u64,
    /// Session stops not sent (`--lose-stops`).
    pub lost_stops: u64,
    /// Users with a session open at the end: what a correct receiver counts.
    pub active_users: usize,
    pub malformed: u64,
    /// Well-formed datagrams per command, in [`Command::ALL`] order.
    pub by_command: [u64; 4],
    pub elapsed: Duration,
}

impl SimulateReport {
    fn record(&mut self, kind: Kind) {
        self.sent += 1;
        match kind {
            Kind::Malformed => self.malformed += 1,
            Kind::Event(command) => {
                let i = Command::ALL.iter().position(|&c| c == command);
                self.by_command[i.expect("Command::ALL lists every command")] += 1;
            }
        }
    }
}

/// Sends [`Traffic`] to `args.target` for `args.duration` seconds at `args.rate` datagrams per
/// second. Blocking; prints nothing but, with `--qlik-api`, the service flags that use the fake
/// site, which `started` is given before the first datagram (the caller reports the rest).
pub fn run(
    args: &SimulateArgs,
    started: impl FnOnce(Option<&qlik::SimulatedSite>),
) -> io::Result<SimulateReport> {
    let mut rng = args
        .seed
        .map_or_else(fastrand::Rng::new, fastrand::Rng::with_seed);
    if !(0.0..=1.0).contains(&args.lose_stops) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "--lose-stops must be between 0.0 and 1.0",
        ));
    }
    let mut loss = fastrand::Rng::with_seed(rng.u64(..));
    let mut traffic = Traffic::new(args.users, args.proxies, args.malformed, rng)?;
    let site = match &args.qlik_api {
        Some(dir) => Some(qlik::SimulatedSite::start(dir, &traffic)?),
        None => None,
    };
    started(site.as_ref());
    let target = resolve(&args.target)?;
    // Unconnected, like a log4net UdpAppender: fire and forget. A connected socket would turn the
    // ICMP "port unreachable" of a receiver that is not up yet (or restarting) into send errors.
    let local: SocketAddr = if target.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(local)?;

    let mut report = SimulateReport {
        sent: 0,
        lost_stops: 0,
        active_users: 0,
        malformed: 0,
        by_command: [0; 4],
        elapsed: Duration::ZERO,
    };
    let batch = batch_size(args.rate);
    let start = Instant::now();
    // `None`: a duration too long to represent, i.e. run until killed.
    let deadline = start.checked_add(Duration::from_secs(args.duration));
    let mut datagram = Vec::with_capacity(16 * 1024);
    while deadline.is_none_or(|d| Instant::now() < d) {
        for _ in 0..batch {
            let kind = traffic.next_into(&mut datagram);
            if kind == Kind::Event(Command::StopSession) && loss.f64() < args.lose_stops {
                report.lost_stops += 1;
                continue;
            }
            socket.send_to(&datagram, target)?;
            report.record(kind);
        }
        if let Some(site) = &site {
            site.update(&traffic);
        }
        if args.rate > 0 {
            // Sleep until the schedule (datagram n is due at n / rate) catches up with what was
            // sent. This holds the average rate without spinning; when sending falls behind the
            // schedule there is no sleep, so the rate catches up too.
            let due = start + Duration::from_secs_f64(report.sent as f64 / args.rate as f64);
            let wake = deadline.map_or(due, |d| due.min(d));
            if let Some(pause) = wake.checked_duration_since(Instant::now()) {
                std::thread::sleep(pause);
            }
        }
    }
    report.elapsed = start.elapsed();
    report.active_users = traffic.active_users();
    if let Some(site) = &site {
        site.sync(&traffic);
    }
    Ok(report)
}

fn resolve(target: &str) -> io::Result<SocketAddr> {
    let invalid = |why: &dyn fmt::Display| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("--target {target}: {why}"),
        )
    };
    target
        .to_socket_addrs()
        .map_err(|e| invalid(&e))?
        .next()
        .ok_or_else(|| invalid(&"resolves to no address"))
}

/// Datagrams sent between two looks at the clock. About 100 sleeps per second at the requested
/// rate: smooth enough for any receiver, coarse enough that sleep overhead does not cap the rate.
fn batch_size(rate: u64) -> u64 {
    match rate {
        0 => 256,
        rate => (rate / 100).clamp(1, 256),
    }
}

/// One open session as a proxy's API lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenSession {
    /// Index into [`Traffic::proxy_hosts`].
    pub proxy: usize,
    pub user_directory: String,
    pub user_id: String,
    pub api_session_id: String,
}

/// Turns a logged session id into the API's: the proxy logs a salted hash of its session id,
/// so the two differ (the bits of a v4 GUID's version and variant stay as they are).
const API_ID_SALT: u128 = 0x5a5a_5a5a_5a5a_0a5a_3a5a_5a5a_5a5a_5a5a;

/// What [`Traffic::next_into`] produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A well-formed event, consistent with every event before it.
    Event(Command),
    /// A datagram the service must reject; it changes no journey.
    Malformed,
}

/// Each proxy gets one appender configuration, in this order, so that every format is exercised
/// as soon as there are three proxies.
const FORMAT_ROTATION: [Format; 3] = [Format::SessionMonitor, Format::Butler, Format::ButlerSos];

/// A user has at most this many sessions at once (e.g. two browsers, or two proxies).
const MAX_SESSIONS: usize = 2;
/// Open connections per session at most (a few browser tabs).
const MAX_OPEN_CONNECTIONS: u32 = 4;

const APPS: usize = 12;

/// (directory, whether its user ids look like `anna.berg` rather than `aberg42`).
const DIRECTORIES: [(&str, bool); 4] = [
    ("LAB", true),
    ("CORP", false),
    ("EMEA", true),
    ("AMER", false),
];
const FIRST_NAMES: [&str; 24] = [
    "anna", "erik", "maria", "lars", "sofia", "johan", "emma", "peter", "laura", "david", "julia",
    "marco", "nina", "tom", "sara", "ali", "chen", "priya", "olga", "jan", "eva", "mehmet", "ines",
    "kofi",
];
const LAST_NAMES: [&str; 24] = [
    "berg",
    "smith",
    "lindqvist",
    "garcia",
    "muller",
    "rossi",
    "novak",
    "kowalski",
    "johansson",
    "nguyen",
    "patel",
    "dubois",
    "jensen",
    "silva",
    "tanaka",
    "schmidt",
    "larsen",
    "moreau",
    "costa",
    "weber",
    "khan",
    "olsen",
    "fischer",
    "haddad",
];
/// Qlik's internal service accounts, the usual candidates for exclusion patterns.
const SERVICE_ACCOUNTS: [&str; 6] = [
    "sa_scheduler",
    "sa_repository",
    "sa_api",
    "sa_engine",
    "sa_proxy",
    "sa_printing",
];
const USER_AGENTS: [&str; 3] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0.0.0 Safari/537.36 Edg/124.0.0.0",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:125.0) Gecko/20100101 Firefox/125.0",
];

// Malformations that look like real mistakes: misconfigured appenders, other Qlik log events.
const BAD_PREFIXES: [&str; 5] = [
    "/proxy-audit/",
    "/qseow-proxy/",
    "/proxy-sessions/",
    "proxy-session",
    "/qseow-proxy-session",
];
const BAD_COMMANDS: [&str; 5] = [
    "Reload app",
    "Refresh session",
    "Open connections",
    "Start",
    "(null)",
];

/// A random version-4 GUID, rendered 8-4-4-4-12 like the proxy's session and app ids.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Guid(u128);

impl Guid {
    fn random(rng: &mut fastrand::Rng) -> Guid {
        let bits = rng.u128(..);
        let version_4 = (bits & !(0xF << 76)) | (0x4 << 76);
        Guid((version_4 & !(0x3 << 62)) | (0x2 << 62))
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = self.0;
        write!(
            f,
            "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
            (v >> 96) as u32,
            (v >> 80) as u16,
            (v >> 64) as u16,
            (v >> 48) as u16,
            (v as u64) & 0xFFFF_FFFF_FFFF
        )
    }
}

struct Proxy {
    /// The machine name, which the proxy logs (log4net's `%hostname`).
    host: String,
    /// The node's name in the Qlik repository, fully qualified as a site's usually is.
    api_host: String,
    format: Format,
}

struct User {
    directory: &'static str,
    id: String,
    sessions: Vec<Session>,
}

struct Session {
    proxy: usize,
    id: Guid,
    open_connections: u32,
    /// Where the user is, so that a close names what the open named.
    context: Context,
}

#[derive(Clone, Copy)]
enum Context {
    Hub,
    App(Guid),
}

/// One journey step, before rendering.
struct Event {
    command: Command,
    proxy: usize,
    user: usize,
    session: Guid,
    context: Context,
    user_agent: Option<&'static str>,
}

/// The traffic generator: users on proxies, each on a journey, one datagram per call.
pub struct Traffic {
    rng: fastrand::Rng,
    malformed: f64,
    proxies: Vec<Proxy>,
    users: Vec<User>,
    apps: Vec<Guid>,
    active_users: usize,
    active_sessions: usize,
}

impl Traffic {
    /// `users` distinct users on `proxies` proxy hosts; a share `malformed` (0.0–1.0) of the
    /// datagrams is malformed. Everything random comes from `rng`, so a seed fixes the traffic.
    pub fn new(
        users: usize,
        proxies: usize,
        malformed: f64,
        mut rng: fastrand::Rng,
    ) -> io::Result<Traffic> {
        let invalid = |why: &str| io::Error::new(io::ErrorKind::InvalidInput, why.to_owned());
        if users == 0 {
            return Err(invalid("--users must be at least 1"));
        }
        if proxies == 0 {
            return Err(invalid("--proxies must be at least 1"));
        }
        if !(0.0..=1.0).contains(&malformed) {
            return Err(invalid("--malformed must be between 0.0 and 1.0"));
        }
        let proxies = (0..proxies)
            .map(|i| Proxy {
                host: format!("QS-PROXY-{}", i + 1),
                api_host: format!("qs-proxy-{}.corp.example", i + 1),
                format: FORMAT_ROTATION[i % FORMAT_ROTATION.len()],
            })
            .collect();
        let users = make_users(users, &mut rng);
        let apps = (0..APPS).map(|_| Guid::random(&mut rng)).collect();
        Ok(Traffic {
            rng,
            malformed,
            proxies,
            users,
            apps,
            active_users: 0,
            active_sessions: 0,
        })
    }

    /// Users with at least one session, as a correct receiver should count them.
    pub fn active_users(&self) -> usize {
        self.active_users
    }

    pub fn active_sessions(&self) -> usize {
        self.active_sessions
    }

    /// The proxies' host names as the Qlik repository gives them (their datagrams carry the
    /// machine name, the first label in capitals).
    pub fn proxy_api_hosts(&self) -> Vec<String> {
        self.proxies.iter().map(|p| p.api_host.clone()).collect()
    }

    /// Every open session: what each proxy's API lists. The id is the one the proxy's API
    /// gives; a proxy logs a salted hash of it, so it differs from the id in the datagrams.
    pub fn open_sessions(&self) -> Vec<OpenSession> {
        self.users
            .iter()
            .flat_map(|u| {
                u.sessions.iter().map(move |s| OpenSession {
                    proxy: s.proxy,
                    user_directory: u.directory.to_owned(),
                    user_id: u.id.clone(),
                    api_session_id: Guid(s.id.0 ^ API_ID_SALT).to_string(),
                })
            })
            .collect()
    }

    /// Replaces `out` with the next datagram and says what it is. Reusing one buffer keeps the
    /// generator allocation-free on the hot path of a benchmark.
    pub fn next_into(&mut self, out: &mut Vec<u8>) -> Kind {
        out.clear();
        // `f64()` is in [0, 1): 0.0 never yields a malformed datagram, 1.0 always does.
        if self.rng.f64() < self.malformed {
            self.write_malformed(out);
            return Kind::Malformed;
        }
        let event = self.step();
        self.write_event(out, &event, |_| {});
        Kind::Event(event.command)
    }

    /// Advances one random user's journey by one event.
    fn step(&mut self) -> Event {
        let u = self.rng.usize(..self.users.len());
        if self.users[u].sessions.is_empty() {
            // An idle user picked again logs back in; so at any time most users are active.
            let proxy = self.rng.usize(..self.proxies.len());
            return self.start(u, proxy);
        }
        // Of an active user's events, in percent: 3 a second session, 6 winding down (closing
        // connections, then stopping), the rest opening and closing apps.
        let action = self.rng.u32(..100);
        if action < 3
            && let Some(proxy) = self.second_session_proxy(u)
        {
            return self.start(u, proxy);
        }
        let s = self.rng.usize(..self.users[u].sessions.len());
        let open = self.users[u].sessions[s].open_connections;
        if action < 9 {
            // Qlik closes a session's connections before the session ends.
            if open > 0 {
                self.close(u, s)
            } else {
                self.stop(u, s)
            }
        } else if open == 0 || (action < 55 && open < MAX_OPEN_CONNECTIONS) {
            self.open(u, s)
        } else {
            self.close(u, s)
        }
    }

    /// A proxy where user `u` may start another session. Butler's formats carry no session id,
    /// so the receiver keys their sessions by (host, user): a second one there must be on
    /// another host, while our own format can hold two sessions of one user on one host.
    fn second_session_proxy(&mut self, u: usize) -> Option<usize> {
        let proxy = self.rng.usize(..self.proxies.len());
        let sessions = &self.users[u].sessions;
        let allowed = sessions.len() < MAX_SESSIONS
            && (self.proxies[proxy].format == Format::SessionMonitor
                || sessions.iter().all(|s| s.proxy != proxy));
        allowed.then_some(proxy)
    }

    fn start(&mut self, u: usize, proxy: usize) -> Event {
        // Mostly the hub; sometimes a bookmarked app link.
        let context = if self.rng.u8(..5) == 0 {
            Context::App(self.random_app())
        } else {
            Context::Hub
        };
        let id = Guid::random(&mut self.rng);
        let user = &mut self.users[u];
        if user.sessions.is_empty() {
            self.active_users += 1;
        }
        self.active_sessions += 1;
        user.sessions.push(Session {
            proxy,
            id,
            open_connections: 0,
            context,
        });
        let s = user.sessions.len() - 1;
        self.event(Command::StartSession, u, s)
    }

    fn stop(&mut self, u: usize, s: usize) -> Event {
        let mut event = self.event(Command::StopSession, u, s);
        event.context = Context::Hub;
        let user = &mut self.users[u];
        user.sessions.swap_remove(s);
        self.active_sessions -= 1;
        if user.sessions.is_empty() {
            self.active_users -= 1;
        }
        event
    }

    fn open(&mut self, u: usize, s: usize) -> Event {
        let context = if self.rng.u8(..10) < 7 {
            Context::App(self.random_app())
        } else {
            Context::Hub
        };
        // Half the opens name the browser, as Qlik's messages may: a message with `;` and
        // quotes in it, which receivers must keep whole.
        let user_agent = self
            .rng
            .bool()
            .then(|| USER_AGENTS[self.rng.usize(..USER_AGENTS.len())]);
        let session = &mut self.users[u].sessions[s];
        session.open_connections += 1;
        session.context = context;
        Event {
            user_agent,
            ..self.event(Command::OpenConnection, u, s)
        }
    }

    fn close(&mut self, u: usize, s: usize) -> Event {
        self.users[u].sessions[s].open_connections -= 1;
        self.event(Command::CloseConnection, u, s)
    }

    fn event(&self, command: Command, u: usize, s: usize) -> Event {
        let session = &self.users[u].sessions[s];
        Event {
            command,
            proxy: session.proxy,
            user: u,
            session: session.id,
            context: session.context,
            user_agent: None,
        }
    }

    fn random_app(&mut self) -> Guid {
        self.apps[self.rng.usize(..self.apps.len())]
    }

    /// Writes `event` as its proxy sends it, after `tweak` (a malformation) changed fields.
    fn write_event(&self, out: &mut Vec<u8>, event: &Event, tweak: impl FnOnce(&mut Datagram<'_>)) {
        let proxy = &self.proxies[event.proxy];
        let user = &self.users[event.user];
        let context = ContextAt {
            context: event.context,
            host: &proxy.host,
        };
        let mut datagram = Datagram::event(
            proxy.format,
            &proxy.host,
            event.command,
            user.directory,
            &user.id,
            &context,
            &event.session,
        );
        datagram.user_agent = event.user_agent;
        tweak(&mut datagram);
        datagram.write_into(out);
    }

    /// A datagram the parser must reject, in one of the ways real ones go wrong. It is built
    /// from a plausible event that belongs to no journey, so it changes no state.
    fn write_malformed(&mut self, out: &mut Vec<u8>) {
        let variant = self.rng.u8(..7);
        if variant == 6 {
            // Network garbage. The leading 0xFF (invalid UTF-8) guarantees no accepted prefix.
            out.push(0xFF);
            out.extend((0..self.rng.usize(..300)).map(|_| self.rng.u8(..)));
            return;
        }
        let choice = self.rng.usize(..);
        let event = Event {
            command: Command::ALL[self.rng.usize(..Command::ALL.len())],
            proxy: self.rng.usize(..self.proxies.len()),
            user: self.rng.usize(..self.users.len()),
            session: Guid::random(&mut self.rng),
            context: Context::Hub,
            user_agent: None,
        };
        self.write_event(out, &event, |line| match variant {
            0 => line.prefix = BAD_PREFIXES[choice % BAD_PREFIXES.len()],
            2 => line.command = BAD_COMMANDS[choice % BAD_COMMANDS.len()],
            3 => line.user_id = "",
            // log4net renders a property that was never set as "(null)".
            4 if choice.is_multiple_of(2) => line.user_id = "(null)",
            4 => line.directory = "(null)",
            _ => {}
        });
        match variant {
            1 => {
                // Cut before one of the separators the format needs ahead of its message.
                let session_field = self.proxies[event.proxy].format == Format::SessionMonitor;
                let needed = if session_field { 8 } else { 7 };
                let keep = choice % needed;
                let cut = out
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == b';')
                    .nth(keep);
                out.truncate(cut.expect("a full line has all its separators").0);
            }
            // A runaway message: over the 8 KiB the service accepts by default.
            5 => out.resize(8 * 1024 + 1 + choice % 4096, b'x'),
            _ => {}
        }
    }
}

/// Where a user is, rendered as the proxy's context field (the app's reload URI names the
/// proxy's host).
struct ContextAt<'a> {
    context: Context,
    host: &'a str,
}

impl fmt::Display for ContextAt<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.context {
            Context::Hub => write!(f, "/hub/"),
            // The reload URI is URL-encoded, so the context never contains a `;`.
            Context::App(app) => write!(
                f,
                "/app/{app}?reloaduri=https%3A%2F%2F{}%2Fsense%2Fapp%2F{app}",
                self.host
            ),
        }
    }
}

/// `n` distinct users: a few Qlik service accounts, the rest people in a handful of directories.
fn make_users(n: usize, rng: &mut fastrand::Rng) -> Vec<User> {
    let services = if n >= 20 {
        (n / 40).clamp(1, SERVICE_ACCOUNTS.len())
    } else {
        0
    };
    let mut users: Vec<User> = SERVICE_ACCOUNTS[..services]
        .iter()
        .map(|&id| User {
            directory: "INTERNAL",
            id: id.to_owned(),
            sessions: Vec::new(),
        })
        .collect();
    // Directories are upper case and ids lower case, so exact comparison is also the receiver's
    // case-insensitive one: two journeys never share one identity.
    let mut seen: HashSet<String> = users
        .iter()
        .map(|u| format!("{}\\{}", u.directory, u.id))
        .collect();
    while users.len() < n {
        let (directory, dotted) = DIRECTORIES[rng.usize(..DIRECTORIES.len())];
        let first = FIRST_NAMES[rng.usize(..FIRST_NAMES.len())];
        let last = LAST_NAMES[rng.usize(..LAST_NAMES.len())];
        let base = if dotted {
            format!("{first}.{last}")
        } else {
            format!("{}{last}{}", &first[..1], rng.u32(1..100))
        };
        // Names repeat in a large population; directories tell them apart with a number.
        let mut id = base.clone();
        while !seen.insert(format!("{directory}\\{id}")) {
            id = format!("{base}{}", rng.u32(2..10_000));
        }
        users.push(User {
            directory,
            id,
            sessions: Vec::new(),
        });
    }
    users
}

#[cfg(test)]
mod tests {
    use super::*;
    use session_monitor::exclusions::Exclusions;
    use session_monitor::parser::{Limits, ProxyEvent, Reject, UTF_8, decode_datagram, parse};
    use session_monitor::registry::{ExpiryPolicy, Outcome, Registry, UnixMillis};
    use std::collections::{HashMap, HashSet};

    fn traffic(users: usize, proxies: usize, malformed: f64, seed: u64) -> Traffic {
        Traffic::new(users, proxies, malformed, fastrand::Rng::with_seed(seed)).unwrap()
    }

    /// The service's own path: size cap and cleaning, then parsing.
    fn check(datagram: &[u8], each: impl FnOnce(Result<ProxyEvent<'_>, Reject>)) {
        let limits = Limits::default();
        match decode_datagram(datagram, &limits, UTF_8) {
            Ok(text) => each(parse(&text, &limits)),
            Err(reject) => each(Err(reject)),
        }
    }

    #[test]
    fn journeys_are_consistent_with_the_registry() {
        for (users, proxies, seed) in [(1, 1, 1), (5, 2, 2), (50, 3, 3), (200, 5, 4)] {
            let mut t = traffic(users, proxies, 0.05, seed);
            let mut registry = Registry::new(ExpiryPolicy::default(), Exclusions::default());
            let mut identities = HashSet::new();
            let mut out = Vec::new();
            let (mut active_later, mut second_sessions) = (0, false);
            for i in 0..20_000u64 {
                let kind = t.next_into(&mut out);
                check(&out, |parsed| match kind {
                    Kind::Malformed => assert!(parsed.is_err(), "accepted: {parsed:?}"),
                    Kind::Event(command) => {
                        let event = parsed.expect("well-formed datagram rejected");
                        assert_eq!(event.command, command);
                        identities.insert(format!("{}\\{}", event.user_directory, event.user_id));
                        // No stop without a start, no connection on a session never started.
                        let outcome = registry.apply(&event, UnixMillis(i));
                        assert!(
                            !matches!(
                                outcome,
                                Outcome::UnknownSessionStopped | Outcome::SessionRecovered
                            ),
                            "{outcome:?} for datagram {i}: {event:?}"
                        );
                    }
                });
                assert_eq!(registry.active_users(), t.active_users());
                assert_eq!(registry.active_sessions(), t.active_sessions());
                assert!(t.active_users() <= users);
                if i >= 10_000 {
                    active_later += t.active_users();
                }
                second_sessions |= t.active_sessions() > t.active_users();
            }
            assert!(identities.len() <= users);
            let mean_active = active_later as f64 / 10_000.0;
            assert!(
                mean_active >= 0.8 * users as f64,
                "most users are active: {mean_active} of {users} on average"
            );
            assert!(second_sessions, "some users have a second session");
        }
    }

    #[test]
    fn users_look_like_a_qlik_site() {
        let t = traffic(200, 3, 0.0, 7);
        let names: Vec<String> = t
            .users
            .iter()
            .map(|u| format!("{}\\{}", u.directory, u.id))
            .collect();
        assert_eq!(names.iter().collect::<HashSet<_>>().len(), 200);
        assert!(names.iter().any(|n| n == "INTERNAL\\sa_scheduler"));
        let directories: HashSet<_> = t.users.iter().map(|u| u.directory).collect();
        assert!(directories.len() >= 4, "{directories:?}");
        assert!(
            names
                .iter()
                .any(|n| n.starts_with("LAB\\") && n.contains('.'))
        );
        assert_eq!(t.proxies[0].host, "QS-PROXY-1");
        assert_eq!(t.proxy_api_hosts()[0], "qs-proxy-1.corp.example");
        // Many more users than the name lists combine to: still distinct.
        let t = traffic(5_000, 1, 0.0, 8);
        let distinct: HashSet<_> = t.users.iter().map(|u| (u.directory, &u.id)).collect();
        assert_eq!(distinct.len(), 5_000);
    }

    #[test]
    fn malformed_share_and_variety() {
        let mut t = traffic(100, 3, 0.1, 11);
        let mut out = Vec::new();
        let mut malformed = 0;
        let mut reasons = HashSet::new();
        for _ in 0..20_000 {
            if t.next_into(&mut out) == Kind::Malformed {
                malformed += 1;
                check(&out, |parsed| {
                    reasons.insert(parsed.expect_err("malformed datagram accepted"));
                });
            }
        }
        let share = f64::from(malformed) / 20_000.0;
        assert!((0.09..=0.11).contains(&share), "share {share}");
        for reason in [
            Reject::UnknownPrefix,
            Reject::TooFewFields,
            Reject::UnknownCommand,
            Reject::MissingUser,
            Reject::TooLarge,
        ] {
            assert!(reasons.contains(&reason), "no {reason:?} in {reasons:?}");
        }

        let mut count = |share: f64| {
            let mut t = traffic(10, 1, share, 12);
            (0..1_000)
                .filter(|_| t.next_into(&mut out) == Kind::Malformed)
                .count()
        };
        assert_eq!(count(0.0), 0);
        assert_eq!(count(1.0), 1_000);
    }

    #[test]
    fn every_format_prefix_and_command_appears_and_each_proxy_keeps_its_format() {
        let mut t = traffic(100, 7, 0.0, 21);
        let mut out = Vec::new();
        let mut prefixes = HashSet::new();
        let mut commands = HashSet::new();
        let mut host_formats = HashMap::new();
        for _ in 0..10_000 {
            t.next_into(&mut out);
            let prefix = out.split(|&b| b == b';').next().unwrap().to_vec();
            prefixes.insert(String::from_utf8(prefix).unwrap());
            check(&out, |parsed| {
                let event = parsed.unwrap();
                commands.insert(event.command);
                let format = *host_formats
                    .entry(event.host.to_owned())
                    .or_insert(event.format);
                assert_eq!(format, event.format, "{} switched format", event.host);
                assert_eq!(
                    event.proxy_session_id.is_some(),
                    event.format == Format::SessionMonitor
                );
            });
        }
        assert_eq!(prefixes.len(), 5, "{prefixes:?}");
        assert_eq!(commands.len(), 4);
        assert_eq!(host_formats.len(), 7);
        assert_eq!(
            host_formats.values().collect::<HashSet<_>>().len(),
            Format::ALL.len()
        );
    }

    #[test]
    fn datagrams_read_like_qlik_logs() {
        let mut t = traffic(20, 3, 0.0, 5);
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        for _ in 0..2_000 {
            let Kind::Event(command) = t.next_into(&mut out) else {
                unreachable!()
            };
            check(&out, |parsed| {
                let e = parsed.unwrap();
                let user = format!("{}\\{}", e.user_directory, e.user_id);
                assert_eq!(e.origin, Some("AppAccess"));
                let context = e.context.unwrap();
                assert!(
                    context == "/hub/" || context.starts_with("/app/"),
                    "{context}"
                );
                match command {
                    Command::StartSession => {
                        assert_eq!(e.message, format!("Start session for user: '{user}'"))
                    }
                    Command::StopSession => {
                        assert_eq!(e.message, format!("Stop session for user: '{user}'"))
                    }
                    Command::OpenConnection => {
                        assert!(e.message.starts_with("connection Opened for session "))
                    }
                    Command::CloseConnection => {
                        assert!(e.message.starts_with("connection Closed for session "))
                    }
                }
                if let Some(id) = e.proxy_session_id {
                    let groups: Vec<usize> = id.split('-').map(str::len).collect();
                    assert_eq!(groups, [8, 4, 4, 4, 12]);
                    assert!(id.chars().all(|c| c == '-' || c.is_ascii_hexdigit()));
                }
                seen.insert((command, e.message.contains("UserAgent: '")));
            });
        }
        assert!(seen.contains(&(Command::OpenConnection, true)));
    }

    #[test]
    fn a_seed_reproduces_the_traffic() {
        let generate = |seed| {
            let mut t = traffic(50, 3, 0.05, seed);
            let mut out = Vec::new();
            (0..2_000)
                .map(|_| {
                    t.next_into(&mut out);
                    out.clone()
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(generate(42), generate(42));
        assert_ne!(generate(42), generate(43));
    }

    #[test]
    fn invalid_settings_are_rejected() {
        let new = |users, proxies, malformed| {
            Traffic::new(users, proxies, malformed, fastrand::Rng::with_seed(0)).err()
        };
        assert!(new(0, 1, 0.0).is_some());
        assert!(new(1, 0, 0.0).is_some());
        assert!(new(1, 1, 1.5).is_some());
        assert!(new(1, 1, f64::NAN).is_some());
        assert!(new(1, 1, 1.0).is_none());
    }

    #[test]
    fn run_sends_what_it_reports() {
        let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
        receiver
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let args = SimulateArgs {
            target: receiver.local_addr().unwrap().to_string(),
            users: 30,
            rate: 400,
            duration: 1,
            proxies: 3,
            malformed: 0.05,
            seed: Some(9),
            qlik_api: None,
            lose_stops: 0.0,
        };
        let sender = std::thread::spawn({
            let args = args.clone();
            move || run(&args, |_| {})
        });

        let mut received = 0u64;
        let mut buf = vec![0; 65_536];
        // Stop only on a timeout that began after the sender was seen finished, so every
        // datagram it sent is already queued and counted.
        let mut finished = false;
        loop {
            match receiver.recv(&mut buf) {
                Ok(_) => received += 1,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if finished {
                        break;
                    }
                    finished = sender.is_finished();
                }
                Err(e) => panic!("{e}"),
            }
        }
        let report = sender.join().unwrap().unwrap();

        assert_eq!(received, report.sent);
        assert_eq!(
            report.malformed + report.by_command.iter().sum::<u64>(),
            report.sent
        );
        // One second at 400/s, held by the pacing (batches of 4).
        assert!(
            (200..=404).contains(&report.sent),
            "sent {} in {:?}",
            report.sent,
            report.elapsed
        );
        assert!(report.elapsed >= Duration::from_secs(1));
        assert!(report.by_command[0] > 0, "sessions were started");
    }

    #[test]
    fn run_rejects_a_bad_target() {
        let args = SimulateArgs {
            target: "no-port".into(),
            users: 1,
            rate: 1,
            duration: 1,
            proxies: 1,
            malformed: 0.0,
            seed: None,
            qlik_api: None,
            lose_stops: 0.0,
        };
        assert_eq!(
            run(&args, |_| {}).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }
}
