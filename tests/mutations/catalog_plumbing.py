"""Defence mutations of the security plumbing in crypto_utils: the sealed box, private atomic
writes and the password keystore (PasswordSeal).

Each entry switches one defence off; its tests must then fail (tests/mutations/run.py).
"""

from __future__ import annotations

from model import Mutation

P = "tests/unit/crypto/test_plumbing.py"
KS = "tests/unit/test_keystore.py"

MUTATIONS: list[Mutation] = [
    # --- SealedBox ----------------------------------------------------------------------------
    Mutation(
        name="sealed-box-label-not-bound",
        file="crypto_utils.py",
        find="self.label = label(purpose) if isinstance(purpose, str) else bytes(purpose)",
        replace='self.label = b""',
        tests=(
            f"{P}::test_the_sealed_box_binds_its_label",
            f"{KS}::test_the_servers_stored_kdc_and_room_keys_open_with_the_sealed_box",
        ),
        why="The box's label is its associated data: unbound, a blob sealed for one purpose (a room key) "
        "opens as another (a ticket) under the same key, and the old formats no longer open.",
    ),
    Mutation(
        name="sealed-box-fails-open",
        file="crypto_utils.py",
        find="                sealed[:SEALED_BOX_NONCE_BYTES], sealed[SEALED_BOX_NONCE_BYTES:], self.label + extra_aad\n"
        "            )\n        except InvalidTag:\n            raise DecryptionFailed() from None\n",
        replace="                sealed[:SEALED_BOX_NONCE_BYTES], sealed[SEALED_BOX_NONCE_BYTES:], self.label + extra_aad\n"
        '            )\n        except InvalidTag:\n            return b""\n',
        tests=(
            f"{P}::test_the_sealed_box_fails_closed",
            f"{P}::test_a_wrong_password_or_associated_data_fails_closed",
        ),
        why="A bad tag must raise DecryptionFailed: returned as empty data, a forged ticket or a wrong "
        "password's keystore is taken as valid (empty) content.",
    ),
    # --- write_private_file ---------------------------------------------------------------------
    Mutation(
        name="private-file-not-0600",
        file="secureim/files.py",
        find="PRIVATE_FILE_MODE = 0o600",
        replace="PRIVATE_FILE_MODE = 0o644",
        tests=(f"{P}::test_a_private_file_is_0600_whatever_the_umask",),
        why="Keystores, pins and key files are created 0600: 0644, every local user reads the server's "
        "ticket key and copies sealed keystores to attack their passwords offline.",
    ),
    Mutation(
        name="private-file-not-fsynced",
        file="secureim/files.py",
        find="            os.fsync(fh.fileno())\n",
        replace="            pass\n",
        tests=(f"{P}::test_a_private_file_is_fsynced_before_the_rename",),
        why="The new file's bytes reach the disk before the rename: without it a power cut can leave an "
        "empty identity or prekey store under the real name (a lost key).",
    ),
    Mutation(
        name="private-file-folder-not-fsynced",
        file="secureim/files.py",
        find="    fsync_folder(path.parent)\n",
        replace="",
        tests=(
            f"{P}::test_the_folder_is_fsynced_after_the_rename",
            f"{P}::test_key_files_are_created_once_and_fsynced",
        ),
        why="The folder is fsynced after the rename: without it a power cut can undo the rename, and a "
        "key file created and used (the ticket key) is gone after the restart.",
    ),
    Mutation(
        name="private-file-exclusive-replaces",
        file="secureim/files.py",
        find="                os.link(tmp, path)\n",
        replace="                os.replace(tmp, path)\n",
        tests=(f"{P}::test_an_exclusive_write_never_replaces_a_file",),
        why="A key file is created once: replaced by a second process starting at the same moment, the "
        "key one of them uses (and sealed data with) is lost.",
    ),
    Mutation(
        name="private-file-exclusive-fallback-replaces",
        file="secureim/files.py",
        find="                _write_new(path, data)\n",
        replace="                path.write_bytes(data)\n",
        tests=(
            f"{P}::test_without_hard_links_an_exclusive_write_still_never_replaces_a_file",
            f"{P}::test_without_hard_links_an_exclusive_write_still_creates_a_private_file",
        ),
        why="Where the file system has no hard links, a key file is still created once and 0600: "
        "written over, a second process's key replaces the first's; created with the default mode, "
        "others read the key.",
    ),
    # --- PasswordSeal ---------------------------------------------------------------------------
    Mutation(
        name="keystore-params-not-read-from-file",
        file="crypto_utils.py",
        find="        params = ScryptParams(\n",
        replace="        params = default or ScryptParams(\n",
        tests=(f"{P}::test_the_reader_uses_the_parameters_in_the_file",),
        why="The reader derives with the scrypt parameters the file records: with the module's constants "
        "instead, raising the cost locks every user out of the keystores written before.",
    ),
    Mutation(
        name="keystore-params-unbounded",
        file="crypto_utils.py",
        find='        """CryptoError unless the parameters are valid and within the bounds above."""\n',
        replace='        """CryptoError unless the parameters are valid and within the bounds above."""\n        return\n',
        tests=(f"{P}::test_parameters_out_of_bounds_are_refused_before_scrypt_runs",),
        why="A keystore is input: unbounded, a planted file with n = 2^30 makes the client allocate "
        "terabytes (or run for hours) at login.",
    ),
]
