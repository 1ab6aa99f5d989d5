"""Keeping the served draft equal to the deployment's active version, at a round boundary.

The active pointer (storage: active_drafts) is the one source of truth for what every daemon serves. Its
`generation` goes up by one on every move (promotion by a round, rollback by the live guard or an operator), so
the decode thread compares one integer at a round boundary (at most every `learning.follow_interval_ms`) and
only when it changed reads the version and loads its weights:

    checkpoint  CheckpointStore.get(sha256): the bytes are hashed as read, so a rollback serves exactly the
                weights that were recorded (same sha256), or nothing; weights that do not fit the served draft
                (another kind, a head of another shape or for another target architecture) are refused
                (pipelines.drafts.DraftMismatchError) and the current version keeps serving
    base        a CPU copy of the base draft's state dict taken at start-up (checkpoint_id NULL)

Both kinds of draft (pipelines.drafts) come out as a state dict: a draft LM's, or a head's (keys "head.*", what
HeadDraft.load_state_dict takes); a head's checkpoint file also holds its HeadConfig in its metadata.

Pipeline.request_draft_swap then installs them before the batch just collected is decoded, and every feedback
row is stamped with the version that produced it (engine.draft_version).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

BASE_DRAFT_VERSION = "base"  # the version label of the draft model given in models.draft


class DraftWeights:
    """Where a version's weights come from: the checkpoint store (sha256-verified) or the base draft's CPU copy.
    `served` describes the served draft (pipelines.drafts.weights_metadata): what a checkpoint must fit."""

    def __init__(self, checkpoint_dir: str | Path, base_state: dict, served: dict[str, str] | None = None):
        self.checkpoint_dir = Path(checkpoint_dir).resolve()  # rows record absolute paths
        self.base_state = base_state
        self.served = served or {}  # files of draft models written before this description existed have none
        self._store = None

    @classmethod
    def of_draft(cls, draft, checkpoint_dir: str | Path) -> DraftWeights:
        """For a draft LM or a HeadDraft: its weights now are the base version's."""
        from pipelines.drafts import weights_metadata

        base_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in draft.state_dict().items()}
        return cls(checkpoint_dir, base_state, weights_metadata(draft))

    @property
    def kind(self) -> str:
        """The served draft's kind, what its checkpoint rows record (storage.models.DraftKind)."""
        from pipelines.drafts import DRAFT_MODEL, description_of

        return description_of(self.served).get("kind", DRAFT_MODEL)

    @property
    def store(self):
        """The CheckpointStore, created (with its folder) on first use: a daemon that never sees a checkpoint
        leaves no folder behind."""
        if self._store is None:
            from storage.artifacts import CheckpointStore

            self._store = CheckpointStore(self.checkpoint_dir)
        return self._store

    def put(self, draft):
        """Store `draft`'s weights (with its kind and, for a head, its config); returns the StoredCheckpoint."""
        from pipelines.drafts import weights_metadata

        return self.store.put(draft.state_dict(), weights_metadata(draft))

    def load(self, checkpoint) -> dict:
        """State dict of a checkpoint row (None: the base draft). Raises CheckpointIntegrityError/NotFound, and
        DraftMismatchError for weights that do not fit the served draft."""
        from pipelines.drafts import check_weights_fit

        if checkpoint is None:
            return self.base_state
        state, metadata = self.store.get_with_metadata(checkpoint.sha256, expected_size=checkpoint.size_bytes)
        label = f"checkpoint {checkpoint.version}"
        check_weights_fit(checkpoint.kind or "draft", metadata, state, self.served, self.base_state, label)
        return state


def cast_like(model):
    """prepare() for DraftFollower: every tensor to the served draft's device and dtype, on a stream of its own on
    CUDA so the copies do not queue between the decode thread's rounds."""

    def prepare(state: dict) -> dict:
        import torch

        own = {name: tensor for name, tensor in model.state_dict().items()}
        device = next(iter(own.values())).device
        stream = torch.cuda.Stream(device=device) if device.type == "cuda" else None
        with torch.cuda.stream(stream) if stream is not None else _nothing():
            prepared = {name: state[name].to(device=own[name].device, dtype=own[name].dtype) for name in own}
        if stream is not None:
            stream.synchronize()
        return prepared

    return prepare


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class DraftFollower:
    """Reads the pointer and prepares the new version's weights; `start()` does that on a thread of its own, so
    the decode thread only takes a ready swap (`take_ready`) and copies it into the served draft."""

    def __init__(
        self,
        session_factory,
        weights: DraftWeights,
        *,
        target_identity: str,
        deployment: str,
        interval_s: float,
        retry_s: float = 5.0,
        clock=time.monotonic,
        prepare=None,
    ):
        self.session_factory = session_factory
        self.weights = weights
        self.target_identity = target_identity
        self.deployment = deployment
        self.interval_s = interval_s
        self.retry_s = retry_s
        self.clock = clock
        self.generation: int | None = None  # None: not synchronised yet, the first poll always reads
        self._next_check = 0.0
        self._failing = False
        # weights -> weights as the served draft holds them (its device and dtype): done before the decode thread
        # sees them, so its swap is one in-place copy per tensor
        self.prepare = prepare or (lambda state: state)
        self._version = None  # what is served or staged: the background poll compares against it
        self._ready: tuple[dict, str] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, serving_version: str) -> None:
        """Follow on a background thread from now on (after `sync` at start-up)."""
        self._version = serving_version
        self._thread = threading.Thread(target=self._follow, name="draft-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def take_ready(self) -> tuple[dict, str] | None:
        """The prepared (weights, version) to swap to, once; None when nothing changed. Never blocks."""
        with self._lock:
            ready, self._ready = self._ready, None
        return ready

    def _follow(self) -> None:
        while not self._stop.wait(max(self.interval_s, 0.05)):
            swap = self.poll(self._version)
            if swap is None:
                continue
            weights, version = swap
            started = time.monotonic()
            try:
                weights = self.prepare(weights)
            except Exception as exc:
                log.error(
                    "cannot prepare draft %s (still serving %s): %s: %s",
                    version,
                    self._version,
                    type(exc).__name__,
                    exc,
                )
                self.generation = None  # read the pointer again next time
                continue
            log.info("draft %s prepared in the background in %.2f s", version, time.monotonic() - started)
            with self._lock:
                self._ready = (weights, version)
            self._version = version

    def poll(self, current_version: str) -> tuple[dict, str] | None:
        """(weights, version) to swap to when the active version changed since the last poll, else None.

        Never raises: a database or checkpoint failure is logged and the current draft keeps serving."""
        now = self.clock()
        if now < self._next_check:
            return None
        self._next_check = now + self.interval_s
        try:
            swap = self._read_active(current_version)
        except Exception as exc:
            self._next_check = now + max(self.interval_s, self.retry_s)
            if not self._failing:
                log.error(
                    "cannot follow the active draft of deployment %r (still serving %s): %s: %s",
                    self.deployment,
                    current_version,
                    type(exc).__name__,
                    exc,
                )
            self._failing = True
            return None
        if self._failing:
            log.info("following the active draft of deployment %r again", self.deployment)
            self._failing = False
        return swap

    def sync(self, engine) -> None:
        """Install the active version now (at start-up, before the first batch)."""
        swap = self.poll(engine.draft_version)
        if swap is not None:
            engine.swap_draft(*swap)
            log.info("serving the active draft %s", swap[1])

    def _read_active(self, current_version: str) -> tuple[dict, str] | None:
        from storage.checkpoints_repo import get_active_checkpoint, get_active_pointer
        from storage.errors import TargetMismatchError

        with self.session_factory() as session:
            pointer = get_active_pointer(session, self.deployment)
            generation = 0 if pointer is None else pointer.generation
            if generation == self.generation:
                return None
            try:
                active = get_active_checkpoint(session, self.deployment, expected_target=self.target_identity)
            except TargetMismatchError as exc:
                log.error("%s; serving the base draft instead", exc)
                active = None
        version = BASE_DRAFT_VERSION if active is None else active.version
        if version == current_version:
            self.generation = generation
            return None
        started = time.monotonic()
        weights = self.weights.load(active)  # verified against its sha256 before anything is swapped
        self.generation = generation
        where = "the base draft" if active is None else f"sha256 {active.sha256}"
        log.info(
            "active draft changed (generation %d): %s -> %s (%s, loaded in %.2f s)",
            generation,
            current_version,
            version,
            where,
            time.monotonic() - started,
        )
        return weights, version
