"""Prometheus for the metrics tests: scraping a mount's /metrics, parsing the text with
prometheus-client's parser, and Debian's `prometheus` server started on 127.0.0.1 with its own
data dir (stopped by its PID)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.servers import start_on_a_free_port, stop_process

PROMETHEUS = "/usr/bin/prometheus"
PROMTOOL = "/usr/bin/promtool"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        return resp.read().decode()


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value} of an exposition."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found[(name, tuple(sorted(labels.items())))]


def total(found: Samples, name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`."""
    return sum(
        v for (n, ls), v in found.items()
        if n == name and all(dict(ls).get(k) == want for k, want in labels.items())
    )


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )


@dataclass
class PrometheusServer:
    """`prometheus` scraping `targets` (host:port) every second."""

    workdir: Path
    targets: list[str]
    port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self) -> PrometheusServer:
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "prometheus.yml"
        config.write_text(json.dumps({  # YAML is a superset of JSON
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "corfs", "static_configs": [
                {"targets": self.targets}
            ]}],
        }))
        log = self.workdir / "prometheus.log"

        def launch(port: int) -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}",
                 f"--storage.tsdb.path={self.workdir}/data",
                 f"--web.listen-address=127.0.0.1:{port}"],
                stdout=open(log, "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )

        self.port, self.proc = start_on_a_free_port(launch, log, timeout=30)
        self._wait_ready(timeout=30)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Prometheus listens before its storage is open and answers 503 until then."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5):
                    return
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    raise
            time.sleep(0.2)

    def query(self, expr: str) -> list[dict]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        with urllib.request.urlopen(url, timeout=10) as resp:
            answer = json.load(resp)
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def wait_query(self, expr: str, timeout: float = 30.0) -> list[dict]:
        """The result of `expr` once it has one (after a scrape)."""
        deadline = time.monotonic() + timeout
        while not (result := self.query(expr)):
            assert time.monotonic() < deadline, f"no result for {expr} within {timeout} s"
            time.sleep(0.2)
        return result

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
