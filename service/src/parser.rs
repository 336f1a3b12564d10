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

    /// The prefix an appender of this format writes for `command`: Butler's layouts name the
    /// event's kind, ours does not.
    pub fn wire_prefix(self, command: Command) -> &'static str {
        let session = matches!(command, Command::StartSession | Command::StopSession);
        match (self, session) {
            (Format::SessionMonitor, _) => "/session-monitor/",
            (Format::Butler, true) => "/proxy-session/",
            (Format::Butler, false) => "/proxy-connection/",
            (Format::ButlerSos, true) => "/qseow-proxy-session/",
            (Format::ButlerSos, false) => "/qseow-proxy-connection/",
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

    /// The text the proxy's message for this command begins with (the appenders' filters).
    pub fn message_text(self) -> &'static str {
        match self {
            Command::StartSession => "Start session for user",
            Command::StopSession => "Stop session for user",
            Command::OpenConnection => "connection Opened for session",
            Command::CloseConnection => "connection Closed for session",
        }
    }

    fn parse(field: &str) -> Option<Command> {
        Command::ALL
            .into_iter()
            .find(|c| c.wire_name().eq_ignore_ascii_case(field))
    }
}

/// One proxy event, borrowing from the (decoded) datagram.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyEvent<'a> {
    pub format: Format,
    pub host: &'a str,
    pub command: Command,
    pub user_directory: &'a str,
    pub user_id: &'a str,
    pub origin: Option<&'a str>,
    pub context: Option<&'a str>,
    /// Only our own format carries it; `None` means "key the session by (host, user)". The proxy
    /// logs `0` for an internal command and log4net `(null)` for an unset property: both `None`.
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
    /// Not valid text in the configured encoding (nor UTF-16LE, which is recognised by itself).
    InvalidEncoding,
    Empty,
    UnknownPrefix,
    TooFewFields,
    UnknownCommand,
    /// More `;` than the layout has, and no message that begins with the command's text to tell
    /// where the fields end.
    UnknownMessage,
    /// A `;` inside a value (log4net escapes nothing) leaves more than one reading of the fields
    /// that fits the message, or none: which user it is cannot be told.
    AmbiguousFields,
    MissingHost,
    MissingUser,
    /// A directory or user id with `?` or U+FFFD: the sender's code page could not write the
    /// name, so distinct users would be counted as one.
    ReplacedCharacters,
    FieldTooLong,
    /// A new proxy host beyond `max_proxy_hosts` (decided by the registry).
    TooManyHosts,
    /// A proxy session id that another user holds (decided by the registry).
    SessionOfAnotherUser,
    /// A new session beyond `max_sessions` (decided by the registry).
    TooManySessions,
}

impl Reject {
    pub const ALL: [Reject; 16] = [
        Reject::SourceNotAllowed,
        Reject::TooLarge,
        Reject::InvalidEncoding,
        Reject::Empty,
        Reject::UnknownPrefix,
        Reject::TooFewFields,
        Reject::UnknownCommand,
        Reject::UnknownMessage,
        Reject::AmbiguousFields,
        Reject::MissingHost,
        Reject::MissingUser,
        Reject::ReplacedCharacters,
        Reject::FieldTooLong,
        Reject::TooManyHosts,
        Reject::SessionOfAnotherUser,
        Reject::TooManySessions,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reject::SourceNotAllowed => "source_not_allowed",
            Reject::TooLarge => "too_large",
            Reject::InvalidEncoding => "invalid_encoding",
            Reject::Empty => "empty",
            Reject::UnknownPrefix => "unknown_prefix",
            Reject::TooFewFields => "too_few_fields",
            Reject::UnknownCommand => "unknown_command",
            Reject::UnknownMessage => "unknown_message",
            Reject::AmbiguousFields => "ambiguous_fields",
            Reject::MissingHost => "missing_host",
            Reject::MissingUser => "missing_user",
            Reject::ReplacedCharacters => "replaced_characters",
            Reject::FieldTooLong => "field_too_long",
            Reject::TooManyHosts => "too_many_hosts",
            Reject::SessionOfAnotherUser => "session_of_another_user",
            Reject::TooManySessions => "too_many_sessions",
        }
    }
}

pub use session_monitor_config::Limits;

/// The text encoding the proxy's appender writes (its `encoding` parameter).
pub type Encoding = &'static encoding_rs::Encoding;

/// What the appender in `qlik/LocalLogConfig.xml` sends, and the default.
pub const UTF_8: Encoding = encoding_rs::UTF_8;

/// Bytes → text: the appender's encoding decoded strictly, control characters removed, surrounding
/// whitespace trimmed.
///
/// UTF-16LE is recognised by itself, whatever is configured: every datagram begins with `/`, which
/// UTF-16LE writes as `/` and NUL, and no other encoding a proxy may use has a NUL there. A
/// datagram that is not valid in its encoding is refused, never decoded with U+FFFD: two names
/// that differ only where the bytes were broken would become one user. Borrows when the datagram
/// is UTF-8 and clean, which is every datagram a well-configured proxy sends.
pub fn decode(datagram: &[u8], encoding: Encoding) -> Result<Cow<'_, str>, Reject> {
    let text: Cow<'_, str> = if let Some(utf16) = utf16le(datagram) {
        Cow::Owned(
            encoding_rs::UTF_16LE
                .decode_without_bom_handling_and_without_replacement(utf16)
                .ok_or(Reject::InvalidEncoding)?
                .into_owned(),
        )
    } else if encoding == encoding_rs::UTF_8 {
        let bytes = datagram.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(datagram);
        Cow::Borrowed(std::str::from_utf8(bytes).map_err(|_| Reject::InvalidEncoding)?)
    } else {
        encoding
            .decode_without_bom_handling_and_without_replacement(datagram)
            .ok_or(Reject::InvalidEncoding)?
    };
    Ok(strip_controls(text))
}

/// The datagram without its byte order mark if it is UTF-16LE text.
fn utf16le(datagram: &[u8]) -> Option<&[u8]> {
    let body = datagram.strip_prefix(b"\xFF\xFE").unwrap_or(datagram);
    body.starts_with(b"/\0").then_some(body)
}

/// Lossy UTF-8 decode, control characters removed, surrounding whitespace trimmed: for tools
/// that show a datagram (logs, samples), never for counting.
pub fn clean(datagram: &[u8]) -> Cow<'_, str> {
    strip_controls(String::from_utf8_lossy(datagram))
}

fn strip_controls(text: Cow<'_, str>) -> Cow<'_, str> {
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

/// The size cap and [`decode`], in the order the socket loop applies them.
pub fn decode_datagram<'a>(
    datagram: &'a [u8],
    limits: &Limits,
    encoding: Encoding,
) -> Result<Cow<'a, str>, Reject> {
    if datagram.len() > limits.max_datagram_bytes {
        return Err(Reject::TooLarge);
    }
    decode(datagram, encoding)
}

/// The most `;` beyond the layout's that values may hold between them: bounds the readings tried
/// (at most C(12, 4) = 495, and only for a datagram that has them).
const MAX_EXTRA_SEMICOLONS: usize = 8;

/// Parses one datagram that has been through [`decode`].
///
/// log4net escapes nothing, so a `;` inside a value adds a field. The parse is anchored at both
/// ends: the prefix, host and command on the left (none of them can hold a `;`), and on the right
/// a message that begins with the command's text. Between them lie the directory, the user id,
/// the origin, the context and (our format) the session id. With exactly as many `;` as the
/// layout has, there is one reading. With more, every way of cutting the values apart is tried
/// against what the message names (`'DIR\user'` for a session, the session id for a connection)
/// and the one reading that fits is taken; where several fit or none does, the datagram is
/// dropped as [`Reject::AmbiguousFields`] rather than counted as somebody else.
pub fn parse<'a>(text: &'a str, limits: &Limits) -> Result<ProxyEvent<'a>, Reject> {
    if text.is_empty() {
        return Err(Reject::Empty);
    }
    let (prefix, rest) = text.split_once(';').unwrap_or((text, ""));
    let format = Format::from_prefix(prefix.trim()).ok_or(Reject::UnknownPrefix)?;
    let (host, rest) = rest.split_once(';').ok_or(Reject::TooFewFields)?;
    let (command, rest) = rest.split_once(';').ok_or(Reject::TooFewFields)?;
    let command = Command::parse(command.trim()).ok_or(Reject::UnknownCommand)?;
    let fields = read_values(format, command, rest)?;

    let identity = |field: &'a str, missing: Reject| -> Result<&'a str, Reject> {
        let value = present(field).ok_or(missing)?;
        if value.len() > limits.max_field_bytes {
            return Err(Reject::FieldTooLong);
        }
        Ok(value)
    };
    let host = identity(host, Reject::MissingHost)?;
    let user_directory = identity(fields.directory, Reject::MissingUser)?;
    let user_id = identity(fields.user_id, Reject::MissingUser)?;
    if [user_directory, user_id]
        .iter()
        .any(|name| name.contains(['?', char::REPLACEMENT_CHARACTER]))
    {
        return Err(Reject::ReplacedCharacters);
    }
    let proxy_session_id = match fields.session_id.and_then(session_id) {
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
        origin: present(fields.origin).map(informational),
        context: present(fields.context).map(informational),
        proxy_session_id,
        message: informational(fields.message.trim()),
    })
}

/// The values between the command and the end of a datagram, still untrimmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Values<'a> {
    directory: &'a str,
    user_id: &'a str,
    origin: &'a str,
    context: &'a str,
    session_id: Option<&'a str>,
    message: &'a str,
}

/// Cuts `rest` (everything after the command's `;`) into its values; see [`parse`].
fn read_values<'a>(format: Format, command: Command, rest: &'a str) -> Result<Values<'a>, Reject> {
    // Values before the message: directory, user id, origin, context (and the session id).
    let values = format.fields_before_message() - 3;
    // Where the first `;`s are: enough for every reading tried, and one more to tell whether
    // there are more than that.
    let mut semicolons = [0usize; 5 + MAX_EXTRA_SEMICOLONS + 1];
    let mut found = 0;
    for (at, _) in rest.match_indices(';') {
        semicolons[found] = at;
        found += 1;
        if found == values + MAX_EXTRA_SEMICOLONS + 1 {
            break;
        }
    }
    if found < values {
        return Err(Reject::TooFewFields);
    }
    if found == values {
        // The common case: no `;` in any value nor in the message, so there is one reading.
        return Ok(cut(format, rest, &semicolons[..values]));
    }

    // The message begins after one of the `;`s from the values-th on.
    let text = command.message_text();
    let starts_message = |at: usize| starts_with_ignore_case(rest[at + 1..].trim_start(), text);
    let within = (values..=found.min(values + MAX_EXTRA_SEMICOLONS))
        .filter(|&n| starts_message(semicolons[n - 1]));
    let mut only = None;
    let mut fitting = 0;
    for before_message in within {
        // Choose which of the `;`s before the message end the values (values - 1 of them).
        let inner = &semicolons[..before_message - 1];
        let mut choice = [0usize; 4];
        let choice = &mut choice[..values - 1];
        for (i, c) in choice.iter_mut().enumerate() {
            *c = i;
        }
        loop {
            let mut cuts = [0usize; 5];
            for (cut, &i) in cuts.iter_mut().zip(choice.iter()) {
                *cut = inner[i];
            }
            cuts[values - 1] = semicolons[before_message - 1];
            let reading = cut(format, rest, &cuts[..values]);
            if fits(command, &reading) {
                fitting += 1;
                only = Some(reading);
                if fitting > 1 {
                    return Err(Reject::AmbiguousFields);
                }
            }
            if !next_choice(choice, inner.len()) {
                break;
            }
        }
    }
    match only {
        Some(reading) => Ok(reading),
        // No message start at all: where the values end cannot be told.
        None if !any_message_start(rest, text) => Err(Reject::UnknownMessage),
        None => Err(Reject::AmbiguousFields),
    }
}

/// Whether the message text follows any `;` at all (beyond the readings tried, too).
fn any_message_start(rest: &str, text: &str) -> bool {
    rest.match_indices(';')
        .any(|(at, _)| starts_with_ignore_case(rest[at + 1..].trim_start(), text))
}

/// The values with `cuts` as the `;` after each of them (the last one ends the values).
fn cut<'a>(format: Format, rest: &'a str, cuts: &[usize]) -> Values<'a> {
    let mut start = 0;
    let mut value = |end: usize| {
        let v = &rest[start..end];
        start = end + 1;
        v
    };
    let directory = value(cuts[0]);
    let user_id = value(cuts[1]);
    let origin = value(cuts[2]);
    let context = value(cuts[3]);
    let session_id = (format == Format::SessionMonitor).then(|| value(cuts[4]));
    Values {
        directory,
        user_id,
        origin,
        context,
        session_id,
        message: &rest[start..],
    }
}

/// The next `k`-of-`n` choice in lexicographic order; `false` after the last.
fn next_choice(choice: &mut [usize], n: usize) -> bool {
    let k = choice.len();
    let Some(i) = (0..k).rev().find(|&i| choice[i] < n - k + i) else {
        return false;
    };
    choice[i] += 1;
    for j in i + 1..k {
        choice[j] = choice[j - 1] + 1;
    }
    true
}

/// Whether a reading agrees with what its message names: a session message's `'DIR\user'`, a
/// connection message's session id (our format). What a message does not name, it cannot deny.
fn fits(command: Command, reading: &Values<'_>) -> bool {
    let (Some(directory), Some(user_id)) = (present(reading.directory), present(reading.user_id))
    else {
        return false;
    };
    let message = reading.message.trim_start();
    let named = message[command.message_text().len()..].trim_start();
    match command {
        Command::StartSession | Command::StopSession => {
            let named = named.strip_prefix(':').unwrap_or(named).trim_start();
            let Some(named) = named.strip_prefix('\'') else {
                return true;
            };
            strip_prefix_ignore_case(named, directory)
                .and_then(|n| n.strip_prefix('\\'))
                .and_then(|n| strip_prefix_ignore_case(n, user_id))
                .is_some_and(|n| n.starts_with('\''))
        }
        Command::OpenConnection | Command::CloseConnection => {
            let Some(id) = reading.session_id.and_then(session_id) else {
                return true;
            };
            if named.is_empty() {
                return true;
            }
            strip_prefix_ignore_case(named, id).is_some_and(|after| {
                !after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-')
            })
        }
    }
}

fn starts_with_ignore_case(text: &str, prefix: &str) -> bool {
    strip_prefix_ignore_case(text, prefix).is_some()
}

fn strip_prefix_ignore_case<'t>(text: &'t str, prefix: &str) -> Option<&'t str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &text[prefix.len()..])
}

/// A field's value, or `None` when log4net left it empty or rendered `(null)`.
fn present(field: &str) -> Option<&str> {
    let field = field.trim();
    (!field.is_empty() && field != LOG4NET_NULL).then_some(field)
}

/// A proxy session id, or `None` for "no session": unset, empty, or the `0` the proxy logs for an
/// internal command (two users with `0` would otherwise share one session).
fn session_id(field: &str) -> Option<&str> {
    present(field).filter(|id| *id != "0")
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
        parse_in(datagram, UTF_8)
    }

    fn parse_in(datagram: &[u8], encoding: Encoding) -> Result<ProxyEvent<'static>, Reject> {
        let text: &'static str =
            Box::leak(decode(datagram, encoding)?.into_owned().into_boxed_str());
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
        let e = parse_bytes(b"/proxy-connection/;h;Open connection;D;u;o;c;connection Opened for session 1; UserAgent: 'a;b;\"c\";'d''").unwrap();
        assert_eq!(
            e.message,
            "connection Opened for session 1; UserAgent: 'a;b;\"c\";'d''"
        );
        assert_eq!(
            (e.user_directory, e.user_id, e.context),
            ("D", "u", Some("c"))
        );
    }

    #[test]
    fn a_message_with_semicolons_needs_its_text_to_tell_where_it_begins() {
        // Exactly the layout's `;`: one reading, whatever the message says.
        assert!(parse_bytes(b"/proxy-session/;h;Start session;D;u;o;c;m").is_ok());
        // One more: the `;` may be in a value or the message, and no message text says which.
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;u;o;c;a;b"),
            Err(Reject::UnknownMessage)
        );
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
    fn invalid_utf8_is_refused_never_decoded_with_replacements() {
        assert_eq!(
            parse_bytes(b"/proxy-session/;h;Start session;D;j\xffoe;o;c;m"),
            Err(Reject::InvalidEncoding)
        );
        assert_eq!(
            parse_bytes(b"/proxy-se\xffssion/;h;Start session;D;u;o;c;m"),
            Err(Reject::InvalidEncoding)
        );
        // The lossy view is for logs only.
        assert_eq!(clean(b"j\xffoe"), "j\u{FFFD}oe");
    }

    #[test]
    fn code_pages_decode_with_their_encoding() {
        let win1252 = encoding_rs::Encoding::for_label(b"windows-1252").unwrap();
        let datagram = b"/session-monitor/;h;Start session;LAB;J\xf6rg;o;c;s1;Start session for user: 'LAB\\J\xf6rg'";
        assert_eq!(parse_in(datagram, UTF_8), Err(Reject::InvalidEncoding));
        assert_eq!(parse_in(datagram, win1252).unwrap().user_id, "Jörg");
        let sjis = encoding_rs::Encoding::for_label(b"shift_jis").unwrap();
        let (bytes, _, unmappable) = sjis.encode(
            "/session-monitor/;h;Start session;JP;渡辺;o;c;s2;Start session for user: 'JP\\渡辺'",
        );
        assert!(!unmappable);
        assert_eq!(parse_in(&bytes, sjis).unwrap().user_id, "渡辺");
        assert_eq!(parse_in(&bytes, UTF_8), Err(Reject::InvalidEncoding));
    }

    #[test]
    fn utf16le_is_recognised_whatever_is_configured() {
        let text =
            "/session-monitor/;h;Start session;JP;渡辺;o;c;s3;Start session for user: 'JP\\渡辺'";
        let utf16: Vec<u8> = text.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let win1252 = encoding_rs::Encoding::for_label(b"windows-1252").unwrap();
        for encoding in [UTF_8, win1252] {
            let e = parse_in(&utf16, encoding).unwrap();
            assert_eq!((e.user_directory, e.user_id), ("JP", "渡辺"));
        }
        let with_bom: Vec<u8> = [0xFF, 0xFE]
            .into_iter()
            .chain(utf16.iter().copied())
            .collect();
        assert_eq!(parse_in(&with_bom, UTF_8).unwrap().user_id, "渡辺");
        // A lone surrogate is not text: refused.
        let mut broken = utf16.clone();
        broken.extend_from_slice(&0xD800u16.to_le_bytes());
        assert_eq!(parse_in(&broken, UTF_8), Err(Reject::InvalidEncoding));
    }

    #[test]
    fn names_a_code_page_could_not_write_are_refused() {
        // log4net writes `?` for a character its encoding lacks: `JP\??` would be every
        // two-letter Japanese name at once.
        assert_eq!(
            parse_bytes(
                b"/session-monitor/;h;Start session;JP;??;o;c;s4;Start session for user: 'JP\\??'"
            ),
            Err(Reject::ReplacedCharacters)
        );
        assert_eq!(
            parse_bytes("/proxy-session/;h;Start session;L\u{FFFD}B;u;o;c;m".as_bytes()),
            Err(Reject::ReplacedCharacters)
        );
    }

    #[test]
    fn session_id_zero_null_and_empty_mean_no_session_id() {
        for sid in ["0", "(null)", "", " 0 "] {
            let d = format!(
                "/session-monitor/;h;Start session;D;u;o;c;{sid};Start session for user: 'D\\u'"
            );
            assert_eq!(
                parse_bytes(d.as_bytes()).unwrap().proxy_session_id,
                None,
                "{sid:?}"
            );
        }
        let d = "/session-monitor/;h;Start session;D;u;o;c;00;Start session for user: 'D\\u'";
        assert_eq!(
            parse_bytes(d.as_bytes()).unwrap().proxy_session_id,
            Some("00")
        );
    }

    #[test]
    fn a_semicolon_in_the_user_id_is_read_from_the_session_message() {
        let e = parse_bytes(b"/session-monitor/;QS-PROXY-1;Start session;LAB;semi;colon;AppAccess;/hub/;11a6;Start session for user: 'LAB\\semi;colon'").unwrap();
        assert_eq!(
            (
                e.user_directory,
                e.user_id,
                e.origin,
                e.context,
                e.proxy_session_id
            ),
            (
                "LAB",
                "semi;colon",
                Some("AppAccess"),
                Some("/hub/"),
                Some("11a6")
            )
        );
        // In the directory too, and in every format.
        let e = parse_bytes(b"/qseow-proxy-session/;h;Stop session;LA;B;joe;AppAccess;/hub/;Stop session for user: 'LA;B\\joe'").unwrap();
        assert_eq!((e.user_directory, e.user_id), ("LA;B", "joe"));
    }

    #[test]
    fn a_connection_message_pins_the_session_id() {
        let e = parse_bytes(b"/session-monitor/;h;Open connection;D;u;o;/app/x;c;d;connection Opened for session c;d").unwrap();
        // The message names `c;d`: that is the session id, and the values before it are one each.
        assert_eq!(e.context, Some("/app/x"));
        assert_eq!(e.proxy_session_id, Some("c;d"));
    }

    #[test]
    fn readings_that_cannot_be_told_apart_are_dropped() {
        // A connection message names no user: `semi;colon` or an origin `colon;AppAccess`?
        assert_eq!(
            parse_bytes(b"/session-monitor/;h;Open connection;LAB;semi;colon;AppAccess;/app/1;sid1;connection Opened for session sid1"),
            Err(Reject::AmbiguousFields)
        );
        assert_eq!(
            parse_bytes(b"/proxy-connection/;h;Close connection;LAB;semi;colon;AppAccess;/hub/;connection Closed for session sid1"),
            Err(Reject::AmbiguousFields)
        );
        // The message names a user that no reading gives.
        assert_eq!(
            parse_bytes(
                b"/proxy-session/;h;Start session;LAB;a;b;o;c;Start session for user: 'LAB\\x'"
            ),
            Err(Reject::AmbiguousFields)
        );
        // Far more `;` than values hold.
        let many = format!(
            "/proxy-session/;h;Start session;LAB;{};o;c;Start session for user: 'LAB\\x'",
            ";".repeat(20)
        );
        assert_eq!(parse_bytes(many.as_bytes()), Err(Reject::AmbiguousFields));
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
        assert_eq!(
            decode_datagram(&[b'x'; 17], &limits, UTF_8),
            Err(Reject::TooLarge)
        );
        assert_eq!(
            decode_datagram(&[b'x'; 16], &limits, UTF_8).unwrap(),
            "x".repeat(16)
        );
    }

    #[test]
    fn decode_borrows_clean_utf8() {
        assert!(matches!(
            decode(b"/proxy-session/;h", UTF_8),
            Ok(Cow::Borrowed(_))
        ));
    }

    proptest! {
        #[test]
        fn no_input_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            let text = clean(&bytes);
            let _ = parse(&text, &Limits { max_datagram_bytes: 8192, max_field_bytes: 16 });
            if let Ok(text) = decode(&bytes, encoding_rs::SHIFT_JIS) {
                let _ = parse(&text, &Limits::default());
            }
        }

        /// Values with `;` in them: the parser gives the very values, or drops the datagram as
        /// ambiguous; never other values (another user, another session).
        #[test]
        fn semicolons_in_values_give_the_right_fields_or_a_counted_drop(
            format in prop::sample::select(Format::ALL.to_vec()),
            command in prop::sample::select(Command::ALL.to_vec()),
            dir in "[A-Z;]{1,6}", user in "[a-z;.]{1,8}", origin in "[A-Za-z;]{1,8}",
            context in "/[a-z0-9/;?=]{0,12}", sid in "[0-9a-f][0-9a-f-;]{0,10}",
            agent in prop::option::of("[ -~]{0,30}"),
        ) {
            prop_assume!([&dir, &user].iter().all(|v| v.chars().any(|c| c != ';')));
            prop_assume!(!sid.ends_with(';') && sid != "0");
            let session_field = format == Format::SessionMonitor;
            let mut d = format!("{};h1;{};{dir};{user};{origin};{context};", format.wire_prefix(command), command.wire_name());
            if session_field {
                d.push_str(&sid);
                d.push(';');
            }
            let message = match command {
                Command::StartSession | Command::StopSession => format!("{} for user: '{dir}\\{user}'", command.wire_name()),
                Command::OpenConnection | Command::CloseConnection => format!("{} {sid}", command.message_text()),
            };
            d.push_str(&message);
            if let Some(agent) = &agent {
                d.push_str(&format!("; UserAgent: '{agent}'"));
            }
            match parse(&d, &Limits::default()) {
                Ok(e) => {
                    prop_assert_eq!(e.user_directory, dir.trim());
                    prop_assert_eq!(e.user_id, user.trim());
                    prop_assert_eq!(e.origin, present(&origin));
                    prop_assert_eq!(e.context, present(&context));
                    if session_field {
                        prop_assert_eq!(e.proxy_session_id, session_id(&sid));
                    }
                }
                Err(reason) => prop_assert!(
                    matches!(reason, Reject::AmbiguousFields | Reject::MissingUser),
                    "{d}: {reason:?}"
                ),
            }
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
            let msg = format!("connection Closed for session {msg}");
            let datagram = format!("/qseow-proxy-connection/;{host};Close connection;{dir};{user};AppAccess;/hub/;{msg}");
            let text = decode(datagram.as_bytes(), UTF_8).unwrap();
            let e = parse(&text, &Limits::default()).unwrap();
            prop_assert_eq!(e.host, host.as_str());
            prop_assert_eq!(e.user_directory, dir.as_str());
            prop_assert_eq!(e.user_id, user.as_str());
            prop_assert_eq!(e.message, msg.trim());
        }
    }
}
