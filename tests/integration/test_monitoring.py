"""Watching a running worker with ordinary tools: the real Prometheus server (Debian's
``prometheus`` package) scrapes ``/metrics``, and its HTTP API gives back the counts of what the
test sent."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request

import pytest

from tests.integration.conftest import CATALOG, Harness, items_of
from workers.stack import free_port, port_open, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


def query(port: int, promql: str) -> dict[str, float]:
    """An instant query; label set (as text) -> value."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in body["data"]["result"]}


def test_prometheus_scrapes_a_running_worker_and_its_counts_match_what_was_sent(stack, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("no `prometheus` on PATH (Debian's package `prometheus`; .ci/run installs it)")
    metrics_port, prom_port = free_port(), free_port()
    h = Harness(stack, tmp_path, metrics_port=metrics_port)
    config = tmp_path / "prometheus.yml"
    config.write_text(f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: streamrec
    static_configs:
      - targets: ["127.0.0.1:{metrics_port}"]
""")
    log = tmp_path / "prometheus.log"
    prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(prom_port), "prometheus", 60, prom, log)
        h.catalog(CATALOG)
        clicks = [h.click(f"p{n % 4}", i) for n, i in enumerate(items_of("astronomy")[:10])]
        queries = [h.query("p0", "telescopes and planets"), h.query("p1", "distant galaxies")]
        h.run(clicks + queries)
        h.send([], raw=[(b"p2", b"{broken"), (b"p3", b'{"type": "click"}')])
        wait_for(lambda: h.stats().get("dead_letters", 0) >= 2, "two dead letters", 60, h.worker.proc,
                 h.worker.log_path)

        def scraped() -> bool:
            got = query(prom_port, 'sum(streamrec_stats_total{job="streamrec",name="dead_letters"})')
            return bool(got) and max(got.values()) >= 2

        wait_for(scraped, "Prometheus to scrape the worker's counts", 60, prom, log)
        assert list(query(prom_port, 'up{job="streamrec"}').values()) == [1.0]
        stats = h.stats()

        def total(name: str) -> float:
            (value,) = query(prom_port, f'sum(streamrec_stats_total{{job="streamrec",name="{name}"}})').values()
            return value

        assert total("events_applied") == len(clicks) + len(queries) == stats["events_applied"]
        assert total("events_in") == len(clicks) + len(queries) + 2 == stats["events_in"]
        assert total("recommendations_out") == stats["recommendations_out"] >= len(clicks) + len(queries)
        assert total("items_upserted") == len(CATALOG)
        by_code = {json.loads(k)["error"]: v
                   for k, v in query(prom_port, 'streamrec_dead_letters_total{job="streamrec"}').items()}
        assert sum(by_code.values()) == 2 and by_code.get("bad_json") == 1, by_code
        # events in done batches: the dead-lettered ones too
        assert query(prom_port, 'sum(streamrec_events_total{job="streamrec"})') == {"{}": stats["events_in"]}
        agents = query(prom_port, 'streamrec_agent_up{job="streamrec"}')
        assert sorted(json.loads(k)["agent"] for k, v in agents.items() if v == 1) == ["catalog", "events", "requests"]
    finally:
        prom.terminate()
        try:
            prom.wait(10)
        except subprocess.TimeoutExpired:
            prom.kill()
        h.close()
