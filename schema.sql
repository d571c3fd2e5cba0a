-- secureim MySQL/MariaDB schema and stored procedures.
--
-- Every query the server makes on MySQL is one of the procedures below, called
-- with parameters (design 000: stored procedures keep data apart from SQL).
-- Conversation keys are never stored: only ids, members and key-generation times.
-- Safe to run again: tables are created if missing, procedures are replaced.
-- Works with the mysql client too: mysql DB < schema.sql

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

DELIMITER //

DROP PROCEDURE IF EXISTS sp_create_user //
CREATE PROCEDURE sp_create_user(IN p_username VARCHAR(32), IN p_hash VARCHAR(100),
                                IN p_identity VARBINARY(64))
BEGIN
    -- Inserts only if the name is free; returns 1 if created, 0 if taken.
    INSERT IGNORE INTO users (username, password_hash, identity_key) VALUES (p_username, p_hash, p_identity);
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

DELIMITER ;
