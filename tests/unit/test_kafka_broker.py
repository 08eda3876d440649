"""The Apache Kafka test broker's pure parts: the version pin, the KRaft properties it writes, its
cluster ids, and the clear errors (never a crash) when Java 17 or Maven is missing. Starts no JVM
and runs no Maven."""

from __future__ import annotations

import base64
import os
import re
import stat
from pathlib import Path

import pytest

from workers import kafka_broker
from workers.kafka_broker import (COMPLETE, POM, ApacheKafka, KafkaUnavailable, auto_broker, formatted_cluster_id,
                                  java_bin, pinned_version, random_cluster_id, resolve_libs, server_properties,
                                  write_properties)


def read_properties(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value.replace("\\\\", "\\")
    return out


def test_the_version_is_pinned_once_in_the_pom():
    assert re.fullmatch(r"4\.\d+\.\d+", pinned_version())
    assert ApacheKafka(Path("unused")).version == pinned_version()
    assert "<version>${kafka.version}</version>" in POM.read_text()


def test_properties_describe_one_kraft_node_replicated_once(tmp_path):
    path = tmp_path / "server.properties"
    write_properties(path, server_properties(tmp_path / "data", 19092, 19093))
    p = read_properties(path)
    assert p["process.roles"] == "broker,controller" and p["node.id"] == "1"
    assert p["controller.quorum.bootstrap.servers"] == "127.0.0.1:19093"
    assert p["listeners"] == "PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093"
    assert p["advertised.listeners"] == "PLAINTEXT://127.0.0.1:19092"
    assert p["controller.listener.names"] == "CONTROLLER"
    assert p["log.dirs"] == str(tmp_path / "data")
    for key in ("offsets.topic.replication.factor", "transaction.state.log.replication.factor",
                "transaction.state.log.min.isr", "min.insync.replicas", "default.replication.factor"):
        assert p[key] == "1", key
    assert p["group.initial.rebalance.delay.ms"] == "0" and p["num.partitions"] == "4"
    assert p["auto.create.topics.enable"] == "true"
    assert "zookeeper.connect" not in p


def test_cluster_ids_are_kafka_uuids():
    ids = {random_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cid in ids:
        assert len(cid) == 22 and not cid.startswith("-")
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def fake_java(folder: Path, version_line: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return java


def test_no_java_is_a_clear_unavailable_error(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(KafkaUnavailable, match="java 17\\+ not found"):
        java_bin()
    with pytest.raises(KafkaUnavailable):  # what the test fixture turns into a skip
        ApacheKafka(tmp_path / "k").start()


@pytest.mark.parametrize("line, ok", [
    ('openjdk version "17.0.15" 2025-04-15', True),
    ('openjdk version "21" 2023-09-19', True),
    ('openjdk version "11.0.22" 2024-01-16', False),
    ('java version "1.8.0_392"', False),
])
def test_java_must_be_17_or_newer(tmp_path, monkeypatch, line, ok):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "bin", line).parent))
    if ok:
        assert java_bin() == str(tmp_path / "bin" / "java")
    else:
        with pytest.raises(KafkaUnavailable, match="needs java 17"):
            java_bin()


def test_java_home_wins_over_path(tmp_path, monkeypatch):
    fake_java(tmp_path / "home" / "bin", 'openjdk version "17.0.1"')
    monkeypatch.setenv("JAVA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "other", 'openjdk version "11.0.1"').parent))
    assert java_bin() == str(tmp_path / "home" / "bin" / "java")


def test_cached_jars_need_no_maven_and_missing_ones_name_maven(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(KafkaUnavailable, match=r"maven \(mvn\) not found"):
        resolve_libs("4.1.1", tmp_path / "cache")
    libs = tmp_path / "cache" / "kafka-4.1.1" / "libs"
    libs.mkdir(parents=True)
    (libs / "kafka_2.13-4.1.1.jar").write_bytes(b"")
    with pytest.raises(KafkaUnavailable):  # a folder without the completion mark is not trusted
        resolve_libs("4.1.1", tmp_path / "cache")
    (libs / COMPLETE).write_text("")
    assert resolve_libs("4.1.1", tmp_path / "cache") == libs


def test_up_picks_apache_kafka_where_java_runs_and_tansu_where_it_does_not(tmp_path, monkeypatch):
    monkeypatch.delenv("JAVA_HOME", raising=False)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    broker, why = auto_broker(cache)
    assert broker == "tansu" and "java 17+ not found" in why
    monkeypatch.setenv("PATH", str(fake_java(tmp_path / "old", 'openjdk version "11.0.1"').parent))
    assert auto_broker(cache)[0] == "tansu"
    java17 = fake_java(tmp_path / "bin", 'openjdk version "17.0.15"').parent
    monkeypatch.setenv("PATH", str(java17))
    broker, why = auto_broker(cache)  # java, but neither jars nor maven to fetch them
    assert broker == "tansu" and "maven (mvn) not found" in why
    version = pinned_version()
    libs = cache / f"kafka-{version}" / "libs"
    libs.mkdir(parents=True)
    (libs / COMPLETE).write_text("")
    assert auto_broker(cache) == ("apache-kafka", f"java 17+ found, Apache Kafka {version} jars cached")
    (libs / COMPLETE).unlink()
    mvn = java17 / "mvn"
    mvn.write_text("#!/bin/sh\nexit 1\n")
    mvn.chmod(mvn.stat().st_mode | stat.S_IEXEC)
    assert auto_broker(cache)[0] == "apache-kafka"


def test_a_failed_resolution_leaves_nothing_half_done(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\necho 'Could not resolve dependencies' >&2\nexit 1\n")
    mvn.chmod(mvn.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))
    with pytest.raises(RuntimeError, match="could not resolve org.apache.kafka:kafka_2.13:9.9.9") as err:
        resolve_libs("9.9.9", tmp_path / "cache")
    assert not isinstance(err.value, KafkaUnavailable)  # a broken resolution fails, it is not skipped
    assert "Could not resolve dependencies" in str(err.value)
    assert list((tmp_path / "cache" / "kafka-9.9.9").iterdir()) == []


def test_the_default_cache_is_git_ignored():
    root = Path(kafka_broker.__file__).resolve().parent.parent
    assert kafka_broker.CACHE_ROOT == root / ".streamrec"
    assert ".streamrec/" in (root / ".gitignore").read_text().split()


def test_a_broker_started_again_is_formatted_with_the_cluster_id_its_data_holds(tmp_path):
    """The storage format refuses another cluster id than the one a log directory holds, so a
    second ``streamrec up`` on the same data would fail with a fresh random one."""
    assert formatted_cluster_id(tmp_path) is None  # never formatted: a new id is drawn
    cid = random_cluster_id()
    (tmp_path / "meta.properties").write_text(f"#\n#Sun Nov 29 19:30:00 UTC 2026\nnode.id=1\ndirectory.id=x\n"
                                              f"version=1\ncluster.id={cid}\n")
    assert formatted_cluster_id(tmp_path) == cid
    (tmp_path / "meta.properties").write_text("node.id=1\nversion=1\n")
    assert formatted_cluster_id(tmp_path) is None
