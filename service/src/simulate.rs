//! Placeholder until the simulate module lands (being written on the `simulate` branch).
#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {}
pub struct SimulateReport {
    pub sent: u64,
    pub malformed: u64,
    pub by_command: [u64; 4],
    pub elapsed: std::time::Duration,
}
pub fn run(_args: &SimulateArgs) -> std::io::Result<SimulateReport> {
    Err(std::io::Error::other("not yet"))
}
