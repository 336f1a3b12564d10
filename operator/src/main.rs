fn main() -> std::process::ExitCode {
    session_monitor_operator::cli::main()
}
