//! OpenAI audio: speech (`POST /v1/audio/speech`, audio streamed in
//! chunks) and transcriptions (`POST /v1/audio/transcriptions`, multipart,
//! answered as `json`, `verbose_json`, `text`, `srt` or `vtt`).

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{FromRequest, Multipart, Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::{
    media::{audio_chunks, audio_response, hash64, language_name, Audio, Transcript},
    openai::{error_body, invalid},
    path_and_query, preflight_as, prefix_of, read_body, sync_bytes, sync_response, Prefix, SimState, MAX_MEDIA_BODY,
};

/// The longest input OpenAI speaks.
const MAX_SPEECH_CHARS: usize = 4096;

pub(super) async fn speech(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    speech_at(state, prefix_of(&params), req).await.unwrap_or_else(|r| r)
}

async fn speech_at(state: Arc<SimState>, prefix: Prefix, req: Request) -> Result<Response, Response> {
    let path = path_and_query(req.uri());
    let (parts, bytes) = read_body(req, MAX_MEDIA_BODY).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&format!("invalid JSON: {e}"), None))?;
    let faults = preflight_as(&state, prefix, &path, &parts.headers, &body, true, error_body).await?;
    let input = body
        .get("input")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| invalid("Missing required parameter: 'input'.", Some("input")))?;
    let chars = input.chars().count();
    if chars > MAX_SPEECH_CHARS {
        return Err(invalid(&format!("Input is too long: {chars} characters, at most {MAX_SPEECH_CHARS}."), Some("input")));
    }
    // A built-in voice by name, or a custom one as {"id": ...}.
    let voice = match body.get("voice") {
        Some(Value::String(v)) => Some(v.as_str()),
        Some(Value::Object(o)) => o.get("id").and_then(Value::as_str),
        _ => None,
    }
    .filter(|v| !v.is_empty())
    .ok_or_else(|| invalid("Missing required parameter: 'voice'.", Some("voice")))?;
    let format = match body.get("response_format").and_then(Value::as_str).unwrap_or("mp3") {
        "mp3" => Audio::Mp3,
        "opus" => Audio::Opus,
        "aac" => Audio::Aac,
        "flac" => Audio::Flac,
        "wav" => Audio::Wav(24_000),
        "pcm" => Audio::Pcm,
        other => {
            return Err(invalid(
                &format!("Invalid value: '{other}'. Supported values are: 'mp3', 'opus', 'aac', 'flac', 'wav', and 'pcm'."),
                Some("response_format"),
            ))
        }
    };
    if let Some(speed) = body.get("speed").filter(|s| !s.is_null()) {
        if !speed.as_f64().is_some_and(|s| (0.25..=4.0).contains(&s)) {
            return Err(invalid(&format!("Invalid 'speed': {speed}. Expected a value between 0.25 and 4.0."), Some("speed")));
        }
    }
    let h = hash64(state.seed, format!("{voice}\n{input}").as_bytes());
    Ok(audio_response(state, format, h, audio_chunks(chars), faults))
}

pub(super) async fn transcriptions(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    transcriptions_at(state, prefix_of(&params), req).await.unwrap_or_else(|r| r)
}

/// The uploaded audio.
struct Upload {
    bytes: Bytes,
    filename: Option<String>,
    content_type: Option<String>,
}

fn multipart_error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}}))).into_response()
}

/// The form's fields as recorded: one value as a string, a repeated one as
/// an array.
fn fields_json(fields: &[(String, String)]) -> Value {
    let mut out = Map::new();
    for (k, v) in fields {
        match out.get_mut(k) {
            None => {
                out.insert(k.clone(), Value::from(v.as_str()));
            }
            Some(Value::Array(vs)) => vs.push(Value::from(v.as_str())),
            Some(prev) => *prev = Value::Array(vec![prev.take(), Value::from(v.as_str())]),
        }
    }
    Value::Object(out)
}

/// `HH:MM:SS{sep}mmm`, as SRT (`,`) and WebVTT (`.`) write times.
fn timestamp(secs: f64, sep: char) -> String {
    let ms = (secs * 1000.0).round() as u64;
    format!("{:02}:{:02}:{:02}{sep}{:03}", ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000)
}

async fn transcriptions_at(state: Arc<SimState>, prefix: Prefix, req: Request) -> Result<Response, Response> {
    let path = path_and_query(req.uri());
    let headers = req.headers().clone();
    let mut form = Multipart::from_request(req, &()).await.map_err(|e| multipart_error(StatusCode::BAD_REQUEST, &e.body_text()))?;
    let mut upload = None;
    let mut fields = Vec::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => return Err(multipart_error(e.status(), &e.body_text())),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "file" {
            let filename = field.file_name().map(str::to_owned);
            let content_type = field.content_type().map(str::to_owned);
            let bytes = field.bytes().await.map_err(|e| multipart_error(e.status(), &e.body_text()))?;
            upload = Some(Upload { bytes, filename, content_type });
        } else {
            let text = field.text().await.map_err(|e| multipart_error(e.status(), &e.body_text()))?;
            fields.push((name, text));
        }
    }
    let summary = json!({
        "bytes": upload.as_ref().map_or(0, |u| u.bytes.len()),
        "filename": upload.as_ref().and_then(|u| u.filename.clone()),
        "content_type": upload.as_ref().and_then(|u| u.content_type.clone()),
        "fields": fields_json(&fields),
    });
    let faults = preflight_as(&state, prefix, &path, &headers, &summary, false, error_body).await?;
    let field = |name: &str| fields.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str());
    let upload = upload.ok_or_else(|| invalid("Missing required parameter: 'file'.", Some("file")))?;
    if upload.bytes.is_empty() {
        return Err(invalid("The audio file is empty.", Some("file")));
    }
    if field("model").is_none_or(str::is_empty) {
        return Err(invalid("Missing required parameter: 'model'.", Some("model")));
    }
    let format = field("response_format").unwrap_or("json");
    if !matches!(format, "json" | "verbose_json" | "text" | "srt" | "vtt") {
        return Err(invalid(
            &format!("Invalid value: '{format}'. Supported values are: 'json', 'text', 'srt', 'verbose_json', and 'vtt'."),
            Some("response_format"),
        ));
    }
    let mut granularities = Vec::new();
    for (_, g) in fields.iter().filter(|(k, _)| k == "timestamp_granularities[]" || k == "timestamp_granularities") {
        if !matches!(g.as_str(), "word" | "segment") {
            return Err(invalid(&format!("Invalid value: '{g}'. Supported values are: 'word' and 'segment'."), Some("timestamp_granularities")));
        }
        granularities.push(g.as_str());
    }

    let t = Transcript::of(state.seed, &upload.bytes, faults.tokens.unwrap_or(12));
    let text = t.text();
    let usage = json!({"type": "duration", "seconds": t.exact_duration.ceil() as u64});
    let plain = |body: String, content_type: &'static str| sync_bytes(body.into(), content_type, &faults);
    Ok(match format {
        "text" => plain(format!("{text}\n"), "text/plain; charset=utf-8"),
        "srt" => plain(format!("1\n00:00:00,000 --> {}\n{text}\n\n", timestamp(t.duration, ',')), "text/plain; charset=utf-8"),
        "vtt" => plain(format!("WEBVTT\n\n00:00:00.000 --> {}\n{text}\n\n", timestamp(t.duration, '.')), "text/vtt; charset=utf-8"),
        "verbose_json" => {
            let mut v = json!({
                "task": "transcribe",
                "language": language_name(field("language").unwrap_or("en")),
                "duration": t.duration,
                "text": text,
                "segments": [{
                    "id": 0,
                    "seek": 0,
                    "start": 0.0,
                    "end": t.duration,
                    "text": format!(" {text}"),
                    "tokens": (0..t.words.len() as u64).map(|i| 50_364 + i).collect::<Vec<_>>(),
                    "temperature": 0.0,
                    "avg_logprob": -0.2,
                    "compression_ratio": 1.0,
                    "no_speech_prob": 0.01,
                }],
                "usage": usage,
            });
            if granularities.contains(&"word") {
                v["words"] = t
                    .punctuated()
                    .iter()
                    .zip(t.timings())
                    .map(|(w, (start, end))| json!({"word": w.trim_end_matches('.'), "start": start, "end": end}))
                    .collect();
            }
            sync_response(v, &faults)
        }
        _ => sync_response(json!({"text": text, "usage": usage}), &faults),
    })
}

#[cfg(test)]
mod tests {
    use reqwest::multipart::{Form, Part};
    use serde_json::{json, Value};

    use crate::simulator::test_sim;

    fn form(audio: Vec<u8>) -> Form {
        Form::new().part("file", Part::bytes(audio).file_name("a.wav").mime_str("audio/wav").unwrap()).text("model", "whisper-1")
    }

    #[tokio::test]
    async fn speech_streams_audio_in_chunks() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let input = "x".repeat(100); // 7 chunks
        let resp = http
            .post(format!("{}/v1/audio/speech", sim.url()))
            .json(&json!({"model": "tts-1", "input": input, "voice": "alloy", "response_format": "wav"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "audio/wav");
        assert!(resp.headers().get("content-length").is_none());
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), 7 * 1024);
        assert_eq!(&body[..4], b"RIFF");
        assert_eq!(&body[8..12], b"WAVE");

        // mp3 by default; a short input is still 4 chunks; deterministic.
        let mp3 = |url: String| {
            let http = http.clone();
            async move { http.post(url).json(&json!({"input": "hi", "voice": "alloy"})).send().await.unwrap() }
        };
        let resp = mp3(format!("{}/v1/audio/speech", sim.url())).await;
        assert_eq!(resp.headers()["content-type"], "audio/mpeg");
        let a = resp.bytes().await.unwrap();
        assert_eq!(a.len(), 4 * 1024);
        assert!(a.starts_with(b"ID3"));
        assert_eq!(a, mp3(format!("{}/v1/audio/speech", sim.url())).await.bytes().await.unwrap());
    }

    #[tokio::test]
    async fn speech_refuses_a_missing_voice_and_resets_mid_stream() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http.post(format!("{}/v1/audio/speech", sim.url())).json(&json!({"model": "tts-1", "input": "hi"})).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "voice");

        let mut resp = http
            .post(format!("{}/f/reset_after=2/v1/audio/speech", sim.url()))
            .json(&json!({"input": "hello there", "voice": "alloy"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut got = 0;
        let err = loop {
            match resp.chunk().await {
                Ok(Some(c)) => got += c.len(),
                Ok(None) => panic!("stream ended cleanly after {got} bytes"),
                Err(e) => break e,
            }
        };
        assert_eq!(got, 2 * 1024, "{err}");
    }

    #[tokio::test]
    async fn transcribes_as_json_and_verbose_json() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let url = format!("{}/v1/audio/transcriptions", sim.url());
        let audio = vec![7u8; 64_000];
        let v: Value = http.post(&url).multipart(form(audio.clone())).send().await.unwrap().json().await.unwrap();
        let text = v["text"].as_str().unwrap().to_owned();
        assert_eq!(text.split(' ').count(), 12);
        assert!(text.ends_with('.') && text.chars().next().unwrap().is_uppercase(), "{text}");
        assert_eq!(v["usage"], json!({"type": "duration", "seconds": 2}));

        let f = form(audio)
            .text("response_format", "verbose_json")
            .text("language", "de")
            .text("timestamp_granularities[]", "word")
            .text("timestamp_granularities[]", "segment");
        let v: Value = http.post(&url).multipart(f).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["task"], "transcribe");
        assert_eq!(v["language"], "german");
        assert_eq!(v["duration"], 2.0);
        assert_eq!(v["text"], text.as_str());
        let words = v["words"].as_array().unwrap();
        assert_eq!(words.len(), 12);
        assert_eq!(words[11]["end"], 2.0);
        assert_eq!(v["segments"][0]["avg_logprob"], -0.2);

        let text_resp = http.post(&url).multipart(form(vec![7u8; 64_000]).text("response_format", "text")).send().await.unwrap();
        assert!(text_resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
        assert_eq!(text_resp.text().await.unwrap(), format!("{text}\n"));

        let rec = sim.state.recorded();
        assert_eq!(rec[1].body["bytes"], 64_000);
        assert_eq!(rec[1].body["filename"], "a.wav");
        assert_eq!(rec[1].body["fields"]["timestamp_granularities[]"], json!(["word", "segment"]));
    }

    #[tokio::test]
    async fn transcription_refuses_a_missing_file_and_honours_faults() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/v1/audio/transcriptions", sim.url()))
            .multipart(Form::new().text("model", "whisper-1"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["param"], "file");

        let resp = http
            .post(format!("{}/f/status=503/v1/audio/transcriptions", sim.url()))
            .multipart(form(vec![1; 100]))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "server_error");
    }
}
