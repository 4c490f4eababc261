//! The `openai` kind: OpenAI itself and every OpenAI-compatible host (vLLM,
//! Together, Groq, Fireworks, Azure-style). `base_url` ends in `/v1` and
//! every path is relative to it; requests carry `Authorization: Bearer`.
//!
//! - Chat: `POST {base_url}/chat/completions`. The request is the client's
//!   own, re-addressed to the route's upstream model, with every parameter
//!   the client sent (named or not) forwarded. A streamed request always
//!   asks for usage so accounting is exact.
//! - Images: `POST {base_url}/images/generations` with `{"model", "prompt",
//!   "n", "size"?}`. `size` is the client's, else derived from its aspect
//!   ratio ([`size_for_aspect`]). `response_format` is never sent (the
//!   gpt-image models refuse it, and answer `b64_json` anyway); a seed is
//!   dropped (the API has none). Video, a negative prompt and input images
//!   are refused as `Unsupported` so the router tries another provider.
//!   `b64_json` images come back as bytes, `url` ones as URLs.
//! - Speech: `POST {base_url}/audio/speech` with `{"model", "input",
//!   "voice", "response_format", "speed"}`; every format, at 24 kHz only.
//!   The audio is streamed through as it arrives.
//! - Transcription: multipart `POST {base_url}/audio/transcriptions` with
//!   `file`, `model`, `response_format=verbose_json`,
//!   `timestamp_granularities[]=word` and `language`?. The language name
//!   Whisper reports (`"english"`) becomes ISO-639-1 ([`language_code`]).

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{
    client, iso639_1, parse_size, AudioFormat, AudioUpload, ByteStream, ChatAdapter, ChunkStream, GenerateAdapter, GeneratedMedia,
    GenerationSpec, MediaData, RouteCall, SpeechSpec, SttAdapter, Transcript, TtsAdapter, Upstream, Word,
};
use crate::{
    error::{UpstreamError, UpstreamErrorKind},
    proto::{openai_json, ChatCompletion, ChatRequest},
};

/// The one sample rate OpenAI's speech endpoint produces.
const SPEECH_SAMPLE_RATE: u32 = 24_000;

pub struct OpenAi {
    up: Upstream,
    /// `{base_url}/chat/completions` and the `Authorization` value, made
    /// once: parsing the URL and formatting the header for every request
    /// were 3% of a sync request's CPU.
    chat_url: Option<http::Uri>,
    /// Content type and `Authorization`, copied into each request.
    chat_headers: http::HeaderMap,
}

impl OpenAi {
    pub fn new(up: Upstream) -> Self {
        let chat_url = format!("{}/chat/completions", up.base_url).parse::<http::Uri>().ok();
        let mut chat_headers = http::HeaderMap::with_capacity(4);
        chat_headers.insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/json"));
        if let Some(mut v) = (!up.api_key.is_empty()).then(|| http::HeaderValue::from_str(&format!("Bearer {}", up.api_key.expose())).ok()).flatten() {
            v.set_sensitive(true);
            chat_headers.insert(http::header::AUTHORIZATION, v);
        }
        OpenAi { up, chat_url, chat_headers }
    }

    /// Sends a chat request; the body is the proto request in OpenAI's JSON.
    async fn send_chat(&self, req: &ChatRequest, route: &RouteCall<'_>, stream: bool) -> Result<client::Response, UpstreamError> {
        let Some(url) = &self.chat_url else {
            return Err(self.up.err(UpstreamErrorKind::Connect, "base_url is not a valid URL"));
        };
        let body = serde_json::to_vec(&openai_json::request_to_json(req, route.upstream_model, stream))
            .map_err(|e| self.up.err(UpstreamErrorKind::Unsupported, e.to_string()))?;
        let mut headers = self.chat_headers.clone();
        if stream {
            headers.insert(http::header::ACCEPT, http::HeaderValue::from_static("text/event-stream"));
        }
        self.up.post_chat(url, headers, body, route).await
    }
}

#[async_trait::async_trait]
impl ChatAdapter for OpenAi {
    async fn complete(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChatCompletion, UpstreamError> {
        let resp = self.send_chat(req, route, false).await?;
        let body = self.up.chat_body(resp).await?;
        openai_json::completion_from_json(&body)
            .map_err(|e| self.up.err(UpstreamErrorKind::Malformed, format!("unparseable chat.completion: {e}")))
    }

    async fn stream(&self, req: &ChatRequest, route: &RouteCall<'_>) -> Result<ChunkStream, UpstreamError> {
        let resp = self.send_chat(req, route, true).await?;
        let id = self.up.id.clone();
        let events = self.up.chat_events(resp);
        // `[DONE]` ends the stream; a stream that ends without it was cut.
        let chunks = futures_util::stream::unfold((Box::pin(events), false), move |(mut events, done)| {
            let id = id.clone();
            async move {
                if done {
                    return None;
                }
                loop {
                    let item = match events.next().await {
                        None => Err(UpstreamError::new(&id, UpstreamErrorKind::Reset, "stream ended without [DONE]")),
                        Some(Err(e)) => Err(e),
                        Some(Ok(ev)) if ev.data == "[DONE]" => return None,
                        Some(Ok(ev)) if ev.data.is_empty() => continue,
                        Some(Ok(ev)) => parse_event(&id, &ev.data),
                    };
                    let done = item.is_err();
                    return Some((item, (events, done)));
                }
            }
        });
        Ok(Box::pin(chunks))
    }
}

fn parse_event(id: &str, data: &str) -> Result<crate::proto::ChatChunk, UpstreamError> {
    // A mid-stream error event: {"error": {...}}.
    if data.starts_with("{\"error\"") {
        let message = super::error_message(data.as_bytes());
        return Err(UpstreamError::new(id, UpstreamErrorKind::Server { status: 200 }, format!("error event: {message}")));
    }
    openai_json::chunk_from_json(data)
        .map_err(|e| UpstreamError::new(id, UpstreamErrorKind::Malformed, format!("unparseable chunk: {e}")))
}


impl OpenAi {
    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        if self.up.api_key.is_empty() {
            rb
        } else {
            rb.bearer_auth(self.up.api_key.expose())
        }
    }

    fn json_post(&self, path: &str, body: &Value) -> reqwest::RequestBuilder {
        let rb = self
            .up
            .http
            .post(format!("{}/{path}", self.up.base_url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(body.to_string());
        self.authed(rb)
    }

    /// The images request, and the size it asks for.
    fn images_request(&self, spec: &GenerationSpec, route: &RouteCall<'_>) -> Result<(reqwest::RequestBuilder, Option<String>), UpstreamError> {
        let (body, size) = images_body(spec, route.upstream_model).map_err(|d| self.up.err(UpstreamErrorKind::Unsupported, d))?;
        Ok((self.json_post("images/generations", &body), size))
    }

    fn speech_request(&self, spec: &SpeechSpec, route: &RouteCall<'_>) -> reqwest::RequestBuilder {
        self.json_post("audio/speech", &speech_body(spec, route.upstream_model))
    }

    fn transcription_request(&self, audio: &AudioUpload, route: &RouteCall<'_>) -> reqwest::RequestBuilder {
        use reqwest::multipart::{Form, Part};
        let filename = upload_filename(&audio.filename, &audio.content_type);
        let part = || {
            Part::stream_with_length(reqwest::Body::from(audio.bytes.clone()), audio.bytes.len() as u64).file_name(filename.clone())
        };
        // An unparseable content type is left out: OpenAI goes by the
        // file name's extension anyway.
        let file = part().mime_str(&audio.content_type).unwrap_or_else(|_| part());
        let mut form = Form::new()
            .part("file", file)
            .text("model", route.upstream_model.to_owned())
            .text("response_format", "verbose_json")
            .text("timestamp_granularities[]", "word");
        if let Some(lang) = &audio.language {
            form = form.text("language", lang.clone());
        }
        self.authed(self.up.http.post(format!("{}/audio/transcriptions", self.up.base_url)).multipart(form))
    }
}

#[async_trait::async_trait]
impl GenerateAdapter for OpenAi {
    async fn generate(&self, spec: &GenerationSpec, route: &RouteCall<'_>) -> Result<Vec<GeneratedMedia>, UpstreamError> {
        let (rb, size) = self.images_request(spec, route)?;
        let resp = self.up.send(rb, route).await?;
        let body = self.up.body(resp).await?;
        images_from_json(&body, size.as_deref()).map_err(|d| self.up.err(UpstreamErrorKind::Malformed, d))
    }
}

#[async_trait::async_trait]
impl TtsAdapter for OpenAi {
    fn supports(&self, _format: AudioFormat, sample_rate: u32) -> bool {
        sample_rate == SPEECH_SAMPLE_RATE
    }

    async fn synthesize(&self, spec: &SpeechSpec, route: &RouteCall<'_>) -> Result<ByteStream, UpstreamError> {
        if !self.supports(spec.format, spec.sample_rate) {
            return Err(self.up.err(UpstreamErrorKind::Unsupported, format!("OpenAI speech is {SPEECH_SAMPLE_RATE} Hz only")));
        }
        let resp = self.up.send(self.speech_request(spec, route), route).await?;
        Ok(self.up.byte_stream(resp))
    }
}

#[async_trait::async_trait]
impl SttAdapter for OpenAi {
    async fn transcribe(&self, audio: &AudioUpload, route: &RouteCall<'_>) -> Result<Transcript, UpstreamError> {
        let resp = self.up.send(self.transcription_request(audio, route), route).await?;
        let body = self.up.body(resp).await?;
        transcript_from_json(&body, audio.language.as_deref()).map_err(|d| self.up.err(UpstreamErrorKind::Malformed, d))
    }
}

/// The size the gpt-image models accept closest to an aspect ratio `W:H`:
/// between 4:5 and 5:4 (inclusive) → `1024x1024`; wider (4:3, 3:2, 16:9,
/// 21:9) → `1536x1024`; taller (3:4, 2:3, 9:16) → `1024x1536`.
pub fn size_for_aspect(aspect_ratio: &str) -> Option<&'static str> {
    let (w, h) = aspect_ratio.split_once(':')?;
    let (w, h): (f64, f64) = (w.trim().parse().ok()?, h.trim().parse().ok()?);
    if !(w.is_finite() && h.is_finite() && w > 0.0 && h > 0.0) {
        return None;
    }
    let r = w / h;
    Some(if r > 1.25 {
        "1536x1024"
    } else if r < 0.8 {
        "1024x1536"
    } else {
        "1024x1024"
    })
}

/// The `/images/generations` body, and the size it asks for; or why this
/// endpoint cannot serve the spec.
fn images_body(spec: &GenerationSpec, model: &str) -> Result<(Value, Option<String>), &'static str> {
    if spec.video {
        return Err("video generation is not served by the images API");
    }
    if spec.negative_prompt.as_deref().is_some_and(|p| !p.is_empty()) {
        return Err("negative_prompt is not supported by the images API");
    }
    if !spec.image_urls.is_empty() {
        return Err("input images are not supported by /images/generations");
    }
    let size = spec.size.clone().or_else(|| spec.aspect_ratio.as_deref().and_then(size_for_aspect).map(str::to_owned));
    let mut body = json!({"model": model, "prompt": spec.prompt, "n": spec.n});
    if let Some(s) = &size {
        body["size"] = s.as_str().into();
    }
    Ok((body, size))
}

/// Parses `{"created", "data": [{"b64_json"} | {"url"}], ...}`. `size` is
/// the size asked for; without it, the `size` the API reports is used.
fn images_from_json(body: &[u8], size: Option<&str>) -> Result<Vec<GeneratedMedia>, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("unparseable images response: {e}"))?;
    let data = v.get("data").and_then(Value::as_array).ok_or("images response without data")?;
    if data.is_empty() {
        return Err("images response without an image".into());
    }
    let dims = size.or_else(|| v.get("size").and_then(Value::as_str)).and_then(parse_size);
    let declared = v.get("output_format").and_then(Value::as_str).and_then(super::image_type_for_extension);
    data.iter()
        .map(|item| {
            if let Some(b64) = item.get("b64_json").and_then(Value::as_str) {
                let bytes = BASE64.decode(b64.trim()).map_err(|e| format!("undecodable b64_json: {e}"))?;
                // The bytes themselves are the best witness of their type.
                let content_type = super::sniff_image(&bytes).or(declared).unwrap_or("image/png");
                let (width, height) = super::png_dimensions(&bytes).or(dims).unzip();
                Ok(GeneratedMedia {
                    data: MediaData::Bytes(bytes.into()),
                    video: false,
                    content_type: content_type.to_owned(),
                    width,
                    height,
                    duration: None,
                })
            } else if let Some(url) = item.get("url").and_then(Value::as_str) {
                let content_type = declared.or_else(|| super::media_type_for_url(url)).unwrap_or("image/png");
                let (width, height) = dims.unzip();
                Ok(GeneratedMedia {
                    data: MediaData::Url(url.to_owned()),
                    video: false,
                    content_type: content_type.to_owned(),
                    width,
                    height,
                    duration: None,
                })
            } else {
                Err("an image with neither b64_json nor url".into())
            }
        })
        .collect()
}

fn speech_body(spec: &SpeechSpec, model: &str) -> Value {
    json!({
        "model": model,
        "input": spec.text,
        "voice": spec.voice,
        "response_format": spec.format.as_str(),
        "speed": spec.speed,
    })
}

/// Extensions `/audio/transcriptions` recognises; it goes by the file
/// name, so an upload without one gets one from its content type.
const UPLOAD_EXTENSIONS: [&str; 10] = ["flac", "m4a", "mp3", "mp4", "mpeg", "mpga", "oga", "ogg", "wav", "webm"];

fn upload_filename(filename: &str, content_type: &str) -> String {
    let name = filename.rsplit(['/', '\\']).next().unwrap_or_default().trim();
    let has_known_ext = name
        .rsplit_once('.')
        .is_some_and(|(_, ext)| UPLOAD_EXTENSIONS.contains(&ext.to_ascii_lowercase().as_str()));
    if has_known_ext {
        return name.to_owned();
    }
    let essence = content_type.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    let ext = match essence.as_str() {
        "audio/mpeg" | "audio/mp3" | "audio/mpga" => Some("mp3"),
        "audio/wav" | "audio/wave" | "audio/x-wav" | "audio/vnd.wave" => Some("wav"),
        "audio/flac" | "audio/x-flac" => Some("flac"),
        "audio/ogg" | "audio/opus" | "application/ogg" => Some("ogg"),
        "audio/webm" | "video/webm" => Some("webm"),
        "audio/mp4" | "audio/m4a" | "audio/x-m4a" | "audio/aac" => Some("m4a"),
        "video/mp4" => Some("mp4"),
        _ => None,
    };
    let base = if name.is_empty() { "audio" } else { name };
    match ext {
        Some(ext) => format!("{base}.{ext}"),
        None => base.to_owned(),
    }
}

/// A number, or a number in a string (older `verbose_json` answers gave
/// `duration` as `"8.47"`).
fn number(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())).filter(|n: &f64| n.is_finite())
}

/// Parses a `verbose_json` transcription (or a plain `json` one: only
/// `text` is required). `hint` is the language the client gave.
///
/// `confidence` is derived from the segments: the exponential of their
/// `avg_logprob`, averaged weighted by segment length (plainly if the
/// segments carry no times), clamped to 0..=1; `None` without segments.
fn transcript_from_json(body: &[u8], hint: Option<&str>) -> Result<Transcript, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("unparseable transcription: {e}"))?;
    let text = v.get("text").and_then(Value::as_str).ok_or("transcription without text")?;
    let duration = v.get("duration").and_then(number).or_else(|| v.pointer("/usage/seconds").and_then(number));
    let language = v
        .get("language")
        .and_then(Value::as_str)
        .and_then(language_code)
        .or_else(|| hint.and_then(iso639_1));
    let words = match v.get("words") {
        None | Some(Value::Null) => None,
        Some(Value::Array(ws)) => Some(
            ws.iter()
                .map(|w| {
                    Some(Word {
                        word: w.get("word")?.as_str()?.to_owned(),
                        start: w.get("start").and_then(number)?,
                        end: w.get("end").and_then(number)?,
                        confidence: None,
                    })
                })
                .collect::<Option<Vec<_>>>()
                .ok_or("a word without word, start or end")?,
        ),
        Some(_) => return Err("words is not an array".into()),
    };
    let confidence = v.get("segments").and_then(Value::as_array).and_then(|s| segments_confidence(s));
    Ok(Transcript {
        text: text.to_owned(),
        duration,
        language,
        confidence,
        words,
    })
}

fn segments_confidence(segments: &[Value]) -> Option<f64> {
    let scored: Vec<(f64, f64)> = segments
        .iter()
        .filter_map(|s| {
            let lp = s.get("avg_logprob").and_then(number)?;
            let len = match (s.get("start").and_then(number), s.get("end").and_then(number)) {
                (Some(a), Some(b)) => (b - a).max(0.0),
                _ => 0.0,
            };
            Some((lp, len))
        })
        .collect();
    if scored.is_empty() {
        return None;
    }
    let total: f64 = scored.iter().map(|(_, len)| len).sum();
    let mean = if total > 0.0 {
        scored.iter().map(|(lp, len)| lp * len).sum::<f64>() / total
    } else {
        scored.iter().map(|(lp, _)| lp).sum::<f64>() / scored.len() as f64
    };
    Some(mean.exp().clamp(0.0, 1.0))
}

/// Whisper's language names (and common aliases) → ISO-639-1. Cantonese
/// maps to `zh`, ISO-639-1 having no code of its own for it; Hawaiian
/// (no ISO-639-1 code) is left out.
const LANGUAGES: &[(&str, &str)] = &[
    ("afrikaans", "af"), ("albanian", "sq"), ("amharic", "am"), ("arabic", "ar"), ("armenian", "hy"),
    ("assamese", "as"), ("azerbaijani", "az"), ("bashkir", "ba"), ("basque", "eu"), ("belarusian", "be"),
    ("bengali", "bn"), ("bosnian", "bs"), ("breton", "br"), ("bulgarian", "bg"), ("burmese", "my"),
    ("cantonese", "zh"), ("castilian", "es"), ("catalan", "ca"), ("chinese", "zh"), ("croatian", "hr"),
    ("czech", "cs"), ("danish", "da"), ("dutch", "nl"), ("english", "en"), ("estonian", "et"),
    ("faroese", "fo"), ("finnish", "fi"), ("flemish", "nl"), ("french", "fr"), ("galician", "gl"),
    ("georgian", "ka"), ("german", "de"), ("greek", "el"), ("gujarati", "gu"), ("haitian", "ht"),
    ("haitian creole", "ht"), ("hausa", "ha"), ("hebrew", "he"), ("hindi", "hi"), ("hungarian", "hu"),
    ("icelandic", "is"), ("indonesian", "id"), ("italian", "it"), ("japanese", "ja"), ("javanese", "jv"),
    ("kannada", "kn"), ("kazakh", "kk"), ("khmer", "km"), ("korean", "ko"), ("lao", "lo"),
    ("latin", "la"), ("latvian", "lv"), ("letzeburgesch", "lb"), ("lingala", "ln"), ("lithuanian", "lt"),
    ("luxembourgish", "lb"), ("macedonian", "mk"), ("malagasy", "mg"), ("malay", "ms"), ("malayalam", "ml"),
    ("maltese", "mt"), ("mandarin", "zh"), ("maori", "mi"), ("marathi", "mr"), ("moldavian", "ro"),
    ("moldovan", "ro"), ("mongolian", "mn"), ("myanmar", "my"), ("nepali", "ne"), ("norwegian", "no"),
    ("nynorsk", "nn"), ("occitan", "oc"), ("panjabi", "pa"), ("pashto", "ps"), ("persian", "fa"),
    ("polish", "pl"), ("portuguese", "pt"), ("punjabi", "pa"), ("pushto", "ps"), ("romanian", "ro"),
    ("russian", "ru"), ("sanskrit", "sa"), ("serbian", "sr"), ("shona", "sn"), ("sindhi", "sd"),
    ("sinhala", "si"), ("sinhalese", "si"), ("slovak", "sk"), ("slovenian", "sl"), ("somali", "so"),
    ("spanish", "es"), ("sundanese", "su"), ("swahili", "sw"), ("swedish", "sv"), ("tagalog", "tl"),
    ("tajik", "tg"), ("tamil", "ta"), ("tatar", "tt"), ("telugu", "te"), ("thai", "th"),
    ("tibetan", "bo"), ("turkish", "tr"), ("turkmen", "tk"), ("ukrainian", "uk"), ("urdu", "ur"),
    ("uzbek", "uz"), ("valencian", "ca"), ("vietnamese", "vi"), ("welsh", "cy"), ("yiddish", "yi"),
    ("yoruba", "yo"),
];

/// The ISO-639-1 code of the language OpenAI reports: a code is kept
/// (`en`, `en-US` → `en`), a name is looked up (`English` → `en`).
pub fn language_code(reported: &str) -> Option<String> {
    if let Some(code) = iso639_1(reported) {
        return Some(code);
    }
    let name = reported.trim().to_ascii_lowercase();
    LANGUAGES.iter().find(|(n, _)| *n == name).map(|(_, code)| (*code).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::testing::{self, json_body, route, KEY};

    fn spec() -> GenerationSpec {
        GenerationSpec {
            prompt: "a lighthouse".into(),
            n: 2,
            ..GenerationSpec::default()
        }
    }

    /// The first 24 bytes of a PNG of `w`×`h`.
    fn png(w: u32, h: u32) -> Vec<u8> {
        let mut b = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        b.extend_from_slice(&w.to_be_bytes());
        b.extend_from_slice(&h.to_be_bytes());
        b.extend_from_slice(&[8, 6, 0, 0, 0]);
        b
    }

    #[test]
    fn images_request_picks_a_size_and_leaves_out_what_gpt_image_refuses() {
        let a = OpenAi::new(testing::upstream("https://api.example/v1").unwrap());
        let mut s = spec();
        s.aspect_ratio = Some("16:9".into());
        s.seed = Some(7);
        let (rb, size) = a.images_request(&s, &route("gpt-image-1")).unwrap();
        let req = rb.build().unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(req.url().as_str(), "https://api.example/v1/images/generations");
        assert_eq!(req.headers()["authorization"], format!("Bearer {KEY}").as_str());
        assert_eq!(json_body(&req), json!({"model": "gpt-image-1", "prompt": "a lighthouse", "n": 2, "size": "1536x1024"}));
        assert_eq!(size.as_deref(), Some("1536x1024"));

        s.size = Some("1024x1024".into());
        let (rb, _) = a.images_request(&s, &route("gpt-image-1")).unwrap();
        assert_eq!(json_body(&rb.build().unwrap())["size"], "1024x1024");

        let (rb, size) = a.images_request(&spec(), &route("gpt-image-1")).unwrap();
        assert!(json_body(&rb.build().unwrap()).get("size").is_none());
        assert_eq!(size, None);
    }

    #[test]
    fn aspect_ratio_table() {
        for (ar, want) in [
            ("1:1", Some("1024x1024")),
            ("5:4", Some("1024x1024")),
            ("4:5", Some("1024x1024")),
            ("4:3", Some("1536x1024")),
            ("3:2", Some("1536x1024")),
            ("16:9", Some("1536x1024")),
            ("21:9", Some("1536x1024")),
            ("3:4", Some("1024x1536")),
            ("2:3", Some("1024x1536")),
            ("9:16", Some("1024x1536")),
            ("wide", None),
            ("0:1", None),
        ] {
            assert_eq!(size_for_aspect(ar), want, "{ar}");
        }
    }

    #[test]
    fn images_refuse_what_the_endpoint_cannot_do_as_unsupported() {
        let a = OpenAi::new(testing::upstream("https://api.example/v1").unwrap());
        let mut video = spec();
        video.video = true;
        let mut neg = spec();
        neg.negative_prompt = Some("fog".into());
        let mut edit = spec();
        edit.image_urls = vec!["https://x/y.png".into()];
        for s in [video, neg, edit] {
            let e = a.images_request(&s, &route("gpt-image-1")).unwrap_err();
            assert_eq!(e.kind, UpstreamErrorKind::Unsupported, "{e}");
        }
    }

    #[test]
    fn images_response_b64_and_url() {
        let bytes = png(1536, 1024);
        let body = json!({"created": 1, "data": [{"b64_json": BASE64.encode(&bytes)}], "usage": {"total_tokens": 10}});
        let media = images_from_json(body.to_string().as_bytes(), Some("1024x1024")).unwrap();
        assert_eq!(media.len(), 1);
        assert_eq!(media[0].data, MediaData::Bytes(bytes.into()));
        assert_eq!(media[0].content_type, "image/png");
        // The PNG header wins over the size asked for.
        assert_eq!((media[0].width, media[0].height), (Some(1536), Some(1024)));
        assert!(!media[0].video);

        let jpeg = [0xFF, 0xD8, 0xFF, 0xE0, 0, 0x10];
        let body = json!({"created": 1, "size": "1024x1536", "output_format": "png", "data": [{"b64_json": BASE64.encode(jpeg)}]});
        let media = images_from_json(body.to_string().as_bytes(), None).unwrap();
        assert_eq!(media[0].content_type, "image/jpeg");
        assert_eq!((media[0].width, media[0].height), (Some(1024), Some(1536)));

        let body = json!({"created": 1, "output_format": "webp", "data": [{"b64_json": BASE64.encode(b"????")}]});
        assert_eq!(images_from_json(body.to_string().as_bytes(), None).unwrap()[0].content_type, "image/webp");

        let body = json!({"created": 1, "data": [{"url": "https://cdn.example/img-1.png?sig=abc", "revised_prompt": "x"}, {"url": "https://cdn.example/2"}]});
        let media = images_from_json(body.to_string().as_bytes(), Some("1024x1024")).unwrap();
        assert_eq!(media[0].data, MediaData::Url("https://cdn.example/img-1.png?sig=abc".into()));
        assert_eq!(media[1].content_type, "image/png");
        assert_eq!(media[1].width, Some(1024));
    }

    #[test]
    fn images_response_malformed() {
        for body in [
            r#"{"created":1,"data":[]}"#,
            r#"{"created":1}"#,
            r#"{"created":1,"data":[{"revised_prompt":"x"}]}"#,
            r#"{"created":1,"data":[{"b64_json":"not base64!"}]}"#,
            "<html>",
        ] {
            assert!(images_from_json(body.as_bytes(), None).is_err(), "{body}");
        }
    }

    #[test]
    fn speech_request_and_rates() {
        let a = OpenAi::new(testing::upstream("https://api.example/v1").unwrap());
        let spec = SpeechSpec {
            text: "hello".into(),
            voice: "alloy".into(),
            format: AudioFormat::Opus,
            sample_rate: 24_000,
            speed: 1.25,
        };
        let req = a.speech_request(&spec, &route("tts-1")).build().unwrap();
        assert_eq!(req.url().as_str(), "https://api.example/v1/audio/speech");
        assert_eq!(req.headers()["authorization"], format!("Bearer {KEY}").as_str());
        assert_eq!(
            json_body(&req),
            json!({"model": "tts-1", "input": "hello", "voice": "alloy", "response_format": "opus", "speed": 1.25})
        );
        for f in AudioFormat::ALL {
            assert!(a.supports(f, 24_000));
            assert!(!a.supports(f, 44_100));
        }
    }

    #[test]
    fn upload_names_get_an_extension_openai_recognises() {
        assert_eq!(upload_filename("talk.MP3", "audio/mpeg"), "talk.MP3");
        assert_eq!(upload_filename("recording", "audio/wav"), "recording.wav");
        assert_eq!(upload_filename("", "audio/webm; codecs=opus"), "audio.webm");
        assert_eq!(upload_filename("../x/clip.bin", "audio/x-m4a"), "clip.bin.m4a");
        assert_eq!(upload_filename("clip", "application/octet-stream"), "clip");
    }

    #[test]
    fn language_names_become_iso_codes() {
        for (name, code) in [
            ("english", "en"), ("English", "en"), ("chinese", "zh"), ("german", "de"), ("spanish", "es"),
            ("russian", "ru"), ("korean", "ko"), ("french", "fr"), ("japanese", "ja"), ("portuguese", "pt"),
            ("turkish", "tr"), ("polish", "pl"), ("catalan", "ca"), ("dutch", "nl"), ("arabic", "ar"),
            ("swedish", "sv"), ("italian", "it"), ("indonesian", "id"), ("hindi", "hi"), ("finnish", "fi"),
            ("vietnamese", "vi"), ("hebrew", "he"), ("ukrainian", "uk"), ("greek", "el"), ("malay", "ms"),
            ("czech", "cs"), ("romanian", "ro"), ("danish", "da"), ("hungarian", "hu"), ("tamil", "ta"),
            ("norwegian", "no"), ("thai", "th"), ("urdu", "ur"), ("persian", "fa"), ("haitian creole", "ht"),
            ("en", "en"), ("DE", "de"), ("pt-BR", "pt"),
        ] {
            assert_eq!(language_code(name).as_deref(), Some(code), "{name}");
        }
        assert_eq!(language_code("klingon"), None);
        assert_eq!(language_code("hawaiian"), None);
    }

    #[test]
    fn verbose_json_transcript() {
        let body = json!({
            "task": "transcribe", "language": "english", "duration": 2.5, "text": "Hello there.",
            "words": [{"word": "Hello", "start": 0.0, "end": 0.4}, {"word": "there", "start": 0.5, "end": 0.9}],
            "segments": [
                {"id": 0, "start": 0.0, "end": 1.0, "text": "Hello", "avg_logprob": -0.1},
                {"id": 1, "start": 1.0, "end": 4.0, "text": "there.", "avg_logprob": -0.5}
            ],
            "usage": {"type": "duration", "seconds": 3}
        });
        let t = transcript_from_json(body.to_string().as_bytes(), None).unwrap();
        assert_eq!(t.text, "Hello there.");
        assert_eq!(t.duration, Some(2.5));
        assert_eq!(t.language.as_deref(), Some("en"));
        let words = t.words.unwrap();
        assert_eq!(words[1], Word { word: "there".into(), start: 0.5, end: 0.9, confidence: None });
        // Weighted by length: (−0.1·1 − 0.5·3) / 4 = −0.4.
        assert!((t.confidence.unwrap() - (-0.4f64).exp()).abs() < 1e-9);

        // `json` answers: duration from usage, language from the hint.
        let body = json!({"text": "Hola", "usage": {"type": "duration", "seconds": 4}});
        let t = transcript_from_json(body.to_string().as_bytes(), Some("es")).unwrap();
        assert_eq!((t.duration, t.language.as_deref(), t.words, t.confidence), (Some(4.0), Some("es"), None, None));

        // An unknown language name falls back to the hint, or to nothing.
        let body = json!({"text": "x", "language": "klingon", "duration": "1.5"});
        let t = transcript_from_json(body.to_string().as_bytes(), None).unwrap();
        assert_eq!((t.language, t.duration), (None, Some(1.5)));

        assert!(transcript_from_json(br#"{"language":"english"}"#, None).is_err());
        assert!(transcript_from_json(br#"{"text":"a","words":[{"word":"a"}]}"#, None).is_err());
    }

    #[tokio::test]
    async fn transcription_is_multipart_with_word_timestamps() {
        use axum::{extract::Multipart, http::HeaderMap, routing::post, Json};
        async fn handler(headers: HeaderMap, mut form: Multipart) -> Json<Value> {
            assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
            assert!(headers.contains_key("traceparent"));
            let mut parts = serde_json::Map::new();
            while let Some(field) = form.next_field().await.unwrap() {
                let name = field.name().unwrap().to_owned();
                if name == "file" {
                    parts.insert("filename".into(), field.file_name().unwrap().into());
                    parts.insert("content_type".into(), field.content_type().unwrap().into());
                    parts.insert("len".into(), field.bytes().await.unwrap().len().into());
                } else {
                    parts.insert(name, field.text().await.unwrap().into());
                }
            }
            Json(json!({"text": "ok", "language": "german", "duration": 1.0, "words": [], "echo": parts}))
        }
        let base = testing::serve(axum::Router::new().route("/v1/audio/transcriptions", post(handler))).await.unwrap();
        let a = OpenAi::new(testing::upstream(&format!("{base}/v1")).unwrap());
        let audio = AudioUpload {
            bytes: bytes::Bytes::from_static(&[1, 2, 3, 4, 5]),
            filename: "memo.wav".into(),
            content_type: "audio/wav".into(),
            language: Some("de".into()),
        };
        // Echo the parts through the request to check them here.
        let resp = a.up.send(a.transcription_request(&audio, &route("whisper-1")), &route("whisper-1")).await.unwrap();
        let echo: Value = serde_json::from_slice(&a.up.body(resp).await.unwrap()).unwrap();
        assert_eq!(
            echo["echo"],
            json!({"filename": "memo.wav", "content_type": "audio/wav", "len": 5, "model": "whisper-1",
                   "response_format": "verbose_json", "timestamp_granularities[]": "word", "language": "de"})
        );
        let t = a.transcribe(&audio, &route("whisper-1")).await.unwrap();
        assert_eq!((t.text.as_str(), t.language.as_deref(), t.words), ("ok", Some("de"), Some(vec![])));
    }

    #[tokio::test]
    async fn speech_streams_before_the_body_is_complete() {
        use axum::{body::Body, routing::post};
        use tokio::sync::{mpsc, oneshot};
        let (first_seen_tx, first_seen_rx) = oneshot::channel::<()>();
        let first_seen_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(first_seen_rx)));
        let app = axum::Router::new().route(
            "/v1/audio/speech",
            post(move || {
                let gate = first_seen_rx.lock().unwrap().take().unwrap();
                async move {
                    let (tx, rx) = mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(1);
                    tokio::spawn(async move {
                        tx.send(Ok(bytes::Bytes::from_static(b"ID3-first"))).await.unwrap();
                        // The last chunk only after the client saw the first.
                        gate.await.unwrap();
                        tx.send(Ok(bytes::Bytes::from_static(b"-last"))).await.unwrap();
                    });
                    Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                }
            }),
        );
        let base = testing::serve(app).await.unwrap();
        let a = OpenAi::new(testing::upstream(&format!("{base}/v1")).unwrap());
        let spec = SpeechSpec { text: "hi".into(), voice: "alloy".into(), format: AudioFormat::Mp3, sample_rate: 24_000, speed: 1.0 };
        let wait = std::time::Duration::from_secs(5);
        let mut audio = tokio::time::timeout(wait, a.synthesize(&spec, &route("tts-1"))).await.unwrap().unwrap();
        let first = tokio::time::timeout(wait, audio.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&first[..], b"ID3-first");
        first_seen_tx.send(()).unwrap();
        let last = tokio::time::timeout(wait, audio.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(&last[..], b"-last");
        assert!(audio.next().await.is_none());
    }

    #[tokio::test]
    async fn chat_goes_over_the_wire_with_its_headers_and_a_scrubbed_error() {
        use axum::{http::HeaderMap, routing::post, Json};
        use futures_util::StreamExt;
        async fn handler(headers: HeaderMap, Json(body): Json<Value>) -> axum::response::Response {
            use axum::response::IntoResponse;
            assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
            assert_eq!(headers["content-type"], "application/json");
            assert!(headers.contains_key("traceparent"));
            assert_eq!(body["model"], "gpt-up");
            match body["messages"][0]["content"].as_str() {
                Some("fail") => (
                    http::StatusCode::TOO_MANY_REQUESTS,
                    [("retry-after", "7")],
                    Json(json!({"error": {"message": format!("slow down, {KEY}")}})),
                )
                    .into_response(),
                // Far larger than the connection's 4 KB read buffer.
                Some("big") => Json(json!({"id": "u", "created": 1, "choices": [{"index": 0, "message": {"role": "assistant", "content": "x".repeat(200_000)}, "finish_reason": "stop"}]}))
                    .into_response(),
                _ if body["stream"] == json!(true) => {
                    assert_eq!(headers["accept"], "text/event-stream");
                    let sse = "data: {\"id\":\"u\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"hi\"},\"finish_reason\":\"stop\"}]}\n\ndata: [DONE]\n\n";
                    ([("content-type", "text/event-stream")], sse).into_response()
                }
                _ => {
                    assert!(!headers.contains_key("accept"));
                    Json(json!({"id": "u", "created": 1, "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}))
                        .into_response()
                }
            }
        }
        let base = testing::serve(axum::Router::new().route("/v1/chat/completions", post(handler))).await.unwrap();
        let a = OpenAi::new(testing::upstream(&format!("{base}/v1")).unwrap());
        let ask = |text: &str| crate::proto::openai_json::parse_request(json!({"model": "m", "messages": [{"role": "user", "content": text}]}).to_string().as_bytes()).unwrap().request;

        let done = a.complete(&ask("hello"), &route("gpt-up")).await.unwrap();
        assert_eq!(done.choices[0].message.as_ref().and_then(|m| crate::proto::openai_json::message_text(m).next()), Some("hello"));
        let big = a.complete(&ask("big"), &route("gpt-up")).await.unwrap();
        assert_eq!(big.choices[0].message.as_ref().and_then(|m| crate::proto::openai_json::message_text(m).next()).map(str::len), Some(200_000));

        let mut chunks = a.stream(&ask("hello"), &route("gpt-up")).await.unwrap();
        let first = chunks.next().await.unwrap().unwrap();
        assert_eq!(first.choices[0].delta.as_ref().and_then(|d| d.content.as_deref()), Some("hi"));
        assert!(chunks.next().await.is_none(), "[DONE] ends the stream");

        let e = a.complete(&ask("fail"), &route("gpt-up")).await.unwrap_err();
        let shown = format!("{e:?} {e}");
        assert!(!shown.contains(KEY), "the key never reaches an error: {shown}");
        assert!(shown.contains("slow down"), "{shown}");
        assert_eq!(e.kind, UpstreamErrorKind::RateLimited { retry_after: Some(std::time::Duration::from_secs(7)) });
    }
}
