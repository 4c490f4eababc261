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

/// The demo config: simulated providers of every kind behind `sim_url`,
/// a public model of every modality, one key.
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

[[providers]]
id = "sim-replicate"
kind = "replicate"
base_url = "{sim_url}/p/replicate"
api_key = "r8_demo"

[[providers]]
id = "sim-elevenlabs"
kind = "elevenlabs"
base_url = "{sim_url}/p/elevenlabs"
api_key = "el-demo"

[[providers]]
id = "sim-deepgram"
kind = "deepgram"
base_url = "{sim_url}/p/deepgram"
api_key = "dg-demo"

[[models]]
id = "gpt-image-1"
modality = "image"
  [[models.routes]]
  provider = "sim-openai-a"
  upstream_model = "gpt-image-1"
  price = {{ per_image = 0.04 }}
  [[models.routes]]
  provider = "sim-replicate"
  upstream_model = "black-forest-labs/flux-1.1-pro"
  price = {{ per_image = 0.04 }}

[[models]]
id = "flux-1.1-pro"
modality = "image"
  [[models.routes]]
  provider = "sim-replicate"
  upstream_model = "black-forest-labs/flux-1.1-pro"
  price = {{ per_image = 0.04 }}

[[models]]
id = "veo-3"
modality = "video"
  [[models.routes]]
  provider = "sim-replicate"
  upstream_model = "google/veo-3-video"
  price = {{ per_second = 0.50 }}

[[models]]
id = "tts-1"
modality = "tts"
default_voice = "alloy"
  [[models.routes]]
  provider = "sim-openai-a"
  upstream_model = "tts-1"
  price = {{ per_mchar = 15.0 }}
  [[models.routes]]
  provider = "sim-elevenlabs"
  upstream_model = "eleven_multilingual_v2"
  price = {{ per_mchar = 30.0 }}

[[models]]
id = "whisper-1"
modality = "stt"
  [[models.routes]]
  provider = "sim-openai-b"
  upstream_model = "whisper-1"
  price = {{ per_minute = 0.006 }}
  [[models.routes]]
  provider = "sim-deepgram"
  upstream_model = "nova-2"
  price = {{ per_minute = 0.0043 }}

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
  providers: sim-openai-a, sim-openai-b, sim-anthropic, sim-replicate,
             sim-elevenlabs, sim-deepgram (simulated, in-process)
  models:    gpt-4o-mini, claude-sonnet-4, llama-3.1-8b (chat), gpt-image-1,
             flux-1.1-pro (image), veo-3 (video), tts-1, whisper-1
  key:       {DEMO_KEY}

Try a streamed answer:
  curl -N http://{addr}/v1/chat/completions \
    -H "Authorization: Bearer {DEMO_KEY}" -H "Content-Type: application/json" \
    -d '{{"model":"gpt-4o-mini","stream":true,"messages":[{{"role":"user","content":"Hello!"}}]}}'
"#
    )
}
