"""``feedbeam token`` and ``feedbeam serve`` argument handling (no server started)."""
from __future__ import annotations

import json

import pytest

from jobs import cli
from jobs.serve import build_config, server_options
from serving.config import CONFIG_ENV, config_from_environment
from serving.auth import TokenAuth

KEY = "cli-test-key-0123456789-0123456789"


def test_token_prints_a_jwt_the_api_accepts(capsys):
    assert cli.main(["token", "7", "--jwt-key", KEY, "--ttl", "60"]) == 0
    token = capsys.readouterr().out.strip()
    assert TokenAuth(KEY).user_id(f"Bearer {token}") == 7


def test_the_key_can_come_from_the_environment(capsys, monkeypatch):
    # One in 64 URL-safe keys starts with "-": by environment it is not read as an option.
    dashed = "-" + KEY
    monkeypatch.setenv("FEEDBEAM_JWT_KEY", dashed)
    assert cli.main(["token", "7"]) == 0
    assert TokenAuth(dashed).user_id(f"Bearer {capsys.readouterr().out.strip()}") == 7
    # A flag wins over the environment.
    assert cli.main(["token", "7", "--jwt-key", KEY]) == 0
    assert TokenAuth(KEY).user_id(f"Bearer {capsys.readouterr().out.strip()}") == 7


def test_token_and_serve_refuse_bad_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("FEEDBEAM_JWT_KEY", raising=False)
    assert cli.main(["token", "7"]) == 2
    assert "--jwt-key" in capsys.readouterr().err
    assert cli.main(["token", "7", "--jwt-key", "short"]) == 2
    assert "32 bytes" in capsys.readouterr().err
    assert cli.main(["token", "7", "--jwt-key-file", str(tmp_path / "missing")]) == 2
    assert cli.main(["serve", "--workers", "0", "--jwt-key", KEY]) == 2


def test_serve_config_round_trips_to_workers(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    args = cli.build_parser().parse_args(
        ["serve", "--jwt-key-file", str(key_file), "--keyspace", "ks1", "--key-prefix", "p1",
         "--push-threshold", "50", "--redis-timeout-ms", "20", "--full-gc-every-s", "30"])
    from infra.settings import StackSettings

    config = build_config(args, StackSettings())
    assert (config.jwt_key, config.keyspace, config.key_prefix, config.push_threshold,
            config.redis_timeout_s, config.full_gc_every_s) == (KEY, "ks1", "p1", 50, 0.02, 30)
    import dataclasses

    env = {CONFIG_ENV: json.dumps(dataclasses.asdict(config))}
    assert config_from_environment(env) == config
    with pytest.raises(RuntimeError):
        config_from_environment({})


def test_serve_sets_the_read_caps_and_the_server_limits(capsys):
    from granian.constants import HTTPModes
    from infra.settings import StackSettings

    args = cli.build_parser().parse_args(
        ["serve", "--jwt-key", KEY, "--max-followees-scanned", "99", "--max-pulled-timelines", "10",
         "--tray-followees", "7", "--max-header-bytes", "16384", "--header-read-timeout-s", "2"])
    config = build_config(args, StackSettings())
    assert (config.max_followees_scanned, config.max_pulled_timelines, config.tray_followees) == (
        99, 10, 7)
    granian = server_options("granian", config)
    assert granian["http"] == HTTPModes.http1  # HTTP/2 would take 16 MiB of headers
    assert (granian["http1_settings"].max_buffer_size,
            granian["http1_settings"].header_read_timeout) == (16384, 2000)
    uvicorn = server_options("uvicorn", config)
    assert uvicorn["http"] == "serving.http_limits:BoundedHttpToolsProtocol"
    assert uvicorn["timeout_keep_alive"] == config.keep_alive_s
    # Refused before any server starts.
    assert cli.main(["serve", "--jwt-key", KEY, "--max-header-bytes", "100"]) == 2
    assert "max_header_bytes" in capsys.readouterr().err
    assert cli.main(["serve", "--jwt-key", KEY, "--tray-followees", "0"]) == 2
