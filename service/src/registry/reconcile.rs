//! Merging one proxy node's session list, as its API gave it, into the registry.
//!
//! The events are real time; the list is the truth at the moment it was fetched. For each user
//! the node lists or the registry holds on that node:
//! - sessions whose proxy session id the list names are confirmed;
//! - the rest are paired by count ([`Pairing::ByCount`]), because the proxy logs a salted hash
//!   of its session id, so the id an event carries may never equal the API's; once a node's ids
//!   have proven equal ([`Pairing::ById`]) an unmatched id is a different session;
//! - a listed session the registry lacks is added (a recovery), unless the user stopped a
//!   session on that node since shortly before the fetch (the stop is newer than the list);
//! - a held session the list lacks is removed once it has been silent for the grace period
//!   before the fetch, so a session whose events arrived during the request is never undone;
//! - a confirmed session's last-seen time moves up to the fetch, so that it does not idle out
//!   while the API still lists it.
//!
//! The work is proportional to the shard's sessions, like expiry, and runs one shard at a time.

use std::collections::HashMap;
use std::time::Duration;

use super::{HostId, Registry, Session, UnixMillis, UserId, parse_guid};

/// One user as a node's API listed them, with one entry per session: the API's session id, or
/// an empty string where it gave none.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedUser {
    pub directory: String,
    pub user_id: String,
    pub session_ids: Vec<String>,
}

/// How held sessions the list does not name by id are matched with listed ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pairing {
    /// Ids differ between events and API: a user's sessions are matched by number.
    ByCount,
    /// Ids have proven equal on this node: only an equal id is the same session.
    ById,
}

/// What one merge did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Listed sessions the registry lacked.
    pub added: usize,
    /// Held sessions the list no longer had.
    pub removed: usize,
    /// Held sessions the list confirmed.
    pub confirmed: usize,
    /// Of those, confirmed by an equal session id that an event had carried: the node's ids
    /// are the same in events and API ([`Pairing::ById`] from then on).
    pub matched_event_ids: usize,
    /// Held sessions the list lacks that are still within the grace period.
    pub in_grace: usize,
}

impl std::ops::AddAssign for Reconciled {
    fn add_assign(&mut self, o: Reconciled) {
        self.added += o.added;
        self.removed += o.removed;
        self.confirmed += o.confirmed;
        self.matched_event_ids += o.matched_event_ids;
        self.in_grace += o.in_grace;
    }
}

/// Stop events of the last moments, by host and user key, so that a merge does not bring back
/// a session that stopped after the list was fetched. Off (and empty) unless reconciliation is.
#[derive(Debug, Default)]
pub(super) struct RecentStops {
    /// How long a stop is remembered; `None`: not recorded at all.
    memory: Option<Duration>,
    /// By host, then by user key.
    at: HashMap<HostId, HashMap<Box<str>, UnixMillis>>,
}

impl RecentStops {
    pub(super) fn enabled(&self) -> bool {
        self.memory.is_some()
    }

    pub(super) fn record(&mut self, host: HostId, user_key: &str, now: UnixMillis) {
        let on_host = self.at.entry(host).or_default();
        match on_host.get_mut(user_key) {
            Some(at) => *at = now,
            None => {
                on_host.insert(user_key.into(), now);
            }
        }
    }

    pub(super) fn forget_before(&mut self, now: UnixMillis) {
        if let Some(memory) = self.memory {
            let oldest = now.0.saturating_sub(memory.as_millis() as u64);
            for on_host in self.at.values_mut() {
                on_host.retain(|_, at| at.0 >= oldest);
            }
        }
    }

    fn since(&self, host: HostId, user_key: &str, cutoff: UnixMillis) -> bool {
        self.at
            .get(&host)
            .and_then(|on_host| on_host.get(user_key))
            .is_some_and(|at| *at >= cutoff)
    }
}

/// A session held on the node being merged.
struct HeldSession {
    key: Held,
    last_seen: UnixMillis,
    from_api: bool,
}

/// A held session, by the key it is stored under.
#[derive(Clone, Debug)]
enum Held {
    Guid([u8; 16]),
    Text(Box<str>),
    HostUser,
}

impl Held {
    fn is(&self, api_id: &str) -> bool {
        match self {
            Held::Guid(guid) => parse_guid(api_id).is_some_and(|g| g == *guid),
            Held::Text(id) => **id == *api_id,
            Held::HostUser => false,
        }
    }
}

impl Registry {
    /// Remembers stop events for `memory`, which must cover a merge's grace period plus the
    /// longest request: a merge asks whether a user stopped since its fetch minus the grace.
    pub fn remember_stops(&mut self, memory: Duration) {
        self.stops.memory = Some(memory);
    }

    /// Merges `listed`, a node's session list fetched at `fetched_at`, for the users of this
    /// registry, into the sessions held on `host` (the name the proxy logs). See the module
    /// docs for the rules.
    pub(crate) fn reconcile_host(
        &mut self,
        host: &str,
        listed: &[&ListedUser],
        fetched_at: UnixMillis,
        grace: Duration,
        pairing: Pairing,
        admit_host: &mut dyn FnMut(&str) -> bool,
    ) -> Reconciled {
        let cutoff = UnixMillis(fetched_at.0.saturating_sub(grace.as_millis() as u64));
        let mut done = Reconciled::default();
        let host_id = match self.find_host(host) {
            Some(id) => Some(id),
            None if listed.is_empty() => None,
            None => self.intern_host(host, admit_host),
        };
        let Some(host_id) = host_id else {
            return done;
        };

        // The sessions held on this node, by user.
        let mut held: HashMap<UserId, Vec<HeldSession>> = HashMap::new();
        let mut hold = |key: Held, s: &Session| {
            held.entry(s.user).or_default().push(HeldSession {
                key,
                last_seen: s.last_seen,
                from_api: s.from_api,
            })
        };
        for (guid, s) in &self.by_session_id.guids {
            if s.host == host_id {
                hold(Held::Guid(*guid), s);
            }
        }
        for (id, s) in &self.by_session_id.other {
            if s.host == host_id {
                hold(Held::Text(id.clone()), s);
            }
        }
        for (&(h, _), s) in &self.by_host_user {
            if h == host_id {
                hold(Held::HostUser, s);
            }
        }

        let mut confirm: Vec<(Held, UserId)> = Vec::new();
        let mut remove: Vec<(Held, UserId)> = Vec::new();
        for user in listed {
            self.set_scratch_to_user_key(&user.directory, &user.user_id);
            if self.exclusions.matches(&self.scratch) {
                continue;
            }
            let user_id = self.user_index.get(self.scratch.as_str()).copied();
            let mut sessions = user_id.and_then(|u| held.remove(&u)).unwrap_or_default();
            // Sessions events showed come before those only the API showed, newest first: when
            // counts are paired, the ones kept are the ones events will go on naming.
            sessions.sort_by_key(|s| (s.from_api, std::cmp::Reverse(s.last_seen)));
            // Equal ids are the same session. Paired by count, an id only the API gave is not
            // evidence: such sessions are placeholders, matched by number like the rest.
            let mut unmatched_api: Vec<&str> = Vec::new();
            for api_id in &user.session_ids {
                let same = sessions.iter().position(|s| {
                    !api_id.is_empty()
                        && s.key.is(api_id)
                        && (pairing == Pairing::ById || !s.from_api)
                });
                match same {
                    Some(i) => {
                        let s = sessions.remove(i);
                        done.matched_event_ids += usize::from(!s.from_api);
                        confirm.push((s.key, user_id.expect("held sessions have a user")));
                    }
                    None => unmatched_api.push(api_id),
                }
            }
            let paired = match pairing {
                Pairing::ByCount => unmatched_api.len().min(sessions.len()),
                Pairing::ById => 0,
            };
            let rest = sessions.split_off(paired);
            if let Some(u) = user_id {
                confirm.extend(sessions.into_iter().map(|s| (s.key, u)));
                for s in rest {
                    match s.last_seen < cutoff {
                        true => remove.push((s.key, u)),
                        false => done.in_grace += 1,
                    }
                }
            }
            let missing = unmatched_api.len() - paired;
            if missing == 0 {
                continue;
            }
            self.set_scratch_to_user_key(&user.directory, &user.user_id);
            if self.stops.since(host_id, &self.scratch, cutoff) {
                continue;
            }
            // Under ids the registry does not hold yet (a kept placeholder may hold some).
            let mut added = 0;
            for api_id in &unmatched_api {
                if added == missing {
                    break;
                }
                if self.add_listed(host_id, user, api_id, fetched_at) {
                    added += 1;
                }
            }
            done.added += added;
        }
        // Users held on this node whom the node no longer lists at all.
        for (user, sessions) in held {
            for s in sessions {
                match s.last_seen < cutoff {
                    true => remove.push((s.key, user)),
                    false => done.in_grace += 1,
                }
            }
        }

        for (key, user) in &confirm {
            if let Some(s) = self.held_mut(key, host_id, *user) {
                s.last_seen = s.last_seen.max(fetched_at);
                done.confirmed += 1;
            }
        }
        // Matched keys were held a moment ago under this lock; a user id is only needed for a
        // (host, user) slot.
        for (key, user) in &remove {
            let removed = match key {
                Held::Guid(guid) => self.by_session_id.guids.remove(guid),
                Held::Text(id) => self.by_session_id.other.remove(id),
                Held::HostUser => self.by_host_user.remove(&(host_id, *user)),
            };
            if let Some(s) = removed {
                self.release(s.host, s.user);
                done.removed += 1;
            }
        }
        done
    }

    fn held_mut(&mut self, key: &Held, host: HostId, user: UserId) -> Option<&mut Session> {
        match key {
            Held::Guid(guid) => self.by_session_id.guids.get_mut(guid),
            Held::Text(id) => self.by_session_id.other.get_mut(id),
            Held::HostUser => self.by_host_user.get_mut(&(host, user)),
        }
    }

    /// Adds one listed session under the API's id (or the user's slot on the node when the API
    /// gave none); `false` if that key is taken (by a session of another node or user).
    fn add_listed(
        &mut self,
        host: HostId,
        user: &ListedUser,
        api_id: &str,
        at: UnixMillis,
    ) -> bool {
        // Checked before the user is interned: a user without sessions must not stay behind.
        let taken = match api_id.is_empty() {
            false => self.by_session_id.contains(api_id),
            true => self
                .find_user(&user.directory, &user.user_id)
                .is_some_and(|u| self.by_host_user.contains_key(&(host, u))),
        };
        if taken {
            return false;
        }
        let user_id = self.intern_user(&user.directory, &user.user_id);
        let session = Session {
            user: user_id,
            host,
            started: at,
            last_seen: at,
            open_connections: 0,
            from_api: true,
            restored: false,
        };
        match api_id.is_empty() {
            true => self.by_host_user.insert((host, user_id), session),
            false => self.by_session_id.insert(api_id, session),
        };
        self.retain(host, user_id);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exclusions::Exclusions;
    use crate::parser::Command;
    use crate::registry::ExpiryPolicy;
    use crate::registry::tests::event;

    const SEC: u64 = 1000;
    const GRACE: Duration = Duration::from_secs(30);
    const T0: u64 = 1_700_000_000_000;

    fn registry() -> Registry {
        let mut r = Registry::new(
            ExpiryPolicy::default(),
            Exclusions::new(["INTERNAL\\*"]).unwrap(),
        );
        r.remember_stops(GRACE + Duration::from_secs(11));
        r
    }

    fn listed(dir: &str, user: &str, ids: &[&str]) -> ListedUser {
        ListedUser {
            directory: dir.into(),
            user_id: user.into(),
            session_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn merge(
        r: &mut Registry,
        host: &str,
        users: &[ListedUser],
        at: u64,
        pairing: Pairing,
    ) -> Reconciled {
        let users: Vec<&ListedUser> = users.iter().collect();
        r.reconcile_host(host, &users, UnixMillis(at), GRACE, pairing, &mut |_| true)
    }

    fn start(r: &mut Registry, host: &str, user: &str, sid: Option<&str>, at: u64) {
        r.apply(
            &event(Command::StartSession, host, "LAB", user, sid),
            UnixMillis(at),
        );
    }

    #[test]
    fn a_cold_start_takes_the_list_as_it_is() {
        let mut r = registry();
        let users: Vec<ListedUser> = (0..500)
            .map(|i| listed("LAB", &format!("user{i}"), &[&format!("api-{i}")]))
            .collect();
        let done = merge(&mut r, "PROXY1", &users, T0, Pairing::ByCount);
        assert_eq!(done.added, 500);
        assert_eq!((r.active_users(), r.active_sessions()), (500, 500));
        assert_eq!(r.hosts()[0].active_users, 500);
        // Listing the same again changes nothing.
        let again = merge(&mut r, "PROXY1", &users, T0 + 60 * SEC, Pairing::ByCount);
        assert_eq!((again.added, again.removed, again.confirmed), (0, 0, 500));
        assert_eq!(r.active_sessions(), 500);
    }

    #[test]
    fn hashed_ids_are_paired_by_count() {
        let mut r = registry();
        start(&mut r, "PROXY1", "joe", Some("logged-hash"), T0);
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["api-id"])],
            T0 + 120 * SEC,
            Pairing::ByCount,
        );
        assert_eq!(
            (
                done.added,
                done.removed,
                done.confirmed,
                done.matched_event_ids
            ),
            (0, 0, 1, 0)
        );
        assert_eq!(r.active_sessions(), 1);
        // Confirmed sessions do not idle out while the API lists them.
        r.expire(UnixMillis(T0 + 120 * SEC + 29 * 60 * SEC));
        assert_eq!(r.active_sessions(), 1);
    }

    #[test]
    fn sessions_whose_stop_was_lost_leave_after_the_grace() {
        let mut r = registry();
        start(&mut r, "PROXY1", "ann", Some("a"), T0);
        start(&mut r, "PROXY1", "bob", Some("b"), T0);
        // The list was fetched at T0 + 20 s: bob's and ann's sessions are within the grace.
        let early = merge(&mut r, "PROXY1", &[], T0 + 20 * SEC, Pairing::ByCount);
        assert_eq!((early.removed, early.in_grace), (0, 2));
        // bob is active again just before the next fetch; ann has been silent.
        r.apply(
            &event(Command::OpenConnection, "PROXY1", "LAB", "bob", Some("b")),
            UnixMillis(T0 + 70 * SEC),
        );
        let done = merge(&mut r, "PROXY1", &[], T0 + 80 * SEC, Pairing::ByCount);
        assert_eq!((done.removed, done.in_grace), (1, 1));
        assert_eq!(r.user_names(), ["LAB\\bob"]);
    }

    #[test]
    fn a_session_started_during_the_request_stays() {
        let mut r = registry();
        let fetched_at = T0;
        start(&mut r, "PROXY1", "joe", Some("j"), fetched_at + 300);
        let done = merge(&mut r, "PROXY1", &[], fetched_at, Pairing::ByCount);
        assert_eq!((done.removed, done.in_grace), (0, 1));
        assert_eq!(r.active_users(), 1);
    }

    #[test]
    fn a_stop_after_the_fetch_is_not_undone() {
        let mut r = registry();
        start(&mut r, "PROXY1", "joe", Some("j"), T0);
        // The list was fetched at T0 + 100 s with joe; his stop arrived while it was in flight.
        r.apply(
            &event(Command::StopSession, "PROXY1", "LAB", "joe", Some("j")),
            UnixMillis(T0 + 100 * SEC + 50),
        );
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["api"])],
            T0 + 100 * SEC,
            Pairing::ByCount,
        );
        assert_eq!(done.added, 0);
        assert_eq!(r.active_users(), 0);
        // Once the stop is older than the grace, a list naming joe brings him back: the list
        // is newer than the stop then.
        r.expire(UnixMillis(T0 + 200 * SEC));
        let later = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["api"])],
            T0 + 200 * SEC,
            Pairing::ByCount,
        );
        assert_eq!(later.added, 1);
    }

    #[test]
    fn equal_ids_prove_themselves_and_then_decide() {
        let mut r = registry();
        start(&mut r, "PROXY1", "joe", Some("s1"), T0);
        start(&mut r, "PROXY1", "joe", Some("s2"), T0);
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["s1", "s3"])],
            T0 + 60 * SEC,
            Pairing::ByCount,
        );
        // s1 matched by an event's id; by count, s2 pairs with s3.
        assert_eq!(
            (
                done.matched_event_ids,
                done.confirmed,
                done.added,
                done.removed
            ),
            (1, 2, 0, 0)
        );
        // By id, s2 is not s3: s2 goes (silent past the grace), s3 comes.
        let by_id = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["s1", "s3"])],
            T0 + 200 * SEC,
            Pairing::ById,
        );
        assert_eq!((by_id.added, by_id.removed), (1, 1));
        assert_eq!(r.active_sessions(), 2);
        // s3 came from the API: matching it again proves nothing.
        let again = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["s3"])],
            T0 + 400 * SEC,
            Pairing::ById,
        );
        assert_eq!(again.matched_event_ids, 0);
    }

    #[test]
    fn other_nodes_and_excluded_users_are_left_alone() {
        let mut r = registry();
        start(&mut r, "PROXY1", "joe", Some("j1"), T0);
        start(&mut r, "PROXY2", "joe", Some("j2"), T0);
        let users = [
            listed("INTERNAL", "sa_scheduler", &["x"]),
            listed("LAB", "ann", &["y"]),
        ];
        let done = merge(&mut r, "proxy1", &users, T0 + 100 * SEC, Pairing::ByCount);
        // "proxy1" is PROXY1 in any case; joe's session there goes, his PROXY2 one stays.
        assert_eq!((done.added, done.removed), (1, 1));
        assert_eq!(r.user_names(), ["LAB\\ann", "LAB\\joe"]);
        let hosts = r.hosts();
        assert_eq!(
            hosts.iter().map(|h| h.active_users).collect::<Vec<_>>(),
            [1, 1]
        );
    }

    #[test]
    fn sessions_without_ids_use_the_users_slot() {
        let mut r = registry();
        r.apply(
            &event(Command::OpenConnection, "PROXY1", "LAB", "joe", None),
            UnixMillis(T0),
        );
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &[""]), listed("LAB", "ann", &[""])],
            T0 + 60 * SEC,
            Pairing::ByCount,
        );
        assert_eq!((done.added, done.confirmed), (1, 1));
        assert_eq!(r.active_sessions(), 2);
        let gone = merge(&mut r, "PROXY1", &[], T0 + 200 * SEC, Pairing::ByCount);
        assert_eq!(gone.removed, 2);
        assert_eq!((r.active_users(), r.active_sessions()), (0, 0));
    }

    #[test]
    fn a_placeholder_gives_way_to_the_session_events_name() {
        let mut r = registry();
        merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["qa"])],
            T0,
            Pairing::ByCount,
        );
        // joe's proxy logs a hashed id: a second session, until the next merge.
        r.apply(
            &event(Command::OpenConnection, "PROXY1", "LAB", "joe", Some("h")),
            UnixMillis(T0 + 10 * SEC),
        );
        assert_eq!(r.active_sessions(), 2);
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["qa"])],
            T0 + 60 * SEC,
            Pairing::ByCount,
        );
        // The placeholder goes, the session events name stays: its stop will be understood.
        assert_eq!(
            (done.removed, done.confirmed, done.matched_event_ids),
            (1, 1, 0)
        );
        r.apply(
            &event(Command::StopSession, "PROXY1", "LAB", "joe", Some("h")),
            UnixMillis(T0 + 70 * SEC),
        );
        assert_eq!(r.active_users(), 0);
    }

    #[test]
    fn more_listed_sessions_than_held_are_added_under_free_ids() {
        let mut r = registry();
        merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["qa"])],
            T0,
            Pairing::ByCount,
        );
        // The kept placeholder holds "qa", listed last: the two added take the other ids.
        let done = merge(
            &mut r,
            "PROXY1",
            &[listed("LAB", "joe", &["qc", "qb", "qa"])],
            T0 + 60 * SEC,
            Pairing::ByCount,
        );
        assert_eq!((done.added, done.confirmed), (2, 1));
        assert_eq!(r.active_sessions(), 3);
    }
}
