//! The binary's entry point: `session-monitor-operator [run flags]` or `… crdgen`.

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use session_monitor_config::{LogFormat, logging};

use crate::run::{self, Options};

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Reconciles SessionMonitor resources into running session-monitor services"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the SessionMonitor CustomResourceDefinition as YAML (the file in crds/)
    Crdgen,
    /// Print the RBAC rules the operator needs as YAML (the chart's files/operator-rules.yaml)
    RbacRules,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Image of the service for monitors that name none
    #[arg(long, env = "SESSION_MONITOR_OPERATOR_DEFAULT_IMAGE", default_value_t = run::default_image())]
    default_image: String,
    /// Namespaces to watch (comma-separated); default: all
    #[arg(
        long,
        env = "SESSION_MONITOR_OPERATOR_WATCH_NAMESPACES",
        value_delimiter = ','
    )]
    watch_namespaces: Vec<String>,
    /// Address of /metrics, /healthz and /readyz
    #[arg(
        long,
        env = "SESSION_MONITOR_OPERATOR_HTTP_LISTEN",
        default_value = "0.0.0.0:8080"
    )]
    http_listen: SocketAddr,
    /// Elect a leader on a Lease, so that only one of several replicas reconciles
    #[arg(long, env = "SESSION_MONITOR_OPERATOR_LEADER_ELECTION", default_value_t = true, action = clap::ArgAction::Set)]
    leader_election: bool,
    /// Name of the leader-election Lease
    #[arg(
        long,
        env = "SESSION_MONITOR_OPERATOR_LEASE_NAME",
        default_value = "session-monitor-operator"
    )]
    lease_name: String,
    /// Namespace of the Lease; default: the operator's own (POD_NAMESPACE), else `default`
    #[arg(long, env = "SESSION_MONITOR_OPERATOR_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// A `tracing` filter, e.g. `info` or `info,kube=debug`
    #[arg(
        long,
        env = "SESSION_MONITOR_OPERATOR_LOG_LEVEL",
        default_value = "info"
    )]
    log_level: String,
    /// `text` or `json`
    #[arg(
        long,
        env = "SESSION_MONITOR_OPERATOR_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Crdgen) => {
            print!("{}", crate::crdgen::yaml());
            return ExitCode::SUCCESS;
        }
        Some(Command::RbacRules) => {
            print!("{}", crate::crdgen::rbac_rules_yaml());
            return ExitCode::SUCCESS;
        }
        None => {}
    }
    let args = cli.run;
    if let Err(error) = logging::init(&args.log_level, args.log_format, &[]) {
        eprintln!("session-monitor-operator: --log-level: {error}");
        return ExitCode::from(2);
    }
    // One TLS provider for the whole process.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let options = Options {
        default_image: args.default_image,
        watch_namespaces: args.watch_namespaces,
        http_listen: args.http_listen,
        leader_election: args.leader_election,
        lease_name: args.lease_name,
        lease_namespace: args
            .lease_namespace
            .or_else(|| std::env::var("POD_NAMESPACE").ok())
            .unwrap_or_else(|| "default".to_owned()),
        identity: std::env::var("POD_NAME").unwrap_or_else(|_| {
            format!(
                "{}-{}",
                session_monitor_config::local_hostname(),
                std::process::id()
            )
        }),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run::run(options)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "operator stopped");
            eprintln!("session-monitor-operator: {e}");
            ExitCode::FAILURE
        }
    }
}
