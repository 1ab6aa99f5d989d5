"""Typed storage failures. The daemon catches these by type and logs them with context; none is retried blindly."""

from __future__ import annotations


class StorageError(Exception):
    """Base class for every failure raised by `storage`."""


class SchemaNotAtHeadError(StorageError):
    """The database schema is not at the revision this code expects; the message names the command that fixes it."""


class CheckpointNotFoundError(StorageError, LookupError):
    """No checkpoint row (or artifact file) with that id, version or sha256."""


class CheckpointIntegrityError(StorageError):
    """A checkpoint file's bytes do not hash to the sha256 it is stored under (changed, truncated or corrupt)."""


class CheckpointImmutableError(StorageError):
    """Someone tried to change a checkpoint's weights, identity or provenance after it was recorded."""


class TargetMismatchError(StorageError):
    """The active draft was trained against a different target model than the one being served."""


class RollbackError(StorageError):
    """A rollback has nowhere to go: the active version was never promoted over another one."""


class DatabaseURLError(StorageError, ValueError):
    """The database URL cannot be parsed or names a backend other than SQLite and PostgreSQL."""


class DatabaseNotFoundError(StorageError):
    """A read-only command was pointed at a SQLite file that does not exist (it is never created for them)."""
