//! The parser as it was before #22 (commit b9b7c53's `service/src/parser.rs`: lossy UTF-8, the
//! fields split at the first seven or eight `;`), kept only as the reference of the benchmark's
//! parser row, so that the cost of anchoring the parse at both ends is measured, not guessed.
//! It counts the wrong user for a `;` inside a value: never use it to count.

use std::borrow::Cow;

use session_monitor::parser::{Command, Format, Limits, ProxyEvent, Reject};

const LOG4NET_NULL: &str = "(null)";

fn format_from_prefix(prefix: &str) -> Option<Format> {
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

fn fields_before_message(format: Format) -> usize {
    match format {
        Format::Butler | Format::ButlerSos => 7,
        Format::SessionMonitor => 8,
    }
}

fn command_parse(field: &str) -> Option<Command> {
    Command::ALL
        .into_iter()
        .find(|c| c.wire_name().eq_ignore_ascii_case(field))
}

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
    let format = format_from_prefix(prefix.trim()).ok_or(Reject::UnknownPrefix)?;

    // Fields 1.. up to the message; the message keeps any further ';'.
    let mut fields = rest.splitn(fields_before_message(format), ';');
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

    let command = command_parse(command.trim()).ok_or(Reject::UnknownCommand)?;
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
