//! Reading a Prometheus text exposition the way the tests need it: one series' value.

/// The value of `series` (a name with its labels as exposed, e.g.
/// `session_monitor_checkpoint_writes_total{result="success"}`) in `exposition`.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}
