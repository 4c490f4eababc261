//! The proto contract (`proto/switchyard/v1/chat.proto`), compiled by
//! `build.rs`, and its OpenAI JSON form.
//!
//! The generated messages are the gateway's internal language: the HTTP
//! façade, the gRPC core, the provider adapters and the simulator all speak
//! them, and [`openai_json`] is the one place that maps them to and from
//! OpenAI's JSON.

#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");
}

pub(crate) mod json_write;
pub mod openai_json;

pub use v1::*;

/// The encoded file descriptor set, served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/switchyard_descriptor.bin"));

impl Role {
    pub fn from_openai(s: &str) -> Option<Role> {
        Some(match s {
            "system" => Role::System,
            "developer" => Role::Developer,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            _ => return None,
        })
    }

    pub fn openai_name(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant | Role::Unspecified => "assistant",
            Role::Tool => "tool",
        }
    }
}

impl FinishReason {
    pub fn from_openai(s: &str) -> FinishReason {
        match s {
            "stop" => FinishReason::Stop,
            "length" => FinishReason::Length,
            "tool_calls" => FinishReason::ToolCalls,
            "content_filter" => FinishReason::ContentFilter,
            "function_call" => FinishReason::FunctionCall,
            _ => FinishReason::Unspecified,
        }
    }

    pub fn openai_name(self) -> Option<&'static str> {
        match self {
            FinishReason::Unspecified => None,
            FinishReason::Stop => Some("stop"),
            FinishReason::Length => Some("length"),
            FinishReason::ToolCalls => Some("tool_calls"),
            FinishReason::ContentFilter => Some("content_filter"),
            FinishReason::FunctionCall => Some("function_call"),
        }
    }
}

impl ChatChunk {
    /// Does this chunk carry anything a client would see as the answer?
    /// Preamble events (a role-only delta, an empty first delta) do not: a
    /// provider that fails after them has not started its stream yet.
    pub fn has_content(&self) -> bool {
        self.choices.iter().any(|c| {
            c.finish_reason != FinishReason::Unspecified as i32
                || c.delta.as_ref().is_some_and(|d| {
                    d.content.as_deref().is_some_and(|s| !s.is_empty())
                        || d.refusal.as_deref().is_some_and(|s| !s.is_empty())
                        || !d.tool_calls.is_empty()
                })
        })
    }
}

impl Usage {
    pub fn new(prompt: u32, completion: u32) -> Usage {
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            total_tokens: prompt.saturating_add(completion),
            cached_tokens: None,
            reasoning_tokens: None,
        }
    }
}
