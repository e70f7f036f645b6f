-- Background tasks (POST /tasks): their state and progress are persisted so a
-- client that reconnects, or a server that restarts, picks up where it was.
CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    status     TEXT NOT NULL CHECK (status IN ('pending', 'running', 'completed', 'failed')),
    progress   INTEGER NOT NULL DEFAULT 0 CHECK (progress BETWEEN 0 AND 100),
    -- JSON text: the job's result once completed.
    result     TEXT,
    error      TEXT,
    created_by BIGINT,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX tasks_status_idx ON tasks(status);
