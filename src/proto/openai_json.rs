//! OpenAI chat completions JSON ⇄ proto messages, in both directions.
//!
//! Used by the HTTP façade (client JSON in, `chat.completion` and
//! `chat.completion.chunk` out), by the `openai` adapter (proto out to any
//! OpenAI-compatible host, its JSON back in) and by the simulator. Keeping
//! it in one place means the gateway has one idea of what OpenAI JSON is.
//!
//! Requests are parsed field by field so that every refusal names its
//! `param` (`messages[2].content[0].type`); parameters the proto does not name
//! are kept verbatim in `extra_json` and forwarded. Responses are written
//! with borrowed `Serialize` structs that emit exactly the fields OpenAI's
//! published schema requires (`refusal: null`, `logprobs: null`, ...), so the
//! official SDKs parse them.

use serde::Deserialize;
#[cfg(test)] // the serde oracles of the JSON writers
use serde::Serialize;
use serde_json::{value::RawValue, Map, Value};

use super::v1::{
    content_part, message, tool_choice, ChatChunk, ChatCompletion, ChatRequest, Choice, ChunkChoice,
    ContentPart, ContentParts, Delta, FinishReason, FunctionDefinition, ImageUrl, InputAudio, Message,
    ResponseFormat, Role, StreamOptions, Tool, ToolCall, ToolChoice, Usage,
};
use crate::error::Error;

/// A parsed client request: the proto message and whether it asked to
/// stream (which picks the RPC, so it is not part of the message).
pub struct ParsedRequest {
    pub request: ChatRequest,
    pub stream: bool,
}

fn bad(param: &str, message: impl Into<String>) -> Error {
    Error::invalid_param(message, param)
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn as_str<'a>(v: &'a Value, param: &str) -> Result<&'a str, Error> {
    v.as_str().ok_or_else(|| bad(param, format!("'{param}' must be a string, got {}", type_name(v))))
}

fn as_f64(v: &Value, param: &str) -> Result<f64, Error> {
    v.as_f64().ok_or_else(|| bad(param, format!("'{param}' must be a number, got {}", type_name(v))))
}

fn as_u32(v: &Value, param: &str) -> Result<u32, Error> {
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| bad(param, format!("'{param}' must be a non-negative integer")))
}

fn as_bool(v: &Value, param: &str) -> Result<bool, Error> {
    v.as_bool().ok_or_else(|| bad(param, format!("'{param}' must be a boolean, got {}", type_name(v))))
}

fn as_object<'a>(v: &'a Value, param: &str) -> Result<&'a Map<String, Value>, Error> {
    v.as_object().ok_or_else(|| bad(param, format!("'{param}' must be an object, got {}", type_name(v))))
}

fn as_array<'a>(v: &'a Value, param: &str) -> Result<&'a Vec<Value>, Error> {
    v.as_array().ok_or_else(|| bad(param, format!("'{param}' must be an array, got {}", type_name(v))))
}

/// Takes a key out of a map, treating JSON `null` as absent.
fn take(map: &mut Map<String, Value>, key: &str) -> Option<Value> {
    map.remove(key).filter(|v| !v.is_null())
}

fn extra_json(map: Map<String, Value>) -> String {
    if map.is_empty() {
        String::new()
    } else {
        Value::Object(map).to_string()
    }
}

/// Parses an OpenAI chat completions request body.
pub fn parse_request(body: &[u8]) -> Result<ParsedRequest, Error> {
    // UTF-8 checked once over the whole body: `from_slice` checks each
    // string on its own, which costs more (callgrind).
    let text = std::str::from_utf8(body).map_err(|e| Error::invalid(format!("request body is not valid JSON: {e}"), None))?;
    let value: Value = serde_json::from_str(text).map_err(|e| Error::invalid(format!("request body is not valid JSON: {e}"), None))?;
    let Value::Object(mut map) = value else {
        return Err(Error::invalid("request body must be a JSON object", None));
    };
    let model = match take(&mut map, "model") {
        None => return Err(bad("model", "'model' is required")),
        Some(v) => as_str(&v, "model")?.to_owned(),
    };
    if model.is_empty() {
        return Err(bad("model", "'model' must not be empty"));
    }
    let messages = match take(&mut map, "messages") {
        None => return Err(bad("messages", "'messages' is required")),
        Some(v) => {
            let arr = match v {
                Value::Array(arr) => arr,
                other => return Err(bad("messages", format!("'messages' must be an array, got {}", type_name(&other)))),
            };
            if arr.is_empty() {
                return Err(bad("messages", "'messages' must be a non-empty array"));
            }
            arr.into_iter()
                .enumerate()
                .map(|(i, m)| parse_message(m, &format!("messages[{i}]")))
                .collect::<Result<Vec<_>, _>>()?
        }
    };
    let stream = take(&mut map, "stream").map(|v| as_bool(&v, "stream")).transpose()?.unwrap_or(false);
    let opt_f64 = |map: &mut Map<String, Value>, k: &str| take(map, k).map(|v| as_f64(&v, k)).transpose();
    let opt_u32 = |map: &mut Map<String, Value>, k: &str| take(map, k).map(|v| as_u32(&v, k)).transpose();

    let mut req = ChatRequest {
        model,
        messages,
        temperature: opt_f64(&mut map, "temperature")?,
        top_p: opt_f64(&mut map, "top_p")?,
        n: opt_u32(&mut map, "n")?,
        max_tokens: opt_u32(&mut map, "max_tokens")?,
        max_completion_tokens: opt_u32(&mut map, "max_completion_tokens")?,
        presence_penalty: opt_f64(&mut map, "presence_penalty")?,
        frequency_penalty: opt_f64(&mut map, "frequency_penalty")?,
        top_logprobs: opt_u32(&mut map, "top_logprobs")?,
        ..Default::default()
    };
    if req.n == Some(0) {
        return Err(bad("n", "'n' must be at least 1"));
    }
    if let Some(v) = take(&mut map, "stop") {
        req.stop = match &v {
            Value::String(s) => vec![s.clone()],
            Value::Array(a) => a
                .iter()
                .enumerate()
                .map(|(i, s)| as_str(s, &format!("stop[{i}]")).map(str::to_owned))
                .collect::<Result<_, _>>()?,
            other => return Err(bad("stop", format!("'stop' must be a string or an array of strings, got {}", type_name(other)))),
        };
    }
    if let Some(v) = take(&mut map, "seed") {
        req.seed = Some(v.as_i64().ok_or_else(|| bad("seed", "'seed' must be an integer"))?);
    }
    if let Some(v) = take(&mut map, "logprobs") {
        req.logprobs = Some(as_bool(&v, "logprobs")?);
    }
    if let Some(v) = take(&mut map, "parallel_tool_calls") {
        req.parallel_tool_calls = Some(as_bool(&v, "parallel_tool_calls")?);
    }
    if let Some(v) = take(&mut map, "user") {
        req.user = Some(as_str(&v, "user")?.to_owned());
    }
    if let Some(v) = take(&mut map, "tools") {
        req.tools = as_array(&v, "tools")?
            .iter()
            .enumerate()
            .map(|(i, t)| parse_tool(t, &format!("tools[{i}]")))
            .collect::<Result<_, _>>()?;
    }
    if let Some(v) = take(&mut map, "tool_choice") {
        req.tool_choice = Some(parse_tool_choice(&v)?);
    }
    if let Some(v) = take(&mut map, "response_format") {
        let o = as_object(&v, "response_format")?;
        let kind = o.get("type").ok_or_else(|| bad("response_format.type", "'response_format.type' is required"))?;
        let kind = as_str(kind, "response_format.type")?;
        if !matches!(kind, "text" | "json_object" | "json_schema") {
            return Err(bad("response_format.type", format!("unsupported response_format type {kind:?}")));
        }
        let schema = match o.get("json_schema") {
            Some(s) if !s.is_null() => {
                as_object(s, "response_format.json_schema")?;
                s.to_string()
            }
            _ if kind == "json_schema" => {
                return Err(bad("response_format.json_schema", "'response_format.json_schema' is required for type json_schema"))
            }
            _ => String::new(),
        };
        req.response_format = Some(ResponseFormat {
            r#type: kind.to_owned(),
            json_schema_json: schema,
        });
    }
    if let Some(v) = take(&mut map, "stream_options") {
        let o = as_object(&v, "stream_options")?;
        let include_usage = match o.get("include_usage") {
            Some(b) if !b.is_null() => as_bool(b, "stream_options.include_usage")?,
            _ => false,
        };
        req.stream_options = Some(StreamOptions { include_usage });
    }
    req.extra_json = extra_json(map);
    Ok(ParsedRequest { request: req, stream })
}

/// One message, taken apart without a copy; the paths errors name are
/// only formatted for an error.
fn parse_message(v: Value, path: &str) -> Result<Message, Error> {
    let mut map = match v {
        Value::Object(map) => map,
        other => return Err(bad(path, format!("'{path}' must be an object, got {}", type_name(&other)))),
    };
    let role = match take(&mut map, "role") {
        None => {
            let role_path = format!("{path}.role");
            return Err(bad(&role_path, format!("'{role_path}' is required")));
        }
        Some(r) => match r.as_str().and_then(Role::from_openai) {
            Some(role) => role,
            None => {
                let role_path = format!("{path}.role");
                let s = as_str(&r, &role_path)?;
                return Err(bad(&role_path, format!("'{role_path}' must be one of system, developer, user, assistant, tool; got {s:?}")));
            }
        },
    };
    let content = match take(&mut map, "content") {
        None => None,
        Some(Value::String(s)) => Some(message::Content::Text(s)),
        Some(Value::Array(parts)) => Some(message::Content::Parts(ContentParts {
            parts: parts
                .iter()
                .enumerate()
                .map(|(i, p)| parse_part(p, &format!("{path}.content[{i}]")))
                .collect::<Result<_, _>>()?,
        })),
        Some(other) => {
            let content_path = format!("{path}.content");
            return Err(bad(&content_path, format!("'{content_path}' must be a string or an array of content parts, got {}", type_name(&other))))
        }
    };
    let mut m = Message {
        role: role as i32,
        content,
        ..Default::default()
    };
    if let Some(n) = take(&mut map, "name") {
        m.name = Some(as_str(&n, &format!("{path}.name"))?.to_owned());
    }
    if let Some(id) = take(&mut map, "tool_call_id") {
        m.tool_call_id = Some(as_str(&id, &format!("{path}.tool_call_id"))?.to_owned());
    }
    if let Some(r) = take(&mut map, "refusal") {
        m.refusal = Some(as_str(&r, &format!("{path}.refusal"))?.to_owned());
    }
    if let Some(calls) = take(&mut map, "tool_calls") {
        let tc_path = format!("{path}.tool_calls");
        m.tool_calls = as_array(&calls, &tc_path)?
            .iter()
            .enumerate()
            .map(|(i, c)| parse_tool_call(c, i as u32, &format!("{tc_path}[{i}]")))
            .collect::<Result<_, _>>()?;
    }
    if role == Role::Tool && m.tool_call_id.is_none() {
        let p = format!("{path}.tool_call_id");
        return Err(bad(&p, format!("'{p}' is required for role tool")));
    }
    m.extra_json = extra_json(map);
    Ok(m)
}

fn parse_part(v: &Value, path: &str) -> Result<ContentPart, Error> {
    let o = as_object(v, path)?;
    let type_path = format!("{path}.type");
    let kind = as_str(o.get("type").ok_or_else(|| bad(&type_path, format!("'{type_path}' is required")))?, &type_path)?;
    let part = match kind {
        "text" => {
            let p = format!("{path}.text");
            content_part::Part::Text(as_str(o.get("text").unwrap_or(&Value::Null), &p)?.to_owned())
        }
        "image_url" => {
            let p = format!("{path}.image_url");
            let img = as_object(o.get("image_url").unwrap_or(&Value::Null), &p)?;
            let url_p = format!("{p}.url");
            let url = as_str(img.get("url").unwrap_or(&Value::Null), &url_p)?.to_owned();
            let detail = match img.get("detail") {
                Some(d) if !d.is_null() => Some(as_str(d, &format!("{p}.detail"))?.to_owned()),
                _ => None,
            };
            content_part::Part::ImageUrl(ImageUrl { url, detail })
        }
        "input_audio" => {
            let p = format!("{path}.input_audio");
            let a = as_object(o.get("input_audio").unwrap_or(&Value::Null), &p)?;
            content_part::Part::InputAudio(InputAudio {
                data: as_str(a.get("data").unwrap_or(&Value::Null), &format!("{p}.data"))?.to_owned(),
                format: as_str(a.get("format").unwrap_or(&Value::Null), &format!("{p}.format"))?.to_owned(),
            })
        }
        _ => content_part::Part::OtherJson(v.to_string()),
    };
    Ok(ContentPart { part: Some(part) })
}

fn parse_tool_call(v: &Value, index: u32, path: &str) -> Result<ToolCall, Error> {
    let o = as_object(v, path)?;
    let f_path = format!("{path}.function");
    let f = as_object(o.get("function").unwrap_or(&Value::Null), &f_path)?;
    let id = match o.get("id") {
        Some(id) if !id.is_null() => Some(as_str(id, &format!("{path}.id"))?.to_owned()),
        _ => None,
    };
    Ok(ToolCall {
        index,
        id,
        r#type: Some("function".into()),
        name: Some(as_str(f.get("name").unwrap_or(&Value::Null), &format!("{f_path}.name"))?.to_owned()),
        arguments: match f.get("arguments") {
            Some(a) if !a.is_null() => as_str(a, &format!("{f_path}.arguments"))?.to_owned(),
            _ => String::new(),
        },
    })
}

fn parse_tool(v: &Value, path: &str) -> Result<Tool, Error> {
    let o = as_object(v, path)?;
    let type_path = format!("{path}.type");
    let kind = as_str(o.get("type").unwrap_or(&Value::Null), &type_path)?;
    if kind != "function" {
        return Err(bad(&type_path, format!("unsupported tool type {kind:?}; only \"function\" tools are routed")));
    }
    let f_path = format!("{path}.function");
    let f = as_object(o.get("function").unwrap_or(&Value::Null), &f_path)?;
    let name = as_str(f.get("name").unwrap_or(&Value::Null), &format!("{f_path}.name"))?.to_owned();
    let description = match f.get("description") {
        Some(d) if !d.is_null() => Some(as_str(d, &format!("{f_path}.description"))?.to_owned()),
        _ => None,
    };
    let parameters_json = match f.get("parameters") {
        Some(p) if !p.is_null() => {
            as_object(p, &format!("{f_path}.parameters"))?;
            p.to_string()
        }
        _ => String::new(),
    };
    let strict = match f.get("strict") {
        Some(s) if !s.is_null() => Some(as_bool(s, &format!("{f_path}.strict"))?),
        _ => None,
    };
    Ok(Tool {
        r#type: "function".into(),
        function: Some(FunctionDefinition {
            name,
            description,
            parameters_json,
            strict,
        }),
    })
}

fn parse_tool_choice(v: &Value) -> Result<ToolChoice, Error> {
    let choice = match v {
        Value::String(s) if matches!(s.as_str(), "none" | "auto" | "required") => tool_choice::Choice::Mode(s.clone()),
        Value::Object(o) => {
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| bad("tool_choice.function.name", "'tool_choice.function.name' is required"))?;
            tool_choice::Choice::FunctionName(name.to_owned())
        }
        _ => return Err(bad("tool_choice", "'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\":\"function\",\"function\":{\"name\":...}}")),
    };
    Ok(ToolChoice { choice: Some(choice) })
}

// ---------------------------------------------------------------------------
// proto → OpenAI request JSON (what the `openai` adapter sends upstream)
// ---------------------------------------------------------------------------

/// The OpenAI request body for `req`, addressed to `upstream_model`.
/// Parameters from `extra_json` go first so that a typed field always wins.
pub fn request_to_json(req: &ChatRequest, upstream_model: &str, stream: bool) -> Value {
    let mut map = parse_extra(&req.extra_json);
    map.insert("model".into(), upstream_model.into());
    map.insert("messages".into(), Value::Array(req.messages.iter().map(message_to_json).collect()));
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            map.insert(k.to_owned(), v);
        }
    };
    put("temperature", req.temperature.map(Value::from));
    put("top_p", req.top_p.map(Value::from));
    put("n", req.n.map(Value::from));
    put("max_tokens", req.max_tokens.map(Value::from));
    put("max_completion_tokens", req.max_completion_tokens.map(Value::from));
    put("seed", req.seed.map(Value::from));
    put("presence_penalty", req.presence_penalty.map(Value::from));
    put("frequency_penalty", req.frequency_penalty.map(Value::from));
    put("logprobs", req.logprobs.map(Value::from));
    put("top_logprobs", req.top_logprobs.map(Value::from));
    put("user", req.user.clone().map(Value::from));
    put("parallel_tool_calls", req.parallel_tool_calls.map(Value::from));
    if !req.stop.is_empty() {
        put("stop", Some(Value::from(req.stop.clone())));
    }
    if !req.tools.is_empty() {
        put("tools", Some(Value::Array(req.tools.iter().map(tool_to_json).collect())));
    }
    put(
        "tool_choice",
        req.tool_choice.as_ref().and_then(|c| c.choice.as_ref()).map(|c| match c {
            tool_choice::Choice::Mode(m) => Value::from(m.clone()),
            tool_choice::Choice::FunctionName(n) => serde_json::json!({"type": "function", "function": {"name": n}}),
        }),
    );
    put(
        "response_format",
        req.response_format.as_ref().map(|f| {
            let mut o = Map::new();
            o.insert("type".into(), f.r#type.clone().into());
            if let Ok(s) = serde_json::from_str::<Value>(&f.json_schema_json) {
                o.insert("json_schema".into(), s);
            }
            Value::Object(o)
        }),
    );
    if stream {
        put("stream", Some(Value::Bool(true)));
        // Always ask for usage: accounting needs it whether or not the
        // client did; the core hides the usage chunk from clients that did
        // not ask.
        put("stream_options", Some(serde_json::json!({"include_usage": true})));
    }
    Value::Object(map)
}

fn parse_extra(s: &str) -> Map<String, Value> {
    if s.is_empty() {
        return Map::new();
    }
    match serde_json::from_str(s) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

pub fn message_to_json(m: &Message) -> Value {
    let mut map = parse_extra(&m.extra_json);
    let role = Role::try_from(m.role).unwrap_or(Role::User);
    map.insert("role".into(), role.openai_name().into());
    let content = match &m.content {
        None => Value::Null,
        Some(message::Content::Text(t)) => Value::from(t.clone()),
        Some(message::Content::Parts(p)) => Value::Array(p.parts.iter().filter_map(part_to_json).collect()),
    };
    map.insert("content".into(), content);
    if let Some(n) = &m.name {
        map.insert("name".into(), n.clone().into());
    }
    if let Some(id) = &m.tool_call_id {
        map.insert("tool_call_id".into(), id.clone().into());
    }
    if let Some(r) = &m.refusal {
        map.insert("refusal".into(), r.clone().into());
    }
    if !m.tool_calls.is_empty() {
        map.insert(
            "tool_calls".into(),
            Value::Array(
                m.tool_calls
                    .iter()
                    .map(|c| {
                        serde_json::json!({
                            "id": c.id.clone().unwrap_or_default(),
                            "type": "function",
                            "function": {"name": c.name.clone().unwrap_or_default(), "arguments": c.arguments},
                        })
                    })
                    .collect(),
            ),
        );
    }
    Value::Object(map)
}

fn part_to_json(p: &ContentPart) -> Option<Value> {
    Some(match p.part.as_ref()? {
        content_part::Part::Text(t) => serde_json::json!({"type": "text", "text": t}),
        content_part::Part::ImageUrl(i) => {
            let mut img = serde_json::json!({"url": i.url});
            if let Some(d) = &i.detail {
                img["detail"] = d.clone().into();
            }
            serde_json::json!({"type": "image_url", "image_url": img})
        }
        content_part::Part::InputAudio(a) => serde_json::json!({"type": "input_audio", "input_audio": {"data": a.data, "format": a.format}}),
        content_part::Part::OtherJson(s) => serde_json::from_str(s).ok()?,
    })
}

fn tool_to_json(t: &Tool) -> Value {
    let f = t.function.clone().unwrap_or_default();
    let mut func = Map::new();
    func.insert("name".into(), f.name.into());
    if let Some(d) = f.description {
        func.insert("description".into(), d.into());
    }
    if let Ok(p) = serde_json::from_str::<Value>(&f.parameters_json) {
        func.insert("parameters".into(), p);
    }
    if let Some(s) = f.strict {
        func.insert("strict".into(), s.into());
    }
    serde_json::json!({"type": "function", "function": func})
}

// ---------------------------------------------------------------------------
// proto → OpenAI response JSON (what clients receive)
// ---------------------------------------------------------------------------

#[cfg(test)] // the oracle for completion_to_json
#[derive(Serialize)]
struct OutCompletion<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: Vec<OutChoice<'a>>,
    usage: OutUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_fingerprint: Option<&'a str>,
}

#[cfg(test)] // the oracle for completion_to_json
#[derive(Serialize)]
struct OutChoice<'a> {
    index: u32,
    message: OutMessage<'a>,
    finish_reason: &'static str,
    logprobs: Option<&'a RawValue>,
}

#[cfg(test)] // the oracle for completion_to_json
#[derive(Serialize)]
struct OutMessage<'a> {
    role: &'static str,
    content: Option<&'a str>,
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCall<'a>>,
}

#[cfg(test)] // the oracle for completion_to_json
#[derive(Serialize)]
struct OutToolCall<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'static str,
    function: OutFunction<'a>,
}

#[cfg(test)] // the oracle for completion_to_json
#[derive(Serialize)]
struct OutFunction<'a> {
    name: &'a str,
    arguments: &'a str,
}

#[cfg(test)] // the oracle for completion_to_json and ChunkWriter
#[derive(Serialize)]
struct OutUsage {
    prompt_tokens: u32,
    completion_tokens: u32,
    total_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    prompt_tokens_details: Option<OutPromptDetails>,
    #[serde(skip_serializing_if = "Option::is_none")]
    completion_tokens_details: Option<OutCompletionDetails>,
}

#[cfg(test)] // the oracle for completion_to_json and ChunkWriter
#[derive(Serialize)]
struct OutPromptDetails {
    cached_tokens: u32,
}

#[cfg(test)] // the oracle for completion_to_json and ChunkWriter
#[derive(Serialize)]
struct OutCompletionDetails {
    reasoning_tokens: u32,
}

#[cfg(test)]
impl From<&Usage> for OutUsage {
    fn from(u: &Usage) -> Self {
        OutUsage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            prompt_tokens_details: u.cached_tokens.map(|cached_tokens| OutPromptDetails { cached_tokens }),
            completion_tokens_details: u.reasoning_tokens.map(|reasoning_tokens| OutCompletionDetails { reasoning_tokens }),
        }
    }
}

#[cfg(test)] // the oracle for ChunkWriter
#[derive(Serialize)]
struct OutChunkHead<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
}

#[cfg(test)] // the oracle for ChunkWriter
#[derive(Serialize)]
struct OutChunkChoice<'a> {
    index: u32,
    delta: OutDelta<'a>,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<&'a RawValue>,
}

#[cfg(test)] // the oracle for ChunkWriter
#[derive(Serialize)]
struct OutDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    refusal: Option<&'a str>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OutToolCallDelta<'a>>,
}

#[cfg(test)] // the oracle for ChunkWriter
#[derive(Serialize)]
struct OutToolCallDelta<'a> {
    index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<&'static str>,
    function: OutFunctionDelta<'a>,
}

#[cfg(test)] // the oracle for ChunkWriter
#[derive(Serialize)]
struct OutFunctionDelta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    arguments: &'a str,
}

fn raw(s: &str) -> Option<&RawValue> {
    if s.is_empty() {
        None
    } else {
        serde_json::from_str::<&RawValue>(s).ok()
    }
}

/// A `chat.completion` object: the bytes serde_json writes for the
/// `Out*` structs (the tests compare them), written piece by piece — its
/// escape loop over the constant keys was most of the body's cost.
pub fn completion_to_json(c: &ChatCompletion) -> Vec<u8> {
    use super::json_write::{int, opt_string, string};
    let mut out = Vec::with_capacity(384 + c.choices.iter().map(|ch| ch.message.as_ref().map_or(0, |m| match &m.content {
        Some(message::Content::Text(t)) => t.len(),
        _ => 0,
    })).sum::<usize>());
    out.extend_from_slice(b"{\"id\":");
    string(&mut out, &c.id);
    out.extend_from_slice(b",\"object\":\"chat.completion\",\"created\":");
    int(&mut out, c.created);
    out.extend_from_slice(b",\"model\":");
    string(&mut out, &c.model);
    out.extend_from_slice(b",\"choices\":[");
    for (i, ch) in c.choices.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let m = ch.message.as_ref();
        out.extend_from_slice(b"{\"index\":");
        int(&mut out, ch.index);
        out.extend_from_slice(b",\"message\":{\"role\":\"assistant\",\"content\":");
        opt_string(&mut out, m.and_then(|m| match &m.content {
            Some(message::Content::Text(t)) => Some(t.as_str()),
            _ => None,
        }));
        out.extend_from_slice(b",\"refusal\":");
        opt_string(&mut out, m.and_then(|m| m.refusal.as_deref()));
        if let Some(calls) = m.map(|m| &m.tool_calls).filter(|t| !t.is_empty()) {
            out.extend_from_slice(b",\"tool_calls\":[");
            for (j, t) in calls.iter().enumerate() {
                if j > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"id\":");
                string(&mut out, t.id.as_deref().unwrap_or_default());
                out.extend_from_slice(b",\"type\":\"function\",\"function\":{\"name\":");
                string(&mut out, t.name.as_deref().unwrap_or_default());
                out.extend_from_slice(b",\"arguments\":");
                string(&mut out, &t.arguments);
                out.extend_from_slice(b"}}");
            }
            out.push(b']');
        }
        out.extend_from_slice(b"},\"finish_reason\":");
        let finish = FinishReason::try_from(ch.finish_reason).ok().and_then(FinishReason::openai_name).unwrap_or("stop");
        string(&mut out, finish);
        out.extend_from_slice(b",\"logprobs\":");
        match raw(&ch.logprobs_json) {
            Some(r) => out.extend_from_slice(r.get().as_bytes()),
            None => out.extend_from_slice(b"null"),
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"usage\":");
    usage_to_json(&mut out, c.usage.as_ref().unwrap_or(&Usage::default()));
    if let Some(fp) = &c.system_fingerprint {
        out.extend_from_slice(b",\"system_fingerprint\":");
        string(&mut out, fp);
    }
    out.push(b'}');
    out
}

/// A `usage` object, as serde_json writes [`OutUsage`].
fn usage_to_json(out: &mut Vec<u8>, u: &Usage) {
    use super::json_write::int;
    out.extend_from_slice(b"{\"prompt_tokens\":");
    int(out, u.prompt_tokens);
    out.extend_from_slice(b",\"completion_tokens\":");
    int(out, u.completion_tokens);
    out.extend_from_slice(b",\"total_tokens\":");
    int(out, u.total_tokens);
    if let Some(cached) = u.cached_tokens {
        out.extend_from_slice(b",\"prompt_tokens_details\":{\"cached_tokens\":");
        int(out, cached);
        out.push(b'}');
    }
    if let Some(reasoning) = u.reasoning_tokens {
        out.extend_from_slice(b",\"completion_tokens_details\":{\"reasoning_tokens\":");
        int(out, reasoning);
        out.push(b'}');
    }
    out.push(b'}');
}

/// The serde form of [`completion_to_json`], which must write its bytes.
#[cfg(test)]
fn completion_to_json_serde(c: &ChatCompletion) -> Vec<u8> {
    let out = OutCompletion {
        id: &c.id,
        object: "chat.completion",
        created: c.created,
        model: &c.model,
        choices: c
            .choices
            .iter()
            .map(|ch| {
                let m = ch.message.as_ref();
                let content = m.and_then(|m| match &m.content {
                    Some(message::Content::Text(t)) => Some(t.as_str()),
                    _ => None,
                });
                OutChoice {
                    index: ch.index,
                    message: OutMessage {
                        role: "assistant",
                        content,
                        refusal: m.and_then(|m| m.refusal.as_deref()),
                        tool_calls: m
                            .map(|m| {
                                m.tool_calls
                                    .iter()
                                    .map(|t| OutToolCall {
                                        id: t.id.as_deref().unwrap_or_default(),
                                        kind: "function",
                                        function: OutFunction {
                                            name: t.name.as_deref().unwrap_or_default(),
                                            arguments: &t.arguments,
                                        },
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    },
                    finish_reason: FinishReason::try_from(ch.finish_reason)
                        .ok()
                        .and_then(FinishReason::openai_name)
                        .unwrap_or("stop"),
                    logprobs: raw(&ch.logprobs_json),
                }
            })
            .collect(),
        usage: c.usage.as_ref().map(OutUsage::from).unwrap_or(OutUsage::from(&Usage::default())),
        system_fingerprint: c.system_fingerprint.as_deref(),
    };
    serde_json::to_vec(&out).unwrap_or_default()
}

/// A `chat.completion.chunk` object on its own (a stream's are written by
/// a [`ChunkWriter`]).
pub fn chunk_to_json(c: &ChatChunk) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    ChunkWriter::default().write(&mut out, c);
    out
}

/// Writes one stream's `chat.completion.chunk` objects. The part every
/// chunk of a stream shares (`{"id":…,"object":…,"created":…,"model":…,`) is
/// serialised once and copied after: it was about half of each chunk's
/// escaping work (callgrind).
#[derive(Default)]
pub struct ChunkWriter {
    head: Vec<u8>,
    id: String,
    created: i64,
    model: String,
}

impl ChunkWriter {
    /// One chunk: the bytes serde_json writes for the `Out*` structs (the
    /// tests compare them), written piece by piece like
    /// [`completion_to_json`].
    pub fn write(&mut self, out: &mut Vec<u8>, c: &ChatChunk) {
        use super::json_write::{int, opt_string, string};
        if self.head.is_empty() || self.id != c.id || self.created != c.created || self.model != c.model {
            self.head.clear();
            self.head.extend_from_slice(b"{\"id\":");
            string(&mut self.head, &c.id);
            self.head.extend_from_slice(b",\"object\":\"chat.completion.chunk\",\"created\":");
            int(&mut self.head, c.created);
            self.head.extend_from_slice(b",\"model\":");
            string(&mut self.head, &c.model);
            // Left open for the rest of the object.
            self.head.push(b',');
            self.id.clone_from(&c.id);
            self.created = c.created;
            self.model.clone_from(&c.model);
        }
        out.extend_from_slice(&self.head);
        out.extend_from_slice(b"\"choices\":[");
        for (i, ch) in c.choices.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            int(out, ch.index);
            out.extend_from_slice(b",\"delta\":{");
            if let Some(d) = &ch.delta {
                delta_fields(out, d);
            }
            out.extend_from_slice(b"},\"finish_reason\":");
            opt_string(out, FinishReason::try_from(ch.finish_reason).ok().and_then(FinishReason::openai_name));
            if let Some(r) = raw(&ch.logprobs_json) {
                out.extend_from_slice(b",\"logprobs\":");
                out.extend_from_slice(r.get().as_bytes());
            }
            out.push(b'}');
        }
        out.push(b']');
        if let Some(u) = &c.usage {
            out.extend_from_slice(b",\"usage\":");
            usage_to_json(out, u);
        }
        if let Some(fp) = &c.system_fingerprint {
            out.extend_from_slice(b",\"system_fingerprint\":");
            string(out, fp);
        }
        out.push(b'}');
    }
}

/// A delta's fields, each only when it has a value (as [`OutDelta`]).
fn delta_fields(out: &mut Vec<u8>, d: &Delta) {
    use super::json_write::{int, string};
    let mut first = true;
    let mut key = |out: &mut Vec<u8>, key: &[u8]| {
        if !std::mem::take(&mut first) {
            out.push(b',');
        }
        out.extend_from_slice(key);
    };
    if let Some(role) = d.role.and_then(|r| Role::try_from(r).ok()).map(Role::openai_name) {
        key(out, b"\"role\":");
        string(out, role);
    }
    if let Some(content) = &d.content {
        key(out, b"\"content\":");
        string(out, content);
    }
    if let Some(refusal) = &d.refusal {
        key(out, b"\"refusal\":");
        string(out, refusal);
    }
    if !d.tool_calls.is_empty() {
        key(out, b"\"tool_calls\":[");
        for (i, t) in d.tool_calls.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b"{\"index\":");
            int(out, t.index);
            if let Some(id) = &t.id {
                out.extend_from_slice(b",\"id\":");
                string(out, id);
                out.extend_from_slice(b",\"type\":\"function\"");
            }
            out.extend_from_slice(b",\"function\":{");
            if let Some(name) = &t.name {
                out.extend_from_slice(b"\"name\":");
                string(out, name);
                out.push(b',');
            }
            out.extend_from_slice(b"\"arguments\":");
            string(out, &t.arguments);
            out.extend_from_slice(b"}}");
        }
        out.push(b']');
    }
}

/// The serde form of [`ChunkWriter::write`] for one chunk, which must write
/// its bytes.
#[cfg(test)]
fn chunk_to_json_serde(c: &ChatChunk) -> Vec<u8> {
    let mut out = Vec::new();
    let head = OutChunkHead {
        id: &c.id,
        object: "chat.completion.chunk",
        created: c.created,
        model: &c.model,
    };
    let _ = serde_json::to_writer(&mut out, &head);
    out.pop();
    out.push(b',');
    let choices: Vec<OutChunkChoice<'_>> = c
        .choices
        .iter()
        .map(|ch| {
            let d = ch.delta.as_ref();
            OutChunkChoice {
                index: ch.index,
                delta: OutDelta {
                    role: d.and_then(|d| d.role).and_then(|r| Role::try_from(r).ok()).map(Role::openai_name),
                    content: d.and_then(|d| d.content.as_deref()),
                    refusal: d.and_then(|d| d.refusal.as_deref()),
                    tool_calls: d
                        .map(|d| {
                            d.tool_calls
                                .iter()
                                .map(|t| OutToolCallDelta {
                                    index: t.index,
                                    id: t.id.as_deref(),
                                    kind: t.id.as_ref().map(|_| "function"),
                                    function: OutFunctionDelta {
                                        name: t.name.as_deref(),
                                        arguments: &t.arguments,
                                    },
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                },
                finish_reason: FinishReason::try_from(ch.finish_reason).ok().and_then(FinishReason::openai_name),
                logprobs: raw(&ch.logprobs_json),
            }
        })
        .collect();
    out.extend_from_slice(b"\"choices\":");
    let _ = serde_json::to_writer(&mut out, &choices);
    if let Some(u) = &c.usage {
        out.extend_from_slice(b",\"usage\":");
        let _ = serde_json::to_writer(&mut out, &OutUsage::from(u));
    }
    if let Some(fp) = &c.system_fingerprint {
        out.extend_from_slice(b",\"system_fingerprint\":");
        let _ = serde_json::to_writer(&mut out, fp);
    }
    out.push(b'}');
    out
}

// ---------------------------------------------------------------------------
// OpenAI response JSON → proto (what the `openai` adapter receives)
// ---------------------------------------------------------------------------

#[derive(Deserialize)]
struct InCompletion {
    #[serde(default)]
    id: String,
    #[serde(default)]
    created: i64,
    #[serde(default)]
    choices: Vec<InChoice>,
    usage: Option<InUsage>,
    system_fingerprint: Option<String>,
}

#[derive(Deserialize)]
struct InChoice {
    #[serde(default)]
    index: u32,
    message: Option<InMessage>,
    finish_reason: Option<String>,
    logprobs: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct InMessage {
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<InToolCall>>,
}

#[derive(Deserialize)]
struct InToolCall {
    index: Option<u32>,
    id: Option<String>,
    function: Option<InFunction>,
}

#[derive(Deserialize)]
struct InFunction {
    name: Option<String>,
    arguments: Option<String>,
}

#[derive(Deserialize)]
struct InUsage {
    #[serde(default)]
    prompt_tokens: u32,
    #[serde(default)]
    completion_tokens: u32,
    #[serde(default)]
    total_tokens: u32,
    prompt_tokens_details: Option<InPromptDetails>,
    completion_tokens_details: Option<InCompletionDetails>,
}

#[derive(Deserialize)]
struct InPromptDetails {
    cached_tokens: Option<u32>,
}

#[derive(Deserialize)]
struct InCompletionDetails {
    reasoning_tokens: Option<u32>,
}

/// An upstream chunk. Its `id`, `created` and `model` are not read: the
/// relay gives every chunk the stream's own.
#[derive(Deserialize)]
struct InChunk {
    #[serde(default)]
    choices: Vec<InChunkChoice>,
    usage: Option<InUsage>,
    system_fingerprint: Option<String>,
}

#[derive(Deserialize)]
struct InChunkChoice {
    #[serde(default)]
    index: u32,
    delta: Option<InDelta>,
    finish_reason: Option<String>,
    logprobs: Option<Box<RawValue>>,
}

#[derive(Deserialize)]
struct InDelta {
    role: Option<String>,
    content: Option<String>,
    refusal: Option<String>,
    tool_calls: Option<Vec<InToolCall>>,
}

impl From<InUsage> for Usage {
    fn from(u: InUsage) -> Self {
        Usage {
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: if u.total_tokens == 0 {
                u.prompt_tokens.saturating_add(u.completion_tokens)
            } else {
                u.total_tokens
            },
            cached_tokens: u.prompt_tokens_details.and_then(|d| d.cached_tokens),
            reasoning_tokens: u.completion_tokens_details.and_then(|d| d.reasoning_tokens),
        }
    }
}

fn tool_calls_in(calls: Option<Vec<InToolCall>>) -> Vec<ToolCall> {
    calls
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, c)| {
            let f = c.function;
            ToolCall {
                index: c.index.unwrap_or(i as u32),
                r#type: c.id.as_ref().map(|_| "function".to_owned()),
                id: c.id,
                name: f.as_ref().and_then(|f| f.name.clone()),
                arguments: f.and_then(|f| f.arguments).unwrap_or_default(),
            }
        })
        .collect()
}

fn raw_string(r: Option<Box<RawValue>>) -> String {
    r.map(|r| r.get().to_owned()).unwrap_or_default()
}

/// Parses an upstream `chat.completion` body.
pub fn completion_from_json(body: &[u8]) -> Result<ChatCompletion, serde_json::Error> {
    // UTF-8 checked once over the whole body (see `parse_request`).
    let text = std::str::from_utf8(body).map_err(<serde_json::Error as serde::de::Error>::custom)?;
    let c: InCompletion = serde_json::from_str(text)?;
    Ok(ChatCompletion {
        id: c.id,
        created: c.created,
        model: String::new(),
        choices: c
            .choices
            .into_iter()
            .map(|ch| {
                let m = ch.message.unwrap_or(InMessage {
                    content: None,
                    refusal: None,
                    tool_calls: None,
                });
                Choice {
                    index: ch.index,
                    message: Some(Message {
                        role: Role::Assistant as i32,
                        content: m.content.map(message::Content::Text),
                        refusal: m.refusal,
                        tool_calls: tool_calls_in(m.tool_calls),
                        ..Default::default()
                    }),
                    finish_reason: ch.finish_reason.as_deref().map(FinishReason::from_openai).unwrap_or(FinishReason::Stop) as i32,
                    logprobs_json: raw_string(ch.logprobs),
                }
            })
            .collect(),
        usage: c.usage.map(Usage::from),
        system_fingerprint: c.system_fingerprint,
    })
}

/// Parses one upstream `chat.completion.chunk` event. It takes `&str` (the
/// SSE decoder has checked the UTF-8 once) because parsing from bytes checks
/// every string again: a fifth of this function's cost in callgrind.
pub fn chunk_from_json(data: &str) -> Result<ChatChunk, serde_json::Error> {
    let c: InChunk = serde_json::from_str(data)?;
    Ok(ChatChunk {
        id: String::new(),
        created: 0,
        model: String::new(),
        choices: c
            .choices
            .into_iter()
            .map(|ch| {
                let d = ch.delta;
                ChunkChoice {
                    index: ch.index,
                    delta: Some(match d {
                        None => Delta::default(),
                        Some(d) => Delta {
                            role: d.role.as_deref().and_then(Role::from_openai).map(|r| r as i32),
                            content: d.content,
                            refusal: d.refusal,
                            tool_calls: tool_calls_in(d.tool_calls),
                        },
                    }),
                    finish_reason: ch.finish_reason.as_deref().map(FinishReason::from_openai).unwrap_or_default() as i32,
                    logprobs_json: raw_string(ch.logprobs),
                }
            })
            .collect(),
        usage: c.usage.map(Usage::from),
        system_fingerprint: c.system_fingerprint,
        failover: None,
    })
}

/// The whole text of a request's messages, for rough token estimates.
pub fn message_text(m: &Message) -> impl Iterator<Item = &str> {
    let parts: Vec<&str> = match &m.content {
        Some(message::Content::Text(t)) => vec![t.as_str()],
        Some(message::Content::Parts(p)) => p
            .parts
            .iter()
            .filter_map(|p| match &p.part {
                Some(content_part::Part::Text(t)) => Some(t.as_str()),
                _ => None,
            })
            .collect(),
        None => vec![],
    };
    parts.into_iter()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tool call (or a stream's tool call delta) for the fixtures below.
    fn call(index: u32, id: Option<&str>, name: Option<&str>, arguments: &str) -> ToolCall {
        ToolCall {
            index,
            id: id.map(Into::into),
            name: name.map(Into::into),
            arguments: arguments.into(),
            ..Default::default()
        }
    }

    /// Completions of every shape the body can take.
    fn completions() -> Vec<ChatCompletion> {
        let text = |t: &str| Some(message::Content::Text(t.into()));
        let choice = |index: u32, message: Option<Message>, finish_reason: i32, logprobs: &str| Choice {
            index,
            message,
            finish_reason,
            logprobs_json: logprobs.into(),
        };
        let plain = ChatCompletion {
            id: "chatcmpl-01JABC".into(),
            created: 1_764_800_000,
            model: "gpt-4o-mini".into(),
            choices: vec![choice(0, Some(Message { content: text("Hello there."), ..Default::default() }), 1, "")],
            usage: Some(Usage { prompt_tokens: 9, completion_tokens: 3, total_tokens: 12, ..Default::default() }),
            system_fingerprint: None,
        };
        let odd = ChatCompletion {
            id: "id \"quoted\" \\ \u{1}".into(),
            created: -1,
            model: "é 🚀 \u{2028}".into(),
            choices: vec![
                choice(0, Some(Message { content: text("line\nbreak\ttab \"q\" \u{7f} \u{1b}[0m"), refusal: Some("no \"way\"".into()), ..Default::default() }), 0, "{\"content\": [ ]}"),
                choice(1, None, 99, "{"),
                choice(2, Some(Message { content: None, tool_calls: vec![call(0, Some("c1"), Some("f"), "{\"a\": \"b\\n\"}"), call(1, None, None, "")], ..Default::default() }), 3, " [1, 2] "),
                choice(u32::MAX, Some(Message { content: Some(message::Content::Parts(ContentParts::default())), ..Default::default() }), 5, "null"),
            ],
            usage: Some(Usage { prompt_tokens: u32::MAX, completion_tokens: 0, total_tokens: 1, cached_tokens: Some(4), reasoning_tokens: Some(0) }),
            system_fingerprint: Some("fp_\"x\"".into()),
        };
        let empty = ChatCompletion { choices: vec![], usage: None, system_fingerprint: Some(String::new()), ..Default::default() };
        let mut each_finish = plain.clone();
        each_finish.choices = (0..8).map(|f| choice(f as u32, Some(Message { content: text(""), ..Default::default() }), f, "")).collect();
        each_finish.usage = Some(Usage { cached_tokens: Some(0), ..Default::default() });
        vec![plain, odd, empty, each_finish]
    }

    #[test]
    fn completion_bodies_are_the_serde_structs_bytes() {
        for c in completions() {
            let (ours, theirs) = (completion_to_json(&c), completion_to_json_serde(&c));
            assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
            serde_json::from_slice::<Value>(&ours).unwrap();
        }
    }

    /// Chunks of every shape a stream's events can take.
    fn chunks() -> Vec<ChatChunk> {
        let delta = |role: Option<Role>, content: Option<&str>, refusal: Option<&str>, tool_calls: Vec<ToolCall>| Delta {
            role: role.map(|r| r as i32),
            content: content.map(Into::into),
            refusal: refusal.map(Into::into),
            tool_calls,
        };
        let choice = |index: u32, delta: Option<Delta>, finish_reason: i32, logprobs: &str| ChunkChoice {
            index,
            delta,
            finish_reason,
            logprobs_json: logprobs.into(),
        };
        let base = ChatChunk {
            id: "chatcmpl-01JABC".into(),
            created: 1_764_800_000,
            model: "gpt-4o-mini".into(),
            ..Default::default()
        };
        let with = |choices: Vec<ChunkChoice>, usage: Option<Usage>, fp: Option<&str>| ChatChunk {
            choices,
            usage,
            system_fingerprint: fp.map(Into::into),
            ..base.clone()
        };
        let mut odd = with(
            vec![
                choice(0, Some(delta(Some(Role::Assistant), Some("line\nbreak\t\"q\" \\ \u{1} \u{7f} é 🚀 \u{2028}"), Some("no \"way\""), vec![])), 0, "{\"content\": [ ]}"),
                choice(1, None, 99, "{"),
                choice(2, Some(delta(None, None, None, vec![call(0, Some("c1"), Some("f\"n"), ""), call(1, None, None, "{\"a\": \"b\\n\"}"), call(u32::MAX, None, Some("g"), "x")])), 3, " [1, 2] "),
                choice(u32::MAX, Some(Delta::default()), 5, "null"),
            ],
            Some(Usage { prompt_tokens: u32::MAX, completion_tokens: 0, total_tokens: 1, cached_tokens: Some(4), reasoning_tokens: Some(0) }),
            Some("fp_\"x\""),
        );
        odd.id = "id \"quoted\" \\ \u{1}".into();
        odd.model = "é 🚀 \u{2028}".into();
        odd.created = -1;
        let mut each = vec![
            with(vec![choice(0, Some(delta(Some(Role::Assistant), Some(""), None, vec![])), 0, "")], None, None),
            with(vec![choice(0, Some(delta(None, Some("Hello"), None, vec![])), 0, "")], None, Some("fp")),
            with(vec![], Some(Usage { prompt_tokens: 9, completion_tokens: 3, total_tokens: 12, ..Default::default() }), None),
            with(vec![], None, Some("")),
            odd,
        ];
        each.extend((0..8).map(|f| with(vec![choice(0, Some(delta(None, None, None, vec![])), f, "")], None, None)));
        each
    }

    #[test]
    fn chunk_bodies_are_the_serde_structs_bytes() {
        let mut one_writer = ChunkWriter::default();
        for c in chunks() {
            let theirs = chunk_to_json_serde(&c);
            let mut ours = Vec::new();
            one_writer.write(&mut ours, &c);
            assert_eq!(String::from_utf8_lossy(&ours), String::from_utf8_lossy(&theirs));
            assert_eq!(chunk_to_json(&c), theirs);
            serde_json::from_slice::<Value>(&ours).unwrap();
        }
    }

    #[test]
    fn request_round_trips_named_and_unknown_parameters() {
        let body = serde_json::json!({
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:x", "detail": "low"}}, {"type": "file", "file": {"file_id": "f1"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "42"}
            ],
            "temperature": 0.2, "max_tokens": 10, "stop": "\n", "seed": 7, "logprobs": true, "top_logprobs": 2,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}},
            "stream": true, "stream_options": {"include_usage": true},
            "metadata": {"a": 1}, "service_tier": "flex", "logit_bias": {"50256": -100}
        });
        let parsed = parse_request(body.to_string().as_bytes()).unwrap();
        assert!(parsed.stream);
        let out = request_to_json(&parsed.request, "up-model", false);
        assert_eq!(out["model"], "up-model");
        assert_eq!(out["metadata"], serde_json::json!({"a": 1}));
        assert_eq!(out["service_tier"], "flex");
        assert_eq!(out["logit_bias"]["50256"], -100);
        assert_eq!(out["stop"], serde_json::json!(["\n"]));
        assert_eq!(out["messages"][1]["content"][2]["file"]["file_id"], "f1");
        assert_eq!(out["messages"][2]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(out["messages"][3]["tool_call_id"], "c1");
        assert_eq!(out["response_format"]["json_schema"]["name"], "x");
        assert_eq!(out["tool_choice"]["function"]["name"], "f");
        assert_eq!(out["seed"], 7);
        assert!(out.get("stream").is_none());
    }

    #[test]
    fn refusals_name_the_param() {
        let cases = [
            (r#"{"model":"m"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"messages":[{"role":"user","content":"x"}]}"#, Some("model")),
            (r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#, Some("messages[0].role")),
            (r#"{"model":"m","messages":[{"role":"user","content":5}]}"#, Some("messages[0].content")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":-1}"#, Some("max_tokens")),
            (r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":"hot"}"#, Some("temperature")),
            (r#"{"model":"m","#, None),
            (r#"[1]"#, None),
        ];
        for (body, param) in cases {
            let err = parse_request(body.as_bytes()).err().unwrap();
            assert_eq!(err.code(), "invalid_input", "{body}");
            assert_eq!(err.param(), param, "{body}");
        }
    }

    #[test]
    fn upstream_chunks_parse_tool_call_deltas_and_usage() {
        let c = chunk_from_json(r#"{"id":"x","created":1,"model":"m","choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function","function":{"name":"f","arguments":""}}]},"finish_reason":null}]}"#).unwrap();
        assert!(c.has_content());
        let tc = &c.choices[0].delta.as_ref().unwrap().tool_calls[0];
        assert_eq!(tc.id.as_deref(), Some("call_1"));
        let u = chunk_from_json(r#"{"id":"x","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7,"prompt_tokens_details":{"cached_tokens":2}}}"#).unwrap();
        assert_eq!(u.usage.unwrap().cached_tokens, Some(2));
        let json: Value = serde_json::from_slice(&chunk_to_json(&c)).unwrap();
        assert_eq!(json["choices"][0]["delta"]["tool_calls"][0]["id"], "call_1");
        assert_eq!(json["choices"][0]["delta"]["tool_calls"][0]["type"], "function");
        assert_eq!(json["choices"][0]["finish_reason"], Value::Null);
    }

    #[test]
    fn a_stream_writer_reuses_its_head_and_notices_when_it_changes() {
        let chunk = |id: &str, content: &str, usage: Option<Usage>| ChatChunk {
            id: id.into(),
            created: 7,
            model: "m\"x".into(),
            choices: vec![ChunkChoice {
                delta: Some(Delta { content: Some(content.into()), ..Default::default() }),
                ..Default::default()
            }],
            usage,
            system_fingerprint: Some("fp".into()),
            failover: None,
        };
        let stream = [
            chunk("a", "he", None),
            chunk("a", "llo\n", None),
            chunk("b", "", Some(Usage { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3, ..Default::default() })),
        ];
        let mut w = ChunkWriter::default();
        for c in &stream {
            let mut out = b"data: ".to_vec();
            w.write(&mut out, c);
            let json: Value = serde_json::from_slice(&out[6..]).unwrap();
            let want = serde_json::json!({
                "id": c.id, "object": "chat.completion.chunk", "created": 7, "model": "m\"x",
                "choices": [{"index": 0, "delta": {"content": c.choices[0].delta.as_ref().unwrap().content}, "finish_reason": null}],
                "system_fingerprint": "fp",
            });
            let mut want = want;
            if c.usage.is_some() {
                want["usage"] = json["usage"].clone();
                assert_eq!(json["usage"]["total_tokens"], 3);
            }
            assert_eq!(json, want);
        }
    }
}
