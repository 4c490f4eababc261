//! The gateway driven by a real OpenAI client library (async-openai), so
//! SDK compatibility cannot drift: it must parse our completions, chunks,
//! `[DONE]`, usage chunk and error envelope as it parses OpenAI's.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use async_openai::{
    config::OpenAIConfig,
    error::OpenAIError,
    types::chat::{ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequestArgs},
    Client,
};
use common::*;
use futures_util::StreamExt;

fn sdk(h: &Harness) -> Client<OpenAIConfig> {
    Client::with_config(OpenAIConfig::new().with_api_base(h.url("/v1")).with_api_key(KEY))
}

fn request(model: &str, stream: bool) -> async_openai::types::chat::CreateChatCompletionRequest {
    let mut b = CreateChatCompletionRequestArgs::default();
    b.model(model)
        .messages([ChatCompletionRequestUserMessageArgs::default().content("Hello").build().unwrap().into()])
        .max_completion_tokens(100u32);
    if stream {
        b.stream_options(ChatCompletionStreamOptions { include_usage: Some(true), include_obfuscation: None });
    }
    b.build().unwrap()
}

#[tokio::test]
async fn sdk_sync_completion() {
    let h = start().await;
    for (model, prompt) in [("gpt-4o-mini", "Hello"), ("claude-sonnet-4", "Hello")] {
        let resp = sdk(&h).chat().create(request(model, false)).await.unwrap();
        assert_eq!(resp.model, model);
        assert_eq!(resp.choices[0].message.content.as_deref(), Some(expected_answer(prompt, 16).as_str()));
        assert_eq!(resp.usage.unwrap().completion_tokens, 16);
    }
}

#[tokio::test]
async fn sdk_streamed_completion_with_usage() {
    let h = start().await;
    for (model, prompt) in [("gpt-4o-mini", "Hello"), ("claude-sonnet-4", "Hello")] {
        let mut stream = sdk(&h).chat().create_stream(request(model, true)).await.unwrap();
        let mut text = String::new();
        let mut usage = None;
        let mut ids = std::collections::HashSet::new();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.unwrap();
            ids.insert(chunk.id.clone());
            for c in &chunk.choices {
                text.push_str(c.delta.content.as_deref().unwrap_or_default());
            }
            if let Some(u) = chunk.usage {
                usage = Some(u);
            }
        }
        assert_eq!(text, expected_answer(prompt, 16), "{model}");
        assert_eq!(ids.len(), 1);
        assert_eq!(usage.unwrap().completion_tokens, 16);
    }
}

#[tokio::test]
async fn sdk_parses_the_error_envelope() {
    let h = start().await;
    let err = sdk(&h).chat().create(request("no-such-model", false)).await.unwrap_err();
    let OpenAIError::ApiError(api) = err else { panic!("expected an API error, got {err:?}") };
    assert_eq!(api.api_error.code.as_deref(), Some("not_found"));
    assert_eq!(api.api_error.param.as_deref(), Some("model"));
}
