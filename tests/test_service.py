"""The long-lived service for real: `tilerun up/submit/status/result/cancel/down` as subprocesses
against a Ray head that `up` starts, a real SQLite store, real worker and engine deaths."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.service.head import group_pids
from cluster.service.store import TaskStore

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# prefill_chunk 4: a long prompt's prefill takes hundreds of steps, long enough to kill a worker in
ENGINE = {
    "model": "tiny",
    "device": "cpu",
    "dtype": "float32",
    "max_model_len": 4096,
    "prefill_chunk": 4,
    "overlap_schedule": "true",  # the service's steps overlap; references run one at a time
}
LONG = [(i * 7) % 500 + 1 for i in range(1800)]
# a task to cancel mid-run: ~12 s of decode on an idle 2-core CPU, so that `tilerun cancel`
# (a new process, about a second idle, several on a loaded machine) lands before it is done
CANCEL_NEW = 3800


def tilerun(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ok(*args: str, timeout: int = 600):
    r = tilerun(*args, timeout=timeout)
    assert r.returncode == 0, f"tilerun {' '.join(map(str, args))}: {r.stderr[-3000:]}"
    return json.loads(r.stdout) if "--json" in args else r.stdout


def reference(ids: list[int], max_new_tokens: int) -> list[int]:
    """`tilerun run` (one-shot, in-process worker) on the same inputs and engine fields, one
    step at a time (the service overlaps its steps)."""
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in ENGINE.items() if k != "overlap_schedule"]
    out = ok(
        "run", *flags, "--executor", "local", "--json", "--no-overlap-schedule",
        "--prompt-token-ids", ",".join(map(str, ids)), "--max-new-tokens", str(max_new_tokens),
    )  # fmt: skip
    return out["token_ids"]


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    home = tmp_path_factory.mktemp("svc")
    cfg = home / "cluster.yaml"
    cfg.write_text(
        "".join(f"{k}: {v}\n" for k, v in ENGINE.items())
        # one restart: the first engine kill is survived by itself, the second needs `up`
        + "max_attempts: 3\nnum_cpus: 4\nengine_restarts: 1\n"
        # prompts of 1000 tokens and more keep their KV for a re-run (LONG's 1800 included)
        + "kv_prefix_min_tokens: 1000\n"
    )
    info = ok("up", cfg, "--home", home, "--json")
    yield home, cfg, info
    if (home / "cluster.json").exists():
        tilerun("down", "--home", home)


def submit(home: Path, ids: list[int], n: int) -> str:
    return ok("submit", "--home", home, "--prompt-token-ids", ",".join(map(str, ids)),
              "--max-new-tokens", n, "--json")["id"]  # fmt: skip


def wait_until(pred, timeout: float = 300, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError("timed out")


def assert_cancelled(store: TaskStore, tid: str) -> None:
    """The task ends cancelled; if it ran to its end first, say so (not a 300 s time-out)."""
    t = wait_until(lambda: (t := store.get(tid)).state in ("cancelled", "done", "failed") and t)
    assert t.state == "cancelled", f"{tid} ended {t.state} after {t.generated} tokens, uncancelled"


def test_up_submit_status_results_equal_tilerun_run(service):
    home, _, info = service
    # the GCS is where Ray puts it (the node's IP); the dashboard stays on loopback
    assert info["ray_address"].rsplit(":", 1)[1].isdigit()
    assert info["ray_dashboard"].startswith("http://127.0.0.1:")
    assert info["home"] == str(home)
    prompts = [(list(range(1, 40)), 8), ([5, 6, 7], 6), ([(i * 13) % 500 for i in range(300)], 7)]
    ids = [submit(home, p, n) for p, n in prompts]
    st = ok("status", "--home", home, "--json")
    assert {t["id"] for t in st["tasks"]} >= set(ids)
    assert [w["name"] for w in st["workers"]] == ["tilerun-worker-0"]
    assert st["workers"][0]["device"] == "cpu" and st["engine"]["model"] == "tiny"
    for tid, (p, n) in zip(ids, prompts):
        r = ok("result", tid, "--wait", "--home", home, "--json")
        assert r["state"] == "done" and r["finish_reason"] == "length"
        assert r["token_ids"] == reference(p, n)
        assert set(r) >= {"token_ids", "text", "finish_reason", "metrics", "devices", "wall_s"}
        assert r["metrics"]["ttft_s"] > 0 and r["metrics"]["prompt_tokens"] == len(p)
    table = ok("status", "--home", home)
    assert ids[0] in table and "done" in table and "tilerun-worker-0" in table
    # the engine's status page: loopback, Ray's token or nothing
    import urllib.error
    import urllib.request

    from cluster.service.ray_token import ray_auth_token

    url = info["status_page"]
    assert url.startswith("http://127.0.0.1:")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "api/snapshot", timeout=60)
    assert refused.value.code == 401
    req = urllib.request.Request(
        url + "api/snapshot", headers={"Authorization": f"Bearer {ray_auth_token()}"}
    )
    snap = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert {t["id"] for t in snap["tasks"]} >= set(ids)
    assert snap["workers"][0]["name"] == "tilerun-worker-0"


RAY_FIRST = """
import sys
import ray  # first, as a user's script may: Ray reads its configuration now
from cluster.service.client import Service

svc = Service(sys.argv[1])
tid = svc.submit(prompt_token_ids=[5, 6, 7], max_new_tokens=4)
print(svc.snapshot()["engine"]["ready"], tid)
"""


def test_a_script_that_imports_ray_first_can_use_the_service(service):
    """The Python client turns Ray's token mode on whatever was imported first (before, a
    script importing ray first was refused: "Authentication token is missing")."""
    home, _, _ = service
    r = subprocess.run(
        [sys.executable, "-c", RAY_FIRST, str(home)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    ready, tid = r.stdout.split()
    assert ready == "True"
    got = ok("result", tid, "--wait", "--home", home, "--json")["token_ids"]
    assert got == reference([5, 6, 7], 4)


def test_twenty_concurrent_submits_all_stored_once_and_run(service):
    home, _, _ = service
    before = {t.id for t in TaskStore(home / "tasks.db").list()}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "cluster.cli",
                "submit",
                "--home",
                str(home),
                "--prompt-token-ids",
                f"{i + 1},{i + 2},{i + 3}",
                "--max-new-tokens",
                "2",
                "--json",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for i in range(20)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    ids = [json.loads(o)["id"] for o, _ in outs]
    new = [t for t in TaskStore(home / "tasks.db").list() if t.id not in before]
    assert len(set(ids)) == 20 and sorted(t.id for t in new) == sorted(ids)
    assert sorted(t.prompt_token_ids[0] for t in new) == list(range(1, 21))
    store = TaskStore(home / "tasks.db")
    wait_until(lambda: all(store.get(i).state == "done" for i in ids))


@pytest.mark.parametrize(
    "job, flags, match",
    [
        (
            "prompt_token_ids: [1, 2]\nmax_new_tokenz: 3\n",
            [],
            r"line 2: unknown field 'max_new_tokenz'; did you mean 'max_new_tokens'",
        ),
        (
            "prompt_token_ids: [1, 2]\nmax_new_tokens: many\n",
            [],
            r"line 2: max_new_tokens must be an integer, got 'many'",
        ),
        (
            "prompt_token_ids: [1, 2]\n",
            ["--max-new-tokens", "-3"],
            r"max_new_tokens must be a positive integer, got -3",
        ),
        (
            f"prompt_token_ids: {[1] * 4088}\nmax_new_tokens: 16\n",
            [],
            r"exceeds the model's context limit max_model_len=4096 by 8 tokens",
        ),
        ("prompt_token_ids: [1, 2]\ntp: 2\n", [], r"tp=2 differs from the running service's tp=1"),
        ("prompt_token_ids: [1, 99999]\n", [], r"outside the model's vocabulary \[0, 512\)"),
        ("max_new_tokens: 3\n", [], r"give exactly one of prompt, prompt_file, prompt_token_ids"),
    ],
)
def test_malformed_job_refused_at_submit_nothing_stored(service, tmp_path, job, flags, match):
    import re

    home, _, _ = service
    before = len(TaskStore(home / "tasks.db").list())
    p = tmp_path / "job.yaml"
    p.write_text(job)
    r = tilerun("submit", p, *flags, "--home", home)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("tilerun: error: ") and len(r.stderr.strip().splitlines()) == 1
    assert re.search(match, r.stderr), r.stderr
    assert len(TaskStore(home / "tasks.db").list()) == before


def test_cancel_running_task(service):
    home, _, _ = service
    tid = submit(home, LONG[:200], CANCEL_NEW)
    store = TaskStore(home / "tasks.db")
    wait_until(lambda: store.get(tid).state == "running")
    assert "cancel" in ok("cancel", tid, "--home", home)
    assert_cancelled(store, tid)
    r = tilerun("result", tid, "--home", home)
    assert r.returncode == 2 and "was cancelled" in r.stderr


def test_cancel_one_of_two_running_tasks_mid_run(service):
    """Two tasks share the steps; one is cancelled while its next step is already on the
    workers (the service overlaps steps): the other's tokens are those of a run alone."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    a = submit(home, LONG[:100], CANCEL_NEW)
    b = submit(home, [4, 5, 6, 7, 8], 600)
    wait_until(lambda: store.get(a).generated > 2 and store.get(b).generated > 2)
    assert "cancel" in ok("cancel", a, "--home", home)
    assert_cancelled(store, a)
    r = ok("result", b, "--wait", "--home", home, "--json")
    assert store.get(b).state == "done" and store.get(a).generated < CANCEL_NEW
    assert r["token_ids"] == reference([4, 5, 6, 7, 8], 600)


def test_worker_killed_during_prefill_task_completes_with_same_tokens(service):
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    pid = ok("status", "--home", home, "--json")["workers"][0]["pid"]  # before: status is slow
    victim = submit(home, LONG, 5)
    # running is written when the engine admits the task, before its first step; its prefill
    # takes 450 steps of 4 tokens, so a kill within a poll of that lands inside the prefill
    wait_until(lambda: store.get(victim).state == "running", every=0.01)
    t = store.get(victim)
    assert t.state == "running" and t.prefill_done < len(LONG)
    os.kill(pid, signal.SIGKILL)
    behind = submit(home, [9, 8, 7], 4)  # queued while the workers are rebuilt: not lost
    r = ok("result", victim, "--wait", "--home", home, "--json")
    assert r["attempts"] == 2 and r["token_ids"] == reference(LONG, 5)
    assert ok("result", behind, "--wait", "--home", home, "--json")["token_ids"] == reference(
        [9, 8, 7], 4
    )
    st = ok("status", "--home", home, "--json")
    assert st["engine"]["rebuilds"] == 1 and st["workers"][0]["pid"] != pid


def test_worker_killed_while_decoding_a_long_prompt_restores_its_prefill(service):
    """A task whose prompt is long enough saves its prompt KV once prefilled; its worker killed
    mid-decode, the new run goes on from the tokens stored so far (they end its prompt) and
    reads the whole prompt back instead of prefilling it: tilerun run's tokens; the files go at
    the end."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    prompt = [(i * 11) % 500 + 1 for i in range(1200)]
    pid = ok("status", "--home", home, "--json")["workers"][0]["pid"]
    tid = submit(home, prompt, 600)
    wait_until(lambda: (p := store.partial(tid)) is not None and len(p[1]) >= 20, every=0.02)
    saved = home / "kv" / f"{tid}.rank0.safetensors"
    assert saved.is_file()
    os.kill(pid, signal.SIGKILL)
    r = ok("result", tid, "--wait", "--home", home, "--json")
    assert r["attempts"] == 2 and r["metrics"]["restored_tokens"] == len(prompt)
    assert r["metrics"]["resumed_tokens"] >= 20 and r["metrics"]["prompt_tokens"] == len(prompt)
    said = ok("result", tid, "--home", home)  # the text summary says so
    assert f"went on from {r['metrics']['resumed_tokens']} tokens" in said
    assert f"read {len(prompt)} prompt positions from disk" in said
    assert r["token_ids"] == reference(prompt, 600)
    assert not list((home / "kv").glob(f"{tid}*"))


def test_follow_streams_each_token_once_across_a_worker_death(service):
    """`tilerun result --follow --json` while the task decodes: several pieces whose tokens
    concatenate to the output (tilerun run's), and a worker killed mid-decode, so that the task
    runs again from its prompt, shows no token twice."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    pid = ok("status", "--home", home, "--json")["workers"][0]["pid"]
    prompt, n = [11, 12, 13], 1500
    tid = submit(home, prompt, n)
    follower = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "result", tid, "--follow", "--json",
         "--home", str(home)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    wait_until(lambda: (p := store.partial(tid)) is not None and len(p[1]) >= 100, every=0.02)
    running = _task_view(home, tid)  # the status page's view while it decodes
    os.kill(pid, signal.SIGKILL)
    out, err = follower.communicate(timeout=600)
    assert follower.returncode == 0, err[-3000:]
    *pieces, result = [json.loads(line) for line in out.splitlines()]
    assert result["state"] == "done" and result["attempts"] == 2
    assert result["metrics"]["resumed_tokens"] >= 100  # went on from the stored tokens
    assert result["token_ids"] == reference(prompt, n)
    assert len(pieces) >= 3 and not any(p["restarted"] for p in pieces)
    assert [t for p in pieces for t in p["token_ids"]] == result["token_ids"]
    assert "".join(p["text"] for p in pieces) == result["text"]
    from runtime.tokenizer import ByteTokenizer  # the tiny preset's

    assert running["state"] == "running" and running["text_tokens"] >= 100
    assert running["text"] == ByteTokenizer().decode(result["token_ids"][: running["text_tokens"]])
    done = _task_view(home, tid)
    assert done["state"] == "done" and done["text"] == result["text"]


def test_submit_follow_prints_the_id_the_pieces_and_the_result(service):
    """`tilerun submit --follow --json`: the id first, then pieces whose tokens concatenate to
    the output, then the result, which is tilerun run's."""
    home, _, _ = service
    prompt, n = [21, 22, 23, 24], 300
    r = tilerun(
        "submit", "--prompt-token-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(n),
        "--follow", "--json", "--home", home,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    first, *pieces, result = [json.loads(line) for line in r.stdout.splitlines()]
    assert result["id"] == first["id"] and result["state"] == "done"
    assert result["token_ids"] == reference(prompt, n)
    assert pieces and [t for p in pieces for t in p["token_ids"]] == result["token_ids"]


def _api(home: Path, what: str) -> dict:
    """The status page's ``/api/<what>``, with Ray's token."""
    import urllib.request

    from cluster.service.ray_token import ray_auth_token

    url = json.loads((home / "engine.json").read_text())["status_page"]
    req = urllib.request.Request(
        f"{url}api/{what}", headers={"Authorization": f"Bearer {ray_auth_token()}"}
    )
    return json.loads(urllib.request.urlopen(req, timeout=60).read())


def _task_view(home: Path, task_id: str) -> dict:
    """The status page's ``/api/task`` for a task."""
    return _api(home, f"task?id={task_id}")


def _rebuilt_once_more(home: Path, before: dict, timeout: float) -> None:
    """Wait until `tilerun status` shows one more worker rebuild than ``before`` did."""
    want = before["engine"]["rebuilds"] + 1
    wait_until(
        lambda: ok("status", "--home", home, "--json")["engine"]["rebuilds"] == want,
        timeout=timeout,
        every=0.5,
    )


def test_worker_killed_while_idle_is_rebuilt_before_the_next_task(service):
    """No step runs, so no step can see the death: the idle engine's own check rebuilds the
    workers within seconds, and the next task runs once, with tilerun run's tokens."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    wait_until(lambda: all(t.state in ("done", "failed", "cancelled") for t in store.list()))
    st = ok("status", "--home", home, "--json")
    os.kill(st["workers"][0]["pid"], signal.SIGKILL)
    _rebuilt_once_more(home, st, 60)
    tid = submit(home, [2, 7, 1, 8], 6)
    r = ok("result", tid, "--wait", "--home", home, "--json")
    assert r["attempts"] == 1 and r["token_ids"] == reference([2, 7, 1, 8], 6)


def _gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ", 1)[1][0] == "Z":
                    return True
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_worker_stalled_mid_decode_is_replaced_and_its_task_runs_again(service):
    """A worker that stops answering (SIGSTOP: a hung collective looks the same) is named
    within the step deadline and its group torn down, like a dead one: the task runs again from
    its stored tokens, with tilerun run's tokens, and the one queued behind it runs too."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    st = ok("status", "--home", home, "--json")
    pid = st["workers"][0]["pid"]
    prompt, n = [51, 52, 53], 900
    tid = submit(home, prompt, n)
    wait_until(lambda: (p := store.partial(tid)) is not None and len(p[1]) >= 50, every=0.02)
    os.kill(pid, signal.SIGSTOP)
    try:
        behind = submit(home, [6, 5, 4], 4)
        r = ok("result", tid, "--wait", "--home", home, "--json")
        assert r["attempts"] == 2 and r["metrics"]["resumed_tokens"] >= 50
        assert r["token_ids"] == reference(prompt, n)
        got = ok("result", behind, "--wait", "--home", home, "--json")
        assert got["attempts"] == 1 and got["token_ids"] == reference([6, 5, 4], 4)
        now = ok("status", "--home", home, "--json")
        assert now["engine"]["rebuilds"] == st["engine"]["rebuilds"] + 1
        assert now["workers"][0]["pid"] != pid
        assert _gone(pid, 30), "the stalled worker was left running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)  # never left stopped, whatever failed


def test_worker_stalled_while_idle_is_replaced_before_the_next_task(service):
    """No step runs, so no deadline passes: the idle engine's health check names the stopped
    worker and rebuilds the group, and the next task runs once, with tilerun run's tokens."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    wait_until(lambda: all(t.state in ("done", "failed", "cancelled") for t in store.list()))
    st = ok("status", "--home", home, "--json")
    pid = st["workers"][0]["pid"]
    os.kill(pid, signal.SIGSTOP)
    try:
        _rebuilt_once_more(home, st, 90)
        assert _gone(pid, 30), "the stalled worker was left running"
        tid = submit(home, [3, 9, 2, 7], 6)
        r = ok("result", tid, "--wait", "--home", home, "--json")
        assert r["attempts"] == 1 and r["token_ids"] == reference([3, 9, 2, 7], 6)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _damage(path: Path) -> None:
    """Rewrite a prefix file with its metadata intact and one tensor a row short: every check
    of the file's metadata passes, reading it into a cache cannot."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in list(f.keys())}
        meta = f.metadata()
    tensors["k.1"] = tensors["k.1"][1:].clone()
    save_file(tensors, str(path), metadata=meta)


def test_a_damaged_kv_prefix_fails_one_run_then_the_prompt_is_computed(service):
    """The prompt KV file of a task is damaged before its re-run reads it: that step fails, the
    file is dropped, and the tasks of the failed step run again, each alone (a task that makes
    steps fail takes none beside it down): both give tilerun run's tokens, the damaged one going
    on from its stored tokens with its prompt computed."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    pid = ok("status", "--home", home, "--json")["workers"][0]["pid"]
    prompt = [(i * 13) % 500 + 1 for i in range(1100)]
    a = submit(home, prompt, 600)
    wait_until(lambda: (p := store.partial(a)) is not None and len(p[1]) >= 20, every=0.02)
    b_prompt, b_n = [41, 42, 43], 1200
    b = submit(home, b_prompt, b_n)
    wait_until(lambda: store.get(b).state == "running", every=0.01)
    saved = home / "kv" / f"{a}.rank0.safetensors"
    _damage(saved)
    os.kill(pid, signal.SIGKILL)  # the re-run of a reads the damaged file: its step fails
    ra = ok("result", a, "--wait", "--home", home, "--json")
    rb = ok("result", b, "--wait", "--home", home, "--json")
    assert ra["attempts"] == 3 and rb["attempts"] == 3
    assert ra["metrics"]["restored_tokens"] == 0 and ra["metrics"]["resumed_tokens"] >= 20
    assert ra["token_ids"] == reference(prompt, 600)
    assert rb["token_ids"] == reference(b_prompt, b_n)
    ta, tb = store.get(a), store.get(b)
    assert tb.started_at >= ta.finished_at, "the suspects' last runs overlapped"
    assert not list((home / "kv").glob(f"{a}*"))


def test_a_task_whose_runs_keep_dying_fails_alone_sparing_the_one_beside_it(service):
    """Two tasks run together when the worker dies, twice: from then on each is a suspect and
    runs alone, so when the first one's third run dies too it fails by itself (max_attempts 3),
    and the other, never running beside it again, ends with tilerun run's tokens."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")

    def status():  # the status page's snapshot: quicker than a `tilerun status` process
        return _api(home, "snapshot")

    def running(tid, attempt):
        t = store.get(tid)
        return t.state == "running" and t.attempts == attempt

    st = status()
    n = 3000  # ~10 s of decode each: time for the kills below to land while both run
    p = submit(home, [61, 62, 63], n)
    i = submit(home, [71, 72, 73], n)
    for attempt in (1, 2, 3):
        if attempt < 3:
            wait_until(lambda a=attempt: running(p, a) and running(i, a), every=0.01)
        else:  # suspects now: the first runs alone, the other waits in the queue
            wait_until(lambda: running(p, 3), every=0.01)
            assert store.get(i).state == "queued"
            alone = {t["id"]: t["alone"] for t in status()["tasks"]}
            assert alone[p] and alone[i]  # the snapshot `tilerun status` and the status page show
        os.kill(st["workers"][0]["pid"], signal.SIGKILL)
        rebuilds = st["engine"]["rebuilds"]
        st = wait_until(
            lambda r=rebuilds: (x := status())["engine"]["rebuilds"] == r + 1 and x, every=0.05
        )
    r = tilerun("result", p, "--wait", "--home", home, "--json")
    assert r.returncode != 0 and "gave up after 3 attempt(s)" in r.stderr
    got = ok("result", i, "--wait", "--home", home, "--json")
    assert got["attempts"] == 3 and got["token_ids"] == reference([71, 72, 73], n)
    assert store.get(i).started_at >= store.get(p).finished_at


def kill_engine_mid_task(home: Path, store: TaskStore, inputs) -> tuple[int, list[str]]:
    """Submit ``inputs[0]``, SIGKILL the engine's process while it runs, then submit the rest
    (queued while no engine runs); the dead engine's pid and the task ids."""
    engine_pid = ok("status", "--home", home, "--json")["engine"]["pid"]
    ids = [submit(home, *inputs[0])]
    state = wait_until(
        lambda: (t := store.get(ids[0])).state in ("running", "done", "failed") and t.state,
        every=0.01,
    )
    assert state == "running", f"the task was {state} before the engine could be killed"
    os.kill(engine_pid, signal.SIGKILL)
    assert store.get(ids[0]).state == "running"  # it died mid-task
    return engine_pid, ids + [submit(home, p, n) for p, n in inputs[1:]]


def test_engine_killed_restarts_by_itself_and_finishes_every_task(service):
    """Ray starts a dead engine again (engine_restarts): no `tilerun up`, the task it ran runs
    again (a second attempt, the same tokens), the ones submitted meanwhile run, and the new
    engine records itself (status page, restart count) as `up` would."""
    import urllib.request

    from cluster.service.ray_token import ray_auth_token

    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    inputs = [(LONG, 600), ([3, 1, 4], 3), ([1, 5], 3)]
    dead, ids = kill_engine_mid_task(home, store, inputs)

    def restarted():
        e = ok("status", "--home", home, "--json")["engine"]
        return e is not None and e["pid"] != dead and e

    st = wait_until(restarted, timeout=180, every=1)
    assert st["restarts"] == 1
    assert st["last_restart"].startswith("its process died")  # SIGKILL leaves no reason
    for i, (p, n) in zip(ids, inputs):
        assert ok("result", i, "--wait", "--home", home, "--json")["token_ids"] == reference(p, n)
    assert store.get(ids[0]).attempts == 2
    st = ok("status", "--home", home, "--json")["engine"]
    assert st["pid"] != dead and st["restarts"] == 1 and st["ready"] and st["error"] is None
    assert "restarts 1" in ok("status", "--home", home)
    info = json.loads((home / "engine.json").read_text())
    assert info["restarts"] == 1
    req = urllib.request.Request(
        info["status_page"] + "api/snapshot",
        headers={"Authorization": f"Bearer {ray_auth_token()}"},
    )
    snap = json.loads(urllib.request.urlopen(req, timeout=60).read())
    assert snap["engine"]["pid"] == st["pid"] and snap["engine"]["restarts"] == 1


def test_engine_killed_up_again_finds_every_task_and_finishes(service):
    """Past engine_restarts the engine stays dead: the tasks wait in the store, and `tilerun up`
    starts a new engine that finds and finishes them."""
    home, cfg, _ = service
    store = TaskStore(home / "tasks.db")
    # the first task decodes for a few seconds: `tilerun submit` is a new process, and on a
    # loaded 2-core machine it returned after a 1.4 s task had finished (seen in CI)
    inputs = [(LONG, 600), ([1, 2, 3], 3), ([4, 5], 3)]
    _, ids = kill_engine_mid_task(home, store, inputs)
    wait_until(
        lambda: ok("status", "--home", home, "--json")["engine"] is None, timeout=300, every=1
    )
    ok("up", cfg, "--home", home, "--json")
    for i, (p, n) in zip(ids, inputs):
        assert ok("result", i, "--wait", "--home", home, "--json")["token_ids"] == reference(p, n)
    assert store.get(ids[0]).attempts == 2


GIVE_UP = """
import sys
from cluster.service.client import Service, connect  # before ray: token auth on
from cluster.service.home import ENGINE_NAME, NAMESPACE
import ray
import json
connect(json.loads((Service(sys.argv[1]).home / "cluster.json").read_text())["address"])
ray.get_actor(ENGINE_NAME, namespace=NAMESPACE).__ray_call__.remote(
    lambda engine: engine.loop._give_up("the test gave the loop up")
)
"""


def test_an_engine_whose_loop_gives_up_is_started_again_and_its_task_ends(service):
    """Where the loop cannot recover from a failed step (``ServiceLoop._serve``: the store
    cannot be written, in-process in test_service_store.py), it ends the engine's process
    (``_give_up``, called here in the real actor mid-task): Ray starts the engine again, and
    the task runs a second time to tilerun run's tokens."""
    home, _, _ = service
    store = TaskStore(home / "tasks.db")
    before = ok("status", "--home", home, "--json")["engine"]
    tid = submit(home, LONG[:200], CANCEL_NEW)  # ~12 s: still running when the call lands
    wait_until(lambda: store.get(tid).state == "running", every=0.01)
    r = subprocess.run(
        [sys.executable, "-c", GIVE_UP, str(home)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]

    def restarted():
        e = ok("status", "--home", home, "--json")["engine"]
        return e is not None and e["pid"] != before["pid"] and e["ready"] and e

    st = wait_until(restarted, timeout=180, every=1)
    assert st["restarts"] == before["restarts"] + 1
    assert st["last_restart"] == "the test gave the loop up"  # the reason it left
    assert "engine restarted: the test gave the loop up" in ok("status", "--home", home)
    got = ok("result", tid, "--wait", "--home", home, "--json")["token_ids"]
    assert got == reference(LONG[:200], CANCEL_NEW)
    assert store.get(tid).attempts == 2


def test_down_leaves_no_process_of_ours(service):
    home, _, _ = service
    cluster = json.loads((home / "cluster.json").read_text())
    assert group_pids(cluster["pid"])
    tasks = {t.id: t.state for t in TaskStore(home / "tasks.db").list()}
    out = ok("down", "--home", home, "--json")
    assert out == {"engine": True, "head": True}
    assert group_pids(cluster["pid"]) == []
    temp = cluster["temp_dir"]
    left = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and temp in (d / "cmdline").read_text():
                left.append(d.name)
        except OSError:
            pass
    assert left == [] and not (home / "cluster.json").exists()
    # the tasks outlive the service
    assert tasks and {t.id: t.state for t in TaskStore(home / "tasks.db").list()} == tasks


def test_up_address_attaches_and_down_leaves_the_users_cluster_without_our_actors(tmp_path):
    from cluster.service.head import head_alive, start_head, stop_head

    theirs = start_head(tmp_path / "their-cluster", num_cpus=2)  # someone else's cluster
    home = tmp_path / "home"
    try:
        info = ok("up", "--address", theirs["address"], "--home", home, "--model", "tiny",
                  "--device", "cpu", "--max-model-len", "256", "--json")  # fmt: skip
        assert info["ray_address"] == theirs["address"]
        tid = submit(home, [1, 2, 3], 4)
        assert len(ok("result", tid, "--wait", "--home", home, "--json")["token_ids"]) == 4
        assert ok("down", "--home", home, "--json") == {"engine": True, "head": False}
        assert head_alive(theirs)  # not ours to stop
        code = (
            "import os, sys\nos.environ['RAY_AUTH_MODE'] = 'token'\nimport ray\n"
            "ray.init(address=sys.argv[1], namespace='tilerun', logging_level='ERROR')\n"
            "alive = []\n"
            "for n in ('tilerun-engine', 'tilerun-worker-0'):\n"
            "    try:\n        ray.get_actor(n); alive.append(n)\n"
            "    except ValueError:\n        pass\n"
            "print(alive)\n"
        )
        r = subprocess.run([sys.executable, "-c", code, theirs["address"]], capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == "[]"
    finally:
        stop_head(theirs)
