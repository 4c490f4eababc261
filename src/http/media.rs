//! The façade's media routes: generations, text-to-speech and
//! speech-to-text, each translated onto its gRPC service trait.
//!
//! Generation bodies are strict: an unknown key at any level is refused
//! with `param` naming its path (`input.promt`), and every field's type is
//! checked here with the same naming; bounds are the core's, so both
//! surfaces agree. An STT upload is read part by part and refused with 413
//! the moment it passes 25 MiB (or at once when its declared length
//! already does): a 2 GB upload is never read into memory.

use std::sync::Arc;

use axum::{
    body::Body,
    extract::{FromRequest, Multipart, Path, RawQuery, Request, State},
    http::{HeaderMap, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Extension,
};
use futures_util::StreamExt;
use serde_json::{Map, Value};

use super::{copy_served, core_error, core_request, read_body, HttpState};
use crate::{
    auth::Principal,
    error::Error,
    grpc::speech::MAX_AUDIO_BYTES,
    proto::{
        generations_server::Generations, speech_server::Speech, CreateGenerationRequest, GenerationInput, GenerationStatus, GetGenerationRequest,
        GetMediaRequest, SynthesizeRequest, TranscribeRequest,
    },
    providers::AudioFormat,
    telemetry::RequestTrace,
};

/// The most a transcription request body may be: the file's 25 MiB and
/// room for the other fields and multipart framing.
pub const MAX_UPLOAD_BODY: usize = MAX_AUDIO_BYTES + 256 * 1024;
/// The longest text field of an upload form.
const MAX_FORM_FIELD: usize = 1024;

type Trace = Option<Extension<RequestTrace>>;

/// `POST /v1/generations`.
pub async fn create_generation(State(state): State<HttpState>, Extension(principal): Extension<Arc<Principal>>, trace: Trace, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let bytes = read_body(&headers, body, state.max_body_bytes).await?;
        let parsed = parse_generation(&bytes)?;
        let req = core_request(parsed, principal, trace.map(|t| t.0), &headers)?;
        Ok::<_, Error>(match state.generations.create(req).await {
            Ok(resp) => generation_response(&headers, resp),
            Err(status) => core_error(&status),
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/generations/{id}?wait=N|auto`.
pub async fn get_generation(
    State(state): State<HttpState>,
    Extension(principal): Extension<Arc<Principal>>,
    trace: Trace,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    let run = async {
        let wait = match query_param(query.as_deref(), "wait") {
            None => None,
            Some(w) => wait_value(&Value::String(w), "wait")?,
        };
        let req = core_request(GetGenerationRequest { id, wait_seconds: wait }, principal, trace.map(|t| t.0), &headers)?;
        Ok::<_, Error>(match state.generations.get(req).await {
            Ok(resp) => generation_response(&headers, resp),
            Err(status) => core_error(&status),
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `GET /v1/generations/{id}/media/{n}`: media the gateway kept.
pub async fn get_media(State(state): State<HttpState>, Extension(principal): Extension<Arc<Principal>>, Path((id, n)): Path<(String, String)>, headers: HeaderMap) -> Response {
    let run = async {
        let n: u32 = n.parse().map_err(|_| Error::not_found(format!("generation {id:?} has no media {n:?}"), None))?;
        let req = core_request(GetMediaRequest { id, n }, principal, None, &headers)?;
        Ok::<_, Error>(match state.generations.get_media(req).await {
            Ok(resp) => {
                let (md, media, _) = resp.into_parts();
                let mut out = Response::new(Body::from(media.data));
                let ct = HeaderValue::from_str(&media.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
                out.headers_mut().insert(http::header::CONTENT_TYPE, ct);
                out.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=86400, immutable"));
                copy_served(&md, out.headers_mut());
                out
            }
            Err(status) => core_error(&status),
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/tts/synthesize`: JSON in, the audio streamed out as the
/// provider produces it.
pub async fn synthesize(State(state): State<HttpState>, Extension(principal): Extension<Arc<Principal>>, trace: Trace, headers: HeaderMap, body: Body) -> Response {
    let run = async {
        let bytes = read_body(&headers, body, state.max_body_bytes).await?;
        let parsed = parse_tts(&bytes)?;
        let format = parsed.format.as_deref().and_then(AudioFormat::parse).unwrap_or(AudioFormat::Mp3);
        let req = core_request(parsed, principal, trace.map(|t| t.0), &headers)?;
        let resp = match state.speech.synthesize(req).await {
            Ok(r) => r,
            Err(status) => return Ok(core_error(&status)),
        };
        let (md, chunks, _) = resp.into_parts();
        // A provider failing mid-audio is a body error: the connection is
        // cut, so the client sees a truncated transfer, never a short file
        // that looks whole.
        let body = chunks.map(|c| c.map(|c| c.data).map_err(|s| std::io::Error::other(Error::from_status(&s).to_string())));
        let mut out = Response::new(Body::from_stream(body));
        out.headers_mut().insert(http::header::CONTENT_TYPE, HeaderValue::from_static(format.content_type()));
        out.headers_mut().insert(http::header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        copy_served(&md, out.headers_mut());
        Ok::<_, Error>(out)
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

/// `POST /v1/stt/transcribe`, multipart: `audio` (file), `model_id`,
/// `language`, `provider_id`.
pub async fn transcribe(State(state): State<HttpState>, Extension(principal): Extension<Arc<Principal>>, trace: Trace, req: Request) -> Response {
    let headers = req.headers().clone();
    let run = async {
        let declared = headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_UPLOAD_BODY as u64) {
            return Err(too_large());
        }
        let multipart = Multipart::from_request(req, &())
            .await
            .map_err(|e| Error::invalid(format!("expected a multipart/form-data body: {}", e.body_text()), None))?;
        let form = read_form(multipart).await?;
        let req = core_request(form, principal, trace.map(|t| t.0), &headers)?;
        Ok(match state.speech.transcribe(req).await {
            Ok(resp) => {
                let (md, t, _) = resp.into_parts();
                let words = t.words.map(|w| {
                    w.words
                        .into_iter()
                        .map(|w| serde_json::json!({"word": w.word, "start": w.start, "end": w.end, "confidence": w.confidence}))
                        .collect::<Vec<_>>()
                });
                let body = serde_json::json!({
                    "text": t.text,
                    "duration": t.duration,
                    "language": t.language,
                    "confidence": t.confidence,
                    "words": words,
                    "model": t.model,
                });
                let mut out = axum::Json(body).into_response();
                copy_served(&md, out.headers_mut());
                out
            }
            Err(status) => core_error(&status),
        })
    };
    run.await.unwrap_or_else(IntoResponse::into_response)
}

fn too_large() -> Error {
    Error::PayloadTooLarge { limit: MAX_AUDIO_BYTES as u64 }
}

/// Reads the upload form, counting the file's bytes as they arrive.
async fn read_form(mut multipart: Multipart) -> Result<TranscribeRequest, Error> {
    let mut out = TranscribeRequest::default();
    let mut have_audio = false;
    let broken = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            too_large()
        } else {
            Error::invalid(format!("malformed multipart body: {}", e.body_text()), None)
        }
    };
    while let Some(mut field) = multipart.next_field().await.map_err(broken)? {
        let name = field.name().unwrap_or_default().to_owned();
        match name.as_str() {
            "audio" | "file" => {
                if have_audio {
                    return Err(Error::invalid_param("send one 'audio' file", "audio"));
                }
                have_audio = true;
                out.filename = field.file_name().map(|f| crate::error::truncate(f, 256).to_owned()).unwrap_or_default();
                out.content_type = field.content_type().map(|c| crate::error::truncate(c, 128).to_owned()).unwrap_or_default();
                let mut data = bytes::BytesMut::new();
                while let Some(chunk) = field.chunk().await.map_err(broken)? {
                    if data.len() + chunk.len() > MAX_AUDIO_BYTES {
                        return Err(too_large());
                    }
                    data.extend_from_slice(&chunk);
                }
                out.audio = data.freeze();
            }
            "model_id" | "language" | "provider_id" => {
                let mut text = Vec::new();
                while let Some(chunk) = field.chunk().await.map_err(broken)? {
                    if text.len() + chunk.len() > MAX_FORM_FIELD {
                        return Err(Error::invalid_param(format!("'{name}' is too long"), &name));
                    }
                    text.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(text).map_err(|_| Error::invalid_param(format!("'{name}' must be UTF-8 text"), &name))?;
                match name.as_str() {
                    "model_id" => out.model_id = text,
                    "language" => out.language = Some(text),
                    _ => out.provider_id = Some(text),
                }
            }
            other => {
                let other = crate::error::truncate(other, 64).to_owned();
                return Err(Error::invalid_param(format!("unknown form field '{other}'"), &other));
            }
        }
    }
    if !have_audio {
        return Err(Error::invalid_param("'audio' is required: the file to transcribe", "audio"));
    }
    Ok(out)
}

/// The generation resource as JSON: `202` while it is queued or running,
/// `200` once it ended.
fn generation_response(headers: &HeaderMap, resp: tonic::Response<crate::proto::Generation>) -> Response {
    let (md, g, _) = resp.into_parts();
    let status = GenerationStatus::try_from(g.status).unwrap_or(GenerationStatus::Queued);
    let code = if matches!(status, GenerationStatus::Completed | GenerationStatus::Failed) { StatusCode::OK } else { StatusCode::ACCEPTED };
    let origin = origin(headers);
    let media: Vec<Value> = g
        .media
        .into_iter()
        .map(|m| {
            let url = if m.url.starts_with('/') { format!("{origin}{}", m.url) } else { m.url };
            let mut v = serde_json::json!({"url": url, "type": m.r#type, "content_type": m.content_type});
            if let Some(w) = m.width {
                v["width"] = w.into();
            }
            if let Some(h) = m.height {
                v["height"] = h.into();
            }
            if let Some(d) = m.duration {
                v["duration"] = d.into();
            }
            v
        })
        .collect();
    let usage = g.usage.map(|u| {
        if u.video_seconds > 0.0 {
            serde_json::json!({"video_seconds": u.video_seconds, "cost_usd": u.cost_usd})
        } else {
            serde_json::json!({"images": u.images, "cost_usd": u.cost_usd})
        }
    });
    let body = serde_json::json!({
        "id": g.id,
        "object": "generation",
        "status": status.api_name(),
        "model": g.model,
        "created_at": g.created_at,
        "completed_at": g.completed_at,
        "output": {"media": media},
        "error": g.error.map(|e| serde_json::json!({"code": e.code, "message": e.message, "param": e.param})),
        "usage": usage,
    });
    let mut out = (code, axum::Json(body)).into_response();
    copy_served(&md, out.headers_mut());
    out
}

/// Where this gateway is, as the client reached it, for media URLs.
fn origin(headers: &HeaderMap) -> String {
    let host = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b)))
        .unwrap_or("localhost");
    let proto = match headers.get("x-forwarded-proto").and_then(|v| v.to_str().ok()) {
        Some("https") => "https",
        _ => "http",
    };
    format!("{proto}://{host}")
}

fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k == name).then(|| v.to_owned())
    })
}

/// A JSON object whose keys must all be in `allowed`.
fn object<'a>(v: &'a Value, path: &str, allowed: &[&str]) -> Result<&'a Map<String, Value>, Error> {
    let what = if path.is_empty() { "the body" } else { path };
    let obj = v.as_object().ok_or_else(|| Error::invalid(format!("{what} must be a JSON object"), (!path.is_empty()).then(|| path.to_owned())))?;
    if let Some(k) = obj.keys().find(|k| !allowed.contains(&k.as_str())) {
        let k = crate::error::truncate(k, 64);
        let p = if path.is_empty() { k.to_owned() } else { format!("{path}.{k}") };
        return Err(Error::invalid_param(format!("unknown field '{p}'"), &p));
    }
    Ok(obj)
}

fn field_path(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

/// An optional field of one JSON type; another type is refused naming
/// the field's path.
fn typed<T>(obj: &Map<String, Value>, path: &str, key: &str, what: &str, get: impl Fn(&Value) -> Option<T>) -> Result<Option<T>, Error> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => get(v).map(Some).ok_or_else(|| {
            let p = field_path(path, key);
            Error::invalid_param(format!("'{p}' must be {what}"), &p)
        }),
    }
}

fn string(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<String>, Error> {
    typed(obj, path, key, "a string", |v| v.as_str().map(str::to_owned))
}

fn number(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<f64>, Error> {
    typed(obj, path, key, "a number", Value::as_f64)
}

fn integer(obj: &Map<String, Value>, path: &str, key: &str) -> Result<Option<i64>, Error> {
    typed(obj, path, key, "an integer", Value::as_i64)
}

/// `wait`: `"auto"`, or seconds as a number (or a numeric string, as a
/// query parameter is).
fn wait_value(v: &Value, param: &str) -> Result<Option<f64>, Error> {
    let bad = || Error::invalid_param(format!("'{param}' must be \"auto\" or 0 to 60 seconds"), param);
    match v {
        Value::Null => Ok(None),
        Value::String(s) if s == "auto" => Ok(None),
        Value::String(s) => s.parse::<f64>().ok().filter(|w| w.is_finite()).map(Some).ok_or_else(bad),
        Value::Number(n) => n.as_f64().map(Some).ok_or_else(bad),
        _ => Err(bad()),
    }
}

/// A strict generation body.
fn parse_generation(bytes: &[u8]) -> Result<CreateGenerationRequest, Error> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("malformed JSON: {e}"), None))?;
    let top = object(&v, "", &["model", "input", "n", "wait"])?;
    let model = string(top, "", "model")?.ok_or_else(|| Error::invalid_param("'model' is required", "model"))?;
    let input_value = top.get("input").filter(|v| !v.is_null()).ok_or_else(|| Error::invalid_param("'input' is required", "input"))?;
    let input = object(
        input_value,
        "input",
        &["prompt", "image_urls", "aspect_ratio", "size", "duration", "resolution", "seed", "negative_prompt"],
    )?;
    let prompt = string(input, "input", "prompt")?.ok_or_else(|| Error::invalid_param("'input.prompt' is required", "input.prompt"))?;
    let image_urls = match input.get("image_urls") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, u)| {
                u.as_str().map(str::to_owned).ok_or_else(|| {
                    let p = format!("input.image_urls[{i}]");
                    Error::invalid_param(format!("'{p}' must be a string"), &p)
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(Error::invalid_param("'input.image_urls' must be an array of URLs", "input.image_urls")),
    };
    let n = match integer(top, "", "n")? {
        None => None,
        Some(n) => Some(u32::try_from(n).map_err(|_| Error::invalid_param("'n' must be 1 to 10", "n"))?),
    };
    Ok(CreateGenerationRequest {
        model,
        input: Some(GenerationInput {
            prompt,
            image_urls,
            aspect_ratio: string(input, "input", "aspect_ratio")?,
            size: string(input, "input", "size")?,
            duration: number(input, "input", "duration")?,
            resolution: string(input, "input", "resolution")?,
            seed: integer(input, "input", "seed")?,
            negative_prompt: string(input, "input", "negative_prompt")?,
        }),
        n,
        wait_seconds: wait_value(top.get("wait").unwrap_or(&Value::Null), "wait")?,
    })
}

/// A strict TTS body.
fn parse_tts(bytes: &[u8]) -> Result<SynthesizeRequest, Error> {
    let v: Value = serde_json::from_slice(bytes).map_err(|e| Error::invalid(format!("malformed JSON: {e}"), None))?;
    let obj = object(&v, "", &["model_id", "text", "voice_id", "format", "sample_rate", "speed"])?;
    let sample_rate = match integer(obj, "", "sample_rate")? {
        None => None,
        Some(r) => Some(u32::try_from(r).map_err(|_| Error::invalid_param("'sample_rate' must be 8000 to 48000 Hz", "sample_rate"))?),
    };
    Ok(SynthesizeRequest {
        model_id: string(obj, "", "model_id")?.ok_or_else(|| Error::invalid_param("'model_id' is required", "model_id"))?,
        text: string(obj, "", "text")?.ok_or_else(|| Error::invalid_param("'text' is required", "text"))?,
        voice_id: string(obj, "", "voice_id")?,
        format: string(obj, "", "format")?,
        sample_rate,
        speed: number(obj, "", "speed")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(body: &str) -> Option<String> {
        parse_generation(body.as_bytes()).unwrap_err().param().map(str::to_owned)
    }

    #[test]
    fn generation_bodies_are_strict() {
        assert_eq!(param(r#"{"model":"m","input":{"promt":"x"}}"#).as_deref(), Some("input.promt"));
        assert_eq!(param(r#"{"model":"m","input":{"prompt":"x"},"wiat":1}"#).as_deref(), Some("wiat"));
        assert_eq!(param(r#"{"model":"m","input":{"prompt":3}}"#).as_deref(), Some("input.prompt"));
        assert_eq!(param(r#"{"model":"m","input":{"prompt":"x","image_urls":["a",2]}}"#).as_deref(), Some("input.image_urls[1]"));
        assert_eq!(param(r#"{"model":"m","input":{"prompt":"x"},"wait":"soon"}"#).as_deref(), Some("wait"));
        assert_eq!(param(r#"{"model":"m","input":{"prompt":"x"},"n":-1}"#).as_deref(), Some("n"));
        assert_eq!(param(r#"{"input":{"prompt":"x"}}"#).as_deref(), Some("model"));
        assert_eq!(param(r#"{"model":"m"}"#).as_deref(), Some("input"));
        let ok = parse_generation(br#"{"model":"m","input":{"prompt":"x","seed":4},"n":2,"wait":"auto"}"#).unwrap();
        assert_eq!((ok.n, ok.wait_seconds, ok.input.unwrap().seed), (Some(2), None, Some(4)));
        let ok = parse_generation(br#"{"model":"m","input":{"prompt":"x"},"wait":0}"#).unwrap();
        assert_eq!(ok.wait_seconds, Some(0.0));
    }

    #[test]
    fn query_wait() {
        assert_eq!(query_param(Some("a=1&wait=5"), "wait").as_deref(), Some("5"));
        assert_eq!(query_param(Some("wait"), "wait").as_deref(), Some(""));
        assert!(wait_value(&Value::String(String::new()), "wait").is_err());
    }
}
