//! The checkpoint wire format: versioned, compact, compressed. Pure: bytes in, bytes out.
//!
//! Layout (version 3):
//! ```text
//! "SMCP" | version: u8 | zlib( body )
//! body    = saved_at: varint (unix ms)
//!           hosts: varint count, then strings
//!           segments: varint count, then each segment:
//!             users: varint count, then (directory string, user id string)
//!             sessions: varint count, then per session
//!               flags: u8 (bit 0: has a proxy session id; bit 1: it is a GUID, as 16 bytes)
//!               [session id: 16 bytes, or a string]
//!               host index: varint (into hosts), user index: varint (into the segment's users)
//!               saved_at - started: varint, saved_at - last_seen: varint
//!               open connections: varint
//!           history: hosts: varint count, then strings
//!             minutes: varint count, then per minute (oldest first)
//!               minute: varint (the first since the epoch, then the distance from the previous)
//!               total max, total last, ms into the minute of the max: varints
//!               hosts: varint count, then (host index, max, last): varints
//! string  = varint byte length, UTF-8 bytes
//! ```
//! A segment is one registry shard, written from the shard's own tables while it is locked
//! (no per-session allocation; see [`BodyWriter`]); hosts and users are written once and
//! referenced by index, times are distances back from `saved_at`, and Qlik's GUID session ids
//! take their 16 bytes, so a session costs about 25 bytes before compression. zlib carries an
//! Adler-32 checksum, so truncation and bit rot are detected, not restored as garbage.
//!
//! Version 2 (still read) had no history; version 1 (still read) also had one implicit segment
//! and every session id as a string.

use std::collections::HashMap;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

use crate::history::{History, Minute, Sample};
use crate::registry::{SessionRecord, UnixMillis, format_guid, parse_guid};

const MAGIC: &[u8; 4] = b"SMCP";
/// Bump when the layout changes; readers refuse versions newer than they know, and keep
/// decoding every older one.
pub const VERSION: u8 = 3;
/// A decoded checkpoint may not be larger than this: a guard against a small crafted file that
/// decompresses to gigabytes. A million sessions take well under 100 MiB.
const MAX_BODY_BYTES: u64 = 512 << 20;

const HAS_ID: u8 = 1;
const GUID_ID: u8 = 2;

/// The registry as saved at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub saved_at: UnixMillis,
    /// Every proxy host known, also those without sessions (so their counts are republished
    /// as 0 after a restart). Hosts of `sessions` are written even if missing here.
    pub hosts: Vec<String>,
    pub sessions: Vec<SessionRecord>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("not a session-monitor checkpoint (bad magic bytes)")]
    BadMagic,
    #[error("checkpoint format version {0} is newer than this build understands (up to {VERSION})")]
    UnsupportedVersion(u8),
    #[error("checkpoint is corrupt: {0}")]
    Corrupt(String),
}

/// A session's id as a registry holds it.
#[derive(Clone, Copy, Debug)]
pub enum SessionId<'a> {
    /// Keyed by (host, user): the datagrams carried no id.
    None,
    Guid(&'a [u8; 16]),
    Text(&'a str),
}

/// One session as [`BodyWriter::session`] takes it: indexes into the body's hosts and the
/// current segment's users.
#[derive(Clone, Copy, Debug)]
pub struct SessionEntry<'a> {
    pub id: SessionId<'a>,
    pub host: u32,
    pub user: u32,
    pub started: UnixMillis,
    pub last_seen: UnixMillis,
    pub open_connections: u32,
}

/// Writes a body in order: hosts, then for each of `segments` segments its users and then its
/// sessions. Counts come first in the format, so each list's length is given up front; a
/// mismatch is a bug of the caller and panics in debug builds.
pub struct BodyWriter {
    saved_at: UnixMillis,
    body: Vec<u8>,
    hosts: u32,
    segments_left: usize,
    users_left: usize,
    sessions_left: usize,
    history: bool,
}

impl BodyWriter {
    pub fn new(saved_at: UnixMillis, hosts: &[String], segments: usize) -> BodyWriter {
        let mut body = Vec::new();
        put_varint(&mut body, saved_at.0);
        put_varint(&mut body, hosts.len() as u64);
        for h in hosts {
            put_str(&mut body, h);
        }
        put_varint(&mut body, segments as u64);
        BodyWriter {
            saved_at,
            body,
            hosts: hosts.len() as u32,
            segments_left: segments,
            users_left: 0,
            sessions_left: 0,
            history: false,
        }
    }

    /// Starts the next segment, with `users` users and `sessions` sessions to follow.
    pub fn segment(&mut self, users: usize, sessions: usize) {
        debug_assert!(self.segments_left > 0 && self.users_left == 0 && self.sessions_left == 0);
        self.segments_left -= 1;
        self.users_left = users;
        self.sessions_left = sessions;
        self.body.reserve(users * 24 + sessions * 28);
        put_varint(&mut self.body, users as u64);
        if users == 0 {
            put_varint(&mut self.body, sessions as u64);
        }
    }

    pub fn user(&mut self, directory: &str, user_id: &str) {
        debug_assert!(self.users_left > 0);
        put_str(&mut self.body, directory);
        put_str(&mut self.body, user_id);
        self.users_left -= 1;
        if self.users_left == 0 {
            put_varint(&mut self.body, self.sessions_left as u64);
        }
    }

    pub fn session(&mut self, s: SessionEntry<'_>) {
        debug_assert!(self.users_left == 0 && self.sessions_left > 0 && s.host < self.hosts);
        self.sessions_left -= 1;
        let out = &mut self.body;
        match s.id {
            SessionId::None => out.push(0),
            SessionId::Guid(guid) => {
                out.push(HAS_ID | GUID_ID);
                out.extend_from_slice(guid);
            }
            SessionId::Text(id) => {
                out.push(HAS_ID);
                put_str(out, id);
            }
        }
        put_varint(out, u64::from(s.host));
        put_varint(out, u64::from(s.user));
        put_varint(out, self.saved_at.0.saturating_sub(s.started.0));
        put_varint(out, self.saved_at.0.saturating_sub(s.last_seen.0));
        put_varint(out, u64::from(s.open_connections));
    }

    /// Writes the history, after the last segment (an empty one if this is never called).
    pub fn history(&mut self, history: &History) {
        debug_assert!(self.segments_left == 0 && self.sessions_left == 0 && !self.history);
        self.history = true;
        let out = &mut self.body;
        put_varint(out, history.hosts().len() as u64);
        for h in history.hosts() {
            put_str(out, h);
        }
        put_varint(out, history.minutes().len() as u64);
        let mut previous = 0;
        for m in history.minutes() {
            put_varint(out, u64::from(m.minute - previous));
            previous = m.minute;
            put_varint(out, u64::from(m.total.max));
            put_varint(out, u64::from(m.total.last));
            put_varint(out, u64::from(m.total_max_at));
            put_varint(out, m.hosts.len() as u64);
            for (host, sample) in &m.hosts {
                put_varint(out, u64::from(*host));
                put_varint(out, u64::from(sample.max));
                put_varint(out, u64::from(sample.last));
            }
        }
    }

    /// Compresses the body into the checkpoint's bytes. The slow part: call it outside locks.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.segments_left == 0 && self.sessions_left == 0);
        if !self.history {
            put_varint(&mut self.body, 0);
            put_varint(&mut self.body, 0);
        }
        let mut out = Vec::with_capacity(self.body.len() / 2 + 16);
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        // Level 1: checkpoints are written every few seconds; speed matters more than the last
        // few percent of size, and the ids (random bytes) dominate the size anyway.
        let mut z = ZlibEncoder::new(out, Compression::fast());
        z.write_all(&self.body)
            .expect("writing to a Vec cannot fail");
        z.finish().expect("writing to a Vec cannot fail")
    }
}

/// Encodes self-contained records (one segment). The service writes from its registry's own
/// tables instead ([`crate::registry::ShardedRegistry::write_checkpoint`]).
pub fn encode(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut hosts: Vec<String> = Vec::new();
    let mut host_index: HashMap<&str, u32> = HashMap::new();
    for h in checkpoint
        .hosts
        .iter()
        .chain(checkpoint.sessions.iter().map(|s| &s.host))
    {
        host_index.entry(h).or_insert_with(|| {
            hosts.push(h.clone());
            hosts.len() as u32 - 1
        });
    }
    let mut users: Vec<(&str, &str)> = Vec::new();
    let mut user_index: HashMap<(&str, &str), u32> = HashMap::new();
    let indexes: Vec<u32> = checkpoint
        .sessions
        .iter()
        .map(|s| {
            let key = (s.user_directory.as_str(), s.user_id.as_str());
            *user_index.entry(key).or_insert_with(|| {
                users.push(key);
                users.len() as u32 - 1
            })
        })
        .collect();
    let mut w = BodyWriter::new(checkpoint.saved_at, &hosts, 1);
    w.segment(users.len(), checkpoint.sessions.len());
    for (directory, user_id) in &users {
        w.user(directory, user_id);
    }
    for (s, user) in checkpoint.sessions.iter().zip(indexes) {
        let guid = s.proxy_session_id.as_deref().and_then(parse_guid);
        w.session(SessionEntry {
            id: match (&guid, &s.proxy_session_id) {
                (Some(guid), _) => SessionId::Guid(guid),
                (None, Some(id)) => SessionId::Text(id),
                (None, None) => SessionId::None,
            },
            host: host_index[s.host.as_str()],
            user,
            started: s.started,
            last_seen: s.last_seen,
            open_connections: s.open_connections,
        });
    }
    w.finish()
}

/// A checkpoint as written: hosts, and per segment its users and its sessions by index (every
/// index checked to be in range). What start-up restores from, without a string per session.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    pub saved_at: UnixMillis,
    pub hosts: Vec<String>,
    pub segments: Vec<Segment>,
    /// The history's hosts and minutes (empty before version 3).
    pub history_hosts: Vec<String>,
    pub history: Vec<Minute>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// (directory, user id)
    pub users: Vec<(String, String)>,
    pub sessions: Vec<DecodedSession>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedSession {
    pub id: DecodedId,
    /// Index into [`Decoded::hosts`].
    pub host: u32,
    /// Index into the segment's users.
    pub user: u32,
    pub started: UnixMillis,
    pub last_seen: UnixMillis,
    pub open_connections: u32,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodedId {
    None,
    Guid([u8; 16]),
    Text(String),
}

impl DecodedId {
    pub fn as_ref(&self) -> SessionId<'_> {
        match self {
            DecodedId::None => SessionId::None,
            DecodedId::Guid(guid) => SessionId::Guid(guid),
            DecodedId::Text(id) => SessionId::Text(id),
        }
    }
}

/// Decodes into self-contained records (tests and tools; start-up uses [`decode_segments`]).
pub fn decode(bytes: &[u8]) -> Result<Checkpoint, DecodeError> {
    let decoded = decode_segments(bytes)?;
    let hosts = &decoded.hosts;
    let sessions = decoded
        .segments
        .iter()
        .flat_map(|segment| {
            segment.sessions.iter().map(move |s| {
                let (directory, user_id) = &segment.users[s.user as usize];
                SessionRecord {
                    proxy_session_id: match &s.id {
                        DecodedId::None => None,
                        DecodedId::Guid(guid) => Some(format_guid(guid)),
                        DecodedId::Text(id) => Some(id.clone()),
                    },
                    host: hosts[s.host as usize].clone(),
                    user_directory: directory.clone(),
                    user_id: user_id.clone(),
                    started: s.started,
                    last_seen: s.last_seen,
                    open_connections: s.open_connections,
                }
            })
        })
        .collect();
    Ok(Checkpoint {
        saved_at: decoded.saved_at,
        hosts: decoded.hosts,
        sessions,
    })
}

pub fn decode_segments(bytes: &[u8]) -> Result<Decoded, DecodeError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(DecodeError::BadMagic)?;
    let (&version, compressed) = rest.split_first().ok_or(DecodeError::BadMagic)?;
    if version > VERSION || version == 0 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let mut body = Vec::new();
    ZlibDecoder::new(compressed)
        .take(MAX_BODY_BYTES)
        .read_to_end(&mut body)
        .map_err(|e| DecodeError::Corrupt(format!("decompression failed: {e}")))?;
    if body.len() as u64 >= MAX_BODY_BYTES {
        return Err(corrupt("larger than any checkpoint this build writes"));
    }

    let mut r = Reader { buf: &body };
    let saved_at = UnixMillis(r.varint()?);
    let hosts = (0..r.count()?)
        .map(|_| r.string())
        .collect::<Result<Vec<_>, _>>()?;
    // Version 1 is one segment without a segment count.
    let count = if version == 1 { 1 } else { r.count()? };
    let allowed = if version == 1 {
        HAS_ID
    } else {
        HAS_ID | GUID_ID
    };
    let mut segments = Vec::with_capacity(count);
    for _ in 0..count {
        let users = (0..r.count()?)
            .map(|_| Ok((r.string()?, r.string()?)))
            .collect::<Result<Vec<_>, DecodeError>>()?;
        let count = r.count()?;
        let mut sessions = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.byte()?;
            if flags & !allowed != 0 || flags == GUID_ID {
                return Err(DecodeError::Corrupt(format!(
                    "unknown session flags {flags:#x}"
                )));
            }
            let id = match flags {
                0 => DecodedId::None,
                // Version 1 wrote GUIDs as text: keep them compact from here on.
                HAS_ID => {
                    let id = r.string()?;
                    parse_guid(&id).map_or(DecodedId::Text(id), DecodedId::Guid)
                }
                _ => DecodedId::Guid(r.array()?),
            };
            let host = r.index(hosts.len(), "host")?;
            let user = r.index(users.len(), "user")?;
            let started = UnixMillis(saved_at.0.saturating_sub(r.varint()?));
            let last_seen = UnixMillis(saved_at.0.saturating_sub(r.varint()?));
            let open_connections =
                u32::try_from(r.varint()?).map_err(|_| corrupt("connection count out of range"))?;
            sessions.push(DecodedSession {
                id,
                host,
                user,
                started,
                last_seen,
                open_connections,
            });
        }
        segments.push(Segment { users, sessions });
    }
    let (history_hosts, history) = match version {
        1 | 2 => (Vec::new(), Vec::new()),
        _ => read_history(&mut r)?,
    };
    if !r.buf.is_empty() {
        return Err(corrupt("trailing bytes after the history"));
    }
    Ok(Decoded {
        saved_at,
        hosts,
        segments,
        history_hosts,
        history,
    })
}

fn read_history(r: &mut Reader<'_>) -> Result<(Vec<String>, Vec<Minute>), DecodeError> {
    let hosts = (0..r.count()?)
        .map(|_| r.string())
        .collect::<Result<Vec<_>, _>>()?;
    let number = |r: &mut Reader<'_>, what: &str| {
        u32::try_from(r.varint()?).map_err(|_| corrupt(&format!("history {what} out of range")))
    };
    let count = r.count()?;
    let mut minutes = Vec::with_capacity(count);
    let mut minute = 0u32;
    for i in 0..count {
        let step = number(r, "minute")?;
        if i > 0 && step == 0 {
            return Err(corrupt("history minutes out of order"));
        }
        minute = minute
            .checked_add(step)
            .ok_or_else(|| corrupt("history minute out of range"))?;
        let total = Sample {
            max: number(r, "count")?,
            last: number(r, "count")?,
        };
        let total_max_at = u16::try_from(r.varint()?)
            .ok()
            .filter(|ms| *ms < 60_000)
            .ok_or_else(|| corrupt("history time out of range"))?;
        let host_count = r.count()?;
        let mut samples = Vec::with_capacity(host_count);
        for _ in 0..host_count {
            let host = r.index(hosts.len(), "history host")? as u16;
            samples.push((
                host,
                Sample {
                    max: number(r, "count")?,
                    last: number(r, "count")?,
                },
            ));
        }
        minutes.push(Minute {
            minute,
            total,
            total_max_at,
            hosts: samples,
        });
    }
    Ok((hosts, minutes))
}

fn corrupt(what: &str) -> DecodeError {
    DecodeError::Corrupt(what.to_owned())
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_varint(out, s.len() as u64);
    out.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl Reader<'_> {
    fn byte(&mut self) -> Result<u8, DecodeError> {
        let (&b, rest) = self
            .buf
            .split_first()
            .ok_or_else(|| corrupt("unexpected end"))?;
        self.buf = rest;
        Ok(b)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("varint too long"))
    }

    /// A count of items that each take at least one byte: larger than what is left is corrupt.
    fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.varint()?;
        if n > self.buf.len() as u64 {
            return Err(corrupt("count larger than the data"));
        }
        Ok(n as usize)
    }

    fn index(&mut self, len: usize, what: &str) -> Result<u32, DecodeError> {
        let i = self.varint()?;
        if i >= len as u64 {
            return Err(DecodeError::Corrupt(format!("{what} index out of range")));
        }
        Ok(i as u32)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        let Some((head, rest)) = self.buf.split_first_chunk::<N>() else {
            return Err(corrupt("unexpected end"));
        };
        self.buf = rest;
        Ok(*head)
    }

    fn string(&mut self) -> Result<String, DecodeError> {
        let len = self.count()?;
        let (s, rest) = self.buf.split_at(len);
        self.buf = rest;
        String::from_utf8(s.to_vec()).map_err(|_| corrupt("string is not UTF-8"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(id: Option<&str>, host: &str, dir: &str, user: &str, t: u64) -> SessionRecord {
        SessionRecord {
            proxy_session_id: id.map(str::to_owned),
            host: host.into(),
            user_directory: dir.into(),
            user_id: user.into(),
            started: UnixMillis(t),
            last_seen: UnixMillis(t + 500),
            open_connections: 2,
        }
    }

    #[test]
    fn round_trip() {
        let c = Checkpoint {
            saved_at: UnixMillis(1_700_000_100_000),
            hosts: vec!["qs1".into(), "qs2".into(), "idle-proxy".into()],
            sessions: vec![
                record(
                    Some("4b0a7e2c-aaaa"),
                    "qs1",
                    "LAB",
                    "joe",
                    1_700_000_000_000,
                ),
                record(None, "qs2", "LAB", "joe", 1_700_000_000_001),
                record(None, "qs1", "CORP", "ännä", 1_700_000_000_002),
            ],
        };
        let bytes = encode(&c);
        assert_eq!(&bytes[..5], b"SMCP\x03");
        assert_eq!(decode(&bytes).unwrap(), c);
    }

    #[test]
    fn the_history_round_trips() {
        let mut history = History::new(crate::history::DEFAULT_RETENTION);
        let t0 = 1_764_460_800_000;
        history.record(
            UnixMillis(t0 + 5_000),
            Sample::new(3),
            [("qs1", 2), ("qs2", 1)],
        );
        history.record(UnixMillis(t0 + 20_000), Sample::new(5), [("qs1", 4)]);
        // Two minutes down, then back.
        history.record(UnixMillis(t0 + 3 * 60_000), Sample::new(1), [("qs2", 1)]);
        let mut w = BodyWriter::new(UnixMillis(t0 + 200_000), &["qs1".into()], 0);
        w.history(&history);
        let decoded = decode_segments(&w.finish()).unwrap();
        assert_eq!(decoded.history_hosts, history.hosts());
        assert_eq!(
            decoded.history,
            history.minutes().cloned().collect::<Vec<_>>()
        );
        assert_eq!(decoded.history[0].total_max_at, 20_000);
    }

    #[test]
    fn version_2_is_still_read_without_history() {
        // Version 2 is version 3 without the history section (two zero counts at the end).
        let c = Checkpoint {
            saved_at: UnixMillis(1_700_000_100_000),
            hosts: vec!["qs1".into()],
            sessions: vec![record(None, "qs1", "LAB", "joe", 1_700_000_000_000)],
        };
        let v3 = encode(&c);
        let mut body = Vec::new();
        ZlibDecoder::new(&v3[5..]).read_to_end(&mut body).unwrap();
        assert_eq!(body[body.len() - 2..], [0, 0]);
        body.truncate(body.len() - 2);
        let mut z = ZlibEncoder::new(b"SMCP\x02".to_vec(), Compression::fast());
        z.write_all(&body).unwrap();
        let v2 = z.finish().unwrap();
        assert_eq!(decode(&v2).unwrap(), c);
        assert!(decode_segments(&v2).unwrap().history.is_empty());
    }

    #[test]
    fn version_1_is_still_read() {
        // Version 1 as the previous release wrote it: no segment count, ids as strings.
        let mut body = Vec::new();
        put_varint(&mut body, 1_000_000);
        put_varint(&mut body, 1);
        put_str(&mut body, "qs1");
        put_varint(&mut body, 1);
        put_str(&mut body, "LAB");
        put_str(&mut body, "joe");
        put_varint(&mut body, 2);
        body.push(1);
        put_str(&mut body, "0f8fad5b-d9cb-469f-a165-70867728950e");
        body.extend([0, 0, 100, 50, 2]); // host, user, started and last seen back, open
        body.push(0);
        body.extend([0, 0, 10, 10, 0]);
        let mut z = ZlibEncoder::new(b"SMCP\x01".to_vec(), Compression::fast());
        z.write_all(&body).unwrap();
        let c = decode(&z.finish().unwrap()).unwrap();
        assert_eq!(c.saved_at, UnixMillis(1_000_000));
        assert_eq!(c.hosts, ["qs1"]);
        assert_eq!(
            c.sessions,
            [
                SessionRecord {
                    proxy_session_id: Some("0f8fad5b-d9cb-469f-a165-70867728950e".into()),
                    host: "qs1".into(),
                    user_directory: "LAB".into(),
                    user_id: "joe".into(),
                    started: UnixMillis(999_900),
                    last_seen: UnixMillis(999_950),
                    open_connections: 2,
                },
                SessionRecord {
                    proxy_session_id: None,
                    host: "qs1".into(),
                    user_directory: "LAB".into(),
                    user_id: "joe".into(),
                    started: UnixMillis(999_990),
                    last_seen: UnixMillis(999_990),
                    open_connections: 0,
                },
            ]
        );
    }

    #[test]
    fn guid_ids_take_sixteen_bytes() {
        let guid = "0f8fad5b-d9cb-469f-a165-70867728950e";
        let one = |id: &str| Checkpoint {
            saved_at: UnixMillis(1000),
            hosts: vec!["h".into()],
            sessions: vec![record(Some(id), "h", "D", "u", 1)],
        };
        let upper = guid.to_uppercase(); // not Qlik's form: kept as text, exactly
        let (compact, text) = (encode(&one(guid)), encode(&one(&upper)));
        assert_eq!(decode(&compact).unwrap(), one(guid));
        assert_eq!(decode(&text).unwrap(), one(&upper));
        assert!(
            compact.len() + 15 < text.len(),
            "{} vs {}",
            compact.len(),
            text.len()
        );
    }

    #[test]
    fn empty_round_trip() {
        let c = Checkpoint::default();
        assert_eq!(decode(&encode(&c)).unwrap(), c);
    }

    #[test]
    fn newer_versions_and_foreign_files_are_refused() {
        let mut bytes = encode(&Checkpoint::default());
        bytes[4] = VERSION + 1;
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::UnsupportedVersion(VERSION + 1))
        );
        assert_eq!(decode(b"{\"json\": true}"), Err(DecodeError::BadMagic));
        assert_eq!(decode(b""), Err(DecodeError::BadMagic));
    }

    #[test]
    fn truncation_and_bit_flips_are_detected() {
        let c = Checkpoint {
            saved_at: UnixMillis(10_000),
            hosts: vec!["h".into()],
            sessions: (0..50)
                .map(|i| record(Some(&format!("id-{i}")), "h", "D", &format!("u{i}"), i))
                .collect(),
        };
        let bytes = encode(&c);
        assert!(matches!(
            decode(&bytes[..bytes.len() - 3]),
            Err(DecodeError::Corrupt(_))
        ));
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0x40;
        assert!(matches!(decode(&flipped), Err(DecodeError::Corrupt(_))));
    }

    #[test]
    fn times_after_saved_at_do_not_underflow() {
        let c = Checkpoint {
            saved_at: UnixMillis(5),
            hosts: vec!["h".into()],
            sessions: vec![record(None, "h", "D", "u", 10)],
        };
        let back = decode(&encode(&c)).unwrap();
        assert_eq!(back.sessions[0].last_seen, UnixMillis(5));
    }

    proptest! {
        #[test]
        fn any_checkpoint_round_trips(
            saved_at in 1_000_000u64..u64::MAX / 2,
            sessions in prop::collection::vec(
                (prop::option::of("[a-f0-9-]{1,36}"), "[a-z]{1,8}", "[A-Z]{1,5}", ".{1,12}", 0u64..1_000_000, 0u32..5),
                0..40,
            ),
        ) {
            let mut c = Checkpoint {
                saved_at: UnixMillis(saved_at),
                hosts: vec!["zero-sessions".into()],
                sessions: sessions.into_iter().map(|(id, host, dir, user, age, open)| SessionRecord {
                    proxy_session_id: id,
                    host,
                    user_directory: dir,
                    user_id: user,
                    started: UnixMillis(saved_at - age),
                    last_seen: UnixMillis(saved_at - age / 2),
                    open_connections: open,
                }).collect(),
            };
            // Decoding lists every host: the given ones, then those of sessions, first seen first.
            for s in &c.sessions {
                if !c.hosts.contains(&s.host) {
                    c.hosts.push(s.host.clone());
                }
            }
            prop_assert_eq!(decode(&encode(&c)).unwrap(), c);
        }

        #[test]
        fn decoding_garbage_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
            let mut with_header = b"SMCP\x01".to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = decode(&with_header);
            // Garbage inside valid compression exercises the body reader itself.
            let mut z = ZlibEncoder::new(b"SMCP\x01".to_vec(), Compression::fast());
            z.write_all(&bytes).unwrap();
            let _ = decode(&z.finish().unwrap());
        }
    }
}
