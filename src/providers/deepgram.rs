//! The `deepgram` kind: Deepgram pre-recorded speech to text. `base_url` is
//! the bare host; requests carry `Authorization: Token`.
//!
//! `POST {base_url}/v1/listen?model=<upstream_model>&punctuate=true&smart_format=true`
//! plus `&language=xx` when the client gave a language, else
//! `&detect_language=true` (without either, Deepgram transcribes everything
//! as English and reports no language). The body is the upload itself,
//! under its own `Content-Type`. The answer's first channel's first
//! alternative is the transcript: its text, confidence and words (the
//! punctuated form of each word when there is one); the duration is
//! `metadata.duration`, the language the detected one, else the hint.

use serde_json::Value;

use super::{iso639_1, AudioUpload, RouteCall, SttAdapter, Transcript, Upstream, Word};
use crate::error::{UpstreamError, UpstreamErrorKind};

pub struct Deepgram {
    up: Upstream,
}

impl Deepgram {
    pub fn new(up: Upstream) -> Self {
        Deepgram { up }
    }

    fn request(&self, audio: &AudioUpload, route: &RouteCall<'_>) -> reqwest::RequestBuilder {
        let mut query = vec![("model", route.upstream_model), ("punctuate", "true"), ("smart_format", "true")];
        match audio.language.as_deref() {
            Some(lang) => query.push(("language", lang)),
            None => query.push(("detect_language", "true")),
        }
        let mut rb = self
            .up
            .http
            .post(format!("{}/v1/listen", self.up.base_url))
            .query(&query)
            .header(http::header::CONTENT_TYPE, audio.content_type.as_str())
            .body(audio.bytes.clone());
        if !self.up.api_key.is_empty() {
            rb = rb.header(http::header::AUTHORIZATION, format!("Token {}", self.up.api_key.expose()));
        }
        rb
    }
}

#[async_trait::async_trait]
impl SttAdapter for Deepgram {
    async fn transcribe(&self, audio: &AudioUpload, route: &RouteCall<'_>) -> Result<Transcript, UpstreamError> {
        let resp = self.up.send(self.request(audio, route), route).await?;
        let body = self.up.body(resp).await?;
        transcript_from_json(&body, audio.language.as_deref()).map_err(|d| self.up.err(UpstreamErrorKind::Malformed, d))
    }
}

fn transcript_from_json(body: &[u8], hint: Option<&str>) -> Result<Transcript, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("unparseable transcription: {e}"))?;
    let channel = v.pointer("/results/channels/0").ok_or("response without results.channels")?;
    let alt = channel.pointer("/alternatives/0").ok_or("channel without alternatives")?;
    let text = alt.get("transcript").and_then(Value::as_str).ok_or("alternative without transcript")?;
    let words = match alt.get("words") {
        None | Some(Value::Null) => None,
        Some(Value::Array(ws)) => Some(ws.iter().map(word).collect::<Option<Vec<_>>>().ok_or("a word without word, start or end")?),
        Some(_) => return Err("words is not an array".into()),
    };
    let language = channel
        .get("detected_language")
        .and_then(Value::as_str)
        .and_then(iso639_1)
        .or_else(|| hint.and_then(iso639_1));
    Ok(Transcript {
        text: text.to_owned(),
        duration: v.pointer("/metadata/duration").and_then(Value::as_f64),
        language,
        confidence: alt.get("confidence").and_then(Value::as_f64).map(|c| c.clamp(0.0, 1.0)),
        words,
    })
}

fn word(w: &Value) -> Option<Word> {
    let text = w.get("punctuated_word").and_then(Value::as_str).or_else(|| w.get("word").and_then(Value::as_str))?;
    Some(Word {
        word: text.to_owned(),
        start: w.get("start")?.as_f64()?,
        end: w.get("end")?.as_f64()?,
        confidence: w.get("confidence").and_then(Value::as_f64),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::providers::testing::{self, route, KEY};

    fn upload(language: Option<&str>) -> AudioUpload {
        AudioUpload {
            bytes: bytes::Bytes::from_static(b"fLaC...."),
            filename: "a.flac".into(),
            content_type: "audio/flac".into(),
            language: language.map(str::to_owned),
        }
    }

    #[test]
    fn request_shape() {
        let d = Deepgram::new(testing::upstream("https://api.deepgram.example").unwrap());
        let req = d.request(&upload(Some("es")), &route("nova-3")).build().unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.url().as_str(),
            "https://api.deepgram.example/v1/listen?model=nova-3&punctuate=true&smart_format=true&language=es"
        );
        assert_eq!(req.headers()["authorization"], format!("Token {KEY}").as_str());
        assert_eq!(req.headers()["content-type"], "audio/flac");
        assert_eq!(req.body().unwrap().as_bytes(), Some(&b"fLaC...."[..]));

        let req = d.request(&upload(None), &route("nova 3&x=y")).build().unwrap();
        assert_eq!(req.url().query(), Some("model=nova+3%26x%3Dy&punctuate=true&smart_format=true&detect_language=true"));
    }

    #[test]
    fn parses_a_listen_response() {
        let body = json!({
            "metadata": {"request_id": "r1", "duration": 3.25, "channels": 1, "models": ["m"]},
            "results": {"channels": [{
                "detected_language": "en",
                "language_confidence": 0.99,
                "alternatives": [{
                    "transcript": "Hello, world.",
                    "confidence": 0.98,
                    "words": [
                        {"word": "hello", "start": 0.08, "end": 0.4, "confidence": 0.99, "punctuated_word": "Hello,"},
                        {"word": "world", "start": 0.5, "end": 0.9, "confidence": 0.97}
                    ]
                }]
            }]}
        });
        let t = transcript_from_json(body.to_string().as_bytes(), Some("fr")).unwrap();
        assert_eq!(t.text, "Hello, world.");
        assert_eq!(t.duration, Some(3.25));
        assert_eq!(t.confidence, Some(0.98));
        assert_eq!(t.language.as_deref(), Some("en"));
        let words = t.words.unwrap();
        assert_eq!(words[0], Word { word: "Hello,".into(), start: 0.08, end: 0.4, confidence: Some(0.99) });
        assert_eq!(words[1].word, "world");

        // No detection: the hint.
        let body = json!({"metadata": {"duration": 1.0}, "results": {"channels": [{"alternatives": [{"transcript": "", "confidence": 0.0, "words": []}]}]}});
        let t = transcript_from_json(body.to_string().as_bytes(), Some("de-DE")).unwrap();
        assert_eq!((t.text.as_str(), t.language.as_deref(), t.words), ("", Some("de"), Some(vec![])));

        for bad in [r#"{"metadata":{}}"#, r#"{"results":{"channels":[]}}"#, r#"{"results":{"channels":[{"alternatives":[{}]}]}}"#, "nope"] {
            assert!(transcript_from_json(bad.as_bytes(), None).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn errors_carry_err_msg() {
        use axum::{http::StatusCode, routing::post};
        let app = axum::Router::new().route(
            "/v1/listen",
            post(|| async {
                (StatusCode::BAD_REQUEST, r#"{"err_code":"Bad Request","err_msg":"Bad Request: failed to process audio: corrupt or unsupported data","request_id":"r"}"#)
            }),
        );
        let base = testing::serve(app).await.unwrap();
        let e = Deepgram::new(testing::upstream(&base).unwrap()).transcribe(&upload(None), &route("nova-3")).await.unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::ClientFault { status: 400 });
        assert!(e.detail.contains("corrupt or unsupported data"), "{e}");
    }
}
