//! The one renderer of the proxy's UDP datagrams outside the service's parser: the simulator,
//! the end-to-end tests and the benchmarks all write their datagrams here, so the wire format
//! is written once (and read once, by `session_monitor::parser`).
//!
//! The layout is the log4net pattern of the appender configurations (`qlik/`, README):
//! `<prefix>;<host>;<Command>;<UserDirectory>;<UserId>;<Origin>;<Context>;[<ProxySessionId>;]<message>`.

use std::fmt;
use std::io::Write as _;

use session_monitor::parser::{Command, Format};

/// One datagram's fields. [`Datagram::event`] fills them as a proxy does; a malformed datagram
/// (the simulator's) replaces some of the strings.
#[derive(Clone, Copy)]
pub struct Datagram<'a> {
    pub prefix: &'a str,
    pub host: &'a str,
    pub command: &'a str,
    pub directory: &'a str,
    pub user_id: &'a str,
    /// `/hub/`, `/app/<GUID>…`; URL-encoded by the proxy, so never a `;`.
    pub context: &'a dyn fmt::Display,
    /// The proxy session id, which the message of a connection event names, and our own
    /// format also carries as a field.
    pub session: &'a dyn fmt::Display,
    /// Whether the session id is a field (our own format only).
    pub session_field: bool,
    /// The message the proxy logs for this command.
    pub message: Command,
    /// Half of Qlik's connection messages name the browser: `;` and quotes the receiver keeps.
    pub user_agent: Option<&'a str>,
}

impl<'a> Datagram<'a> {
    /// A well-formed event as a proxy with `format`'s appender sends it.
    pub fn event(
        format: Format,
        host: &'a str,
        command: Command,
        directory: &'a str,
        user_id: &'a str,
        context: &'a dyn fmt::Display,
        session: &'a dyn fmt::Display,
    ) -> Datagram<'a> {
        Datagram {
            prefix: format.wire_prefix(command),
            host,
            command: command.wire_name(),
            directory,
            user_id,
            context,
            session,
            session_field: format == Format::SessionMonitor,
            message: command,
            user_agent: None,
        }
    }

    /// Appends the datagram to `out` (no allocation: the simulator renders millions).
    pub fn write_into(&self, out: &mut Vec<u8>) {
        // Writing into a Vec cannot fail, so the io::Results below are ignored.
        let _ = write!(
            out,
            "{};{};{};{};{};AppAccess;{};",
            self.prefix, self.host, self.command, self.directory, self.user_id, self.context
        );
        if self.session_field {
            let _ = write!(out, "{};", self.session);
        }
        let (directory, user_id, session) = (self.directory, self.user_id, self.session);
        let _ = match self.message {
            Command::StartSession => {
                write!(out, "Start session for user: '{directory}\\{user_id}'")
            }
            Command::StopSession => write!(out, "Stop session for user: '{directory}\\{user_id}'"),
            Command::OpenConnection => write!(out, "connection Opened for session {session}"),
            Command::CloseConnection => write!(out, "connection Closed for session {session}"),
        };
        if let Some(agent) = self.user_agent {
            let _ = write!(out, "; UserAgent: '{agent}'");
        }
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        self.write_into(&mut out);
        String::from_utf8(out).expect("the fields are text")
    }
}

/// The command whose text the proxy writes as `name` (e.g. `Start session`).
pub fn command(name: &str) -> Command {
    Command::ALL
        .into_iter()
        .find(|c| c.wire_name() == name)
        .unwrap_or_else(|| panic!("{name:?} is not a proxy command"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use session_monitor::parser::{Limits, parse};

    #[test]
    fn what_is_rendered_parses_back_in_every_format() {
        for format in Format::ALL {
            for command in Command::ALL {
                let text = Datagram::event(
                    format,
                    "qs1",
                    command,
                    "LAB",
                    "anna.berg",
                    &"/hub/",
                    &"0c7b9a2e-0000-4000-8000-000000000001",
                )
                .render();
                let event =
                    parse(&text, &Limits::default()).unwrap_or_else(|e| panic!("{text}: {e:?}"));
                assert_eq!((event.format, event.command), (format, command), "{text}");
                assert_eq!((event.host, event.user_id), ("qs1", "anna.berg"), "{text}");
            }
        }
    }
}
