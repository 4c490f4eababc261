//! The gRPC surface on the same port: unary and streaming chat, errors as
//! statuses with the public code in metadata, health and reflection.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::*;
use switchyard::{
    proto::{chat_client::ChatClient, message, ChatRequest, FinishReason, Message, Role, StreamOptions},
    simulator::Faults,
};
use tokio_stream::StreamExt;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request};

async fn client(h: &Harness) -> ChatClient<Channel> {
    ChatClient::connect(format!("http://{}", h.addr)).await.unwrap()
}

fn request(model: &str, text: &str, key: &str) -> Request<ChatRequest> {
    let mut r = Request::new(ChatRequest {
        model: model.into(),
        messages: vec![Message {
            role: Role::User as i32,
            content: Some(message::Content::Text(text.into())),
            ..Default::default()
        }],
        ..Default::default()
    });
    r.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {key}")).unwrap());
    r
}

fn text_of(m: &Message) -> &str {
    match &m.content {
        Some(message::Content::Text(t)) => t,
        _ => "",
    }
}

#[tokio::test]
async fn unary_chat() {
    let h = start().await;
    let mut c = client(&h).await;
    for (model, prompt, provider) in [("gpt-4o-mini", "Hello", "oa-1"), ("claude-sonnet-4", "Hello", "an-1")] {
        let resp = c.complete(request(model, "Hello", KEY)).await.unwrap();
        assert_eq!(resp.metadata().get("x-switchyard-provider").unwrap(), provider);
        assert_eq!(resp.metadata().get("x-switchyard-attempts").unwrap(), "1");
        let out = resp.into_inner();
        assert_eq!(out.model, model);
        assert!(out.id.starts_with("chatcmpl-"));
        assert_eq!(text_of(out.choices[0].message.as_ref().unwrap()), expected_answer(prompt, 16));
        assert_eq!(out.choices[0].finish_reason, FinishReason::Stop as i32);
        assert_eq!(out.usage.unwrap().completion_tokens, 16);
    }
}

#[tokio::test]
async fn streaming_chat() {
    let h = start().await;
    let mut c = client(&h).await;
    let mut req = request("gpt-4o-mini", "Hello", KEY);
    req.get_mut().stream_options = Some(StreamOptions { include_usage: true });
    let resp = c.complete_stream(req).await.unwrap();
    assert_eq!(resp.metadata().get("x-switchyard-provider").unwrap(), "oa-1");
    let chunks: Vec<_> = resp.into_inner().collect::<Result<Vec<_>, _>>().await.unwrap();
    let id = &chunks[0].id;
    assert!(chunks.iter().all(|c| &c.id == id && c.model == "gpt-4o-mini"));
    let text: String = chunks.iter().filter_map(|c| c.choices.first()?.delta.as_ref()?.content.clone()).collect();
    assert_eq!(text, expected_answer("Hello", 16));
    assert_eq!(chunks.last().unwrap().usage.unwrap().completion_tokens, 16);
}

#[tokio::test]
async fn streaming_fails_over_and_errors_carry_public_codes() {
    let h = start().await;
    let mut c = client(&h).await;
    h.faults("oa-1", Faults { status: Some(502), ..Default::default() });
    let resp = c.complete_stream(request("gpt-4o-mini", "Hello", KEY)).await.unwrap();
    assert_eq!(resp.metadata().get("x-switchyard-provider").unwrap(), "oa-2");
    assert_eq!(resp.metadata().get("x-switchyard-attempts").unwrap(), "2");

    let cases = [
        (request("gpt-4o-mini", "x", "ze_nobody_knows_me"), Code::Unauthenticated, "unauthenticated", None),
        (request("gpt-99", "x", KEY), Code::NotFound, "not_found", Some("model")),
        (request("gpt-4o-mini", "x", CLAUDE_ONLY_KEY), Code::PermissionDenied, "permission_denied", None),
        (Request::new(ChatRequest { model: "gpt-4o-mini".into(), ..Default::default() }), Code::Unauthenticated, "unauthenticated", None),
    ];
    for (req, code, public, param) in cases {
        let st = c.complete(req).await.unwrap_err();
        assert_eq!(st.code(), code);
        assert_eq!(st.metadata().get("switchyard-error-code").unwrap(), public);
        assert_eq!(st.metadata().get("switchyard-error-param").map(|v| v.to_str().unwrap()), param);
    }
    let mut empty = request("gpt-4o-mini", "x", KEY);
    empty.get_mut().messages.clear();
    let st = c.complete_stream(empty).await.unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(st.metadata().get("switchyard-error-param").unwrap(), "messages");

    h.faults("oa-2", Faults { status: Some(500), ..Default::default() });
    let st = c.complete(request("gpt-4o-mini", "x", KEY)).await.unwrap_err();
    assert_eq!(st.code(), Code::Unavailable);
    assert_eq!(st.metadata().get("switchyard-error-code").unwrap(), "provider_unavailable");
    use tonic_types::StatusExt;
    let info = st.get_error_details().error_info().cloned().unwrap();
    assert_eq!(info.reason, "provider_unavailable");
}

#[tokio::test]
async fn a_grpc_stream_fails_over_mid_answer_and_says_so() {
    let h = start().await;
    h.faults("oa-1", Faults { reset_after: Some(3), ..Default::default() });
    let mut c = client(&h).await;
    let mut req = request("gpt-4o-mini", "Hello", KEY);
    req.metadata_mut().insert("traceparent", MetadataValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
    let resp = c.complete_stream(req).await.unwrap();
    let tp = resp.metadata().get("traceparent").unwrap().to_str().unwrap().to_owned();
    assert!(tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"), "the trace continues over gRPC: {tp}");
    let chunks: Vec<_> = resp.into_inner().collect::<Result<Vec<_>, _>>().await.unwrap();
    let marker = chunks.iter().find_map(|c| c.failover.clone()).expect("a failover marker");
    assert_eq!((marker.provider.as_str(), marker.attempt), ("oa-2", 2));
    let text: String = chunks.iter().filter_map(|c| c.choices.first()?.delta.as_ref()?.content.clone()).collect();
    assert_eq!(text, expected_answer("Hello", 16));
}

#[tokio::test]
async fn grpc_deadline_bounds_the_request() {
    let h = start().await;
    h.faults("oa-1", Faults { latency_ms: Some(3000), ..Default::default() });
    let mut c = client(&h).await;
    let mut req = request("gpt-4o-mini", "x", KEY);
    req.set_timeout(std::time::Duration::from_millis(200));
    let st = c.complete(req).await.unwrap_err();
    assert!(matches!(st.code(), Code::DeadlineExceeded | Code::Cancelled), "{st:?}");
}

#[tokio::test]
async fn models_are_listed_over_grpc() {
    let h = start().await;
    let mut c = switchyard::proto::models_client::ModelsClient::connect(format!("http://{}", h.addr)).await.unwrap();
    let mut req = Request::new(switchyard::proto::ListModelsRequest {});
    req.metadata_mut().insert("authorization", MetadataValue::try_from(format!("Bearer {CLAUDE_ONLY_KEY}")).unwrap());
    let models = c.list(req).await.unwrap().into_inner().models;
    assert_eq!(models.iter().map(|m| (m.id.as_str(), m.modality.as_str())).collect::<Vec<_>>(), vec![("claude-sonnet-4", "chat")]);
    let st = c.list(Request::new(switchyard::proto::ListModelsRequest {})).await.unwrap_err();
    assert_eq!(st.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn health_and_reflection_are_served() {
    let h = start().await;
    let channel = Channel::from_shared(format!("http://{}", h.addr)).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let resp = health
        .check(tonic_health::pb::HealthCheckRequest { service: "switchyard.v1.Chat".into() })
        .await
        .unwrap();
    assert_eq!(resp.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::{server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest, server_reflection_response::MessageResponse, ServerReflectionRequest};
    let mut refl = ServerReflectionClient::new(channel);
    let req = ServerReflectionRequest { host: String::new(), message_request: Some(MessageRequest::ListServices(String::new())) };
    let mut stream = refl.server_reflection_info(tokio_stream::once(req)).await.unwrap().into_inner();
    let resp = stream.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else { panic!("unexpected reflection answer") };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"switchyard.v1.Chat".to_owned()), "{names:?}");
    assert!(names.contains(&"grpc.health.v1.Health".to_owned()), "{names:?}");
    assert!(names.contains(&"switchyard.v1.Models".to_owned()), "{names:?}");
}
