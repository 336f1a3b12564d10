//! A child process of a test (the service, the operator): its output in a log file, killed when
//! its handle drops, and the end of its log printed when the test fails.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::poll::until;

/// How much of a log a failing test prints.
const LOG_TAIL_LINES: usize = 100;

/// A child that is killed (and reaped) when dropped: for a child whose pipes the caller reads
/// itself; [`Process`] is the rest (its output in a log).
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Process {
    /// What the log's heading calls it.
    name: String,
    child: KillOnDrop,
    log: Log,
}

/// A log file a process appends to (across restarts, for a test that restarts it).
#[derive(Clone, Debug)]
pub struct Log(pub PathBuf);

impl Log {
    pub fn text(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }

    /// The log's length in bytes now, for [`Log::since`].
    pub fn bytes(&self) -> u64 {
        std::fs::metadata(&self.0).map_or(0, |m| m.len())
    }

    /// The log written since it was `offset` bytes long (the process may be mid-line, even
    /// mid-character).
    pub fn since(&self, offset: u64) -> String {
        let mut bytes = Vec::new();
        if let Ok(mut file) = std::fs::File::open(&self.0)
            && file.seek(SeekFrom::Start(offset)).is_ok()
        {
            let _ = file.read_to_end(&mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl Process {
    /// Starts `command` with its stdout and stderr appended to `log`.
    pub fn spawn(name: &str, command: &mut Command, log: &Path) -> Process {
        let out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("the log {}: {e}", log.display()));
        let child = command
            .stdout(
                out.try_clone()
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| {
                let hint = match e.kind() {
                    std::io::ErrorKind::NotFound => {
                        " (is it installed? `.ci/run` installs what the tests need; README, Tests)"
                    }
                    _ => "",
                };
                panic!("starting {name}: {e}{hint}")
            });
        Process {
            name: name.to_owned(),
            child: KillOnDrop(child),
            log: Log(log.to_owned()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process; panics, with its log, if it has
    /// already exited.
    pub fn signal(&mut self, signal: i32) {
        // Reaped here if it has exited, so a pid the kernel may since have given to another
        // process is never signalled; while unreaped, the pid stays ours (even as a zombie).
        if let Some(status) = self.exited() {
            panic!(
                "{} exited with {status} before kill -{signal}:\n{}",
                self.name,
                self.log_text()
            );
        }
        let pid = self.pid();
        // SAFETY: kill(2) on the pid of our own child, which is not reaped (checked above).
        let result = unsafe { libc::kill(pid as libc::pid_t, signal) };
        assert_eq!(result, 0, "kill -{signal} {pid}");
    }

    /// The exit status if the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("waitpid on our own child")
    }

    /// Waits for the process to exit, at most `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let name = self.name.clone();
        until(&format!("{name} to exit"), within, || self.exited())
    }

    /// Panics with the log when the process has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.exited() {
            panic!("{} exited with {status}:\n{}", self.name, self.log_text());
        }
    }

    pub fn log(&self) -> &Log {
        &self.log
    }

    pub fn log_text(&self) -> String {
        self.log.text()
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = self.log_text();
            let tail: Vec<&str> = log.lines().rev().take(LOG_TAIL_LINES).collect();
            eprintln!("--- {}'s log (last {} lines) ---", self.name, tail.len());
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}
