//! The checkpoint wire format: versioned, compact, compressed. Pure: bytes in, bytes out.
//!
//! Layout (version 1):
//! ```text
//! "SMCP" | version: u8 | zlib( body )
//! body  = saved_at: varint (unix ms)
//!         hosts: varint count, then strings
//!         users: varint count, then (directory string, user id string)
//!         sessions: varint count, then per session
//!             flags: u8 (bit 0: has a proxy session id)
//!             [session id string]
//!             host index: varint, user index: varint
//!             saved_at - started: varint, saved_at - last_seen: varint
//!             open connections: varint
//! string = varint byte length, UTF-8 bytes
//! ```
//! Hosts and users are written once and referenced by index, and times are stored as distances
//! back from `saved_at`, so a session costs a few bytes plus its id before compression. zlib
//! carries an Adler-32 checksum, so truncation and bit rot are detected, not restored as garbage.

use std::collections::HashMap;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::ZlibDecoder;
use flate2::write::ZlibEncoder;

use crate::registry::{SessionRecord, UnixMillis};

const MAGIC: &[u8; 4] = b"SMCP";
/// Bump when the layout changes; readers refuse versions newer than they know, and keep
/// decoding every older one.
pub const VERSION: u8 = 1;
/// A decoded checkpoint may not be larger than this: a guard against a small crafted file that
/// decompresses to gigabytes. A million sessions take well under 100 MiB.
const MAX_BODY_BYTES: u64 = 512 << 20;

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

pub fn encode(checkpoint: &Checkpoint) -> Vec<u8> {
    let mut hosts: Vec<&str> = Vec::new();
    let mut host_index: HashMap<&str, u64> = HashMap::new();
    let mut users: Vec<(&str, &str)> = Vec::new();
    let mut user_index: HashMap<(&str, &str), u64> = HashMap::new();
    let mut sessions = Vec::with_capacity(checkpoint.sessions.len() * 48);
    for h in &checkpoint.hosts {
        host_index.entry(h).or_insert_with(|| {
            hosts.push(h);
            hosts.len() as u64 - 1
        });
    }
    for s in &checkpoint.sessions {
        let host = *host_index.entry(&s.host).or_insert_with(|| {
            hosts.push(&s.host);
            hosts.len() as u64 - 1
        });
        let user_key = (s.user_directory.as_str(), s.user_id.as_str());
        let user = *user_index.entry(user_key).or_insert_with(|| {
            users.push(user_key);
            users.len() as u64 - 1
        });
        sessions.push(u8::from(s.proxy_session_id.is_some()));
        if let Some(id) = &s.proxy_session_id {
            put_str(&mut sessions, id);
        }
        put_varint(&mut sessions, host);
        put_varint(&mut sessions, user);
        put_varint(
            &mut sessions,
            checkpoint.saved_at.0.saturating_sub(s.started.0),
        );
        put_varint(
            &mut sessions,
            checkpoint.saved_at.0.saturating_sub(s.last_seen.0),
        );
        put_varint(&mut sessions, u64::from(s.open_connections));
    }

    let mut body = Vec::with_capacity(sessions.len() + users.len() * 24 + 64);
    put_varint(&mut body, checkpoint.saved_at.0);
    put_varint(&mut body, hosts.len() as u64);
    for h in &hosts {
        put_str(&mut body, h);
    }
    put_varint(&mut body, users.len() as u64);
    for (directory, id) in &users {
        put_str(&mut body, directory);
        put_str(&mut body, id);
    }
    put_varint(&mut body, checkpoint.sessions.len() as u64);
    body.extend_from_slice(&sessions);

    let mut out = Vec::with_capacity(body.len() / 2 + 16);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    // Level 1: checkpoints are written every few seconds; speed matters more than the last few
    // percent of size, and ids dominate the size anyway.
    let mut z = ZlibEncoder::new(out, Compression::fast());
    z.write_all(&body).expect("writing to a Vec cannot fail");
    z.finish().expect("writing to a Vec cannot fail")
}

pub fn decode(bytes: &[u8]) -> Result<Checkpoint, DecodeError> {
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
    let users = (0..r.count()?)
        .map(|_| Ok((r.string()?, r.string()?)))
        .collect::<Result<Vec<_>, DecodeError>>()?;
    let count = r.count()?;
    let mut sessions = Vec::with_capacity(count);
    for _ in 0..count {
        let flags = r.byte()?;
        if flags > 1 {
            return Err(DecodeError::Corrupt(format!(
                "unknown session flags {flags:#x}"
            )));
        }
        let proxy_session_id = if flags & 1 == 1 {
            Some(r.string()?)
        } else {
            None
        };
        let host = hosts
            .get(r.varint()? as usize)
            .ok_or_else(|| corrupt("host index out of range"))?;
        let (directory, user_id) = users
            .get(r.varint()? as usize)
            .ok_or_else(|| corrupt("user index out of range"))?;
        let started = UnixMillis(saved_at.0.saturating_sub(r.varint()?));
        let last_seen = UnixMillis(saved_at.0.saturating_sub(r.varint()?));
        let open_connections =
            u32::try_from(r.varint()?).map_err(|_| corrupt("connection count out of range"))?;
        sessions.push(SessionRecord {
            proxy_session_id,
            host: host.clone(),
            user_directory: directory.clone(),
            user_id: user_id.clone(),
            started,
            last_seen,
            open_connections,
        });
    }
    if !r.buf.is_empty() {
        return Err(corrupt("trailing bytes after the last session"));
    }
    Ok(Checkpoint {
        saved_at,
        hosts,
        sessions,
    })
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
        assert_eq!(&bytes[..5], b"SMCP\x01");
        assert_eq!(decode(&bytes).unwrap(), c);
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
