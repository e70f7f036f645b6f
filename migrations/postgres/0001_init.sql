-- The whole domain of SPEC §2 plus the event log (the outbox every real-time
-- surface reads). Kept in step with migrations/sqlite/0001_init.sql: the same
-- tables, columns and constraint names, so one set of queries serves both.

CREATE TABLE users (
    id            BIGSERIAL PRIMARY KEY,
    name          TEXT NOT NULL,
    email         TEXT NOT NULL,
    age           INTEGER,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    -- NULL for users created without credentials (POST /users/, createUser):
    -- they exist in the domain but cannot log in.
    username      TEXT,
    password_hash TEXT,
    created_at    TIMESTAMPTZ NOT NULL,
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_username_key UNIQUE (username)
);

-- Friendship is symmetric; both directions are stored so a lookup is one index probe.
CREATE TABLE friendships (
    user_id   BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    friend_id BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, friend_id),
    CHECK (user_id <> friend_id)
);

CREATE TABLE posts (
    id         BIGSERIAL PRIMARY KEY,
    title      TEXT NOT NULL,
    content    TEXT NOT NULL,
    author_id  BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL,
    updated_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX posts_author_id_idx ON posts(author_id, id);

CREATE TABLE comments (
    id         BIGSERIAL PRIMARY KEY,
    content    TEXT NOT NULL,
    post_id    BIGINT NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
    user_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX comments_post_id_idx ON comments(post_id, id);

CREATE TABLE messages (
    id         BIGSERIAL PRIMARY KEY,
    content    TEXT NOT NULL,
    user_id    BIGINT NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    timestamp  TIMESTAMPTZ NOT NULL
);

CREATE TABLE products (
    id             BIGSERIAL PRIMARY KEY,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL,
    price_amount   DOUBLE PRECISION NOT NULL CHECK (price_amount >= 0),
    price_currency TEXT NOT NULL,
    category       TEXT NOT NULL CHECK (category IN ('ELECTRONICS', 'CLOTHING', 'FOOD', 'BOOKS')),
    -- JSON text rather than JSONB: the same Rust decoding serves both databases,
    -- and prism never queries inside these values.
    tags           TEXT NOT NULL DEFAULT '[]',
    metadata       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX products_category_idx ON products(category, id);

-- No foreign key to users: the orders microservice keeps orders in its own
-- database, where users live in another service. The domain checks the user.
CREATE TABLE orders (
    id         BIGSERIAL PRIMARY KEY,
    user_id    BIGINT NOT NULL,
    total      DOUBLE PRECISION NOT NULL CHECK (total >= 0),
    status     TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'cancelled')),
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX orders_user_id_idx ON orders(user_id, id);

-- Event ids come from a sequence. A sequence alone would let id 11 commit
-- before id 10 (the outbox trap); prism's writers take a transaction-scoped
-- advisory lock before inserting an event, so ids become visible in order
-- (see src/events/mod.rs).
CREATE TABLE events (
    id         BIGSERIAL PRIMARY KEY,
    event_type TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL
);
CREATE INDEX events_created_at_idx ON events(created_at);

-- Small facts about the log itself, e.g. the highest id removed by retention.
CREATE TABLE prism_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
