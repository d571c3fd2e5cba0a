-- secureim SQLite schema, migration 0001: the schema of the first versioned release.
--
-- Applied by secureim.storage.sqlite_engine in one transaction with its schema_version row.
-- A database from before schema versions (no schema_version table) is brought here too: the
-- engine first adds the columns that older releases lacked (users.ticket_epoch,
-- message_queue.room_id and .kind: see BEFORE_0001_COLUMNS), then this script creates whatever
-- is missing (every statement is IF NOT EXISTS), so nothing that is there is touched.

CREATE TABLE IF NOT EXISTS users (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    username      TEXT NOT NULL UNIQUE,
    password_hash TEXT NOT NULL,
    created_at    REAL NOT NULL,
    identity_key  BLOB,
    ticket_epoch  INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS conversations (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    user_low         TEXT NOT NULL,
    user_high        TEXT NOT NULL,
    created_at       REAL NOT NULL,
    key_generated_at REAL,
    key_generation   INTEGER NOT NULL DEFAULT 0,
    UNIQUE (user_low, user_high)
);
CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
    username        TEXT NOT NULL,
    PRIMARY KEY (conversation_id, username)
);
CREATE TABLE IF NOT EXISTS login_failures (
    username     TEXT NOT NULL,
    source       TEXT NOT NULL,
    failures     INTEGER NOT NULL DEFAULT 0,
    locked_until REAL NOT NULL DEFAULT 0,
    updated_at   REAL NOT NULL DEFAULT 0,
    PRIMARY KEY (username, source)
);
CREATE TABLE IF NOT EXISTS account_state (
    username      TEXT NOT NULL PRIMARY KEY,
    last_login_at REAL
);
CREATE TABLE IF NOT EXISTS audit_log (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    event    TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    source   TEXT NOT NULL DEFAULT '',
    detail   TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS ix_audit_at ON audit_log (at);
CREATE INDEX IF NOT EXISTS ix_audit_user ON audit_log (username, at);
CREATE TABLE IF NOT EXISTS bans (
    kind       TEXT NOT NULL,
    target     TEXT NOT NULL,
    until      REAL NOT NULL DEFAULT 0,
    reason     TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    PRIMARY KEY (kind, target)
);
CREATE TABLE IF NOT EXISTS admin_actions (
    id       INTEGER PRIMARY KEY AUTOINCREMENT,
    at       REAL NOT NULL,
    action   TEXT NOT NULL,
    username TEXT NOT NULL DEFAULT '',
    reason   TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS live_sessions (
    node     TEXT NOT NULL,
    username TEXT NOT NULL,
    source   TEXT NOT NULL,
    since    REAL NOT NULL,
    PRIMARY KEY (node, username)
);
CREATE TABLE IF NOT EXISTS signed_prekeys (
    username   TEXT NOT NULL PRIMARY KEY,
    key_id     INTEGER NOT NULL,
    entry      BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS one_time_prekeys (
    username TEXT NOT NULL,
    key_id   INTEGER NOT NULL,
    entry    BLOB NOT NULL,
    PRIMARY KEY (username, key_id)
);
CREATE TABLE IF NOT EXISTS offline_keys (
    recipient       TEXT NOT NULL,
    conversation_id INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    sender          TEXT NOT NULL,
    wrapped         BLOB NOT NULL,
    created_at      REAL NOT NULL,
    PRIMARY KEY (recipient, conversation_id, generation)
);
CREATE TABLE IF NOT EXISTS message_queue (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    recipient       TEXT NOT NULL,
    sender          TEXT NOT NULL,
    conversation_id INTEGER NOT NULL,
    generation      INTEGER NOT NULL,
    msg_ref         BLOB NOT NULL,
    sender_identity BLOB NOT NULL,
    payload         BLOB NOT NULL,
    stored_at       REAL NOT NULL,
    room_id         INTEGER NOT NULL DEFAULT 0,
    kind            INTEGER NOT NULL DEFAULT 0,
    UNIQUE (recipient, sender, msg_ref)
);
CREATE INDEX IF NOT EXISTS ix_queue_recipient ON message_queue (recipient, id);
CREATE INDEX IF NOT EXISTS ix_queue_stored_at ON message_queue (stored_at);
-- AUTOINCREMENT: a closed room's id is never reused, so rows still queued for it never meet another room's keys.
CREATE TABLE IF NOT EXISTS rooms (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    name       TEXT NOT NULL UNIQUE,
    uid        BLOB NOT NULL,
    admin      TEXT NOT NULL,
    epoch      INTEGER NOT NULL,
    head       BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS ix_rooms_admin ON rooms (admin);
CREATE TABLE IF NOT EXISTS room_members (
    room_id      INTEGER NOT NULL,
    username     TEXT NOT NULL,
    joined_epoch INTEGER NOT NULL,
    PRIMARY KEY (room_id, username)
);
CREATE INDEX IF NOT EXISTS ix_room_members_username ON room_members (username);
CREATE TABLE IF NOT EXISTS room_changes (
    room_id     INTEGER NOT NULL,
    epoch       INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    change_blob BLOB NOT NULL,
    created_at  REAL NOT NULL,
    PRIMARY KEY (room_id, epoch)
);
CREATE TABLE IF NOT EXISTS room_keys (
    room_id    INTEGER NOT NULL,
    epoch      INTEGER NOT NULL,
    wrapped    BLOB NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (room_id, epoch)
);
CREATE INDEX IF NOT EXISTS ix_queue_room ON message_queue (room_id, generation);
