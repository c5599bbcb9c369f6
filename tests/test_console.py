"""The console in a real browser: headless Chromium (the system package) driven by Playwright,
against a real uvicorn server holding a real runtime (SQLite or PostgreSQL, the emulator, a local
Qdrant). Signs in, reads every page and checks its numbers against `GET /v1/spend`, `GET
/v1/requests` and `sidecar status --json`, retries a dead letter, searches; saves a screenshot of
each page into $SIDECAR_SCREENSHOTS (default build/screenshots/).

Chromium is never downloaded: the test launches /usr/bin/chromium (apt package `chromium`); when
it is missing the test skips on a laptop and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from api.app import create_app
from api.cli import main
from tests.fixtures.services import missing_service
from tests.test_api import READ, WRITE, RunningApi
from worker import pipeline
from worker.runtime import Runtime
from worker.sql.models import Document
from worker.tasks import ingest_events

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("SIDECAR_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DOCS = [
    ("tea", "Green tea from the misty hills of Hangzhou, picked in early spring."),
    ("coffee", "Black coffee roasted dark, brewed strong at dawn in a copper pot."),
    ("bread", "Sourdough bread with a crackling crust and an open, chewy crumb."),
    ("rain", "La pluie tombe doucement sur les toits de Paris en automne."),
    ("rain-copy", "La pluie tombe doucement sur les toits de Paris en automne."),  # dedup: tokens avoided
]
PAGES = ("overview", "spend", "budgets", "sources", "deadletters", "ledger", "search")


def screenshots_dir() -> Path:
    path = Path(os.environ.get("SIDECAR_SCREENSHOTS") or ROOT / "build" / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        missing_service("playwright (the Python package)", exc)
    if not os.access(CHROMIUM, os.X_OK):
        missing_service("Chromium", FileNotFoundError(f"{CHROMIUM} (apt package chromium)"))
    with sync_playwright() as p:
        try:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as exc:  # a broken install is as missing as none
            missing_service("Chromium", exc)
        yield browser
        browser.close()


def drain(rt: Runtime) -> None:
    for _ in range(100):
        if pipeline.run_cycle(rt).idle:
            return
    raise AssertionError("work did not drain")


@pytest.fixture()
def served(make_runtime) -> Iterator[tuple[Runtime, RunningApi]]:
    """Four documents indexed and one dead letter (the emulator refuses its text), on a live API."""
    rt = make_runtime(api_tokens=WRITE, api_read_tokens=READ)
    events = [{"op": "upsert", "doc_id": d, "text": t} for d, t in DOCS]
    events.append({"op": "upsert", "doc_id": "refused", "text": "this one says <<BLOCKED>> to the provider"})
    ingest_events(rt, events)
    drain(rt)
    with rt.sessions() as s:
        assert (
            s.execute(sa.select(Document.status).where(Document.doc_id == "refused")).scalar_one() == "dead"
        )
    running = RunningApi(create_app(rt.settings, runtime=rt))
    yield rt, running
    running.stop()


def cli_status(monkeypatch, capsys, rt: Runtime) -> dict[str, Any]:
    monkeypatch.setenv("SIDECAR_DATABASE_URL", rt.settings.resolved_database_url())
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(rt.settings.data_dir))
    capsys.readouterr()
    assert main(["status", "--json"]) == 0
    answer: dict[str, Any] = json.loads(capsys.readouterr().out)
    return answer


class Console:
    """One browser page on the console, and a bearer client for the same API to compare with."""

    def __init__(self, browser: Any, url: str, name: str) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.url, self.name = url, name
        self.api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {READ}"}, timeout=30)

    def sign_in(self, token: str) -> None:
        self.page.goto(f"{self.url}/console")
        self.page.fill("#token", token)
        self.page.click("#signin-form button")
        self.page.wait_for_selector("#nav:not([hidden])")

    def open(self, view: str, query: str = "") -> Any:
        self.page.goto(f"{self.url}/console#{view}{query}")
        self.page.reload()  # a hash change alone keeps the old view when it is the same page
        self.page.wait_for_selector(f'#content[data-view="{view}"]:not([data-loading])')
        assert self.page.inner_text("#error") == "", self.page.inner_text("#error")
        return self.page

    def until(self, condition: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
        """Poll the page for `condition` (the page's CSP forbids wait_for_function's eval)."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            self.page.wait_for_timeout(50)

    def shot(self, view: str) -> None:
        self.page.screenshot(path=str(screenshots_dir() / f"console-{view}-{self.name}.png"), full_page=True)

    def value(self, selector: str) -> str:
        found: str = self.page.get_attribute(selector, "data-v")
        return found

    def table(self, name: str) -> list[dict[str, str]]:
        """Rows of a data table as {column key: data-v or text} (an empty table's note is no row)."""
        rows: list[dict[str, str]] = self.page.eval_on_selector_all(
            f'table[data-table="{name}"] tbody tr',
            """rows => rows.map(r => Object.fromEntries([...r.querySelectorAll('td[data-k]')]
                 .map(td => [td.dataset.k, td.dataset.v !== undefined ? td.dataset.v : td.textContent])))""",
        )
        return [row for row in rows if row]


def test_console_pages_show_what_the_api_and_cli_say(served, chromium, monkeypatch, capsys):
    rt, running = served
    db = "postgres" if "postgres" in rt.settings.resolved_database_url() else "sqlite"
    with httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {WRITE}"}, timeout=30) as w:
        assert w.put("/v1/budget/caps", json={"period": "day", "limit_cny": "0.5"}).status_code == 200
    c = Console(chromium, running.url, db)
    try:
        sign_in_read_only(c)
        check_overview(c, cli_status(monkeypatch, capsys, rt))
        check_spend(c)
        check_budgets_and_sources(c)
        check_ledger(c)
        check_search(c)
        check_retry(c, rt)
        assert c.errors == []
    finally:
        c.context.close()
        c.api.close()


def sign_in_read_only(c: Console) -> None:
    c.page.goto(f"{c.url}/console")
    c.page.wait_for_selector("#signin:not([hidden])")
    c.page.fill("#token", "not-a-token")
    c.page.click("#signin-form button")
    c.page.wait_for_selector("#signin-error:not(:empty)")
    assert "not a token" in c.page.inner_text("#signin-error")
    c.shot("signin")
    c.sign_in(READ)
    assert c.page.get_attribute("#who", "data-role") == "read"
    cookie = next(k for k in c.context.cookies() if k["name"] == "sidecar_console")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"


def check_overview(c: Console, status: dict[str, Any]) -> None:
    c.open("overview")
    assert int(c.value('.card[data-k="pending"]')) == status["documents"]["pending"]
    assert int(c.value('.card[data-k="dead"]')) == status["documents"]["dead"] == 1
    assert {k: int(v) for k, v in c.table("documents")[0].items()} == status["documents"]
    assert {k: int(v) for k, v in c.table("requests")[0].items()} == status["requests"]
    assert c.page.locator('[data-chart="rows"] rect').count() == 60
    backlog = c.page.locator('[data-chart="backlog"]')  # drawn from GET /v1/activity's backlog_series
    assert backlog.locator("h3").inner_text() == "Backlog per minute" and backlog.locator("svg").count() == 1
    c.shot("overview")


def check_spend(c: Console) -> None:
    c.open("spend", "?days=0")
    for by in ("day", "model", "collection", "lane"):
        expected = c.api.get("/v1/spend", params={"by": by}).json()["rows"]
        shown = c.table(f"spend-{by}")
        assert [r[by] for r in shown] == [str(r[by]) for r in expected]
        assert [int(r["tokens"]) for r in shown] == [r["tokens"] for r in expected]
        assert [r["cost_cny"] for r in shown] == [r["cost_cny"] for r in expected]
        assert [int(r["tokens_avoided_dedup"]) for r in shown] == [
            r["tokens_avoided_dedup"] for r in expected
        ]
    total = c.api.get("/v1/spend", params={"by": "day"}).json()["total"]
    assert int(c.value('.card[data-k="tokens"]')) == total["tokens"] > 0
    assert int(c.value('.card[data-k="tokens_avoided_dedup"]')) == total["tokens_avoided_dedup"] > 0
    assert c.value('.card[data-k="cost_cny"]') == total["cost_cny"]
    c.shot("spend")


def check_budgets_and_sources(c: Console) -> None:
    c.open("budgets")
    caps = c.table("caps")
    budget = c.api.get("/v1/budget").json()
    assert [r["spent_cny"] for r in caps] == [cap["spent_cny"] for cap in budget["caps"]]
    assert [r["limit_cny"] for r in caps] == ["0.500000000"]
    c.shot("budgets")
    c.open("sources")
    assert c.page.inner_text("#content") == "no sources"
    c.shot("sources")


def check_ledger(c: Console) -> None:
    c.open("ledger")
    ledger = c.api.get("/v1/requests", params={"limit": 100}).json()["items"]
    shown = c.table("ledger")
    assert [r["provider_request_id"] for r in shown] == [r["provider_request_id"] or "–" for r in ledger]
    pick = next(r["provider_request_id"] for r in ledger if r["provider_request_id"])
    c.page.fill('#ledger-filters input[name="provider_request_id"]', pick)
    c.page.click("#ledger-filters button")
    c.until(lambda: c.page.locator('table[data-table="ledger"] tbody tr').count() == 1, "one ledger row")
    assert [r["provider_request_id"] for r in c.table("ledger")] == [pick]
    c.shot("ledger")


def check_search(c: Console) -> None:
    c.open("search")
    c.page.fill('#search-form input[name="q"]', DOCS[1][1])
    c.page.click("#search-form button")
    c.page.wait_for_selector('table[data-table="hits"]')
    hits = c.table("hits")
    assert hits[0]["doc_id"] == "coffee" and len(hits) == len(DOCS)  # the dead letter has no points
    expected = c.api.get("/v1/search", params={"collection": "documents", "q": DOCS[1][1]}).json()
    assert [h["doc_id"] for h in hits] == [h["doc_id"] for h in expected["hits"]]
    c.shot("search")


def check_retry(c: Console, rt: Runtime) -> None:
    c.open("deadletters")
    (dead,) = c.table("deadletters")
    assert dead["last_error"].startswith("provider rejected the text")
    assert c.page.is_disabled(f'button[data-retry="{dead["id"]}"]')  # a read token cannot write
    c.shot("deadletters-read")
    c.page.click("#signout")
    c.page.wait_for_selector("#signin:not([hidden])")
    c.sign_in(WRITE)
    c.open("deadletters")
    c.page.click(f'button[data-retry="{dead["id"]}"]')
    c.page.wait_for_selector("#flash")
    c.page.wait_for_selector('#content[data-view="deadletters"]:not([data-loading])')
    assert c.table("deadletters") == [] and "no dead letters" in c.page.inner_text("#content")
    with rt.sessions() as s:
        assert s.get(Document, int(dead["id"])).status == "pending"
    c.shot("deadletters")
