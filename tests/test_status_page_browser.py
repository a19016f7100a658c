"""The status page in a real headless Chromium over a real run on a Ray worker actor.

A task is held in the middle of its prefill (its progress callback waits) while the browser loads
the page: the rendered DOM must show the worker, a finished task, the task in prefill with its
exact progress, a queued task and the throughput plot; without Ray's token the page is refused.
"""

from __future__ import annotations

import os
import threading
import urllib.error
import urllib.request
from html.parser import HTMLParser

import pytest

from cluster.api import LLM
from cluster.service.ray_token import ray_auth_token
from cluster.service.run_snapshot import RunSnapshot
from cluster.service.status_page import StatusPage
from scheduler.request import SamplingParams
from tests.browser import dump_dom, screenshot


class _Rows(HTMLParser):
    """Elements carrying ``data-*`` attributes, with the text inside each table row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []  # {"attrs": {...}, "text": str}
        self.marked: list[tuple[str, dict]] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if any(k.startswith("data-") or k.startswith("aria-") for k in a):
            self.marked.append((tag, a))
        if tag == "tr":
            self._open.append({"attrs": a, "text": ""})

    def handle_endtag(self, tag):
        if tag == "tr" and self._open:
            self.rows.append(self._open.pop())

    def handle_data(self, data):
        for r in self._open:
            r["text"] += data + " "


T1_PROMPT = [(7 * i) % 500 + 1 for i in range(150)]


def _engine_line(dom: str) -> str:
    """The header's engine line, unescaped."""
    import html
    import re

    return html.unescape(re.search(r'id="engine">(.*?)</span>', dom, re.S).group(1))


def _task_section(dom: str) -> dict:
    """The task section's state, meta line and text, unescaped."""
    import html
    import re

    head = re.search(r'<section id="task"([^>]*)>', dom).group(1)
    state = re.search(r'data-state="([^"]*)"', head)
    meta = re.search(r'<div class="meta" id="task-meta">(.*?)</div>', dom, re.S).group(1)
    text = re.search(r'<pre id="task-text">(.*?)</pre>', dom, re.S).group(1)
    return {
        "state": state.group(1) if state else None,
        "meta": html.unescape(meta),
        "text": html.unescape(text),
    }


def _parse(dom: str) -> _Rows:
    p = _Rows()
    p.feed(dom)
    return p


@pytest.mark.slow
@pytest.mark.ray
def test_browser_sees_workers_and_a_task_in_prefill_and_is_refused_without_token(ray_cluster):
    llm = LLM(model="tiny", device="cpu", executor="ray", prefill_chunk=32)
    held, release = threading.Event(), threading.Event()
    at_hold: dict = {}

    def on_step(task_id, p):
        # Hold the second task after its second prefill chunk, while the browser looks.
        if task_id == "t2" and p.prefill_done >= 64 and not held.is_set():
            at_hold.update(snap=rs.snapshot())
            held.set()
            release.wait(300)

    rs = RunSnapshot(llm, sample_every_s=0.005, on_step=on_step)
    rs.submit(T1_PROMPT, SamplingParams(max_new_tokens=24))
    rs.submit([(11 * i) % 500 + 1 for i in range(200)], SamplingParams(max_new_tokens=8))
    rs.submit([(13 * i) % 500 + 1 for i in range(40)], SamplingParams(max_new_tokens=4))
    runner = threading.Thread(target=rs.run, daemon=True)
    runner.start()
    try:
        assert held.wait(300), "the second task never reached its prefill"
        snap = at_hold["snap"]
        with StatusPage(rs.snapshot, task_fn=rs.task_view) as page:  # token=None: Ray's own
            token = ray_auth_token()
            dom = dump_dom(f"{page.url}?token={token}")
            task_dom = dump_dom(f"{page.url}?token={token}#task=t1")  # the id's link
            unknown_dom = dump_dom(f"{page.url}?token={token}#task=t9")
            refused_dom = dump_dom(page.url)
            for path in ("", "api/snapshot"):
                with pytest.raises(urllib.error.HTTPError) as e:
                    urllib.request.urlopen(page.url + path, timeout=30)
                assert e.value.code == 401

            def restarted():  # the engine fields of one that Ray has started again, twice
                snap = rs.snapshot()
                why = "its process died (a crash, the OOM killer, a kill)"
                return {**snap, "engine": {**snap["engine"], "restarts": 2, "last_restart": why}}

            with StatusPage(restarted, task_fn=rs.task_view) as again:
                restart_dom = dump_dom(f"{again.url}?token={token}")
            if os.environ.get("TILERUN_STATUS_SCREENSHOT"):
                screenshot(f"{page.url}?token={token}", os.environ["TILERUN_STATUS_SCREENSHOT"])
        release.set()
        runner.join(timeout=300)
        # t1's text from the engine again (greedy: the same), to hold the page's copy against
        t1_text = llm.generate([T1_PROMPT], SamplingParams(max_new_tokens=24))[0].text
    finally:
        release.set()
        runner.join(timeout=300)
        llm.shutdown()

    page_dom = _parse(dom)
    # The worker: rank 0 on the CPU with the engine's KV block pool.
    workers = [r for r in page_dom.rows if "data-rank" in r["attrs"]]
    assert [w["attrs"]["data-rank"] for w in workers] == ["0"]
    assert "cpu" in workers[0]["text"]
    blocks = llm.engine.scheduler.blocks.num_blocks
    used = snap["workers"][0]["kv_used"]["device"]
    assert f"{used:,} / {blocks:,} used" in " ".join(workers[0]["text"].split())

    # The tasks: t1 done, t2 held mid-prefill with its exact progress, t3 queued.
    tasks = {r["attrs"]["data-task"]: r for r in page_dom.rows if "data-task" in r["attrs"]}
    assert {k: v["attrs"]["data-state"] for k, v in tasks.items()} == {
        "t1": "done",
        "t2": "running",
        "t3": "queued",
    }
    t2 = next(t for t in snap["tasks"] if t["id"] == "t2")
    assert 64 <= t2["prefill_done"] < 200 and t2["prefill_total"] == 200
    assert tasks["t2"]["attrs"]["data-prefill-done"] == str(t2["prefill_done"])
    pct = round(100 * t2["prefill_done"] / 200)
    assert f"{t2['prefill_done']} / 200 ({pct}%)" in tasks["t2"]["text"]
    assert "150 / 150 (100%)" in tasks["t1"]["text"] and "24 / 24" in tasks["t1"]["text"]
    t2_bars = [
        a
        for _, a in page_dom.marked
        if a.get("role") == "progressbar" and a.get("aria-valuemax") == "200"
    ]
    assert [b["aria-valuenow"] for b in t2_bars] == [str(t2["prefill_done"])]

    # Throughput over time: a plotted series per chart, one point per sample taken so far.
    series = [a for tag, a in page_dom.marked if tag == "polyline"]
    assert len(series) == 2 and int(series[0]["data-points"]) == len(snap["throughput"]) > 0
    assert "model tiny" in dom
    # An engine Ray started again says how often, and why the last one went.
    assert "engine restarted 2\u00d7 (last: its process died (a crash" in _engine_line(restart_dom)
    assert "engine restarted" not in _engine_line(dom)

    # URL#task=ID (where a task's id links) shows that task and its text; no section without.
    assert 'id="task" hidden' in dom
    shown = _task_section(task_dom)
    assert shown["state"] == "done"
    assert shown["meta"].startswith("done") and "24 / 24 tokens" in shown["meta"]
    assert shown["text"] == rs.task_view("t1")["text"] == t1_text
    assert _task_section(unknown_dom)["meta"] == "no task 't9'"
    assert 'href="#task=t2"' in dom

    # Without the token the browser gets Ray-style 401, no data.
    assert "401 Unauthorized" in refused_dom and "data-rank" not in refused_dom

    # The run carried on after the browser left: every task finished.
    assert [t["state"] for t in rs.snapshot()["tasks"]] == ["done", "done", "done"]
