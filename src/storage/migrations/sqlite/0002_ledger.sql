-- One row per request that reached routing, written by the ledger writer
-- from the journal; inserted if absent, so a replayed row lands once.
CREATE TABLE ledger (
    request_id TEXT PRIMARY KEY,
    client_request_id TEXT,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    provider TEXT,
    upstream_model TEXT,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    latency_ms INTEGER NOT NULL,
    ttft_ms INTEGER,
    attempts INTEGER NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX ledger_by_key ON ledger (key_name, created_at);

-- Every provider attempt of a request, with what that provider will bill
-- for it: what failovers and hedges cost the operator.
CREATE TABLE ledger_attempts (
    request_id TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    provider TEXT NOT NULL,
    upstream_model TEXT NOT NULL,
    outcome TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    provider_cost_usd REAL NOT NULL,
    PRIMARY KEY (request_id, attempt)
);
