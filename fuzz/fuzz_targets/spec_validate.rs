//! A SessionMonitor as the API server hands it to the operator (JSON) → validation → the
//! objects it renders. A spec is either refused with a reason, or renders without panicking
//! into a configuration that the service itself accepts.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_monitor::config::{Config, Settings};
use session_monitor_operator::crd::SessionMonitor;
use session_monitor_operator::{desired, validate};

fuzz_target!(|data: &[u8]| {
    let Ok(mut monitor) = serde_json::from_slice::<SessionMonitor>(data) else {
        return;
    };
    // What the API server guarantees of every object it returns.
    monitor
        .metadata
        .name
        .get_or_insert_with(|| "smon".to_owned());
    monitor
        .metadata
        .namespace
        .get_or_insert_with(|| "qlik".to_owned());
    monitor.metadata.uid = Some("9f1c3c55-5d8c-4a6e-9d3e-0f5b8f2f5a11".to_owned());
    let Ok(plan) = validate::validate(&monitor, "session-monitor:test") else {
        return;
    };
    let _ = desired::build(&plan, &Default::default());
    let mut settings = Settings::from_toml(&plan.config_toml())
        .unwrap_or_else(|e| panic!("the rendered configuration does not parse: {e}"));
    // Files the pod mounts from Secrets do not exist here: stand in for them as the pod has them.
    let mut password = None;
    if settings.mqtt_password_file.take().is_some() {
        settings
            .mqtt_username
            .get_or_insert_with(|| "from-secret".to_owned());
        password = Some("from-secret".to_owned());
    }
    if let Err(error) = Config::from_settings(settings, password) {
        panic!("a valid spec renders a configuration the service refuses: {error}");
    }
});
