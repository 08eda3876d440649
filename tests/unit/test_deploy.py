"""The deployment files agree with the settings object: no network, no Docker."""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from models.params import ModelParams
from workers.settings import Settings

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
ENV_EXAMPLE = DEPLOY / "streamrec.env.example"

PREFIX = "STREAMREC_"
SETTINGS_FIELDS = set(Settings.model_fields)
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelParams)}
# A STREAMREC_ assignment in the example file, commented out or not.
ENV_LINE = re.compile(r"^\s*#?\s*(STREAMREC_[A-Za-z0-9_]+)=(.*)$")
# ${VAR}, ${VAR:-default}, ${VAR-default}; $$ is a literal $.
INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def field_of(var: str) -> str | None:
    """The settings field a STREAMREC_ variable sets (``model.<param>`` for nested ones), or None."""
    assert var.startswith(PREFIX), var
    name = var[len(PREFIX):].lower()
    if name.startswith("model__"):
        param = name[len("model__"):]
        return f"model.{param}" if param in MODEL_FIELDS else None
    return name if name in SETTINGS_FIELDS and name != "model" else None


def all_fields() -> set[str]:
    return {f for f in SETTINGS_FIELDS if f != "model"} | {f"model.{p}" for p in MODEL_FIELDS}


def interpolate(value: str) -> str:
    """Compose's interpolation with every variable unset: ``${VAR:-default}`` becomes the default."""
    return INTERPOLATION.sub(lambda m: "$" if m.group(0) == "$$" else (m.group(2) or ""), value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def worker_env(compose) -> dict[str, str]:
    env = compose["services"]["worker"].get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else (json.dumps(v) if isinstance(v, bool) else str(v)) for k, v in env.items()}


@pytest.fixture
def clean_env(monkeypatch):
    """No STREAMREC_ variable from the surrounding environment leaks into a test."""
    for var in list(os.environ):
        if var.startswith(PREFIX):
            monkeypatch.delenv(var)
    return monkeypatch


def example_entries() -> list[tuple[int, str, str]]:
    out = []
    for lineno, line in enumerate(ENV_EXAMPLE.read_text().splitlines(), 1):
        m = ENV_LINE.match(line)
        if m:
            out.append((lineno, m.group(1), m.group(2)))
    return out


# ---- docker-compose.yml -------------------------------------------------------------------------

def test_compose_has_the_services(compose):
    services = compose["services"]
    for name in ("kafka", "redis", "milvus", "etcd", "minio", "worker"):
        assert name in services, name
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["redis"]["image"].startswith("redis:7.4")
    assert services["milvus"]["image"].startswith("milvusdb/milvus:v2.5")


def test_worker_env_names_real_settings(worker_env):
    streamrec_vars = [k for k in worker_env if k.startswith(PREFIX)]
    assert streamrec_vars, "the worker service sets no STREAMREC_ variable"
    unknown = [k for k in streamrec_vars if field_of(k) is None]
    assert not unknown, f"STREAMREC_ variables in docker-compose.yml that name no Settings field: {unknown}"


def test_worker_is_configured_only_through_streamrec_vars(worker_env):
    assert [k for k in worker_env if not k.startswith(PREFIX)] == []


def test_worker_depends_on_healthy_backends(compose):
    services = compose["services"]
    depends = services["worker"]["depends_on"]
    names = set(depends) if isinstance(depends, (dict, list)) else set()
    assert {"kafka", "redis", "milvus"} <= names
    for name in ("kafka", "redis", "milvus"):
        if isinstance(depends, dict):
            assert depends[name].get("condition") == "service_healthy", name
        assert "healthcheck" in services[name], f"{name} has no healthcheck to wait on"


def test_worker_builds_from_the_dockerfile(compose):
    build = compose["services"]["worker"]["build"]
    context = (COMPOSE.parent / build["context"]).resolve()
    assert (context / build["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert (context / "pyproject.toml").is_file()


def test_kafka_is_single_node_kraft(compose):
    env = {k: str(v) for k, v in compose["services"]["kafka"]["environment"].items()}
    for key in ("KAFKA_NODE_ID", "KAFKA_PROCESS_ROLES", "KAFKA_LISTENERS", "KAFKA_ADVERTISED_LISTENERS",
                "KAFKA_CONTROLLER_LISTENER_NAMES", "KAFKA_CONTROLLER_QUORUM_VOTERS",
                "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP", "KAFKA_INTER_BROKER_LISTENER_NAME"):
        assert env.get(key), key
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"] == "1"
    assert env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"] == "1"
    assert env["KAFKA_AUTO_CREATE_TOPICS_ENABLE"].lower() == "false"
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]


def test_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_settings_from_the_compose_worker_env(clean_env, worker_env):
    for key, value in worker_env.items():
        clean_env.setenv(key, interpolate(value))
    s = Settings(_env_file=None)
    assert s.kafka_bootstrap == "kafka:9092"
    assert s.milvus_uri == "http://milvus:19530"
    assert s.redis_url.startswith("redis://:") and s.redis_url.endswith("@redis:6379/0")
    assert "$" not in s.redis_url


def test_interpolate():
    assert interpolate("redis://:${REDIS_PASSWORD:-pw}@redis:6379/0") == "redis://:pw@redis:6379/0"
    assert interpolate("${A:-}") == "" and interpolate("${A}") == "" and interpolate("${A-x}") == "x"
    assert interpolate("a$$b") == "a$b"


# ---- Dockerfile ---------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_entrypoint_and_cmd():
    instr = dockerfile_instructions()
    entrypoint = [rest for word, rest in instr if word == "ENTRYPOINT"]
    cmd = [rest for word, rest in instr if word == "CMD"]
    assert entrypoint and json.loads(entrypoint[-1]) == ["streamrec"]
    assert cmd and json.loads(cmd[-1]) == ["worker"]


def test_dockerfile_base_offline_and_non_root():
    instr = dockerfile_instructions()
    text = DOCKERFILE.read_text()
    assert "python:3.11-slim" in text
    assert any(word == "RUN" and "pip install" in rest and re.search(r"\s\.(\s|$)", rest) for word, rest in instr)
    env = " ".join(rest for word, rest in instr if word == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", env) and re.search(r"\bTRANSFORMERS_OFFLINE=1\b", env)
    users = [rest for word, rest in instr if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")


# ---- streamrec.env.example ----------------------------------------------------------------------

def test_example_names_only_real_fields():
    entries = example_entries()
    assert entries
    unknown = [f"line {n}: {var}" for n, var, _ in entries if field_of(var) is None]
    assert not unknown, f"streamrec.env.example names no such Settings field: {unknown}"


def test_example_covers_every_field():
    documented = {field_of(var) for _, var, _ in example_entries()}
    missing = sorted(all_fields() - documented)
    assert not missing, f"settings missing from streamrec.env.example: {missing}"


def test_example_lists_each_field_once():
    seen: dict[str, int] = {}
    for n, var, _ in example_entries():
        assert var not in seen, f"{var} on lines {seen[var]} and {n}"
        seen[var] = n


def test_example_values_are_the_defaults(clean_env):
    """Set every example line at once: it must parse, and equal the defaults it claims to show."""
    defaults = Settings(_env_file=None)
    for _, var, value in example_entries():
        clean_env.setenv(var, value)
    documented = Settings(_env_file=None)
    assert documented.model_dump() == defaults.model_dump()
    assert documented.milvus_token.get_secret_value() == defaults.milvus_token.get_secret_value() == ""


def test_example_keeps_secrets_empty():
    for n, var, value in example_entries():
        if "TOKEN" in var or "PASSWORD" in var or "SECRET" in var:
            assert value == "", f"line {n}: {var} holds a value"
        if "://" in value:
            assert "@" not in value, f"line {n}: {var} holds credentials"


def test_prometheus_scrapes_the_port_the_compose_workers_serve(worker_env):
    prom = yaml.safe_load((COMPOSE.parent / "monitoring" / "prometheus.yml").read_text())
    (job,) = prom["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["dns_sd_configs"][0]["port"] == int(worker_env["STREAMREC_METRICS_PORT"])
    assert job["dns_sd_configs"][0]["names"] == ["worker"]
    assert worker_env["STREAMREC_METRICS_HOST"] == "0.0.0.0"  # reachable from the Prometheus container


def test_the_dashboard_charts_only_metrics_the_worker_exports():
    import json
    import re

    from streams.metrics import Metrics

    m = Metrics()
    m.counted({"events_in": 1}, ["bad_json"])
    m.retried("events batch")
    m.agent("events", True)
    m.lag({("streamrec.events", 0): 3})
    exported = {line.split("{")[0].split(" ")[0] for line in m.render().splitlines() if line and not line[0] == "#"}
    dash = json.loads((COMPOSE.parent / "monitoring" / "grafana" / "streamrec.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b(streamrec_[a-z_]+)", e)}
    assert len(dash["panels"]) >= 8 and used
    assert used <= exported, used - exported
