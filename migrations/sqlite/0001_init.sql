-- The whole domain of SPEC §2 plus the event log (the outbox every real-time
-- surface reads). Kept in step with migrations/postgres/0001_init.sql: the same
-- tables, columns and constraint names, so one set of queries serves both.
--
-- Timestamps are RFC 3339 text written by prism (sqlx's encoding of
-- DateTime<Utc>), so they sort and compare correctly as strings.

CREATE TABLE users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT NOT NULL,
    email         TEXT NOT NULL,
    age           INTEGER,
    role          TEXT NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    -- NULL for users created without credentials (POST /users/, createUser):
    -- they exist in the domain but cannot log in.
    username      TEXT,
    password_hash TEXT,
    created_at    TEXT NOT NULL,
    CONSTRAINT users_email_key UNIQUE (email),
    CONSTRAINT users_username_key UNIQUE (username)
);

-- Friendship is symmetric; both directions are stored so a lookup is one index probe.
CREATE TABLE friendships (
    user_id   INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    friend_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, friend_id),
    CHECK (user_id <> friend_id)
);

CREATE TABLE posts (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    title      TEXT NOT NULL,
    content    TEXT NOT NULL,
    author_id  INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
CREATE INDEX posts_author_id_idx ON posts(author_id, id);

CREATE TABLE comments (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    content    TEXT NOT NULL,
    post_id    INTEGER NOT NULL REFERENCES posts(id) ON DELETE CASCADE,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    created_at TEXT NOT NULL
);
CREATE INDEX comments_post_id_idx ON comments(post_id, id);

CREATE TABLE messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    content    TEXT NOT NULL,
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    timestamp  TEXT NOT NULL
);

CREATE TABLE products (
    id             INTEGER PRIMARY KEY AUTOINCREMENT,
    name           TEXT NOT NULL,
    description    TEXT NOT NULL,
    price_amount   REAL NOT NULL CHECK (price_amount >= 0),
    price_currency TEXT NOT NULL,
    category       TEXT NOT NULL CHECK (category IN ('ELECTRONICS', 'CLOTHING', 'FOOD', 'BOOKS')),
    -- JSON text: a list of strings and a string-to-string map.
    tags           TEXT NOT NULL DEFAULT '[]',
    metadata       TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX products_category_idx ON products(category, id);

-- No foreign key to users: the orders microservice keeps orders in its own
-- database, where users live in another service. The domain checks the user.
CREATE TABLE orders (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id    INTEGER NOT NULL,
    total      REAL NOT NULL CHECK (total >= 0),
    status     TEXT NOT NULL CHECK (status IN ('pending', 'completed', 'cancelled')),
    created_at TEXT NOT NULL
);
CREATE INDEX orders_user_id_idx ON orders(user_id, id);

-- AUTOINCREMENT, not plain rowid: ids must never be reused after retention
-- deletes old events, or a resuming client would be handed a different event.
CREATE TABLE events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    event_type TEXT NOT NULL,
    payload    TEXT NOT NULL,
    created_at TEXT NOT NULL
);
CREATE INDEX events_created_at_idx ON events(created_at);

-- Small facts about the log itself, e.g. the highest id removed by retention.
CREATE TABLE prism_meta (
    key   TEXT PRIMARY KEY,
    value BIGINT NOT NULL
);
