//! `switchyard.v1.Generations`: image and video jobs (see
//! [`crate::generations`]). Create admits the request like any other
//! (model, modality, permission, budget, rate limit), stores the job and
//! long-polls it; Get long-polls a job of the caller's own; GetMedia serves
//! media the gateway kept.

use std::{sync::Arc, time::Duration};

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use super::{Ask, Gate};
use crate::{
    config::Modality,
    error::Error,
    generations::{auto_wait, to_proto, JobSpec, Jobs, MAX_WAIT_SECS},
    proto::{self, generations_server::Generations, CreateGenerationRequest, GetGenerationRequest, GetMediaRequest, MediaBytes},
    providers::GenerationSpec,
    routing::Model,
    storage::NewGeneration,
};

pub struct GenerationsCore {
    gate: Arc<Gate>,
    jobs: Arc<Jobs>,
}

const MAX_PROMPT_CHARS: usize = 8000;
const MAX_IMAGE_URLS: usize = 8;
const MAX_URL_BYTES: usize = 4096;
const MAX_ID_BYTES: usize = 64;

impl GenerationsCore {
    pub fn new(gate: Arc<Gate>, jobs: Arc<Jobs>) -> Self {
        GenerationsCore { gate, jobs }
    }

    async fn do_create(&self, caller: &mut super::Caller, request: Request<CreateGenerationRequest>) -> Result<Response<proto::Generation>, Error> {
        let req = request.get_ref();
        let wait = wait_window(req.wait_seconds, "wait")?;
        let mut spec = validate(req)?;
        let check = |m: &Model| modality_fields(req, m);
        let ask = Ask {
            model: &req.model,
            modalities: &[Modality::Image, Modality::Video],
            model_param: "model",
            estimated_tokens: 0,
            id_prefix: "gen",
            check: &check,
        };
        let admitted = self.gate.admit(caller, &request, ask).await?;
        spec.video = admitted.model.modality == Modality::Video;
        if spec.video {
            spec.n = 1;
        }
        let job = JobSpec {
            spec,
            failover: admitted.opts.failover,
            traceparent: crate::telemetry::traceparent(&admitted.opts.trace),
        };
        let stored = serde_json::to_string(&job).map_err(|e| Error::Internal(format!("encoding a generation: {e}")))?;
        self.jobs
            .storage
            .create_generation(&NewGeneration {
                id: &admitted.id,
                key_name: &caller.principal.name,
                model: &req.model,
                spec: &stored,
                client_request_id: admitted.client_request_id.as_deref(),
            })
            .await
            .map_err(|e| Error::Internal(format!("storing a generation: {e}")))?;
        self.jobs.changed(&admitted.id, "queued").await;
        let window = wait.unwrap_or_else(|| auto_wait(admitted.model.modality));
        let until = (Instant::now() + window).min(admitted.opts.deadline);
        let row = self.jobs.wait(&admitted.id, &caller.principal.name, until).await?;
        Ok(Response::new(to_proto(&row)))
    }

    async fn do_get(&self, caller: &super::Caller, request: Request<GetGenerationRequest>) -> Result<Response<proto::Generation>, Error> {
        let req = request.get_ref();
        check_id(&req.id)?;
        let wait = wait_window(req.wait_seconds, "wait")?;
        let unknown = || Error::not_found(format!("generation {:?} does not exist", req.id), None);
        let row = self
            .jobs
            .storage
            .generation(&req.id, &caller.principal.name)
            .await
            .map_err(|e| Error::Internal(format!("reading a generation: {e}")))?
            .ok_or_else(unknown)?;
        let modality = self.gate.router.load().model(&row.model).map_or(Modality::Image, |m| m.modality);
        let window = wait.unwrap_or_else(|| auto_wait(modality));
        let timeout = match super::client_timeout(request.metadata())? {
            Some(t) => t.min(self.gate.request_timeout),
            None => self.gate.request_timeout,
        };
        let until = Instant::now() + window.min(timeout);
        let row = self.jobs.wait(&req.id, &caller.principal.name, until).await?;
        Ok(Response::new(to_proto(&row)))
    }

    async fn do_media(&self, caller: &super::Caller, request: Request<GetMediaRequest>) -> Result<Response<MediaBytes>, Error> {
        let req = request.get_ref();
        check_id(&req.id)?;
        let (content_type, data) = self
            .jobs
            .storage
            .generation_media(&req.id, req.n, &caller.principal.name)
            .await
            .map_err(|e| Error::Internal(format!("reading media: {e}")))?
            .ok_or_else(|| Error::not_found(format!("generation {:?} has no media {}", req.id, req.n), None))?;
        Ok(Response::new(MediaBytes { data: data.into(), content_type }))
    }
}

/// `wait`: absent is `"auto"`; else 0 to 60 seconds.
fn wait_window(wait: Option<f64>, param: &str) -> Result<Option<Duration>, Error> {
    match wait {
        None => Ok(None),
        Some(w) if w.is_finite() && (0.0..=MAX_WAIT_SECS).contains(&w) => Ok(Some(Duration::from_secs_f64(w))),
        Some(_) => Err(Error::invalid_param(format!("'{param}' must be \"auto\" or 0 to {MAX_WAIT_SECS} seconds"), param)),
    }
}

fn check_id(id: &str) -> Result<(), Error> {
    if id.is_empty() || id.len() > MAX_ID_BYTES || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        return Err(Error::not_found(format!("generation {:?} does not exist", crate::error::truncate(id, MAX_ID_BYTES)), None));
    }
    Ok(())
}

/// Every bound API.md gives that does not depend on the model.
fn validate(req: &CreateGenerationRequest) -> Result<GenerationSpec, Error> {
    if req.model.is_empty() {
        return Err(Error::invalid_param("'model' is required", "model"));
    }
    let Some(input) = &req.input else {
        return Err(Error::invalid_param("'input' is required", "input"));
    };
    let chars = input.prompt.chars().count();
    if chars == 0 || chars > MAX_PROMPT_CHARS {
        return Err(Error::invalid_param(format!("'input.prompt' must be 1 to {MAX_PROMPT_CHARS} characters"), "input.prompt"));
    }
    if input.image_urls.len() > MAX_IMAGE_URLS {
        return Err(Error::invalid_param(format!("'input.image_urls' takes at most {MAX_IMAGE_URLS} URLs"), "input.image_urls"));
    }
    for (i, u) in input.image_urls.iter().enumerate() {
        let ok = (u.starts_with("https://") || u.starts_with("http://")) && u.len() <= MAX_URL_BYTES && !u.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control());
        if !ok {
            let p = format!("input.image_urls[{i}]");
            return Err(Error::invalid_param(format!("'{p}' must be an http(s) URL of at most {MAX_URL_BYTES} bytes"), &p));
        }
    }
    if let Some(a) = &input.aspect_ratio {
        if dims(a, ':').is_none() {
            return Err(Error::invalid_param("'input.aspect_ratio' must be W:H, like 16:9", "input.aspect_ratio"));
        }
    }
    if let Some(s) = &input.size {
        if !dims(s, 'x').is_some_and(|(w, h)| (1..=8192).contains(&w) && (1..=8192).contains(&h)) {
            return Err(Error::invalid_param("'input.size' must be WxH in pixels, like 1024x1024", "input.size"));
        }
    }
    if let Some(d) = input.duration {
        if !(d.is_finite() && d > 0.0 && d <= 600.0) {
            return Err(Error::invalid_param("'input.duration' must be between 0 and 600 seconds", "input.duration"));
        }
    }
    if let Some(r) = &input.resolution {
        if r != "720p" && r != "1080p" {
            return Err(Error::invalid_param("'input.resolution' must be 720p or 1080p", "input.resolution"));
        }
    }
    if input.negative_prompt.as_ref().is_some_and(|n| n.chars().count() > MAX_PROMPT_CHARS) {
        return Err(Error::invalid_param(format!("'input.negative_prompt' must be at most {MAX_PROMPT_CHARS} characters"), "input.negative_prompt"));
    }
    let n = req.n.unwrap_or(1);
    if !(1..=10).contains(&n) {
        return Err(Error::invalid_param("'n' must be 1 to 10", "n"));
    }
    Ok(GenerationSpec {
        video: false,
        prompt: input.prompt.clone(),
        image_urls: input.image_urls.clone(),
        aspect_ratio: input.aspect_ratio.clone(),
        size: input.size.clone(),
        duration: input.duration,
        resolution: input.resolution.clone(),
        seed: input.seed,
        negative_prompt: input.negative_prompt.clone(),
        n,
    })
}

/// Video-only fields sent to an image model, and image-only ones to a
/// video model, are refused naming the field.
fn modality_fields(req: &CreateGenerationRequest, model: &Model) -> Result<(), Error> {
    let Some(input) = &req.input else { return Ok(()) };
    let refuse = |field: &str, only: &str| {
        Err(Error::invalid_param(
            format!("'{field}' applies to {only} models only; {:?} is a {} model", req.model, model.modality.as_str()),
            field,
        ))
    };
    match model.modality {
        Modality::Image if input.duration.is_some() => refuse("input.duration", "video"),
        Modality::Image if input.resolution.is_some() => refuse("input.resolution", "video"),
        Modality::Video if input.size.is_some() => refuse("input.size", "image"),
        _ => Ok(()),
    }
}

/// `W:H` or `WxH` as two positive numbers.
fn dims(s: &str, sep: char) -> Option<(u32, u32)> {
    let (w, h) = s.split_once(sep)?;
    let w: u32 = w.parse().ok()?;
    let h: u32 = h.parse().ok()?;
    (w > 0 && h > 0).then_some((w, h))
}

#[tonic::async_trait]
impl Generations for GenerationsCore {
    async fn create(&self, request: Request<CreateGenerationRequest>) -> Result<Response<proto::Generation>, Status> {
        let mut caller = self.gate.caller(&request).await?;
        let out = self.do_create(&mut caller, request).await;
        self.gate.finish(caller, out).await
    }

    async fn get(&self, request: Request<GetGenerationRequest>) -> Result<Response<proto::Generation>, Status> {
        let caller = self.gate.caller(&request).await?;
        let out = self.do_get(&caller, request).await;
        self.gate.finish(caller, out).await
    }

    async fn get_media(&self, request: Request<GetMediaRequest>) -> Result<Response<MediaBytes>, Status> {
        let caller = self.gate.caller(&request).await?;
        let out = self.do_media(&caller, request).await;
        self.gate.finish(caller, out).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::GenerationInput;

    fn req(prompt: &str) -> CreateGenerationRequest {
        CreateGenerationRequest {
            model: "flux".into(),
            input: Some(GenerationInput {
                prompt: prompt.into(),
                ..Default::default()
            }),
            n: None,
            wait_seconds: None,
        }
    }

    #[test]
    fn bounds_name_their_field() {
        assert_eq!(validate(&req("")).unwrap_err().param(), Some("input.prompt"));
        assert_eq!(validate(&req(&"x".repeat(8001))).unwrap_err().param(), Some("input.prompt"));
        assert!(validate(&req(&"é".repeat(8000))).is_ok());
        let mut r = req("a cat");
        r.n = Some(11);
        assert_eq!(validate(&r).unwrap_err().param(), Some("n"));
        let mut r = req("a cat");
        r.input.as_mut().unwrap().image_urls = vec!["ftp://x".into()];
        assert_eq!(validate(&r).unwrap_err().param(), Some("input.image_urls[0]"));
        let mut r = req("a cat");
        r.input.as_mut().unwrap().image_urls = vec!["https://x/a.png".into(); 9];
        assert_eq!(validate(&r).unwrap_err().param(), Some("input.image_urls"));
        let mut r = req("a cat");
        r.input.as_mut().unwrap().size = Some("1024by1024".into());
        assert_eq!(validate(&r).unwrap_err().param(), Some("input.size"));
        let mut r = req("a cat");
        r.input.as_mut().unwrap().aspect_ratio = Some("16:0".into());
        assert_eq!(validate(&r).unwrap_err().param(), Some("input.aspect_ratio"));
        assert!(wait_window(Some(61.0), "wait").is_err());
        assert_eq!(wait_window(Some(0.0), "wait").unwrap(), Some(Duration::ZERO));
    }
}
