-- Image and video generations: jobs that outlive the request (and the
-- replica) that created them. A worker claims a runnable job by taking its
-- lease (lease_owner, lease_until in unix ms); a job whose lease ran out
-- (its replica died) is runnable again. Every state change is fenced on
-- the lease owner, so a job never runs twice at once to completion.
CREATE TABLE generations (
    id TEXT PRIMARY KEY,
    key_name TEXT NOT NULL,
    model TEXT NOT NULL,
    status TEXT NOT NULL,
    spec TEXT NOT NULL,
    output TEXT,
    error TEXT,
    usage TEXT,
    created_at BIGINT NOT NULL,
    completed_at BIGINT,
    lease_owner TEXT,
    lease_until BIGINT,
    claims BIGINT NOT NULL DEFAULT 0,
    client_request_id TEXT
);
CREATE INDEX generations_runnable ON generations (status, lease_until, created_at);

-- Media a provider returned as bytes, served at
-- GET /v1/generations/{id}/media/{n} to the job's own key.
CREATE TABLE generation_media (
    generation_id TEXT NOT NULL,
    n BIGINT NOT NULL,
    content_type TEXT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (generation_id, n)
);

-- Accounting per modality: what was metered besides tokens (images, video
-- seconds, characters, audio seconds) and how many.
ALTER TABLE ledger ADD COLUMN unit TEXT;
ALTER TABLE ledger ADD COLUMN units DOUBLE PRECISION NOT NULL DEFAULT 0;
