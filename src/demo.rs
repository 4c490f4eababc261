//! `switchyard demo`: the gateway on its embedded defaults with simulated
//! providers in-process, so a newcomer gets a streamed answer within a
//! minute of cloning, with no provider account.
//!
//! The demo config is written as TOML and read by the same parser as an
//! operator's file, so the demo also shows what a config looks like.

use std::net::SocketAddr;

use crate::config::Config;

/// The demo's key. Fixed so the README's examples work as written; the demo
/// listens on loopback only unless told otherwise.
pub const DEMO_KEY: &str = "ze_demo_0000000000000000";

/// The demo config: three simulated providers behind `sim_url`, three
/// public models, one key.
pub fn config_toml(sim_url: &str, listen: SocketAddr) -> String {
    format!(
        r#"[server]
listen = "{listen}"
request_timeout = "60s"
shutdown_grace = "5s"

[routing]
max_attempts = 3

[[providers]]
id = "sim-openai-a"
kind = "openai"
base_url = "{sim_url}/p/openai-a/v1"
api_key = "sk-demo-a"

[[providers]]
id = "sim-openai-b"
kind = "openai"
base_url = "{sim_url}/p/openai-b/v1"
api_key = "sk-demo-b"

[[providers]]
id = "sim-anthropic"
kind = "anthropic"
base_url = "{sim_url}/p/anthropic"
api_key = "sk-ant-demo"

[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "sim-openai-a"
  upstream_model = "gpt-4o-mini-2024-07-18"
  price = {{ input_per_mtok = 0.15, output_per_mtok = 0.60, cached_input_per_mtok = 0.075 }}
  [[models.routes]]
  provider = "sim-openai-b"
  upstream_model = "gpt-4o-mini"
  price = {{ input_per_mtok = 0.15, output_per_mtok = 0.60 }}

[[models]]
id = "claude-sonnet-4"
  [[models.routes]]
  provider = "sim-anthropic"
  upstream_model = "claude-sonnet-4-20250514"
  price = {{ input_per_mtok = 3.0, output_per_mtok = 15.0 }}

[[models]]
id = "llama-3.1-8b"
  [[models.routes]]
  provider = "sim-openai-b"
  upstream_model = "meta-llama/Llama-3.1-8B-Instruct"
  price = {{ input_per_mtok = 0.05, output_per_mtok = 0.08 }}

[[keys]]
name = "demo"
key = "{DEMO_KEY}"
models = ["*"]
"#
    )
}

pub fn config(sim_url: &str, listen: SocketAddr) -> Result<Config, Vec<crate::config::Problem>> {
    Config::parse(&config_toml(sim_url, listen), "demo config")
}

/// What the demo prints once it listens.
pub fn banner(addr: SocketAddr) -> String {
    format!(
        r#"Switchyard demo listening on http://{addr} (HTTP and gRPC)
  providers: sim-openai-a, sim-openai-b, sim-anthropic (simulated, in-process)
  models:    gpt-4o-mini, claude-sonnet-4, llama-3.1-8b
  key:       {DEMO_KEY}

Try a streamed answer:
  curl -N http://{addr}/v1/chat/completions \
    -H "Authorization: Bearer {DEMO_KEY}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Hello!"}}]}}'
"#
    )
}
