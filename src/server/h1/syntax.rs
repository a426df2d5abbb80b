//! The character classes and list syntax of RFC 9110 §5.6, shared by the request
//! parser, the chunked decoder and the response encoder.

/// `tchar` (RFC 9110 §5.6.2): the characters of a token.
pub(crate) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// `token = 1*tchar`.
pub(crate) fn is_token(s: &[u8]) -> bool {
    !s.is_empty() && s.iter().all(|&b| is_tchar(b))
}

/// A character of a field value (RFC 9110 §5.5): VCHAR, SP, HTAB or obs-text. CR, LF,
/// NUL and the other controls are not.
pub(crate) fn is_field_char(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

/// Optional whitespace (RFC 9110 §5.6.3).
pub(crate) fn is_ows(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

/// `s` without leading and trailing OWS.
pub(crate) fn trim_ows(s: &[u8]) -> &[u8] {
    let start = s.iter().position(|&b| !is_ows(b)).unwrap_or(s.len());
    let end = s.iter().rposition(|&b| !is_ows(b)).map_or(start, |e| e + 1);
    &s[start..end]
}

/// The elements of a comma-separated list spread over any number of field lines (RFC
/// 9110 §5.3, §5.6.1): each trimmed of OWS, empty ones dropped. Not for lists whose
/// elements may hold quoted commas; none of the fields read this way do.
pub(crate) fn list_elements<'a>(
    values: impl Iterator<Item = &'a [u8]>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .flat_map(|v| v.split(|&b| b == b','))
        .map(trim_ows)
        .filter(|e| !e.is_empty())
}

/// The length of the `quoted-string` (RFC 9110 §5.6.4) at the start of `s`, `Ok(None)`
/// if `s` ends before it does, `Err(())` if it is malformed.
pub(crate) fn quoted_string_len(s: &[u8]) -> Result<Option<usize>, ()> {
    if s.first() != Some(&b'"') {
        return Err(());
    }
    let mut i = 1;
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return Ok(Some(i + 1)),
            b'\\' => match s.get(i + 1) {
                None => return Ok(None),
                Some(&q) if is_field_char(q) => i += 2,
                Some(_) => return Err(()),
            },
            b if is_field_char(b) => i += 1,
            _ => return Err(()),
        }
    }
    Ok(None)
}

/// Whether `value` is a valid `Host` field value (RFC 9112 §3.2, RFC 3986 §3.2.2):
/// empty, or `uri-host [ ":" port ]` with an IP literal, an IPv4 address or a reg-name.
pub(crate) fn is_valid_host(value: &[u8]) -> bool {
    let (host, port) = if value.first() == Some(&b'[') {
        let Some(close) = value.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &value[1..close];
        let valid_literal = !literal.is_empty()
            && literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.');
        if !valid_literal {
            return false;
        }
        match &value[close + 1..] {
            [] => return true,
            [b':', port @ ..] => (&[][..], port),
            _ => return false,
        }
    } else {
        match value.iter().position(|&b| b == b':') {
            Some(colon) => (&value[..colon], &value[colon + 1..]),
            None => (value, &[][..]),
        }
    };
    let reg_name = host.iter().enumerate().all(|(i, &b)| match b {
        b'%' => host
            .get(i + 1..i + 3)
            .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)),
        _ => b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(&b),
    });
    reg_name && port.iter().all(u8::is_ascii_digit)
}

/// Whether a line of `fields` ends in LF alone (RFC 9112 §2.2 lets a recipient accept
/// one; a strict one does not, as a proxy in front may frame it differently).
pub(crate) fn has_bare_lf(fields: &[u8]) -> bool {
    memchr::memchr_iter(b'\n', fields).any(|i| i == 0 || fields[i - 1] != b'\r')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "",
            "x",
            "x:8080",
            "x:",
            "127.0.0.1:1",
            "[::1]",
            "[::1]:8080",
            "a%20b",
        ] {
            assert!(is_valid_host(ok.as_bytes()), "{ok:?}");
        }
        for bad in [
            "a b", "a/b", "a@b", "[::1", "x:port", "x:80:80", "[]", "[::1]x", "a%2",
        ] {
            assert!(!is_valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn lists_span_lines_and_drop_empty_elements() {
        let lines: [&[u8]; 3] = [b" a ,, b", b"", b"\tc\t,"];
        let got: Vec<&[u8]> = list_elements(lines.into_iter()).collect();
        assert_eq!(got, [&b"a"[..], b"b", b"c"]);
    }

    #[test]
    fn quoted_strings() {
        assert_eq!(quoted_string_len(br#""a\"b" rest"#), Ok(Some(6)));
        assert_eq!(quoted_string_len(br#""open"#), Ok(None));
        assert_eq!(quoted_string_len(b"\"a\nb\""), Err(()));
        assert_eq!(quoted_string_len(b"x"), Err(()));
    }
}
