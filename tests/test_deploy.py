"""deploy/: the Prometheus alert rules pass `promtool check rules` and their unit tests (`promtool test
rules`), the example Prometheus config is valid, the Grafana dashboard's queries parse as PromQL,
and the dashboard and the rules name only metrics that a real API's GET /metrics exposes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from api.app import create_app
from tests.fixtures.services import missing_service
from tests.test_api import RunningApi
from worker.settings import Settings
from worker.sql import schema

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "vector-sidecar.json"
RULES = DEPLOY / "prometheus" / "sidecar-alerts.yml"
RULE_TESTS = DEPLOY / "prometheus" / "sidecar-alerts.test.yml"
# Change capture's metrics (worker/capture/) appear only while a source is configured; their names
# are the capture contract, so the dashboard and the rules may use them all the same.
SOURCE_METRICS = {
    "sidecar_source_lag_bytes",
    "sidecar_source_lag_seconds",
    "sidecar_source_rows_total",
    "sidecar_source_errors_total",
    "sidecar_source_up",
}
METRIC = re.compile(r"\bsidecar_[a-z0-9_]+\b")


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        missing_service("promtool (apt package prometheus)", FileNotFoundError("promtool"))
    return str(found)


def run(argv: list[str], cwd: Path | None = None) -> str:
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def rule_queries() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_alert_rules_pass_promtool_and_their_unit_tests(promtool):
    assert "SUCCESS: 9 rules found" in run([promtool, "check", "rules", str(RULES)])
    run([promtool, "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent)
    alerts = {
        rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    }
    assert {
        "SidecarBacklogGrowing",
        "SidecarOldestPendingTooOld",
        "SidecarDeadLetters",
        "SidecarBudgetAt80Percent",
        "SidecarProviderPaused",
        "SidecarSourceLagging",
    } <= alerts
    tested = {
        t["alertname"]
        for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for t in case["alert_rule_test"]
    }
    assert tested == alerts  # every alert has a unit test


def test_example_prometheus_config_is_valid(promtool, tmp_path):
    for path in (DEPLOY / "prometheus").glob("*.yml"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "sidecar-read-token").write_text("r-token\n")
    run([promtool, "check", "config", "prometheus.yml"], cwd=tmp_path)


def test_dashboard_queries_are_promql(promtool, tmp_path):
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"] if p["type"] != "row")
    wanted = {"Backlog", "Oldest pending age", "Rows embedded per second", "Provider requests per second"}
    wanted |= {
        "429s per second",
        "Provider latency histogram",
        "Spend per day (CNY)",
        "Budget headroom (CNY)",
    }
    assert wanted | {"Source lag"} <= {p["title"] for p in dashboard["panels"]}
    # Grafana's $__rate_interval is not PromQL: check each query as a recording rule would be.
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, expr in enumerate(dashboard_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    run([promtool, "check", "rules", str(path)])


def exposed_names(text: str) -> set[str]:
    """Series names of a Prometheus text exposition: every family's samples, histograms' parts."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_dashboard_and_rules_name_only_metrics_the_api_exposes(sqlite_url, redis_url, tmp_path):
    schema.upgrade(sqlite_url)
    settings = Settings(
        _env_file=None,
        data_dir=tmp_path,
        database_url=sqlite_url,
        broker_url=redis_url,
        api_read_tokens="r-token",
        budget_daily_cny="1",
    )
    running = RunningApi(create_app(settings))
    try:
        response = httpx.get(f"{running.url}/metrics", headers={"Authorization": "Bearer r-token"})
    finally:
        running.stop()
    assert response.status_code == 200
    exposed = exposed_names(response.text)
    if not exposed & SOURCE_METRICS:  # no source configured in this app
        exposed |= SOURCE_METRICS
    for where, queries in (("dashboard", dashboard_queries()), ("rules", rule_queries())):
        named = {name for query in queries for name in METRIC.findall(query)}
        assert named, where
        assert named <= exposed, f"{where} names metrics /metrics does not expose: {sorted(named - exposed)}"
