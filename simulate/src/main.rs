use std::process::ExitCode;

use clap::Parser;
use session_monitor_simulate::SimulateArgs;

fn main() -> ExitCode {
    let args = SimulateArgs::parse();
    let started = |site: Option<&session_monitor_simulate::qlik::SimulatedSite>| {
        if let Some(site) = site {
            println!(
                "serving a fake Qlik Sense site; start the service with:\n  session-monitor {}",
                site.service_flags().join(" ")
            );
        }
    };
    match session_monitor_simulate::run(&args, started) {
        Ok(report) => {
            let secs = report.elapsed.as_secs_f64();
            println!(
                "sent {} datagrams in {:.2} s ({:.0}/s), {} malformed, {} stops lost; start/stop/open/close: {:?}; {} users active at the end",
                report.sent,
                secs,
                report.sent as f64 / secs.max(1e-9),
                report.malformed,
                report.lost_stops,
                report.by_command,
                report.active_users
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("session-monitor-simulate: {error}");
            ExitCode::from(2)
        }
    }
}
