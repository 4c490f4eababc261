//! Switchyard: one endpoint in front of many LLM and media providers.
//!
//! # The request path
//!
//! ```text
//!  socket ── axum::serve (HTTP/1.1 + h2c on one port)
//!    │        └─ request_id layer: X-Request-Id in, X-Request-Id out
//!    │        └─ trace layer: the request's span and log span (request and
//!    │           trace ids), traceparent out; its metrics once the body ends
//!    ├─ /v1/...  http/       OpenAI JSON façade: route → key (before the body)
//!    │                       → body limit → JSON (strict where the API is) → proto
//!    │                       │ calls the generated service traits, like any gRPC client
//!    ├─ /switchyard.v1.*/*   (gRPC clients, same traits)
//!    ▼
//!  grpc/        Gate: key → validate → model → modality → permission → budget
//!    │          → rate limit → deadline; then Chat, Generations or Speech
//!    ▼
//!  routing/     Router: scores, power of two choices, one attempt at a time
//!    │          (or a hedge), failover on retryable failures until first
//!    │          content, mid-stream continuation for chat
//!    ▼
//!  providers/   one adapter per wire format: proto ⇄ openai | anthropic |
//!    │          replicate | elevenlabs | deepgram, streams decoded as they
//!    │          arrive, failures classified (error.rs)
//!    ▼
//!  upstream provider (pooled: hyper-util for chat, providers/client.rs;
//!                     reqwest for media)
//! ```
//!
//! And back: a sync answer returns up the same calls; a stream (chat chunks,
//! TTS audio) is relayed by a producer task in `grpc/` through a bounded
//! channel and framed by `http/` (SSE, raw audio) or sent as gRPC messages.
//! When the client leaves, the channel closes, the producer stops and the
//! upstream connection is dropped. The ledger row of every routed request is
//! made durable before the client's last byte (`accounting/`).
//!
//! Off the path: the ledger's database writer, span export and the log
//! writer run on threads of their own at a lower priority (`background.rs`),
//! so their batches wait for idle moments instead of stalling requests.
//!
//! A generation takes a detour: `grpc/generations.rs` stores it as a job
//! and long-polls it; a worker (`generations/`, on whichever replica claims
//! the job's lease) routes it through the same `routing/` and `providers/`.
//!
//! [`serve`] is the one entry point: it takes the listener, the config and a
//! shutdown future, so tests run the real server on port 0.

#![forbid(unsafe_code)]

use std::{
    future::{Future, IntoFuture},
    sync::Arc,
    time::Duration,
};

use axum::{middleware, serve::ListenerExt};
use tokio::net::TcpListener;

pub mod accounting;
pub mod background;
pub mod auth;
pub mod config;
pub mod demo;
pub mod error;
pub mod generations;
pub mod grpc;
pub mod http;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod proto;
pub mod providers;
pub mod reload;
pub mod routing;
pub mod simulator;
pub mod storage;
pub mod telemetry;

pub use config::Config;
pub use error::Error;

use crate::{
    accounting::Ledger,
    auth::Keys,
    grpc::{generations::GenerationsCore, speech::SpeechCore, ChatCore, Gate, ModelsCore},
    http::{HttpState, Readiness},
    limits::Limiter,
    storage::Storage,
    proto::{chat_server::ChatServer, generations_server::GenerationsServer, models_server::ModelsServer, speech_server::SpeechServer},
    routing::Router,
    telemetry::Telemetry,
};

/// Why the server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("building the upstream HTTP client: {0}")]
    Client(#[from] providers::ClientsError),
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("serving: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Telemetry(#[from] telemetry::TelemetryError),
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error(transparent)]
    Limits(#[from] limits::LimitsError),
    #[error(transparent)]
    Ledger(#[from] accounting::LedgerError),
}

/// Serves the gateway on `listener` until `shutdown` resolves; then reports
/// not ready (`/readyz` 503, gRPC health `NOT_SERVING`) while still serving
/// for `server.drain_delay`, stops accepting, and lets in-flight requests
/// and streams finish for up to `server.shutdown_grace`.
pub async fn serve<F>(listener: TcpListener, config: Config, shutdown: F) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let (_keep, reloads) = tokio::sync::mpsc::channel(1);
    serve_reloading(listener, config, shutdown, reloads).await
}

/// [`serve`], also applying every config received on `reloads` (the
/// binary sends one per `SIGHUP`, already validated; see [`reload`]).
pub async fn serve_reloading<F>(listener: TcpListener, config: Config, shutdown: F, mut reloads: tokio::sync::mpsc::Receiver<Config>) -> Result<(), ServeError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let telemetry = Arc::new(Telemetry::new(&config.telemetry)?);
    let storage = Storage::connect(&config.storage.url).await?;
    let keys = Arc::new(Keys::from_config(&config.keys).with_storage(storage.clone()));
    let limiter = Arc::new(Limiter::new(&config.limits.backend)?);
    // With Redis for limits, the ledger shares it: rows outlive any replica.
    let redis = config
        .limits
        .backend
        .starts_with("redis")
        .then(|| (config.limits.backend.as_str(), accounting::redis_stream::stream_key(&config.storage.url)));
    let ledger = Ledger::open(&config.storage.journal_path(), storage.clone(), redis)?;
    let router = Arc::new(reload::Swap::new(Router::new(&config, providers::Clients::new()?, telemetry.clone())));
    let metrics = Arc::new(metrics::Metrics::new(&[proto::FILE_DESCRIPTOR_SET, tonic_health::pb::FILE_DESCRIPTOR_SET]));
    ledger.metrics.set(metrics.clone());
    let gate = Arc::new(Gate {
        keys: keys.clone(),
        router: router.clone(),
        limiter: limiter.clone(),
        ledger: ledger.clone(),
        metrics: metrics.clone(),
        request_timeout: config.server.request_timeout,
    });
    let core = Arc::new(ChatCore::new(gate.clone()));
    let readiness = Arc::new(Readiness::default());
    let (draining_tx, mut draining_rx) = tokio::sync::watch::channel(false);

    // Generation jobs: this replica's worker, and the changes that wake it
    // and the long-polls (from other replicas through PostgreSQL).
    let changes = Arc::new(generations::Changes::default());
    changes.listen(&storage, draining_rx.clone());
    let jobs = Arc::new(generations::Jobs {
        storage: storage.clone(),
        changes: changes.clone(),
        draining: draining_rx.clone(),
    });
    let worker = Arc::new(generations::worker::Worker {
        storage: storage.clone(),
        router: router.clone(),
        ledger: ledger.clone(),
        telemetry: telemetry.clone(),
        changes,
        config: config.generations.clone(),
        owner: grpc::new_id("worker"),
    });
    let worker = tokio::spawn(worker.run(draining_rx.clone()));
    let generations_core = Arc::new(GenerationsCore::new(gate.clone(), jobs));
    let speech = Arc::new(SpeechCore::new(gate));

    let (health, health_service) = tonic_health::server::health_reporter();
    for service in SERVICES {
        health.set_service_status(service, tonic_health::ServingStatus::Serving).await;
    }
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let models = Arc::new(ModelsCore::new(keys.clone(), router.clone()));
    let grpc = tonic::service::Routes::new(ChatServer::from_arc(core.clone()))
        .add_service(ModelsServer::from_arc(models.clone()))
        .add_service(GenerationsServer::from_arc(generations_core.clone()))
        // An upload of 25 MiB, and room for the rest of the message.
        .add_service(SpeechServer::from_arc(speech.clone()).max_decoding_message_size(grpc::speech::MAX_AUDIO_BYTES + 64 * 1024))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare()
        .into_axum_router();

    let state = HttpState::new(http::HttpShared {
        core,
        models,
        generations: generations_core,
        speech,
        keys: keys.clone(),
        limiter,
        storage: storage.clone(),
        max_body_bytes: config.server.max_body_bytes,
        readiness: readiness.clone(),
        telemetry: telemetry.clone(),
    });
    let metrics_routes = http::metrics_router(http::MetricsState {
        metrics: metrics.clone(),
        router: router.clone(),
        ledger: ledger.clone(),
        limiter: state.limiter.clone(),
        readiness: readiness.clone(),
    });
    let mut app = http::router(state).merge(grpc);
    // /metrics on the main port, unless it has a port of its own.
    let admin = match config.server.admin_listen {
        Some(addr) => {
            let admin = TcpListener::bind(addr).await?;
            tracing::info!(addr = %admin.local_addr()?, "metrics listening");
            Some(admin)
        }
        None => {
            app = app.merge(metrics_routes.clone());
            None
        }
    };
    let app = app
        .fallback(http::fallback)
        .layer(middleware::from_fn_with_state((telemetry.clone(), metrics.clone()), telemetry::trace_request))
        .layer(middleware::from_fn(http::request_id));
    let (admin_stop, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    if let Some(admin) = admin {
        let serve_admin = axum::serve(admin, metrics_routes).with_graceful_shutdown(async move {
            let _ = admin_stopped.await;
        });
        tokio::spawn(async move {
            if let Err(e) = serve_admin.await {
                tracing::error!("metrics listener: {e}");
            }
        });
    }

    let reloader = reload::Reloader {
        router,
        keys,
        metrics,
        current: std::sync::Mutex::new(config.clone()),
    };
    tokio::spawn(async move {
        while let Some(new) = reloads.recv().await {
            reloader.apply(new);
        }
    });

    let grace = config.server.shutdown_grace;
    let delay = config.server.drain_delay;
    let signal = async move {
        shutdown.await;
        // Not ready first, still serving: the balancer has `drain_delay` to
        // notice and stop sending before the listener closes.
        readiness.start_draining();
        for service in SERVICES {
            health.set_service_status(service, tonic_health::ServingStatus::NotServing).await;
        }
        if !delay.is_zero() {
            tracing::info!(delay = ?delay, "shutting down: reporting not ready before closing the listener");
            tokio::time::sleep(delay).await;
        }
        tracing::info!(grace = ?grace, "shutting down: draining in-flight requests");
        let _ = draining_tx.send(true);
    };
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let server = axum::serve(listener, app).with_graceful_shutdown(signal).into_future();
    tokio::select! {
        r = server => r?,
        _ = async {
            let _ = draining_rx.wait_for(|d| *d).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!("shutdown grace elapsed; closing the connections still open");
        }
    }
    // The worker has put the jobs it held back in the queue by now, or will
    // within a moment; past that they are retaken when their leases end.
    let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
    let _ = admin_stop.send(());
    telemetry.shutdown(Duration::from_secs(5)).await;
    ledger.flush().await;
    storage.close().await;
    Ok(())
}

/// What gRPC health reports on: the whole server (`""`) and each service.
/// All of them go `NOT_SERVING` when draining starts.
const SERVICES: [&str; 5] = [
    "",
    "switchyard.v1.Chat",
    "switchyard.v1.Models",
    "switchyard.v1.Generations",
    "switchyard.v1.Speech",
];

/// Resolves on SIGTERM or ctrl-c: the binary's shutdown future.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
