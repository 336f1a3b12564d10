//! Reading a sharded checkpoint back out of its ConfigMaps, as pure functions: what the API
//! server hands us (and anyone who may write ConfigMaps in the namespace) is checked here, with
//! no API call in sight, so it can be unit-tested and fuzzed (`fuzz/`, target
//! `checkpoint_configmaps`).
//!
//! The layout itself is described in [`super::configmap`]: `NAME` holds chunk 0 and the manifest,
//! `NAME-1` … `NAME-<max>` the other chunks, each carrying the generation it was written for.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::ConfigMap;
use serde::{Deserialize, Serialize};
use session_monitor_config::MAX_CHECKPOINT_SHARDS;

pub const MANIFEST_ANNOTATION: &str = "sessionmonitor.io/checkpoint-manifest";
pub const GENERATION_ANNOTATION: &str = "sessionmonitor.io/checkpoint-generation";
pub(crate) const DATA_KEY: &str = "checkpoint";
/// Manifest layout version.
pub(crate) const MANIFEST_FORMAT: u32 = 1;

/// What `NAME`'s annotation says the checkpoint is made of.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub generation: u64,
    pub bytes: usize,
    pub crc32: u32,
    /// Shard ConfigMaps holding chunks 1.. in order (chunk 0 is in `NAME`).
    pub shards: Vec<String>,
}

/// The outcome of reading `NAME` and the shards its manifest names.
#[derive(Debug, PartialEq, Eq)]
pub enum Assembly {
    /// No checkpoint yet: no manifest and no data (the operator may create `NAME` empty).
    Empty,
    /// A shard belongs to another generation: a writer is between its shards and its commit.
    /// Read again.
    Mixed,
    /// Every chunk, in order, with length and CRC-32 as the manifest says.
    Complete { bytes: Vec<u8>, manifest: Manifest },
}

/// Why the ConfigMaps do not hold a checkpoint we can trust; `bytes` is what was read, kept so
/// that it can be set aside for a human.
#[derive(Debug, PartialEq, Eq)]
pub struct Corrupt {
    pub reason: String,
    pub bytes: Option<Vec<u8>>,
}

impl Corrupt {
    fn new(reason: impl Into<String>) -> Corrupt {
        Corrupt {
            reason: reason.into(),
            bytes: None,
        }
    }
}

/// The name of shard `index` (1-based) of the store `name`.
pub fn shard_name(name: &str, index: usize) -> String {
    format!("{name}-{index}")
}

/// Whether `candidate` is one of the shard names `NAME-1` … `NAME-<limit>`, spelled exactly as
/// [`shard_name`] spells it (no leading zeros or signs). Checked without building the set, whose
/// size a hostile manifest would choose.
fn is_shard_of(name: &str, limit: usize, candidate: &str) -> bool {
    let Some(index) = candidate
        .strip_prefix(name)
        .and_then(|rest| rest.strip_prefix('-'))
    else {
        return false;
    };
    let canonical =
        !index.is_empty() && !index.starts_with('0') && index.bytes().all(|b| b.is_ascii_digit());
    canonical
        && index
            .parse::<usize>()
            .is_ok_and(|i| (1..=limit).contains(&i))
}

/// The manifest on `NAME`, if any. Only shard names a store may have (`NAME-1` …
/// `NAME-<MAX_CHECKPOINT_SHARDS>`) are accepted, whatever the annotation says. The bound is not
/// this store's `checkpoint_configmap_shards`: writes alternate between low and high shard
/// numbers, so a store restarted with a lower count must still read the high ones it wrote.
pub fn manifest_of(name: &str, main: &ConfigMap) -> Result<Option<Manifest>, Corrupt> {
    let Some(text) = main
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(MANIFEST_ANNOTATION))
    else {
        return Ok(None);
    };
    let manifest: Manifest = serde_json::from_str(text)
        .map_err(|e| Corrupt::new(format!("manifest annotation: {e}")))?;
    if manifest.format > MANIFEST_FORMAT {
        return Err(Corrupt::new(format!(
            "manifest format {} is newer than this build",
            manifest.format
        )));
    }
    if let Some(stranger) = manifest
        .shards
        .iter()
        .find(|s| !is_shard_of(name, MAX_CHECKPOINT_SHARDS, s))
    {
        return Err(Corrupt::new(format!(
            "manifest names {stranger}, not one of this store's shards"
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(manifest.shards.len());
    if let Some(twice) = manifest.shards.iter().find(|s| !seen.insert(s.as_str())) {
        return Err(Corrupt::new(format!("manifest names {twice} twice")));
    }
    Ok(Some(manifest))
}

/// Joins chunk 0 from `main` and the chunks of `shards` (the manifest's shards, in its order;
/// `None` where a shard does not exist) and checks them against the manifest.
pub fn assemble(
    main: &ConfigMap,
    manifest: Option<Manifest>,
    shards: &[Option<ConfigMap>],
) -> Result<Assembly, Corrupt> {
    let Some(manifest) = manifest else {
        if chunk(main).is_some() {
            return Err(Corrupt::new("data without a manifest annotation"));
        }
        return Ok(Assembly::Empty);
    };
    if shards.len() != manifest.shards.len() {
        return Err(Corrupt::new(format!(
            "manifest names {} shards, {} were read",
            manifest.shards.len(),
            shards.len()
        )));
    }
    let first = chunk(main).ok_or_else(|| Corrupt::new("no checkpoint data"))?;
    // The manifest's length is only a claim: never reserve more than was actually read.
    let mut bytes = Vec::with_capacity(manifest.bytes.min(first.len() * (shards.len() + 1)));
    bytes.extend_from_slice(first);
    for (name, shard) in manifest.shards.iter().zip(shards) {
        let shard = shard
            .as_ref()
            .ok_or_else(|| Corrupt::new(format!("shard {name} is missing")))?;
        if generation_of(shard) != Some(manifest.generation) {
            return Ok(Assembly::Mixed);
        }
        bytes.extend_from_slice(
            chunk(shard).ok_or_else(|| Corrupt::new(format!("shard {name} has no data")))?,
        );
    }
    if bytes.len() != manifest.bytes || crc32fast::hash(&bytes) != manifest.crc32 {
        return Err(Corrupt {
            reason: "length or CRC-32 does not match the manifest".to_owned(),
            bytes: Some(bytes),
        });
    }
    Ok(Assembly::Complete { bytes, manifest })
}

pub(crate) fn chunk(cm: &ConfigMap) -> Option<&[u8]> {
    cm.binary_data
        .as_ref()?
        .get(DATA_KEY)
        .map(|b| b.0.as_slice())
}

fn generation_of(cm: &ConfigMap) -> Option<u64> {
    cm.metadata
        .annotations
        .as_ref()?
        .get(GENERATION_ANNOTATION)?
        .parse()
        .ok()
}

/// `NAME` or a shard as the store writes it: the chunk and the given annotations. Used by the
/// store and by tests and fuzz seeds that need ConfigMaps exactly as the store leaves them.
pub fn object(name: &str, annotations: BTreeMap<String, String>, data: &[u8]) -> ConfigMap {
    ConfigMap {
        metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
            name: Some(name.to_owned()),
            annotations: Some(annotations),
            ..Default::default()
        },
        binary_data: Some(BTreeMap::from([(
            DATA_KEY.to_owned(),
            ByteString(data.to_vec()),
        )])),
        ..ConfigMap::default()
    }
}

/// Shard ConfigMaps beside `NAME` that a checkpoint of `bytes` occupies.
pub fn shards_for(bytes: usize, shard_bytes: usize) -> usize {
    bytes.div_ceil(shard_bytes.max(1)).saturating_sub(1)
}

/// The `checkpoint_configmap_shards` that keeps checkpoints of about `bytes` writing: a write
/// goes to shards the committed checkpoint does not use, so both must fit at once, and the next
/// one may have grown; a quarter of growth is allowed for.
pub fn shards_wanted(bytes: usize, shard_bytes: usize) -> usize {
    shards_for(bytes, shard_bytes) + shards_for(bytes.saturating_add(bytes / 4), shard_bytes)
}

/// The ConfigMaps a committed checkpoint of `bytes` consists of, `NAME` first: what the store
/// writes, as pure data (for tests and fuzz seeds; the store itself writes them one by one).
pub fn layout(name: &str, generation: u64, bytes: &[u8], shard_bytes: usize) -> Vec<ConfigMap> {
    let chunks: Vec<&[u8]> = if bytes.is_empty() {
        vec![&[]]
    } else {
        bytes.chunks(shard_bytes.max(1)).collect()
    };
    let shards: Vec<String> = (1..chunks.len()).map(|i| shard_name(name, i)).collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        generation,
        bytes: bytes.len(),
        crc32: crc32fast::hash(bytes),
        shards: shards.clone(),
    };
    let mut objects = vec![object(
        name,
        BTreeMap::from([(
            MANIFEST_ANNOTATION.to_owned(),
            serde_json::to_string(&manifest).expect("manifest serializes"),
        )]),
        chunks[0],
    )];
    for (shard, chunk) in shards.iter().zip(&chunks[1..]) {
        objects.push(object(
            shard,
            BTreeMap::from([(GENERATION_ANNOTATION.to_owned(), generation.to_string())]),
            chunk,
        ));
    }
    objects
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_wanted_holds_the_committed_checkpoint_and_a_quarter_grown_one() {
        const S: usize = 100;
        assert_eq!(
            (shards_for(0, S), shards_for(100, S), shards_for(101, S)),
            (0, 0, 1)
        );
        assert_eq!(shards_for(350, S), 3);
        // 350 bytes: 3 shards now, and 437 bytes would take 4.
        assert_eq!(shards_wanted(350, S), 7);
        assert_eq!(shards_wanted(80, S), 0);
        // The store's own rule agrees: with `wanted` shards, a write of the grown size finds
        // enough free beside the committed one.
        for bytes in [0, 99, 150, 1_000, 12_345] {
            let wanted = shards_wanted(bytes, S);
            assert!(shards_for(bytes, S) + shards_for(bytes + bytes / 4, S) <= wanted);
        }
    }

    fn read(name: &str, objects: &[ConfigMap]) -> Result<Assembly, Corrupt> {
        let main = &objects[0];
        let manifest = manifest_of(name, main)?;
        let shards: Vec<Option<ConfigMap>> = manifest
            .iter()
            .flat_map(|m| &m.shards)
            .map(|s| {
                objects[1..]
                    .iter()
                    .find(|o| o.metadata.name.as_deref() == Some(s))
                    .cloned()
            })
            .collect();
        assemble(main, manifest, &shards)
    }

    #[test]
    fn a_layout_reads_back_whole() {
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let objects = layout("cp", 7, &bytes, 1000);
        assert_eq!(objects.len(), 10);
        match read("cp", &objects).unwrap() {
            Assembly::Complete {
                bytes: read,
                manifest,
            } => {
                assert_eq!(read, bytes);
                assert_eq!(manifest.generation, 7);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_shard_of_another_generation_is_mixed_not_corrupt() {
        let mut objects = layout("cp", 3, &[1u8; 3000], 1000);
        let newer = layout("cp", 4, &[2u8; 3000], 1000);
        objects[2] = newer[2].clone();
        assert_eq!(read("cp", &objects), Ok(Assembly::Mixed));
    }

    #[test]
    fn hostile_manifests_are_refused_by_name() {
        let objects = layout("cp", 1, &[1u8; 3000], 1000);
        let with_manifest = |text: &str| {
            let mut main = objects[0].clone();
            main.metadata
                .annotations
                .as_mut()
                .unwrap()
                .insert(MANIFEST_ANNOTATION.to_owned(), text.to_owned());
            main
        };
        let cases = [
            (
                r#"{"format":1,"generation":1,"bytes":3000,"crc32":0,"shards":["other-1"]}"#,
                "other-1",
            ),
            (
                r#"{"format":1,"generation":1,"bytes":3000,"crc32":0,"shards":["cp-01"]}"#,
                "cp-01",
            ),
            (
                r#"{"format":1,"generation":1,"bytes":3000,"crc32":0,"shards":["cp-+1"]}"#,
                "cp-+1",
            ),
            (
                r#"{"format":1,"generation":1,"bytes":3000,"crc32":0,"shards":["cp-0"]}"#,
                "cp-0",
            ),
            (
                r#"{"format":1,"generation":1,"bytes":3000,"crc32":0,"shards":["cp-1","cp-1"]}"#,
                "twice",
            ),
            (
                r#"{"format":9,"generation":1,"bytes":3000,"crc32":0,"shards":[]}"#,
                "newer",
            ),
            (r#"{"format":1"#, "manifest annotation"),
        ];
        for (text, expected) in cases {
            let error = manifest_of("cp", &with_manifest(text)).unwrap_err();
            assert!(error.reason.contains(expected), "{text}: {}", error.reason);
        }
    }

    #[test]
    fn a_lying_length_neither_allocates_it_nor_passes() {
        let objects = layout("cp", 1, b"abc", 1000);
        let mut manifest = manifest_of("cp", &objects[0]).unwrap().unwrap();
        manifest.bytes = usize::MAX;
        let error = assemble(&objects[0], Some(manifest), &[]).unwrap_err();
        assert_eq!(error.bytes.as_deref(), Some(&b"abc"[..]));
    }

    #[test]
    fn missing_shards_and_stray_data_are_named() {
        let objects = layout("cp", 1, &[1u8; 2500], 1000);
        let manifest = manifest_of("cp", &objects[0]).unwrap();
        let error = assemble(&objects[0], manifest, &[Some(objects[1].clone()), None]).unwrap_err();
        assert!(
            error.reason.contains("shard cp-2 is missing"),
            "{}",
            error.reason
        );
        let stray = object("cp", BTreeMap::new(), b"x");
        let error = assemble(&stray, None, &[]).unwrap_err();
        assert!(error.reason.contains("without a manifest"));
        assert_eq!(
            assemble(&ConfigMap::default(), None, &[]),
            Ok(Assembly::Empty)
        );
    }
}
