//! The command line: run the service.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use crate::config::{Config, Settings};

#[derive(Parser, Debug)]
#[command(
    name = "session-monitor",
    version,
    about = "Tracks active Qlik Sense users from the proxy's log4net UDP events and publishes them to MQTT, Prometheus and HTTP."
)]
struct Cli {
    /// TOML config file whose keys are the settings below (flags and env vars override it)
    #[arg(
        long,
        env = "SESSION_MONITOR_CONFIG",
        value_name = "PATH",
        global = false
    )]
    config: Option<PathBuf>,

    #[command(flatten)]
    settings: Settings,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    serve(cli.settings, cli.config)
}

fn serve(flags: Settings, config_file: Option<PathBuf>) -> ExitCode {
    let (settings, reload) = match config_file {
        Some(path) => match Settings::from_file(&path) {
            Ok(file) => {
                let started = flags.clone().or(file);
                let reload = crate::config::FileSource {
                    path,
                    flags,
                    started: started.clone(),
                };
                (started, Some(reload))
            }
            Err(error) => return fail(&error),
        },
        None => (flags, None),
    };
    let mut settings = settings;
    if let Ok(token) = std::env::var("SESSION_MONITOR_API_TOKEN") {
        settings.api_token = Some(crate::config::Secret(token));
    }
    if let Ok(passphrase) = std::env::var("SESSION_MONITOR_QLIK_CLIENT_KEY_PASSPHRASE") {
        settings.qlik_client_key_passphrase = Some(crate::config::Secret(passphrase));
    }
    let password = std::env::var("SESSION_MONITOR_MQTT_PASSWORD").ok();
    let config = match Config::from_settings(settings, password) {
        Ok(config) => Config { reload, ..config },
        Err(error) => return fail(&error),
    };
    // The embedded broker logs every client connection, and spurious errors at shutdown.
    if let Err(error) =
        crate::config::logging::init(&config.log_level, config.log_format, &["rumqttd"])
    {
        return fail(&error);
    }
    // One TLS provider for the whole process (rumqttc and, later, kube use rustls).
    let _ = rustls::crypto::ring::default_provider().install_default();

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("session-monitor")
        .build()
        .expect("building the tokio runtime");
    let sockets = match crate::service::Sockets::bind(&config) {
        Ok(sockets) => sockets,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            return fail(&error);
        }
    };
    match runtime.block_on(crate::service::run(
        config,
        sockets,
        crate::service::shutdown_signal(),
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "cannot start");
            fail(&error)
        }
    }
}

fn fail(error: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("session-monitor: {error}");
    ExitCode::from(2)
}
