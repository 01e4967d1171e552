"""The model directory: versioned XGBoost rankers, their metadata, and the ``latest`` pointer.

``feedbeam train`` saves each model as ``versions/<UTC time>-<sha256[:8]>/``
(``model.ubj``, ``metadata.json``) through ``ModelRegistry``, whose ``promote``
points ``latest`` at a version that passed evaluation; the ranking pipeline's
``ModelWatcher.current()`` re-reads ``latest`` at most every ``poll_s`` and
swaps to a new version without a restart. Writes are atomic renames. Layout and
rules: docs/training.md, "The model directory".
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

log = logging.getLogger(__name__)

MODEL_FILE = "model.ubj"
METADATA_FILE = "metadata.json"
#: A model trained with the social features: the communities it was trained with
#: (``users`` and ``community``, int64 arrays), which serving groups affinities by.
COMMUNITIES_FILE = "communities.npz"
LATEST = "latest"
VERSIONS = "versions"
_VERSION = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{8}$")


class ModelRegistryError(Exception):
    """A model directory, version or pointer that cannot be used (message says why)."""


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    """What a saved model is: written beside it as ``metadata.json``.

    ``feature_names`` is the exact column order the model expects;
    ``train_range_ms`` / ``eval_range_ms`` are ``[start, end)`` impression
    times; ``metrics`` holds the held-out figures (model and baseline);
    ``passed`` whether it beat the baseline by the required margin;
    ``library`` the versions of the libraries it was trained with.
    """

    version: str
    created_at_ms: int
    objective: str
    feature_names: tuple[str, ...]
    train_range_ms: tuple[int, int]
    eval_range_ms: tuple[int, int]
    metrics: Mapping[str, float]
    passed: bool
    library: Mapping[str, str]
    params: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    rows: Mapping[str, int] = dataclasses.field(default_factory=dict)
    gate: str = ""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["feature_names"] = list(self.feature_names)
        d["train_range_ms"] = list(self.train_range_ms)
        d["eval_range_ms"] = list(self.eval_range_ms)
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "ModelMetadata":
        d = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["feature_names"] = tuple(d["feature_names"])
        d["train_range_ms"] = tuple(d["train_range_ms"])
        d["eval_range_ms"] = tuple(d["eval_range_ms"])
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to score: ``predict(X)`` -> P(engaged) per row of ``X``."""

    version: str
    booster: Any
    metadata: ModelMetadata
    #: ``{user: community}`` of a model trained with the social features, else None.
    community: Mapping[int, int] | None = None

    def predict(self, features: np.ndarray) -> np.ndarray:
        """Scores of the rows of ``features`` (float32, columns in ``feature_names`` order).

        One ``inplace_predict`` call for all rows, however many users they
        belong to: no DMatrix is built and XGBoost splits the rows over its
        threads.
        """
        if features.shape[0] == 0:
            return np.zeros(0, dtype=np.float32)
        return self.booster.inplace_predict(features, validate_features=False)


def version_name(model_bytes: bytes, at_ms: int) -> str:
    """``<UTC yyyymmddThhmmssZ>-<sha256[:8]>`` of a model saved at ``at_ms``."""
    when = dt.datetime.fromtimestamp(at_ms / 1000, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{when}-{hashlib.sha256(model_bytes).hexdigest()[:8]}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


class ModelRegistry:
    """A model directory (see the module docstring); created on first save."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def version_dir(self, version: str) -> Path:
        if not _VERSION.match(version):
            raise ModelRegistryError(f"not a model version name: {version!r}")
        return self.root / VERSIONS / version

    # -- writing ------------------------------------------------------------------

    def save(self, booster, metadata_for: Callable[[str], ModelMetadata],
             now_ms: int | None = None,
             community: Mapping[int, int] | None = None) -> ModelMetadata:
        """Save ``booster`` as a new version; returns its metadata.

        ``metadata_for(version)`` builds the metadata once the version name
        (derived from the model bytes) is known. ``community``: the communities a
        model on the social features was trained with, saved beside it. Does not
        move ``latest``.
        """
        raw = bytes(booster.save_raw("ubj"))
        at_ms = int(time.time() * 1000) if now_ms is None else now_ms
        version = version_name(raw, at_ms)
        metadata = metadata_for(version)
        if metadata.version != version:
            raise ValueError("metadata_for must return the version it was given")
        final = self.version_dir(version)
        if final.exists():
            return self.metadata(version)
        versions = self.root / VERSIONS
        versions.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tmp-", dir=versions))
        try:
            _write_synced(staging / MODEL_FILE, raw)
            _write_synced(staging / METADATA_FILE, metadata.to_json().encode())
            if community is not None:
                _write_synced(staging / COMMUNITIES_FILE, _communities_bytes(community))
            os.rename(staging, final)
        except BaseException:
            for f in staging.glob("*"):
                f.unlink()
            staging.rmdir()
            raise
        _fsync_dir(versions)
        return metadata

    def promote(self, version: str) -> None:
        """Point ``latest`` at ``version`` (atomically); refuses one that did not pass."""
        metadata = self.metadata(version)
        if not metadata.passed:
            raise ModelRegistryError(
                f"model {version} did not pass evaluation ({metadata.gate}); not promoted")
        fd, tmp = tempfile.mkstemp(prefix=".latest-", dir=self.root)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(f"{version}\n".encode())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / LATEST)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(self.root)

    # -- reading ------------------------------------------------------------------

    def latest(self) -> str | None:
        """The promoted version, or None when nothing was promoted yet."""
        try:
            text = (self.root / LATEST).read_text().strip()
        except FileNotFoundError:
            return None
        if not _VERSION.match(text):
            raise ModelRegistryError(f"{self.root / LATEST} does not name a version: {text!r}")
        return text

    def versions(self) -> list[str]:
        """Every saved version, oldest first (promoted or not)."""
        d = self.root / VERSIONS
        if not d.is_dir():
            return []
        return sorted(p.name for p in d.iterdir() if _VERSION.match(p.name))

    def metadata(self, version: str) -> ModelMetadata:
        path = self.version_dir(version) / METADATA_FILE
        try:
            return ModelMetadata.from_json(path.read_text())
        except FileNotFoundError:
            raise ModelRegistryError(f"no model version {version} in {self.root}") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelRegistryError(f"bad metadata {path}: {exc}") from None

    def load(self, version: str, nthread: int = 0) -> LoadedModel:
        """Load ``version``'s model (``nthread`` prediction threads, 0 = all cores)."""
        import xgboost as xgb

        metadata = self.metadata(version)
        path = self.version_dir(version) / MODEL_FILE
        try:
            booster = xgb.Booster(model_file=str(path))
        except xgb.core.XGBoostError as exc:
            raise ModelRegistryError(f"cannot load {path}: {exc}") from None
        if nthread:
            booster.set_param({"nthread": nthread})
        communities = self.version_dir(version) / COMMUNITIES_FILE
        community = _read_communities(communities) if communities.exists() else None
        return LoadedModel(version, booster, metadata, community)


def _communities_bytes(community: Mapping[int, int]) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, users=np.fromiter(community.keys(), np.int64, len(community)),
             community=np.fromiter(community.values(), np.int64, len(community)))
    return buf.getvalue()


def _read_communities(path: Path) -> dict[int, int]:
    try:
        with np.load(path) as f:
            return dict(zip(f["users"].tolist(), f["community"].tolist()))
    except (OSError, KeyError, ValueError) as exc:
        raise ModelRegistryError(f"cannot read {path}: {exc}") from None


class ModelWatcher:
    """The model ``latest`` names, reloaded when it changes (no restart needed).

    ``expected_features``: the feature order the caller builds; a version
    trained on another one is refused, but for one trained on those followed by
    ``social`` that was saved with its communities (the caller appends those
    columns for it). ``clock`` returns seconds (monotonic).
    """

    def __init__(self, registry: ModelRegistry, expected_features: Sequence[str],
                 poll_s: float = 10.0, nthread: int = 0,
                 clock: Callable[[], float] = time.monotonic, social: Sequence[str] = ()):
        self.registry = registry
        self.expected = tuple(expected_features)
        self.social = tuple(social)
        self.poll_s = poll_s
        self.nthread = nthread
        self._clock = clock
        self._lock = threading.Lock()  # several bundles' threads may share one watcher
        self._checked_at: float | None = None
        self._model: LoadedModel | None = None
        self._refused: set[str] = set()
        self.swaps = 0
        self.refusals = 0

    def current(self) -> LoadedModel | None:
        """The model to score with, or None (no usable promoted model: rank by recency)."""
        now = self._clock()
        if self._checked_at is None or now - self._checked_at >= self.poll_s:
            with self._lock:
                if self._checked_at is None or now - self._checked_at >= self.poll_s:
                    self._checked_at = now
                    self._check()
        return self._model

    def _check(self) -> None:
        try:
            version = self.registry.latest()
        except ModelRegistryError as exc:
            log.error("ranking: model pointer unusable, keeping %s: %s", self._version(), exc)
            return
        if version is None or version in self._refused:
            return
        if self._model is not None and version == self._model.version:
            return
        try:
            model = self.registry.load(version, self.nthread)
        except ModelRegistryError as exc:
            self._refuse(version, str(exc))
            return
        names, social = model.metadata.feature_names, model.community is not None
        builds = self.expected + self.social if social else self.expected
        if names != builds or (social and not self.social):
            self._refuse(version, f"trained on features {list(names)}"
                                  f"{' with communities' if social else ''}, the pipeline "
                                  f"builds {list(self.expected)}"
                                  + (f", or {list(self.social)} after them for a model saved "
                                     "with its communities" if self.social else ""))
            return
        log.info("ranking: now scoring with model %s (was %s)", version, self._version())
        self._model = model
        self.swaps += 1

    def _refuse(self, version: str, why: str) -> None:
        self._refused.add(version)
        self.refusals += 1
        log.error("ranking: refusing model %s, keeping %s: %s", version, self._version(), why)

    def _version(self) -> str:
        return self._model.version if self._model is not None else "recency ranking"
