"""What the servers run from, fetched from package registries into ``settings.cache_dir``.

* Kafka, Cassandra and Beam's Flink job server: the small poms under
  ``infra/`` resolved by Maven (from Maven Central into ``<cache_dir>/m2``) to
  a runtime classpath, cached under ``<cache_dir>/classpath``.
* Prism, Beam's portable local runner: its module downloaded from the Go module
  proxy, our fixes (``PRISM_PATCHES``) applied to the copy, built into
  ``<cache_dir>/prism/v<BEAM_VERSION>-<PRISM_PATCH_LEVEL>``.
* ``redis-server``: Debian's package, apt-installed when missing.

Run it with ``feedbeam infra install`` (``feedbeam infra up`` calls it too);
Maven, go and apt log to ``<state_dir>/logs/install.log``.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Callable, Iterable

from infra import processes
from infra.errors import UserFacingError
from infra.settings import (
    BEAM_VERSION,
    CASSANDRA_VERSION,
    KAFKA_VERSION,
    StackSettings,
)

log = logging.getLogger(__name__)

INFRA_DIR = Path(__file__).resolve().parent

#: The Flink runner version assembled by infra/flink-pom.xml (see the pom for
#: why it is not BEAM_VERSION).
FLINK_RUNNER_BEAM_VERSION = "2.70.0"
FLINK_VERSION = "1.19"

# Pinned so resolution does not depend on whatever plugin version Maven's
# metadata calls "latest" today.
_MVN_DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
_MIN_JAVA = 17

#: The servers that run from a Maven classpath: name -> (pom under infra/, label).
POMS = {
    "cassandra": ("cassandra-pom.xml", f"Apache Cassandra {CASSANDRA_VERSION}"),
    "kafka": ("kafka-pom.xml", f"Apache Kafka {KAFKA_VERSION}"),
    "flink": ("flink-pom.xml",
              f"Beam {FLINK_RUNNER_BEAM_VERSION} Flink {FLINK_VERSION} job server"),
    "flink-cluster": ("flink-cluster-pom.xml", f"Flink {FLINK_VERSION} session cluster"),
}


def install(settings: StackSettings, services: Iterable[str], *, prism: bool = True) -> None:
    """Fetch and build what ``services`` (checked names) and Prism need; start nothing.

    Cheap when everything is cached: classpaths are reused while their pom
    is unchanged and every jar is still there. The three slow lanes run
    concurrently: Maven resolution, the Go build of Prism, and apt.
    """
    wanted = set(services)
    processes.ensure_dirs(settings)
    # Check every missing tool before any lane starts, so a missing Go does
    # not surface only after minutes of Maven downloads.
    lanes: list[Callable[[], object]] = []
    maven = [name for name in POMS
             if name in wanted and cached_classpath(settings, name) is None]
    if wanted & POMS.keys():
        java()
    if maven:
        _require_mvn()
        lanes.append(lambda: [classpath(settings, name) for name in maven])
    if prism and not prism_path(settings).is_file():
        _require_go()
        lanes.append(lambda: _ensure_prism(settings))
    if "redis" in wanted and not shutil.which("redis-server"):
        _require_apt()
        lanes.append(lambda: _ensure_redis_server(settings))
    if not lanes:
        return
    with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
        for future in [pool.submit(lane) for lane in lanes]:
            future.result()  # re-raises the first lane's error


# --------------------------------------------------------------------------
# Maven classpaths
# --------------------------------------------------------------------------


def classpath(settings: StackSettings, name: str) -> str:
    """The runtime classpath of ``infra/<name>-pom.xml``, resolved once.

    Cached in ``<cache_dir>/classpath`` under a key of the pom's content and
    the Maven repository path; reused while every jar on it still exists.
    """
    cached = cached_classpath(settings, name)
    if cached is not None:
        return cached
    mvn = _require_mvn()
    pom_name, label = POMS[name]
    pom = INFRA_DIR / pom_name
    cp_file = _classpath_file(settings, name)
    log.info("%s: resolving from Maven Central into %s (first time only)",
             label, settings.maven_repo)
    cp_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cp_file.with_suffix(".tmp")
    # -f points Maven at the pom; the project has no sources, so nothing is
    # written next to it. The local repository is our cache, not ~/.m2.
    processes.run([mvn, "-B", "-q", "-f", str(pom),
                   f"-Dmaven.repo.local={settings.maven_repo}",
                   f"{_MVN_DEPENDENCY_PLUGIN}:build-classpath",
                   f"-Dmdep.outputFile={tmp}", "-Dmdep.includeScope=runtime"],
                  processes.install_log_path(settings),
                  what=f"resolving {label} with Maven")
    tmp.replace(cp_file)
    return cp_file.read_text().strip()


def cached_classpath(settings: StackSettings, name: str) -> str | None:
    """The classpath resolved earlier for this pom, if every jar on it is still there."""
    cp_file = _classpath_file(settings, name)
    if not cp_file.is_file():
        return None
    cp = cp_file.read_text().strip()
    if cp and all(Path(p).is_file() for p in cp.split(os.pathsep)):
        return cp
    return None


def _classpath_file(settings: StackSettings, name: str) -> Path:
    pom = INFRA_DIR / POMS[name][0]
    key = hashlib.sha256(pom.read_bytes() + str(settings.maven_repo).encode()).hexdigest()
    return settings.cache_dir / "classpath" / f"{name}-{key[:16]}.txt"


# --------------------------------------------------------------------------
# Prism
# --------------------------------------------------------------------------


_BEAM_MODULE = "github.com/apache/beam/sdks/v2"


@dataclasses.dataclass(frozen=True)
class PrismPatch:
    """One fix to Beam's Prism source: ``find`` (exactly once in ``path``) becomes ``replace``."""

    path: str
    find: str
    replace: str
    why: str


#: Fixes applied to the downloaded Prism source before it is built. A build
#: fails, naming the patch, if its text is not found exactly once (a Beam bump
#: must re-check each: drop it if upstream fixed the defect).
PRISM_PATCHES = (
    PrismPatch(
        path="go/pkg/beam/runners/prism/internal/stage.go",
        find="\t\tcase <-dataReady:\n\t\t\tdataFinished = true\n",
        replace=("\t\tcase <-dataReady:\n\t\t\tdataFinished = true\n"
                 "\t\t\tdataReady = nil // closed: select on it no more (feedbeam patch)\n"),
        why=("a bundle whose stage sends no data back to the runner (a sink) closes "
             "dataReady at once, and stage.Execute's progress loop then selects the closed "
             "channel in a busy loop until the bundle ends: a whole core per such bundle "
             "(measured: 827 CPU ticks of Prism in 10 s of a source + decode + count job, "
             "18 with the patch)"),
    ),
    PrismPatch(
        path="go/pkg/beam/runners/prism/internal/execute.go",
        find="\t\t\tstage.sdfSplittable = config.EnableSDFSplit\n",
        replace=("\t\t\t// A stateful stage's bundle holds its keys: split, its rest would run\n"
                 "\t\t\t// next to it on the same keys (feedbeam patch).\n"
                 "\t\t\tstage.sdfSplittable = config.EnableSDFSplit && !stage.stateful\n"),
        why=("Prism splits any bundle whose input stops moving for a progress tick "
             "(100 ms at first), stateful stages too; the split-off rest goes back to "
             "pending with its keys released while the first part still processes them, "
             "so two bundles of one key run at once and overwrite each other's state "
             "(a slow stateful count of 30 elements ended at 15, "
             "tests/integration/test_prism_runner.py; a watermark timer fired with "
             "27,458 of 30,000 records counted in test_kafka_source)"),
    ),
)
#: Bumped whenever PRISM_PATCHES change, so cached binaries are rebuilt.
PRISM_PATCH_LEVEL = "fb2"


def prism_path(settings: StackSettings) -> Path:
    """Where the Prism binary for BEAM_VERSION with our patches is (or will be) built."""
    return settings.cache_dir / "prism" / f"v{BEAM_VERSION}-{PRISM_PATCH_LEVEL}" / "prism"


def prism_binary(settings: StackSettings) -> Path:
    """Path of the Prism runner binary for BEAM_VERSION.

    Pipelines pass it as ``--prism_location`` so Beam does not try to
    download Prism from GitHub at run time (the network here reaches only
    package registries). Raises UserFacingError when it is not built yet.
    """
    path = prism_path(settings)
    if not path.is_file():
        raise UserFacingError(
            f"the Prism runner binary is not built yet ({path}); "
            "run `feedbeam infra install` (needs Go)")
    return path


def apply_prism_patches(source_root: Path, patches=PRISM_PATCHES) -> None:
    """Apply ``patches`` to a copy of Beam's Go module at ``source_root``.

    Raises UserFacingError naming the patch whose text is not found exactly
    once (the source changed under it: re-check the patch against upstream).
    """
    patched: dict[Path, str] = {}
    for patch in patches:  # all checked before any file is written
        target = source_root / patch.path
        text = patched.get(target) or target.read_text()
        found = text.count(patch.find)
        if found != 1:
            raise UserFacingError(
                f"Prism patch for {patch.path} ({patch.why[:60]}...) matches {found} times "
                f"in Beam {BEAM_VERSION}, expected once: check it against the new source")
        patched[target] = text.replace(patch.find, patch.replace)
    for target, text in patched.items():
        target.write_text(text)


def _ensure_prism(settings: StackSettings) -> Path:
    path = prism_path(settings)
    if path.is_file():
        return path
    go = _require_go()
    log.info("prism: building Beam %s Prism with %d patch(es) "
             "(first time only, ~3 min)", BEAM_VERSION, len(PRISM_PATCHES))
    go_dir = settings.cache_dir / "go"
    env = dict(os.environ,
               GOMODCACHE=str(go_dir / "mod"),
               GOCACHE=str(go_dir / "build"),
               # Go makes its module cache read-only; -modcacherw keeps the
               # cache dir removable with a plain rm -rf.
               GOFLAGS="-modcacherw")
    module = f"{_BEAM_MODULE}@v{BEAM_VERSION}"
    install_log = processes.install_log_path(settings)
    processes.run([go, "mod", "download", module], install_log,
                  what=f"downloading {module} from the Go module proxy", env=env,
                  cwd=settings.cache_dir)
    source = go_dir / "prism-src"
    shutil.rmtree(source, ignore_errors=True)
    shutil.copytree(go_dir / "mod" / f"{_BEAM_MODULE}@v{BEAM_VERSION}", source)
    apply_prism_patches(source)
    path.parent.mkdir(parents=True, exist_ok=True)
    processes.run([go, "build", "-trimpath", "-o", str(path), "./go/cmd/prism"], install_log,
                  what="building Prism", env=env, cwd=source)
    # The module and build caches are only useful for rebuilding this exact
    # binary, and a Beam bump needs fresh modules anyway; keep just the binary.
    for cache in ("mod", "build", "prism-src"):
        shutil.rmtree(go_dir / cache, ignore_errors=True)
    return path


# --------------------------------------------------------------------------
# redis-server
# --------------------------------------------------------------------------


def redis_server() -> str:
    """The ``redis-server`` on PATH; UserFacingError when it is not installed."""
    found = shutil.which("redis-server")
    if not found:
        raise UserFacingError(
            "redis-server is not installed; run `feedbeam infra install` "
            "or `apt-get install -y redis-server`")
    return found


def _ensure_redis_server(settings: StackSettings) -> None:
    if shutil.which("redis-server"):
        return
    apt = _require_apt()
    install_log = processes.install_log_path(settings)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    log.info("redis: `redis-server` not found; running apt-get update && "
             "apt-get install -y redis-server")
    processes.run([apt, "update"], install_log, what="apt-get update", env=env)
    processes.run([apt, "install", "-y", "--no-install-recommends", "redis-server"],
                  install_log, what="apt-get install redis-server", env=env)


# --------------------------------------------------------------------------
# Tools
# --------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def java() -> str:
    """The ``java`` on PATH, checked once per process to be Java 17+."""
    found = _require_tool(
        "java", f"a JDK {_MIN_JAVA} is needed to run Kafka and Cassandra; "
        "install it with `apt-get install -y openjdk-17-jdk-headless`")
    out = subprocess.run([found, "-version"], capture_output=True, text=True).stderr
    match = re.search(r'version "(\d+)', out)
    major = int(match.group(1)) if match else 0
    if major < _MIN_JAVA:
        raise UserFacingError(
            f"`{found}` is Java {major or 'of unknown version'}; Kafka "
            f"{KAFKA_VERSION} needs Java {_MIN_JAVA} (Cassandra "
            f"{CASSANDRA_VERSION} supports 17): install openjdk-17-jdk-headless "
            "and put it first on PATH")
    return found


def _require_tool(name: str, how: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise UserFacingError(how)
    return found


def _require_mvn() -> str:
    return _require_tool(
        "mvn", "Maven (mvn) is needed to fetch Kafka, Cassandra and the Flink "
        "job server from Maven Central; install it with `apt-get install -y maven`")


def _require_go() -> str:
    return _require_tool(
        "go", "Go is needed to build Beam's Prism runner; install Go >= 1.21 "
        "from https://go.dev/dl and put it on PATH (Prism needs Go 1.26; an "
        "older go fetches that toolchain from the Go module proxy itself)")


def _require_apt() -> str:
    """apt-get, usable by us, for installing Debian's redis-server."""
    apt = _require_tool(
        "apt-get", "redis-server is missing and apt-get is not available; "
        "install Redis with your package manager so `redis-server` is on PATH")
    if os.geteuid() != 0:
        raise UserFacingError(
            "redis-server is missing; install it with "
            "`sudo apt-get update && sudo apt-get install -y redis-server`")
    return apt
