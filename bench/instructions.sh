#!/usr/bin/env bash
# Instructions per request: the gateway (release build, limiter, ledger and
# tracing on, as in bench/run.sh) runs under callgrind, which counts the
# instructions it executes. Unlike requests per second, the count does not
# move with the machine's speed or with what else it is doing, so two
# commits can be compared on a noisy VM; it leaves out the kernel, and
# cache misses count the same as hits.
#
#   bench/instructions.sh            # 1,000 sync, then 1,000 streaming requests
#   REQUESTS=300 bench/instructions.sh
#   GATEWAY=/path/to/other/switchyard bench/instructions.sh   # another build
#
# Prints a markdown table; KEEP=1 keeps the callgrind files (for
# callgrind_annotate) and says where. Needs valgrind and curl.
set -euo pipefail
cd "$(dirname "$0")/.."

REQUESTS=${REQUESTS:-1000}
WARMUP=${WARMUP:-300}
CONNS=${CONNS:-4}
SIM_PORT=19190
GW_PORT=18180
OTLP_PORT=14417
export BENCH_KEY=ze_bench_key_0000000000000000

for tool in valgrind callgrind_control curl; do
    command -v "$tool" >/dev/null || { echo "instructions: $tool is needed (apt-get install valgrind curl)" >&2; exit 2; }
done

cargo build --release --locked --bin switchyard --example loadgen
BIN=${GATEWAY:-$PWD/target/release/switchyard}
LOAD=$PWD/target/release/examples/loadgen
WORK=$(mktemp -d /tmp/switchyard-instructions.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap cleanup EXIT

source bench/gateway.sh
gateway_config "$GW_PORT" 1 > "$WORK/gw.toml"
"$LOAD" otlp-sink --port "$OTLP_PORT" & PIDS+=($!)
"$PWD/target/release/switchyard" simulate --port "$SIM_PORT" --profile fast 2>"$WORK/sim.log" & PIDS+=($!)
# String compression off: each dump must name its functions itself.
(cd "$WORK" && exec valgrind --tool=callgrind --compress-strings=no --callgrind-out-file="$WORK/callgrind.out" "$BIN" serve --config gw.toml 2>gw.log) & GW_PID=$!; PIDS+=($GW_PID)
for _ in $(seq 1 600); do curl -fs "http://127.0.0.1:$GW_PORT/healthz" >/dev/null 2>&1 && break; sleep 0.2; done
curl -fs "http://127.0.0.1:$GW_PORT/healthz" >/dev/null || { echo "instructions: the gateway did not come up" >&2; exit 1; }

load() { "$LOAD" http --url "http://127.0.0.1:$GW_PORT" --key "$BENCH_KEY" --conns "$CONNS" --duration 1h "$@"; }
# Warm the pools, the scorer and the allocator first; then count each kind
# alone: zero the counters, run, let background work (ledger, span export,
# logs) catch up, dump.
load --requests "$WARMUP" >/dev/null
load --requests "$WARMUP" --stream >/dev/null
count() { # label, loadgen flags...
    local label=$1; shift
    sleep 1
    callgrind_control -z "$GW_PID" >/dev/null 2>&1
    local out; out=$(load --requests "$REQUESTS" "$@")
    grep -q '"errors":0' <<<"$out" || { echo "instructions: $label requests failed: $out" >&2; exit 1; }
    sleep 1
    callgrind_control -d "$label" "$GW_PID" >/dev/null 2>&1
    sleep 1
    local file; file=$(grep -l "^desc: Trigger: Dump $label\|^desc: Trigger: dump $label" "$WORK"/callgrind.out* | head -1)
    local total; total=$(grep -m1 '^summary:' "$file" | awk '{print $2}')
    printf '| %s | %s | %s |\n' "$label" "$REQUESTS" "$(awk -v t="$total" -v n="$REQUESTS" 'BEGIN { printf "%.0f", t / n }')"
}
echo "| request | requests counted | instructions per request |"
echo "|---|---:|---:|"
count sync
count streaming --stream
[ "${KEEP:-0}" = 1 ] && echo "instructions: callgrind files kept in $WORK" >&2
exit 0
