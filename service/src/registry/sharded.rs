//! The registry the service shares between its threads: [`Registry`] split into shards by user,
//! each behind its own lock.
//!
//! Why shards: the read views (the user list, `/api/v1/users`, the checkpoint's snapshot) and a
//! hash table's growth are work proportional to the registry. Behind one lock, a million sessions
//! held the ingest thread for hundreds of milliseconds, longer than a pod's socket buffer lasts.
//! Split by user, each lock is held for one shard's share of that work, and an event waits at
//! most for one shard. A user's sessions all live in the shard of their user key, so a user's
//! counts never span shards: totals are sums, and every per-user view comes from one shard.
//!
//! A proxy session id is looked up in its user's shard only: Qlik's ids are per-session GUIDs of
//! one user, and a datagram naming another user's session id does not reach that session.
//!
//! Proxy hosts are few and shared by every shard; one bounded table here admits new host names,
//! so `max_proxy_hosts` holds across shards. Lock order: a shard, then the host table; never the
//! other way round.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{
    Expired, ExpiryPolicy, HostSummary, ListedUser, Outcome, Pairing, Reconciled, Registry,
    RestoreEnd, RestoreEnds, RestoreMemoryCap, RestoreRecord, SessionRecord, UnixMillis, UserView,
    push_lowercase,
};
use crate::checkpoint::codec::{BodyWriter, Decoded};
use crate::exclusions::Exclusions;
use crate::parser::ProxyEvent;

/// Shards by default: at 1,000,000 sessions a shard holds about 16,000, whose views take well
/// under a millisecond; at a few users the extra locks cost nothing measurable.
pub const DEFAULT_SHARDS: usize = 64;

pub struct ShardedRegistry {
    shards: Box<[Mutex<Registry>]>,
    /// The shards' active users summed as they change, so that every change's total is known
    /// without locking every shard: the history's highest count of a minute is exact.
    users: AtomicUsize,
    /// The highest total since [`ShardedRegistry::take_peak`] last read it.
    peak: AtomicUsize,
    /// The shards' sessions summed as they change, like `users`: the count, and what
    /// `max_sessions` is held against, without locking every shard.
    sessions: AtomicUsize,
    /// Sessions the network may start at most (`max_sessions`); the Qlik API's lists and the
    /// checkpoint are not held to it (they hold what was admitted, or what Qlik knows).
    max_sessions: usize,
    /// Picks a user's shard; seeded per process, like the shards' own hash tables.
    /// Chooses a user's shard. Seeded the same in every process, so a restored registry puts
    /// every user where the saved one had them (shard choice is not a hash table's defence
    /// against crafted keys: those are the shards' own tables, which keep random seeds).
    hasher: foldhash::quality::FixedState,
    hosts: Mutex<HostNames>,
    max_hosts: usize,
}

/// Every proxy host admitted, by case-insensitive name, with the name as first seen.
#[derive(Default)]
struct HostNames {
    index: HashMap<Box<str>, usize>,
    names: Vec<Box<str>>,
}

impl HostNames {
    /// Whether `name` is known or could be added within `max`; adds it then.
    fn admit(&mut self, name: &str, max: usize) -> bool {
        let mut key = String::with_capacity(name.len());
        push_lowercase(&mut key, name);
        if self.index.contains_key(key.as_str()) {
            return true;
        }
        if self.names.len() >= max {
            return false;
        }
        self.index.insert(key.into(), self.names.len());
        self.names.push(name.into());
        true
    }
}

/// Lower-cased host name → the name as first seen.
struct HostDisplay(HashMap<Box<str>, Box<str>>);

impl HostDisplay {
    fn canonical(&self, name: &mut String) {
        let mut key = String::with_capacity(name.len());
        push_lowercase(&mut key, name);
        if let Some(display) = self.0.get(key.as_str())
            && **display != **name
        {
            *name = display.to_string();
        }
    }
}

/// Any constant: it only has to be the same in every process.
const SHARD_SEED: u64 = 0x5e55_10e5_0000_0001;

impl ShardedRegistry {
    pub fn new(
        expiry: ExpiryPolicy,
        exclusions: Exclusions,
        max_hosts: usize,
        shards: usize,
    ) -> ShardedRegistry {
        let shards = shards.max(1);
        // What the shards remember before the restore stays within one registry's bound.
        let restore_memory = RestoreMemoryCap::DEFAULT.per_shard(shards);
        let shards = (0..shards)
            .map(|_| {
                // Each shard may hold every host; the shared table is what limits them.
                Mutex::new(
                    Registry::new(expiry.clone(), exclusions.clone())
                        .with_max_hosts(usize::MAX)
                        .with_restore_memory_cap(restore_memory),
                )
            })
            .collect();
        ShardedRegistry {
            shards,
            users: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
            sessions: AtomicUsize::new(0),
            max_sessions: usize::MAX,
            hasher: foldhash::quality::FixedState::with_seed(SHARD_SEED),
            hosts: Mutex::new(HostNames::default()),
            max_hosts,
        }
    }

    /// Holds the sessions events may start to `max` (see [`Outcome::SessionLimitReached`]).
    pub fn with_max_sessions(self, max: usize) -> ShardedRegistry {
        ShardedRegistry {
            max_sessions: max,
            ..self
        }
    }

    /// Applies one event; locks the user's shard only.
    pub fn apply(&self, event: &ProxyEvent<'_>, now: UnixMillis) -> Outcome {
        let shard = self.shard_of(event.user_directory, event.user_id);
        self.counting(&self.shards[shard], |registry| {
            // Below the limit (always, on a real site) this is one atomic load; at it, one
            // lookup more decides whether the event would add a session. One ingest thread
            // applies the network's events, so the limit is exact for them.
            if self.sessions.load(Ordering::Acquire) >= self.max_sessions
                && registry.would_start_a_session(event)
            {
                return Outcome::SessionLimitReached;
            }
            registry.apply_gated(event, now, &mut |name| self.admit_host(name))
        })
    }

    /// Runs `change` on one shard, under its lock, and carries its change of active users
    /// into the total (and the peak).
    fn counting<T>(&self, shard: &Mutex<Registry>, change: impl FnOnce(&mut Registry) -> T) -> T {
        let mut registry = lock(shard);
        let before = (registry.active_users(), registry.active_sessions());
        let result = change(&mut registry);
        let after = (registry.active_users(), registry.active_sessions());
        if after.0 > before.0 {
            let total =
                self.users.fetch_add(after.0 - before.0, Ordering::AcqRel) + (after.0 - before.0);
            self.peak.fetch_max(total, Ordering::AcqRel);
        } else if after.0 < before.0 {
            self.users.fetch_sub(before.0 - after.0, Ordering::AcqRel);
        }
        if after.1 > before.1 {
            self.sessions
                .fetch_add(after.1 - before.1, Ordering::AcqRel);
        } else if after.1 < before.1 {
            self.sessions
                .fetch_sub(before.1 - after.1, Ordering::AcqRel);
        }
        result
    }

    /// The highest number of active users since [`ShardedRegistry::take_peak`] last ran,
    /// leaving it for that to take.
    pub fn peak(&self) -> usize {
        self.peak
            .load(Ordering::Acquire)
            .max(self.users.load(Ordering::Acquire))
    }

    /// The highest number of active users since the last call (at least the current number),
    /// and starts the next stretch at the current number.
    pub fn take_peak(&self) -> usize {
        let current = self.users.load(Ordering::Acquire);
        self.peak.swap(current, Ordering::AcqRel).max(current)
    }

    /// Removes silent sessions, one shard at a time.
    pub fn expire(&self, now: UnixMillis) -> Expired {
        self.shards.iter().fold(Expired::default(), |sum, shard| {
            let expired = self.counting(shard, |r| r.expire(now));
            Expired {
                idle: sum.idle + expired.idle,
                max_idle: sum.max_idle + expired.max_idle,
            }
        })
    }

    pub fn active_users(&self) -> usize {
        self.users.load(Ordering::Acquire)
    }

    /// Kept as the shards change (see `counting`), like [`ShardedRegistry::active_users`]: no
    /// shard is locked to read it.
    pub fn active_sessions(&self) -> usize {
        self.sessions.load(Ordering::Acquire)
    }

    /// Every host admitted (also those at zero), with its counts, sorted by name.
    pub fn hosts(&self) -> Vec<HostSummary> {
        let (index, names) = {
            let hosts = lock(&self.hosts);
            (hosts.index.clone(), hosts.names.clone())
        };
        let mut counts = vec![(0, 0, UnixMillis(0)); names.len()];
        let mut key = String::new();
        for shard in self.shards.iter() {
            let registry = lock(shard);
            for ((name, users, sessions), last_event) in
                registry.host_counts().zip(registry.host_last_events())
            {
                key.clear();
                push_lowercase(&mut key, name);
                // Every host a shard has was admitted here first.
                if let Some(&i) = index.get(key.as_str()) {
                    counts[i].0 += users;
                    counts[i].1 += sessions;
                    counts[i].2 = counts[i].2.max(last_event);
                }
            }
        }
        let mut hosts: Vec<HostSummary> = names
            .iter()
            .zip(counts)
            .map(
                |(name, (active_users, active_sessions, last_event))| HostSummary {
                    host: name.to_string(),
                    active_users,
                    active_sessions,
                    last_event: (last_event.0 > 0).then_some(last_event),
                },
            )
            .collect();
        hosts.sort_by(|a, b| a.host.cmp(&b.host));
        hosts
    }

    /// Every host admitted, for the checkpoint.
    pub fn host_names(&self) -> Vec<String> {
        lock(&self.hosts)
            .names
            .iter()
            .map(|n| n.to_string())
            .collect()
    }

    /// Re-admits checkpointed hosts (within the host limit), so their counts are published again.
    pub fn restore_hosts(&self, names: &[String]) {
        let mut hosts = lock(&self.hosts);
        for name in names {
            hosts.admit(name, self.max_hosts);
        }
    }

    /// Loads checkpointed sessions (see [`Registry::restore`]); one shard locked at a time.
    pub fn restore(&self, records: &[SessionRecord], now: UnixMillis) -> usize {
        let mut by_shard: Vec<Vec<&SessionRecord>> = vec![Vec::new(); self.shards.len()];
        for r in records {
            by_shard[self.shard_of(&r.user_directory, &r.user_id)].push(r);
        }
        by_shard
            .into_iter()
            .zip(self.shards.iter())
            .map(|(records, shard)| {
                let records = records.into_iter().map(RestoreRecord::from);
                self.counting(shard, |r| {
                    r.restore_gated(
                        records,
                        now,
                        &mut |name| self.admit_host(name),
                        RestoreEnds::Yes,
                    )
                })
            })
            .sum()
    }

    /// Loads a decoded checkpoint (see [`Registry::restore`]) without making a string per
    /// session: each user is routed to its shard once, then each shard is locked once for all of
    /// its sessions. Shards are independent, so at start-up (when nothing else needs the CPUs)
    /// they are filled on every available core.
    pub fn restore_decoded(&self, checkpoint: &Decoded, now: UnixMillis) -> usize {
        self.restore_decoded_as(checkpoint, now, RestoreEnds::Yes)
    }

    /// Takes over from the pod that wrote `checkpoint` when it stopped (a rollout's handover):
    /// this registry restored an earlier checkpoint ([`RestoreEnds::AtTakeOver`]) and has since
    /// applied the events that reached it. The sessions of that earlier checkpoint that no event
    /// has named since are replaced by what `checkpoint` says of them (gone if it lacks them:
    /// stopped or expired at the other pod); the sessions events named here stay as they are;
    /// the sessions that started at the other pod are added, unless a stop for them came here.
    /// Then the restore ends. Returns (sessions dropped, sessions loaded). One shard locked at a
    /// time, each for its own sessions.
    pub fn take_over(&self, checkpoint: &Decoded, now: UnixMillis) -> (usize, usize) {
        let mut dropped = 0;
        for shard in self.shards.iter() {
            dropped += self.counting(shard, Registry::drop_untouched_restored);
        }
        (
            dropped,
            self.restore_decoded_as(checkpoint, now, RestoreEnds::Yes),
        )
    }

    /// [`ShardedRegistry::restore_decoded`], leaving the restore pending when `ends` says so
    /// (a standby pod's, until [`ShardedRegistry::take_over`]).
    pub fn restore_decoded_as(
        &self,
        checkpoint: &Decoded,
        now: UnixMillis,
        ends: RestoreEnds,
    ) -> usize {
        self.restore_hosts(&checkpoint.hosts);
        let mut by_shard: Vec<Vec<RestoreRecord<'_>>> = vec![Vec::new(); self.shards.len()];
        for segment in &checkpoint.segments {
            let shard_of_user: Vec<usize> = segment
                .users
                .iter()
                .map(|(directory, user_id)| self.shard_of(directory, user_id))
                .collect();
            for s in &segment.sessions {
                let (directory, user_id) = &segment.users[s.user as usize];
                by_shard[shard_of_user[s.user as usize]].push(RestoreRecord {
                    id: s.id.as_ref(),
                    host: &checkpoint.hosts[s.host as usize],
                    user_directory: directory,
                    user_id,
                    started: s.started,
                    last_seen: s.last_seen,
                    open_connections: s.open_connections,
                });
            }
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(self.shards.len());
        let restore = |worker: usize| -> usize {
            by_shard
                .iter()
                .zip(self.shards.iter())
                .skip(worker)
                .step_by(workers)
                .map(|(records, shard)| {
                    self.counting(shard, |r| {
                        r.restore_gated(
                            records.iter().copied(),
                            now,
                            &mut |name| self.admit_host(name),
                            ends,
                        )
                    })
                })
                .sum()
        };
        std::thread::scope(|scope| {
            let others: Vec<_> = (1..workers)
                .map(|worker| scope.spawn(move || restore(worker)))
                .collect();
            restore(0)
                + others
                    .into_iter()
                    .map(|w| w.join().expect("restore does not panic"))
                    .sum::<usize>()
        })
    }

    /// Ends the restore in every shard (see [`Registry::end_restore`]): a shard restored has
    /// ended it already, under the same lock; this ends it where nothing was restored, and
    /// sums what the events before it did. One shard locked at a time, each briefly: a shard
    /// drops at most its share of the bounded memory.
    pub fn end_restore(&self) -> RestoreEnd {
        let mut ended = RestoreEnd::default();
        for shard in self.shards.iter() {
            ended += lock(shard).end_restore();
        }
        ended
    }

    /// Sessions remembered before the restore, in all shards.
    #[cfg(test)]
    fn remembered_before_restore(&self) -> usize {
        self.sum(|r| r.before_restore.remembered())
    }

    /// Every session as self-contained records: what the checkpoint holds, for tests to compare
    /// (the checkpoint itself is written from the tables: [`ShardedRegistry::write_checkpoint`]).
    #[cfg(test)]
    pub fn snapshot(&self) -> Vec<SessionRecord> {
        let mut records = Vec::with_capacity(self.active_sessions());
        for shard in self.shards.iter() {
            records.extend(lock(shard).snapshot());
        }
        let hosts = self.host_display_names();
        for r in &mut records {
            hosts.canonical(&mut r.host);
        }
        records
    }

    /// Writes every session into a checkpoint body: the hosts, then one segment per shard,
    /// each written from the shard's own tables while it alone is locked. The caller compresses
    /// the body ([`BodyWriter::finish`]) outside any lock. Returns the sessions written.
    pub fn write_checkpoint(&self, saved_at: UnixMillis) -> (BodyWriter, usize) {
        let (index, names) = {
            let hosts = lock(&self.hosts);
            (hosts.index.clone(), hosts.names.clone())
        };
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut w = BodyWriter::new(saved_at, &names, self.shards.len());
        let mut sessions = 0;
        let mut key = String::new();
        for shard in self.shards.iter() {
            let registry = lock(shard);
            let host_index: Vec<u32> = registry
                .host_counts()
                .map(|(name, _, _)| {
                    key.clear();
                    push_lowercase(&mut key, name);
                    // Every host a shard has was admitted to the shared table first.
                    index.get(key.as_str()).map_or(0, |&i| i as u32)
                })
                .collect();
            registry.write_segment(&mut w, &host_index);
            sessions += registry.active_sessions();
        }
        (w, sessions)
    }

    /// Remembers stop events for `memory` in every shard (see [`Registry::remember_stops`]).
    pub fn remember_stops(&self, memory: std::time::Duration) {
        for shard in self.shards.iter() {
            lock(shard).remember_stops(memory);
        }
    }

    /// Merges a node's session list into the sessions held on `host`, one shard at a time:
    /// each shard gets the listed users that live in it, and every shard is visited, since
    /// any may hold sessions the list no longer has (see [`Registry::reconcile_host`]).
    pub fn reconcile_host(
        &self,
        host: &str,
        listed: &[ListedUser],
        fetched_at: UnixMillis,
        grace: std::time::Duration,
        pairing: Pairing,
    ) -> Reconciled {
        let mut by_shard: Vec<Vec<&ListedUser>> = vec![Vec::new(); self.shards.len()];
        for user in listed {
            by_shard[self.shard_of(&user.directory, &user.user_id)].push(user);
        }
        let mut done = Reconciled::default();
        for (users, shard) in by_shard.iter().zip(self.shards.iter()) {
            done += self.counting(shard, |r| {
                r.reconcile_host(host, users, fetched_at, grace, pairing, &mut |name| {
                    self.admit_host(name)
                })
            });
        }
        done
    }

    /// Display names of all active users, sorted case-insensitively (sorted outside the locks).
    pub fn user_names(&self) -> Vec<String> {
        let mut names = self.collect(|r, out| out.extend(r.live_user_names().map(str::to_owned)));
        names.sort_by_cached_key(|n| n.to_lowercase());
        names
    }

    /// User ids only, sorted and de-duplicated case-insensitively.
    pub fn user_ids(&self) -> Vec<String> {
        let mut ids = self.collect(|r, out| out.extend(r.live_user_ids().map(str::to_owned)));
        ids.sort_by_cached_key(|n| n.to_lowercase());
        ids.dedup_by(|a, b| a.to_lowercase() == b.to_lowercase());
        ids
    }

    /// Active users with their sessions, sorted by name (sorted outside the locks).
    pub fn users(&self) -> Vec<UserView> {
        let mut views = self.collect(|r, out| out.extend(r.unsorted_users()));
        let hosts = self.host_display_names();
        for v in &mut views {
            v.hosts.iter_mut().for_each(|h| hosts.canonical(h));
            v.hosts.sort();
        }
        views.sort_by_cached_key(|v| v.name.to_lowercase());
        views
    }

    /// Host names as the shared table first saw them: each shard keeps the spelling it saw
    /// first, which may differ in case.
    fn host_display_names(&self) -> HostDisplay {
        let hosts = lock(&self.hosts);
        HostDisplay(
            hosts
                .index
                .iter()
                .map(|(key, &i)| (key.clone(), hosts.names[i].clone()))
                .collect(),
        )
    }

    fn collect<T>(&self, mut each: impl FnMut(&Registry, &mut Vec<T>)) -> Vec<T> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            each(&lock(shard), &mut out);
        }
        out
    }

    #[cfg(test)]
    fn sum(&self, count: impl Fn(&Registry) -> usize) -> usize {
        self.shards.iter().map(|s| count(&lock(s))).sum()
    }

    fn admit_host(&self, name: &str) -> bool {
        lock(&self.hosts).admit(name, self.max_hosts)
    }

    /// The shard of a user: a hash of the same case-insensitive key the registry uses
    /// (`directory\\userid`, lower-cased), built on the stack for the usual short ASCII names
    /// so the event path allocates nothing.
    fn shard_of(&self, directory: &str, user_id: &str) -> usize {
        let len = directory.len() + 1 + user_id.len();
        let hash = if len <= 256 && directory.is_ascii() && user_id.is_ascii() {
            let mut key = [0u8; 256];
            key[..directory.len()].copy_from_slice(directory.as_bytes());
            key[directory.len()] = b'\\';
            key[directory.len() + 1..len].copy_from_slice(user_id.as_bytes());
            key[..len].make_ascii_lowercase();
            self.hasher.hash_one(&key[..len])
        } else {
            let mut key = String::with_capacity(len);
            push_lowercase(&mut key, directory);
            key.push('\\');
            push_lowercase(&mut key, user_id);
            self.hasher.hash_one(key.as_bytes())
        };
        (hash % self.shards.len() as u64) as usize
    }
}

/// A panic while a shard is locked cannot leave it half-updated in a way that matters more than
/// stopping would, so a poisoned lock is used as is.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parser::{Command, Format};
    use proptest::prelude::*;

    fn event<'a>(
        command: Command,
        host: &'a str,
        user: &'a str,
        sid: Option<&'a str>,
    ) -> ProxyEvent<'a> {
        ProxyEvent {
            format: Format::SessionMonitor,
            host,
            command,
            user_directory: "LAB",
            user_id: user,
            origin: None,
            context: None,
            proxy_session_id: sid,
            message: "",
        }
    }

    const NOW: UnixMillis = UnixMillis(1_700_000_000_000);

    #[test]
    fn the_same_user_in_any_case_lands_in_one_shard() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 10, 64);
        for user in ["joe", "ann", "Zoë", "ÅSA"] {
            let upper = user.to_uppercase();
            assert_eq!(r.shard_of("Lab", user), r.shard_of("LAB", &upper));
        }
        r.apply(&event(Command::StartSession, "qs1", "joe", Some("a")), NOW);
        r.apply(&event(Command::StartSession, "qs2", "JOE", Some("b")), NOW);
        assert_eq!((r.active_users(), r.active_sessions()), (1, 2));
        assert_eq!(r.users()[0].sessions, 2);
    }

    #[test]
    fn the_session_limit_holds_across_shards_for_new_sessions_only() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 10, 16)
            .with_max_sessions(10);
        let ids: Vec<String> = (0..30).map(|i| format!("s{i}")).collect();
        let outcomes: Vec<Outcome> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let command = [Command::StartSession, Command::OpenConnection][i % 2];
                r.apply(&event(command, "qs1", &format!("u{i}"), Some(id)), NOW)
            })
            .collect();
        let refused = outcomes
            .iter()
            .filter(|&&o| o == Outcome::SessionLimitReached)
            .count();
        assert_eq!((r.active_sessions(), refused), (10, 20), "{outcomes:?}");
        // At the limit, the sessions held still take their events, by id and without one.
        assert_eq!(
            r.apply(
                &event(Command::OpenConnection, "qs1", "u0", Some("s0")),
                NOW
            ),
            Outcome::SessionRefreshed
        );
        assert_eq!(
            r.apply(&event(Command::StopSession, "qs1", "u1", Some("s1")), NOW),
            Outcome::SessionStopped
        );
        // The room a stop made is taken by the next new session, and then none more.
        assert_eq!(
            r.apply(&event(Command::StartSession, "qs1", "new", None), NOW),
            Outcome::SessionStarted
        );
        assert_eq!(
            r.apply(&event(Command::StartSession, "qs1", "newer", None), NOW),
            Outcome::SessionLimitReached
        );
        assert_eq!(
            r.apply(&event(Command::OpenConnection, "qs1", "new", None), NOW),
            Outcome::SessionRefreshed
        );
        assert_eq!((r.active_users(), r.active_sessions()), (10, 10));
        // The expiry frees room too: the total follows every change.
        let expired = r.expire(UnixMillis(NOW.0 + 25 * 3_600_000));
        assert_eq!(expired.idle + expired.max_idle, 10);
        assert_eq!(
            r.apply(&event(Command::StartSession, "qs1", "newer", None), NOW),
            Outcome::SessionStarted
        );
    }

    #[test]
    fn the_host_limit_holds_across_shards() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, 16);
        let users: Vec<String> = (0..50).map(|i| format!("u{i}")).collect();
        for (i, user) in users.iter().enumerate() {
            let host = format!("qs{}", i % 5);
            r.apply(&event(Command::StartSession, &host, user, None), NOW);
        }
        let hosts = r.hosts();
        assert_eq!(hosts.len(), 2, "{hosts:?}");
        assert_eq!(
            r.apply(&event(Command::StartSession, "qs9", "new", None), NOW),
            Outcome::HostLimitReached
        );
        // A host at zero is still listed, so its count is published as 0.
        for user in &users {
            for h in 0..5 {
                let host = format!("QS{h}");
                r.apply(&event(Command::StopSession, &host, user, None), NOW);
            }
        }
        assert_eq!(r.active_sessions(), 0);
        assert!(
            r.hosts().iter().all(|h| h.active_users == 0),
            "{:?}",
            r.hosts()
        );
        assert_eq!(r.hosts().len(), 2);
    }

    #[test]
    fn the_peak_between_two_reads_is_exact() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 10, 8);
        for user in ["a", "b", "c"] {
            r.apply(&event(Command::StartSession, "qs1", user, None), NOW);
        }
        r.apply(&event(Command::StopSession, "qs1", "b", None), NOW);
        r.apply(&event(Command::StopSession, "qs1", "c", None), NOW);
        assert_eq!(r.active_users(), 1);
        assert_eq!(r.take_peak(), 3, "three were active at once");
        assert_eq!(
            r.take_peak(),
            1,
            "the next stretch starts at the current count"
        );
        r.expire(UnixMillis(NOW.0 + 48 * 3_600_000));
        assert_eq!((r.active_users(), r.take_peak()), (0, 1));
    }

    #[test]
    fn an_excluded_user_admits_no_host() {
        let exclusions = Exclusions::new(["LAB\\sa_*"]).unwrap();
        let r = ShardedRegistry::new(ExpiryPolicy::default(), exclusions, 10, 8);
        assert_eq!(
            r.apply(&event(Command::StartSession, "qs1", "sa_repo", None), NOW),
            Outcome::Excluded
        );
        assert!(r.hosts().is_empty());
    }

    /// Found by the `datagram` fuzz target: a second user naming the first one's session id.
    /// Once the second user's event was credited to the first user's session when the two shared
    /// a shard, and made a second session when they did not; with shards chosen by a per-process
    /// random seed, a restore could put them in one shard and lose a session. Now such an event
    /// is refused wherever the users land, and the shard of a user is the same in every process.
    #[test]
    fn a_session_id_of_another_user_is_refused_and_restores_exactly() {
        let ann = "5c1b8f3d-2a1e-4d4a-8b9f-4a3c2d1e0f22";
        for shards in [1, 2, 4, 8] {
            let r =
                ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 64, shards);
            let start = r.apply(&event(Command::StartSession, "qs2", "ann", Some(ann)), NOW);
            assert_eq!(start, Outcome::SessionStarted);
            r.apply(
                &event(
                    Command::OpenConnection,
                    "qs2",
                    "ann",
                    Some("5c1b8f3d-2a1e-4d40d9e11"),
                ),
                NOW,
            );
            let taken = [
                Command::OpenConnection,
                Command::StopSession,
                Command::CloseConnection,
                Command::StartSession,
            ];
            for command in taken {
                let same_shard = r.shard_of("LAB", "]nn") == r.shard_of("LAB", "ann");
                let outcome = r.apply(&event(command, "qs2", "]nn", Some(ann)), NOW);
                if same_shard {
                    assert_eq!(
                        outcome,
                        Outcome::SessionOfAnotherUser,
                        "{command:?} with {shards} shards"
                    );
                }
            }
            let (body, _) = r.write_checkpoint(NOW);
            let decoded = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();
            let restored =
                ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 64, shards);
            assert_eq!(restored.restore_decoded(&decoded, NOW), r.active_sessions());
            assert_eq!(restored.users(), r.users(), "{shards} shards");
        }
    }

    #[test]
    fn a_user_lands_in_the_same_shard_in_every_registry() {
        let a = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 64, 16);
        let b = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 64, 16);
        for i in 0..100 {
            let user = format!("user{i}");
            assert_eq!(a.shard_of("LAB", &user), b.shard_of("LAB", &user));
        }
    }

    /// Who is active, with how many sessions and connections on which hosts, last seen when.
    fn brief(r: &ShardedRegistry) -> Vec<(String, usize, u64, Vec<String>, UnixMillis)> {
        let users = r.users().into_iter();
        users
            .map(|u| (u.name, u.sessions, u.open_connections, u.hosts, u.last_seen))
            .collect()
    }

    /// The handover's cases one by one (the property test below mixes them).
    #[test]
    fn a_handover_replaces_untouched_sessions_and_keeps_what_came_to_the_new_pod() {
        let new = || ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, 4);
        let at = |s: u64| UnixMillis(NOW.0 + s * 1000);
        let decoded = |r: &ShardedRegistry, t: UnixMillis| {
            let (body, _) = r.write_checkpoint(t);
            crate::checkpoint::codec::decode_segments(&body.finish()).unwrap()
        };
        let old = new();
        for (user, sid) in [
            ("kept", "s1"),
            ("stopped_old", "s2"),
            ("stopped_new", "s3"),
            ("touched_new", "s4"),
        ] {
            old.apply(&event(Command::StartSession, "qs1", user, Some(sid)), at(1));
        }
        old.apply(&event(Command::OpenConnection, "qs2", "no_id", None), at(1));
        let standby = new();
        standby.restore_decoded_as(&decoded(&old, at(2)), at(3), RestoreEnds::AtTakeOver);
        // Meanwhile, at the old pod: a stop, a new session; at the new one: a stop, a refresh,
        // a new session, and the stop of the session without an id.
        old.apply(
            &event(Command::StopSession, "qs1", "stopped_old", Some("s2")),
            at(4),
        );
        old.apply(
            &event(Command::StartSession, "qs1", "started_old", Some("s5")),
            at(4),
        );
        standby.apply(
            &event(Command::StopSession, "qs1", "stopped_new", Some("s3")),
            at(5),
        );
        standby.apply(
            &event(Command::OpenConnection, "qs1", "touched_new", Some("s4")),
            at(5),
        );
        standby.apply(
            &event(Command::StartSession, "qs1", "started_new", Some("s6")),
            at(5),
        );
        standby.apply(&event(Command::StopSession, "qs2", "no_id", None), at(5));
        let (dropped, loaded) = standby.take_over(&decoded(&old, at(6)), at(7));
        let mut names = standby.user_names();
        names.sort();
        assert_eq!(
            names,
            [
                "LAB\\kept",
                "LAB\\started_new",
                "LAB\\started_old",
                "LAB\\touched_new"
            ],
            "dropped {dropped}, loaded {loaded}"
        );
        assert_eq!(standby.active_sessions(), 4);
        assert_eq!(standby.remembered_before_restore(), 0);

        // A session without an id that stopped at the old pod, in a registry of one shard.
        let one = || ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, 1);
        let old = one();
        old.apply(&event(Command::OpenConnection, "qs2", "u6", None), at(1));
        let standby = one();
        standby.restore_decoded_as(&decoded(&old, at(2)), at(3), RestoreEnds::AtTakeOver);
        old.apply(&event(Command::StopSession, "qs2", "u6", None), at(4));
        standby.apply(&event(Command::StartSession, "qs1", "u0", None), at(5));
        let (dropped, loaded) = standby.take_over(&decoded(&old, at(6)), at(7));
        assert_eq!(
            standby.user_names(),
            ["LAB\\u0"],
            "dropped {dropped}, loaded {loaded}"
        );
    }

    /// The service's start: a stop or close that arrives while the checkpoint loads, for a
    /// session only the checkpoint holds, counts as if it had come after the restore, in
    /// whichever shard the user lands.
    #[test]
    fn stops_and_closes_before_the_restore_count_as_if_after_it() {
        let saved = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, 8);
        let guid = |i: usize| format!("5c1b8f3d-2a1e-4d4a-8b9f-{i:012x}");
        let users: Vec<String> = (0..40).map(|i| format!("u{i}")).collect();
        for (i, user) in users.iter().enumerate() {
            saved.apply(
                &event(Command::StartSession, "qs1", user, Some(&guid(i))),
                NOW,
            );
            saved.apply(
                &event(Command::OpenConnection, "qs1", user, Some(&guid(i))),
                NOW,
            );
            saved.apply(
                &event(Command::StartSession, "qs2", user, Some(&format!("t{i}"))),
                NOW,
            );
            saved.apply(&event(Command::StartSession, "qs3", user, None), NOW);
        }
        let (body, _) = saved.write_checkpoint(NOW);
        let decoded = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();

        let seconds = |s: u64| UnixMillis(NOW.0 + s * 1000);
        let mut early = Vec::new();
        for (i, user) in users.iter().enumerate() {
            let id = guid(i);
            let (command, host, id) = match i % 4 {
                0 => (Command::StopSession, "qs1", Some(id)),
                1 => (Command::StopSession, "QS3", None),
                2 => (Command::CloseConnection, "qs1", Some(id)),
                _ => (Command::StopSession, "qs2", Some(format!("t{i}"))),
            };
            early.push((command, host, user, id));
        }
        let restoring = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, 16);
        for (i, (command, host, user, id)) in early.iter().enumerate() {
            let outcome = restoring.apply(
                &event(*command, host, user, id.as_deref()),
                seconds(i as u64),
            );
            assert!(
                matches!(
                    outcome,
                    Outcome::UnknownSessionStopped | Outcome::UnknownSessionClosed
                ),
                "{outcome:?}"
            );
        }
        assert_eq!(restoring.remembered_before_restore(), 40);
        assert_eq!(restoring.restore_decoded(&decoded, seconds(60)), 120 - 30);
        assert_eq!(
            restoring.end_restore(),
            RestoreEnd {
                stopped: 30,
                closed_connections: 10,
                not_remembered: 0
            }
        );
        assert_eq!(restoring.remembered_before_restore(), 0);

        // The same events after the restore, where the sessions are known.
        for (i, (command, host, user, id)) in early.iter().enumerate() {
            saved.apply(
                &event(*command, host, user, id.as_deref()),
                seconds(i as u64),
            );
        }
        assert_eq!(restoring.active_users(), saved.active_users());
        assert_eq!(restoring.active_sessions(), saved.active_sessions());
        assert_eq!(brief(&restoring), brief(&saved));
    }

    #[test]
    fn what_the_shards_remember_before_the_restore_stays_within_the_cap() {
        let r = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, 64);
        let share = RestoreMemoryCap::DEFAULT.per_shard(64).sessions;
        assert_eq!(share, 1562);
        // One user's events all land in the user's shard: its share is all they get.
        for i in 0..2000 {
            let id = format!("s{i}");
            r.apply(
                &event(Command::StopSession, "qs1", "mallory", Some(&id)),
                NOW,
            );
        }
        assert_eq!(r.remembered_before_restore(), share);
        assert_eq!(r.end_restore().not_remembered, 2000 - share as u64);
        assert_eq!(r.remembered_before_restore(), 0);
    }

    proptest! {
        /// Whatever the events, the sharded registry answers exactly as one registry does.
        #[test]
        fn answers_as_one_registry(
            events in proptest::collection::vec((0..4usize, 0..3usize, 0..12usize, proptest::option::of(0..6usize), 0..40u64), 1..200),
            shards in 1..9usize,
        ) {
            let commands = [Command::StartSession, Command::StopSession, Command::OpenConnection, Command::CloseConnection];
            let hosts = ["qs1", "QS1", "qs2"];
            let users: Vec<String> = (0..12).map(|i| if i % 2 == 0 { format!("u{i}") } else { format!("U{}", i - 1) }).collect();
            // A proxy session id belongs to one user (see the module docs).
            let sids: Vec<Vec<String>> = (0..12).map(|u| (0..6).map(|i| format!("s{}-{i}", u / 2)).collect()).collect();
            let sharded = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, shards);
            let mut single = Registry::new(ExpiryPolicy::default(), Exclusions::default()).with_max_hosts(2);
            for (c, h, u, s, minutes) in events {
                let e = event(commands[c], hosts[h], &users[u], s.map(|s| sids[u][s].as_str()));
                let now = UnixMillis(NOW.0 + minutes * 60_000);
                prop_assert_eq!(sharded.apply(&e, now), single.apply(&e, now));
            }
            let later = UnixMillis(NOW.0 + 35 * 60_000);
            prop_assert_eq!(sharded.expire(later), single.expire(later));
            prop_assert_eq!(sharded.active_users(), single.active_users());
            prop_assert_eq!(sharded.active_sessions(), single.active_sessions());
            // The kept total is the shards' own count.
            prop_assert_eq!(sharded.active_sessions(), sharded.sum(Registry::active_sessions));
            prop_assert_eq!(sharded.hosts(), single.hosts());
            prop_assert_eq!(sharded.users(), single.users());
            prop_assert_eq!(sharded.user_names(), single.user_names());
            prop_assert_eq!(sharded.user_ids(), single.user_ids());
            let mut a = sharded.snapshot();
            let mut b = single.snapshot();
            let key = |r: &SessionRecord| (r.proxy_session_id.clone(), r.host.to_lowercase(), r.user_id.to_lowercase());
            a.sort_by_key(key);
            b.sort_by_key(key);
            prop_assert_eq!(&a, &b);
            // The checkpoint written from the shards' own tables holds exactly the snapshot.
            // (Saved after every event: times are stored as distances back from saved_at.)
            let (body, written) = sharded.write_checkpoint(UnixMillis(NOW.0 + 60 * 60_000));
            let decoded = crate::checkpoint::codec::decode(&body.finish()).unwrap();
            prop_assert_eq!(written, a.len());
            prop_assert_eq!(&decoded.hosts, &sharded.host_names());
            let mut c = decoded.sessions;
            c.sort_by_key(key);
            prop_assert_eq!(&c, &a);
            // And a restore into fresh shards gives the same answers again.
            let restored = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, shards + 1);
            restored.restore_hosts(&sharded.host_names());
            prop_assert_eq!(restored.restore(&a, later), a.len());
            // (First-seen times may differ: a restore knows only the sessions still open.)
            let brief = |r: &ShardedRegistry| r.users().into_iter().map(|u| (u.name, u.sessions, u.open_connections, u.hosts)).collect::<Vec<_>>();
            prop_assert_eq!(brief(&restored), brief(&sharded));
            // Restoring the decoded segments gives the same registry as restoring the records.
            let (body, _) = sharded.write_checkpoint(later);
            let decoded = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();
            let from_segments = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, shards + 2);
            prop_assert_eq!(from_segments.restore_decoded(&decoded, later), a.len());
            prop_assert_eq!(brief(&from_segments), brief(&sharded));
            // (A checkpoint keeps no event times per host.)
            let counts = |r: &ShardedRegistry| r.hosts().into_iter().map(|h| (h.host, h.active_users, h.active_sessions)).collect::<Vec<_>>();
            prop_assert_eq!(counts(&from_segments), counts(&sharded));
            prop_assert_eq!(counts(&restored), counts(&sharded));
        }

        /// Whatever the sessions, the shards and the stops and closes that come while the
        /// checkpoint loads, the registry ends as if they had come after the restore.
        /// A rollout's handover: the old pod keeps running after the new one restored its
        /// checkpoint, each proxy's events move from the old pod to the new one at a moment of
        /// their own, and the old pod's last checkpoint is taken over. The new pod then holds
        /// exactly the sessions one pod that saw every event would.
        #[test]
        fn a_handover_holds_the_sessions_one_pod_would(
            before in proptest::collection::vec((0..4usize, 0..3usize, 0..12usize, proptest::option::of(0..6usize)), 0..80),
            during in proptest::collection::vec((0..4usize, 0..3usize, 0..12usize, proptest::option::of(0..6usize)), 0..120),
            after in proptest::collection::vec((0..4usize, 0..3usize, 0..12usize, proptest::option::of(0..6usize)), 0..40),
            moved_at in proptest::collection::vec(0..120usize, 3),
            shards in 1..9usize,
        ) {
            let commands = [Command::StartSession, Command::StopSession, Command::OpenConnection, Command::CloseConnection];
            let hosts = ["qs1", "qs2", "qs3"];
            let users: Vec<String> = (0..12).map(|i| format!("u{i}")).collect();
            // A proxy session id belongs to one user on one proxy.
            let sid = |u: usize, h: usize, i: usize| if i.is_multiple_of(2) { format!("{u:08x}-2a1e-4d4a-8b9f-{h:04x}{i:08x}") } else { format!("s{u}-{h}-{i}") };
            let new = || ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 8, shards);
            let (old, truth) = (new(), new());
            // A second a step, well within the idle timeout: nothing expires.
            let mut clock = NOW.0;
            let mut tick = || { clock += 1000; UnixMillis(clock) };
            let apply = |r: &ShardedRegistry, (c, h, u, s): (usize, usize, usize, Option<usize>), at: UnixMillis| {
                let id = s.map(|s| sid(u, h, s));
                r.apply(&event(commands[c], hosts[h], &users[u], id.as_deref()), at);
            };
            for e in before {
                let at = tick();
                apply(&old, e, at);
                apply(&truth, e, at);
            }
            let (body, _) = old.write_checkpoint(tick());
            let first = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();
            let standby = new();
            standby.restore_decoded_as(&first, tick(), RestoreEnds::AtTakeOver);
            for (i, e) in during.into_iter().enumerate() {
                let at = tick();
                let to = if i >= moved_at[e.1] { &standby } else { &old };
                apply(to, e, at);
                apply(&truth, e, at);
            }
            let (body, _) = old.write_checkpoint(tick());
            let last = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();
            standby.take_over(&last, tick());
            prop_assert_eq!(standby.remembered_before_restore(), 0);
            for e in after {
                let at = tick();
                apply(&standby, e, at);
                apply(&truth, e, at);
            }
            let sessions = |r: &ShardedRegistry| {
                let mut keys: Vec<_> = r.snapshot().into_iter()
                    .map(|s| (s.proxy_session_id, s.host, s.user_id))
                    .collect();
                keys.sort();
                keys
            };
            prop_assert_eq!(sessions(&standby), sessions(&truth));
            prop_assert_eq!(standby.user_names(), truth.user_names());
            prop_assert_eq!(standby.active_sessions(), truth.active_sessions());
            prop_assert_eq!(standby.active_sessions(), standby.sum(Registry::active_sessions));
        }

        #[test]
        fn events_before_the_restore_count_as_if_after_it(
            events in proptest::collection::vec((0..4usize, 0..3usize, 0..12usize, proptest::option::of(0..6usize), 0..40u64), 1..150),
            early in proptest::collection::vec((proptest::bool::ANY, 0..3usize, 0..12usize, proptest::option::of(0..6usize)), 0..60),
            shards in 1..9usize,
        ) {
            let commands = [Command::StartSession, Command::StopSession, Command::OpenConnection, Command::CloseConnection];
            let hosts = ["qs1", "QS1", "qs2"];
            let users: Vec<String> = (0..12).map(|i| if i % 2 == 0 { format!("u{i}") } else { format!("U{}", i - 1) }).collect();
            // A proxy session id belongs to one user; half are GUIDs, which a checkpoint keeps
            // as bytes.
            let sid = |u: usize, i: usize| if i.is_multiple_of(2) { format!("{:08x}-2a1e-4d4a-8b9f-{i:012x}", u / 2) } else { format!("s{}-{i}", u / 2) };
            let saved = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, shards);
            for (c, h, u, s, minutes) in events {
                let id = s.map(|s| sid(u, s));
                saved.apply(&event(commands[c], hosts[h], &users[u], id.as_deref()), UnixMillis(NOW.0 + minutes * 60_000));
            }
            let saved_at = UnixMillis(NOW.0 + 40 * 60_000);
            let (body, _) = saved.write_checkpoint(saved_at);
            let decoded = crate::checkpoint::codec::decode_segments(&body.finish()).unwrap();

            let early: Vec<(Command, &str, &str, Option<String>, UnixMillis)> = early
                .into_iter()
                .enumerate()
                .map(|(i, (stop, h, u, s))| {
                    let command = if stop { Command::StopSession } else { Command::CloseConnection };
                    (command, hosts[h], users[u].as_str(), s.map(|s| sid(u, s)), UnixMillis(saved_at.0 + i as u64 * 1000))
                })
                .collect();
            let restoring = ShardedRegistry::new(ExpiryPolicy::default(), Exclusions::default(), 2, shards + 1);
            for (command, host, user, id, at) in &early {
                restoring.apply(&event(*command, host, user, id.as_deref()), *at);
            }
            let restore_at = UnixMillis(saved_at.0 + 60 * 1000);
            restoring.restore_decoded(&decoded, restore_at);
            let ended = restoring.end_restore();
            prop_assert_eq!(restoring.remembered_before_restore(), 0);

            // The restore drops what has expired by then, and the events come after it.
            saved.expire(restore_at);
            let before = saved.active_sessions();
            for (command, host, user, id, at) in &early {
                saved.apply(&event(*command, host, user, id.as_deref()), *at);
            }
            prop_assert_eq!(ended.stopped, before - saved.active_sessions());
            prop_assert_eq!(restoring.active_users(), saved.active_users());
            prop_assert_eq!(restoring.active_sessions(), saved.active_sessions());
            prop_assert_eq!(brief(&restoring), brief(&saved));
            let counts = |r: &ShardedRegistry| r.hosts().into_iter().map(|h| (h.host, h.active_users, h.active_sessions)).collect::<Vec<_>>();
            prop_assert_eq!(counts(&restoring), counts(&saved));
        }
    }
}
