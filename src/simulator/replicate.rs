//! Replicate predictions: `POST /v1/predictions` (or
//! `POST /v1/models/{owner}/{name}/predictions`) starts one, `GET
//! /v1/predictions/{id}` polls it and `POST /v1/predictions/{id}/cancel`
//! cancels it.
//!
//! A prediction is `starting` when created, `processing` until `predict_ms`
//! (default 200) has passed, then `succeeded` (or `failed` with
//! `predict_fail`). A model makes a video, one MP4 URL as `output`, when
//! its version (or `owner/name`) contains `video` or its input has
//! `duration`; otherwise it makes `num_outputs` (default 1) PNGs of
//! `width` x `height` (or `aspect_ratio`, longest side 1024), a list of URLs.
//! `Prefer: wait[=N]` holds the creation up to N seconds (default 60) for
//! the answer, as Replicate's sync mode does.
//!
//! `version` may be `owner/name:version-id`, `owner/name` (answered with a
//! version id derived from the name) or a bare version id (answered with
//! model `sim/model`).

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use axum::{
    extract::{Path, Request, State},
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::{json, Value};

use super::{
    media::{color, hash64, image_token, rfc3339, video_token},
    origin, path_and_query, preflight_as, prefix_of, raw_prefix, read_body, splitmix64, sync_response, SimState, MAX_MEDIA_BODY,
};

/// How many predictions are kept (oldest dropped first).
const MAX_PREDICTIONS: usize = 1000;

/// The longest `Prefer: wait` honoured, as Replicate's.
const MAX_WAIT: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(super) struct Predictions {
    map: HashMap<String, Prediction>,
    order: VecDeque<String>,
    made: u64,
}

impl Predictions {
    fn insert(&mut self, p: Prediction) {
        if self.order.len() >= MAX_PREDICTIONS {
            if let Some(old) = self.order.pop_front() {
                self.map.remove(&old);
            }
        }
        self.order.push_back(p.id.clone());
        self.map.insert(p.id.clone(), p);
    }
}

#[derive(Clone)]
enum Output {
    Images { n: u32, width: u32, height: u32 },
    Video,
}

#[derive(Clone)]
struct Prediction {
    id: String,
    model: String,
    version: String,
    input: Value,
    created: SystemTime,
    started: Instant,
    run: Duration,
    fail: bool,
    canceled: Option<SystemTime>,
    output: Output,
    /// What the outputs are drawn from.
    h: u64,
}

impl Prediction {
    fn done(&self) -> bool {
        self.started.elapsed() >= self.run
    }

    /// The prediction as the API shows it. `base` is the origin and prefix
    /// the request came in under, `origin` the simulator's own.
    fn view(&self, base: &str, origin: &str, fresh: bool) -> Value {
        let mut v = json!({
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "input": self.input,
            "logs": "",
            "output": null,
            "data_removed": false,
            "error": null,
            "status": "starting",
            "created_at": rfc3339(self.created),
            "urls": {
                "get": format!("{base}/v1/predictions/{}", self.id),
                "cancel": format!("{base}/v1/predictions/{}/cancel", self.id),
            },
        });
        if let Some(at) = self.canceled {
            v["status"] = "canceled".into();
            v["started_at"] = rfc3339(self.created).into();
            v["completed_at"] = rfc3339(at).into();
            return v;
        }
        if fresh && !self.done() {
            return v;
        }
        v["started_at"] = rfc3339(self.created).into();
        if !self.done() {
            v["status"] = "processing".into();
            return v;
        }
        v["completed_at"] = rfc3339(self.created + self.run).into();
        v["metrics"] = json!({"predict_time": self.run.as_secs_f64()});
        if self.fail {
            v["status"] = "failed".into();
            v["error"] = "simulated model failure".into();
            return v;
        }
        v["status"] = "succeeded".into();
        v["output"] = match self.output {
            Output::Video => format!("{origin}/_sim/media/{}", video_token(self.h)).into(),
            Output::Images { n, width, height } => (0..u64::from(n))
                .map(|i| Value::from(format!("{origin}/_sim/media/{}", image_token(width, height, color(self.h ^ splitmix64(i))))))
                .collect(),
        };
        v
    }
}

pub(super) fn error_body(status: u16) -> Value {
    let title = match status {
        401 => "Unauthenticated",
        402 => "Payment required",
        404 => "Not found",
        422 => "Input validation failed",
        429 => "Request was throttled",
        400..=499 => "Bad request",
        _ => "Internal server error",
    };
    json!({"title": title, "detail": format!("simulated failure (status {status})"), "status": status})
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    (status, Json(json!({"title": title, "detail": detail, "status": status.as_u16()}))).into_response()
}

fn invalid(detail: &str) -> Response {
    problem(StatusCode::UNPROCESSABLE_ENTITY, "Input validation failed", detail)
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(json!({"detail": "Not found."}))).into_response()
}

fn lost() -> Response {
    problem(StatusCode::INTERNAL_SERVER_ERROR, "Internal server error", "prediction store unavailable")
}

/// A Replicate-style id: 26 lowercase base32 characters.
fn prediction_id(h: u64) -> String {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
    let bits = (u128::from(splitmix64(h)) << 64) | u128::from(splitmix64(h ^ 0xA5A5));
    (0..26).map(|i| char::from(ALPHABET[((bits >> (i * 5)) & 31) as usize])).collect()
}

/// `(model, version)` from the request's `version`.
fn model_and_version(version: &str) -> (String, String) {
    match version.split_once(':') {
        Some((model, id)) => (model.to_owned(), id.to_owned()),
        None if version.contains('/') => {
            let h = |i| splitmix64(hash64(i, version.as_bytes()));
            (version.to_owned(), format!("{:016x}{:016x}{:016x}{:016x}", h(0), h(1), h(2), h(3)))
        }
        None => ("sim/model".to_owned(), version.to_owned()),
    }
}

/// The size of each image: `width` / `height`, else `aspect_ratio` with
/// the longest side 1024 (in multiples of 16), else 1024 x 1024.
fn image_size(input: &Value) -> (u32, u32) {
    let side = |k: &str| input.get(k).and_then(Value::as_u64).and_then(|v| u32::try_from(v).ok()).filter(|v| (1..=super::media::MAX_SIDE).contains(v));
    if let (Some(w), Some(h)) = (side("width"), side("height")) {
        return (w, h);
    }
    let ratio = input.get("aspect_ratio").and_then(Value::as_str).and_then(|r| {
        let (a, b) = r.split_once(':')?;
        let (a, b): (f64, f64) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
        (a > 0.0 && b > 0.0).then_some((a, b))
    });
    match ratio {
        Some((a, b)) if a >= b => (1024, ((1024.0 * b / a / 16.0).round() as u32).max(1) * 16),
        Some((a, b)) => (((1024.0 * a / b / 16.0).round() as u32).max(1) * 16, 1024),
        None => (1024, 1024),
    }
}

/// The wait a `Prefer: wait` or `Prefer: wait=N` header asks for.
fn prefer_wait(headers: &http::HeaderMap) -> Option<Duration> {
    let prefer = headers.get("prefer")?.to_str().ok()?.trim();
    if prefer == "wait" {
        return Some(MAX_WAIT);
    }
    let secs: u64 = prefer.strip_prefix("wait=")?.trim().parse().ok()?;
    Some(Duration::from_secs(secs).min(MAX_WAIT))
}

pub(super) async fn create(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    create_at(state, params, req).await.unwrap_or_else(|r| r)
}

async fn create_at(state: Arc<SimState>, params: HashMap<String, String>, req: Request) -> Result<Response, Response> {
    let prefix = prefix_of(&params);
    let path = path_and_query(req.uri());
    let origin = origin(&state, req.uri(), req.headers());
    let base = format!("{origin}{}", raw_prefix(req.uri(), &prefix));
    let (parts, bytes) = read_body(req, MAX_MEDIA_BODY).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| problem(StatusCode::BAD_REQUEST, "Invalid JSON", &e.to_string()))?;
    let faults = preflight_as(&state, prefix, &path, &parts.headers, &body, false, error_body).await?;
    let (model, version, named) = match (params.get("owner"), params.get("model")) {
        (Some(owner), Some(name)) => {
            let model = format!("{owner}/{name}");
            let (_, version) = model_and_version(&model);
            (model.clone(), version, model)
        }
        _ => {
            let named = body.get("version").and_then(Value::as_str).filter(|v| !v.is_empty()).ok_or_else(|| invalid("- version: version is required"))?;
            let (model, version) = model_and_version(named);
            (model, version, named.to_owned())
        }
    };
    let input = body.get("input").filter(|i| i.is_object()).ok_or_else(|| invalid("- input: input is required"))?;
    if input.get("prompt").and_then(Value::as_str).is_none_or(str::is_empty) {
        return Err(invalid("- input: prompt is required"));
    }
    let output = if named.to_ascii_lowercase().contains("video") || input.get("duration").is_some() {
        Output::Video
    } else {
        let n = input.get("num_outputs").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10) as u32;
        let (width, height) = image_size(input);
        Output::Images { n, width, height }
    };
    let p = {
        let mut store = state.predictions.lock().map_err(|_| lost())?;
        store.made += 1;
        let h = hash64(state.seed ^ store.made, input.to_string().as_bytes());
        let p = Prediction {
            id: prediction_id(h),
            model,
            version,
            input: input.clone(),
            created: SystemTime::now(),
            started: Instant::now(),
            run: Duration::from_millis(faults.predict_ms.unwrap_or(200)),
            fail: faults.predict_fail == Some(true),
            canceled: None,
            output,
            h,
        };
        store.insert(p.clone());
        p
    };
    let mut fresh = true;
    if let Some(wait) = prefer_wait(&parts.headers) {
        tokio::time::sleep(wait.min(p.run)).await;
        fresh = false;
    }
    // Read it back: it may have been cancelled meanwhile.
    let p = state.predictions.lock().map_err(|_| lost())?.map.get(&p.id).cloned().unwrap_or(p);
    let mut r = sync_response(p.view(&base, &origin, fresh), &faults);
    *r.status_mut() = StatusCode::CREATED;
    Ok(r)
}

pub(super) async fn get(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    poll_at(state, params, req, false).await.unwrap_or_else(|r| r)
}

pub(super) async fn cancel(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    poll_at(state, params, req, true).await.unwrap_or_else(|r| r)
}

/// `GET /v1/predictions/{id}`, or with `cancel`, `POST .../cancel`.
async fn poll_at(state: Arc<SimState>, params: HashMap<String, String>, req: Request, cancel: bool) -> Result<Response, Response> {
    let prefix = prefix_of(&params);
    let path = path_and_query(req.uri());
    let origin = origin(&state, req.uri(), req.headers());
    let base = format!("{origin}{}", raw_prefix(req.uri(), &prefix));
    let faults = preflight_as(&state, prefix, &path, req.headers(), &Value::Null, false, error_body).await?;
    let id = params.get("id").map(String::as_str).unwrap_or_default();
    let p = {
        let mut store = state.predictions.lock().map_err(|_| lost())?;
        let p = store.map.get_mut(id).ok_or_else(not_found)?;
        // A finished prediction stays as it ended.
        if cancel && p.canceled.is_none() && !p.done() {
            p.canceled = Some(SystemTime::now());
        }
        p.clone()
    };
    Ok(sync_response(p.view(&base, &origin, false), &faults))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{json, Value};

    use crate::simulator::test_sim;

    async fn poll_until_done(http: &reqwest::Client, url: &str) -> Value {
        for _ in 0..100 {
            let v: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            if v["status"] != "starting" && v["status"] != "processing" {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("prediction never finished");
    }

    #[tokio::test]
    async fn image_predictions_run_then_succeed() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/p/rep/v1/predictions", sim.url()))
            .bearer_auth("r8_test")
            .json(&json!({"version": "black-forest-labs/flux-schnell", "input": {"prompt": "a fox", "num_outputs": 2, "aspect_ratio": "16:9"}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "starting");
        assert!(v["output"].is_null() && v["error"].is_null());
        assert_eq!(v["model"], "black-forest-labs/flux-schnell");
        assert_eq!(v["input"]["prompt"], "a fox");
        assert!(v["created_at"].as_str().unwrap().ends_with('Z'));
        let id = v["id"].as_str().unwrap();
        assert_eq!(id.len(), 26);
        let get = v["urls"]["get"].as_str().unwrap();
        assert_eq!(get, format!("{}/p/rep/v1/predictions/{id}", sim.url()));
        assert_eq!(v["urls"]["cancel"], format!("{get}/cancel"));

        let polled: Value = http.get(get).send().await.unwrap().json().await.unwrap();
        assert_eq!(polled["status"], "processing");
        let v = poll_until_done(&http, get).await;
        assert_eq!(v["status"], "succeeded");
        assert!(v["completed_at"].is_string());
        assert!((v["metrics"]["predict_time"].as_f64().unwrap() - 0.2).abs() < 1e-9);
        let out = v["output"].as_array().unwrap();
        assert_eq!(out.len(), 2);
        let png = http.get(out[0].as_str().unwrap()).send().await.unwrap();
        assert_eq!(png.headers()["content-type"], "image/png");
        let png = png.bytes().await.unwrap();
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 1024);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 576);
        assert_eq!(sim.state.recorded()[0].headers["authorization"], "Bearer r8_test");
    }

    #[tokio::test]
    async fn video_predictions_give_one_url_and_can_fail_or_be_cancelled() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let create = |prefix: &str, body: Value| {
            let req = http.post(format!("{}{prefix}/v1/predictions", sim.url())).json(&body);
            async move { req.send().await.unwrap() }
        };
        let v: Value = create("/f/predict_ms=10", json!({"version": "minimax/video-01", "input": {"prompt": "waves"}})).await.json().await.unwrap();
        let v = poll_until_done(&http, v["urls"]["get"].as_str().unwrap()).await;
        assert_eq!(v["status"], "succeeded");
        let url = v["output"].as_str().unwrap();
        let mp4 = http.get(url).send().await.unwrap();
        assert_eq!(mp4.headers()["content-type"], "video/mp4");
        assert_eq!(&mp4.bytes().await.unwrap()[..12], b"\0\0\0\x18ftypmp42");

        let v: Value = create("/f/predict_ms=10,predict_fail=true", json!({"version": "abc123", "input": {"prompt": "x"}})).await.json().await.unwrap();
        let v = poll_until_done(&http, v["urls"]["get"].as_str().unwrap()).await;
        assert_eq!(v["status"], "failed");
        assert_eq!(v["error"], "simulated model failure");
        assert!(v["output"].is_null());

        let v: Value = create("/f/predict_ms=60000", json!({"version": "abc123", "input": {"prompt": "x"}})).await.json().await.unwrap();
        let c: Value = http.post(v["urls"]["cancel"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
        assert_eq!(c["status"], "canceled");
        let g: Value = http.get(v["urls"]["get"].as_str().unwrap()).send().await.unwrap().json().await.unwrap();
        assert_eq!(g["status"], "canceled");
    }

    #[tokio::test]
    async fn refuses_bad_input_unknown_ids_and_honours_faults() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http.post(format!("{}/v1/predictions", sim.url())).json(&json!({"version": "a/b", "input": {}})).send().await.unwrap();
        assert_eq!(resp.status(), 422);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["title"], "Input validation failed");
        assert_eq!(v["status"], 422);
        assert!(v["detail"].as_str().unwrap().contains("prompt"));

        let resp = http.get(format!("{}/v1/predictions/nope", sim.url())).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(resp.json::<Value>().await.unwrap(), json!({"detail": "Not found."}));

        let resp = http.get(format!("{}/f/status=429,retry_after=1/v1/predictions/nope", sim.url())).send().await.unwrap();
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()["retry-after"], "1");

        // Sync mode waits for the answer.
        let resp = http
            .post(format!("{}/f/predict_ms=20/v1/models/owner/img/predictions", sim.url()))
            .header("prefer", "wait=5")
            .json(&json!({"input": {"prompt": "x", "width": 64, "height": 48}}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["status"], "succeeded");
        assert_eq!(v["model"], "owner/img");
        assert!(v["output"][0].as_str().unwrap().contains("img-64x48-"));
    }
}
