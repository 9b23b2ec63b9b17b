-- Flows (issue 7): stored flow documents and their runs.

CREATE TABLE flows (
    id         TEXT PRIMARY KEY,
    key_id     TEXT NOT NULL,
    name       TEXT,
    -- The document as sent (JSON or JSON5 text).
    document   TEXT NOT NULL,
    step_count BIGINT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE INDEX flows_key ON flows (key_id, created_at);

CREATE TABLE flow_runs (
    id               TEXT PRIMARY KEY,
    flow_id          TEXT NOT NULL,
    key_id           TEXT NOT NULL,
    -- pending, running, succeeded, failed, canceled (the record's status).
    status           TEXT NOT NULL,
    -- The flow's document when the run was created: the run resumes with
    -- it even if the flow is deleted.
    document         TEXT NOT NULL,
    -- The run record (easel_flow::FlowRun), rewritten at each checkpoint.
    record_json      TEXT NOT NULL,
    cancel_requested BIGINT NOT NULL DEFAULT 0,
    created_at       BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

CREATE INDEX flow_runs_flow ON flow_runs (flow_id, created_at);
CREATE INDEX flow_runs_status ON flow_runs (status);
