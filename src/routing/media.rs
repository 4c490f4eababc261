//! Routing for the media modalities: the same attempt loop as chat (scores,
//! power of two choices, breakers, retry budget, hedging, one span per
//! attempt), with what each modality counts as success.
//!
//! - A generation's attempt succeeds when the provider delivered its media;
//!   it may run for as long as the job may (`generations.timeout`), each
//!   upstream call being bounded by the provider's own `timeout`.
//! - Speech synthesis succeeds at the first audio bytes, as a chat stream
//!   does at its first content: until then a failure moves on to the next
//!   provider; after it, the audio is streamed through as it arrives.
//!   Providers that cannot produce the asked format and rate are skipped.
//! - A transcription succeeds with the transcript; `provider_id` narrows
//!   the routes to one provider.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::time::Instant;

use super::{score::Kind, CallOpts, Model, Plan, Route, Router, Served, Tries, Won};
use crate::{
    error::{Error, UpstreamError, UpstreamErrorKind},
    providers::{AudioUpload, ByteStream, GeneratedMedia, GenerationSpec, SpeechSpec, Transcript},
};

/// Audio whose first bytes have arrived.
pub struct AudioStarted {
    pub first: Bytes,
    pub rest: ByteStream,
}

impl Router {
    /// Runs one generation to its end on the best provider that completes it.
    pub async fn generate(&self, model: &Arc<Model>, spec: Arc<GenerationSpec>, opts: &CallOpts, tries: &mut Tries, whole: Duration) -> Result<Served<Vec<GeneratedMedia>>, Error> {
        let plan = Plan {
            kind: Kind::Sync,
            first: "first",
            eligible: &|r: &Route| r.adapters.generate.is_some(),
            attempt_timeout: Some(whole),
        };
        let won = self
            .run(model, &plan, opts, tries, |route, call| {
                let spec = spec.clone();
                let adapter = route.adapters.generate.clone().ok_or_else(|| route.unsupported("generations"));
                Box::pin(async move { adapter?.generate(&spec, &call.as_ref()).await })
            })
            .await?;
        Ok(settle(won, tries))
    }

    /// Starts speech on the best provider that can produce `spec`'s format
    /// and rate, returning once its first audio bytes arrived.
    pub async fn synthesize(&self, model: &Arc<Model>, spec: Arc<SpeechSpec>, opts: &CallOpts, tries: &mut Tries) -> Result<Served<AudioStarted>, Error> {
        let (format, rate) = (spec.format, spec.sample_rate);
        let eligible = move |r: &Route| r.adapters.tts.as_ref().is_some_and(|a| a.supports(format, rate));
        let plan = Plan {
            kind: Kind::Stream,
            first: "first",
            eligible: &eligible,
            attempt_timeout: None,
        };
        let won = self
            .run(model, &plan, opts, tries, |route, call| {
                let spec = spec.clone();
                let adapter = route.adapters.tts.clone().ok_or_else(|| route.unsupported("text-to-speech"));
                let provider = route.provider.clone();
                Box::pin(async move {
                    let mut rest = adapter?.synthesize(&spec, &call.as_ref()).await?;
                    loop {
                        match rest.next().await {
                            Some(Ok(b)) if b.is_empty() => continue,
                            Some(Ok(first)) => return Ok(AudioStarted { first, rest }),
                            Some(Err(e)) => return Err(e),
                            None => return Err(UpstreamError::new(&provider, UpstreamErrorKind::Malformed, "the audio stream ended before any audio")),
                        }
                    }
                })
            })
            .await?;
        Ok(settle(won, tries))
    }

    /// Transcribes on the best provider (or only on `provider`, when given).
    pub async fn transcribe(&self, model: &Arc<Model>, audio: Arc<AudioUpload>, provider: Option<&str>, opts: &CallOpts, tries: &mut Tries) -> Result<Served<Transcript>, Error> {
        let eligible = |r: &Route| r.adapters.stt.is_some() && provider.is_none_or(|p| p == r.provider);
        let plan = Plan {
            kind: Kind::Sync,
            first: "first",
            eligible: &eligible,
            attempt_timeout: None,
        };
        let won = self
            .run(model, &plan, opts, tries, |route, call| {
                let audio = audio.clone();
                let adapter = route.adapters.stt.clone().ok_or_else(|| route.unsupported("speech-to-text"));
                Box::pin(async move { adapter?.transcribe(&audio, &call.as_ref()).await })
            })
            .await?;
        Ok(settle(won, tries))
    }
}

/// Closes the winning attempt's books: its span, its route's figures and
/// the request's attempt list.
fn settle<T>(won: Won<T>, tries: &mut Tries) -> Served<T> {
    let now = Instant::now();
    won.span.first_content(now.saturating_duration_since(won.attempt.started()));
    won.span.succeed(None, None);
    won.attempt.succeed(0, now);
    tries.record(won.number, "success", 0, 0);
    Served {
        value: won.value,
        route: won.route,
        attempts: tries.count(),
    }
}
