fn main() -> std::process::ExitCode {
    session_monitor::cli::main()
}
