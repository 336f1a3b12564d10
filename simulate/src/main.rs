use std::process::ExitCode;

use clap::Parser;
use session_monitor_simulate::SimulateArgs;

fn main() -> ExitCode {
    let args = SimulateArgs::parse();
    match session_monitor_simulate::run(&args) {
        Ok(report) => {
            let secs = report.elapsed.as_secs_f64();
            println!(
                "sent {} datagrams in {:.2} s ({:.0}/s), {} malformed; start/stop/open/close: {:?}",
                report.sent,
                secs,
                report.sent as f64 / secs.max(1e-9),
                report.malformed,
                report.by_command
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("session-monitor-simulate: {error}");
            ExitCode::from(2)
        }
    }
}
