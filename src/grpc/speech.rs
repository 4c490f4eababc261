//! `switchyard.v1.Speech`: text-to-speech and speech-to-text.
//!
//! Synthesis is relayed like a chat stream: the router returns once the
//! first audio bytes arrived (a provider failing before that is a clean
//! failover), then a spawned relay forwards each upstream chunk as it
//! comes, bounded by the provider's `idle_timeout`, and stops — dropping
//! the upstream response — the moment the client leaves. Audio cannot be
//! continued on another provider mid-way, so a provider failing after the
//! first bytes ends the stream with an error (the HTTP façade then aborts
//! the body, so a truncated file never looks complete).

use std::{path::Path, sync::Arc};

use futures_util::StreamExt;
use tokio::{sync::mpsc, time::Instant};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::{served_metadata, Ask, Caller, Gate};
use crate::{
    accounting::{Entry, LedgerRow},
    config::Modality,
    error::{Error, UpstreamError, UpstreamErrorKind},
    proto::{self, speech_server::Speech, AudioChunk, SynthesizeRequest, TranscribeRequest},
    providers::{AudioFormat, AudioUpload, SpeechSpec},
    routing::{media::AudioStarted, Model, Route, Tries},
};

/// The largest upload transcribed: 25 MiB of file.
pub const MAX_AUDIO_BYTES: usize = 25 * 1024 * 1024;
/// The longest text synthesised in one request.
pub const MAX_TTS_CHARS: usize = 10_000;
/// Upload formats, by file extension.
pub const AUDIO_EXTENSIONS: [&str; 8] = ["wav", "mp3", "m4a", "mp4", "webm", "ogg", "opus", "flac"];
/// Sample rates probed to tell "no route has this format" from "no route
/// has it at this rate".
const COMMON_RATES: [u32; 7] = [8000, 16000, 22050, 24000, 32000, 44100, 48000];

pub struct SpeechCore {
    gate: Arc<Gate>,
}

type AudioStream = ReceiverStream<Result<AudioChunk, Status>>;

impl SpeechCore {
    pub fn new(gate: Arc<Gate>) -> Self {
        SpeechCore { gate }
    }

    async fn do_synthesize(&self, caller: &mut Caller, request: Request<SynthesizeRequest>) -> Result<Response<AudioStream>, Error> {
        let req = request.get_ref();
        let (format, sample_rate, speed) = validate_tts(req)?;
        let check = |m: &Model| {
            if req.voice_id.is_none() && m.default_voice.is_none() {
                return Err(Error::invalid_param(format!("'voice_id' is required: model {:?} has no default voice", req.model_id), "voice_id"));
            }
            let supports = |r: &Route, rate: u32| r.adapters.tts.as_ref().is_some_and(|a| a.supports(format, rate));
            if m.routes.iter().any(|r| supports(r, sample_rate)) {
                Ok(())
            } else if m.routes.iter().any(|r| COMMON_RATES.iter().any(|&rate| supports(r, rate))) {
                Err(Error::invalid_param(format!("no provider of {:?} can produce {} at {sample_rate} Hz", req.model_id, format.as_str()), "sample_rate"))
            } else {
                Err(Error::invalid_param(format!("no provider of {:?} can produce {}", req.model_id, format.as_str()), "format"))
            }
        };
        let ask = Ask {
            model: &req.model_id,
            modalities: &[Modality::Tts],
            model_param: "model_id",
            estimated_tokens: 0,
            id_prefix: "tts",
            check: &check,
        };
        let admitted = self.gate.admit(caller, &request, ask).await?;
        let model = admitted.model.clone();
        let spec = Arc::new(SpeechSpec {
            text: req.text.clone(),
            voice: req.voice_id.clone().or_else(|| model.default_voice.clone()).unwrap_or_default(),
            format,
            sample_rate,
            speed,
        });
        let mut tries = Tries::default();
        let served = match self.gate.router.load().synthesize(&model, spec.clone(), &admitted.opts, &mut tries).await {
            Ok(s) => s,
            Err(e) => {
                self.gate.record_failure(&caller.principal, &admitted, &req.model_id, &tries, &e).await;
                return Err(e);
            }
        };
        let mut row = Gate::row(&caller.principal, &admitted, &req.model_id);
        row.provider = Some(served.route.provider.clone());
        row.upstream_model = Some(served.route.upstream_model.clone());
        row.attempts = served.attempts;
        row.ttft_ms = Some(admitted.started.elapsed().as_millis() as u64);
        let chars = spec.text.chars().count() as f64;
        row.unit = Some("characters".into());
        row.units = chars;
        row.cost_usd = chars * served.route.price.per_mchar.unwrap_or(0.0) / 1_000_000.0;
        let (tx, rx) = mpsc::channel(16);
        let relay = AudioRelay {
            tx,
            content_type: format.content_type(),
            idle: served.route.idle_timeout,
            provider: served.route.provider.clone(),
            started: admitted.started,
            ledger: self.gate.ledger.clone(),
            entry: Entry { row, attempts: priced(&tries, chars * served.route.price.per_mchar.unwrap_or(0.0) / 1_000_000.0) },
        };
        tokio::spawn(tracing::Instrument::in_current_span(relay.run(served.value)));
        let mut resp = Response::new(ReceiverStream::new(rx));
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }

    async fn do_transcribe(&self, caller: &mut Caller, request: Request<TranscribeRequest>) -> Result<Response<proto::Transcript>, Error> {
        let req = request.get_ref();
        let content_type = validate_stt(req)?;
        let provider = req.provider_id.as_deref();
        let check = |m: &Model| match provider {
            Some(p) if !m.routes.iter().any(|r| r.provider == p && r.adapters.stt.is_some()) => Err(Error::invalid_param(
                format!("provider {:?} does not serve model {:?}", crate::error::truncate(p, 128), req.model_id),
                "provider_id",
            )),
            _ => Ok(()),
        };
        let ask = Ask {
            model: &req.model_id,
            modalities: &[Modality::Stt],
            model_param: "model_id",
            estimated_tokens: 0,
            id_prefix: "stt",
            check: &check,
        };
        let admitted = self.gate.admit(caller, &request, ask).await?;
        let audio = Arc::new(AudioUpload {
            bytes: req.audio.clone(),
            filename: if req.filename.is_empty() { "audio".into() } else { req.filename.clone() },
            content_type,
            language: req.language.clone(),
        });
        let mut tries = Tries::default();
        let served = match self.gate.router.load().transcribe(&admitted.model, audio, provider, &admitted.opts, &mut tries).await {
            Ok(s) => s,
            Err(e) => {
                self.gate.record_failure(&caller.principal, &admitted, &req.model_id, &tries, &e).await;
                return Err(e);
            }
        };
        let t = served.value;
        let seconds = t.duration.unwrap_or(0.0);
        let cost = seconds / 60.0 * served.route.price.per_minute.unwrap_or(0.0);
        let mut row = Gate::row(&caller.principal, &admitted, &req.model_id);
        row.provider = Some(served.route.provider.clone());
        row.upstream_model = Some(served.route.upstream_model.clone());
        row.attempts = served.attempts;
        row.outcome = "success".into();
        row.unit = Some("audio_seconds".into());
        row.units = seconds;
        row.cost_usd = cost;
        row.ttft_ms = Some(row.latency_ms);
        Gate::record(&self.gate.ledger, Entry { row, attempts: priced(&tries, cost) }).await;
        let mut resp = Response::new(proto::Transcript {
            text: t.text,
            duration: t.duration,
            language: t.language,
            confidence: t.confidence.map(|c| c.clamp(0.0, 1.0)),
            words: t.words.map(|w| proto::WordList {
                words: w
                    .into_iter()
                    .map(|w| proto::Word {
                        word: w.word,
                        start: w.start,
                        end: w.end,
                        confidence: w.confidence,
                    })
                    .collect(),
            }),
            model: req.model_id.clone(),
        });
        served_metadata(&mut resp, &served.route.provider, served.attempts);
        Ok(resp)
    }
}

/// The attempt rows, the serving attempt billed at `cost`.
fn priced(tries: &Tries, cost: f64) -> Vec<crate::accounting::AttemptRow> {
    let mut rows = tries.attempt_rows();
    if let Some(a) = rows.iter_mut().find(|a| a.outcome == "success") {
        a.provider_cost_usd = cost;
    }
    rows
}

fn validate_tts(req: &SynthesizeRequest) -> Result<(AudioFormat, u32, f64), Error> {
    if req.model_id.is_empty() {
        return Err(Error::invalid_param("'model_id' is required", "model_id"));
    }
    let chars = req.text.chars().count();
    if chars == 0 || chars > MAX_TTS_CHARS {
        return Err(Error::invalid_param(format!("'text' must be 1 to {MAX_TTS_CHARS} characters"), "text"));
    }
    if let Some(v) = &req.voice_id {
        if v.is_empty() || v.len() > 128 || !v.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
            return Err(Error::invalid_param("'voice_id' must be 1 to 128 letters, digits, '-', '_' or '.'", "voice_id"));
        }
    }
    let format = match req.format.as_deref() {
        None => AudioFormat::Mp3,
        Some(f) => AudioFormat::parse(f).ok_or_else(|| Error::invalid_param("'format' must be one of mp3, wav, opus, flac, aac", "format"))?,
    };
    let sample_rate = req.sample_rate.unwrap_or(24_000);
    if !(8_000..=48_000).contains(&sample_rate) {
        return Err(Error::invalid_param("'sample_rate' must be 8000 to 48000 Hz", "sample_rate"));
    }
    let speed = req.speed.unwrap_or(1.0);
    if !(speed.is_finite() && (0.25..=4.0).contains(&speed)) {
        return Err(Error::invalid_param("'speed' must be 0.25 to 4.0", "speed"));
    }
    Ok((format, sample_rate, speed))
}

/// Checks an upload and returns the content type to send upstream.
fn validate_stt(req: &TranscribeRequest) -> Result<String, Error> {
    if req.audio.len() > MAX_AUDIO_BYTES {
        return Err(Error::PayloadTooLarge { limit: MAX_AUDIO_BYTES as u64 });
    }
    if req.model_id.is_empty() {
        return Err(Error::invalid_param("'model_id' is required", "model_id"));
    }
    if req.audio.is_empty() {
        return Err(Error::invalid_param("'audio' is required: a non-empty file", "audio"));
    }
    if let Some(l) = &req.language {
        if l.len() != 2 || !l.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(Error::invalid_param("'language' must be an ISO-639-1 code, like en", "language"));
        }
    }
    if req.provider_id.as_ref().is_some_and(|p| p.is_empty() || p.len() > 128) {
        return Err(Error::invalid_param("'provider_id' must name a provider", "provider_id"));
    }
    audio_content_type(&req.filename, &req.content_type)
        .map(str::to_owned)
        .ok_or_else(|| Error::invalid_param(format!("unsupported audio format; send one of {}", AUDIO_EXTENSIONS.join(", ")), "audio"))
}

/// The upload's format, from its content type or else its file extension.
fn audio_content_type(filename: &str, content_type: &str) -> Option<&'static str> {
    let ct = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let by_type = match ct.as_str() {
        "audio/wav" | "audio/x-wav" | "audio/wave" => Some("audio/wav"),
        "audio/mpeg" | "audio/mp3" => Some("audio/mpeg"),
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" => Some("audio/mp4"),
        "video/mp4" => Some("video/mp4"),
        "audio/webm" | "video/webm" => Some("audio/webm"),
        "audio/ogg" => Some("audio/ogg"),
        "audio/opus" => Some("audio/opus"),
        "audio/flac" | "audio/x-flac" => Some("audio/flac"),
        _ => None,
    };
    let ext = Path::new(filename).extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    let by_ext = match ext.as_deref() {
        Some("wav") => Some("audio/wav"),
        Some("mp3") => Some("audio/mpeg"),
        Some("m4a") => Some("audio/mp4"),
        Some("mp4") => Some("video/mp4"),
        Some("webm") => Some("audio/webm"),
        Some("ogg") => Some("audio/ogg"),
        Some("opus") => Some("audio/opus"),
        Some("flac") => Some("audio/flac"),
        _ => None,
    };
    by_type.or(by_ext)
}

/// Relays one provider's audio to one client.
struct AudioRelay {
    tx: mpsc::Sender<Result<AudioChunk, Status>>,
    content_type: &'static str,
    idle: std::time::Duration,
    provider: String,
    started: Instant,
    ledger: Arc<crate::accounting::Ledger>,
    entry: Entry,
}

impl AudioRelay {
    async fn run(mut self, audio: AudioStarted) {
        let end = self.relay(audio).await;
        let row: &mut LedgerRow = &mut self.entry.row;
        row.latency_ms = self.started.elapsed().as_millis() as u64;
        let failure = match end {
            Ok(true) => {
                row.outcome = "success".into();
                None
            }
            Ok(false) => {
                row.outcome = "abandoned".into();
                None
            }
            Err(e) => {
                let e = Error::ProviderUnavailable {
                    message: format!("the audio stream broke: {e}"),
                    attempts: row.attempts,
                };
                row.error_code = Some(e.code().to_owned());
                Some(e)
            }
        };
        Gate::record(&self.ledger, self.entry).await;
        if let Some(e) = failure {
            let _ = self.tx.send(Err(e.to_status())).await;
        }
    }

    /// `Ok(true)` when the audio ended, `Ok(false)` when the client left.
    async fn relay(&self, audio: AudioStarted) -> Result<bool, UpstreamError> {
        let AudioStarted { first, mut rest } = audio;
        let first = AudioChunk {
            data: first,
            content_type: self.content_type.into(),
        };
        if self.tx.send(Ok(first)).await.is_err() {
            return Ok(false);
        }
        loop {
            let next = tokio::select! {
                _ = self.tx.closed() => return Ok(false),
                next = tokio::time::timeout(self.idle, rest.next()) => next,
            };
            let data = match next {
                Err(_) => return Err(UpstreamError::new(&self.provider, UpstreamErrorKind::Timeout, format!("no audio for {:?}", self.idle))),
                Ok(None) => return Ok(true),
                Ok(Some(Err(e))) => return Err(e),
                Ok(Some(Ok(data))) => data,
            };
            if self.tx.send(Ok(AudioChunk { data, content_type: String::new() })).await.is_err() {
                return Ok(false);
            }
        }
    }
}

#[tonic::async_trait]
impl Speech for SpeechCore {
    type SynthesizeStream = AudioStream;

    async fn synthesize(&self, request: Request<SynthesizeRequest>) -> Result<Response<AudioStream>, Status> {
        let mut caller = self.gate.caller(&request).await?;
        let out = self.do_synthesize(&mut caller, request).await;
        self.gate.finish(caller, out).await
    }

    async fn transcribe(&self, request: Request<TranscribeRequest>) -> Result<Response<proto::Transcript>, Status> {
        let mut caller = self.gate.caller(&request).await?;
        let out = self.do_transcribe(&mut caller, request).await;
        self.gate.finish(caller, out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_formats() {
        assert_eq!(audio_content_type("a.WAV", "application/octet-stream"), Some("audio/wav"));
        assert_eq!(audio_content_type("a", "audio/x-m4a"), Some("audio/mp4"));
        assert_eq!(audio_content_type("a.txt", "text/plain"), None);
        assert_eq!(audio_content_type("clip.opus", ""), Some("audio/opus"));
    }

    #[test]
    fn tts_bounds() {
        let ok = SynthesizeRequest {
            model_id: "tts-1".into(),
            text: "hi".into(),
            ..Default::default()
        };
        assert_eq!(validate_tts(&ok).unwrap(), (AudioFormat::Mp3, 24_000, 1.0));
        let bad = |f: fn(&mut SynthesizeRequest)| {
            let mut r = ok.clone();
            f(&mut r);
            validate_tts(&r).unwrap_err().param().map(str::to_owned)
        };
        assert_eq!(bad(|r| r.format = Some("ogg".into())).as_deref(), Some("format"));
        assert_eq!(bad(|r| r.sample_rate = Some(96_000)).as_deref(), Some("sample_rate"));
        assert_eq!(bad(|r| r.speed = Some(9.0)).as_deref(), Some("speed"));
        assert_eq!(bad(|r| r.text.clear()).as_deref(), Some("text"));
        assert_eq!(bad(|r| r.voice_id = Some("../x".into())).as_deref(), Some("voice_id"));
    }
}
