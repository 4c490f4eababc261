//! A journal line: an [`Entry`] as JSON, the bytes `serde_json::to_vec`
//! writes, written field by field.
//!
//! Every request journals one line before its answer goes out. Through
//! serde_json it cost ~9,600 instructions, most of it escaping the 33
//! constant keys and every string (see `proto/json_write.rs`). The tests
//! compare the bytes with serde_json's for entries of every shape, so a
//! field added to the structs and not here fails them.

use super::{AttemptRow, Entry, LedgerRow};
use crate::proto::json_write::{float, int, opt_string, string};

/// Appends `entry` as serde_json would write it (no newline).
pub fn write_entry(out: &mut Vec<u8>, entry: &Entry) {
    out.extend_from_slice(b"{\"row\":");
    write_row(out, &entry.row);
    out.extend_from_slice(b",\"attempts\":[");
    for (i, a) in entry.attempts.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_attempt(out, a);
    }
    out.extend_from_slice(b"]}");
}

fn write_row(out: &mut Vec<u8>, r: &LedgerRow) {
    out.extend_from_slice(b"{\"request_id\":");
    string(out, &r.request_id);
    out.extend_from_slice(b",\"client_request_id\":");
    opt_string(out, r.client_request_id.as_deref());
    out.extend_from_slice(b",\"key_name\":");
    string(out, &r.key_name);
    out.extend_from_slice(b",\"model\":");
    string(out, &r.model);
    out.extend_from_slice(b",\"provider\":");
    opt_string(out, r.provider.as_deref());
    out.extend_from_slice(b",\"upstream_model\":");
    opt_string(out, r.upstream_model.as_deref());
    out.extend_from_slice(b",\"input_tokens\":");
    int(out, r.input_tokens);
    out.extend_from_slice(b",\"output_tokens\":");
    int(out, r.output_tokens);
    out.extend_from_slice(b",\"cached_tokens\":");
    int(out, r.cached_tokens);
    out.extend_from_slice(b",\"cost_usd\":");
    float(out, r.cost_usd);
    out.extend_from_slice(b",\"latency_ms\":");
    int(out, r.latency_ms);
    out.extend_from_slice(b",\"ttft_ms\":");
    match r.ttft_ms {
        Some(v) => int(out, v),
        None => out.extend_from_slice(b"null"),
    }
    out.extend_from_slice(b",\"attempts\":");
    int(out, r.attempts);
    out.extend_from_slice(b",\"outcome\":");
    string(out, &r.outcome);
    out.extend_from_slice(b",\"error_code\":");
    opt_string(out, r.error_code.as_deref());
    out.extend_from_slice(b",\"created_at\":");
    int(out, r.created_at);
    out.extend_from_slice(b",\"unit\":");
    opt_string(out, r.unit.as_deref());
    out.extend_from_slice(b",\"units\":");
    float(out, r.units);
    out.push(b'}');
}

fn write_attempt(out: &mut Vec<u8>, a: &AttemptRow) {
    out.extend_from_slice(b"{\"attempt\":");
    int(out, a.attempt);
    out.extend_from_slice(b",\"provider\":");
    string(out, &a.provider);
    out.extend_from_slice(b",\"upstream_model\":");
    string(out, &a.upstream_model);
    out.extend_from_slice(b",\"outcome\":");
    string(out, &a.outcome);
    out.extend_from_slice(b",\"input_tokens\":");
    int(out, a.input_tokens);
    out.extend_from_slice(b",\"output_tokens\":");
    int(out, a.output_tokens);
    out.extend_from_slice(b",\"provider_cost_usd\":");
    float(out, a.provider_cost_usd);
    out.push(b'}');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(request_id: &str) -> LedgerRow {
        LedgerRow::new(request_id.into(), None, "bench".into(), "gpt-4o-mini".into())
    }

    fn attempt(n: u32, provider: &str, cost: f64) -> AttemptRow {
        AttemptRow {
            attempt: n,
            provider: provider.into(),
            upstream_model: "gpt-4o-mini-2024-07-18".into(),
            outcome: "success".into(),
            input_tokens: 12,
            output_tokens: u64::MAX,
            provider_cost_usd: cost,
        }
    }

    fn entries() -> Vec<Entry> {
        let plain = Entry { row: row("chatcmpl-01JABCDEF"), attempts: vec![] };
        let mut full = row("chatcmpl-01JABCDEF");
        full.client_request_id = Some("client's id".into());
        full.provider = Some("oa-1".into());
        full.upstream_model = Some("gpt-4o-mini-2024-07-18".into());
        full.input_tokens = 123;
        full.output_tokens = 4567;
        full.cached_tokens = 89;
        full.cost_usd = 0.000_123_45;
        full.latency_ms = 1234;
        full.ttft_ms = Some(56);
        full.attempts = 2;
        full.outcome = "success".into();
        full.error_code = Some("upstream_error".into());
        full.created_at = -1_700_000_000;
        full.unit = Some("images".into());
        full.units = 2.0;
        let full = Entry { row: full, attempts: vec![attempt(1, "oa-1", 0.1 + 0.2), attempt(2, "oa-2", 1e-9)] };
        let mut odd = row("quote\" back\\ tab\t nl\n nul\u{0} del\u{7f} é 🚀 \u{1b}[0m");
        odd.key_name = String::new();
        odd.cost_usd = f64::NAN;
        odd.units = f64::INFINITY;
        odd.model = "\u{2028}\u{2029}".into();
        let odd = Entry { row: odd, attempts: vec![attempt(0, "\"", -0.0), attempt(u32::MAX, "", 1e300)] };
        let mut big = row("r");
        big.cost_usd = 123_456_789.125;
        big.latency_ms = u64::MAX;
        big.created_at = i64::MIN;
        big.units = 1e-300;
        let big = Entry { row: big, attempts: vec![attempt(1, "x", f64::NEG_INFINITY)] };
        vec![plain, full, odd, big]
    }

    #[test]
    fn lines_are_serde_jsons_bytes() {
        for e in entries() {
            let mut ours = Vec::new();
            write_entry(&mut ours, &e);
            let theirs = serde_json::to_vec(&e).unwrap();
            assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
        }
    }

    #[test]
    fn lines_read_back_as_the_entry() {
        let finite = |e: &Entry| e.row.cost_usd.is_finite() && e.row.units.is_finite() && e.attempts.iter().all(|a| a.provider_cost_usd.is_finite());
        for e in entries().into_iter().filter(finite) {
            let mut line = Vec::new();
            write_entry(&mut line, &e);
            let back: Entry = serde_json::from_slice(&line).unwrap();
            assert_eq!(back.row, e.row);
            assert_eq!(back.attempts.len(), e.attempts.len());
        }
    }
}
