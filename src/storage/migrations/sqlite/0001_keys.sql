-- Gateway keys minted by `switchyard keys create`. Only the SHA-256 digest
-- of a key is stored; the key itself is printed once and never kept.
CREATE TABLE keys (
    name TEXT PRIMARY KEY,
    digest TEXT NOT NULL UNIQUE,
    models TEXT NOT NULL,
    requests_per_minute INTEGER,
    tokens_per_minute INTEGER,
    budget_usd REAL,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
