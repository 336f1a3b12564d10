//! The ConfigMaps of a sharded checkpoint as the API server returns them (a JSON array, `NAME`
//! first, then any shards) → the manifest check → the assembly of the chunks → the decoder. What
//! anyone who may write ConfigMaps in the namespace could hand the service at start.
#![no_main]

use k8s_openapi::api::core::v1::ConfigMap;
use libfuzzer_sys::fuzz_target;
use session_monitor::checkpoint::codec;
use session_monitor::checkpoint::layout::{self, Assembly};
use session_monitor::config::MAX_CHECKPOINT_SHARDS;
use session_monitor_fuzz::{START, registry_restored};

const NAME: &str = "smon-checkpoint";

fuzz_target!(|data: &[u8]| {
    let Ok(objects) = serde_json::from_slice::<Vec<ConfigMap>>(data) else {
        return;
    };
    let Some((main, rest)) = objects.split_first() else {
        return;
    };
    let Ok(manifest) = layout::manifest_of(NAME, main) else {
        return;
    };
    if let Some(m) = &manifest {
        // Distinct names among NAME-1 … NAME-<MAX_CHECKPOINT_SHARDS>: never more than that many.
        assert!(m.shards.len() <= MAX_CHECKPOINT_SHARDS);
        assert!(
            m.shards.iter().all(|s| s.starts_with(NAME)),
            "a stranger's shard was accepted"
        );
    }
    let shards: Vec<Option<ConfigMap>> = manifest
        .iter()
        .flat_map(|m| &m.shards)
        .map(|name| {
            rest.iter()
                .find(|cm| cm.metadata.name.as_deref() == Some(name.as_str()))
                .cloned()
        })
        .collect();
    if let Ok(Assembly::Complete { bytes, manifest }) = layout::assemble(main, manifest, &shards) {
        assert_eq!(bytes.len(), manifest.bytes, "length unchecked");
        if let Ok(decoded) = codec::decode_segments(&bytes) {
            registry_restored(&decoded, START);
        }
    }
});
