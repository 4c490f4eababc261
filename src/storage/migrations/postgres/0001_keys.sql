-- Gateway keys minted by `switchyard keys create`. Only the SHA-256 digest
-- of a key is stored; the key itself is printed once and never kept.
CREATE TABLE keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL,
    requests_per_minute BIGINT,
    tokens_per_minute BIGINT,
    budget_usd DOUBLE PRECISION,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
