//! The chat adapters' upstream HTTP client: hyper-util's pooled client over
//! rustls (the platform's trust store), without reqwest's layers.
//!
//! Chat carries the gateway's traffic. Profiled at peak sync load, reqwest's
//! own work was 7% of a request's CPU: its redirect layer and its response
//! each parse the URL again (with IDNA host processing), it clones its
//! client and matches proxies for every request. This client takes a URI
//! parsed once per provider and a finished header map. The media adapters
//! (multipart uploads, polling, far fewer requests) keep reqwest.
//!
//! Pool and protocol choices match [`super::Clients`]'s reqwest clients:
//! idle connections capped per host, `auto` negotiating HTTP/2 by ALPN on
//! TLS, `http2` with prior knowledge and keep-alive pings. Proxies are not
//! used: providers are reached directly.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::{
    client::legacy::{connect::HttpConnector, Client},
    rt::{TokioExecutor, TokioTimer},
};

use crate::config::UpstreamProtocol;

/// A response whose body is read as it arrives.
pub type Response = http::Response<hyper::body::Incoming>;

/// How a request failed before a response: the dial, or the exchange.
pub type SendError = hyper_util::client::legacy::Error;

#[derive(Clone, Debug)]
pub struct ChatClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl ChatClient {
    pub fn new(protocol: UpstreamProtocol, pool: &PoolSettings) -> std::io::Result<ChatClient> {
        let mut http = HttpConnector::new();
        // https:// is TLS in the wrapper below; plain http:// is allowed.
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(pool.connect_timeout));
        let tls = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_platform_verifier(rustls::crypto::aws_lc_rs::default_provider())?
            .https_or_http();
        let connector = match protocol {
            UpstreamProtocol::Auto => tls.enable_all_versions().wrap_connector(http),
            UpstreamProtocol::Http1 => tls.enable_http1().wrap_connector(http),
            UpstreamProtocol::Http2 => tls.enable_http2().wrap_connector(http),
        };
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            // An HTTP/1.1 connection's read buffer: a page, not hyper's
            // 8 KB that grows. Each held stream holds a connection, and
            // SSE events and most answers are far smaller; a large answer
            // takes a few more reads. 10,000 held streams: 565-574 MB
            // resident -> 507-538 MB.
            .http1_read_buf_exact_size(4096);
        if protocol == UpstreamProtocol::Http2 {
            builder
                .http2_only(true)
                .http2_keep_alive_interval(pool.h2_keep_alive_interval)
                .http2_keep_alive_timeout(pool.h2_keep_alive_timeout);
        }
        Ok(ChatClient {
            inner: builder.build(connector),
        })
    }

    /// POSTs `body` to `uri` with `headers` (the Host header is added).
    pub async fn post(&self, uri: http::Uri, headers: http::HeaderMap, body: Vec<u8>) -> Result<Response, SendError> {
        let mut req = http::Request::new(Full::new(Bytes::from(body)));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        self.inner.request(req).await
    }
}

/// The pool and connection bounds every upstream client shares.
pub struct PoolSettings {
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
    pub h2_keep_alive_interval: Duration,
    pub h2_keep_alive_timeout: Duration,
}
