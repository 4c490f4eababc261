# Sourced by bench/run.sh and bench/instructions.sh. Uses $WORK, $SIM_PORT,
# $OTLP_PORT and $BENCH_KEY from the caller.
#
# The gateway's config: limiter, ledger and tracing on (the "off" variant
# drops them; the "HTTP/2 upstream" one speaks h2c to the simulator).
# Streams held open go to a prefix whose answers trickle.
gateway_config() { # port, with_extras(0|1), provider protocol
    local extras_key="requests_per_minute = 100000000
tokens_per_minute = 100000000000"
    local telemetry="[telemetry]
otlp_endpoint = \"http://127.0.0.1:$OTLP_PORT\"
sample_ratio = 1.0"
    if [ "$2" = 0 ]; then extras_key=""; telemetry=""; fi
    local protocol="protocol = \"${3:-auto}\""
    cat <<EOF
[server]
listen = "127.0.0.1:$1"
request_timeout = "120s"
shutdown_grace = "1s"
[storage]
url = "sqlite://$WORK/gw-$1.db"
$telemetry
[[providers]]
id = "sim"
kind = "openai"
base_url = "http://127.0.0.1:$SIM_PORT/v1"
max_concurrency = 100000
$protocol
[[providers]]
id = "sim-trickle"
kind = "openai"
base_url = "http://127.0.0.1:$SIM_PORT/f/chunk_delay_ms=3000,tokens=40/v1"
max_concurrency = 100000
idle_timeout = "30s"
$protocol
[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "sim"
  upstream_model = "gpt-4o-mini"
  price = { input_per_mtok = 0.15, output_per_mtok = 0.60 }
[[models]]
id = "trickle"
  [[models.routes]]
  provider = "sim-trickle"
  upstream_model = "gpt-4o-mini"
[[keys]]
name = "bench"
key = "$BENCH_KEY"
$extras_key
EOF
}
