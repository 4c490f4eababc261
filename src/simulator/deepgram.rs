//! Deepgram pre-recorded transcription, `POST /v1/listen` with the raw
//! audio as the body and the options in the query (`model`, `language`,
//! `punctuate`, `smart_format`, `detect_language`). The transcript is the
//! one OpenAI's transcriptions give the same bytes: lowercase without
//! punctuation, or as a sentence with `punctuate=true` or
//! `smart_format=true`.

use std::{collections::HashMap, sync::Arc, time::SystemTime};

use axum::{
    extract::{Path, Query, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{
    media::{hash64, rfc3339, uuid, Transcript},
    path_and_query, preflight_as, prefix_of, read_body, sync_response, Prefix, SimState, MAX_MEDIA_BODY,
};

/// The request id the fault answers carry.
const FAULT_REQUEST_ID: &str = "00000000-0000-4000-a000-000000000000";

pub(super) fn error_body(status: u16) -> Value {
    let code = match status {
        401 => "INVALID_AUTH",
        402 => "ASR_PAYMENT_REQUIRED",
        403 => "INSUFFICIENT_PERMISSIONS",
        429 => "TOO_MANY_REQUESTS",
        400..=499 => "Bad Request",
        _ => "INTERNAL_SERVER_ERROR",
    };
    json!({"err_code": code, "err_msg": format!("simulated failure (status {status})"), "request_id": FAULT_REQUEST_ID})
}

pub(super) async fn listen(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    listen_at(state, prefix_of(&params), req).await.unwrap_or_else(|r| r)
}

async fn listen_at(state: Arc<SimState>, prefix: Prefix, req: Request) -> Result<Response, Response> {
    let path = path_and_query(req.uri());
    let query: HashMap<String, String> = Query::try_from_uri(req.uri()).map(|q| q.0).unwrap_or_default();
    let (parts, audio) = read_body(req, MAX_MEDIA_BODY).await?;
    let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
    let summary = json!({"bytes": audio.len(), "content_type": content_type});
    let faults = preflight_as(&state, prefix, &path, &parts.headers, &summary, false, error_body).await?;
    let request_id = uuid(hash64(state.seed, &audio) ^ state.requests.load(std::sync::atomic::Ordering::SeqCst));
    if audio.is_empty() {
        return Err((
            StatusCode::BAD_REQUEST,
            Json(json!({"err_code": "Bad Request", "err_msg": "Bad Request: failed to process audio: corrupt or unsupported data", "request_id": request_id})),
        )
            .into_response());
    }
    let on = |k: &str| query.get(k).is_some_and(|v| v == "true");
    let punctuate = on("punctuate") || on("smart_format");
    let t = Transcript::of(state.seed, &audio, faults.tokens.unwrap_or(12));
    let punctuated = t.punctuated();
    let words: Vec<Value> = t
        .words
        .iter()
        .zip(&punctuated)
        .zip(t.timings())
        .map(|((w, p), (start, end))| {
            json!({"word": w, "start": start, "end": end, "confidence": 0.98, "punctuated_word": if punctuate { p.as_str() } else { w }})
        })
        .collect();
    let transcript = if punctuate { t.text() } else { t.words.join(" ") };
    let model = query.get("model").map_or("base", String::as_str);
    let model_id = uuid(hash64(0, model.as_bytes()));
    let mut channel = json!({
        "alternatives": [{"transcript": transcript, "confidence": 0.98, "words": words}],
        "detected_language": query.get("language").map_or("en", String::as_str),
    });
    if on("detect_language") {
        channel["language_confidence"] = json!(0.99);
    }
    let body = json!({
        "metadata": {
            "transaction_key": "deprecated",
            "request_id": request_id,
            "sha256": t.sha256,
            "created": rfc3339(SystemTime::now()),
            "duration": t.duration,
            "channels": 1,
            "models": [model_id],
            "model_info": {model_id.clone(): {"name": model, "version": "2024-01-01.0", "arch": model}},
        },
        "results": {"channels": [channel]},
    });
    let mut resp = sync_response(body, &faults);
    if let Ok(id) = http::HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("dg-request-id", id);
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use reqwest::multipart::{Form, Part};
    use serde_json::{json, Value};

    use crate::simulator::test_sim;

    #[tokio::test]
    async fn transcribes_like_openai() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let audio = vec![3u8; 48_000];
        let resp = http
            .post(format!("{}/p/dg/v1/listen", sim.url()))
            .query(&[("model", "nova-2"), ("punctuate", "true"), ("language", "de")])
            .header("authorization", "Token dg-test")
            .header("content-type", "audio/wav")
            .body(audio.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["metadata"]["duration"], 1.5);
        assert_eq!(v["metadata"]["channels"], 1);
        let channel = &v["results"]["channels"][0];
        assert_eq!(channel["detected_language"], "de");
        let alt = &channel["alternatives"][0];
        assert_eq!(alt["confidence"], 0.98);
        assert_eq!(alt["words"].as_array().unwrap().len(), 12);
        assert_eq!(alt["words"][11]["end"], 1.5);

        // The same bytes give OpenAI's transcript.
        let form = Form::new().part("file", Part::bytes(audio.clone()).file_name("a.wav")).text("model", "whisper-1");
        let openai: Value = http.post(format!("{}/v1/audio/transcriptions", sim.url())).multipart(form).send().await.unwrap().json().await.unwrap();
        assert_eq!(alt["transcript"], openai["text"]);

        // Unpunctuated by default.
        let v: Value = http.post(format!("{}/v1/listen", sim.url())).body(audio).send().await.unwrap().json().await.unwrap();
        let plain = v["results"]["channels"][0]["alternatives"][0]["transcript"].as_str().unwrap();
        assert_eq!(plain, openai["text"].as_str().unwrap().to_lowercase().trim_end_matches('.'));
        assert_eq!(v["results"]["channels"][0]["detected_language"], "en");

        let rec = sim.state.recorded();
        assert_eq!(rec[0].path, "/p/dg/v1/listen");
        assert_eq!(rec[0].body, json!({"bytes": 48_000, "content_type": "audio/wav"}));
        assert!(rec[0].query.as_deref().unwrap().contains("model=nova-2"));
    }

    #[tokio::test]
    async fn refuses_an_empty_body_and_honours_faults() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http.post(format!("{}/v1/listen", sim.url())).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["err_code"], "Bad Request");
        assert!(v["err_msg"].is_string() && v["request_id"].is_string());

        let resp = http.post(format!("{}/f/status=503/v1/listen", sim.url())).body(vec![1u8; 10]).send().await.unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.json::<Value>().await.unwrap()["err_code"], "INTERNAL_SERVER_ERROR");

        let resp = http.post(format!("{}/v1/listen", sim.url())).header("x-sim-hangup", "true").body(vec![1u8; 10]).send().await;
        assert!(resp.is_err());
    }
}
