//! The registry of active sessions and users: a pure state machine.
//!
//! Owns the session semantics (README, "Behaviour in detail"): who is active, on which proxy,
//! since when, and when a session has been silent long enough to be presumed gone. Time is always passed in, so expiry is
//! tested with plain numbers. Every operation on the event path is O(1) in the number of active
//! users and sessions (hash lookups only); work proportional to the registry's size happens only
//! in [`Registry::expire`], the read views and the checkpoint snapshot, which run on their own
//! schedules, never per event.

use std::collections::HashMap as StdHashMap;

/// The registry's hash tables. foldhash is several times faster than the standard SipHash on
/// these short keys (a restore hashes each of a million sessions and users several times), and
/// its per-process random seed keeps crafted keys from colliding on purpose.
type HashMap<K, V> = StdHashMap<K, V, foldhash::quality::RandomState>;
use std::time::Duration;

use crate::checkpoint::codec::{BodyWriter, SessionEntry, SessionId};
use crate::exclusions::Exclusions;
use crate::parser::{Command, ProxyEvent};

mod before_restore;
mod reconcile;
pub mod sharded;
pub use before_restore::{RestoreEnd, RestoreMemoryCap};
pub use reconcile::{ListedUser, Pairing, Reconciled};
pub use sharded::ShardedRegistry;

/// Wall-clock time as milliseconds since the Unix epoch. Wall clock rather than a monotonic
/// instant because session times survive a restart through the checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UnixMillis(pub u64);

impl UnixMillis {
    pub fn now() -> UnixMillis {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        UnixMillis(since_epoch.as_millis() as u64)
    }

    fn elapsed_since(self, earlier: UnixMillis) -> Duration {
        Duration::from_millis(self.0.saturating_sub(earlier.0))
    }
}

pub use session_monitor_config::ExpiryPolicy;

/// What one event did to the registry; drives metrics and change signals.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The user matches an exclusion pattern; the registry was not touched.
    Excluded,
    /// A start created a session.
    SessionStarted,
    /// A connection event for a session we had not seen start (e.g. it began before this
    /// service did) created it.
    SessionRecovered,
    /// A known session was refreshed.
    SessionRefreshed,
    /// A stop removed a session.
    SessionStopped,
    /// A stop for a session we do not know: nothing to do.
    UnknownSessionStopped,
    /// A connection close for a session we do not know: nothing to do. (Not a recovery: the
    /// proxy may log a close after the session's stop, and UDP may reorder the two; creating
    /// the session would bring back a user who just left.)
    UnknownSessionClosed,
    /// The event names a new proxy host beyond the limit; it was not applied.
    HostLimitReached,
    /// The event would start a session beyond `max_sessions`; it was not applied. Session ids
    /// come from the network: without a bound, a flood of made-up ones would take the pod's
    /// memory and then its checkpoint.
    SessionLimitReached,
    /// The event names a proxy session id that another user holds. A real proxy never sends
    /// one (ids are unique per session, a session has one user), so it is refused rather than
    /// credited to either user: crediting it would make the counts depend on whether the two
    /// users share a shard, and a restore could then differ from the registry it saved
    /// (found by the `datagram` fuzz target).
    SessionOfAnotherUser,
}

impl Outcome {
    /// Whether the set of sessions changed (and with it, possibly, the published state).
    pub fn changes_membership(self) -> bool {
        matches!(
            self,
            Outcome::SessionStarted | Outcome::SessionRecovered | Outcome::SessionStopped
        )
    }

    /// `None` if the registry is unchanged; else whether the set of sessions changed.
    pub fn changes_registry(self) -> Option<bool> {
        match self {
            Outcome::SessionRefreshed => Some(false),
            o if o.changes_membership() => Some(true),
            _ => None,
        }
    }
}

/// Sessions removed by one [`Registry::expire`] pass, by rule.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub idle: usize,
    pub max_idle: usize,
}

type HostId = u32;

/// Proxy hosts a registry tracks at most unless configured otherwise; a Qlik site has a few.
pub const DEFAULT_MAX_HOSTS: usize = session_monitor_config::defaults::MAX_PROXY_HOSTS;
type UserId = u32;

#[derive(Debug)]
struct Host {
    name: Box<str>,
    sessions: u32,
    active_users: u32,
    /// The last event that named one of its sessions (0: none since start).
    last_event: UnixMillis,
}

#[derive(Debug)]
struct User {
    /// `DIRECTORY\userid` as first seen.
    display: Box<str>,
    /// Length of the directory part of `display`, so the user id can be sliced back out even if
    /// it contains a backslash itself.
    directory_len: u32,
    sessions: u32,
}

impl User {
    fn directory(&self) -> &str {
        &self.display[..self.directory_len as usize]
    }
    fn user_id(&self) -> &str {
        &self.display[self.directory_len as usize + 1..]
    }
}

/// Whether a restore ends the memory of the stops and closes seen before it (see
/// [`before_restore`]): it does, unless a handover's checkpoint is still to come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestoreEnds {
    Yes,
    /// A standby pod's restore: the pod that still runs writes a later checkpoint at its stop,
    /// and [`ShardedRegistry::take_over`] loads it with what this pod has seen since.
    AtTakeOver,
}

#[derive(Clone, Copy, Debug)]
struct Session {
    user: UserId,
    host: HostId,
    started: UnixMillis,
    last_seen: UnixMillis,
    open_connections: u32,
    /// Added from the Qlik proxy API's list and not yet named by an event: its id is the API's,
    /// so matching it again proves nothing about the ids events carry (see [`reconcile`]).
    /// Fits the struct's padding: no memory per session.
    from_api: bool,
    /// Loaded from a checkpoint and not named by an event since: what a later checkpoint of the
    /// same registry (a handover's, [`Registry::take_over`]) knows better. In the padding too.
    restored: bool,
}

/// Sessions keyed by proxy session id. Qlik's ids are lower-case GUIDs: kept as their 16 bytes
/// they need no allocation of their own (at 1,000,000 sessions that is 48 MB less: the text
/// took a 48-byte heap block each). Any other id is kept as text, exactly as sent.
#[derive(Debug, Default)]
struct BySessionId {
    guids: HashMap<[u8; 16], Session>,
    other: HashMap<Box<str>, Session>,
}

impl BySessionId {
    fn len(&self) -> usize {
        self.guids.len() + self.other.len()
    }

    fn contains(&self, id: &str) -> bool {
        match parse_guid(id) {
            Some(guid) => self.guids.contains_key(&guid),
            None => self.other.contains_key(id),
        }
    }

    fn get(&self, id: &str) -> Option<&Session> {
        match parse_guid(id) {
            Some(guid) => self.guids.get(&guid),
            None => self.other.get(id),
        }
    }

    fn get_mut(&mut self, id: &str) -> Option<&mut Session> {
        match parse_guid(id) {
            Some(guid) => self.guids.get_mut(&guid),
            None => self.other.get_mut(id),
        }
    }

    fn insert(&mut self, id: &str, session: Session) -> Option<Session> {
        match parse_guid(id) {
            Some(guid) => self.guids.insert(guid, session),
            None => self.other.insert(id.into(), session),
        }
    }

    fn remove(&mut self, id: &str) -> Option<Session> {
        match parse_guid(id) {
            Some(guid) => self.guids.remove(&guid),
            None => self.other.remove(id),
        }
    }

    fn retain(&mut self, keep: &mut impl FnMut(&Session) -> bool) {
        self.guids.retain(|_, s| keep(s));
        self.other.retain(|_, s| keep(s));
    }

    fn iter(&self) -> impl Iterator<Item = (String, &Session)> {
        let guids = self.guids.iter().map(|(g, s)| (format_guid(g), s));
        guids.chain(self.other.iter().map(|(id, s)| (id.to_string(), s)))
    }

    fn values(&self) -> impl Iterator<Item = &Session> {
        self.guids.values().chain(self.other.values())
    }
}

/// The 16 bytes of a GUID written as Qlik writes them (`8-4-4-4-12` lower-case hex digits);
/// `None` for anything else, which then stays text.
pub(crate) fn parse_guid(id: &str) -> Option<[u8; 16]> {
    let text = id.as_bytes();
    if text.len() != 36 || [8, 13, 18, 23].iter().any(|&i| text[i] != b'-') {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut guid = [0u8; 16];
    let mut digits = text.iter().copied().filter(|&c| c != b'-');
    for byte in &mut guid {
        *byte = digit(digits.next()?)? << 4 | digit(digits.next()?)?;
    }
    Some(guid)
}

pub(crate) fn format_guid(guid: &[u8; 16]) -> String {
    let mut text = String::with_capacity(36);
    push_guid(&mut text, guid);
    text
}

/// [`format_guid`] onto the end of `text`, allocating nothing once it has room.
fn push_guid(text: &mut String, guid: &[u8; 16]) {
    use std::fmt::Write;
    for (i, byte) in guid.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            text.push('-');
        }
        let _ = write!(text, "{byte:02x}");
    }
}

/// How an event names its session: by the proxy's session id when the datagram carries one,
/// otherwise one slot per user per proxy node.
enum SessionKey<'a> {
    ProxySession(&'a str),
    HostUser(HostId, UserId),
}

/// The active sessions and users. See the module docs for the cost model.
#[derive(Debug, Default)]
pub struct Registry {
    expiry: ExpiryPolicy,
    exclusions: Exclusions,
    /// Host names come from the network: bounded, so a flood of invented names cannot grow the
    /// registry, the MQTT topics and the metric series without end.
    max_hosts: usize,
    hosts: Vec<Host>,
    host_index: HashMap<Box<str>, HostId>,
    users: Vec<Option<User>>,
    free_users: Vec<UserId>,
    user_index: HashMap<Box<str>, UserId>,
    by_session_id: BySessionId,
    by_host_user: HashMap<(HostId, UserId), Session>,
    /// Sessions per (host, user): a user is active on a host while this is non-zero.
    host_user_sessions: HashMap<(HostId, UserId), u32>,
    active_users: usize,
    /// Reused for lower-casing lookup keys so the event path does not allocate.
    scratch: String,
    /// Recent stop events, kept while reconciliation is on (see [`reconcile`]).
    stops: reconcile::RecentStops,
    /// Stops and closes of unknown sessions, kept until the checkpoint is restored (see
    /// [`before_restore`]).
    before_restore: before_restore::BeforeRestore,
}

/// One session as the checkpoint stores it, self-contained (no ids internal to a registry).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub proxy_session_id: Option<String>,
    pub host: String,
    pub user_directory: String,
    pub user_id: String,
    pub started: UnixMillis,
    pub last_seen: UnixMillis,
    pub open_connections: u32,
}

/// A session to restore, borrowed from a decoded checkpoint or a [`SessionRecord`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct RestoreRecord<'a> {
    pub id: SessionId<'a>,
    pub host: &'a str,
    pub user_directory: &'a str,
    pub user_id: &'a str,
    pub started: UnixMillis,
    pub last_seen: UnixMillis,
    pub open_connections: u32,
}

impl<'a> From<&'a SessionRecord> for RestoreRecord<'a> {
    fn from(r: &'a SessionRecord) -> Self {
        RestoreRecord {
            id: r
                .proxy_session_id
                .as_deref()
                .map_or(SessionId::None, SessionId::Text),
            host: &r.host,
            user_directory: &r.user_directory,
            user_id: &r.user_id,
            started: r.started,
            last_seen: r.last_seen,
            open_connections: r.open_connections,
        }
    }
}

/// Active users and sessions on one proxy host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HostSummary {
    pub host: String,
    pub active_users: usize,
    pub active_sessions: usize,
    /// The last event from this proxy that named a session; `None` since start (a broken
    /// appender shows as a proxy whose last event grows old).
    pub last_event: Option<UnixMillis>,
}

/// One active user, for the read API.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct UserView {
    pub name: String,
    pub user_directory: String,
    pub user_id: String,
    pub sessions: usize,
    pub open_connections: u64,
    pub hosts: Vec<String>,
    pub first_seen: UnixMillis,
    pub last_seen: UnixMillis,
}

impl serde::Serialize for UnixMillis {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl Registry {
    pub fn new(expiry: ExpiryPolicy, exclusions: Exclusions) -> Registry {
        Registry {
            expiry,
            exclusions,
            max_hosts: DEFAULT_MAX_HOSTS,
            ..Registry::default()
        }
    }

    pub fn with_max_hosts(self, max_hosts: usize) -> Registry {
        Registry { max_hosts, ..self }
    }

    /// Bounds what is remembered before the restore ([`RestoreMemoryCap::DEFAULT`] unless set).
    pub fn with_restore_memory_cap(self, cap: RestoreMemoryCap) -> Registry {
        Registry {
            before_restore: before_restore::BeforeRestore::with_cap(cap),
            ..self
        }
    }

    /// Every host known, including those at zero sessions, for the checkpoint: after a restart
    /// their per-host counts must still be published (as 0), not left stale on the broker.
    pub fn host_names(&self) -> Vec<String> {
        self.hosts.iter().map(|h| h.name.to_string()).collect()
    }

    /// Re-creates hosts from the checkpoint (within the host limit).
    pub fn restore_hosts(&mut self, names: &[String]) {
        for name in names {
            let _ = self.intern_host(name, &mut |_| true);
        }
    }

    pub fn active_users(&self) -> usize {
        self.active_users
    }

    pub fn active_sessions(&self) -> usize {
        self.by_session_id.len() + self.by_host_user.len()
    }

    /// Applies one proxy event at time `now`.
    pub fn apply(&mut self, event: &ProxyEvent<'_>, now: UnixMillis) -> Outcome {
        self.apply_gated(event, now, &mut |_| true)
    }

    /// [`Registry::apply`], where a host new to this registry is also subject to `admit_host`
    /// (a [`ShardedRegistry`] keeps one host limit across its shards that way).
    pub(crate) fn apply_gated(
        &mut self,
        event: &ProxyEvent<'_>,
        now: UnixMillis,
        admit_host: &mut dyn FnMut(&str) -> bool,
    ) -> Outcome {
        self.set_scratch_to_user_key(event.user_directory, event.user_id);
        if self.exclusions.matches(&self.scratch) {
            return Outcome::Excluded;
        }
        let key = match event.proxy_session_id {
            Some(id) => SessionKey::ProxySession(id),
            None => {
                // Only a (host, user) key needs the ids up front; for a stop we must not create
                // a host or user just to find nothing to remove.
                let (Some(host), Some(user)) = (
                    self.find_host(event.host),
                    self.find_user(event.user_directory, event.user_id),
                ) else {
                    return self.unknown_session(event, now, admit_host);
                };
                SessionKey::HostUser(host, user)
            }
        };

        // Who may name this session: for an id, the user the event names, if this registry
        // holds any session of theirs (one hash lookup of the key computed above).
        let owner = match key {
            SessionKey::ProxySession(_) => self.user_index.get(self.scratch.as_str()).copied(),
            SessionKey::HostUser(_, user) => Some(user),
        };
        match event.command {
            Command::StopSession if self.holder(&key).is_some_and(|h| Some(h) != owner) => {
                Outcome::SessionOfAnotherUser
            }
            Command::StopSession => match self.remove(&key) {
                Some(session) => {
                    // While a restore (or a handover's second one) is pending, a checkpoint may
                    // still hold this session: the stop must keep it from coming back.
                    let named = before_restore::Named::of_event(event.proxy_session_id, event.host);
                    self.before_restore
                        .stopped(event.user_directory, event.user_id, named, now);
                    let h = &mut self.hosts[session.host as usize];
                    h.last_event = h.last_event.max(now);
                    if self.stops.enabled() {
                        self.set_scratch_to_user_key(event.user_directory, event.user_id);
                        self.stops.record(session.host, &self.scratch, now);
                    }
                    Outcome::SessionStopped
                }
                None => self.unknown_session(event, now, admit_host),
            },
            command => match self.get_mut(&key) {
                Some(session) if Some(session.user) != owner => Outcome::SessionOfAnotherUser,
                Some(session) => {
                    session.last_seen = now;
                    session.from_api = false;
                    match command {
                        Command::OpenConnection => session.open_connections += 1,
                        Command::CloseConnection => {
                            session.open_connections = session.open_connections.saturating_sub(1)
                        }
                        Command::StartSession | Command::StopSession => {}
                    }
                    // A start or an open says the session lives on here; a close does not (the
                    // proxy may log a tab's close after the session's stop, which a handover's
                    // checkpoint may hold): a restored session closed here stays the
                    // checkpoint's to decide, and the close is remembered for it.
                    let restored_close = session.restored && command == Command::CloseConnection;
                    session.restored = restored_close;
                    let host = session.host;
                    if restored_close {
                        let named =
                            before_restore::Named::of_event(event.proxy_session_id, event.host);
                        self.before_restore
                            .closed(event.user_directory, event.user_id, named, now);
                    }
                    let h = &mut self.hosts[host as usize];
                    h.last_event = h.last_event.max(now);
                    Outcome::SessionRefreshed
                }
                None => self.unknown_session(event, now, admit_host),
            },
        }
    }

    fn unknown_session(
        &mut self,
        event: &ProxyEvent<'_>,
        now: UnixMillis,
        admit_host: &mut dyn FnMut(&str) -> bool,
    ) -> Outcome {
        // Unknown, perhaps, only because the checkpoint that holds it is still loading: the
        // restore applies what is remembered here (no-ops once it is over).
        let session = before_restore::Named::of_event(event.proxy_session_id, event.host);
        let (directory, user_id) = (event.user_directory, event.user_id);
        match event.command {
            Command::StopSession => {
                self.before_restore
                    .stopped(directory, user_id, session, now);
                Outcome::UnknownSessionStopped
            }
            Command::CloseConnection => {
                self.before_restore.closed(directory, user_id, session, now);
                Outcome::UnknownSessionClosed
            }
            Command::StartSession | Command::OpenConnection => {
                self.insert_new(event, now, admit_host)
            }
        }
    }

    /// Removes sessions that have been silent too long (see [`ExpiryPolicy`]).
    pub fn expire(&mut self, now: UnixMillis) -> Expired {
        let mut expired = Expired::default();
        let mut removed = Vec::new();
        let expiry = &self.expiry;
        let mut keep = |session: &Session| -> bool {
            let silent = now.elapsed_since(session.last_seen);
            let rule = if silent > expiry.max_idle {
                &mut expired.max_idle
            } else if session.open_connections == 0 && silent > expiry.idle_timeout {
                &mut expired.idle
            } else {
                return true;
            };
            *rule += 1;
            removed.push((session.host, session.user));
            false
        };
        self.by_session_id.retain(&mut keep);
        self.by_host_user.retain(|_, s| keep(s));
        for (host, user) in removed {
            self.release(host, user);
        }
        self.stops.forget_before(now);
        expired
    }

    /// Every session, for the checkpoint.
    pub fn snapshot(&self) -> Vec<SessionRecord> {
        let record = |id: Option<&str>, s: &Session| {
            let user = self.user(s.user);
            SessionRecord {
                proxy_session_id: id.map(str::to_owned),
                host: self.hosts[s.host as usize].name.to_string(),
                user_directory: user.directory().to_owned(),
                user_id: user.user_id().to_owned(),
                started: s.started,
                last_seen: s.last_seen,
                open_connections: s.open_connections,
            }
        };
        self.by_session_id
            .iter()
            .map(|(id, s)| record(Some(&id), s))
            .chain(self.by_host_user.values().map(|s| record(None, s)))
            .collect()
    }

    /// Loads checkpointed sessions, skipping those that expired while nobody was watching, users
    /// that are now excluded, sessions already live (seen since start, so newer) and sessions
    /// that stopped since start; those whose connections closed since start come back with
    /// fewer (see the module `before_restore`). Returns how many sessions were restored. Ends
    /// the restore ([`Registry::end_restore`] says what the events before it did).
    pub fn restore(&mut self, records: &[SessionRecord], now: UnixMillis) -> usize {
        self.restore_gated(
            records.iter().map(RestoreRecord::from),
            now,
            &mut |_| true,
            RestoreEnds::Yes,
        )
    }

    /// Removes the sessions a restore loaded that no event has named since: a handover's
    /// checkpoint, written later by the pod that kept running meanwhile, says what became of
    /// them ([`ShardedRegistry::take_over`]). Returns how many went.
    pub(crate) fn drop_untouched_restored(&mut self) -> usize {
        let mut removed = Vec::new();
        let mut keep = |session: &Session| -> bool {
            if session.restored {
                removed.push((session.host, session.user));
            }
            !session.restored
        };
        self.by_session_id.retain(&mut keep);
        self.by_host_user.retain(|_, s| keep(s));
        let count = removed.len();
        for (host, user) in removed {
            self.release(host, user);
        }
        count
    }

    /// [`Registry::restore`] with a host limit beyond this registry's (see
    /// [`Registry::apply_gated`]).
    pub(crate) fn restore_gated<'r>(
        &mut self,
        records: impl Iterator<Item = RestoreRecord<'r>>,
        now: UnixMillis,
        admit_host: &mut dyn FnMut(&str) -> bool,
        ends: RestoreEnds,
    ) -> usize {
        let mut restored = 0;
        // A checkpoint names a few hosts a million times: resolve each name once.
        let mut host_cache: Vec<(&'r str, HostId)> = Vec::new();
        for mut r in records {
            let silent = now.elapsed_since(r.last_seen);
            let expired = silent > self.expiry.max_idle
                || (r.open_connections == 0 && silent > self.expiry.idle_timeout);
            self.set_scratch_to_user_key(r.user_directory, r.user_id);
            if expired || self.exclusions.matches(&self.scratch) {
                continue;
            }
            // Events that arrived while the checkpoint was loading are newer: they win.
            let live = match r.id {
                SessionId::Guid(guid) => self.by_session_id.guids.contains_key(guid),
                SessionId::Text(id) => self.by_session_id.contains(id),
                SessionId::None => match (
                    self.find_host(r.host),
                    self.find_user(r.user_directory, r.user_id),
                ) {
                    (Some(h), Some(u)) => self.by_host_user.contains_key(&(h, u)),
                    _ => false,
                },
            };
            // So do stops and closes of sessions unknown then (only the checkpoint held them):
            // remembered, they apply now, after the expiry check, as if they came after it.
            if live || !self.before_restore.settle(&mut r) {
                continue;
            }
            let cached = host_cache.iter().find(|(name, _)| *name == r.host);
            let host = match cached {
                Some(&(_, host)) => host,
                None => {
                    let Some(host) = self.intern_host(r.host, admit_host) else {
                        continue;
                    };
                    if host_cache.len() < 64 {
                        host_cache.push((r.host, host));
                    }
                    // intern_host used the scratch key; the user's is needed next.
                    self.set_scratch_to_user_key(r.user_directory, r.user_id);
                    host
                }
            };
            let user = self.intern_user_at_scratch(r.user_directory, r.user_id);
            let session = Session {
                user,
                host,
                started: r.started,
                last_seen: r.last_seen,
                open_connections: r.open_connections,
                from_api: false,
                restored: true,
            };
            // Not already live (checked above), so this adds a session.
            match r.id {
                SessionId::Guid(guid) => self.by_session_id.guids.insert(*guid, session),
                SessionId::Text(id) => self.by_session_id.insert(id, session),
                SessionId::None => self.by_host_user.insert((host, user), session),
            };
            self.retain(host, user);
            // The checkpoint keeps no event times per host: a restored host's last event is its
            // newest session's last activity.
            let h = &mut self.hosts[host as usize];
            h.last_event = h.last_event.max(r.last_seen);
            restored += 1;
        }
        // Under the same lock as the restore: from here on a stop finds the session restored.
        if ends == RestoreEnds::Yes {
            self.before_restore.end();
        }
        restored
    }

    /// Ends the restore, also when there was nothing to restore (no checkpoint, a corrupt one, a
    /// failure, a shutdown while retrying): stops and closes of unknown sessions are no longer
    /// remembered. Says what those seen before did to the restore, once.
    pub fn end_restore(&mut self) -> RestoreEnd {
        self.before_restore.end();
        self.before_restore.take_report()
    }

    /// Display names (`DIRECTORY\userid`) of all active users, sorted case-insensitively.
    pub fn user_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.live_users().map(|u| &*u.display).collect();
        names.sort_by_cached_key(|n| n.to_lowercase());
        names
    }

    /// User ids only (Butler's payload), sorted and de-duplicated case-insensitively.
    pub fn user_ids(&self) -> Vec<&str> {
        let mut ids: Vec<&str> = self.live_users().map(User::user_id).collect();
        ids.sort_by_cached_key(|n| n.to_lowercase());
        ids.dedup_by(|a, b| a.to_lowercase() == b.to_lowercase());
        ids
    }

    /// Every host seen since start, including those now at zero (so that a published per-host
    /// count can drop to 0 rather than go stale), sorted by name.
    pub fn hosts(&self) -> Vec<HostSummary> {
        let mut hosts: Vec<HostSummary> = self
            .hosts
            .iter()
            .map(|h| HostSummary {
                host: h.name.to_string(),
                active_users: h.active_users as usize,
                active_sessions: h.sessions as usize,
                last_event: (h.last_event.0 > 0).then_some(h.last_event),
            })
            .collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        hosts
    }

    /// Active users with their sessions, sorted by name.
    pub fn users(&self) -> Vec<UserView> {
        let mut views = self.unsorted_users();
        views.sort_by_cached_key(|v| v.name.to_lowercase());
        views
    }

    /// [`Registry::users`] in no particular order.
    pub(crate) fn unsorted_users(&self) -> Vec<UserView> {
        let mut views: HashMap<UserId, UserView> = HashMap::default();
        let sessions = self
            .by_session_id
            .values()
            .chain(self.by_host_user.values());
        for s in sessions {
            let view = views.entry(s.user).or_insert_with(|| {
                let u = self.user(s.user);
                UserView {
                    name: u.display.to_string(),
                    user_directory: u.directory().to_owned(),
                    user_id: u.user_id().to_owned(),
                    sessions: 0,
                    open_connections: 0,
                    hosts: Vec::new(),
                    first_seen: s.started,
                    last_seen: s.last_seen,
                }
            });
            view.first_seen = view.first_seen.min(s.started);
            view.last_seen = view.last_seen.max(s.last_seen);
            view.sessions += 1;
            view.open_connections += u64::from(s.open_connections);
            let host = &self.hosts[s.host as usize].name;
            if !view.hosts.iter().any(|h| **h == **host) {
                view.hosts.push(host.to_string());
            }
        }
        let mut views: Vec<UserView> = views.into_values().collect();
        for v in &mut views {
            v.hosts.sort();
        }
        views
    }

    /// Writes this registry's users and sessions as one checkpoint segment, straight from its
    /// tables. `host_index` maps this registry's host ids to the body's host indexes.
    pub(crate) fn write_segment(&self, w: &mut BodyWriter, host_index: &[u32]) {
        // Live users get consecutive indexes; free slots are skipped.
        let mut index = vec![u32::MAX; self.users.len()];
        let live = self.users.iter().filter(|u| u.is_some()).count();
        w.segment(live, self.active_sessions());
        let mut next = 0;
        for (slot, user) in self.users.iter().enumerate() {
            if let Some(user) = user {
                index[slot] = next;
                next += 1;
                w.user(user.directory(), user.user_id());
            }
        }
        fn entry<'a>(
            id: SessionId<'a>,
            s: &Session,
            host_index: &[u32],
            index: &[u32],
        ) -> SessionEntry<'a> {
            SessionEntry {
                id,
                host: host_index[s.host as usize],
                user: index[s.user as usize],
                started: s.started,
                last_seen: s.last_seen,
                open_connections: s.open_connections,
            }
        }
        for (guid, s) in &self.by_session_id.guids {
            w.session(entry(SessionId::Guid(guid), s, host_index, &index));
        }
        for (id, s) in &self.by_session_id.other {
            w.session(entry(SessionId::Text(id), s, host_index, &index));
        }
        for s in self.by_host_user.values() {
            w.session(entry(SessionId::None, s, host_index, &index));
        }
    }

    /// Display names of the active users, unsorted (for a [`ShardedRegistry`] to merge).
    pub(crate) fn live_user_names(&self) -> impl Iterator<Item = &str> {
        self.live_users().map(|u| &*u.display)
    }

    /// User ids of the active users, unsorted and not de-duplicated.
    pub(crate) fn live_user_ids(&self) -> impl Iterator<Item = &str> {
        self.live_users().map(User::user_id)
    }

    /// Every host of this registry with its counts, unsorted, without allocating.
    /// Each host's last event, in the order of [`Registry::host_counts`].
    pub(crate) fn host_last_events(&self) -> impl Iterator<Item = UnixMillis> {
        self.hosts.iter().map(|h| h.last_event)
    }

    pub(crate) fn host_counts(&self) -> impl Iterator<Item = (&str, usize, usize)> {
        self.hosts
            .iter()
            .map(|h| (&*h.name, h.active_users as usize, h.sessions as usize))
    }

    fn live_users(&self) -> impl Iterator<Item = &User> {
        self.users.iter().flatten().filter(|u| u.sessions > 0)
    }

    /// Whether `event` would add a session: a start or an open (which recovers a session) of a
    /// session this registry does not hold, by a user it does not exclude. Read-only; for the
    /// session limit, which is checked only when it is reached.
    pub(crate) fn would_start_a_session(&mut self, event: &ProxyEvent<'_>) -> bool {
        if !matches!(
            event.command,
            Command::StartSession | Command::OpenConnection
        ) {
            return false;
        }
        self.set_scratch_to_user_key(event.user_directory, event.user_id);
        if self.exclusions.matches(&self.scratch) {
            return false;
        }
        match event.proxy_session_id {
            Some(id) => !self.by_session_id.contains(id),
            None => match (
                self.find_host(event.host),
                self.find_user(event.user_directory, event.user_id),
            ) {
                (Some(host), Some(user)) => !self.by_host_user.contains_key(&(host, user)),
                _ => true,
            },
        }
    }

    fn insert_new(
        &mut self,
        event: &ProxyEvent<'_>,
        now: UnixMillis,
        admit_host: &mut dyn FnMut(&str) -> bool,
    ) -> Outcome {
        let Some(host) = self.intern_host(event.host, admit_host) else {
            return Outcome::HostLimitReached;
        };
        let user = self.intern_user(event.user_directory, event.user_id);
        let open_connections = u32::from(event.command == Command::OpenConnection);
        let session = Session {
            user,
            host,
            started: now,
            last_seen: now,
            open_connections,
            from_api: false,
            restored: false,
        };
        match event.proxy_session_id {
            Some(id) => self.by_session_id.insert(id, session),
            None => self.by_host_user.insert((host, user), session),
        };
        let h = &mut self.hosts[host as usize];
        h.last_event = h.last_event.max(now);
        self.retain(host, user);
        match event.command {
            Command::StartSession => Outcome::SessionStarted,
            _ => Outcome::SessionRecovered,
        }
    }

    /// The user holding the session `key` names, if any.
    fn holder(&self, key: &SessionKey<'_>) -> Option<UserId> {
        match *key {
            SessionKey::ProxySession(id) => self.by_session_id.get(id),
            SessionKey::HostUser(h, u) => self.by_host_user.get(&(h, u)),
        }
        .map(|s| s.user)
    }

    fn get_mut(&mut self, key: &SessionKey<'_>) -> Option<&mut Session> {
        match *key {
            SessionKey::ProxySession(id) => self.by_session_id.get_mut(id),
            SessionKey::HostUser(h, u) => self.by_host_user.get_mut(&(h, u)),
        }
    }

    fn remove(&mut self, key: &SessionKey<'_>) -> Option<Session> {
        let session = match *key {
            SessionKey::ProxySession(id) => self.by_session_id.remove(id),
            SessionKey::HostUser(h, u) => self.by_host_user.remove(&(h, u)),
        }?;
        self.release(session.host, session.user);
        Some(session)
    }

    /// Counts a new session of `user` on `host`.
    fn retain(&mut self, host: HostId, user: UserId) {
        let h = &mut self.hosts[host as usize];
        h.sessions += 1;
        let on_host = self.host_user_sessions.entry((host, user)).or_insert(0);
        *on_host += 1;
        if *on_host == 1 {
            h.active_users += 1;
        }
        let u = self.user_mut(user);
        u.sessions += 1;
        if u.sessions == 1 {
            self.active_users += 1;
        }
    }

    /// Uncounts a removed session; forgets the user with their last session.
    fn release(&mut self, host: HostId, user: UserId) {
        let h = &mut self.hosts[host as usize];
        h.sessions -= 1;
        if let Some(on_host) = self.host_user_sessions.get_mut(&(host, user)) {
            *on_host -= 1;
            if *on_host == 0 {
                self.host_user_sessions.remove(&(host, user));
                h.active_users -= 1;
            }
        }
        let u = self.user_mut(user);
        u.sessions -= 1;
        if u.sessions == 0 {
            self.active_users -= 1;
            let forgotten = self.users[user as usize].take().expect("live user");
            self.set_scratch_to_user_key(forgotten.directory(), forgotten.user_id());
            self.user_index.remove(self.scratch.as_str());
            self.free_users.push(user);
        }
    }

    fn find_host(&mut self, name: &str) -> Option<HostId> {
        self.scratch.clear();
        push_lowercase(&mut self.scratch, name);
        self.host_index.get(self.scratch.as_str()).copied()
    }

    /// `None` when `name` is new and the host limit is reached (or `admit` refuses it).
    fn intern_host(&mut self, name: &str, admit: &mut dyn FnMut(&str) -> bool) -> Option<HostId> {
        if let Some(id) = self.find_host(name) {
            return Some(id);
        }
        if self.hosts.len() >= self.max_hosts || !admit(name) {
            return None;
        }
        let id = self.hosts.len() as HostId;
        self.host_index.insert(self.scratch.as_str().into(), id);
        self.hosts.push(Host {
            name: name.into(),
            sessions: 0,
            active_users: 0,
            last_event: UnixMillis(0),
        });
        Some(id)
    }

    fn find_user(&mut self, directory: &str, user_id: &str) -> Option<UserId> {
        self.set_scratch_to_user_key(directory, user_id);
        self.user_index.get(self.scratch.as_str()).copied()
    }

    fn intern_user(&mut self, directory: &str, user_id: &str) -> UserId {
        self.set_scratch_to_user_key(directory, user_id);
        self.intern_user_at_scratch(directory, user_id)
    }

    /// [`Registry::intern_user`] when the scratch already holds the user's key.
    fn intern_user_at_scratch(&mut self, directory: &str, user_id: &str) -> UserId {
        if let Some(&id) = self.user_index.get(self.scratch.as_str()) {
            return id;
        }
        let user = User {
            display: format!("{directory}\\{user_id}").into(),
            directory_len: directory.len() as u32,
            sessions: 0,
        };
        let id = match self.free_users.pop() {
            Some(id) => {
                self.users[id as usize] = Some(user);
                id
            }
            None => {
                self.users.push(Some(user));
                (self.users.len() - 1) as UserId
            }
        };
        self.user_index.insert(self.scratch.as_str().into(), id);
        id
    }

    fn user(&self, id: UserId) -> &User {
        self.users[id as usize]
            .as_ref()
            .expect("sessions only name live users")
    }

    fn user_mut(&mut self, id: UserId) -> &mut User {
        self.users[id as usize]
            .as_mut()
            .expect("sessions only name live users")
    }

    /// The case-insensitive identity of a user: `directory\userid`, lower-cased. This is also
    /// what exclusion patterns are matched against.
    fn set_scratch_to_user_key(&mut self, directory: &str, user_id: &str) {
        self.scratch.clear();
        push_lowercase(&mut self.scratch, directory);
        self.scratch.push('\\');
        push_lowercase(&mut self.scratch, user_id);
    }
}

pub(crate) use session_monitor_config::exclusions::push_lowercase;

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::parser::Format;

    const MIN: u64 = 60_000;

    pub(super) fn event<'a>(
        command: Command,
        host: &'a str,
        dir: &'a str,
        user: &'a str,
        sid: Option<&'a str>,
    ) -> ProxyEvent<'a> {
        ProxyEvent {
            format: if sid.is_some() {
                Format::SessionMonitor
            } else {
                Format::Butler
            },
            host,
            command,
            user_directory: dir,
            user_id: user,
            origin: Some("AppAccess"),
            context: Some("/hub/"),
            proxy_session_id: sid,
            message: "",
        }
    }

    use Command::*;

    fn registry() -> Registry {
        Registry::new(ExpiryPolicy::default(), Exclusions::default())
    }

    fn at(minutes: u64) -> UnixMillis {
        UnixMillis(1_700_000_000_000 + minutes * MIN)
    }

    /// Checks the counters the registry maintains incrementally against a recount from scratch.
    fn assert_consistent(r: &Registry) {
        let users = r.users();
        assert_eq!(r.active_users(), users.len());
        assert_eq!(
            r.active_sessions(),
            users.iter().map(|u| u.sessions).sum::<usize>()
        );
        for h in r.hosts() {
            let on_host = users.iter().filter(|u| u.hosts.contains(&h.host)).count();
            assert_eq!(h.active_users, on_host, "host {}", h.host);
        }
        assert_eq!(r.user_names().len(), r.active_users());
    }

    #[test]
    fn start_and_stop_one_session() {
        let mut r = registry();
        assert_eq!(
            r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0)),
            Outcome::SessionStarted
        );
        assert_eq!((r.active_users(), r.active_sessions()), (1, 1));
        assert_eq!(r.user_names(), vec!["LAB\\joe"]);
        assert_eq!(
            r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(1)),
            Outcome::SessionRefreshed
        );
        assert_eq!(
            r.apply(&event(StopSession, "p1", "LAB", "joe", None), at(2)),
            Outcome::SessionStopped
        );
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
        assert!(r.user_names().is_empty());
        assert_consistent(&r);
    }

    #[test]
    fn users_are_directory_and_id_case_insensitively() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(StartSession, "p1", "CORP", "joe", None), at(0));
        assert_eq!(r.active_users(), 2, "LAB\\joe and CORP\\joe are two people");
        assert_eq!(
            r.apply(&event(OpenConnection, "P1", "lab", "JOE", None), at(1)),
            Outcome::SessionRefreshed,
            "same user and host in another case"
        );
        assert_eq!(r.active_users(), 2);
        assert_eq!(r.user_names(), vec!["CORP\\joe", "LAB\\joe"]);
        assert_eq!(r.user_ids(), vec!["joe"]);
        assert_consistent(&r);
    }

    #[test]
    fn one_user_on_several_proxies() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(StartSession, "p2", "LAB", "joe", None), at(0));
        r.apply(&event(StartSession, "p2", "LAB", "ann", None), at(0));
        assert_eq!((r.active_users(), r.active_sessions()), (2, 3));
        let hosts = r.hosts();
        assert_eq!(
            hosts[0],
            HostSummary {
                host: "p1".into(),
                active_users: 1,
                active_sessions: 1,
                last_event: Some(at(0)),
            }
        );
        assert_eq!(
            hosts[1],
            HostSummary {
                host: "p2".into(),
                active_users: 2,
                active_sessions: 2,
                last_event: Some(at(0)),
            }
        );
        // Butler dropped joe on the first stop from any proxy; joe is still on p2.
        r.apply(&event(StopSession, "p1", "LAB", "joe", None), at(1));
        assert_eq!(r.active_users(), 2);
        assert_eq!(r.hosts()[0].active_users, 0, "p1 stays listed at zero");
        assert_consistent(&r);
    }

    #[test]
    fn several_sessions_of_one_user_by_session_id() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("s1")), at(0));
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("s2")), at(0));
        assert_eq!((r.active_users(), r.active_sessions()), (1, 2));
        assert_eq!(r.hosts()[0].active_users, 1);
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some("s1")), at(1));
        assert_eq!((r.active_users(), r.active_sessions()), (1, 1));
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some("s2")), at(1));
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
        assert_consistent(&r);
    }

    #[test]
    fn guid_session_ids_are_keyed_compactly_and_come_back_exactly() {
        let guid = "0c7b5e2a-91f3-4d2e-8a6b-3f1e2d4c5b6a";
        assert_eq!(
            parse_guid(guid).map(|g| format_guid(&g)).as_deref(),
            Some(guid)
        );
        // Not Qlik's lower-case GUIDs: kept as text, so they too come back as sent.
        for text in [
            "0C7B5E2A-91F3-4D2E-8A6B-3F1E2D4C5B6A",
            "s1",
            "0c7b5e2a91f34d2e8a6b3f1e2d4c5b6a00000",
            "0c7b5e2a-91f3-4d2e-8a6b-3f1e2d4c5b6g",
        ] {
            assert_eq!(parse_guid(text), None, "{text}");
        }
        let mut r = registry();
        let upper = "0C7B5E2A-91F3-4D2E-8A6B-3F1E2D4C5B6A";
        for id in [guid, upper, "s1"] {
            r.apply(&event(StartSession, "p1", "LAB", "joe", Some(id)), at(0));
        }
        assert_eq!(r.by_session_id.guids.len(), 1);
        assert_eq!(r.by_session_id.other.len(), 2);
        let mut ids: Vec<_> = r
            .snapshot()
            .into_iter()
            .filter_map(|s| s.proxy_session_id)
            .collect();
        ids.sort();
        assert_eq!(ids, [upper, guid, "s1"]);
        r.apply(
            &event(OpenConnection, "p1", "LAB", "joe", Some(guid)),
            at(1),
        );
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some(guid)), at(2));
        assert_eq!(r.active_sessions(), 2);
        assert_consistent(&r);
    }

    #[test]
    fn stop_without_start_is_a_counted_no_op() {
        let mut r = registry();
        assert_eq!(
            r.apply(&event(StopSession, "p1", "LAB", "joe", None), at(0)),
            Outcome::UnknownSessionStopped
        );
        assert_eq!(
            r.apply(&event(StopSession, "p1", "LAB", "joe", Some("x")), at(0)),
            Outcome::UnknownSessionStopped
        );
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
        assert!(r.hosts().is_empty(), "a stop must not create a host");
    }

    #[test]
    fn stop_on_another_host_leaves_the_session() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        assert_eq!(
            r.apply(&event(StopSession, "p2", "LAB", "joe", None), at(1)),
            Outcome::UnknownSessionStopped
        );
        assert_eq!(r.active_users(), 1);
        assert_consistent(&r);
    }

    #[test]
    fn connection_for_an_unknown_session_recovers_it() {
        let mut r = registry();
        assert_eq!(
            r.apply(&event(OpenConnection, "p1", "LAB", "joe", None), at(0)),
            Outcome::SessionRecovered
        );
        assert_eq!(r.users()[0].open_connections, 1);
        assert_eq!(r.active_users(), 1);
        assert_consistent(&r);
    }

    #[test]
    fn connections_are_counted_and_never_negative() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(OpenConnection, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(OpenConnection, "p1", "LAB", "joe", None), at(0));
        assert_eq!(r.users()[0].open_connections, 2);
        for _ in 0..3 {
            r.apply(&event(CloseConnection, "p1", "LAB", "joe", None), at(0));
        }
        assert_eq!(r.users()[0].open_connections, 0);
        assert_eq!(
            r.active_users(),
            1,
            "closing connections does not end the session"
        );
    }

    #[test]
    fn idle_sessions_without_connections_expire_after_idle_timeout() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(StartSession, "p1", "LAB", "ann", None), at(10));
        assert_eq!(
            r.expire(at(30)),
            Expired::default(),
            "exactly at the timeout is not past it"
        );
        assert_eq!(
            r.expire(at(31)),
            Expired {
                idle: 1,
                max_idle: 0
            }
        );
        assert_eq!(r.user_names(), vec!["LAB\\ann"]);
        r.apply(&event(OpenConnection, "p1", "LAB", "ann", None), at(35));
        assert_eq!(
            r.expire(at(35 + 31)),
            Expired::default(),
            "an open connection holds the session"
        );
        assert_consistent(&r);
    }

    #[test]
    fn any_session_expires_after_max_idle() {
        let mut r = registry();
        r.apply(
            &event(OpenConnection, "p1", "LAB", "joe", Some("s1")),
            at(0),
        );
        assert_eq!(r.expire(at(24 * 60)), Expired::default());
        assert_eq!(
            r.expire(at(24 * 60 + 1)),
            Expired {
                idle: 0,
                max_idle: 1
            }
        );
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
        assert_eq!(r.hosts()[0].active_users, 0);
    }

    #[test]
    fn events_refresh_the_expiry_clock() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(&event(CloseConnection, "p1", "lab", "joe", None), at(20));
        assert_eq!(r.expire(at(45)), Expired::default());
        assert_eq!(r.expire(at(51)).idle, 1);
    }

    #[test]
    fn excluded_users_are_not_counted() {
        let exclusions = Exclusions::new(["INTERNAL\\sa_*", "*\\svc-*"]).unwrap();
        let mut r = Registry::new(ExpiryPolicy::default(), exclusions);
        assert_eq!(
            r.apply(
                &event(StartSession, "p1", "INTERNAL", "sa_repository", None),
                at(0)
            ),
            Outcome::Excluded
        );
        assert_eq!(
            r.apply(
                &event(OpenConnection, "p1", "internal", "SA_scheduler", None),
                at(0)
            ),
            Outcome::Excluded
        );
        assert_eq!(
            r.apply(
                &event(StartSession, "p1", "CORP", "svc-reload", None),
                at(0)
            ),
            Outcome::Excluded
        );
        assert_eq!(
            r.apply(&event(StartSession, "p1", "INTERNAL", "joe", None), at(0)),
            Outcome::SessionStarted
        );
        assert_eq!(r.user_names(), vec!["INTERNAL\\joe"]);
    }

    #[test]
    fn a_user_id_may_contain_a_backslash() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "odd\\name", None), at(0));
        let u = &r.users()[0];
        assert_eq!(
            (u.user_directory.as_str(), u.user_id.as_str()),
            ("LAB", "odd\\name")
        );
    }

    /// Hosts without their last event, which a checkpoint does not keep.
    fn counts(hosts: &[HostSummary]) -> Vec<(String, usize, usize)> {
        hosts
            .iter()
            .map(|h| (h.host.clone(), h.active_users, h.active_sessions))
            .collect()
    }

    #[test]
    fn snapshot_and_restore_round_trip_and_drop_expired() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", None), at(0));
        r.apply(
            &event(OpenConnection, "p2", "LAB", "joe", Some("s1")),
            at(5),
        );
        r.apply(
            &event(StartSession, "p2", "CORP", "ann", Some("s2")),
            at(20),
        );
        let records = r.snapshot();
        assert_eq!(records.len(), 3);

        let mut back = registry();
        assert_eq!(back.restore(&records, at(21)), 3);
        assert_eq!(back.users(), r.users());
        assert_eq!(counts(&back.hosts()), counts(&r.hosts()));

        // At minute 40, joe's connection-less session on p1 (silent since 0) has expired.
        let mut later = registry();
        assert_eq!(later.restore(&records, at(40)), 2);
        assert_eq!(later.user_names(), vec!["CORP\\ann", "LAB\\joe"]);
        assert_eq!(later.users()[1].hosts, vec!["p2"]);
        assert_consistent(&later);
    }

    /// A user's first and last seen come from their active sessions, so a restore (which has
    /// only the sessions) shows them as they were, even after the session that carried the
    /// user's newest or oldest event has stopped. The real-API-server e2e test found this under
    /// load, when two of a user's events fell in different milliseconds.
    #[test]
    fn first_and_last_seen_survive_a_restore_after_a_stop() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("old")), at(0));
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("s1")), at(2));
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("new")), at(3));
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some("new")), at(4));
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some("old")), at(4));
        let joe = &r.users()[0];
        assert_eq!((joe.first_seen, joe.last_seen), (at(2), at(2)));

        let mut back = registry();
        assert_eq!(back.restore(&r.snapshot(), at(5)), 1);
        assert_eq!(back.users(), r.users());
    }

    #[test]
    fn restore_keeps_sessions_that_are_already_live() {
        let mut old = registry();
        old.apply(
            &event(OpenConnection, "p1", "LAB", "joe", Some("s1")),
            at(0),
        );
        old.apply(&event(StartSession, "p1", "LAB", "ann", None), at(0));
        let records = old.snapshot();

        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "joe", Some("s1")), at(5));
        r.apply(&event(StartSession, "P1", "lab", "ANN", None), at(5));
        assert_eq!(
            r.restore(&records, at(6)),
            0,
            "both sessions are live already"
        );
        assert_eq!(r.active_sessions(), 2);
        assert_eq!(
            r.users()[1].open_connections,
            0,
            "the live session's state wins"
        );
        assert_consistent(&r);
    }

    #[test]
    fn a_close_for_an_unknown_session_does_not_bring_a_user_back() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "ann", Some("s9")), at(0));
        r.apply(&event(StopSession, "p1", "LAB", "ann", Some("s9")), at(1));
        // The proxy logged the tab's close after the stop (or UDP reordered them).
        assert_eq!(
            r.apply(
                &event(CloseConnection, "p1", "LAB", "ann", Some("s9")),
                at(1)
            ),
            Outcome::UnknownSessionClosed
        );
        assert_eq!(
            r.apply(&event(CloseConnection, "p1", "LAB", "bob", None), at(1)),
            Outcome::UnknownSessionClosed
        );
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
    }

    #[test]
    fn new_hosts_beyond_the_limit_are_refused() {
        let mut r = registry().with_max_hosts(2);
        r.apply(&event(StartSession, "p1", "LAB", "a", None), at(0));
        r.apply(&event(StartSession, "p2", "LAB", "b", None), at(0));
        assert_eq!(
            r.apply(&event(StartSession, "p3", "LAB", "c", None), at(0)),
            Outcome::HostLimitReached
        );
        assert_eq!(
            r.apply(&event(OpenConnection, "P2", "LAB", "c", None), at(0)),
            Outcome::SessionRecovered
        );
        assert_eq!(r.hosts().len(), 2);
        assert_eq!(r.active_users(), 3);
        assert_consistent(&r);
    }

    #[test]
    fn hosts_at_zero_survive_a_checkpoint() {
        let mut r = registry();
        r.apply(&event(StartSession, "p1", "LAB", "a", None), at(0));
        r.apply(&event(StopSession, "p1", "LAB", "a", None), at(1));
        let mut back = registry();
        back.restore_hosts(&r.host_names());
        back.restore(&r.snapshot(), at(2));
        assert_eq!(
            back.hosts(),
            vec![HostSummary {
                host: "p1".into(),
                active_users: 0,
                active_sessions: 0,
                last_event: None,
            }]
        );
    }

    #[test]
    fn duplicate_records_in_a_checkpoint_do_not_break_restore() {
        let mut r = registry();
        r.apply(
            &event(OpenConnection, "p1", "LAB", "joe", Some("s1")),
            at(0),
        );
        r.apply(&event(StartSession, "p1", "LAB", "ann", None), at(0));
        let mut records = r.snapshot();
        records.extend(r.snapshot());
        let mut ann_again = records
            .iter()
            .find(|x| x.proxy_session_id.is_none())
            .unwrap()
            .clone();
        ann_again.host = "P1".into();
        records.push(ann_again);
        let mut back = registry();
        assert_eq!(back.restore(&records, at(1)), 2);
        assert_eq!((back.active_users(), back.active_sessions()), (2, 2));
        assert_consistent(&back);
    }

    /// joe (by id, two connections), ann (no id) and bob (by id), as a checkpoint saved them
    /// at minute 10.
    fn checkpointed() -> Vec<SessionRecord> {
        let mut old = registry();
        old.apply(&event(StartSession, "p1", "LAB", "joe", Some("s1")), at(0));
        for _ in 0..2 {
            old.apply(
                &event(OpenConnection, "p1", "LAB", "joe", Some("s1")),
                at(10),
            );
        }
        old.apply(&event(StartSession, "p1", "LAB", "ann", None), at(10));
        old.apply(&event(StartSession, "p2", "LAB", "bob", Some("s2")), at(10));
        old.snapshot()
    }

    #[test]
    fn a_session_stopped_before_the_restore_is_not_restored() {
        let mut r = registry();
        // Received while the checkpoint loads: the registry does not know them yet.
        for stop in [
            event(StopSession, "p1", "LAB", "joe", Some("s1")),
            event(StopSession, "P1", "lab", "ANN", None),
            // Another user naming bob's session id does not reach it, live or not.
            event(StopSession, "p2", "LAB", "eve", Some("s2")),
        ] {
            assert_eq!(r.apply(&stop, at(12)), Outcome::UnknownSessionStopped);
        }
        assert_eq!(r.restore(&checkpointed(), at(13)), 1);
        assert_eq!((r.active_users(), r.active_sessions()), (1, 1));
        assert_eq!(r.user_names(), vec!["LAB\\bob"]);
        assert_eq!(
            counts(&r.hosts()),
            [("p2".into(), 1, 1)],
            "no session of p1 came back (its name does, from the checkpoint's hosts)"
        );
        assert_consistent(&r);
        assert_eq!(
            r.end_restore(),
            RestoreEnd {
                stopped: 2,
                ..RestoreEnd::default()
            }
        );
    }

    #[test]
    fn a_close_before_the_restore_lowers_open_connections() {
        let mut r = registry();
        for _ in 0..3 {
            assert_eq!(
                r.apply(
                    &event(CloseConnection, "p1", "LAB", "joe", Some("s1")),
                    at(12)
                ),
                Outcome::UnknownSessionClosed
            );
        }
        assert_eq!(
            r.apply(
                &event(CloseConnection, "p2", "LAB", "bob", Some("s2")),
                at(11)
            ),
            Outcome::UnknownSessionClosed,
            "bob's session has no connection: a close takes none below zero"
        );
        assert_eq!(r.restore(&checkpointed(), at(13)), 3);
        let users = r.users();
        let joe = users.iter().find(|u| u.user_id == "joe").unwrap();
        assert_eq!(joe.open_connections, 0, "two open, three closed: none left");
        assert_eq!(joe.last_seen, at(12), "a close is activity, as it is live");
        let bob = users.iter().find(|u| u.user_id == "bob").unwrap();
        assert_eq!((bob.open_connections, bob.last_seen), (0, at(11)));
        assert_consistent(&r);
        assert_eq!(
            r.end_restore(),
            RestoreEnd {
                closed_connections: 2,
                ..RestoreEnd::default()
            }
        );
        // None has a connection left: each idles out 30 minutes after its last activity, which
        // for joe is the last close.
        assert_eq!(r.expire(at(11 + 31)).idle, 2);
        assert_eq!(r.expire(at(12 + 31)).idle, 1);
    }

    #[test]
    fn a_stop_older_than_the_checkpointed_activity_does_not_suppress_it() {
        let mut r = registry();
        // Older than minute 10, when the checkpoint last saw these sessions: without an id,
        // ann's next session on p1 has the same key as the one that stopped (the stop came to
        // this process late, or its clock is behind the one that saved the checkpoint).
        r.apply(&event(StopSession, "p1", "LAB", "ann", None), at(9));
        r.apply(&event(StopSession, "p1", "LAB", "joe", Some("s1")), at(9));
        assert_eq!(r.restore(&checkpointed(), at(13)), 3);
        assert_eq!((r.active_users(), r.active_sessions()), (3, 3));
        assert_eq!(r.end_restore(), RestoreEnd::default());
        // At the checkpoint's own last activity, a stop is taken as later: it suppresses.
        let mut r = registry();
        r.apply(&event(StopSession, "p1", "LAB", "ann", None), at(10));
        assert_eq!(r.restore(&checkpointed(), at(13)), 2);
    }

    #[test]
    fn after_the_restore_unknown_stops_are_no_longer_remembered() {
        let stop = event(StopSession, "p1", "LAB", "joe", Some("s1"));
        // Ended by a restore, even of an empty checkpoint.
        let mut r = registry();
        r.apply(&stop, at(11));
        assert_eq!(r.before_restore.remembered(), 1);
        assert_eq!(r.restore(&[], at(12)), 0);
        assert_eq!(r.before_restore.remembered(), 0, "dropped at the end");
        assert_eq!(r.apply(&stop, at(12)), Outcome::UnknownSessionStopped);
        assert_eq!(
            r.before_restore.remembered(),
            0,
            "and not recorded any more"
        );
        assert_eq!(r.end_restore(), RestoreEnd::default());
        // Ended without a restore (no checkpoint, a corrupt one, a shutdown while retrying):
        // a restore after that (there is none in the service) would take nothing back.
        let mut r = registry();
        r.apply(&stop, at(11));
        r.end_restore();
        r.apply(&stop, at(12));
        assert_eq!(r.before_restore.remembered(), 0);
        assert_eq!(r.restore(&checkpointed(), at(13)), 3);
        assert_eq!(r.end_restore(), RestoreEnd::default());
    }

    #[test]
    fn what_is_remembered_before_the_restore_is_capped() {
        let mut r = registry().with_restore_memory_cap(RestoreMemoryCap {
            sessions: 3,
            bytes: usize::MAX,
        });
        for i in 0..5 {
            let id = format!("s{i}");
            r.apply(&event(StopSession, "p1", "LAB", "joe", Some(&id)), at(11));
        }
        assert_eq!(r.before_restore.remembered(), 3);
        // A session already remembered still takes its events when the memory is full.
        r.apply(
            &event(CloseConnection, "p1", "LAB", "joe", Some("s0")),
            at(11),
        );
        r.apply(&event(StopSession, "p1", "LAB", "ann", None), at(11));
        assert_eq!(r.before_restore.remembered(), 3);
        assert_eq!(
            r.end_restore(),
            RestoreEnd {
                not_remembered: 3,
                ..RestoreEnd::default()
            }
        );

        // And by bytes: a key is the user key's length, the user key, then the session
        // (`7:lab\joeis0`, 12 bytes).
        let mut r = registry().with_restore_memory_cap(RestoreMemoryCap {
            sessions: 100,
            bytes: 30,
        });
        for i in 0..5 {
            let id = format!("s{i}");
            r.apply(&event(StopSession, "p1", "LAB", "joe", Some(&id)), at(11));
        }
        assert_eq!(r.before_restore.remembered(), 2);
        assert_eq!(r.end_restore().not_remembered, 3);
    }

    #[test]
    fn user_slots_are_reused_after_the_last_session_ends() {
        let mut r = registry();
        for i in 0..100 {
            let name = format!("u{i}");
            r.apply(&event(StartSession, "p1", "LAB", &name, None), at(0));
            r.apply(&event(StopSession, "p1", "LAB", &name, None), at(0));
        }
        assert_eq!(r.users.len(), 1);
        assert!(r.user_index.is_empty());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn any_event() -> impl Strategy<Value = (Command, usize, usize, Option<usize>, u64)> {
            (
                prop::sample::select(Command::ALL.to_vec()),
                0..3usize,
                0..5usize,
                prop::option::of(0..6usize),
                0..40u64,
            )
        }

        proptest! {
            #[test]
            fn counters_always_match_a_recount(
                events in prop::collection::vec(any_event(), 0..200)
            ) {
                const HOSTS: [&str; 3] = ["p1", "P2", "p3"];
                const USERS: [&str; 5] = ["joe", "JOE", "ann", "bob", "eve"];
                const IDS: [&str; 6] = ["a", "b", "c", "d", "e", "f"];
                let mut r = registry();
                let mut now = at(0);
                for (command, h, u, sid, advance) in events {
                    now = UnixMillis(now.0 + advance * MIN);
                    r.apply(&event(command, HOSTS[h], "LAB", USERS[u], sid.map(|i| IDS[i])), now);
                    if advance > 30 {
                        r.expire(now);
                    }
                    assert_consistent(&r);
                }
            }
        }
    }
}
