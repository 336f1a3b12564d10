//! A configuration file → settings → the validated configuration, as the service does at
//! start (with the built-in defaults beneath the file, as the command line puts them). Any text
//! gets settings or an error; settings that validate survive a trip through TOML unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use session_monitor::config::{Config, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(settings) = Settings::from_toml(text) else {
        return;
    };
    let merged = Settings::default().or(settings.clone());
    let rendered = settings.to_toml();
    let again = Settings::from_toml(&rendered).expect("rendered settings parse");
    assert_eq!(
        again.to_toml(),
        rendered,
        "settings change on a trip through TOML"
    );
    let _ = Config::from_settings(merged, None);
});
