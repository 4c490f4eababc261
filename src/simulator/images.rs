//! OpenAI image generation, `POST /v1/images/generations`: `n` PNGs of the
//! requested `size`, each a solid colour drawn from the prompt and its
//! index, inline as `b64_json` (the default) or, with
//! `response_format: "url"`, as absolute links to `GET /_sim/media/...`.
//! `usage` (as gpt-image-1 reports it) is included unless the model is a
//! `dall-e-*` one, which reports none. The bytes are PNG whatever
//! `output_format` asks for.

use std::{collections::HashMap, sync::Arc};

use axum::{
    extract::{Path, Request, State},
    response::Response,
};
use base64::Engine as _;
use serde_json::{json, Value};

use super::{
    count_tokens,
    media::{color, hash64, image_token, png, parse_size, unix_now},
    openai::{error_body, invalid},
    origin, path_and_query, preflight_as, prefix_of, read_body, sync_response, Prefix, SimState, MAX_MEDIA_BODY,
};

pub(super) async fn generations(State(state): State<Arc<SimState>>, Path(params): Path<HashMap<String, String>>, req: Request) -> Response {
    generations_at(state, prefix_of(&params), req).await.unwrap_or_else(|r| r)
}

async fn generations_at(state: Arc<SimState>, prefix: Prefix, req: Request) -> Result<Response, Response> {
    let path = path_and_query(req.uri());
    let origin = origin(&state, req.uri(), req.headers());
    let (parts, bytes) = read_body(req, MAX_MEDIA_BODY).await?;
    let body: Value = serde_json::from_slice(&bytes).map_err(|e| invalid(&format!("invalid JSON: {e}"), None))?;
    let faults = preflight_as(&state, prefix, &path, &parts.headers, &body, false, error_body).await?;
    let prompt = body
        .get("prompt")
        .and_then(Value::as_str)
        .filter(|p| !p.trim().is_empty())
        .ok_or_else(|| invalid("Missing required parameter: 'prompt'.", Some("prompt")))?;
    let n = match body.get("n") {
        None | Some(Value::Null) => 1,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=10).contains(n))
            .ok_or_else(|| invalid(&format!("Invalid 'n': {v}. Expected a value between 1 and 10."), Some("n")))?,
    };
    let size = body.get("size").and_then(Value::as_str).unwrap_or("1024x1024");
    let (w, h) = match size {
        "auto" => (1024, 1024),
        _ => parse_size(size).ok_or_else(|| invalid(&format!("Invalid size '{size}': expected WIDTHxHEIGHT."), Some("size")))?,
    };
    let format = body.get("response_format").and_then(Value::as_str).unwrap_or("b64_json");
    if !matches!(format, "url" | "b64_json") {
        return Err(invalid(&format!("Invalid value: '{format}'. Supported values are: 'url' and 'b64_json'."), Some("response_format")));
    }
    let data: Vec<Value> = (0..n)
        .map(|i| {
            let rgb = color(hash64(state.seed, format!("{prompt}\n{i}").as_bytes()));
            if format == "url" {
                json!({"url": format!("{origin}/_sim/media/{}", image_token(w, h, rgb))})
            } else {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(png(w, h, rgb))})
            }
        })
        .collect();
    let mut answer = json!({"created": unix_now(), "data": data});
    let model = body.get("model").and_then(Value::as_str).unwrap_or("gpt-image-1");
    if !model.starts_with("dall-e") {
        let quality = body.get("quality").and_then(Value::as_str).unwrap_or("auto");
        let per_image = match quality {
            "low" => 272,
            "high" => 4160,
            _ => 1056,
        };
        let input = u64::from(count_tokens(prompt));
        let output = per_image * n;
        answer["usage"] = json!({
            "total_tokens": input + output,
            "input_tokens": input,
            "output_tokens": output,
            "input_tokens_details": {"text_tokens": input, "image_tokens": 0},
        });
    }
    Ok(sync_response(answer, &faults))
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;
    use serde_json::{json, Value};

    use crate::simulator::test_sim;

    #[tokio::test]
    async fn generates_pngs_inline_and_by_url() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http
            .post(format!("{}/v1/images/generations", sim.url()))
            .json(&json!({"model": "gpt-image-1", "prompt": "a red fox", "n": 2, "size": "64x32"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert!(v["created"].as_u64().unwrap() > 1_700_000_000);
        assert_eq!(v["data"].as_array().unwrap().len(), 2);
        let png = base64::engine::general_purpose::STANDARD.decode(v["data"][0]["b64_json"].as_str().unwrap()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 64);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 32);
        assert_ne!(v["data"][0], v["data"][1]);
        assert_eq!(v["usage"]["input_tokens"], 3);

        // By URL, under a prefix: the link serves the same PNG.
        let v: Value = http
            .post(format!("{}/p/img/v1/images/generations", sim.url()))
            .json(&json!({"model": "dall-e-3", "prompt": "a red fox", "size": "64x32", "response_format": "url"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert!(v.get("usage").is_none());
        let url = v["data"][0]["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/_sim/media/", sim.url())), "{url}");
        let media = http.get(url).send().await.unwrap();
        assert_eq!(media.headers()["content-type"], "image/png");
        assert_eq!(media.bytes().await.unwrap().to_vec(), png);

        let rec = sim.state.recorded();
        assert_eq!(rec.len(), 2);
        assert_eq!(rec[1].path, "/p/img/v1/images/generations");
        assert_eq!(rec[1].body["prompt"], "a red fox");
    }

    #[tokio::test]
    async fn refuses_a_missing_prompt_and_honours_faults() {
        let sim = test_sim().await.unwrap();
        let http = reqwest::Client::new();
        let resp = http.post(format!("{}/v1/images/generations", sim.url())).json(&json!({"model": "gpt-image-1"})).send().await.unwrap();
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert_eq!(v["error"]["param"], "prompt");
        assert!(v["error"]["code"].is_null());

        let resp = http
            .post(format!("{}/f/status=503,retry_after=2/v1/images/generations", sim.url()))
            .json(&json!({"prompt": "x"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "2");
    }
}
