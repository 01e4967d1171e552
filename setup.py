"""Distribution for feedbeam.

Beam ships multi-module pipelines to remote workers by building this
distribution (``--setup_file ./setup.py``), so every package the pipelines
import at run time must be listed here and nothing may be loaded from the
working tree implicitly.
"""
from setuptools import setup

# Pinned so a pipeline submitted from a laptop runs the same code on a
# worker; bumped deliberately, together with the lock of the test run.
RUNTIME = [
    "apache-beam==2.77.0",
    "confluent-kafka[schemaregistry]==2.16.1",
    "redis[hiredis]==8.1.0",
    "cassandra-driver==3.30.1",
    "pyarrow==25.0.1",
    "xgboost==3.2.0",
    "fastavro==1.13.1",
    "tqdm==4.70.1",
    # one retry policy for every store write (stores.retry): stop, backoff, which errors.
    "tenacity==9.2.1",
    # serving API (serving/, jobs/serve.py)
    "uvicorn==0.54.0",
    "uvloop==0.23.0",
    "httptools==0.9.0",
    "granian==2.8.7",
    "orjson==3.13.0",
    "pyjwt==2.15.1",
    "prometheus-client==0.26.0",
    # `feedbeam train` writes its evaluation plot (ROC, NDCG by position) as a PNG.
    "matplotlib==3.11.2",
]

TEST = [
    "pytest==9.2.0",
    "pytest-timeout==2.4.0",
    "hypothesis==6.170.15",
    "schemathesis==4.32.5",
    # the layering contract (.importlinter), checked by `make test`
    "import-linter==2.17",
]

# Only bench/bench_serving.py's Redis client comparison uses these (pip install -e .[bench]).
BENCH = ["coredis==6.9.0", "valkey-glide==2.5.3"]

setup(
    name="feedbeam",
    version="0.1.0",
    description="Streaming feed materialization on Apache Beam: fan-out, "
    "features, stories and ranked feeds from Kafka into Redis and Cassandra.",
    python_requires=">=3.11,<3.12",
    packages=[
        "schemas",
        "domain",
        "stores",
        "stores.redis",
        "stores.cassandra",
        "stores.files",
        "stores.kafka",
        "pipelines",
        "pipelines.io",
        "serving",
        "jobs",
        "infra",
    ],
    package_data={
        "schemas": ["avro/*.avsc", "cql/*.cql"],
        "infra": ["*.xml", "*.yaml", "*.properties", "*.sh", "*.yml"],
    },
    install_requires=RUNTIME,
    extras_require={"test": TEST, "dev": TEST + BENCH, "bench": BENCH},
    entry_points={"console_scripts": ["feedbeam = jobs.cli:main"]},
)
