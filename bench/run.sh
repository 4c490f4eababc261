#!/usr/bin/env bash
# The benchmark: the simulator in its zero-latency profile, the gateway
# (release build) and, as the floor, nginx as a plain proxy_pass reverse
# proxy in front of the same simulator; the gateway also as configured
# with HTTP/2 to its providers, and (for the held streams) with
# transparent huge pages off. The proxy under test (gateway or nginx) runs
# alone on one core; the simulator and the load tools share the
# other, so every target is measured on the same pinning. Writes
# BENCHMARKS.md (and the raw JSON lines to bench/results.jsonl).
#
#   bench/run.sh                  # everything, about a quarter of an hour
#   DURATION=5s ROUNDS=1 HOLD=2000 bench/run.sh   # a quicker pass
#
# Needs wrk and nginx on PATH (Debian: apt-get install wrk nginx-light), and
# cores 0 and 1 (PROXY_CORE / LOAD_CORE to change them).
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-10s}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-64}
HOLD=${HOLD:-10000}
PROXY_CORE=${PROXY_CORE:-1}
LOAD_CORE=${LOAD_CORE:-0}
SIM_PORT=19090
GW_PORT=18080
GW_OFF_PORT=18082
GW_H2_PORT=18083
GW_LEAN_PORT=18084
NGINX_PORT=18081
OTLP_PORT=14317
export BENCH_KEY=ze_bench_key_0000000000000000

for tool in wrk nginx taskset curl; do
    command -v "$tool" >/dev/null || { echo "bench: $tool is needed (apt-get install wrk nginx-light)" >&2; exit 2; }
done

cargo build --release --locked --bin switchyard --example loadgen
BIN=target/release/switchyard
LOAD=target/release/examples/loadgen
WORK=$(mktemp -d /tmp/switchyard-bench.XXXXXX)
RESULTS=bench/results.jsonl
: > "$RESULTS"
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    # (nginx may already have removed it on the way out.)
    [ -f "$WORK/nginx.pid" ] && kill "$(cat "$WORK/nginx.pid" 2>/dev/null)" 2>/dev/null || true
    wait 2>/dev/null || true
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" || true

on_load() { taskset -c "$LOAD_CORE" "$@"; }
wait_up() { for _ in $(seq 1 100); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.1; done; echo "bench: $1 did not come up" >&2; exit 1; }

# gateway_config: the gateway under test, shared with bench/instructions.sh.
source bench/gateway.sh

echo "bench: starting the simulator, an OTLP sink and the gateways" >&2
# Started by taskset itself, not through on_load: a backgrounded shell
# function is a subshell, and killing it at the end left the simulator
# and the sink running (and holding their ports for the next run).
taskset -c "$LOAD_CORE" "$LOAD" otlp-sink --port "$OTLP_PORT" & PIDS+=($!)
taskset -c "$LOAD_CORE" "$BIN" simulate --port "$SIM_PORT" --profile fast 2>"$WORK/sim.log" & SIM_PID=$!; PIDS+=($SIM_PID)
gateway_config "$GW_PORT" 1 > "$WORK/gw.toml"
gateway_config "$GW_OFF_PORT" 0 > "$WORK/gw-off.toml"
gateway_config "$GW_H2_PORT" 1 http2 > "$WORK/gw-h2.toml"
(cd "$WORK" && exec taskset -c "$PROXY_CORE" "$OLDPWD/$BIN" serve --config gw.toml 2>gw.log) & GW_PID=$!; PIDS+=($GW_PID)
(cd "$WORK" && exec taskset -c "$PROXY_CORE" "$OLDPWD/$BIN" serve --config gw-off.toml 2>gw-off.log) & GW_OFF_PID=$!; PIDS+=($GW_OFF_PID)
(cd "$WORK" && exec taskset -c "$PROXY_CORE" "$OLDPWD/$BIN" serve --config gw-h2.toml 2>gw-h2.log) & GW_H2_PID=$!; PIDS+=($GW_H2_PID)
cp bench/nginx.conf "$WORK/nginx.conf"
taskset -c "$PROXY_CORE" nginx -p "$WORK" -c "$WORK/nginx.conf" -g 'daemon off;' & NGINX_PID=$!; PIDS+=($NGINX_PID)
wait_up "http://127.0.0.1:$GW_PORT/healthz"
wait_up "http://127.0.0.1:$GW_OFF_PORT/healthz"
wait_up "http://127.0.0.1:$GW_H2_PORT/healthz"
wait_up "http://127.0.0.1:$NGINX_PORT/_sim/stats"

SIM="http://127.0.0.1:$SIM_PORT"
GW="http://127.0.0.1:$GW_PORT"
GW_OFF="http://127.0.0.1:$GW_OFF_PORT"
GW_H2="http://127.0.0.1:$GW_H2_PORT"
H2="gateway (HTTP/2 upstream)"
NGINX="http://127.0.0.1:$NGINX_PORT"

# The processes behind each URL, whose CPU time every run reports per
# request: a proxy whose core is not saturated (nginx, when the load core
# is the bottleneck) shows its real cost here, not in its rate.
declare -A PID_OF=(
    ["$SIM"]="$SIM_PID" ["$GW"]="$GW_PID" ["$GW_OFF"]="$GW_OFF_PID" ["$GW_H2"]="$GW_H2_PID"
    ["$NGINX"]="$NGINX_PID $(pgrep -P "$NGINX_PID" | tr '\n' ' ')"
)
TICK=$(getconf CLK_TCK)
cpu_us() { # pids...: user + system CPU time so far, in microseconds
    for p in "$@"; do sed 's/^.*) //' "/proc/$p/stat"; done | awk -v t="$TICK" '{ s += $12 + $13 } END { printf "%.0f", s * 1000000 / t }'
}
measured() { # url, command...: the command's JSON line, with the CPU time spent per request by the processes behind url
    local pids=${PID_OF[$1]}; shift
    local before after line requests
    before=$(cpu_us $pids)
    line=$("$@" | grep '^{')
    after=$(cpu_us $pids)
    requests=$(sed -E 's/.*"requests":([0-9]+).*/\1/' <<<"$line")
    printf '%s,"cpu_us_per_req":%s}\n' "${line%\}}" "$(awk -v a="$after" -v b="$before" -v n="$requests" 'BEGIN { printf "%.1f", n ? (a - b) / n : 0 }')"
}

# Warm every path (connection pools, the scorer, the page cache).
for url in "$SIM" "$GW" "$GW_OFF" "$GW_H2" "$NGINX"; do
    on_load "$LOAD" http --url "$url" --key "$BENCH_KEY" --conns 16 --duration 2s >/dev/null
done

wrk_run() { # label url
    BENCH_LABEL=$1 measured "$2" on_load wrk -t1 -c"$CONNS" -d"$DURATION" -s bench/chat.lua "$2/v1/chat/completions" >> "$RESULTS"
}
load() { # kind url, loadgen flags...
    local kind=$1 url=$2; shift 2
    measured "$url" on_load "$LOAD" "$kind" --url "$url" "$@" --key "$BENCH_KEY" --duration "$DURATION" >> "$RESULTS"
}

echo "bench: sync chat with wrk" >&2
wrk_run simulator "$SIM"
wrk_run nginx "$NGINX"
wrk_run gateway "$GW"
wrk_run "gateway (limits, tracing off)" "$GW_OFF"
wrk_run "$H2" "$GW_H2"

echo "bench: sync and streaming chat with loadgen" >&2
for stream in "" "--stream"; do
    load http "$SIM" --conns "$CONNS" $stream --label simulator
    load http "$NGINX" --conns "$CONNS" $stream --label nginx
    for gw in "gateway $GW" "$H2 $GW_H2"; do
        label=${gw% *} url=${gw##* }
        load http "$url" --conns "$CONNS" $stream --label "$label"
        # Half this gateway's peak, offered to it, to the simulator and to nginx.
        peak=$(tail -n1 "$RESULTS" | sed -E 's/.*"rps":([0-9.]+).*/\1/')
        half=$(awk -v p="$peak" 'BEGIN { printf "%d", p / 2 }')
        # A p99 over one run is at the mercy of whatever else the host does
        # in those seconds: the three targets take turns for $ROUNDS rounds
        # and the report keeps each one's median. nginx at the same rate is
        # the floor: what a bare proxy adds on this machine.
        for _ in $(seq 1 "$ROUNDS"); do
            load http "$SIM" --conns "$CONNS" $stream --rate "$half" --label "simulator @ half $label peak"
            load http "$url" --conns "$CONNS" $stream --rate "$half" --label "$label @ half peak"
            load http "$NGINX" --conns "$CONNS" $stream --rate "$half" --label "nginx @ half $label peak"
        done
    done
done

echo "bench: gRPC" >&2
for stream in "" "--stream"; do
    load grpc "$GW" --conns "$CONNS" $stream --label gateway
    peak=$(tail -n1 "$RESULTS" | sed -E 's/.*"rps":([0-9.]+).*/\1/')
    half=$(awk -v p="$peak" 'BEGIN { printf "%d", p / 2 }')
    load grpc "$GW" --conns "$CONNS" $stream --rate "$half" --label "gateway @ half peak"
done

echo "bench: $HOLD streams held open" >&2
on_load "$LOAD" hold --url "$GW" --key "$BENCH_KEY" --n "$HOLD" --model trickle --pid "$GW_PID" --label gateway >> "$RESULTS"
sleep 2
on_load "$LOAD" hold --url "$GW_H2" --key "$BENCH_KEY" --n "$HOLD" --model trickle --pid "$GW_H2_PID" --label "$H2" >> "$RESULTS"
# The same, without transparent huge pages: mimalloc backs its arenas with
# 2 MB pages by default, which a few KB a stream leave mostly untouched.
sleep 2
gateway_config "$GW_LEAN_PORT" 1 http2 > "$WORK/gw-lean.toml"
(cd "$WORK" && MIMALLOC_ALLOW_THP=0 exec taskset -c "$PROXY_CORE" "$OLDPWD/$BIN" serve --config gw-lean.toml 2>gw-lean.log) & GW_LEAN_PID=$!; PIDS+=($GW_LEAN_PID)
wait_up "http://127.0.0.1:$GW_LEAN_PORT/healthz"
# Loaded first like the others were, so its heap has the same history.
for stream in "" "--stream"; do
    on_load "$LOAD" http --url "http://127.0.0.1:$GW_LEAN_PORT" --key "$BENCH_KEY" --conns "$CONNS" $stream --duration "$DURATION" >/dev/null
done
on_load "$LOAD" hold --url "http://127.0.0.1:$GW_LEAN_PORT" --key "$BENCH_KEY" --n "$HOLD" --model trickle --pid "$GW_LEAN_PID" --label "$H2, MIMALLOC_ALLOW_THP=0" >> "$RESULTS"

cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')
printf '{"kind":"meta","date":"%s","machine":"%s, %s cores","pinning":"proxy on core %s; simulator, wrk and loadgen on core %s; %s per run, %s connections","notes":"%s"}\n' \
    "$(date -u +%Y-%m-%d)" "$cpu" "$(nproc)" "$PROXY_CORE" "$LOAD_CORE" "$DURATION" "$CONNS" \
    "The gateway runs with its rate limiter (in memory), ledger (SQLite, journal) and tracing (every span exported over OTLP to a sink) on; the 'limits, tracing off' row drops the limiter and tracing; the 'HTTP/2 upstream' rows run the full gateway with protocol = http2 on its providers (h2c to the simulator; nginx cannot proxy to HTTP/2). gRPC rows have no direct baseline: the simulator speaks HTTP only. At a fixed rate (the half-peak rows) loadgen releases requests on time from a thread of its own, not in per-millisecond bursts; the simulator, the gateway and nginx take turns at that rate for $ROUNDS rounds, and each figure is the median of its rounds. CPU µs / request is the user and system time of the process(es) behind the URL (every thread, background ones included) over the run, divided by the requests it served." >> "$RESULTS"
"$LOAD" report --results "$RESULTS" --out BENCHMARKS.md
echo "bench: wrote BENCHMARKS.md" >&2
