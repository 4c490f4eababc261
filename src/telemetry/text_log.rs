//! The text log format, written without tracing-subscriber's styling
//! machinery where no styling is wanted.
//!
//! With colours off (stderr not a terminal: every deployment),
//! tracing-subscriber's default format still sends each field name, `=`,
//! span name and target through `nu_ansi_term`'s (empty) styles and
//! `core::fmt`, about 17,000 instructions for one access line (a twelfth of
//! a sync request). [`PlainFields`] and [`TextFormat`] write the same bytes
//! directly: field by field, values that need no escaping as they are,
//! anything else through the default formatter's own code. The output is
//! byte-for-byte the default's; the tests compare them line by line.
//!
//! Only the access line (one per request) takes the direct path for the
//! line's head; other events, rare, and any line with colours on, are
//! formatted by the default [`Format`] (with these fields).

use std::fmt;

use tracing::{field::Field, Event, Level, Subscriber};
use tracing_subscriber::{
    field::{RecordFields, Visit},
    fmt::{
        format::{DefaultFields, DefaultVisitor, Format, Full, Writer},
        time::SystemTime,
        FmtContext, FormatEvent, FormatFields, FormattedFields,
    },
    registry::LookupSpan,
};

/// The target of the per-request access line.
pub const ACCESS_TARGET: &str = "switchyard::access";

/// Formats fields as [`DefaultFields`] does, without styling when the
/// writer has none.
#[derive(Debug, Default)]
pub struct PlainFields {
    default: DefaultFields,
}

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        if writer.has_ansi_escapes() {
            return self.default.format_fields(writer, fields);
        }
        let mut v = PlainVisitor {
            writer,
            is_empty: true,
            result: Ok(()),
        };
        fields.record(&mut v);
        v.result
    }
}

/// [`DefaultVisitor`] with colours off: `name=value`, separated by single
/// spaces, the message bare and first. Names, plain values and plain
/// messages are written directly; errors, formatted messages and strings
/// that need escaping go through a [`DefaultVisitor`] (which escapes them),
/// so they come out the same.
struct PlainVisitor<'a> {
    writer: Writer<'a>,
    is_empty: bool,
    result: fmt::Result,
}

impl PlainVisitor<'_> {
    /// The name as written, or `None` where the default visitor has its own
    /// rule (the message, log metadata it skips).
    fn plain_name(field: &Field) -> Option<&'static str> {
        match field.name() {
            "message" => None,
            name if name.starts_with("log.") => None,
            name => Some(name.strip_prefix("r#").unwrap_or(name)),
        }
    }

    fn pad(&mut self) -> fmt::Result {
        if self.is_empty {
            self.is_empty = false;
            Ok(())
        } else {
            self.writer.write_char(' ')
        }
    }

    /// `name=` then `value`, or the whole field by the default visitor.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result, default: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let Some(name) = Self::plain_name(field) else {
            self.by_default(field, default);
            return;
        };
        self.result = (|| {
            self.pad()?;
            self.writer.write_str(name)?;
            self.writer.write_char('=')?;
            value(&mut self.writer)
        })();
    }

    fn by_default(&mut self, field: &Field, record: impl FnOnce(&mut DefaultVisitor<'_>)) {
        if self.result.is_err() {
            return;
        }
        let mut v = DefaultVisitor::new(self.writer.by_ref(), self.is_empty);
        record(&mut v);
        self.result = tracing_subscriber::field::VisitOutput::finish(v);
        // The default visitor pads before every field it writes; it skips
        // only log metadata.
        if !field.name().starts_with("log.") {
            self.is_empty = false;
        }
    }
}

/// Whether `{:?}` of `s` is `s` in quotes: printable ASCII with no quote
/// or backslash.
fn debug_is_verbatim(s: &str) -> bool {
    s.bytes().all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

impl Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        // A message is written bare; the default escapes only control
        // characters in it, which printable ASCII has none of.
        if field.name() == "message" && value.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            if self.result.is_ok() {
                self.result = self.pad().and_then(|()| self.writer.write_str(value));
            }
            return;
        }
        if !debug_is_verbatim(value) {
            self.by_default(field, |v| v.record_str(field, value));
            return;
        }
        self.field(
            field,
            |w| {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            },
            |v| v.record_str(field, value),
        );
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)), |v| v.record_u64(field, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)), |v| v.record_i64(field, value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }), |v| v.record_bool(field, value));
    }

    fn record_f64(&mut self, field: &Field, value: f64) {
        self.field(field, |w| write!(w, "{value:?}"), |v| v.record_f64(field, value));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.by_default(field, |v| v.record_error(field, value));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |w| write!(w, "{value:?}"), |v| v.record_debug(field, value));
    }
}

/// tracing-subscriber's full text format; the access line's head written
/// directly when the writer has no colours.
#[derive(Debug, Default)]
pub struct TextFormat {
    default: Format<Full, SystemTime>,
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        if writer.has_ansi_escapes() || meta.target() != ACCESS_TARGET {
            return self.default.format_event(ctx, writer, event);
        }
        // The default's timestamp (UTC, microseconds, `Z`), formatted by
        // humantime for a fifth of what tracing-subscriber's takes.
        write!(writer, "{} ", humantime::format_rfc3339_micros(std::time::SystemTime::now()))?;
        writer.write_str(match *meta.level() {
            Level::TRACE => "TRACE",
            Level::DEBUG => "DEBUG",
            Level::INFO => " INFO",
            Level::WARN => " WARN",
            Level::ERROR => "ERROR",
        })?;
        writer.write_char(' ')?;
        if let Some(scope) = ctx.event_scope() {
            let mut seen = false;
            for span in scope.from_root() {
                writer.write_str(span.metadata().name())?;
                seen = true;
                if let Some(fields) = span.extensions().get::<FormattedFields<N>>().filter(|f| !f.is_empty()) {
                    writer.write_char('{')?;
                    writer.write_str(fields)?;
                    writer.write_char('}')?;
                }
                writer.write_char(':')?;
            }
            if seen {
                writer.write_char(' ')?;
            }
        }
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        ctx.format_fields(writer.by_ref(), event)?;
        writer.write_char('\n')
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io,
        sync::{Arc, Mutex},
    };

    use tracing_subscriber::fmt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> fmt::MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

    impl Buf {
        /// The lines without their timestamps (the two runs differ there).
        fn lines(&self) -> Vec<String> {
            let text = String::from_utf8(self.0.lock().unwrap().clone()).unwrap();
            text.lines().map(|l| l.split_once(' ').map_or(l, |(_, rest)| rest).to_owned()).collect()
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("outer \"failure\"")]
    struct Outer(#[source] Inner);
    #[derive(Debug, thiserror::Error)]
    #[error("inner cause")]
    struct Inner;

    /// Spans and events of every field kind, on `target` (the access
    /// target takes the direct path for the whole line).
    fn emit(target_access: bool) {
        // Nested: each span is made inside the one before it.
        let empty = tracing::info_span!("empty", v = tracing::field::Empty);
        let _e = empty.enter();
        let outer = tracing::info_span!("outer");
        let _o = outer.enter();
        let odd = tracing::info_span!("odd", path = "/v1/\"x\"\\y", n = 3u64, r#type = "t");
        let _d = odd.enter();
        let request = tracing::info_span!("request", request_id = "req-01JABC", trace_id = %"4bf92f3577b34da6a3ce929d0e0e4736");
        let _r = request.enter();
        let error = Outer(Inner);
        let strings = ["", "plain", "with space", "quote\"d", "back\\slash", "tab\there", "new\nline", "ansi \u{1b}[31mred", "héllo", "emoji 🚀", "\u{7f}del", "zero\u{200d}width"];
        for s in strings {
            if target_access {
                tracing::info!(target: "switchyard::access", endpoint = %"POST /v1/chat/completions", model = s, key = "bench", status = 200u16, code = "ok", duration_ms = 1.25f64, "request");
                tracing::info!(target: "switchyard::access", s, "message with {} {s:?}", "args");
                tracing::warn!(target: "switchyard::access", s = %s, d = ?s, "{s}");
                tracing::info!(target: "switchyard::access", message = s, after = s);
            } else {
                tracing::info!(s, other = s, "plain {s}");
                tracing::error!(path = s, "{}", s);
            }
        }
        let numbers = |t: bool| {
            for f in [0.0, 1.0, -2.5, 0.1 + 0.2, 1e21, 1e-7, f64::NAN, f64::INFINITY] {
                if t {
                    tracing::info!(target: "switchyard::access", f, i = -7i64, u = u64::MAX, b = true, nb = false, r#type = "x", "n");
                } else {
                    tracing::info!(f, i = i64::MIN, u = 0u64, b = false, "n");
                }
            }
        };
        numbers(target_access);
        if target_access {
            tracing::error!(target: "switchyard::access", error = &error as &dyn std::error::Error, plain = &Inner as &dyn std::error::Error, "failed");
            tracing::info!(target: "switchyard::access", only = 1u64);
            tracing::info!(target: "switchyard::access", parent: None, "no parent");
            tracing::debug!(target: "switchyard::access", a = ?Some("x"), "debug level");
            tracing::trace!(target: "switchyard::access", "trace level");
            tracing::info!(target: "switchyard::access", { log.target = "x", after = 1u64 }, "log-looking field");
        } else {
            tracing::error!(error = &error as &dyn std::error::Error, "failed");
            tracing::info!("no fields");
        }
        empty.record("v", "recorded later");
        tracing::info!(target: "switchyard::access", "after a record");
    }

    fn run(ours: bool) -> Vec<String> {
        let buf = Buf::default();
        let builder = fmt().with_ansi(false).with_max_level(Level::TRACE).with_writer(buf.clone());
        let emit_all = || {
            emit(true);
            emit(false);
        };
        if ours {
            tracing::subscriber::with_default(builder.fmt_fields(PlainFields::default()).event_format(TextFormat::default()).finish(), emit_all);
        } else {
            tracing::subscriber::with_default(builder.finish(), emit_all);
        }
        buf.lines()
    }

    #[test]
    fn lines_are_the_default_formats_byte_for_byte() {
        let (ours, default) = (run(true), run(false));
        assert!(ours.len() > 60, "{ours:#?}");
        assert!(ours.iter().any(|l| l.starts_with(" INFO empty:outer:odd{path=\"/v1/\\\"x\\\"\\\\y\" n=3 type=\"t\"}:request{request_id=\"req-01JABC\" trace_id=4bf92f3577b34da6a3ce929d0e0e4736}: switchyard::access: request endpoint=POST /v1/chat/completions model=\"plain\" key=\"bench\" status=200 code=\"ok\" duration_ms=1.25")), "{ours:#?}");
        for (i, (a, b)) in ours.iter().zip(&default).enumerate() {
            assert_eq!(a, b, "line {i}");
        }
        assert_eq!(ours.len(), default.len());
    }

    #[test]
    fn the_access_lines_timestamp_has_the_defaults_shape() {
        let (ours, default) = (Buf::default(), Buf::default());
        for (buf, fast) in [(&ours, true), (&default, false)] {
            let builder = fmt().with_ansi(false).with_writer(buf.clone());
            let sub = builder.fmt_fields(PlainFields::default()).event_format(TextFormat::default()).finish();
            let target_access = || {
                if fast {
                    tracing::info!(target: "switchyard::access", "x")
                } else {
                    tracing::info!("x")
                }
            };
            tracing::subscriber::with_default(sub, target_access);
        }
        let stamp = |b: &Buf| String::from_utf8(b.0.lock().unwrap().clone()).unwrap().split_once(' ').unwrap().0.to_owned();
        let (a, b) = (stamp(&ours), stamp(&default));
        assert_eq!(a.len(), b.len(), "{a} {b}");
        let parsed = |s: &str| humantime::parse_rfc3339(s).unwrap();
        let gap = parsed(&b).duration_since(parsed(&a)).unwrap_or_default();
        assert!(gap < std::time::Duration::from_secs(5), "{a} {b}");
        assert!(a.ends_with('Z') && a.as_bytes()[10] == b'T' && a.as_bytes()[19] == b'.', "{a}");
    }

    #[test]
    fn with_colours_on_the_default_format_writes_the_line() {
        let buf = Buf::default();
        let sub = fmt().with_ansi(true).with_writer(buf.clone()).fmt_fields(PlainFields::default()).event_format(TextFormat::default()).finish();
        tracing::subscriber::with_default(sub, || tracing::info!(target: "switchyard::access", status = 200u16, "request"));
        let line = buf.lines().concat();
        assert!(line.contains("\u{1b}["), "{line:?}");
    }
}
