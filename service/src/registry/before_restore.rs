//! Stops and closes of sessions only the checkpoint holds, seen before it is restored.
//!
//! The service receives events from the start, also while the checkpoint still loads (a
//! ConfigMap store may be slow or retrying), and the restore lets sessions seen meanwhile win
//! over their checkpointed copies. A session that only the checkpoint holds is unknown until
//! then, though: its stop finds nothing to remove, and the restore would bring it back, counted
//! active until `max_idle`. So while the restore is pending, the stops and connection closes of
//! unknown sessions are remembered, and the restore applies them as if they had come after it:
//! a session stopped at or after its checkpointed last activity is not restored, and one whose
//! connections closed comes back with fewer open.
//!
//! Pending from the registry's creation until its restore ends ([`Registry::restore`], or
//! [`Registry::end_restore`] when there is nothing to restore); then the memory is dropped and
//! nothing is recorded any more, so it costs nothing in steady state. The events come from the
//! network and a restore may retry for long: the memory is bounded ([`RestoreMemoryCap`]), and
//! what does not fit is counted.
//!
//! A session is remembered by the key the registry holds it under (its proxy session id, else
//! its host), together with its user's key: an event naming another user's session id does not
//! reach that session live ([`Outcome::SessionOfAnotherUser`]), so it must not before the restore
//! either.
//!
//! [`Registry::restore`]: super::Registry::restore
//! [`Registry::end_restore`]: super::Registry::end_restore
//! [`Outcome::SessionOfAnotherUser`]: super::Outcome::SessionOfAnotherUser

use std::fmt::Write;

use super::{HashMap, RestoreRecord, UnixMillis, push_guid, push_lowercase};
use crate::checkpoint::codec::SessionId;

/// How much a registry remembers before its restore, over all its shards. 100,000 sessions is
/// far more than stop in a start-up, however slow the store; 16 MiB of keys bounds the memory
/// when hostile datagrams carry the longest fields the parser accepts (about 1.5 KB a key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestoreMemoryCap {
    pub sessions: usize,
    pub bytes: usize,
}

impl RestoreMemoryCap {
    pub const DEFAULT: RestoreMemoryCap = RestoreMemoryCap {
        sessions: 100_000,
        bytes: 16 << 20,
    };

    /// Each of `shards` gets an equal share, so the whole stays within the cap. A user's events
    /// always land in the user's shard, and users spread evenly over the shards.
    pub fn per_shard(self, shards: usize) -> RestoreMemoryCap {
        let shards = shards.max(1);
        RestoreMemoryCap {
            sessions: (self.sessions / shards).max(1),
            bytes: (self.bytes / shards).max(1),
        }
    }
}

/// What the events seen before the restore did to it, reported once it ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreEnd {
    /// Checkpointed sessions not restored: they stopped while the checkpoint loaded.
    pub stopped: usize,
    /// Open connections of restored sessions that closed while the checkpoint loaded.
    pub closed_connections: u64,
    /// Stops and closes of new sessions beyond the cap, not remembered (a session only the
    /// checkpoint held may have come back despite one of them).
    pub not_remembered: u64,
}

impl std::ops::AddAssign for RestoreEnd {
    fn add_assign(&mut self, o: RestoreEnd) {
        self.stopped += o.stopped;
        self.closed_connections += o.closed_connections;
        self.not_remembered += o.not_remembered;
    }
}

/// The session an event or a checkpoint record names, as the registry keys it.
#[derive(Clone, Copy, Debug)]
pub(super) enum Named<'a> {
    /// A proxy session id, as sent (a Qlik GUID's text is its canonical form).
    Id(&'a str),
    /// A proxy session id the registry holds as a GUID: the same session as its text.
    Guid(&'a [u8; 16]),
    /// No id: the user's one session on this proxy host.
    OnHost(&'a str),
}

impl<'a> Named<'a> {
    pub(super) fn of_event(proxy_session_id: Option<&'a str>, host: &'a str) -> Named<'a> {
        proxy_session_id.map_or(Named::OnHost(host), Named::Id)
    }

    fn of_record(r: &RestoreRecord<'a>) -> Named<'a> {
        match r.id {
            SessionId::Guid(guid) => Named::Guid(guid),
            SessionId::Text(id) => Named::Id(id),
            SessionId::None => Named::OnHost(r.host),
        }
    }
}

/// What one registry (or shard) remembers until its restore ends; see the module docs.
#[derive(Debug)]
pub(super) struct BeforeRestore {
    /// `None` once the restore is over: from then on nothing is recorded.
    pending: Option<Pending>,
    cap: RestoreMemoryCap,
    /// Kept after the memory is dropped, until [`BeforeRestore::take_report`].
    report: RestoreEnd,
}

impl Default for BeforeRestore {
    fn default() -> Self {
        BeforeRestore::with_cap(RestoreMemoryCap::DEFAULT)
    }
}

#[derive(Debug, Default)]
struct Pending {
    /// By the text [`Pending::build_key`] makes.
    seen: HashMap<Box<str>, Seen>,
    /// The bytes of the keys in `seen`.
    bytes: usize,
    /// Reused to build keys, so that a lookup allocates nothing.
    user: String,
    key: String,
}

/// What came for one unknown session before the restore.
#[derive(Clone, Copy, Debug, Default)]
struct Seen {
    /// The newest stop; `None`: none, only closes.
    stopped: Option<UnixMillis>,
    closes: u32,
    last_close: UnixMillis,
}

impl Pending {
    /// The text a session is remembered by: its user's key (as the registry matches users:
    /// `directory\userid`, lower-cased), then the session as the registry keys it. The user
    /// key's length comes first, so no other pair of user and session makes the same text.
    fn build_key(&mut self, directory: &str, user_id: &str, session: Named<'_>) {
        self.user.clear();
        push_lowercase(&mut self.user, directory);
        self.user.push('\\');
        push_lowercase(&mut self.user, user_id);
        self.key.clear();
        let _ = write!(self.key, "{}:", self.user.len());
        self.key.push_str(&self.user);
        match session {
            Named::Id(id) => {
                self.key.push('i');
                self.key.push_str(id);
            }
            Named::Guid(guid) => {
                self.key.push('i');
                push_guid(&mut self.key, guid);
            }
            Named::OnHost(host) => {
                // Hosts are matched case-insensitively, like users.
                self.key.push('h');
                push_lowercase(&mut self.key, host);
            }
        }
    }
}

impl BeforeRestore {
    pub(super) fn with_cap(cap: RestoreMemoryCap) -> BeforeRestore {
        BeforeRestore {
            pending: Some(Pending::default()),
            cap,
            report: RestoreEnd::default(),
        }
    }

    /// Remembers a stop of a session the registry does not know, if the restore is pending.
    pub(super) fn stopped(
        &mut self,
        directory: &str,
        user_id: &str,
        session: Named<'_>,
        at: UnixMillis,
    ) {
        if let Some(seen) = self.entry(directory, user_id, session) {
            seen.stopped = Some(seen.stopped.map_or(at, |s| s.max(at)));
        }
    }

    /// Counts a connection close of a session the registry does not know, if the restore is
    /// pending.
    pub(super) fn closed(
        &mut self,
        directory: &str,
        user_id: &str,
        session: Named<'_>,
        at: UnixMillis,
    ) {
        if let Some(seen) = self.entry(directory, user_id, session) {
            seen.closes = seen.closes.saturating_add(1);
            seen.last_close = seen.last_close.max(at);
        }
    }

    /// The session's memory, made if there is room; `None` once the restore is over or when the
    /// memory is full (counted).
    fn entry(&mut self, directory: &str, user_id: &str, session: Named<'_>) -> Option<&mut Seen> {
        let pending = self.pending.as_mut()?;
        pending.build_key(directory, user_id, session);
        let Pending {
            seen, bytes, key, ..
        } = pending;
        if !seen.contains_key(key.as_str()) {
            if seen.len() >= self.cap.sessions || *bytes + key.len() > self.cap.bytes {
                self.report.not_remembered += 1;
                return None;
            }
            *bytes += key.len();
            seen.insert(key.as_str().into(), Seen::default());
        }
        seen.get_mut(key.as_str())
    }

    /// Brings a checkpointed session up to the stops and closes seen before the restore: `false`
    /// if it stopped at or after its last activity (not to be restored); else its open
    /// connections less those closed since, and its last activity the newest close.
    pub(super) fn settle(&mut self, r: &mut RestoreRecord<'_>) -> bool {
        let Some(pending) = self.pending.as_mut() else {
            return true;
        };
        // The usual restore: nothing came before it. No key is built then.
        if pending.seen.is_empty() {
            return true;
        }
        pending.build_key(r.user_directory, r.user_id, Named::of_record(r));
        let Some(seen) = pending.seen.get(pending.key.as_str()) else {
            return true;
        };
        // A stop older than the checkpoint's last activity was of an earlier session under the
        // same key (without an id, a user's next session on a host has the same key).
        if seen.stopped.is_some_and(|at| at >= r.last_seen) {
            self.report.stopped += 1;
            return false;
        }
        if seen.closes > 0 {
            let closed = seen.closes.min(r.open_connections);
            self.report.closed_connections += u64::from(closed);
            r.open_connections -= closed;
            // A close refreshes a live session's last activity: so it does this one.
            r.last_seen = r.last_seen.max(seen.last_close);
        }
        true
    }

    /// The restore is over: drops the memory and records nothing more.
    pub(super) fn end(&mut self) {
        self.pending = None;
    }

    /// What the memory did, once; zero afterwards.
    pub(super) fn take_report(&mut self) -> RestoreEnd {
        std::mem::take(&mut self.report)
    }

    /// Sessions remembered now.
    #[cfg(test)]
    pub(super) fn remembered(&self) -> usize {
        self.pending.as_ref().map_or(0, |p| p.seen.len())
    }
}
