//! The `elevenlabs` kind: ElevenLabs text to speech, streamed. `base_url`
//! is the bare host; requests carry `xi-api-key`.
//!
//! `POST {base_url}/v1/text-to-speech/{voice_id}/stream?output_format=...`
//! with `{"text", "model_id": <upstream_model>, "voice_settings":
//! {"speed"}}` (`voice_settings` only when the speed is not 1). The audio
//! is passed on as it arrives.
//!
//! Formats and rates are those of [`output_format`]: mp3 at 22050, 24000
//! and 44100 Hz; wav at 8000 to 48000 Hz; opus at 48000 Hz; no flac or aac.
//! ElevenLabs takes speeds from 0.7 to 1.2 only: a speed outside them is
//! refused as `Unsupported` (another provider may serve it) rather than
//! sent to be refused as a client fault.

use serde_json::{json, Value};

use super::{AudioFormat, ByteStream, RouteCall, SpeechSpec, TtsAdapter, Upstream};
use crate::error::{UpstreamError, UpstreamErrorKind};

/// The speeds ElevenLabs accepts.
const SPEEDS: std::ops::RangeInclusive<f64> = 0.7..=1.2;

pub struct ElevenLabs {
    up: Upstream,
}

impl ElevenLabs {
    pub fn new(up: Upstream) -> Self {
        ElevenLabs { up }
    }

    fn request(&self, spec: &SpeechSpec, route: &RouteCall<'_>) -> Result<reqwest::RequestBuilder, UpstreamError> {
        let format = output_format(spec.format, spec.sample_rate).ok_or_else(|| {
            self.up.err(
                UpstreamErrorKind::Unsupported,
                format!("ElevenLabs has no {} at {} Hz", spec.format.as_str(), spec.sample_rate),
            )
        })?;
        if !SPEEDS.contains(&spec.speed) {
            return Err(self.up.err(UpstreamErrorKind::Unsupported, "ElevenLabs speeds are 0.7 to 1.2"));
        }
        if !valid_voice_id(&spec.voice) {
            // Every provider would refuse such a voice; the client must fix it.
            return Err(self.up.err(UpstreamErrorKind::ClientFault { status: 400 }, "voice ids are letters, digits, '-' and '_'"));
        }
        let mut rb = self
            .up
            .http
            .post(format!("{}/v1/text-to-speech/{}/stream", self.up.base_url, spec.voice))
            .query(&[("output_format", format)])
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body(spec, route.upstream_model).to_string());
        if !self.up.api_key.is_empty() {
            rb = rb.header("xi-api-key", self.up.api_key.expose());
        }
        Ok(rb)
    }
}

#[async_trait::async_trait]
impl TtsAdapter for ElevenLabs {
    fn supports(&self, format: AudioFormat, sample_rate: u32) -> bool {
        output_format(format, sample_rate).is_some()
    }

    async fn synthesize(&self, spec: &SpeechSpec, route: &RouteCall<'_>) -> Result<ByteStream, UpstreamError> {
        let resp = self.up.send(self.request(spec, route)?, route).await?;
        Ok(self.up.byte_stream(resp))
    }
}

/// ElevenLabs' `output_format` for a format at a sample rate, if it has one.
pub fn output_format(format: AudioFormat, sample_rate: u32) -> Option<&'static str> {
    use AudioFormat as F;
    Some(match (format, sample_rate) {
        (F::Mp3, 22_050) => "mp3_22050_32",
        (F::Mp3, 24_000) => "mp3_24000_48",
        (F::Mp3, 44_100) => "mp3_44100_128",
        (F::Wav, 8_000) => "wav_8000",
        (F::Wav, 16_000) => "wav_16000",
        (F::Wav, 22_050) => "wav_22050",
        (F::Wav, 24_000) => "wav_24000",
        (F::Wav, 44_100) => "wav_44100",
        (F::Wav, 48_000) => "wav_48000",
        (F::Opus, 48_000) => "opus_48000_128",
        _ => return None,
    })
}

fn valid_voice_id(voice: &str) -> bool {
    !voice.is_empty() && voice.len() <= 128 && voice.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn body(spec: &SpeechSpec, model: &str) -> Value {
    let mut body = json!({"text": spec.text, "model_id": model});
    if spec.speed != 1.0 {
        body["voice_settings"] = json!({"speed": spec.speed});
    }
    body
}

#[cfg(test)]
mod tests {
    use axum::{body::Body, http::HeaderMap, response::IntoResponse, routing::post};
    use futures_util::StreamExt;

    use super::*;
    use crate::providers::testing::{self, json_body, route, KEY};

    fn spec(format: AudioFormat, sample_rate: u32, speed: f64) -> SpeechSpec {
        SpeechSpec {
            text: "Hello.".into(),
            voice: "21m00Tcm4TlvDq8ikWAM".into(),
            format,
            sample_rate,
            speed,
        }
    }

    #[test]
    fn output_format_table_and_supports() {
        let a = ElevenLabs::new(testing::upstream("https://api.elevenlabs.example").unwrap());
        let table = [
            (AudioFormat::Mp3, 22_050, "mp3_22050_32"),
            (AudioFormat::Mp3, 24_000, "mp3_24000_48"),
            (AudioFormat::Mp3, 44_100, "mp3_44100_128"),
            (AudioFormat::Wav, 8_000, "wav_8000"),
            (AudioFormat::Wav, 16_000, "wav_16000"),
            (AudioFormat::Wav, 22_050, "wav_22050"),
            (AudioFormat::Wav, 24_000, "wav_24000"),
            (AudioFormat::Wav, 44_100, "wav_44100"),
            (AudioFormat::Wav, 48_000, "wav_48000"),
            (AudioFormat::Opus, 48_000, "opus_48000_128"),
        ];
        for (f, r, want) in table {
            assert_eq!(output_format(f, r), Some(want));
            assert!(a.supports(f, r));
        }
        for (f, r) in [
            (AudioFormat::Mp3, 48_000),
            (AudioFormat::Mp3, 16_000),
            (AudioFormat::Wav, 11_025),
            (AudioFormat::Opus, 24_000),
            (AudioFormat::Flac, 44_100),
            (AudioFormat::Flac, 48_000),
            (AudioFormat::Aac, 44_100),
            (AudioFormat::Aac, 24_000),
        ] {
            assert!(!a.supports(f, r), "{f:?} {r}");
        }
    }

    #[test]
    fn request_shape() {
        let a = ElevenLabs::new(testing::upstream("https://api.elevenlabs.example").unwrap());
        let req = a.request(&spec(AudioFormat::Mp3, 44_100, 1.0), &route("eleven_multilingual_v2")).unwrap().build().unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(
            req.url().as_str(),
            "https://api.elevenlabs.example/v1/text-to-speech/21m00Tcm4TlvDq8ikWAM/stream?output_format=mp3_44100_128"
        );
        assert_eq!(req.headers()["xi-api-key"], KEY);
        assert!(!req.headers().contains_key("authorization"));
        assert_eq!(json_body(&req), json!({"text": "Hello.", "model_id": "eleven_multilingual_v2"}));

        let req = a.request(&spec(AudioFormat::Wav, 16_000, 1.1), &route("eleven_flash_v2_5")).unwrap().build().unwrap();
        assert_eq!(req.url().query(), Some("output_format=wav_16000"));
        assert_eq!(json_body(&req)["voice_settings"], json!({"speed": 1.1}));
    }

    #[test]
    fn refusals() {
        let a = ElevenLabs::new(testing::upstream("https://api.elevenlabs.example").unwrap());
        let r = route("m");
        let e = a.request(&spec(AudioFormat::Flac, 44_100, 1.0), &r).unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::Unsupported);
        let e = a.request(&spec(AudioFormat::Mp3, 44_100, 2.0), &r).unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::Unsupported);
        for voice in ["../../v1/user", "a b", "v?x=1", "", "é"] {
            let mut s = spec(AudioFormat::Mp3, 44_100, 1.0);
            s.voice = voice.into();
            let e = a.request(&s, &r).unwrap_err();
            assert_eq!(e.kind, UpstreamErrorKind::ClientFault { status: 400 }, "{voice}");
        }
    }

    #[tokio::test]
    async fn streams_audio_and_reads_error_details() {
        let app = axum::Router::new().route(
            "/v1/text-to-speech/{voice}/stream",
            post(|headers: HeaderMap, axum::extract::Path(voice): axum::extract::Path<String>| async move {
                assert_eq!(headers["xi-api-key"], KEY);
                assert!(headers.contains_key("traceparent"));
                if voice == "missing" {
                    let detail = json!({"detail": {"status": "voice_not_found", "message": "A voice with the voice_id missing was not found."}});
                    return (axum::http::StatusCode::NOT_FOUND, detail.to_string()).into_response();
                }
                let chunks = futures_util::stream::iter([Ok::<_, std::io::Error>("RIFF"), Ok("....WAVE")]);
                Body::from_stream(chunks).into_response()
            }),
        );
        let base = testing::serve(app).await.unwrap();
        let a = ElevenLabs::new(testing::upstream(&base).unwrap());
        let mut audio = a.synthesize(&spec(AudioFormat::Wav, 24_000, 1.0), &route("m")).await.unwrap();
        let mut all = Vec::new();
        while let Some(chunk) = audio.next().await {
            all.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(all, b"RIFF....WAVE");

        let mut s = spec(AudioFormat::Wav, 24_000, 1.0);
        s.voice = "missing".into();
        let e = a.synthesize(&s, &route("m")).await.err().unwrap();
        assert_eq!(e.kind, UpstreamErrorKind::ClientFault { status: 404 });
        assert!(e.detail.contains("voice_id missing was not found"), "{e}");
    }
}
