//! The operator's configuration, per `shared/spec/CONFIG.md`.
//!
//! Parsing is strict: unknown keys are refused with the file, line and key
//! path; every string may reference `${ENV}` (a missing variable is an error
//! naming it); durations carry a unit. [`Config::validate`] then lists every
//! cross-reference problem at once (a route naming an unknown provider, a
//! duplicate id, ...), so `switchyard check` can print them all.
//!
//! Provider secrets live in [`Secret`], whose `Debug` never shows them.

use std::{collections::HashSet, fmt, net::SocketAddr, path::Path, time::Duration};

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub storage: StorageConfig,
    pub limits: LimitsConfig,
    pub telemetry: TelemetryConfig,
    pub generations: GenerationsConfig,
    pub routing: RoutingConfig,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelConfig>,
    pub keys: Vec<KeyConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    #[serde(deserialize_with = "de::socket_addr")]
    pub listen: SocketAddr,
    #[serde(deserialize_with = "de::duration")]
    pub request_timeout: Duration,
    pub max_body_bytes: u64,
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace: Duration,
    /// On SIGTERM, how long readiness reports draining (503, gRPC health
    /// `NOT_SERVING`) while the listener still accepts, before draining
    /// begins: time for a load balancer to stop sending.
    #[serde(deserialize_with = "de::duration")]
    pub drain_delay: Duration,
    #[serde(deserialize_with = "de::opt_socket_addr")]
    pub admin_listen: Option<SocketAddr>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            request_timeout: Duration::from_secs(120),
            max_body_bytes: 4 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::ZERO,
            admin_listen: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    #[serde(deserialize_with = "de::string")]
    pub url: String,
    /// Where ledger rows are made durable before they reach the database
    /// (a local file, replayed at start). Default: beside a SQLite file
    /// (`<db>.ledger.jsonl`), else `switchyard-ledger.jsonl`.
    #[serde(deserialize_with = "de::opt_string")]
    pub ledger_journal: Option<String>,
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            url: "sqlite://switchyard.db".into(),
            ledger_journal: None,
        }
    }
}

impl StorageConfig {
    pub fn journal_path(&self) -> std::path::PathBuf {
        if let Some(p) = &self.ledger_journal {
            return p.into();
        }
        match self.url.strip_prefix("sqlite://").or_else(|| self.url.strip_prefix("sqlite:")) {
            Some(file) => {
                let file = file.split('?').next().unwrap_or(file);
                format!("{file}.ledger.jsonl").into()
            }
            None => "switchyard-ledger.jsonl".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    #[serde(deserialize_with = "de::string")]
    pub backend: String,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig { backend: "memory".into() }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    #[serde(deserialize_with = "de::opt_string")]
    pub otlp_endpoint: Option<String>,
    #[serde(deserialize_with = "de::string")]
    pub service_name: String,
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "switchyard".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GenerationsConfig {
    /// A worker's claim on a job; a dead replica's jobs are retaken after it.
    #[serde(deserialize_with = "de::duration")]
    pub lease: Duration,
    /// How long one job may run, failovers included, before it fails with
    /// `timeout`.
    #[serde(deserialize_with = "de::duration")]
    pub timeout: Duration,
}

impl Default for GenerationsConfig {
    fn default() -> Self {
        GenerationsConfig {
            lease: Duration::from_secs(30),
            timeout: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoutingConfig {
    pub max_attempts: u32,
    pub hedge: Hedge,
    pub mid_stream_failover: bool,
    /// Consecutive failures that open a route's circuit.
    pub breaker_threshold: u32,
    /// How long an open circuit waits before letting a probe through
    /// (doubling, up to 60s, while probes fail).
    #[serde(deserialize_with = "de::duration")]
    pub breaker_cooldown: Duration,
    /// How long the scorer remembers: the time constant of each route's
    /// latency and error-rate figures.
    #[serde(deserialize_with = "de::duration")]
    pub decay: Duration,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        RoutingConfig {
            max_attempts: 3,
            hedge: Hedge::Off,
            mid_stream_failover: true,
            breaker_threshold: 5,
            breaker_cooldown: Duration::from_secs(5),
            decay: Duration::from_secs(10),
        }
    }
}

/// When to send a second attempt if the first has produced no token yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Hedge {
    #[default]
    Off,
    After(Duration),
    /// The route's live p95 time to first token.
    P95,
}

impl<'de> Deserialize<'de> for Hedge {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = de::string(d)?;
        match s.as_str() {
            "off" => Ok(Hedge::Off),
            "p95" => Ok(Hedge::P95),
            other => parse_duration(other).map(Hedge::After).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Replicate,
    Elevenlabs,
    Deepgram,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Openai => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Replicate => "replicate",
            ProviderKind::Elevenlabs => "elevenlabs",
            ProviderKind::Deepgram => "deepgram",
        }
    }

    pub fn serves(self, modality: Modality) -> bool {
        use Modality as M;
        match self {
            ProviderKind::Openai => matches!(modality, M::Chat | M::Image | M::Tts | M::Stt),
            ProviderKind::Anthropic => modality == M::Chat,
            ProviderKind::Replicate => matches!(modality, M::Image | M::Video),
            ProviderKind::Elevenlabs => modality == M::Tts,
            ProviderKind::Deepgram => modality == M::Stt,
        }
    }
}

/// A provider credential. Its `Debug` and `Display` never show the value.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Secret(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        de::string(d).map(Secret)
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    pub kind: ProviderKind,
    #[serde(deserialize_with = "de::string")]
    pub base_url: String,
    #[serde(default)]
    pub api_key: Secret,
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: u32,
    #[serde(default = "default_timeout", deserialize_with = "de::duration")]
    pub timeout: Duration,
    #[serde(default = "default_idle_timeout", deserialize_with = "de::duration")]
    pub idle_timeout: Duration,
    /// The HTTP version spoken to this provider.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
}

/// How the gateway talks HTTP to a provider.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1 to `http://` URLs; on `https://`, HTTP/2 when the provider
    /// offers it (ALPN), else HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/1.1 only: one connection per request in flight.
    Http1,
    /// HTTP/2 only (prior knowledge on `http://`): every request to the
    /// provider is a stream on one shared connection, capped by the
    /// provider's own concurrent-stream limit.
    Http2,
}

fn default_max_concurrency() -> u32 {
    256
}
fn default_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(20)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Modality {
    Chat,
    Image,
    Video,
    Tts,
    Stt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    #[serde(deserialize_with = "de::string")]
    pub id: String,
    #[serde(default = "default_modality")]
    pub modality: Modality,
    #[serde(default = "default_max_output_tokens")]
    pub max_output_tokens: u32,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub default_voice: Option<String>,
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
}

impl Modality {
    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Chat => "chat",
            Modality::Image => "image",
            Modality::Video => "video",
            Modality::Tts => "tts",
            Modality::Stt => "stt",
        }
    }
}

fn default_modality() -> Modality {
    Modality::Chat
}
fn default_max_output_tokens() -> u32 {
    4096
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    #[serde(deserialize_with = "de::string")]
    pub provider: String,
    #[serde(deserialize_with = "de::string")]
    pub upstream_model: String,
    #[serde(default)]
    pub price: Price,
    #[serde(default)]
    pub continuation: Continuation,
}

/// USD prices; which fields apply depends on the modality.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: Option<f64>,
    pub output_per_mtok: Option<f64>,
    pub cached_input_per_mtok: Option<f64>,
    pub per_image: Option<f64>,
    pub per_second: Option<f64>,
    pub per_mchar: Option<f64>,
    pub per_minute: Option<f64>,
}

/// How a broken stream is handed to this route to continue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Continuation {
    #[default]
    Prefill,
    Instruction,
    Off,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    #[serde(deserialize_with = "de::string")]
    pub name: String,
    #[serde(default)]
    pub key: Option<Secret>,
    #[serde(default, deserialize_with = "de::opt_string")]
    pub key_sha256: Option<String>,
    #[serde(default = "default_models")]
    pub models: Vec<String>,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u64>,
    pub budget_usd: Option<f64>,
}

fn default_models() -> Vec<String> {
    vec!["*".into()]
}

/// A problem found while loading a config; `check` prints one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem(pub String);

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Config {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Config, Vec<Problem>> {
        let text = std::fs::read_to_string(path).map_err(|e| vec![Problem(format!("{}: {e}", path.display()))])?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in problems.
    pub fn parse(text: &str, origin: &str) -> Result<Config, Vec<Problem>> {
        let config = parse_toml(text, origin).map_err(|p| vec![p])?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(problems.into_iter().map(|p| Problem(format!("{origin}: {p}"))).collect())
        }
    }

    /// Every cross-reference problem, not just the first.
    pub fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut p = |s: String| out.push(Problem(s));
        if self.server.max_body_bytes == 0 {
            p("server.max_body_bytes: must be positive".into());
        }
        if self.server.request_timeout.is_zero() {
            p("server.request_timeout: must be positive".into());
        }
        if self.generations.lease < Duration::from_millis(300) || self.generations.timeout.is_zero() {
            p("generations.lease (at least 300ms) and generations.timeout: must be positive".into());
        }
        if self.routing.max_attempts == 0 {
            p("routing.max_attempts: must be at least 1".into());
        }
        if self.routing.breaker_threshold == 0 || self.routing.breaker_cooldown.is_zero() || self.routing.decay.is_zero() {
            p("routing.breaker_threshold, routing.breaker_cooldown and routing.decay: must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.telemetry.sample_ratio) {
            p("telemetry.sample_ratio: must be between 0 and 1".into());
        }
        let backend = self.limits.backend.as_str();
        if backend != "memory" && !backend.starts_with("redis://") && !backend.starts_with("rediss://") {
            p(format!("limits.backend: expected \"memory\" or a redis:// URL, got {backend:?}"));
        }
        let url = self.storage.url.as_str();
        if !url.starts_with("sqlite:") && !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            p(format!("storage.url: expected sqlite:// or postgres://, got {:?}", redact_url(url)));
        }
        let mut providers = HashSet::new();
        for (i, pr) in self.providers.iter().enumerate() {
            if pr.id.is_empty() {
                p(format!("providers[{i}].id: must not be empty"));
            }
            if !providers.insert(pr.id.as_str()) {
                p(format!("providers[{i}].id: duplicate provider id {:?}", pr.id));
            }
            if !(pr.base_url.starts_with("http://") || pr.base_url.starts_with("https://")) {
                p(format!("providers[{i}].base_url: must be an http:// or https:// URL"));
            }
            if pr.max_concurrency == 0 {
                p(format!("providers[{i}].max_concurrency: must be positive"));
            }
            if pr.timeout.is_zero() || pr.idle_timeout.is_zero() {
                p(format!("providers[{i}]: timeout and idle_timeout must be positive"));
            }
        }
        let mut models = HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.id.is_empty() {
                p(format!("models[{i}].id: must not be empty"));
            }
            if !models.insert(m.id.as_str()) {
                p(format!("models[{i}].id: duplicate model id {:?}", m.id));
            }
            if m.routes.is_empty() {
                p(format!("models[{i}] ({}): has no routes", m.id));
            }
            for (j, r) in m.routes.iter().enumerate() {
                match self.providers.iter().find(|pr| pr.id == r.provider) {
                    None => p(format!("models[{i}].routes[{j}].provider: unknown provider {:?}", r.provider)),
                    Some(pr) if !pr.kind.serves(m.modality) => p(format!(
                        "models[{i}].routes[{j}].provider: provider {:?} of kind {} cannot serve {:?} models",
                        r.provider,
                        pr.kind.as_str(),
                        m.modality
                    )),
                    Some(_) => {}
                }
                if r.upstream_model.is_empty() {
                    p(format!("models[{i}].routes[{j}].upstream_model: must not be empty"));
                }
            }
        }
        let mut names = HashSet::new();
        for (i, k) in self.keys.iter().enumerate() {
            if !names.insert(k.name.as_str()) {
                p(format!("keys[{i}].name: duplicate key name {:?}", k.name));
            }
            match (&k.key, &k.key_sha256) {
                (Some(_), Some(_)) => p(format!("keys[{i}] ({}): set key or key_sha256, not both", k.name)),
                (None, None) => p(format!("keys[{i}] ({}): needs key or key_sha256", k.name)),
                (Some(key), None) if !key.expose().starts_with("ze_") || key.expose().len() < 12 => {
                    p(format!("keys[{i}].key ({}): gateway keys start with ze_ and are at least 12 characters", k.name))
                }
                (None, Some(h)) if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                    p(format!("keys[{i}].key_sha256 ({}): expected 64 hex digits", k.name))
                }
                _ => {}
            }
            if k.models.is_empty() {
                p(format!("keys[{i}].models ({}): empty list allows no model; use [\"*\"] for all", k.name));
            }
        }
        out
    }

    /// The model entry for a public id.
    pub fn model(&self, id: &str) -> Option<&ModelConfig> {
        self.models.iter().find(|m| m.id == id)
    }
}

fn redact_url(url: &str) -> String {
    // postgres://user:password@host/db: the password is a secret too.
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

fn parse_toml(text: &str, origin: &str) -> Result<Config, Problem> {
    let line_of = |span: Option<std::ops::Range<usize>>| {
        span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| {
        let line = line_of(e.span()).map(|l| format!("line {l}: ")).unwrap_or_default();
        Problem(format!("{origin}: {line}{}", e.message().trim()))
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.inner();
        let line = line_of(inner.span()).map(|l| format!("line {l}: ")).unwrap_or_default();
        Problem(format!("{origin}: {line}{path}: {}", inner.message().trim()))
    })
}

/// Parses `250ms`, `30s`, `2m`, `1h`: a number and a unit, nothing bare.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() || s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("invalid duration {s:?}: expected a number with a unit, like 250ms, 30s or 2m"));
    }
    humantime::parse_duration(s).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// Expands `${NAME}` references from the process environment.
pub fn expand_env(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after.find('}').ok_or_else(|| format!("unterminated ${{ in {s:?}"))?;
        let name = &after[..end];
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        let value = std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Deserializers that expand `${ENV}` and parse durations.
mod de {
    use super::*;
    use serde::de::Error as _;

    pub fn string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw).map_err(D::Error::custom)
    }

    pub fn opt_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        string(d).map(Some)
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        parse_duration(&string(d)?).map_err(D::Error::custom)
    }

    pub fn socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
        let s = string(d)?;
        s.parse().map_err(|_| D::Error::custom(format!("invalid listen address {s:?}: expected host:port, like 0.0.0.0:8080")))
    }

    pub fn opt_socket_addr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        socket_addr(d).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = r#"
[server]
listen = "127.0.0.1:0"
request_timeout = "120s"

[[providers]]
id = "openai-east"
kind = "openai"
base_url = "https://api.openai.com/v1"
api_key = "sk-secret"

[[models]]
id = "gpt-4o-mini"
modality = "chat"

  [[models.routes]]
  provider = "openai-east"
  upstream_model = "gpt-4o-mini-2024-07-18"
  price = { input_per_mtok = 0.15, output_per_mtok = 0.60, cached_input_per_mtok = 0.075 }
  continuation = "prefill"

[[keys]]
name = "ci"
key = "ze_test_key_123456"
models = ["gpt-*"]
"#;

    #[test]
    fn parses_the_documented_shape() {
        let c = Config::parse(EXAMPLE, "t.toml").unwrap();
        assert_eq!(c.server.request_timeout, Duration::from_secs(120));
        assert_eq!(c.providers[0].timeout, Duration::from_secs(60));
        assert_eq!(c.models[0].routes[0].price.cached_input_per_mtok, Some(0.075));
        assert!(!format!("{c:?}").contains("sk-secret"));
    }

    #[test]
    fn unknown_keys_name_line_and_path() {
        let text = EXAMPLE.replace("continuation = \"prefill\"", "continuation = \"prefill\"\n  wieght = 3");
        let err = Config::parse(&text, "t.toml").unwrap_err();
        let msg = err[0].to_string();
        assert!(msg.contains("line 21"), "{msg}");
        assert!(msg.contains("models[0].routes[0]"), "{msg}");
        assert!(msg.contains("wieght"), "{msg}");
    }

    #[test]
    fn missing_env_var_is_named() {
        let text = EXAMPLE.replace("sk-secret", "${SWITCHYARD_SURELY_UNSET_VAR}");
        let msg = Config::parse(&text, "t.toml").unwrap_err()[0].to_string();
        assert!(msg.contains("SWITCHYARD_SURELY_UNSET_VAR"), "{msg}");
        assert!(msg.contains("providers[0].api_key"), "{msg}");
        assert!(msg.contains("line 10"), "{msg}");
    }

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("30").is_err());
        let text = EXAMPLE.replace("\"120s\"", "\"soon\"");
        assert!(Config::parse(&text, "t").unwrap_err()[0].to_string().contains("server.request_timeout"));
    }

    #[test]
    fn a_providers_protocol_is_auto_unless_named() {
        assert_eq!(Config::parse(EXAMPLE, "t").unwrap().providers[0].protocol, UpstreamProtocol::Auto);
        let text = EXAMPLE.replace("api_key = \"sk-secret\"", "api_key = \"sk-secret\"\nprotocol = \"http2\"");
        assert_eq!(Config::parse(&text, "t").unwrap().providers[0].protocol, UpstreamProtocol::Http2);
        let msg = Config::parse(&text.replace("\"http2\"", "\"http3\""), "t").unwrap_err()[0].to_string();
        assert!(msg.contains("providers[0].protocol") && msg.contains("http3"), "{msg}");
    }

    #[test]
    fn validation_lists_every_problem() {
        let text = EXAMPLE.replace("provider = \"openai-east\"", "provider = \"nope\"").replace("ze_test_key_123456", "plain");
        let errs = Config::parse(&text, "t").unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
    }
}
