-- easel's job store. Times are milliseconds since the Unix epoch; money is
-- micro-USD; seeds (u64) are decimal text.

CREATE TABLE api_keys (
    id                  TEXT PRIMARY KEY,
    name                TEXT NOT NULL,
    prefix              TEXT NOT NULL,
    secret_hash         TEXT NOT NULL UNIQUE,
    credit_limit_micros INTEGER,
    created_at          INTEGER NOT NULL,
    revoked_at          INTEGER
);

CREATE TABLE generations (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT NOT NULL UNIQUE,
    key_id           TEXT NOT NULL,
    source           TEXT NOT NULL,
    status           TEXT NOT NULL,
    request_json     TEXT NOT NULL,
    primary_model    TEXT NOT NULL,
    inferences       INTEGER NOT NULL,
    images_total     INTEGER NOT NULL,
    price_micros     INTEGER NOT NULL,
    attempts         INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress_json    TEXT,
    error_json       TEXT,
    idempotency_key  TEXT,
    request_hash     TEXT,
    webhook_url      TEXT,
    webhook_events   TEXT,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    UNIQUE (key_id, idempotency_key)
);
CREATE INDEX generations_status ON generations (status, seq);
CREATE INDEX generations_key ON generations (key_id, seq);

CREATE TABLE generation_items (
    generation_id TEXT NOT NULL REFERENCES generations (id),
    idx           INTEGER NOT NULL,
    spec_json     TEXT NOT NULL,
    status        TEXT NOT NULL,
    result_json   TEXT,
    error_json    TEXT,
    PRIMARY KEY (generation_id, idx)
);

CREATE TABLE assets (
    id            TEXT PRIMARY KEY,
    key_id        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    hash          TEXT NOT NULL,
    extension     TEXT NOT NULL,
    file_name     TEXT NOT NULL,
    file_size     INTEGER NOT NULL,
    file_type     TEXT NOT NULL,
    width         INTEGER,
    height        INTEGER,
    seed          TEXT,
    generation_id TEXT,
    item_idx      INTEGER,
    image_idx     INTEGER,
    created_at    INTEGER NOT NULL
);
CREATE INDEX assets_generation ON assets (generation_id, item_idx, image_idx);
CREATE INDEX assets_hash ON assets (hash);
CREATE UNIQUE INDEX assets_output_slot ON assets (generation_id, item_idx, image_idx)
    WHERE kind = 'output';

CREATE TABLE trainings (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    name       TEXT NOT NULL,
    base_model TEXT NOT NULL,
    hash       TEXT NOT NULL,
    file_size  INTEGER NOT NULL,
    created_at INTEGER NOT NULL
);

CREATE TABLE inference_packs (
    id          TEXT PRIMARY KEY,
    key_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    body_json   TEXT NOT NULL,
    image_count INTEGER NOT NULL,
    created_at  INTEGER NOT NULL
);

CREATE TABLE ledger (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    key_id        TEXT NOT NULL,
    generation_id TEXT NOT NULL,
    kind          TEXT NOT NULL,
    inferences    INTEGER NOT NULL,
    amount_micros INTEGER NOT NULL,
    created_at    INTEGER NOT NULL
);
CREATE INDEX ledger_key ON ledger (key_id);

CREATE TABLE webhook_deliveries (
    seq             INTEGER PRIMARY KEY AUTOINCREMENT,
    id              TEXT NOT NULL UNIQUE,
    generation_id   TEXT NOT NULL,
    url             TEXT NOT NULL,
    event           TEXT NOT NULL,
    payload         TEXT NOT NULL,
    status          TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    max_attempts    INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL
);
CREATE INDEX webhook_due ON webhook_deliveries (status, next_attempt_at);
