-- secureim MySQL/MariaDB schema and stored procedures, migration 0001: the schema of the first
-- versioned release (the top-level schema.sql of before schema versions, unchanged).
--
-- Every query the server makes on MySQL is one of the procedures below, called
-- with parameters (design 000: stored procedures keep data apart from SQL).
-- Live conversation keys are never stored: only ids, members and key-generation times; the KDC
-- key of an offline conversation waits sealed under the server's key (offline_keys).
-- Safe to run again (MySQL cannot roll DDL back, so every MySQL migration must be): tables are
-- created if missing, columns older releases lacked are added, procedures are replaced.  A
-- database from before schema versions is brought here by running it once more.

CREATE TABLE IF NOT EXISTS users (
    id            BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    username      VARCHAR(32)  NOT NULL,
    password_hash VARCHAR(100) NOT NULL,
    created_at    DATETIME(6)  NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    identity_key  VARBINARY(64) NULL,
    UNIQUE KEY uq_users_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS conversations (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    user_low         VARCHAR(32) NOT NULL,
    user_high        VARCHAR(32) NOT NULL,
    created_at       DATETIME(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    key_generated_at DATETIME(6) NULL,
    key_generation   INT UNSIGNED NOT NULL DEFAULT 0,
    UNIQUE KEY uq_conversations_pair (user_low, user_high)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS conversation_members (
    conversation_id BIGINT UNSIGNED NOT NULL,
    username        VARCHAR(32) NOT NULL,
    PRIMARY KEY (conversation_id, username),
    KEY ix_members_username (username),
    CONSTRAINT fk_members_conversation FOREIGN KEY (conversation_id)
        REFERENCES conversations (id) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Failed logins per (account, source address): the lockout applies to one source,
-- so nobody can lock a victim out from everywhere by guessing.
CREATE TABLE IF NOT EXISTS login_failures (
    username     VARCHAR(32) NOT NULL,
    source       VARCHAR(64) NOT NULL,
    failures     INT UNSIGNED NOT NULL DEFAULT 0,
    locked_until DOUBLE NOT NULL DEFAULT 0,
    updated_at   DOUBLE NOT NULL DEFAULT 0,
    PRIMARY KEY (username, source)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Operating the server (admin.py, moderation.py).  Times are Unix seconds (DOUBLE).
-- account_state: the last login.  (The ticket epoch, which reset-password and /passwd
-- raise to end every resumption ticket, is users.ticket_epoch.)
CREATE TABLE IF NOT EXISTS account_state (
    username      VARCHAR(32) NOT NULL PRIMARY KEY,
    last_login_at DOUBLE NULL
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- The audit log: who did what, when, from where.  Never a password, key or message.
CREATE TABLE IF NOT EXISTS audit_log (
    id       BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at       DOUBLE NOT NULL,
    event    VARCHAR(32) NOT NULL,
    username VARCHAR(32) NOT NULL DEFAULT '',
    source   VARCHAR(64) NOT NULL DEFAULT '',
    detail   VARCHAR(200) NOT NULL DEFAULT '',
    KEY ix_audit_at (at),
    KEY ix_audit_user (username, at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Bans of an account ('user') or of a network ('address', CIDR).  until = 0: no end.
CREATE TABLE IF NOT EXISTS bans (
    kind       VARCHAR(8)  NOT NULL,
    target     VARCHAR(64) NOT NULL,
    until      DOUBLE NOT NULL DEFAULT 0,
    reason     VARCHAR(200) NOT NULL DEFAULT '',
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (kind, target)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Actions for the running server(s), which poll this table every second.
CREATE TABLE IF NOT EXISTS admin_actions (
    id       BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    at       DOUBLE NOT NULL,
    action   VARCHAR(16) NOT NULL,
    username VARCHAR(32) NOT NULL DEFAULT '',
    reason   VARCHAR(200) NOT NULL DEFAULT '',
    KEY ix_actions_at (at)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin;

-- Who is connected to which node (rows of a node are cleared when it starts).
CREATE TABLE IF NOT EXISTS live_sessions (
    node     VARCHAR(64) NOT NULL,
    username VARCHAR(32) NOT NULL,
    source   VARCHAR(64) NOT NULL,
    since    DOUBLE NOT NULL,
    PRIMARY KEY (node, username)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Store and forward (docs/PROTOCOL.md section 15): public prekeys, the KDC keys of offline
-- conversations sealed under the server's key, and end-to-end ciphertext waiting for its
-- recipient.  Nothing here opens a message: that needs the recipient's private prekeys.
CREATE TABLE IF NOT EXISTS signed_prekeys (
    username   VARCHAR(32) NOT NULL PRIMARY KEY,
    key_id     INT UNSIGNED NOT NULL,
    entry      VARBINARY(1400) NOT NULL,
    created_at DOUBLE NOT NULL
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS one_time_prekeys (
    username VARCHAR(32) NOT NULL,
    key_id   INT UNSIGNED NOT NULL,
    entry    VARBINARY(128) NOT NULL,
    PRIMARY KEY (username, key_id)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS offline_keys (
    recipient       VARCHAR(32) NOT NULL,
    conversation_id BIGINT UNSIGNED NOT NULL,
    generation      INT UNSIGNED NOT NULL,
    sender          VARCHAR(32) NOT NULL,
    wrapped         VARBINARY(128) NOT NULL,
    created_at      DOUBLE NOT NULL,
    PRIMARY KEY (recipient, conversation_id, generation)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS message_queue (
    id              BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    recipient       VARCHAR(32) NOT NULL,
    sender          VARCHAR(32) NOT NULL,
    conversation_id BIGINT UNSIGNED NOT NULL,
    generation      INT UNSIGNED NOT NULL,
    msg_ref         VARBINARY(16) NOT NULL,
    sender_identity VARBINARY(32) NOT NULL,
    payload         MEDIUMBLOB NOT NULL,
    stored_at       DOUBLE NOT NULL,
    -- kind 0: a one-to-one message; 1: a room message; 2: a room membership change.  A room row has
    -- conversation_id 0 and the room's epoch as its generation.  (Older databases: sp_add_queue_rooms.)
    room_id         BIGINT UNSIGNED NOT NULL DEFAULT 0,
    kind            TINYINT UNSIGNED NOT NULL DEFAULT 0,
    UNIQUE KEY uq_queue_ref (recipient, sender, msg_ref),
    KEY ix_queue_recipient (recipient, id),
    KEY ix_queue_stored_at (stored_at),
    KEY ix_queue_room (room_id, generation)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

-- Group rooms (rooms.py, docs/PROTOCOL.md section 16).  The server keeps routing, the signed
-- membership log (opaque: the clients verify it) and, per epoch, the room's KDC key sealed under
-- the server's key.  AUTO_INCREMENT ids are never reused, so rows still queued for a closed room
-- never meet another room's keys.
CREATE TABLE IF NOT EXISTS rooms (
    id         BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    name       VARCHAR(33) NOT NULL,
    uid        VARBINARY(16) NOT NULL,
    admin      VARCHAR(32) NOT NULL,
    epoch      INT UNSIGNED NOT NULL,
    head       VARBINARY(32) NOT NULL,
    created_at DOUBLE NOT NULL,
    UNIQUE KEY uq_rooms_name (name),
    KEY ix_rooms_admin (admin)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS room_members (
    room_id      BIGINT UNSIGNED NOT NULL,
    username     VARCHAR(32) NOT NULL,
    joined_epoch INT UNSIGNED NOT NULL,
    PRIMARY KEY (room_id, username),
    KEY ix_room_members_username (username)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS room_changes (
    room_id     BIGINT UNSIGNED NOT NULL,
    epoch       INT UNSIGNED NOT NULL,
    actor       VARCHAR(32) NOT NULL,
    change_blob MEDIUMBLOB NOT NULL,
    created_at  DOUBLE NOT NULL,
    PRIMARY KEY (room_id, epoch)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

CREATE TABLE IF NOT EXISTS room_keys (
    room_id    BIGINT UNSIGNED NOT NULL,
    epoch      INT UNSIGNED NOT NULL,
    wrapped    VARBINARY(128) NOT NULL,
    created_at DOUBLE NOT NULL,
    PRIMARY KEY (room_id, epoch)
) ENGINE=InnoDB DEFAULT CHARSET=ascii COLLATE=ascii_bin;

DELIMITER //

DROP PROCEDURE IF EXISTS sp_create_user //
CREATE PROCEDURE sp_create_user(IN p_username VARCHAR(32), IN p_hash VARCHAR(100),
                                IN p_identity VARBINARY(64))
BEGIN
    -- Inserts only if the name is free: no account has it, and no deleted account still listed in a room
    -- (a ghost, until the room's admin removes it with a signed change: a newcomer under its name would get
    -- the copies and room keys meant for it).  One statement: the look at room_members (a locking read
    -- inside INSERT ... SELECT) and the insert are atomic.  Returns 1 if created, 0 if taken.
    INSERT IGNORE INTO users (username, password_hash, identity_key)
    SELECT p_username, p_hash, p_identity FROM DUAL
     WHERE NOT EXISTS (SELECT 1 FROM room_members WHERE username = p_username);
    SELECT ROW_COUNT() AS created;
END //

DROP PROCEDURE IF EXISTS sp_get_identity_key //
CREATE PROCEDURE sp_get_identity_key(IN p_username VARCHAR(32))
BEGIN
    SELECT identity_key FROM users WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_set_identity_key //
CREATE PROCEDURE sp_set_identity_key(IN p_username VARCHAR(32), IN p_identity VARBINARY(64))
BEGIN
    UPDATE users SET identity_key = p_identity WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_get_password_hash //
CREATE PROCEDURE sp_get_password_hash(IN p_username VARCHAR(32))
BEGIN
    SELECT password_hash FROM users WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_count_users //
CREATE PROCEDURE sp_count_users()
BEGIN
    SELECT COUNT(*) AS n FROM users;
END //

DROP PROCEDURE IF EXISTS sp_open_conversation //
CREATE PROCEDURE sp_open_conversation(IN p_low VARCHAR(32), IN p_high VARCHAR(32))
BEGIN
    DECLARE v_id BIGINT UNSIGNED;
    INSERT IGNORE INTO conversations (user_low, user_high) VALUES (p_low, p_high);
    SELECT id INTO v_id FROM conversations WHERE user_low = p_low AND user_high = p_high;
    INSERT IGNORE INTO conversation_members (conversation_id, username) VALUES (v_id, p_low), (v_id, p_high);
    SELECT v_id AS id;
END //

DROP PROCEDURE IF EXISTS sp_record_key_generation //
CREATE PROCEDURE sp_record_key_generation(IN p_conversation_id BIGINT UNSIGNED)
BEGIN
    UPDATE conversations
       SET key_generation = key_generation + 1, key_generated_at = CURRENT_TIMESTAMP(6)
     WHERE id = p_conversation_id;
    SELECT key_generation FROM conversations WHERE id = p_conversation_id;
END //

DROP PROCEDURE IF EXISTS sp_get_conversation //
CREATE PROCEDURE sp_get_conversation(IN p_conversation_id BIGINT UNSIGNED)
BEGIN
    SELECT id, user_low, user_high, key_generation,
           UNIX_TIMESTAMP(key_generated_at) AS key_generated_at
      FROM conversations WHERE id = p_conversation_id;
END //

DROP PROCEDURE IF EXISTS sp_get_login_failures //
CREATE PROCEDURE sp_get_login_failures(IN p_username VARCHAR(32), IN p_source VARCHAR(64))
BEGIN
    SELECT failures, locked_until FROM login_failures
     WHERE username = p_username AND source = p_source;
END //

DROP PROCEDURE IF EXISTS sp_record_login_failure //
CREATE PROCEDURE sp_record_login_failure(IN p_username VARCHAR(32), IN p_source VARCHAR(64),
                                         IN p_now DOUBLE, IN p_max_failures INT, IN p_lock_s DOUBLE)
BEGIN
    -- A failure after an expired lock starts a fresh count.
    INSERT INTO login_failures (username, source, failures, locked_until, updated_at)
         VALUES (p_username, p_source, 1, 0, p_now)
    ON DUPLICATE KEY UPDATE
         failures = IF(locked_until > 0 AND locked_until <= p_now, 1, failures + 1),
         locked_until = IF(locked_until > 0 AND locked_until <= p_now, 0, locked_until),
         updated_at = p_now;
    UPDATE login_failures
       SET locked_until = p_now + p_lock_s
     WHERE username = p_username AND source = p_source
       AND failures >= p_max_failures AND locked_until <= p_now;
    SELECT failures, locked_until FROM login_failures
     WHERE username = p_username AND source = p_source;
END //

DROP PROCEDURE IF EXISTS sp_clear_login_failures //
CREATE PROCEDURE sp_clear_login_failures(IN p_username VARCHAR(32), IN p_source VARCHAR(64))
BEGIN
    DELETE FROM login_failures WHERE username = p_username AND source = p_source;
END //

-- Password changes (docs/PROTOCOL.md section 13): each account has a ticket epoch;
-- a resumption ticket carries the epoch it was issued under, and a change increments it.
DROP PROCEDURE IF EXISTS sp_add_ticket_epoch //
CREATE PROCEDURE sp_add_ticket_epoch()
BEGIN
    -- Databases from before password changes get the column (MySQL 8 has no ADD COLUMN IF NOT EXISTS).
    IF NOT EXISTS (SELECT 1 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()
                   AND TABLE_NAME = 'users' AND COLUMN_NAME = 'ticket_epoch') THEN
        ALTER TABLE users ADD COLUMN ticket_epoch INT UNSIGNED NOT NULL DEFAULT 0;
    END IF;
END //
CALL sp_add_ticket_epoch() //

DROP PROCEDURE IF EXISTS sp_get_ticket_epoch //
CREATE PROCEDURE sp_get_ticket_epoch(IN p_username VARCHAR(32))
BEGIN
    SELECT ticket_epoch FROM users WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_change_password //
CREATE PROCEDURE sp_change_password(IN p_username VARCHAR(32), IN p_hash VARCHAR(100))
BEGIN
    UPDATE users SET password_hash = p_hash, ticket_epoch = ticket_epoch + 1 WHERE username = p_username;
    SELECT ticket_epoch FROM users WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_audit //
CREATE PROCEDURE sp_audit(IN p_at DOUBLE, IN p_event VARCHAR(32), IN p_username VARCHAR(32),
                          IN p_source VARCHAR(64), IN p_detail VARCHAR(200))
BEGIN
    INSERT INTO audit_log (at, event, username, source, detail)
         VALUES (p_at, p_event, p_username, p_source, p_detail);
END //

DROP PROCEDURE IF EXISTS sp_audit_events //
CREATE PROCEDURE sp_audit_events(IN p_username VARCHAR(32), IN p_since DOUBLE, IN p_limit INT)
BEGIN
    SELECT at, event, username, source, detail FROM audit_log
     WHERE at >= p_since AND (p_username IS NULL OR username = p_username)
     ORDER BY at, id LIMIT p_limit;
END //

DROP PROCEDURE IF EXISTS sp_prune_audit //
CREATE PROCEDURE sp_prune_audit(IN p_before DOUBLE)
BEGIN
    DELETE FROM audit_log WHERE at < p_before;
    SELECT ROW_COUNT() AS n;
END //

DROP PROCEDURE IF EXISTS sp_set_ban //
CREATE PROCEDURE sp_set_ban(IN p_kind VARCHAR(8), IN p_target VARCHAR(64), IN p_until DOUBLE,
                            IN p_reason VARCHAR(200), IN p_now DOUBLE)
BEGIN
    INSERT INTO bans (kind, target, until, reason, created_at) VALUES (p_kind, p_target, p_until, p_reason, p_now)
    ON DUPLICATE KEY UPDATE until = p_until, reason = p_reason, created_at = p_now;
END //

DROP PROCEDURE IF EXISTS sp_remove_ban //
CREATE PROCEDURE sp_remove_ban(IN p_kind VARCHAR(8), IN p_target VARCHAR(64))
BEGIN
    DELETE FROM bans WHERE kind = p_kind AND target = p_target;
    SELECT ROW_COUNT() AS n;
END //

DROP PROCEDURE IF EXISTS sp_active_bans //
CREATE PROCEDURE sp_active_bans(IN p_now DOUBLE, IN p_kind VARCHAR(8))
BEGIN
    SELECT kind, target, until, reason FROM bans
     WHERE (until = 0 OR until > p_now) AND (p_kind IS NULL OR kind = p_kind)
     ORDER BY kind, target;
END //

DROP PROCEDURE IF EXISTS sp_user_ban //
CREATE PROCEDURE sp_user_ban(IN p_username VARCHAR(32), IN p_now DOUBLE)
BEGIN
    SELECT kind, target, until, reason FROM bans
     WHERE kind = 'user' AND target = p_username AND (until = 0 OR until > p_now);
END //

DROP PROCEDURE IF EXISTS sp_post_admin_action //
CREATE PROCEDURE sp_post_admin_action(IN p_now DOUBLE, IN p_expired DOUBLE, IN p_action VARCHAR(16),
                                      IN p_username VARCHAR(32), IN p_reason VARCHAR(200))
BEGIN
    DELETE FROM admin_actions WHERE at < p_expired;
    INSERT INTO admin_actions (at, action, username, reason) VALUES (p_now, p_action, p_username, p_reason);
    SELECT LAST_INSERT_ID() AS id;
END //

DROP PROCEDURE IF EXISTS sp_admin_actions_after //
CREATE PROCEDURE sp_admin_actions_after(IN p_last_id BIGINT UNSIGNED)
BEGIN
    SELECT id, action, username, reason FROM admin_actions WHERE id > p_last_id ORDER BY id LIMIT 1000;
END //

DROP PROCEDURE IF EXISTS sp_last_admin_action_id //
CREATE PROCEDURE sp_last_admin_action_id()
BEGIN
    SELECT COALESCE(MAX(id), 0) AS id FROM admin_actions;
END //

-- Raising the epoch alone (an administrator's reset-password); sp_get_ticket_epoch reads it.
DROP PROCEDURE IF EXISTS sp_bump_ticket_epoch //
CREATE PROCEDURE sp_bump_ticket_epoch(IN p_username VARCHAR(32))
BEGIN
    UPDATE users SET ticket_epoch = ticket_epoch + 1 WHERE username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_set_password_hash //
CREATE PROCEDURE sp_set_password_hash(IN p_username VARCHAR(32), IN p_hash VARCHAR(100))
BEGIN
    UPDATE users SET password_hash = p_hash WHERE username = p_username;
    SELECT ROW_COUNT() AS n;
END //

DROP PROCEDURE IF EXISTS sp_record_login //
CREATE PROCEDURE sp_record_login(IN p_username VARCHAR(32), IN p_now DOUBLE)
BEGIN
    INSERT INTO account_state (username, last_login_at) VALUES (p_username, p_now)
    ON DUPLICATE KEY UPDATE last_login_at = p_now;
END //

DROP PROCEDURE IF EXISTS sp_list_users //
CREATE PROCEDURE sp_list_users(IN p_now DOUBLE)
BEGIN
    SELECT u.username, UNIX_TIMESTAMP(u.created_at) AS created_at, a.last_login_at,
           EXISTS (SELECT 1 FROM login_failures f WHERE f.username = u.username AND f.locked_until > p_now) AS locked
      FROM users u LEFT JOIN account_state a ON a.username = u.username
     ORDER BY u.username;
END //

DROP PROCEDURE IF EXISTS sp_delete_user //
CREATE PROCEDURE sp_delete_user(IN p_username VARCHAR(32))
BEGIN
    DECLARE v_gone INT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    DELETE FROM users WHERE username = p_username;
    SET v_gone = ROW_COUNT();
    DELETE FROM conversations WHERE user_low = p_username OR user_high = p_username;
    DELETE FROM conversation_members WHERE username = p_username;
    DELETE FROM account_state WHERE username = p_username;
    DELETE FROM login_failures WHERE username = p_username;
    DELETE FROM live_sessions WHERE username = p_username;
    DELETE FROM signed_prekeys WHERE username = p_username;
    DELETE FROM one_time_prekeys WHERE username = p_username;
    DELETE FROM offline_keys WHERE recipient = p_username OR sender = p_username;
    -- Everything queued for it, and all it sent but its room changes queued for others (each is a link in
    -- every member's chain).  Rooms are not edited: a membership change is signed by a client, never made
    -- by the server.  The account stays listed where it was a member (a ghost, whose name sp_create_user
    -- refuses, until the admin removes it), and the rooms it administers stay with their members, changes
    -- and keys.
    DELETE FROM message_queue WHERE recipient = p_username OR (sender = p_username AND kind <> 2);
    COMMIT;
    SELECT v_gone AS deleted;
END //

DROP PROCEDURE IF EXISTS sp_list_lockouts //
CREATE PROCEDURE sp_list_lockouts(IN p_now DOUBLE)
BEGIN
    SELECT username, source, failures, locked_until FROM login_failures
     WHERE locked_until > p_now ORDER BY username, source;
END //

DROP PROCEDURE IF EXISTS sp_clear_all_login_failures //
CREATE PROCEDURE sp_clear_all_login_failures(IN p_username VARCHAR(32))
BEGIN
    DELETE FROM login_failures WHERE username = p_username;
    SELECT ROW_COUNT() AS n;
END //

DROP PROCEDURE IF EXISTS sp_session_started //
CREATE PROCEDURE sp_session_started(IN p_node VARCHAR(64), IN p_username VARCHAR(32),
                                    IN p_source VARCHAR(64), IN p_since DOUBLE)
BEGIN
    INSERT INTO live_sessions (node, username, source, since) VALUES (p_node, p_username, p_source, p_since)
    ON DUPLICATE KEY UPDATE source = p_source, since = p_since;
END //

DROP PROCEDURE IF EXISTS sp_record_session_start //
CREATE PROCEDURE sp_record_session_start(IN p_node VARCHAR(64), IN p_username VARCHAR(32), IN p_source VARCHAR(64),
                                         IN p_now DOUBLE, IN p_event VARCHAR(32))
BEGIN
    -- A login's bookkeeping at once: last login, the session row, the audit row.
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    INSERT INTO account_state (username, last_login_at) VALUES (p_username, p_now)
    ON DUPLICATE KEY UPDATE last_login_at = p_now;
    INSERT INTO live_sessions (node, username, source, since) VALUES (p_node, p_username, p_source, p_now)
    ON DUPLICATE KEY UPDATE source = p_source, since = p_now;
    INSERT INTO audit_log (at, event, username, source, detail) VALUES (p_now, p_event, p_username, p_source, '');
    COMMIT;
END //

DROP PROCEDURE IF EXISTS sp_session_ended //
CREATE PROCEDURE sp_session_ended(IN p_node VARCHAR(64), IN p_username VARCHAR(32))
BEGIN
    DELETE FROM live_sessions WHERE node = p_node AND username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_clear_sessions //
CREATE PROCEDURE sp_clear_sessions(IN p_node VARCHAR(64))
BEGIN
    DELETE FROM live_sessions WHERE node = p_node;
END //

DROP PROCEDURE IF EXISTS sp_list_sessions //
CREATE PROCEDURE sp_list_sessions()
BEGIN
    SELECT node, username, source, since FROM live_sessions ORDER BY username, node;
END //

DROP PROCEDURE IF EXISTS sp_set_signed_prekey //
CREATE PROCEDURE sp_set_signed_prekey(IN p_username VARCHAR(32), IN p_key_id INT UNSIGNED,
                                      IN p_entry VARBINARY(1400), IN p_now DOUBLE)
BEGIN
    INSERT INTO signed_prekeys (username, key_id, entry, created_at) VALUES (p_username, p_key_id, p_entry, p_now)
    ON DUPLICATE KEY UPDATE key_id = p_key_id, entry = p_entry, created_at = p_now;
END //

DROP PROCEDURE IF EXISTS sp_add_one_time_prekey //
CREATE PROCEDURE sp_add_one_time_prekey(IN p_username VARCHAR(32), IN p_key_id INT UNSIGNED,
                                        IN p_entry VARBINARY(128), IN p_max_kept INT)
BEGIN
    -- One key; refused (silently) once the user has p_max_kept.  Returns the count.
    DECLARE v_count INT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    SELECT COUNT(*) INTO v_count FROM one_time_prekeys WHERE username = p_username FOR UPDATE;
    IF v_count < p_max_kept THEN
        INSERT IGNORE INTO one_time_prekeys (username, key_id, entry) VALUES (p_username, p_key_id, p_entry);
        SET v_count = v_count + ROW_COUNT();
    END IF;
    COMMIT;
    SELECT v_count AS n;
END //

DROP PROCEDURE IF EXISTS sp_prekey_status //
CREATE PROCEDURE sp_prekey_status(IN p_username VARCHAR(32))
BEGIN
    SELECT (SELECT COUNT(*) FROM one_time_prekeys WHERE username = p_username) AS one_time_left,
           (SELECT key_id FROM signed_prekeys WHERE username = p_username) AS signed_id,
           (SELECT created_at FROM signed_prekeys WHERE username = p_username) AS signed_at;
END //

DROP PROCEDURE IF EXISTS sp_take_prekey_bundle //
CREATE PROCEDURE sp_take_prekey_bundle(IN p_username VARCHAR(32))
BEGIN
    -- The signed prekey and one one-time prekey, which is deleted: no two senders share one.
    DECLARE v_key_id INT UNSIGNED DEFAULT NULL;
    DECLARE v_entry VARBINARY(128) DEFAULT NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    SELECT key_id, entry INTO v_key_id, v_entry FROM one_time_prekeys
     WHERE username = p_username ORDER BY key_id LIMIT 1 FOR UPDATE;
    IF v_key_id IS NOT NULL THEN
        DELETE FROM one_time_prekeys WHERE username = p_username AND key_id = v_key_id;
    END IF;
    COMMIT;
    SELECT (SELECT entry FROM signed_prekeys WHERE username = p_username) AS signed_entry, v_entry AS one_time_entry;
END //

DROP PROCEDURE IF EXISTS sp_clear_prekeys //
CREATE PROCEDURE sp_clear_prekeys(IN p_username VARCHAR(32), IN p_signed TINYINT)
BEGIN
    DELETE FROM one_time_prekeys WHERE username = p_username;
    IF p_signed THEN
        DELETE FROM signed_prekeys WHERE username = p_username;
    END IF;
END //

-- Group rooms: databases from before them get the queue's room columns and index
-- (MySQL 8 has no ADD COLUMN IF NOT EXISTS).
DROP PROCEDURE IF EXISTS sp_add_queue_rooms //
CREATE PROCEDURE sp_add_queue_rooms()
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()
                   AND TABLE_NAME = 'message_queue' AND COLUMN_NAME = 'room_id') THEN
        ALTER TABLE message_queue ADD COLUMN room_id BIGINT UNSIGNED NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = DATABASE()
                   AND TABLE_NAME = 'message_queue' AND COLUMN_NAME = 'kind') THEN
        ALTER TABLE message_queue ADD COLUMN kind TINYINT UNSIGNED NOT NULL DEFAULT 0;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE()
                   AND TABLE_NAME = 'message_queue' AND INDEX_NAME = 'ix_queue_room') THEN
        ALTER TABLE message_queue ADD KEY ix_queue_room (room_id, generation);
    END IF;
END //
CALL sp_add_queue_rooms() //

DROP PROCEDURE IF EXISTS sp_put_offline_key //
CREATE PROCEDURE sp_put_offline_key(IN p_recipient VARCHAR(32), IN p_conversation_id BIGINT UNSIGNED,
                                    IN p_generation INT UNSIGNED, IN p_sender VARCHAR(32),
                                    IN p_wrapped VARBINARY(128), IN p_now DOUBLE)
BEGIN
    REPLACE INTO offline_keys (recipient, conversation_id, generation, sender, wrapped, created_at)
    VALUES (p_recipient, p_conversation_id, p_generation, p_sender, p_wrapped, p_now);
END //

DROP PROCEDURE IF EXISTS sp_enqueue //
CREATE PROCEDURE sp_enqueue(IN p_recipient VARCHAR(32), IN p_sender VARCHAR(32), IN p_conversation_id BIGINT UNSIGNED,
                            IN p_generation INT UNSIGNED, IN p_msg_ref VARBINARY(16), IN p_identity VARBINARY(32),
                            IN p_payload MEDIUMBLOB, IN p_now DOUBLE, IN p_max_messages INT, IN p_max_bytes BIGINT)
proc: BEGIN
    -- Stores one message unless a bound says no; never touches what is already stored.
    -- Returns (status, id): stored, duplicate (the same reference again), full_messages,
    -- full_bytes or no_key (no offline key for that generation from that sender).
    DECLARE v_id BIGINT UNSIGNED DEFAULT NULL;
    DECLARE v_count INT DEFAULT 0;
    DECLARE v_bytes BIGINT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    -- One enqueue per recipient at a time: the recipient's user row is the lock.
    SELECT id INTO v_id FROM users WHERE username = p_recipient FOR UPDATE;
    SET v_id = NULL;
    SELECT id INTO v_id FROM message_queue
     WHERE recipient = p_recipient AND sender = p_sender AND msg_ref = p_msg_ref;
    IF v_id IS NOT NULL THEN
        COMMIT;
        SELECT 'duplicate' AS status, v_id AS id;
        LEAVE proc;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM offline_keys WHERE recipient = p_recipient AND conversation_id = p_conversation_id
                   AND generation = p_generation AND sender = p_sender) THEN
        COMMIT;
        SELECT 'no_key' AS status, 0 AS id;
        LEAVE proc;
    END IF;
    SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) INTO v_count, v_bytes
      FROM message_queue WHERE recipient = p_recipient;
    IF v_count >= p_max_messages THEN
        COMMIT;
        SELECT 'full_messages' AS status, 0 AS id;
        LEAVE proc;
    END IF;
    IF v_bytes + LENGTH(p_payload) > p_max_bytes THEN
        COMMIT;
        SELECT 'full_bytes' AS status, 0 AS id;
        LEAVE proc;
    END IF;
    INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, sender_identity, payload,
                               stored_at)
    VALUES (p_recipient, p_sender, p_conversation_id, p_generation, p_msg_ref, p_identity, p_payload, p_now);
    SET v_id = LAST_INSERT_ID();
    COMMIT;
    SELECT 'stored' AS status, v_id AS id;
END //

DROP PROCEDURE IF EXISTS sp_queued_for //
CREATE PROCEDURE sp_queued_for(IN p_recipient VARCHAR(32), IN p_after_id BIGINT UNSIGNED, IN p_limit INT)
BEGIN
    -- Pair and room rows in one id order.  A pair row's key is its offline key; a room row's is the
    -- room key of its epoch, and a change row's only for a member who joined by then: the change that
    -- removed someone reaches them without the key of the epoch they are no longer in.
    SELECT q.id, q.recipient, q.sender, q.conversation_id, q.generation, q.msg_ref, q.sender_identity, q.payload,
           q.stored_at, IF(q.kind = 0, k.wrapped, r.wrapped) AS wrapped, q.room_id, q.kind
      FROM message_queue q
      LEFT JOIN offline_keys k
        ON q.kind = 0 AND k.recipient = q.recipient AND k.conversation_id = q.conversation_id
       AND k.generation = q.generation
      LEFT JOIN room_keys r
        ON q.kind <> 0 AND r.room_id = q.room_id AND r.epoch = q.generation
       AND (q.kind = 1 OR EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = q.room_id
                                  AND m.username = q.recipient AND m.joined_epoch <= q.generation))
     WHERE q.recipient = p_recipient AND q.id > p_after_id
     ORDER BY q.id LIMIT p_limit;
END //

DROP PROCEDURE IF EXISTS sp_ack_queued //
CREATE PROCEDURE sp_ack_queued(IN p_recipient VARCHAR(32), IN p_id BIGINT UNSIGNED, IN p_key_before DOUBLE)
BEGIN
    DECLARE v_cid BIGINT UNSIGNED DEFAULT NULL;
    DECLARE v_gen INT UNSIGNED DEFAULT NULL;
    DECLARE v_kind TINYINT UNSIGNED DEFAULT NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    SELECT conversation_id, generation, kind INTO v_cid, v_gen, v_kind FROM message_queue
     WHERE id = p_id AND recipient = p_recipient FOR UPDATE;
    IF v_cid IS NOT NULL THEN
        DELETE FROM message_queue WHERE id = p_id;
        -- A room key is the room's, not this recipient's: sp_expire_queue decides when it goes.
        IF v_kind = 0 THEN
            DELETE FROM offline_keys WHERE recipient = p_recipient AND conversation_id = v_cid AND generation = v_gen
               AND created_at < p_key_before
               AND NOT EXISTS (SELECT 1 FROM message_queue WHERE recipient = p_recipient AND conversation_id = v_cid
                               AND generation = v_gen AND kind = 0);
        END IF;
    END IF;
    COMMIT;
    SELECT v_cid IS NOT NULL AS acked;
END //

DROP PROCEDURE IF EXISTS sp_expire_queue //
CREATE PROCEDURE sp_expire_queue(IN p_before DOUBLE)
BEGIN
    -- Change rows (kind 2) never expire: a member must not miss a change.  A room key goes once it is
    -- old, of an epoch past (or of a room gone: closed rooms keep their keys until here), and no queued
    -- row needs it: no room message of that epoch, and no change row that sp_queued_for would hand it with.
    DECLARE v_gone INT DEFAULT 0;
    DELETE FROM message_queue WHERE stored_at < p_before AND kind <> 2;
    SET v_gone = ROW_COUNT();
    DELETE k FROM offline_keys k WHERE k.created_at < p_before AND NOT EXISTS (
        SELECT 1 FROM message_queue q WHERE q.recipient = k.recipient AND q.conversation_id = k.conversation_id
           AND q.generation = k.generation AND q.kind = 0);
    DELETE k FROM room_keys k WHERE k.created_at < p_before
       AND NOT EXISTS (SELECT 1 FROM rooms r WHERE r.id = k.room_id AND r.epoch <= k.epoch)
       AND NOT EXISTS (SELECT 1 FROM message_queue q WHERE q.room_id = k.room_id AND q.generation = k.epoch
                          AND (q.kind = 1 OR (q.kind = 2 AND EXISTS (
                              SELECT 1 FROM room_members m WHERE m.room_id = q.room_id AND m.username = q.recipient
                                 AND m.joined_epoch <= q.generation))));
    SELECT v_gone AS n;
END //

-- Group rooms (rooms.py).  Refusals answer a code (database._ROOM_REFUSALS) with nothing changed.
DROP PROCEDURE IF EXISTS sp_create_room //
CREATE PROCEDURE sp_create_room(IN p_name VARCHAR(33), IN p_uid VARBINARY(16), IN p_admin VARCHAR(32),
                                IN p_head VARBINARY(32), IN p_change MEDIUMBLOB, IN p_wrapped VARBINARY(128),
                                IN p_msg_ref VARBINARY(16), IN p_identity VARBINARY(32), IN p_now DOUBLE)
proc: BEGIN
    -- Returns (status, id): ok and the new room's id, taken, or ref_used.
    DECLARE v_id BIGINT UNSIGNED DEFAULT NULL;
    DECLARE v_taken TINYINT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    -- The unique name decides a race: the second insert waits for the first and then finds the name taken
    -- (a look before the insert would leave both waiting on each other's gap lock).
    BEGIN
        DECLARE EXIT HANDLER FOR 1062 SET v_taken = 1;
        INSERT INTO rooms (name, uid, admin, epoch, head, created_at)
        VALUES (p_name, p_uid, p_admin, 1, p_head, p_now);
    END;
    IF v_taken THEN
        ROLLBACK;
        SELECT 'taken' AS status, 0 AS id;
        LEAVE proc;
    END IF;
    SET v_id = LAST_INSERT_ID();
    IF EXISTS (SELECT 1 FROM message_queue WHERE recipient = p_admin AND sender = p_admin
               AND msg_ref = p_msg_ref) THEN
        ROLLBACK;
        SELECT 'ref_used' AS status, 0 AS id;
        LEAVE proc;
    END IF;
    INSERT INTO room_members (room_id, username, joined_epoch) VALUES (v_id, p_admin, 1);
    INSERT INTO room_changes (room_id, epoch, actor, change_blob, created_at)
    VALUES (v_id, 1, p_admin, p_change, p_now);
    INSERT INTO room_keys (room_id, epoch, wrapped, created_at) VALUES (v_id, 1, p_wrapped, p_now);
    INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, sender_identity, payload,
                               stored_at, room_id, kind)
    VALUES (p_admin, p_admin, 0, 1, p_msg_ref, p_identity, p_change, p_now, v_id, 2);
    COMMIT;
    SELECT 'ok' AS status, v_id AS id;
END //

DROP PROCEDURE IF EXISTS sp_get_room //
CREATE PROCEDURE sp_get_room(IN p_name VARCHAR(33))
BEGIN
    -- One row per member.
    SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username
      FROM rooms r LEFT JOIN room_members m ON m.room_id = r.id
     WHERE r.name = p_name;
END //

DROP PROCEDURE IF EXISTS sp_get_room_by_id //
CREATE PROCEDURE sp_get_room_by_id(IN p_room_id BIGINT UNSIGNED)
BEGIN
    SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, m.username
      FROM rooms r LEFT JOIN room_members m ON m.room_id = r.id
     WHERE r.id = p_room_id;
END //

DROP PROCEDURE IF EXISTS sp_rooms_of //
CREATE PROCEDURE sp_rooms_of(IN p_username VARCHAR(32))
BEGIN
    -- One row per (room of the user, member of that room).
    SELECT r.id, r.name, r.uid, r.admin, r.epoch, r.head, all_m.username
      FROM room_members me
      JOIN rooms r ON r.id = me.room_id
      JOIN room_members all_m ON all_m.room_id = r.id
     WHERE me.username = p_username;
END //

DROP PROCEDURE IF EXISTS sp_change_room //
CREATE PROCEDURE sp_change_room(IN p_room_id BIGINT UNSIGNED, IN p_expected INT UNSIGNED, IN p_head VARBINARY(32),
                                IN p_add VARCHAR(32), IN p_remove VARCHAR(32), IN p_close TINYINT,
                                IN p_change MEDIUMBLOB, IN p_wrapped VARBINARY(128), IN p_actor VARCHAR(32),
                                IN p_identity VARBINARY(32), IN p_msg_ref VARBINARY(16), IN p_now DOUBLE)
proc: BEGIN
    -- One membership change (exactly one of add, remove, close; database.py checks that).  Returns
    -- (status, epoch): ok and the new epoch, stale and the current one, gone, or a refusal code.
    DECLARE v_epoch INT UNSIGNED DEFAULT NULL;
    DECLARE v_admin VARCHAR(32) DEFAULT NULL;
    DECLARE v_new INT UNSIGNED DEFAULT NULL;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    START TRANSACTION;
    -- One change per room at a time: the room's row is the lock.
    SELECT epoch, admin INTO v_epoch, v_admin FROM rooms WHERE id = p_room_id FOR UPDATE;
    IF v_epoch IS NULL THEN
        COMMIT;
        SELECT 'gone' AS status, 0 AS epoch;
        LEAVE proc;
    END IF;
    IF v_epoch <> p_expected THEN
        COMMIT;
        SELECT 'stale' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    IF p_add IS NOT NULL AND EXISTS (SELECT 1 FROM room_members WHERE room_id = p_room_id AND username = p_add) THEN
        COMMIT;
        SELECT 'member' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    IF p_remove IS NOT NULL AND NOT EXISTS (SELECT 1 FROM room_members WHERE room_id = p_room_id
                                            AND username = p_remove) THEN
        COMMIT;
        SELECT 'not_member' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    IF p_remove IS NOT NULL AND p_remove = v_admin THEN
        COMMIT;
        SELECT 'admin' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    IF v_epoch >= 4294967295 THEN
        COMMIT;
        SELECT 'epoch_full' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    IF EXISTS (SELECT 1 FROM message_queue WHERE sender = p_actor AND msg_ref = p_msg_ref
               AND (recipient = p_add OR recipient IN (SELECT username FROM room_members WHERE room_id = p_room_id)))
    THEN
        COMMIT;
        SELECT 'ref_used' AS status, v_epoch AS epoch;
        LEAVE proc;
    END IF;
    SET v_new = v_epoch + 1;
    IF p_add IS NOT NULL THEN
        INSERT INTO room_members (room_id, username, joined_epoch) VALUES (p_room_id, p_add, v_new);
    END IF;
    -- The change for every member after it and the one it removes (still listed here), each only if they
    -- have an account (nothing is queued for a ghost); change rows ignore the queue bounds: a member must
    -- never miss a change.
    INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, sender_identity, payload,
                               stored_at, room_id, kind)
    SELECT m.username, p_actor, 0, v_new, p_msg_ref, p_identity, p_change, p_now, p_room_id, 2
      FROM room_members m JOIN users u ON u.username = m.username
     WHERE m.room_id = p_room_id ORDER BY m.username;
    IF p_close THEN
        -- The room keys stay: the room messages still queued for members who were away need them
        -- (sp_expire_queue drops them once no row does).
        DELETE FROM room_changes WHERE room_id = p_room_id;
        DELETE FROM room_members WHERE room_id = p_room_id;
        DELETE FROM rooms WHERE id = p_room_id;
    ELSE
        UPDATE rooms SET epoch = v_new, head = p_head WHERE id = p_room_id;
        IF p_remove IS NOT NULL THEN
            DELETE FROM room_members WHERE room_id = p_room_id AND username = p_remove;
        END IF;
        INSERT INTO room_changes (room_id, epoch, actor, change_blob, created_at)
        VALUES (p_room_id, v_new, p_actor, p_change, p_now);
        IF p_wrapped IS NOT NULL THEN
            INSERT INTO room_keys (room_id, epoch, wrapped, created_at) VALUES (p_room_id, v_new, p_wrapped, p_now);
        END IF;
    END IF;
    COMMIT;
    SELECT 'ok' AS status, v_new AS epoch;
END //

DROP PROCEDURE IF EXISTS sp_room_enqueue //
CREATE PROCEDURE sp_room_enqueue(IN p_room_id BIGINT UNSIGNED, IN p_epoch INT UNSIGNED, IN p_sender VARCHAR(32),
                                 IN p_identity VARBINARY(32), IN p_msg_ref VARBINARY(16), IN p_payload MEDIUMBLOB,
                                 IN p_recipients MEDIUMTEXT, IN p_now DOUBLE, IN p_max_messages INT,
                                 IN p_max_bytes BIGINT)
BEGIN
    -- One room message for each recipient (comma-separated, sorted: the order their rows are locked in).
    -- Returns one row: the statuses, comma-separated in the recipients' order (no_user: no account, nothing
    -- queued; stored, duplicate, full_messages or full_bytes), each bound counted over all the recipient's
    -- rows as in sp_enqueue.
    DECLARE v_rest MEDIUMTEXT DEFAULT '';
    DECLARE v_recipient VARCHAR(32) DEFAULT NULL;
    DECLARE v_status VARCHAR(16) DEFAULT NULL;
    DECLARE v_statuses MEDIUMTEXT DEFAULT '';
    DECLARE v_lock BIGINT UNSIGNED DEFAULT NULL;
    DECLARE v_count INT DEFAULT 0;
    DECLARE v_bytes BIGINT DEFAULT 0;
    DECLARE EXIT HANDLER FOR SQLEXCEPTION BEGIN ROLLBACK; RESIGNAL; END;
    SET v_rest = p_recipients;
    START TRANSACTION;
    WHILE v_rest <> '' DO
        SET v_recipient = SUBSTRING_INDEX(v_rest, ',', 1);
        SET v_rest = IF(LOCATE(',', v_rest) > 0, SUBSTRING(v_rest, LOCATE(',', v_rest) + 1), '');
        -- One writer per recipient at a time, as in sp_enqueue: the recipient's user row is the lock.
        SET v_lock = NULL;
        SELECT id INTO v_lock FROM users WHERE username = v_recipient FOR UPDATE;
        IF v_lock IS NULL THEN
            SET v_status = 'no_user';
        ELSEIF EXISTS (SELECT 1 FROM message_queue WHERE recipient = v_recipient AND sender = p_sender
                       AND msg_ref = p_msg_ref) THEN
            SET v_status = 'duplicate';
        ELSE
            SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) INTO v_count, v_bytes
              FROM message_queue WHERE recipient = v_recipient;
            IF v_count >= p_max_messages THEN
                SET v_status = 'full_messages';
            ELSEIF v_bytes + LENGTH(p_payload) > p_max_bytes THEN
                SET v_status = 'full_bytes';
            ELSE
                INSERT INTO message_queue (recipient, sender, conversation_id, generation, msg_ref, sender_identity,
                                           payload, stored_at, room_id, kind)
                VALUES (v_recipient, p_sender, 0, p_epoch, p_msg_ref, p_identity, p_payload, p_now, p_room_id, 1);
                SET v_status = 'stored';
            END IF;
        END IF;
        SET v_statuses = IF(v_statuses = '', v_status, CONCAT(v_statuses, ',', v_status));
    END WHILE;
    COMMIT;
    SELECT v_statuses AS statuses;
END //

DROP PROCEDURE IF EXISTS sp_room_key //
CREATE PROCEDURE sp_room_key(IN p_room_id BIGINT UNSIGNED, IN p_epoch INT UNSIGNED)
BEGIN
    SELECT wrapped FROM room_keys WHERE room_id = p_room_id AND epoch = p_epoch;
END //

DELIMITER ;
