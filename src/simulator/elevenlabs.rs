//! ElevenLabs text to speech: `POST /v1/text-to-speech/{voice_id}` and
//! `POST /v1/text-to-speech/{voice_id}/stream`, both streaming audio in the
//! query's `output_format` (default `mp3_44100_128`) in chunks, as OpenAI
//! speech does. Errors are ElevenLabs' `{"detail": {"status", "message"}}`.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Query, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{
    media::{audio_chunks, audio_response, hash64, uuid, Audio},
    path_and_query, preflight_as, prefix_of, read_body, Prefix, SimState, MAX_MEDIA_BODY,
};

pub(super) fn error_body(status: u16) -> Value {
    let kind = match status {
        401 => "invalid_api_key",
        402 => "payment_required",
        422 => "invalid_request",
        429 => "too_many_concurrent_requests",
        400..=499 => "bad_request",
        _ => "internal_server_error",
    };
    json!({"detail": {"status": kind, "message": format!("simulated failure (status {status})")}})
}

fn refuse(status: StatusCode, kind: &str, message: &str) -> Response {
    (status, Json(json!({"detail": {"status": kind, "message": message}}))).into_response()
}

/// The encoding an `output_format` names: `mp3_{22050,24000,44100}_{kbps}`,
/// `pcm_{rate}`, `wav_{rate}`, `opus_48000_{kbps}` or `ulaw_8000`.
fn output_format(s: &str) -> Option<Audio> {
    const RATES: [&str; 6] = ["8000", "16000", "22050", "24000", "44100", "48000"];
    let parts: Vec<&str> = s.split('_').collect();
    match parts.as_slice() {
        ["mp3", rate, kbps] if ["22050", "24000", "44100"].contains(rate) && ["32", "48", "64", "96", "128", "192"].contains(kbps) => Some(Audio::Mp3),
        ["pcm", rate] if RATES.contains(rate) => Some(Audio::Pcm),
        ["wav", rate] if RATES.contains(rate) => rate.parse().ok().map(Audio::Wav),
        ["opus", "48000", kbps] if ["32", "64", "96", "128", "192"].contains(kbps) => Some(Audio::Opus),
        ["ulaw", "8000"] => Some(Audio::Ulaw),
        _ => None,
    }
}

pub(super) async fn tts(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    let voice = params.get("voice_id").cloned().unwrap_or_default();
    tts_at(state, prefix_of(&params), voice, req).await.unwrap_or_else(|r| r)
}

async fn tts_at(state: Arc<SimState>, prefix: Prefix, voice: String, req: Request) -> Result<Response, Response> {
    let path = path_and_query(req.uri());
    let query: HashMap<String, String> = Query::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    let (parts, bytes) = read_body(req, MAX_MEDIA_BODY).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| refuse(StatusCode::BAD_REQUEST, "invalid_json", &format!("invalid JSON: {e}")))?;
    let faults = preflight_as(&state, prefix, &path, &parts.headers, &body, true, error_body).await?;
    let name = query.get("output_format").map_or("mp3_44100_128", String::as_str);
    let format = output_format(name)
        .ok_or_else(|| refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid_output_format", &format!("Invalid output format: {name}.")))?;
    let text = body
        .get("text")
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())
        .ok_or_else(|| refuse(StatusCode::UNPROCESSABLE_ENTITY, "invalid_text", "The text field is required and must not be empty."))?;
    let model = body.get("model_id").and_then(Value::as_str).unwrap_or("eleven_multilingual_v2");
    let chars = text.chars().count();
    let h = hash64(state.seed, format!("{voice}\n{model}\n{text}").as_bytes());
    let mut resp = audio_response(state, format, h, audio_chunks(chars), faults);
    let headers = resp.headers_mut();
    headers.insert("x-character-count", http::HeaderValue::from(chars));
    if let Ok(id) = http::HeaderValue::from_str(&uuid(h)) {
        headers.insert("request-id", id);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::simulator::test_sim;

    #[test]
    fn output_formats() {
        assert_eq!(output_format("mp3_22050_32"), Some(Audio::Mp3));
        assert_eq!(output_format("wav_16000"), Some(Audio::Wav(16_000)));
        assert_eq!(output_format("pcm_48000"), Some(Audio::Pcm));
        assert_eq!(output_format("opus_48000_64"), Some(Audio::Opus));
        assert_eq!(output_format("ulaw_8000"), Some(Audio::Ulaw));
        assert_eq!(output_format("mp3_48000_128"), None);
        assert_eq!(output_format("flac"), None);
    }

    #[tokio::test]
    async fn streams_audio_in_the_requested_format() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let text = "y".repeat(80); // 5 chunks
        let resp = http
            .post(format!("{}/p/el/v1/text-to-speech/voice123/stream", sim.url()))
            .header("xi-api-key", "xi-test")
            .query(&[("output_format", "wav_22050")])
            .json(&json!({"text": text, "model_id": "eleven_flash_v2_5", "voice_settings": {"stability": 0.5, "similarity_boost": 0.8}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "audio/wav");
        assert_eq!(resp.headers()["x-character-count"], "80");
        let body = resp.bytes().await.unwrap();
        assert_eq!(body.len(), 5 * 1024);
        assert!(body.starts_with(b"RIFF"));
        assert_eq!(u32::from_le_bytes(body[24..28].try_into().unwrap()), 22_050);

        let resp = http.post(format!("{}/v1/text-to-speech/voice123", sim.url())).json(&json!({"text": "hi"})).send().await.unwrap();
        assert_eq!(resp.headers()["content-type"], "audio/mpeg");
        assert!(resp.bytes().await.unwrap().starts_with(b"ID3"));

        let rec = sim.state.recorded();
        assert_eq!(rec[0].path, "/p/el/v1/text-to-speech/voice123/stream");
        assert_eq!(rec[0].query.as_deref(), Some("output_format=wav_22050"));
        assert_eq!(rec[0].headers["xi-api-key"], "xi-test");
    }

    #[tokio::test]
    async fn refuses_bad_formats_and_text_and_honours_faults() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let url = format!("{}/v1/text-to-speech/v", sim.url());
        let resp = http.post(&url).query(&[("output_format", "mp3_1_2")]).json(&json!({"text": "hi"})).send().await.unwrap();
        assert_eq!(resp.status(), 422);
        assert_eq!(resp.json::<Value>().await.unwrap()["detail"]["status"], "invalid_output_format");
        let resp = http.post(&url).json(&json!({"model_id": "m"})).send().await.unwrap();
        assert_eq!(resp.status(), 422);
        assert_eq!(resp.json::<Value>().await.unwrap()["detail"]["status"], "invalid_text");

        let resp = http.post(format!("{}/f/status=429/v1/text-to-speech/v", sim.url())).json(&json!({"text": "hi"})).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.json::<Value>().await.unwrap()["detail"]["status"], "too_many_concurrent_requests");

        // Reset after the headers, before any audio.
        let resp = http.post(format!("{}/f/reset_after=0/v1/text-to-speech/v/stream", sim.url())).json(&json!({"text": "hi"})).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.bytes().await.is_err());
    }
}
