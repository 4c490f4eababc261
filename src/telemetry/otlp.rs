//! OTLP/gRPC span export, encoded straight from the SDK's [`SpanData`].
//!
//! opentelemetry-otlp converts every span into owned protobuf structs
//! (a `String` per attribute key and value) and prost then encodes them,
//! working out each nested message's length again at every level above
//! it. callgrind put that at ~30,000 instructions a request (two spans),
//! an eighth of a whole sync request. Here each span is written once into
//! a reused buffer with prost's own wire primitives; the resource is
//! encoded once, at start. The message is the same `ExportTraceServiceRequest`:
//! a test decodes it with opentelemetry-proto's types and compares it with
//! what opentelemetry-proto's own conversion makes of the same spans.

use bytes::{Buf, BufMut, Bytes};
use opentelemetry::{trace::SpanId, Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::{trace::SpanData, Resource};
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, WireType};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

/// `/opentelemetry.proto.collector.trace.v1.TraceService/Export`.
const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

// Span flags (trace.proto): whether the parent's remoteness is known, and
// whether it is remote; the W3C trace flags take the low byte.
const CONTEXT_HAS_IS_REMOTE: u32 = 0x100;
const CONTEXT_IS_REMOTE: u32 = 0x200;

/// Sends span batches to one collector.
#[derive(Clone)]
pub struct OtlpExporter {
    client: tonic::client::Grpc<tonic::transport::Channel>,
    /// `ResourceSpans.resource` and `.schema_url`, encoded.
    resource: Bytes,
}

impl OtlpExporter {
    /// Connects lazily (a collector that is down at start is not an
    /// error); every call is bounded by `timeout`.
    pub fn new(endpoint: &str, timeout: Duration, resource: &Resource) -> Result<OtlpExporter, String> {
        let channel = tonic::transport::Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| format!("collector endpoint {endpoint:?}: {e}"))?
            .timeout(timeout)
            .connect_lazy();
        Ok(OtlpExporter {
            client: tonic::client::Grpc::new(channel),
            resource: encode_resource(resource).into(),
        })
    }

    pub async fn export(&self, batch: &[SpanData]) -> Result<(), tonic::Status> {
        let body = encode_request(&self.resource, batch);
        let mut client = self.client.clone();
        client.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
        client.unary(tonic::Request::new(Bytes::from(body)), path, RawCodec).await.map(|_| ())
    }
}

/// `ExportTraceServiceRequest { resource_spans: [one ResourceSpans] }`,
/// its spans grouped by instrumentation scope in order of first
/// appearance, as opentelemetry-proto groups them.
pub fn encode_request(resource: &[u8], batch: &[SpanData]) -> Vec<u8> {
    // Each scope's spans are encoded into a buffer of their own; the
    // wrappers around them are sized from those buffers and written in
    // front, so every span's bytes are copied once more, not once per
    // level.
    let mut scopes: Vec<(&InstrumentationScope, Vec<u8>)> = Vec::new();
    let mut span = Vec::with_capacity(512);
    for s in batch {
        let i = match scopes.iter().position(|(scope, _)| *scope == &s.instrumentation_scope) {
            Some(i) => i,
            None => {
                scopes.push((&s.instrumentation_scope, Vec::with_capacity(512 * batch.len())));
                scopes.len() - 1
            }
        };
        span.clear();
        encode_span(&mut span, s);
        message(&mut scopes[i].1, 2, &span);
    }
    // ScopeSpans: scope (1), the spans (2, already tagged), schema_url (3).
    let scope_spans: Vec<(Vec<u8>, &[u8])> = scopes
        .iter()
        .map(|(scope, spans)| {
            let mut head = Vec::new();
            encode_scope(&mut head, scope);
            let mut head_field = Vec::with_capacity(head.len() + 4);
            message(&mut head_field, 1, &head);
            (head_field, spans.as_slice())
        })
        .collect();
    let scope_len = |(head, spans): &(Vec<u8>, &[u8]), schema: &str| head.len() + spans.len() + string_len(3, schema);
    let schemas: Vec<&str> = scopes.iter().map(|(scope, _)| scope.schema_url().unwrap_or_default()).collect();
    let resource_spans_len = resource.len()
        + scope_spans
            .iter()
            .zip(&schemas)
            .map(|(s, schema)| {
                let l = scope_len(s, schema);
                1 + encoded_len_varint(l as u64) + l
            })
            .sum::<usize>();
    let mut out = Vec::with_capacity(resource_spans_len + 8);
    encode_key(1, WireType::LengthDelimited, &mut out);
    encode_varint(resource_spans_len as u64, &mut out);
    out.extend_from_slice(resource);
    for (s, schema) in scope_spans.iter().zip(&schemas) {
        encode_key(2, WireType::LengthDelimited, &mut out);
        encode_varint(scope_len(s, schema) as u64, &mut out);
        out.extend_from_slice(&s.0);
        out.extend_from_slice(s.1);
        string(&mut out, 3, schema);
    }
    out
}

/// `ResourceSpans.resource` (field 1) and `ResourceSpans.schema_url`
/// (field 3; fields may come in any order).
fn encode_resource(resource: &Resource) -> Vec<u8> {
    let mut attributes = Vec::new();
    for (k, v) in resource.iter() {
        key_value(&mut attributes, 1, k.as_str(), v);
    }
    let mut out = Vec::new();
    message(&mut out, 1, &attributes);
    string(&mut out, 3, resource.schema_url().unwrap_or_default());
    out
}

fn encode_scope(out: &mut Vec<u8>, scope: &InstrumentationScope) {
    string(out, 1, scope.name());
    string(out, 2, scope.version().unwrap_or_default());
    attributes(out, 3, scope.attributes());
}

fn encode_span(out: &mut Vec<u8>, s: &SpanData) {
    let cx = &s.span_context;
    bytes_field(out, 1, &cx.trace_id().to_bytes());
    bytes_field(out, 2, &cx.span_id().to_bytes());
    string(out, 3, &cx.trace_state().header());
    if s.parent_span_id != SpanId::INVALID {
        bytes_field(out, 4, &s.parent_span_id.to_bytes());
    }
    string(out, 5, &s.name);
    // SpanKind: the SDK's order differs from the proto's (which has
    // UNSPECIFIED = 0).
    let kind = match s.span_kind {
        opentelemetry::trace::SpanKind::Internal => 1,
        opentelemetry::trace::SpanKind::Server => 2,
        opentelemetry::trace::SpanKind::Client => 3,
        opentelemetry::trace::SpanKind::Producer => 4,
        opentelemetry::trace::SpanKind::Consumer => 5,
    };
    uint(out, 6, kind);
    fixed64(out, 7, nanos(s.start_time));
    fixed64(out, 8, nanos(s.end_time));
    attributes(out, 9, &s.attributes);
    uint(out, 10, u64::from(s.dropped_attributes_count));
    let mut nested = Vec::new();
    for e in s.events.iter() {
        nested.clear();
        fixed64(&mut nested, 1, nanos(e.timestamp));
        string(&mut nested, 2, &e.name);
        attributes(&mut nested, 3, &e.attributes);
        uint(&mut nested, 4, u64::from(e.dropped_attributes_count));
        message(out, 11, &nested);
    }
    uint(out, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        nested.clear();
        let lc = &l.span_context;
        bytes_field(&mut nested, 1, &lc.trace_id().to_bytes());
        bytes_field(&mut nested, 2, &lc.span_id().to_bytes());
        string(&mut nested, 3, &lc.trace_state().header());
        attributes(&mut nested, 4, &l.attributes);
        uint(&mut nested, 5, u64::from(l.dropped_attributes_count));
        fixed32(&mut nested, 6, flags(lc.is_remote(), lc.trace_flags().to_u8()));
        message(out, 13, &nested);
    }
    uint(out, 14, u64::from(s.links.dropped_count));
    // Status is always present, as opentelemetry-proto writes it.
    nested.clear();
    let (code, description) = match &s.status {
        opentelemetry::trace::Status::Unset => (0, ""),
        opentelemetry::trace::Status::Ok => (1, ""),
        opentelemetry::trace::Status::Error { description } => (2, description.as_ref()),
    };
    string(&mut nested, 2, description);
    uint(&mut nested, 3, code);
    message(out, 15, &nested);
    fixed32(out, 16, flags(s.parent_span_is_remote, cx.trace_flags().to_u8()));
}

fn flags(remote: bool, trace_flags: u8) -> u32 {
    u32::from(trace_flags) | CONTEXT_HAS_IS_REMOTE | if remote { CONTEXT_IS_REMOTE } else { 0 }
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as u64
}

// Wire primitives. Scalars at their default are left out, as proto3 (and
// prost) leaves them out; a message field that is present is written even
// when empty.

fn message(out: &mut Vec<u8>, tag: u32, body: &[u8]) {
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(body.len() as u64, out);
    out.extend_from_slice(body);
}

fn bytes_field(out: &mut Vec<u8>, tag: u32, b: &[u8]) {
    if !b.is_empty() {
        message(out, tag, b);
    }
}

fn string(out: &mut Vec<u8>, tag: u32, s: &str) {
    bytes_field(out, tag, s.as_bytes());
}

/// What [`string`] writes, in bytes (tags up to 15 take one byte).
fn string_len(tag: u32, s: &str) -> usize {
    debug_assert!(tag < 16);
    if s.is_empty() {
        0
    } else {
        1 + encoded_len_varint(s.len() as u64) + s.len()
    }
}

fn uint(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::Varint, out);
        encode_varint(v, out);
    }
}

fn fixed64(out: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        encode_key(tag, WireType::SixtyFourBit, out);
        out.put_u64_le(v);
    }
}

fn fixed32(out: &mut Vec<u8>, tag: u32, v: u32) {
    if v != 0 {
        encode_key(tag, WireType::ThirtyTwoBit, out);
        out.put_u32_le(v);
    }
}

fn attributes<'a>(out: &mut Vec<u8>, tag: u32, kvs: impl IntoIterator<Item = &'a KeyValue>) {
    for kv in kvs {
        key_value(out, tag, kv.key.as_str(), &kv.value);
    }
}

/// A `KeyValue` message (key 1, value 2), its length worked out without a
/// buffer of its own.
fn key_value(out: &mut Vec<u8>, tag: u32, key: &str, value: &Value) {
    let value_len = any_value_len(value);
    let key_len = if key.is_empty() { 0 } else { 1 + encoded_len_varint(key.len() as u64) + key.len() };
    let len = key_len + 1 + encoded_len_varint(value_len as u64) + value_len;
    encode_key(tag, WireType::LengthDelimited, out);
    encode_varint(len as u64, out);
    string(out, 1, key);
    encode_key(2, WireType::LengthDelimited, out);
    encode_varint(value_len as u64, out);
    any_value(out, value);
}

/// One scalar of an `AnyValue` oneof. A oneof member is written even at its
/// default (it says which member is set).
enum Scalar<'a> {
    Bool(bool),
    Int(i64),
    Double(f64),
    Str(&'a str),
}

impl Scalar<'_> {
    fn len(&self) -> usize {
        match self {
            Scalar::Bool(_) => 2,
            Scalar::Int(i) => 1 + encoded_len_varint(*i as u64),
            Scalar::Double(_) => 9,
            Scalar::Str(s) => 1 + encoded_len_varint(s.len() as u64) + s.len(),
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        match self {
            Scalar::Bool(b) => {
                encode_key(2, WireType::Varint, out);
                encode_varint(u64::from(*b), out);
            }
            Scalar::Int(i) => {
                encode_key(3, WireType::Varint, out);
                encode_varint(*i as u64, out);
            }
            Scalar::Double(d) => {
                encode_key(4, WireType::SixtyFourBit, out);
                out.put_f64_le(*d);
            }
            Scalar::Str(s) => message(out, 1, s.as_bytes()),
        }
    }
}

/// Calls `f` with each of the array's members as a scalar, without
/// allocating (`Array` is non-exhaustive: a kind this code does not know is
/// written as an empty array).
fn for_each_member<'a>(a: &'a Array, mut f: impl FnMut(Scalar<'a>)) {
    match a {
        Array::Bool(v) => v.iter().for_each(|b| f(Scalar::Bool(*b))),
        Array::I64(v) => v.iter().for_each(|i| f(Scalar::Int(*i))),
        Array::F64(v) => v.iter().for_each(|d| f(Scalar::Double(*d))),
        Array::String(v) => v.iter().for_each(|s| f(Scalar::Str(s.as_str()))),
        _ => {}
    }
}

fn scalar(v: &Value) -> Option<Scalar<'_>> {
    match v {
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::I64(i) => Some(Scalar::Int(*i)),
        Value::F64(d) => Some(Scalar::Double(*d)),
        Value::String(s) => Some(Scalar::Str(s.as_str())),
        _ => None,
    }
}

/// The length of an `ArrayValue` body: each member an `AnyValue` (field 1).
fn array_len(a: &Array) -> usize {
    let mut len = 0;
    for_each_member(a, |m| {
        let l = m.len();
        len += 1 + encoded_len_varint(l as u64) + l;
    });
    len
}

fn any_value_len(v: &Value) -> usize {
    match (scalar(v), v) {
        (Some(s), _) => s.len(),
        (None, Value::Array(a)) => {
            let l = array_len(a);
            1 + encoded_len_varint(l as u64) + l
        }
        // A kind of value this code does not know: an empty AnyValue.
        _ => 0,
    }
}

fn any_value(out: &mut Vec<u8>, v: &Value) {
    match (scalar(v), v) {
        (Some(s), _) => s.write(out),
        (None, Value::Array(a)) => {
            encode_key(5, WireType::LengthDelimited, out);
            encode_varint(array_len(a) as u64, out);
            for_each_member(a, |m| {
                encode_key(1, WireType::LengthDelimited, out);
                encode_varint(m.len() as u64, out);
                m.write(out);
            });
        }
        _ => {}
    }
}

/// Sends an already encoded message and ignores the answer's body (an
/// `ExportTraceServiceResponse`, whose partial-success figures the gateway
/// has no use for).
#[derive(Clone, Copy, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ();
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;

    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), tonic::Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = ();
    type Error = tonic::Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<()>, tonic::Status> {
        src.advance(src.remaining());
        Ok(Some(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanKind, Status, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::{common::tonic::ResourceAttributesWithSchema, trace::tonic::group_spans_by_resource_and_scope};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;

    fn span(name: &'static str, scope: &InstrumentationScope, status: Status, parent: SpanId, kind: SpanKind) -> SpanData {
        let cx = SpanContext::new(
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736),
            SpanId::from(0x00f067aa0ba902b7),
            TraceFlags::SAMPLED,
            false,
            TraceState::from_key_value([("vendor", "v1")]).unwrap(),
        );
        let mut events = SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new("first_content", SystemTime::now(), vec![KeyValue::new("n", 1)], 2));
        let mut links = SpanLinks::default();
        links.links.push(opentelemetry::trace::Link::new(cx.clone(), vec![KeyValue::new("why", "retry")], 0));
        links.dropped_count = 3;
        SpanData {
            span_context: cx,
            parent_span_id: parent,
            parent_span_is_remote: true,
            span_kind: kind,
            name: name.into(),
            start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            end_time: SystemTime::now(),
            attributes: vec![
                KeyValue::new("gen_ai.system", "openai"),
                KeyValue::new("empty", ""),
                KeyValue::new("gen_ai.usage.input_tokens", 0i64),
                KeyValue::new("negative", -5i64),
                KeyValue::new("switchyard.ttft_ms", 1.25),
                KeyValue::new("zero", 0.0),
                KeyValue::new("hedged", false),
                KeyValue::new("retried", true),
                KeyValue::new("gen_ai.response.finish_reasons", Value::Array(vec![opentelemetry::StringValue::from("stop"), "".into()].into())),
                KeyValue::new("ints", Value::Array(vec![0i64, 300].into())),
                KeyValue::new("bools", Value::Array(vec![false, true].into())),
                KeyValue::new("floats", Value::Array(vec![0.5f64].into())),
                KeyValue::new("none", Value::Array(Vec::<i64>::new().into())),
            ],
            dropped_attributes_count: 1,
            events,
            links,
            status,
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn the_export_decodes_to_what_opentelemetry_proto_makes_of_the_same_spans() {
        let resource = Resource::builder().with_service_name("switchyard-test").with_attribute(KeyValue::new("replica", 3)).build();
        let a = InstrumentationScope::builder("switchyard").with_version("1.2").with_attributes([KeyValue::new("x", "y")]).build();
        let b = InstrumentationScope::builder("other").with_schema_url("https://example.com/schema").build();
        let batch = vec![
            span("POST /v1/chat/completions", &a, Status::Ok, SpanId::INVALID, SpanKind::Server),
            span("chat gpt-4o-mini", &b, Status::error("upstream 503"), SpanId::from(7), SpanKind::Client),
            span("attempt 2", &a, Status::Unset, SpanId::from(9), SpanKind::Internal),
        ];
        let ours = ExportTraceServiceRequest::decode(&encode_request(&encode_resource(&resource), &batch)[..]).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(batch, &ResourceAttributesWithSchema::from(&resource)),
        };
        assert_eq!(ours, theirs);
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2, "grouped by scope");
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 2);
    }

    #[test]
    fn an_empty_batch_is_one_resource_and_no_scopes() {
        let resource = Resource::builder().with_service_name("s").build();
        let ours = ExportTraceServiceRequest::decode(&encode_request(&encode_resource(&resource), &[])[..]).unwrap();
        let theirs = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(vec![], &ResourceAttributesWithSchema::from(&resource)),
        };
        assert_eq!(ours, theirs);
    }
}
