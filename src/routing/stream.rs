//! A stream that outlives the provider serving it.
//!
//! [`RoutedStream`] yields the chunks of one answer. When the provider
//! streaming it fails after content was sent — an error, a reset, a
//! malformed event, or silence longer than its `idle_timeout` — the stream
//! continues on the next best route: the assistant text already sent is
//! handed over (as an assistant prefill, or with an explicit instruction to
//! continue, per the route's `continuation`), the new provider's preamble is
//! dropped, and a [`Failover`] marker chunk announces the switch. The client
//! sees one stream, no repeated or lost text.
//!
//! Where a continuation could not be faithful — a tool call half sent,
//! `n` > 1, logprobs — or the client forbade failover, or nothing is left
//! to try, the stream ends with the error: never a silent, truncated
//! success.
//!
//! Usage is merged across attempts: the input once (the first attempt's),
//! and every output token the client received — reported by the provider
//! that produced it, or estimated from the text it delivered when it broke
//! before reporting.

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use futures_util::StreamExt;
use tokio::time::{Instant, Sleep};

use super::{first_content, CallOpts, Model, Plan, Route, Router, Started, Tries, Won};
use crate::{
    config::Continuation,
    error::{Error, UpstreamError, UpstreamErrorKind},
    proto::{message, ChatChunk, ChatRequest, Failover, Message, Role, Usage},
    providers::ChunkStream,
    routing::score::{Attempt, Kind},
    telemetry::AttemptSpan,
};

/// What a route with `continuation = "instruction"` is told after the
/// assistant text so far. (The simulator honours it like a model would.)
pub const CONTINUE_INSTRUCTION: &str =
    "Continue your previous message exactly where it stopped. Do not repeat any of it and do not add any preamble.";

/// A rough token count for text a provider delivered but never reported
/// usage for: about four characters a token.
pub fn estimate_tokens(text: &str) -> u32 {
    (text.chars().count() as u32).div_ceil(4)
}

struct Current {
    number: u32,
    route: Arc<Route>,
    attempt: Attempt,
    span: AttemptSpan,
    rest: ChunkStream,
    /// Text this attempt delivered to the client.
    delivered: String,
    usage: Option<Usage>,
    finish_reason: Option<&'static str>,
}

pub struct RoutedStream {
    router: Arc<Router>,
    model: Arc<Model>,
    req: Arc<ChatRequest>,
    opts: CallOpts,
    tries: Tries,
    current: Option<Current>,
    pending: VecDeque<ChatChunk>,
    /// All assistant text sent so far (choice 0).
    text: String,
    tool_call_started: bool,
    finished: bool,
    /// Usage of the first attempt (its input is what the request costs).
    first_usage: Option<Usage>,
    /// Output tokens of attempts that broke, estimated where unreported.
    earlier_output: u32,
    /// Each attempt that sent content: its route and the output tokens the
    /// client received from it (each is charged at its own route's price).
    segments: Vec<(Arc<Route>, u64)>,
    started: Instant,
    ttft: Option<std::time::Duration>,
    done: bool,
    /// Fires when the current attempt has been silent too long.
    idle: IdleTimer,
}

/// One timer for the whole stream, moved only when it fires early. A
/// timeout made afresh for every chunk registered a timer and removed it
/// again each time (~650 instructions a chunk in callgrind); now waiting
/// for a chunk costs a clock read, and the timer moves at most once per
/// idle period.
struct IdleTimer {
    sleep: Pin<Box<Sleep>>,
    /// When `sleep` is set to fire.
    armed_for: Instant,
}

impl IdleTimer {
    fn new(at: Instant) -> IdleTimer {
        IdleTimer {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            armed_for: at,
        }
    }

    /// Fires no later than `due` (moved earlier only; firing early is
    /// caught by [`IdleTimer::expired`]).
    fn arm(&mut self, due: Instant) {
        if due < self.armed_for {
            self.set(due);
        }
    }

    fn set(&mut self, due: Instant) {
        self.sleep.as_mut().reset(due);
        self.armed_for = due;
    }

    /// After the timer fired: whether `due` has passed; if not, it is set
    /// for `due`.
    fn expired(&mut self, due: Instant) -> bool {
        if Instant::now() >= due {
            return true;
        }
        self.set(due);
        false
    }
}

/// What a stream cost, for the ledger.
#[derive(Debug, Clone)]
pub struct StreamSummary {
    /// The route that sent the first content.
    pub provider: Option<String>,
    pub upstream_model: Option<String>,
    pub input_tokens: u64,
    pub cached_tokens: u64,
    pub output_tokens: u64,
    /// Input once at the first route's price, and every output token the
    /// client received at the price of the route that produced it.
    pub cost_usd: f64,
    pub ttft: Option<std::time::Duration>,
    pub attempts: u32,
    pub attempt_rows: Vec<crate::accounting::AttemptRow>,
}

impl RoutedStream {
    pub(super) fn new(router: Arc<Router>, model: Arc<Model>, req: Arc<ChatRequest>, opts: CallOpts, tries: Tries, won: Won<Started>) -> Self {
        let opts_deadline = opts.deadline;
        let mut s = RoutedStream {
            router,
            model,
            req,
            opts,
            tries,
            current: None,
            pending: VecDeque::new(),
            text: String::new(),
            tool_call_started: false,
            finished: false,
            first_usage: None,
            earlier_output: 0,
            segments: Vec::new(),
            started: Instant::now(),
            ttft: None,
            done: false,
            idle: IdleTimer::new(opts_deadline),
        };
        s.adopt(won, false);
        s
    }

    /// The stream's cost so far (at its end: its whole cost). An attempt
    /// still streaming (the client left) counts what it delivered.
    pub fn summary(&self) -> StreamSummary {
        let mut tries_rows = self.tries.attempt_rows();
        let mut segments = self.segments.clone();
        if let Some(cur) = &self.current {
            let delivered = u64::from(estimate_tokens(&cur.delivered));
            segments.push((cur.route.clone(), delivered));
            if let Some(row) = tries_rows.iter_mut().find(|r| r.attempt == cur.number) {
                row.outcome = "abandoned".into();
                row.output_tokens = delivered;
                row.provider_cost_usd = crate::accounting::chat_cost(&cur.route.price, row.input_tokens, 0, delivered);
            }
        }
        let first = segments.first().map(|(r, _)| r.clone());
        let usage = self.first_usage.unwrap_or_else(|| Usage::new(self.estimate_prompt(), 0));
        let input = u64::from(usage.prompt_tokens);
        let cached = u64::from(usage.cached_tokens.unwrap_or(0));
        let mut cost = first.as_ref().map_or(0.0, |r| crate::accounting::chat_cost(&r.price, input, cached, 0));
        for (route, out) in &segments {
            cost += crate::accounting::chat_cost(&route.price, 0, 0, *out);
        }
        StreamSummary {
            provider: first.as_ref().map(|r| r.provider.clone()),
            upstream_model: first.as_ref().map(|r| r.upstream_model.clone()),
            input_tokens: input,
            cached_tokens: cached,
            output_tokens: segments.iter().map(|s| s.1).sum(),
            cost_usd: cost,
            ttft: self.ttft,
            attempts: self.tries.count(),
            attempt_rows: tries_rows,
        }
    }

    /// Makes `won` the current attempt and queues its head chunks.
    fn adopt(&mut self, won: Won<Started>, continuation: bool) {
        let Won { value, route, mut attempt, span, number } = won;
        let now = Instant::now();
        if self.ttft.is_none() {
            self.ttft = Some(now.saturating_duration_since(self.started));
        }
        attempt.first_content(now);
        span.first_content(now.saturating_duration_since(attempt.started()));
        let Started { head, rest, finished } = value;
        let mut cur = Current {
            number,
            route,
            attempt,
            span,
            rest,
            delivered: String::new(),
            usage: None,
            finish_reason: None,
        };
        if continuation {
            self.pending.push_back(ChatChunk {
                failover: Some(Failover {
                    provider: cur.route.provider.clone(),
                    attempt: self.tries.count(),
                }),
                ..Default::default()
            });
        }
        for mut chunk in head {
            if continuation {
                // The client already has the role and the text so far.
                strip_preamble(&mut chunk);
                if !chunk.has_content() && chunk.usage.is_none() {
                    continue;
                }
            }
            self.observe(&mut cur, &mut chunk);
            if !chunk.choices.is_empty() {
                self.pending.push_back(chunk);
            }
        }
        let ended = finished;
        self.current = Some(cur);
        if ended {
            self.end_current_ok();
        }
    }

    /// Notes what a chunk tells about the answer, and takes its usage.
    fn observe(&mut self, cur: &mut Current, chunk: &mut ChatChunk) {
        if let Some(u) = chunk.usage.take() {
            cur.usage = Some(u);
        }
        for c in &chunk.choices {
            if let Some(d) = &c.delta {
                if c.index == 0 {
                    if let Some(t) = &d.content {
                        self.text.push_str(t);
                        cur.delivered.push_str(t);
                    }
                }
                if !d.tool_calls.is_empty() {
                    self.tool_call_started = true;
                }
            }
            if let Some(r) = crate::proto::FinishReason::try_from(c.finish_reason).ok().and_then(|f| f.openai_name()) {
                cur.finish_reason = Some(r);
                self.finished = true;
            }
        }
    }

    /// The current attempt ended well: record it and queue the usage.
    fn end_current_ok(&mut self) {
        let Some(cur) = self.current.take() else { return };
        let output = cur.usage.map_or_else(|| estimate_tokens(&cur.delivered), |u| u.completion_tokens);
        let usage = cur.usage;
        let prompt = usage.map_or_else(|| self.estimate_prompt(), |u| u.prompt_tokens);
        self.tries.record(cur.number, "success", u64::from(prompt), u64::from(output));
        self.segments.push((cur.route.clone(), u64::from(output)));
        cur.span.succeed(usage.as_ref(), cur.finish_reason);
        cur.attempt.succeed(output, Instant::now());
        if self.first_usage.is_none() {
            self.first_usage = usage;
        }
        let first = self.first_usage.unwrap_or_else(|| Usage::new(self.estimate_prompt(), 0));
        let mut merged = Usage::new(first.prompt_tokens, self.earlier_output.saturating_add(output));
        merged.cached_tokens = first.cached_tokens;
        merged.reasoning_tokens = usage.and_then(|u| u.reasoning_tokens);
        self.pending.push_back(ChatChunk {
            usage: Some(merged),
            ..Default::default()
        });
        self.done = true;
    }

    fn estimate_prompt(&self) -> u32 {
        self.req.messages.iter().flat_map(crate::proto::openai_json::message_text).map(estimate_tokens).sum()
    }

    /// Can the answer so far be handed to another provider faithfully?
    fn continuation_refused(&self) -> Option<&'static str> {
        if !self.opts.failover {
            Some("the client asked for no failover")
        } else if !self.router.mid_stream_failover() {
            Some("mid-stream failover is off")
        } else if self.req.n.unwrap_or(1) > 1 {
            Some("n > 1 cannot be continued")
        } else if self.req.logprobs == Some(true) {
            Some("logprobs cannot be continued")
        } else if self.tool_call_started {
            Some("a tool call was half sent")
        } else {
            None
        }
    }

    /// Handles the current attempt's failure: continue elsewhere, or end.
    async fn recover(&mut self, e: UpstreamError) -> Result<(), Error> {
        let Some(cur) = self.current.take() else {
            return Err(Error::Internal("no attempt to recover".into()));
        };
        let delivered = estimate_tokens(&cur.delivered);
        if self.first_usage.is_none() {
            self.first_usage = cur.usage.or(Some(Usage::new(self.estimate_prompt(), 0)));
        }
        let prompt = cur.usage.map_or_else(|| self.estimate_prompt(), |u| u.prompt_tokens);
        let produced = cur.usage.map_or(delivered, |u| u.completion_tokens.max(delivered));
        self.tries.record(cur.number, "failure", u64::from(prompt), u64::from(produced));
        self.segments.push((cur.route.clone(), u64::from(delivered)));
        self.earlier_output = self.earlier_output.saturating_add(cur.usage.map_or(delivered, |u| u.completion_tokens.max(delivered)));
        tracing::warn!(provider = %cur.route.provider, class = e.class(), "stream failed after content: {e}");
        cur.span.fail(&e, Some(delivered));
        cur.attempt.fail(&e, Instant::now());
        if self.finished {
            // Everything was said; only the trailer was lost.
            self.current = None;
            self.pending.push_back(ChatChunk {
                usage: Some(Usage::new(self.first_usage.map_or(0, |u| u.prompt_tokens), self.earlier_output)),
                ..Default::default()
            });
            self.done = true;
            return Ok(());
        }
        self.tries.failed.push(e);
        if Instant::now() >= self.opts.deadline {
            return Err(self.tries.failed.exhausted(self.tries.count(), true, &self.model.id));
        }
        if let Some(why) = self.continuation_refused() {
            return Err(Error::ProviderUnavailable {
                message: format!("the stream broke after content was sent and cannot be continued ({why}): {}", self.tries.failed.summary()),
                attempts: self.tries.count(),
            });
        }
        let text = self.text.clone();
        let base = self.req.clone();
        let router = self.router.clone();
        let model = self.model.clone();
        let eligible = |r: &Route| r.continuation != Continuation::Off;
        let plan = Plan {
            kind: Kind::Stream,
            first: "continuation",
            eligible: &eligible,
            attempt_timeout: None,
        };
        let won = router
            .run(&model, &plan, &self.opts, &mut self.tries, |route, call| {
                let req = continuation_request(&base, &text, route.continuation);
                let route = route.clone();
                Box::pin(async move { first_content(&route, &req, call).await })
            })
            .await?;
        self.adopt(won, true);
        Ok(())
    }

    /// The next chunk for the client; `Err` ends the stream with that error.
    pub async fn next(&mut self) -> Option<Result<ChatChunk, Error>> {
        loop {
            if let Some(c) = self.pending.pop_front() {
                return Some(Ok(c));
            }
            if self.done {
                return None;
            }
            let cur = self.current.as_mut()?;
            let idle = cur.route.idle_timeout;
            // Silence is counted from now, when the stream asks for more
            // (not from the last chunk: a slow client is not a stall).
            let wait = self.opts.deadline.min(Instant::now() + idle);
            self.idle.arm(wait);
            let next = loop {
                tokio::select! {
                    biased;
                    item = cur.rest.next() => break Ok(item),
                    () = self.idle.sleep.as_mut() => {
                        if self.idle.expired(wait) {
                            break Err(());
                        }
                    }
                }
            };
            let failure = match next {
                Ok(Some(Ok(mut chunk))) => {
                    let mut cur = match self.current.take() {
                        Some(c) => c,
                        None => return None,
                    };
                    self.observe(&mut cur, &mut chunk);
                    self.current = Some(cur);
                    if chunk.choices.is_empty() {
                        continue;
                    }
                    return Some(Ok(chunk));
                }
                Ok(None) => {
                    self.end_current_ok();
                    continue;
                }
                Ok(Some(Err(e))) => e,
                Err(_) if Instant::now() >= self.opts.deadline => {
                    let provider = cur.route.provider.clone();
                    let e = UpstreamError::new(&provider, UpstreamErrorKind::Timeout, "the request's deadline passed mid-stream");
                    if let Some(cur) = self.current.take() {
                        let delivered = estimate_tokens(&cur.delivered);
                        self.tries.record(cur.number, "failure", u64::from(self.estimate_prompt()), u64::from(delivered));
                        self.segments.push((cur.route.clone(), u64::from(delivered)));
                        cur.span.fail(&e, Some(delivered));
                        cur.attempt.fail(&e, Instant::now());
                    }
                    self.tries.failed.push(e);
                    self.done = true;
                    return Some(Err(self.tries.failed.exhausted(self.tries.count(), true, &self.model.id)));
                }
                Err(_) => UpstreamError::new(&cur.route.provider, UpstreamErrorKind::Stall, format!("no event within {idle:?}")),
            };
            if let Err(e) = self.recover(failure).await {
                self.done = true;
                self.current = None;
                return Some(Err(e));
            }
        }
    }
}

/// Removes what a continuing provider repeats of a stream's start.
fn strip_preamble(chunk: &mut ChatChunk) {
    for c in &mut chunk.choices {
        if let Some(d) = &mut c.delta {
            d.role = None;
            if d.content.as_deref() == Some("") {
                d.content = None;
            }
        }
    }
    chunk.choices.retain(|c| {
        c.finish_reason != 0 || c.delta.as_ref().is_some_and(|d| d.content.is_some() || d.refusal.is_some() || !d.tool_calls.is_empty())
    });
}

/// The request that asks another provider to continue `so_far`.
pub fn continuation_request(base: &ChatRequest, so_far: &str, mode: Continuation) -> ChatRequest {
    let mut req = base.clone();
    req.messages.push(Message {
        role: Role::Assistant as i32,
        content: Some(message::Content::Text(so_far.to_owned())),
        ..Default::default()
    });
    if mode == Continuation::Instruction {
        req.messages.push(Message {
            role: Role::User as i32,
            content: Some(message::Content::Text(CONTINUE_INSTRUCTION.to_owned())),
            ..Default::default()
        });
    }
    // The client's limit is on the whole answer.
    let used = estimate_tokens(so_far);
    for n in [&mut req.max_tokens, &mut req.max_completion_tokens].into_iter().flatten() {
        *n = n.saturating_sub(used).max(1);
    }
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuation_requests_hand_over_the_text() {
        let base = ChatRequest {
            model: "m".into(),
            max_tokens: Some(100),
            messages: vec![Message {
                role: Role::User as i32,
                content: Some(message::Content::Text("hi".into())),
                ..Default::default()
            }],
            ..Default::default()
        };
        let p = continuation_request(&base, "the answer so", Continuation::Prefill);
        assert_eq!(p.messages.len(), 2);
        assert_eq!(p.messages[1].role, Role::Assistant as i32);
        assert_eq!(p.max_tokens, Some(96));
        let i = continuation_request(&base, "the answer so", Continuation::Instruction);
        assert_eq!(i.messages.len(), 3);
        assert_eq!(i.messages[2].content, Some(message::Content::Text(CONTINUE_INSTRUCTION.into())));
    }

    #[test]
    fn token_estimate_rounds_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn the_idle_timer_fires_once_the_latest_wait_is_over() {
        use std::time::Duration;
        let ms = Duration::from_millis;
        let t0 = Instant::now();
        let mut t = IdleTimer::new(t0 + ms(100_000));
        t.arm(t0 + ms(1_000));
        assert_eq!(t.armed_for, t0 + ms(1_000), "moved earlier");
        // A chunk at 500 ms; the next wait is due 1 s after it.
        tokio::time::advance(ms(500)).await;
        let due = Instant::now() + ms(1_000);
        t.arm(due);
        assert_eq!(t.armed_for, t0 + ms(1_000), "not moved later: that waits for it to fire");
        t.sleep.as_mut().await;
        assert_eq!(Instant::now(), t0 + ms(1_000));
        assert!(!t.expired(due), "fired early: not a stall");
        assert_eq!(t.armed_for, due);
        t.sleep.as_mut().await;
        assert_eq!(Instant::now(), due);
        assert!(t.expired(due), "a whole second of silence");
        // The next wait, after a failover: the spent timer fires at once,
        // is found early, and is set for the new due time.
        let next = Instant::now() + ms(10);
        t.arm(next);
        t.sleep.as_mut().await;
        assert!(!t.expired(next));
        t.sleep.as_mut().await;
        assert_eq!(Instant::now(), next);
        assert!(t.expired(next));
    }
}
