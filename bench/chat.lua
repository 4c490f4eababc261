-- wrk script: one sync chat completion per request, and the figures as one
-- JSON line (latencies in microseconds) for bench/run.sh.
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark."}]}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "")

function done(summary, latency, requests)
  local secs = summary.duration / 1e6
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout
  io.write(string.format(
    '{"label":"%s","kind":"wrk-sync","requests":%d,"errors":%d,"rps":%.1f,"p50_us":%d,"p99_us":%d,"offered_rps":null}\n',
    os.getenv("BENCH_LABEL") or "", summary.requests, errors, summary.requests / secs,
    latency:percentile(50), latency:percentile(99)))
end
