//! Datagram → [`ProxyEvent`]: the pure parser of the Qlik Sense proxy's log4net UDP events.
//!
//! Owns the wire formats (Butler, Butler SOS and our own `/session-monitor/`) and every
//! per-datagram hardening step except the source allowlist, which needs the peer address and so
//! lives in the socket loop. No IO, no clock, no allocation unless the datagram needs cleaning:
//! the common case borrows straight from the receive buffer.

use std::borrow::Cow;

/// log4net renders a property that was never set as this literal.
const LOG4NET_NULL: &str = "(null)";

/// Which appender configuration produced a datagram; decides the field layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Format {
    /// `/proxy-session/` and `/proxy-connection/` (Butler 5.0–6.1).
    Butler,
    /// `/qseow-proxy-session/` and `/qseow-proxy-connection/` (Butler SOS).
    ButlerSos,
    /// `/session-monitor/`: Butler's fields plus the proxy session id.
    SessionMonitor,
}

impl Format {
    pub const ALL: [Format; 3] = [Format::Butler, Format::ButlerSos, Format::SessionMonitor];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Butler => "butler",
            Format::ButlerSos => "butler_sos",
            Format::SessionMonitor => "session_monitor",
        }
    }

    /// Field 0 of every layout we accept, matched case-insensitively.
    fn from_prefix(prefix: &str) -> Option<Format> {
        const PREFIXES: [(&str, Format); 5] = [
            ("/proxy-session/", Format::Butler),
            ("/proxy-connection/", Format::Butler),
            ("/qseow-proxy-session/", Format::ButlerSos),
            ("/qseow-proxy-connection/", Format::ButlerSos),
            ("/session-monitor/", Format::SessionMonitor),
        ];
        PREFIXES
            .iter()
            .find(|(p, _)| p.eq_ignore_ascii_case(prefix))
            .map(|&(_, f)| f)
    }

    /// Fields before the free-text message; the message is everything after the last of them.
    fn fields_before_message(self) -> usize {
        match self {
            Format::Butler | Format::ButlerSos => 7,
            Format::SessionMonitor => 8,
        }
    }
}

/// The proxy's `%property{Command}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Command {
    StartSession,
    StopSession,
    OpenConnection,
    CloseConnection,
}

impl Command {
    pub const ALL: [Command; 4] = [
        Command::StartSession,
        Command::StopSession,
        Command::OpenConnection,
        Command::CloseConnection,
    ];

    /// Metric label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Command::StartSession => "start_session",
            Command::StopSession => "stop_session",
            Command::OpenConnection => "open_connection",
            Command::CloseConnection => "close_connection",
        }
    }

    /// The text the proxy writes.
    pub fn wire_name(self) -> &'static str {
        match self {
            Command::StartSession => "Start session",
            Command::StopSession => "Stop session",
            Command::OpenConnection => "Open connection",
            Command::CloseConnection => "Close connection",
        }
    }

    fn parse(field: &str) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|c| c.wire_name().eq_ignore_ascii_case(field))
    }
}

/// One proxy event, borrowing from the (cleaned) datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEvent<'a> {
    pub format: Format,
    pub host: &'a str,
    pub command: Command,
    pub user_directory: &'a str,
    pub user_id: &'a str,
    pub origin: Option<&'a str>,
    pub context: Option<&'a str>,
    /// Only our own format carries it; `None` means "key the session by (host, user)".
    pub proxy_session_id: Option<&'a str>,
    pub message: &'a str,
}

/// Why a datagram was dropped. Each variant is a metric label value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reject {
    /// Not from an allowed source network (decided by the socket loop, listed here so that all
    /// drop reasons share one metric label set).
    SourceNotAllowed,
    TooLarge,
    Empty,
    UnknownPrefix,
    TooFewFields,
    UnknownCommand,
    MissingHost,
    MissingUser,
    FieldTooLong,
    /// A new proxy host beyond `max_proxy_hosts` (decided by the registry).
    TooManyHosts,
    /// A proxy session id that another user holds (decided by the registry).
    SessionOfAnotherUser,
    /// A new session beyond `max_sessions` (decided by the registry).
    TooManySessions,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::SourceNotAllowed,
        Reject::TooLarge,
        Reject::Empty,
        Reject::UnknownPrefix,
        Reject::TooFewFields,
        Reject::UnknownCommand,
        Reject::MissingHost,
        Reject::MissingUser,
        Reject::FieldTooLong,
        Reject::TooManyHosts,
        Reject::SessionOfAnotherUser,
        Reject::TooManySessions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::SourceNotAllowed => "source_not_allowed",
            Reject::TooLarge => "too_large",
            Reject::Empty => "empty",
            Reject::UnknownPrefix => "unknown_prefix",
            Reject::TooFewFields => "too_few_fields",
            Reject::UnknownCommand => "unknown_command",
            Reject::MissingHost => "missing_host",
            Reject::MissingUser => "missing_user",
            Reject::FieldTooLong => "field_too_long",
            Reject::TooManyHosts => "too_many_hosts",
            Reject::SessionOfAnotherUser => "session_of_another_user",
            Reject::TooManySessions => "too_many_sessions",
        }
    }
}

pub use session_monitor_config::Limits;

/// Lossy UTF-8 decode, control characters removed, surrounding whitespace trimmed.
///
/// Borrows when the datagram is already clean, which is every datagram a real proxy sends.
pub fn clean(datagram: &[u8]) -> Cow<'_, str> {
    let text = String::from_utf8_lossy(datagram);
    let text = if text.chars().any(char::is_control) {
        Cow::Owned(text.chars().filter(|c| !c.is_control()).collect())
    } else {
        text
    };
    match text {
        Cow::Borrowed(s) => Cow::Borrowed(s.trim()),
        Cow::Owned(s) if s.trim().len() == s.len() => Cow::Owned(s),
        Cow::Owned(s) => Cow::Owned(s.trim().to_owned()),
    }
}

/// The size cap and [`clean`], in the order the socket loop applies them.
pub fn clean_datagram<'a>(datagram: &'a [u8], limits: &Limits) -> Result<Cow<'a, str>, Reject> {
    if datagram.len() > limits.max_datagram_bytes {
        return Err(Reject::TooLarge);
    }
    Ok(clean(datagram))
}

/// Parses one datagram that has been through [`clean`].
pub fn parse<'a>(text: &'a str, limits: &Limits) -> Result<ProxyEvent<'a>, Reject> {
    if text.is_empty() {
        return Err(Reject::Empty);
    }
    let (prefix, rest) = text.split_once(';').unwrap_or((text, ""));
    let format = Format::from_prefix(prefix.trim()).ok_or(Reject::UnknownPrefix)?;

    // Fields 1.. up to the message; the message keeps any further ';'.
    let mut fields = rest.splitn(format.fields_before_message(), ';');
    let mut next = || fields.next().ok_or(Reject::TooFewFields);
    let host = next()?;
    let command = next()?;
    let user_directory = next()?;
    let user_id = next()?;
    let origin = next()?;
    let context = next()?;
    let proxy_session_id = match format {
        Format::SessionMonitor => Some(next()?),
        Format::Butler | Format::ButlerSos => None,
    };
    let message = next()?;

    let command = Command::parse(command.trim()).ok_or(Reject::UnknownCommand)?;
    let identity = |field: &'a str, missing: Reject| -> Result<&'a str, Reject> {
        let value = present(field).ok_or(missing)?;
        if value.len() > limits.max_field_bytes {
            return Err(Reject::FieldTooLong);
        }
        Ok(value)
    };
    let host = identity(host, Reject::MissingHost)?;
    let user_directory = identity(user_directory, Reject::MissingUser)?;
    let user_id = identity(user_id, Reject::MissingUser)?;
    let proxy_session_id = match proxy_session_id.and_then(present) {
        Some(id) if id.len() > limits.max_field_bytes => return Err(Reject::FieldTooLong),
        other => other,
    };
    let informational = |field: &'a str| truncate(field, limits.max_field_bytes);

    Ok(ProxyEvent {
        format,
        host,
        command,
        user_directory,
        user_id,
        origin: present(origin).map(informational),
        context: present(context).map(informational),
        proxy_session_id,
        message: informational(message.trim()),
    })
}

/// A field's value, or `None` when log4net left it empty or rendered `(null)`.
fn present(field: &str) -> Option<&str> {
    let field = field.trim();
    (!field.is_empty() && field != LOG4NET_NULL).then_some(field)
}

fn truncate(field: &str, max_bytes: usize) -> &str {
    if field.len() <= max_bytes {
        return field;
    }
    let mut end = max_bytes;
    while !field.is_char_boundary(end) {
        end -= 1;
    }
    &field[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parse_bytes(datagram: &[u8]) -> Result<ProxyEvent<'static>, Reject> {
        let text: &'static str = Box::leak(clean(datagram).into_owned().into_boxed_str());
        parse(text, &Limits::default())
    }

    #[test]
    fn butler_session_start() {
        let e = parse_bytes(
            b"/proxy-session/;QSPROXY1;Start session;LAB;joe;AppAccess;/hub/;Start session for user: 'LAB\\joe'",
        )
        .unwrap();
        assert_eq!(
            e,
            ProxyEvent {
                format: Format::Butler,
                host: "QSPROXY1",
                command: Command::StartSession,
                user_directory: "LAB",
                user_id: "joe",
                origin: Some("AppAccess"),
                context: Some("/hub/"),
                proxy_session_id: None,
                message: "Start session for user: 'LAB\\joe'",
            }
        );
    }

    #[test]
    fn butler_connection_and_butler_sos_prefixes() {
        let e = parse_bytes(b"/proxy-connection/;h;Open connection;D;u;AppAccess;/app/1?x=y;connection Opened for session").unwrap();
        assert_eq!(
            (e.format, e.command),
            (Format::Butler, Command::OpenConnection)
        );
        let e = parse_bytes(
            b"/qseow-proxy-session/;h;Stop session;D;u;AppAccess;/hub/;Stop session for user",
        )
        .unwrap();
        assert_eq!(
            (e.format, e.command),
            (Format::ButlerSos, Command::StopSession)
        );
        let e = parse_bytes(b"/qseow-proxy-connection/;h;Close connection;D;u;o;c;m").unwrap();
        assert_eq!(
            (e.format, e.command),
            (Format::ButlerSos, Command::CloseConnection)
        );
    }

    #[test]
    fn own_format_carries_the_session_id() {
        let e = parse_bytes(b"/session-monitor/;h;Start session;D;u;AppAccess;/hub/;4b0a7e2c-1f;Start session for user").unwrap();
        assert_eq!(e.format, Format::SessionMonitor);
        assert_eq!(e.proxy_session_id, Some("4b0a7e2c-1f"));
        assert_eq!(e.message, "Start session for user");
    }

    #[test]
    fn own_format_with_null_session_id_falls_back_to_none() {
        let e = parse_bytes(b"/session-monitor/;h;Start session;D;u;o;c;(null);m").unwrap();
        assert_eq!(e.proxy_session_id, None);
    }

    #[test]
    fn prefix_and_command_are_case_insensitive() {
        let e = parse_bytes(b"/PROXY-SESSION/;h;START SESSION;D;u;o;c;m").unwrap();
        assert_eq!(
            (e.format, e.command),
            (Format::Butler, Command::StartSession)
        );
    }

    #[test]
    fn semicolons_and_quotes_stay_in_the_message() {
        let e = parse_bytes(b"/proxy-session/;h;Start session;D;u;o;c;a;b;\"c\";'d'").unwrap();
        assert_eq!(e.message, "a;b;\"c\";'d'");
    }

    #[test]
    fn null_properties_are_absent() {
        let e = parse_bytes(b"/proxy-session/;h;Start session;D;u;(null);(null);m").unwrap();
        assert_eq!((e.origin, e.context), (None, None));
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;(null);o;c;m"),
            Err(Reject::MissingUser)
        );
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;(null);u;o;c;m"),
            Err(Reject::MissingUser)
        );
        assert_eq!(
            parse_bytes(b"/proxy-session/;(null);Start session;D;u;o;c;m"),
            Err(Reject::MissingHost)
        );
    }

    #[test]
    fn empty_user_is_rejected() {
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;;o;c;m"),
            Err(Reject::MissingUser)
        );
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;   ;o;c;m"),
            Err(Reject::MissingUser)
        );
    }

    #[test]
    fn too_few_fields() {
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;u;o;c"),
            Err(Reject::TooFewFields)
        );
        assert_eq!(parse_bytes(b"/proxy-session/"), Err(Reject::TooFewFields));
        // Our format needs the session id field as well.
        assert_eq!(
            parse_bytes(b"/session-monitor/;h;Start session;D;u;o;c;id"),
            Err(Reject::TooFewFields)
        );
    }

    #[test]
    fn unknown_prefix_and_command() {
        assert_eq!(
            parse_bytes(b"/proxy-audit/;h;Start session;D;u;o;c;m"),
            Err(Reject::UnknownPrefix)
        );
        assert_eq!(parse_bytes(b"hello world"), Err(Reject::UnknownPrefix));
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Reload app;D;u;o;c;m"),
            Err(Reject::UnknownCommand)
        );
    }

    #[test]
    fn empty_and_whitespace_datagrams() {
        assert_eq!(parse_bytes(b""), Err(Reject::Empty));
        assert_eq!(parse_bytes(b" \r\n\t"), Err(Reject::Empty));
    }

    #[test]
    fn invalid_utf8_is_decoded_lossily() {
        let e = parse_bytes(b"/proxy-session/;h;Start session;D;j\xffoe;o;c;m\xfe").unwrap();
        assert_eq!(e.user_id, "j\u{FFFD}oe");
        assert_eq!(e.message, "m\u{FFFD}");
        // Broken bytes in the prefix make it unknown rather than crashing anything.
        assert_eq!(
            parse_bytes(b"/proxy-se\xffssion/;h;Start session;D;u;o;c;m"),
            Err(Reject::UnknownPrefix)
        );
    }

    #[test]
    fn control_characters_and_trailing_newlines_are_stripped() {
        let e = parse_bytes(b"/proxy-session/;QS\x00PROXY;Start session;D;j\x1boe;o;c;msg\r\n")
            .unwrap();
        assert_eq!(e.host, "QSPROXY");
        assert_eq!(e.user_id, "joe");
        assert_eq!(e.message, "msg");
    }

    #[test]
    fn identity_fields_over_the_cap_are_rejected_others_truncated() {
        let limits = Limits {
            max_datagram_bytes: 8192,
            max_field_bytes: 8,
        };
        assert_eq!(
            parse("/proxy-session/;h;Start session;D;abcdefghi;o;c;m", &limits),
            Err(Reject::FieldTooLong)
        );
        assert_eq!(
            parse(
                "/session-monitor/;h;Start session;D;u;o;c;0123456789;m",
                &limits
            ),
            Err(Reject::FieldTooLong)
        );
        let e = parse(
            "/proxy-session/;h;Start session;D;u;o;/app/0123456789;ééééé",
            &limits,
        )
        .unwrap();
        assert_eq!(e.context, Some("/app/012"));
        assert_eq!(e.message, "éééé");
    }

    #[test]
    fn fields_are_trimmed() {
        let e = parse_bytes(b"/proxy-session/; h ; Start session ; D ; joe ;o;c;m").unwrap();
        assert_eq!((e.host, e.user_directory, e.user_id), ("h", "D", "joe"));
    }

    #[test]
    fn oversize_datagrams_are_rejected_before_decoding() {
        let limits = Limits {
            max_datagram_bytes: 16,
            max_field_bytes: 512,
        };
        assert_eq!(clean_datagram(&[b'x'; 17], &limits), Err(Reject::TooLarge));
        assert_eq!(
            clean_datagram(&[b'x'; 16], &limits).unwrap(),
            "x".repeat(16)
        );
    }

    #[test]
    fn clean_borrows_clean_input() {
        assert!(matches!(clean(b"/proxy-session/;h"), Cow::Borrowed(_)));
    }

    proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let text = clean(&bytes);
            let _ = parse(&text, &Limits { max_datagram_bytes: 8192, max_field_bytes: 16 });
        }

        #[test]
        fn accepted_events_have_clean_non_empty_identity(
            host in "[^;]{0,20}", dir in "[^;]{0,10}", user in "[^;]{0,20}",
            sid in "[^;]{0,40}", msg in ".{0,40}",
        ) {
            let datagram = format!("/session-monitor/;{host};Open connection;{dir};{user};o;c;{sid};{msg}");
            let text = clean(datagram.as_bytes());
            if let Ok(e) = parse(&text, &Limits::default()) {
                for field in [e.host, e.user_directory, e.user_id] {
                    prop_assert!(!field.is_empty());
                    prop_assert!(field != LOG4NET_NULL);
                    prop_assert!(!field.chars().any(char::is_control));
                    prop_assert_eq!(field.trim(), field);
                }
            }
        }

        #[test]
        fn well_formed_butler_events_round_trip(
            host in "[A-Za-z0-9.-]{1,30}", dir in "[A-Za-z0-9_]{1,12}", user in "[A-Za-z0-9_.@]{1,30}",
            msg in "[ -~]{0,80}",
        ) {
            let datagram = format!("/qseow-proxy-connection/;{host};Close connection;{dir};{user};AppAccess;/hub/;{msg}");
            let text = clean(datagram.as_bytes());
            let e = parse(&text, &Limits::default()).unwrap();
            prop_assert_eq!(e.host, host.as_str());
            prop_assert_eq!(e.user_directory, dir.as_str());
            prop_assert_eq!(e.user_id, user.as_str());
            prop_assert_eq!(e.message, msg.trim());
        }
    }
}
