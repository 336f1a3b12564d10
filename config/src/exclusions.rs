//! User exclusion patterns such as `INTERNAL\sa_*`: users matching them are not counted.

/// Patterns over `DIRECTORY\userid`, case-insensitive, where `*` matches any run of characters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Each pattern lower-cased and split at its `*`s.
    patterns: Vec<Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("exclusion pattern {0:?} must have the form DIRECTORY\\userid (with optional * wildcards)")]
pub struct InvalidPattern(pub String);

impl Exclusions {
    pub fn new<I, S>(patterns: I) -> Result<Exclusions, InvalidPattern>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let patterns = patterns
            .into_iter()
            .map(|p| {
                let p = p.as_ref().trim();
                if !p.contains('\\') {
                    return Err(InvalidPattern(p.to_owned()));
                }
                let mut lower = String::new();
                push_lowercase(&mut lower, p);
                Ok(lower.split('*').map(str::to_owned).collect())
            })
            .collect::<Result<_, _>>()?;
        Ok(Exclusions { patterns })
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// `user_key` is the lower-cased `directory\userid`.
    pub fn matches(&self, user_key: &str) -> bool {
        self.patterns
            .iter()
            .any(|parts| glob_match(parts, user_key))
    }
}

/// Matches `text` against a pattern given as the literal pieces between its `*`s.
fn glob_match(parts: &[String], text: &str) -> bool {
    let (first, rest) = match parts.split_first() {
        Some(split) => split,
        None => return text.is_empty(),
    };
    let Some(mut remaining) = text.strip_prefix(first.as_str()) else {
        return false;
    };
    let Some((last, middle)) = rest.split_last() else {
        return remaining.is_empty(); // no '*' at all: exact match
    };
    // Greedy left-to-right search is correct for '*'-only globs: taking the earliest occurrence
    // of each middle piece leaves the most room for the ones after it.
    for piece in middle {
        match remaining.find(piece.as_str()) {
            Some(at) => remaining = &remaining[at + piece.len()..],
            None => return false,
        }
    }
    remaining.len() >= last.len() && remaining.ends_with(last.as_str())
}

/// Appends `s` lower-cased; ASCII (every Qlik user id seen so far) without per-char Unicode tables.
pub fn push_lowercase(out: &mut String, s: &str) {
    if s.is_ascii() {
        out.extend(s.bytes().map(|b| b.to_ascii_lowercase() as char));
    } else {
        out.extend(s.chars().flat_map(char::to_lowercase));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, key: &str) -> bool {
        Exclusions::new([pattern]).unwrap().matches(key)
    }

    #[test]
    fn wildcards() {
        assert!(matches("INTERNAL\\sa_*", "internal\\sa_repository"));
        assert!(!matches("INTERNAL\\sa_*", "internal\\joe"));
        assert!(!matches("INTERNAL\\sa_*", "corp\\sa_x"));
        assert!(matches("*\\sa_*", "corp\\sa_x"));
        assert!(matches("LAB\\joe", "lab\\joe"));
        assert!(!matches("LAB\\joe", "lab\\joey"));
        assert!(matches("*\\*svc*", "corp\\reload-svc-1"));
        assert!(matches("a\\*b*b", "a\\xbyb"));
        assert!(!matches("a\\*b*b", "a\\xb"));
        assert!(matches("*\\*", "any\\one"));
        assert!(
            matches("ünï\\*", "ünï\\x"),
            "non-ASCII patterns are lower-cased too"
        );
        assert!(matches("ÜNÏ\\X", "ünï\\x"));
    }

    #[test]
    fn patterns_without_a_directory_are_rejected() {
        assert_eq!(
            Exclusions::new(["sa_*"]),
            Err(InvalidPattern("sa_*".into()))
        );
    }
}
