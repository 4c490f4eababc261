//! The `replicate` kind: Replicate's predictions API, for images and video.
//! `base_url` is the bare host; requests carry `Authorization: Bearer`.
//!
//! A generation is `POST {base_url}/v1/predictions` with `{"version":
//! <upstream_model>, "input": {...}}` (see [`create_body`] for the inputs),
//! answered `201 {"id", "status", ...}`; then `GET
//! {base_url}/v1/predictions/{id}` is polled — after 250 ms, doubling up to
//! every 2 s, each call bounded by the provider's `timeout` — until the
//! status is `succeeded`, `failed`, `canceled` (or `aborted`). The poll URL
//! is built from `base_url` and the id (checked to be URL-safe), never taken
//! from the provider's `urls`, so our key only goes where it is configured
//! to.
//!
//! `succeeded` turns `output` (a URL or an array of URLs) into media passed
//! through by URL (`data:` URLs are decoded to bytes); `failed` and
//! `canceled` are retryable server errors carrying Replicate's `error`
//! text. A 422 on create (input refused) is a client fault, as
//! [`Upstream::send`] classifies it; errors while polling are never the
//! client's fault. If the attempt is abandoned before the prediction ended
//! (the router cancelled it, a poll failed), the prediction is cancelled
//! with a best-effort `POST {base_url}/v1/predictions/{id}/cancel` so it
//! stops costing money.

use std::time::Duration;

use base64::{engine::general_purpose::STANDARD as BASE64, Engine as _};
use serde_json::{json, Map, Value};

use super::{media_type_for_url, parse_size, GenerateAdapter, GeneratedMedia, GenerationSpec, MediaData, RouteCall, Upstream};
use crate::{
    config::Secret,
    error::{UpstreamError, UpstreamErrorKind},
};

/// The pause before the first poll, doubled after each poll up to `max`.
#[derive(Debug, Clone, Copy)]
struct Backoff {
    first: Duration,
    max: Duration,
}

const BACKOFF: Backoff = Backoff {
    first: Duration::from_millis(250),
    max: Duration::from_secs(2),
};

pub struct Replicate {
    up: Upstream,
    backoff: Backoff,
}

impl Replicate {
    pub fn new(up: Upstream) -> Self {
        Replicate { up, backoff: BACKOFF }
    }

    fn authed(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        bearer(rb, &self.up.api_key)
    }

    fn prediction_url(&self, id: &str) -> String {
        format!("{}/v1/predictions/{id}", self.up.base_url)
    }

    fn create_request(&self, spec: &GenerationSpec, route: &RouteCall<'_>) -> reqwest::RequestBuilder {
        let rb = self
            .up
            .http
            .post(format!("{}/v1/predictions", self.up.base_url))
            .header(http::header::CONTENT_TYPE, "application/json")
            .timeout(self.up.timeout)
            .body(create_body(spec, route.upstream_model).to_string());
        self.authed(rb)
    }

    fn poll_request(&self, id: &str) -> reqwest::RequestBuilder {
        self.authed(self.up.http.get(self.prediction_url(id)).timeout(self.up.timeout))
    }

    async fn json(&self, resp: reqwest::Response, what: &str) -> Result<Value, UpstreamError> {
        let body = self.up.body(resp).await?;
        serde_json::from_slice(&body).map_err(|e| self.up.err(UpstreamErrorKind::Malformed, format!("unparseable {what}: {e}")))
    }

    async fn poll(&self, id: &str, route: &RouteCall<'_>) -> Result<Value, UpstreamError> {
        let resp = self.up.send(self.poll_request(id), route).await.map_err(|mut e| {
            // The input was accepted at create: whatever a poll is refused
            // for (the prediction vanished, ...) is not the client's fault.
            if let UpstreamErrorKind::ClientFault { status } = e.kind {
                e.kind = UpstreamErrorKind::Server { status };
            }
            e
        })?;
        self.json(resp, "prediction").await
    }
}

#[async_trait::async_trait]
impl GenerateAdapter for Replicate {
    async fn generate(&self, spec: &GenerationSpec, route: &RouteCall<'_>) -> Result<Vec<GeneratedMedia>, UpstreamError> {
        let resp = self.up.send(self.create_request(spec, route), route).await?;
        let mut prediction = self.json(resp, "prediction").await?;
        let id = prediction_id(&prediction).map_err(|d| self.up.err(UpstreamErrorKind::Malformed, d))?.to_owned();
        // From here on, leaving before the prediction ended cancels it.
        let mut guard = CancelGuard {
            armed: true,
            http: self.up.http.clone(),
            url: format!("{}/cancel", self.prediction_url(&id)),
            key: self.up.api_key.clone(),
            traceparent: route.traceparent.map(str::to_owned),
            timeout: self.up.timeout,
        };
        let mut wait = self.backoff.first;
        loop {
            match state(&prediction) {
                Ok(State::Running) => {}
                Ok(State::Succeeded(output)) => {
                    guard.armed = false;
                    return media(spec, output).map_err(|d| self.up.err(UpstreamErrorKind::Malformed, d));
                }
                Ok(State::Failed { status, error }) => {
                    guard.armed = false;
                    let error = self.up.scrub(crate::error::truncate(&error, 300));
                    let detail = if error.is_empty() { format!("prediction {status}") } else { format!("prediction {status}: {error}") };
                    return Err(self.up.err(UpstreamErrorKind::Server { status: 200 }, detail));
                }
                Err(d) => return Err(self.up.err(UpstreamErrorKind::Malformed, d)),
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(self.backoff.max);
            prediction = self.poll(&id, route).await?;
        }
    }
}

fn bearer(rb: reqwest::RequestBuilder, key: &Secret) -> reqwest::RequestBuilder {
    if key.is_empty() {
        rb
    } else {
        rb.bearer_auth(key.expose())
    }
}

/// The create body. `input` holds what the spec sets, under the names most
/// Replicate models use: `prompt`; `num_outputs` (images); `aspect_ratio`;
/// `width` and `height` (from `size`); `seed`; `negative_prompt`;
/// `image_input` (the input image URLs, as an array, as e.g.
/// google/nano-banana names them); `duration` (whole seconds as an integer)
/// and `resolution` (video). Models ignore inputs they do not declare.
pub fn create_body(spec: &GenerationSpec, model: &str) -> Value {
    let mut input = Map::new();
    input.insert("prompt".into(), spec.prompt.clone().into());
    if !spec.video {
        input.insert("num_outputs".into(), spec.n.into());
    }
    if let Some(ar) = &spec.aspect_ratio {
        input.insert("aspect_ratio".into(), ar.clone().into());
    }
    if let Some((w, h)) = spec.size.as_deref().and_then(parse_size) {
        input.insert("width".into(), w.into());
        input.insert("height".into(), h.into());
    }
    if let Some(seed) = spec.seed {
        input.insert("seed".into(), seed.into());
    }
    if let Some(np) = spec.negative_prompt.as_deref().filter(|p| !p.is_empty()) {
        input.insert("negative_prompt".into(), np.into());
    }
    if !spec.image_urls.is_empty() {
        input.insert("image_input".into(), spec.image_urls.clone().into());
    }
    if spec.video {
        if let Some(d) = spec.duration.filter(|d| d.is_finite() && *d > 0.0) {
            // Most video models declare `duration` as an integer.
            let d = if d.fract() == 0.0 && d <= u32::MAX as f64 { Value::from(d as u32) } else { Value::from(d) };
            input.insert("duration".into(), d);
        }
        if let Some(r) = &spec.resolution {
            input.insert("resolution".into(), r.clone().into());
        }
    }
    json!({"version": model, "input": input})
}

/// The prediction's id, if it is safe to put in a URL path.
fn prediction_id(v: &Value) -> Result<&str, String> {
    let id = v.get("id").and_then(Value::as_str).ok_or("prediction without id")?;
    let safe = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if safe {
        Ok(id)
    } else {
        Err("prediction id is not URL-safe".into())
    }
}

#[derive(Debug, PartialEq)]
enum State<'a> {
    Running,
    Succeeded(&'a Value),
    Failed { status: &'a str, error: String },
}

fn state(v: &Value) -> Result<State<'_>, String> {
    let status = v.get("status").and_then(Value::as_str).ok_or("prediction without status")?;
    Ok(match status {
        "succeeded" => State::Succeeded(v.get("output").unwrap_or(&Value::Null)),
        "failed" | "canceled" | "aborted" => State::Failed {
            status,
            error: match v.get("error") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(other) => other.to_string(),
            },
        },
        // starting, processing, and whatever non-final status comes next.
        _ => State::Running,
    })
}

/// The media of a succeeded prediction's `output`: a URL, or an array of
/// URLs; at most `n` (one for a video).
fn media(spec: &GenerationSpec, output: &Value) -> Result<Vec<GeneratedMedia>, String> {
    let urls: Vec<&str> = match output {
        Value::String(s) => vec![s.as_str()],
        Value::Array(items) => items
            .iter()
            .map(|i| i.as_str().ok_or_else(|| "an output that is not a URL".to_owned()))
            .collect::<Result<_, _>>()?,
        Value::Null => return Err("succeeded prediction without output".into()),
        _ => return Err("output is neither a URL nor an array of URLs".into()),
    };
    if urls.is_empty() {
        return Err("succeeded prediction with an empty output".into());
    }
    let (width, height) = spec.size.as_deref().and_then(parse_size).unzip();
    let wanted = if spec.video { 1 } else { spec.n.max(1) as usize };
    urls.into_iter()
        .take(wanted)
        .map(|url| {
            let default_type = if spec.video { "video/mp4" } else { "image/png" };
            let (data, content_type) = if let Some(rest) = url.strip_prefix("data:") {
                let (meta, payload) = rest.split_once(',').ok_or("a data: URL without data")?;
                let meta_type = meta.split(';').next().filter(|t| t.contains('/'));
                let bytes = if meta.ends_with(";base64") {
                    BASE64.decode(payload.trim()).map_err(|e| format!("undecodable data: URL: {e}"))?
                } else {
                    return Err("a data: URL that is not base64".into());
                };
                let ct = meta_type.map_or(default_type.to_owned(), str::to_owned);
                (MediaData::Bytes(bytes.into()), ct)
            } else if url.starts_with("https://") || url.starts_with("http://") {
                (MediaData::Url(url.to_owned()), media_type_for_url(url).unwrap_or(default_type).to_owned())
            } else {
                return Err("an output that is not an http(s) URL".into());
            };
            Ok(GeneratedMedia {
                data,
                video: spec.video,
                content_type,
                width,
                height,
                duration: if spec.video { spec.duration } else { None },
            })
        })
        .collect()
}

/// Cancels a prediction still running when the attempt is left (dropped by
/// the router, or failed while polling). Best effort: only where a tokio
/// runtime can run the request, and its outcome is ignored.
struct CancelGuard {
    armed: bool,
    http: reqwest::Client,
    url: String,
    key: Secret,
    traceparent: Option<String>,
    timeout: Duration,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rb = bearer(self.http.post(&self.url), &self.key).timeout(self.timeout);
        if let Some(tp) = &self.traceparent {
            rb = rb.header("traceparent", tp);
        }
        runtime.spawn(async move {
            if let Err(e) = rb.send().await {
                tracing::debug!(timeout = e.is_timeout(), connect = e.is_connect(), "cancelling an abandoned prediction failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    };

    use axum::{
        extract::{Path, State as AxState},
        http::{HeaderMap, StatusCode},
        routing::{get, post},
        Json,
    };

    use super::*;
    use crate::providers::testing::{self, json_body, route, KEY};

    fn spec() -> GenerationSpec {
        GenerationSpec {
            prompt: "a fox".into(),
            n: 1,
            ..GenerationSpec::default()
        }
    }

    fn fast(up: Upstream) -> Replicate {
        Replicate {
            up,
            backoff: Backoff {
                first: Duration::from_millis(5),
                max: Duration::from_millis(10),
            },
        }
    }

    #[test]
    fn create_body_for_images_and_video() {
        let mut s = spec();
        s.n = 3;
        s.aspect_ratio = Some("3:2".into());
        s.size = Some("1216x832".into());
        s.seed = Some(42);
        s.negative_prompt = Some("blur".into());
        s.image_urls = vec!["https://img.example/a.png".into()];
        assert_eq!(
            create_body(&s, "black-forest-labs/flux-dev"),
            json!({"version": "black-forest-labs/flux-dev", "input": {
                "prompt": "a fox", "num_outputs": 3, "aspect_ratio": "3:2", "width": 1216, "height": 832,
                "seed": 42, "negative_prompt": "blur", "image_input": ["https://img.example/a.png"]
            }})
        );

        let mut v = spec();
        v.video = true;
        v.duration = Some(5.0);
        v.resolution = Some("720p".into());
        v.aspect_ratio = Some("16:9".into());
        assert_eq!(
            create_body(&v, "abc123"),
            json!({"version": "abc123", "input": {"prompt": "a fox", "aspect_ratio": "16:9", "duration": 5, "resolution": "720p"}})
        );
        v.duration = Some(2.5);
        assert_eq!(create_body(&v, "abc123")["input"]["duration"], 2.5);
    }

    #[test]
    fn requests_are_addressed_and_authenticated() {
        let r = Replicate::new(testing::upstream("https://api.replicate.example/").unwrap());
        assert_eq!((r.backoff.first, r.backoff.max), (Duration::from_millis(250), Duration::from_secs(2)));
        let req = r.create_request(&spec(), &route("owner/model")).build().unwrap();
        assert_eq!(req.method(), "POST");
        assert_eq!(req.url().as_str(), "https://api.replicate.example/v1/predictions");
        assert_eq!(req.headers()["authorization"], format!("Bearer {KEY}").as_str());
        assert_eq!(req.timeout(), Some(&Duration::from_secs(5)));
        assert_eq!(json_body(&req)["version"], "owner/model");
        let req = r.poll_request("gm3qorzdhgbfurvjtvhg6dckhu").build().unwrap();
        assert_eq!(req.method(), "GET");
        assert_eq!(req.url().as_str(), "https://api.replicate.example/v1/predictions/gm3qorzdhgbfurvjtvhg6dckhu");
        assert_eq!(req.timeout(), Some(&Duration::from_secs(5)));
    }

    #[test]
    fn ids_must_be_url_safe() {
        assert_eq!(prediction_id(&json!({"id": "rrr4z55ocneqzikepnug6xezpe"})), Ok("rrr4z55ocneqzikepnug6xezpe"));
        for bad in [json!({"id": "../../account"}), json!({"id": "a/b"}), json!({"id": "a?b"}), json!({"id": ""}), json!({"id": 7}), json!({})] {
            assert!(prediction_id(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn states() {
        assert_eq!(state(&json!({"status": "starting"})), Ok(State::Running));
        assert_eq!(state(&json!({"status": "processing", "logs": "50%"})), Ok(State::Running));
        let out = json!("https://x/y.png");
        assert_eq!(state(&json!({"status": "succeeded", "output": out})), Ok(State::Succeeded(&out)));
        assert_eq!(
            state(&json!({"status": "failed", "error": "CUDA out of memory"})),
            Ok(State::Failed { status: "failed", error: "CUDA out of memory".into() })
        );
        assert_eq!(state(&json!({"status": "canceled", "error": null})), Ok(State::Failed { status: "canceled", error: String::new() }));
        assert!(state(&json!({"id": "x"})).is_err());
    }

    #[test]
    fn output_string_or_array() {
        let mut s = spec();
        s.size = Some("1024x768".into());
        let one = media(&s, &json!("https://replicate.delivery/a/out-0.webp")).unwrap();
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].data, MediaData::Url("https://replicate.delivery/a/out-0.webp".into()));
        assert_eq!((one[0].content_type.as_str(), one[0].width, one[0].height), ("image/webp", Some(1024), Some(768)));

        s.n = 2;
        let many = media(&s, &json!(["https://r.example/0.jpg", "https://r.example/1", "https://r.example/2.png"])).unwrap();
        assert_eq!(many.len(), 2);
        assert_eq!(many[0].content_type, "image/jpeg");
        assert_eq!(many[1].content_type, "image/png");

        let mut v = spec();
        v.video = true;
        v.duration = Some(5.0);
        let vid = media(&v, &json!(["https://r.example/clip", "https://r.example/poster.jpg"])).unwrap();
        assert_eq!(vid.len(), 1);
        assert_eq!((vid[0].video, vid[0].content_type.as_str(), vid[0].duration), (true, "video/mp4", Some(5.0)));
        assert_eq!(media(&v, &json!("https://r.example/c.webm")).unwrap()[0].content_type, "video/webm");

        let inline = media(&spec(), &json!("data:image/jpeg;base64,/9j/4A==")).unwrap();
        assert_eq!(inline[0].data, MediaData::Bytes(bytes::Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xE0])));
        assert_eq!(inline[0].content_type, "image/jpeg");

        for bad in [json!(null), json!([]), json!([1]), json!({"image": "https://x"}), json!("file:///etc/passwd"), json!("data:image/png,raw")] {
            assert!(media(&spec(), &bad).is_err(), "{bad}");
        }
    }

    #[derive(Default)]
    struct Sim {
        polls: AtomicUsize,
        cancels: AtomicUsize,
        /// Polls answered `processing` before `succeeded` (`usize::MAX`: never).
        processing: usize,
        seen: Mutex<Vec<String>>,
    }

    fn sim_app(sim: Arc<Sim>) -> axum::Router {
        async fn create(AxState(sim): AxState<Arc<Sim>>, headers: HeaderMap, Json(body): Json<Value>) -> (StatusCode, Json<Value>) {
            assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
            assert!(headers["traceparent"].to_str().unwrap().starts_with("00-"));
            sim.seen.lock().unwrap().push(format!("create {}", body["version"].as_str().unwrap()));
            if body["input"]["prompt"] == "refuse" {
                return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({"title": "Input validation failed", "detail": "- input.prompt: bad", "status": 422})));
            }
            (StatusCode::CREATED, Json(json!({"id": "pred1", "status": "starting", "urls": {"get": "https://evil.example/steal"}})))
        }
        async fn poll(AxState(sim): AxState<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Json<Value> {
            assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
            let n = sim.polls.fetch_add(1, Ordering::SeqCst);
            sim.seen.lock().unwrap().push(format!("poll {id}"));
            if n < sim.processing {
                Json(json!({"id": id, "status": "processing", "output": null}))
            } else {
                Json(json!({"id": id, "status": "succeeded", "output": ["https://replicate.delivery/p/out-0.png"]}))
            }
        }
        async fn cancel(AxState(sim): AxState<Arc<Sim>>, headers: HeaderMap, Path(id): Path<String>) -> Json<Value> {
            assert_eq!(headers["authorization"], format!("Bearer {KEY}").as_str());
            sim.seen.lock().unwrap().push(format!("cancel {id}"));
            sim.cancels.fetch_add(1, Ordering::SeqCst);
            Json(json!({"id": id, "status": "canceled"}))
        }
        axum::Router::new()
            .route("/v1/predictions", post(create))
            .route("/v1/predictions/{id}", get(poll))
            .route("/v1/predictions/{id}/cancel", post(cancel))
            .with_state(sim)
    }

    #[tokio::test]
    async fn creates_then_polls_until_succeeded() {
        let sim = Arc::new(Sim { processing: 2, ..Sim::default() });
        let base = testing::serve(sim_app(sim.clone())).await.unwrap();
        let r = fast(testing::upstream(&base).unwrap());
        let out = r.generate(&spec(), &route("owner/model")).await.unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].data, MediaData::Url("https://replicate.delivery/p/out-0.png".into()));
        assert_eq!(*sim.seen.lock().unwrap(), ["create owner/model", "poll pred1", "poll pred1", "poll pred1"]);
        // Finished: nothing to cancel.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(sim.cancels.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn a_refused_input_is_a_client_fault() {
        let sim = Arc::new(Sim::default());
        let base = testing::serve(sim_app(sim.clone())).await.unwrap();
        let r = fast(testing::upstream(&base).unwrap());
        let mut s = spec();
        s.prompt = "refuse".into();
        let e = r.generate(&s, &route("owner/model")).await.unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::ClientFault { status: 422 });
        assert!(e.detail.contains("input.prompt: bad"), "{e}");
    }

    #[tokio::test]
    async fn an_abandoned_prediction_is_cancelled() {
        let sim = Arc::new(Sim { processing: usize::MAX, ..Sim::default() });
        let base = testing::serve(sim_app(sim.clone())).await.unwrap();
        let r = fast(testing::upstream(&base).unwrap());
        let spec = spec();
        let route = route("owner/model");
        // The router's deadline drops the generate future mid-poll.
        let cut = tokio::time::timeout(Duration::from_millis(100), r.generate(&spec, &route)).await;
        assert!(cut.is_err());
        for _ in 0..200 {
            if sim.cancels.load(Ordering::SeqCst) > 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(sim.cancels.load(Ordering::SeqCst), 1);
        assert!(sim.polls.load(Ordering::SeqCst) >= 1);
        assert_eq!(sim.seen.lock().unwrap().last().map(String::as_str), Some("cancel pred1"));
    }

    #[tokio::test]
    async fn a_failed_prediction_is_retryable_and_scrubbed() {
        let app = axum::Router::new()
            .route("/v1/predictions", post(|| async { (StatusCode::CREATED, Json(json!({"id": "p2", "status": "starting"}))) }))
            .route(
                "/v1/predictions/{id}",
                get(|| async { Json(json!({"id": "p2", "status": "failed", "error": format!("token {KEY} has no GPU quota")})) }),
            );
        let base = testing::serve(app).await.unwrap();
        let r = fast(testing::upstream(&base).unwrap());
        let e = r.generate(&spec(), &route("owner/model")).await.unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::Server { status: 200 });
        assert!(e.is_retryable());
        assert!(e.detail.contains("has no GPU quota"), "{e}");
        assert!(!e.to_string().contains(KEY));
    }

    #[tokio::test]
    async fn a_vanished_prediction_is_not_the_clients_fault() {
        let app = axum::Router::new()
            .route("/v1/predictions", post(|| async { (StatusCode::CREATED, Json(json!({"id": "p3", "status": "processing"}))) }))
            .route("/v1/predictions/{id}", get(|| async { (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))) }));
        let base = testing::serve(app).await.unwrap();
        let e = fast(testing::upstream(&base).unwrap()).generate(&spec(), &route("m")).await.unwrap_err();
        assert_eq!(e.kind, UpstreamErrorKind::Server { status: 404 });
    }
}
