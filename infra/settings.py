"""Where the local stack lives and which ports it listens on.

Every knob has a default that works on a fresh machine and an environment
variable that overrides it; the CLI reads the environment once, at start-up,
and passes a ``StackSettings`` down. Nothing below the CLI reads the
environment.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

KAFKA_VERSION = "4.3.0"
CASSANDRA_VERSION = "5.0.8"
BEAM_VERSION = "2.77.0"


@dataclasses.dataclass(frozen=True)
class StackSettings:
    """Locations and ports of the local stack.

    ``cache_dir`` holds downloads (Maven repository, Go module and build
    caches, the Prism binary) and may be shared between checkouts;
    ``state_dir`` holds data, logs and pid files of one checkout's servers.
    """

    cache_dir: Path = Path.home() / ".cache" / "feedbeam"
    state_dir: Path = REPO_ROOT / ".state"
    host: str = "127.0.0.1"
    kafka_port: int = 9092
    kafka_controller_port: int = 9093
    cassandra_port: int = 9042
    cassandra_storage_port: int = 7000
    redis_port: int = 6379
    flink_job_port: int = 8099
    flink_artifact_port: int = 8098
    flink_expansion_port: int = 8097
    #: Prism's job service (Beam's default port) and its web UI.
    prism_job_port: int = 8073
    prism_web_port: int = 8074
    cassandra_heap_mb: int = 1024
    kafka_heap_mb: int = 512
    #: The job server embeds a Flink mini-cluster: every job's tasks share this heap.
    flink_heap_mb: int = 1536
    ready_timeout_s: float = 180.0

    @property
    def kafka_bootstrap(self) -> str:
        return f"{self.host}:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.host}:{self.redis_port}/0"

    @property
    def maven_repo(self) -> Path:
        return self.cache_dir / "m2"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "StackSettings":
        """Build settings from ``FEEDBEAM_*`` variables, defaults elsewhere."""
        env = os.environ if environ is None else environ
        overrides: dict[str, object] = {}
        for field in dataclasses.fields(cls):
            raw = env.get("FEEDBEAM_" + field.name.upper())
            if raw is None or raw == "":
                continue
            try:
                if field.name.endswith("_dir"):
                    overrides[field.name] = Path(raw).expanduser().resolve()
                elif field.name in ("host",):
                    overrides[field.name] = raw
                elif field.name.endswith("_s"):
                    overrides[field.name] = float(raw)
                else:
                    overrides[field.name] = int(raw)
            except ValueError:
                raise ValueError(
                    f"FEEDBEAM_{field.name.upper()}={raw!r} is not a valid "
                    f"{'number' if not field.name.endswith('_dir') else 'path'}") from None
        return cls(**overrides)
