"""Checkpoint artifact store: draft weights as safetensors files named by the sha256 of their bytes.

    store = CheckpointStore("/var/lib/onlinespec/checkpoints")
    sha256, path, size_bytes = store.put(model.state_dict(), {"version": "v7"})
    state_dict = store.get(sha256)  # raises CheckpointIntegrityError if the bytes changed

- Content-addressed: the name is the hash, so a file can be checked against its name on every load and the
  same weights are stored once. The database row (draft_checkpoints.sha256) says which file a version is.
- Atomic: written to a temp file in the same folder, fsynced, renamed, then the folder is fsynced; a reader
  never sees a half-written checkpoint under a real name, and a crash leaves only a temp file behind.
- Never pickle: safetensors holds tensors and string metadata only, so loading cannot run code.
- Nothing here deletes a checkpoint file; cleanup_temp only removes abandoned temp files.
torch and safetensors are imported inside the methods: `storage` stays importable without torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from storage.errors import CheckpointIntegrityError, CheckpointNotFoundError

if TYPE_CHECKING:
    import torch

SUFFIX = ".safetensors"
TEMP_PREFIX = ".partial-"
TEMP_SUFFIX = ".safetensors.tmp"
SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")
HASH_CHUNK = 1 << 20


class StoredCheckpoint(NamedTuple):
    sha256: str
    path: Path
    size_bytes: int


class CheckpointStore:
    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if not SHA256_PATTERN.match(sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / f"{sha256}{SUFFIX}"

    def put(self, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> StoredCheckpoint:
        """Write `state_dict` (with string metadata; other values are stored as JSON) and return its address."""
        from safetensors.torch import save_file

        temp = self.root / f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        try:
            save_file(_safetensors_ready(state_dict), temp, metadata=_string_metadata(metadata))
            sha256, size = _hash_and_sync(temp)  # hashes the bytes as written, then makes them durable
            final = self.path_for(sha256)
            if final.exists() and _hash_file(final) == sha256:
                temp.unlink()  # same weights stored before
            else:
                os.chmod(temp, 0o444)  # checkpoints are immutable; make an accidental overwrite fail
                os.replace(temp, final)  # also replaces a damaged copy of the same content
                _fsync_dir(self.root)  # the rename itself survives a crash only once the folder is synced
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        return StoredCheckpoint(sha256, final, size)

    def get(self, sha256: str, *, expected_size: int | None = None) -> dict[str, torch.Tensor]:
        """Load a state dict, refusing a file whose bytes do not hash to `sha256` (changed or truncated).

        The bytes are read once, hashed, and parsed from that same buffer: nothing can change between the
        check and the load."""
        return self.get_with_metadata(sha256, expected_size=expected_size)[0]

    def get_with_metadata(
        self, sha256: str, *, expected_size: int | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """get(), and the string metadata the file was written with (empty if none), from the same bytes."""
        from safetensors.torch import load

        path = self.path_for(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"checkpoint file {path} does not exist") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256 or (expected_size is not None and len(data) != expected_size):
            size_note = f", {expected_size} expected" if expected_size is not None else ""
            raise CheckpointIntegrityError(
                f"checkpoint {path} is damaged: its {len(data)} bytes{size_note} hash to {actual}, not {sha256} "
                "(changed or truncated after it was written); refusing to load it"
            )
        try:
            return load(data), _header_metadata(data)
        except Exception as exc:  # only reachable if a non-safetensors file was stored under its own hash
            raise CheckpointIntegrityError(f"checkpoint {path} is not a valid safetensors file: {exc}") from exc

    def verify(self, sha256: str) -> int:
        """Check a stored file without loading it; returns its size. Raises like get()."""
        path = self.path_for(sha256)
        if not path.exists():
            raise CheckpointNotFoundError(f"checkpoint file {path} does not exist")
        actual = _hash_file(path)
        if actual != sha256:
            raise CheckpointIntegrityError(f"checkpoint {path} is damaged: it hashes to {actual}, not {sha256}")
        return path.stat().st_size

    def cleanup_temp(self, min_age_seconds: float = 3600.0) -> list[Path]:
        """Remove temp files left by interrupted writes; returns what was removed.

        Only temp files older than `min_age_seconds` go: on a shared filesystem another process may be writing
        one right now. Pass 0 when this process is the only writer (e.g. at start-up of the single learner)."""
        cutoff = time.time() - min_age_seconds
        removed = []
        for temp in self.root.glob(f"{TEMP_PREFIX}*{TEMP_SUFFIX}"):
            try:
                if temp.stat().st_mtime <= cutoff:
                    temp.unlink()
                    removed.append(temp)
            except FileNotFoundError:  # another process cleaned it up first
                continue
        return removed


def _safetensors_ready(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two entries sharing memory (safetensors refuses tied weights such as an
    embedding shared with the LM head). Duplicates become copies, so every key round-trips with its values."""
    import torch

    ready: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in state_dict.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"state_dict[{name!r}] is a {type(tensor).__name__}, not a tensor")
        tensor = tensor.detach().cpu()
        storage = tensor.untyped_storage().data_ptr()
        if storage in seen_storages or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
            storage = tensor.untyped_storage().data_ptr()
        seen_storages.add(storage)
        ready[name] = tensor
    return ready


def _string_metadata(metadata: dict[str, Any] | None) -> dict[str, str] | None:
    if not metadata:
        return None
    return {str(k): v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in metadata.items()}


def _header_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header (8-byte little-endian length, then the header)."""
    length = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + length]).get("__metadata__") or {})


def _hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_and_sync(path: Path) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(f.fileno())
    return digest.hexdigest(), size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
