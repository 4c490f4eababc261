//! JSON written piece by piece, as serde_json writes it, for the lines and
//! bodies every request makes (journal lines, `chat.completion` bodies).
//!
//! serde_json runs its escape loop over every key and string, a few writes
//! each; for fixed shapes the keys can be constant bytes and a string with
//! nothing to escape (ids, names, most text) copied as it is. Anything that
//! needs escaping is escaped by serde_json itself, so the bytes are the
//! same; each user compares its output with serde_json's in its tests.

/// `s` as a JSON string.
pub(crate) fn string(out: &mut Vec<u8>, s: &str) {
    // What serde_json escapes: control characters, quote, backslash.
    if s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        // Writing a string into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push(b'"');
    out.extend_from_slice(s.as_bytes());
    out.push(b'"');
}

/// `s` as a JSON string, or `null`.
pub(crate) fn opt_string(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => string(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

pub(crate) fn int(out: &mut Vec<u8>, v: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(v).as_bytes());
}

/// As serde_json (zmij, as it does): shortest round-trip form, `null` for
/// NaN and infinities.
pub(crate) fn float(out: &mut Vec<u8>, v: f64) {
    if v.is_finite() {
        out.extend_from_slice(zmij::Buffer::new().format_finite(v).as_bytes());
    } else {
        out.extend_from_slice(b"null");
    }
}
