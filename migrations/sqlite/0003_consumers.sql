-- Event consumers between services (SPEC §8): where each consumer is in a
-- stream, which events it has applied (so a redelivery changes nothing), and
-- the users service's per-user order statistics built from `order.created`.
CREATE TABLE event_offsets (
    consumer TEXT PRIMARY KEY,
    last_id  BIGINT NOT NULL
);

CREATE TABLE processed_events (
    consumer  TEXT NOT NULL,
    event_key TEXT NOT NULL,
    PRIMARY KEY (consumer, event_key)
);

CREATE TABLE user_order_stats (
    user_id BIGINT PRIMARY KEY,
    orders  BIGINT NOT NULL DEFAULT 0,
    total   REAL NOT NULL DEFAULT 0
);
