//! Logging set-up, one way for both binaries: a `tracing` filter and a format, on stderr.

use crate::LogFormat;

/// Installs the global subscriber. `quiet` lists crates that log nothing unless `level` names
/// them (the embedded broker logs every client connection, and spurious errors at shutdown).
///
/// Fails, naming `level`, if it is not a valid `tracing` filter.
pub fn init(level: &str, format: LogFormat, quiet: &[&str]) -> Result<(), String> {
    let filter = filter(level, quiet);
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| format!("invalid log level {level:?}: {e}"))?;
    // Colours only for a terminal: container logs and files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
    Ok(())
}

/// `level` with `quiet` crates switched off, unless `level` already says something of them.
fn filter(level: &str, quiet: &[&str]) -> String {
    let mut filter = level.to_owned();
    for name in quiet.iter().filter(|name| !level.contains(*name)) {
        filter.push_str(&format!(",{name}=off"));
    }
    filter
}

/// Whether `level` is a `tracing` filter, for validation before anything is started.
pub fn check_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::try_new(level)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_crates_are_off_unless_the_level_names_them() {
        assert_eq!(filter("info", &["rumqttd"]), "info,rumqttd=off");
        assert_eq!(
            filter("info,rumqttd=debug", &["rumqttd"]),
            "info,rumqttd=debug"
        );
        assert_eq!(filter("warn", &[]), "warn");
    }

    #[test]
    fn a_bad_level_names_itself() {
        assert!(check_level("info,kube=debug").is_ok());
        assert!(check_level("info,[").is_err());
    }
}
