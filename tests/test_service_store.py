"""The task store and the cluster file, without Ray: real SQLite, real processes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cluster.service.spec import load_spec
from cluster.service.store import TaskStore
from scheduler.errors import ConfigError


def test_tasks_keep_arrival_order_and_their_inputs(tmp_path):
    s = TaskStore(tmp_path / "tasks.db")
    a = s.add([1, 2, 3], {"max_new_tokens": 4}, prompt_text="abc")
    b = s.add([4], {"max_new_tokens": 1})
    assert [t.id for t in s.list(("queued",))] == [a, b]
    t = TaskStore(tmp_path / "tasks.db").get(a)  # another connection sees it committed
    assert t.prompt_token_ids == [1, 2, 3] and t.params == {"max_new_tokens": 4}
    assert t.prompt_text == "abc" and t.state == "queued" and t.attempts == 0


def test_lifecycle_attempts_requeue_and_results(tmp_path):
    s = TaskStore(tmp_path / "tasks.db")
    a = s.add([1, 2, 3], {"max_new_tokens": 4})
    assert s.start(a) == 1
    s.progress([(a, 2, 0, None, None)])
    assert s.get(a).prefill_done == 2
    s.progress([], {a: (1, [5, 6])})
    s.requeue(a, "worker died", keep_tokens=True)  # the next run goes on from them
    assert s.partial(a) == (1, [5, 6])
    t = s.get(a)
    assert (t.state, t.attempts, t.error, t.prefill_done) == ("queued", 1, "worker died", 0)
    assert s.start(a) == 2
    s.requeue(a, None, refund_attempt=True)  # `tilerun down`: not the task's fault
    assert s.get(a).attempts == 1 and s.partial(a) is None  # a new engine starts it afresh
    s.start(a)
    out = {"token_ids": [7, 8], "metrics": {"generated_tokens": 2, "ttft_s": 0.5}}
    s.finish(a, "done", output=out)
    t = s.get(a)
    assert t.state == "done" and t.output == out and t.prefill_done == 3 and t.generated == 2
    with pytest.raises(ValueError):
        s.finish(a, "running")


def test_suspects_are_kept_across_connections_until_their_task_ends(tmp_path):
    s = TaskStore(tmp_path / "tasks.db")
    a, b, c = (s.add([i], {"max_new_tokens": 1}) for i in (1, 2, 3))
    for t in (a, b, c):
        s.start(t)
    s.requeue(a, "a step failed", keep_tokens=True, suspect=True)
    s.requeue(b, "worker died", keep_tokens=True)
    s.requeue(c, "a step failed", suspect=True)
    assert TaskStore(tmp_path / "tasks.db").suspects() == {a, c}  # a restarted engine's view
    s.start(a)
    assert s.suspects() == {a, c}  # running alone
    s.finish(a, "done", output={"token_ids": [1], "metrics": {}})
    n = s.start(c)
    s.progress([], tokens={c: (n, [7, 8])})
    s.requeue(c, "a step failed again", keep_tokens=True, suspect=True)
    assert s.partial(c) == (n, [7, 8])
    assert s.request_cancel(c) == "cancelled"  # queued: cancelled at once
    assert s.suspects() == set()
    # and nothing of it is left behind: no suspect row, no tokens to go on from
    assert s.partial(c) is None
    assert s._db.execute("SELECT COUNT(*) FROM suspects").fetchone()[0] == 0


def test_a_restarted_engine_requeues_what_ran_and_fails_a_task_out_of_attempts(tmp_path):
    """What an engine does first after a restart (Ray's or `tilerun up`'s): a task the store
    still calls running ran when the engine died, so it goes back to the queue with the reason,
    or, its attempts spent (a task that kills the engine each time it runs), ends failed."""
    from cluster.service.loop import ServiceLoop
    from cluster.service.spec import ServiceSpec

    s = TaskStore(tmp_path / "tasks.db")
    spent, again, queued = (s.add([1], {"max_new_tokens": 1}) for _ in range(3))
    for _ in range(2):  # two runs, each ended by an engine death
        s.start(spent)
        s.requeue(spent, "the engine restarted while the task ran")
    s.start(spent)  # its third run, max_attempts, is running as the engine dies
    s.start(again)
    spec = ServiceSpec.from_dict({"model": "tiny", "device": "cpu", "max_attempts": 3})
    ServiceLoop(spec, tmp_path)._recover_after_restart()  # no Ray: the store's part only
    t = s.get(spent)
    assert t.state == "failed" and t.attempts == 3
    assert t.error == "the engine restarted while the task ran; gave up after 3 attempt(s)"
    t = s.get(again)
    assert (t.state, t.attempts) == ("queued", 1)
    assert t.error == "the engine restarted while the task ran"
    assert s.get(queued).state == "queued" and s.get(queued).attempts == 0


def test_a_rerun_goes_on_from_the_stored_tokens_up_to_a_stop_and_short_of_the_end(tmp_path):
    """What a run after a death keeps of the tokens the last one stored: none after a stop
    token (eos unless ignore_eos, or a stop id), and at most max_new_tokens - 1, so that the
    new run samples at least one."""
    from types import SimpleNamespace

    from cluster.service.loop import ServiceLoop
    from cluster.service.spec import ServiceSpec, sampling_from_dict

    s = TaskStore(tmp_path / "tasks.db")
    loop = ServiceLoop(ServiceSpec.from_dict({"model": "tiny", "device": "cpu"}), tmp_path)
    engine = SimpleNamespace(model_config=SimpleNamespace(eos_token_ids=(2,)))

    def kept(stored, **params):
        t = s.add([1], {"max_new_tokens": 6, **params})
        s.start(t)
        s.progress([], {t: (1, stored)})
        s.requeue(t, "worker died", keep_tokens=True)
        task = s.get(t)
        return loop._resumable(engine, task, sampling_from_dict(task.params))

    assert kept([7, 8, 9]) == [7, 8, 9]
    assert kept([7, 8, 9, 10, 11, 12]) == [7, 8, 9, 10, 11]  # one left to sample
    assert kept([7, 2, 9]) == [7]  # eos
    assert kept([7, 2, 9], ignore_eos=True) == [7, 2, 9]
    assert kept([7, 8, 9], stop_token_ids=[8]) == [7]
    t = s.add([1], {"max_new_tokens": 6})
    assert loop._resumable(engine, s.get(t), sampling_from_dict({"max_new_tokens": 6})) == []


def test_cancel_queued_at_once_running_by_request(tmp_path):
    s = TaskStore(tmp_path / "tasks.db")
    a, b = s.add([1], {}), s.add([2], {})
    assert s.request_cancel(a) == "cancelled" and s.get(a).state == "cancelled"
    s.start(b)
    assert s.request_cancel(b) == "running" and s.get(b).cancel_requested
    assert s.request_cancel("nope") == "unknown"
    assert s.list(("queued",)) == []


def test_twenty_processes_submit_at_once_none_lost_or_duplicated(tmp_path):
    db = tmp_path / "tasks.db"
    TaskStore(db)  # schema first, as `tilerun up` does
    code = (
        "import sys; from cluster.service.store import TaskStore; "
        "s = TaskStore(sys.argv[1]); print(s.add([int(sys.argv[2])] * 3, {'max_new_tokens': 2}))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(db), str(i)], stdout=subprocess.PIPE, text=True
        )
        for i in range(20)
    ]
    ids = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    tasks = TaskStore(db).list()
    assert sorted(t.id for t in tasks) == sorted(ids) and len(set(ids)) == 20
    assert sorted(t.prompt_token_ids[0] for t in tasks) == list(range(20))


@pytest.mark.parametrize(
    "text, match",
    [
        (
            "model: tiny\ntp: 1\nprefil_chunk: 8\n",
            r"line 3: unknown field 'prefil_chunk'; did you mean 'prefill_chunk'",
        ),
        ("model: tiny\ntp: two\n", r"line 2: tp must be an integer, got 'two'"),
        (
            "model: tiny\nexecutor: local\n",
            r"line 2: executor='local': the service runs its workers as Ray actors",
        ),
        ("model: tiny\noverlap: no\n", r"line 2: overlap must be true or false, got 'no'"),
        ("model: tiny\ntp: 1\ntp: 2\n", r"line 3: field 'tp' is given twice"),
        ("device: cpu\n", r"missing field 'model'; add `model: demo-small`"),
        ("model: tiny\nmax_attempts: 0\n", r"line 2: max_attempts must be a positive integer"),
        (
            "model: tiny\nkv_cache_tokens: -5\n",
            r"line 2: kv_cache_tokens must be a positive integer",
        ),
        ("model: [tiny\n", r"line 1: not valid YAML"),
    ],
)
def test_malformed_cluster_file_names_line_and_fix(tmp_path, text, match):
    p = tmp_path / "cluster.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_spec(p)


def test_cluster_file_model_dir_is_relative_to_the_file(tmp_path):
    (tmp_path / "ckpt").mkdir()
    p = tmp_path / "cluster.yaml"
    p.write_text("model: ckpt\ndevice: cpu\nmax_attempts: 2\n")
    spec = load_spec(p)
    assert spec.engine.worker.model == str((tmp_path / "ckpt").resolve())
    assert spec.service.max_attempts == 2 and spec.engine.worker.device == "cpu"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_service_commands_have_help_with_the_config_fields():
    up = _cli("up", "--help")
    assert up.returncode == 0
    for flag in ("--address", "--home", "--model", "--tp", "--max-attempts", "--num-cpus"):
        assert flag in up.stdout, flag
    sub = _cli("submit", "--help")
    for flag in ("--prompt-file", "--prompt-token-ids", "--max-new-tokens", "--temperature"):
        assert flag in sub.stdout, flag


def test_submit_without_a_service_names_the_fix_and_stores_nothing(tmp_path):
    r = _cli("submit", "--home", tmp_path, "--prompt", "hello")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "no tilerun service under" in r.stderr and "tilerun up" in r.stderr
    r = _cli("result", "abc", "--home", tmp_path)
    assert r.returncode == 2 and "no task 'abc'" in r.stderr and "tilerun status" in r.stderr
    assert TaskStore(tmp_path / "tasks.db").list() == []


def test_the_heads_ports_are_distinct_free_loopback_ports():
    """`tilerun up` gives Ray's five listeners five ports picked together (one at a time, the
    kernel handed the GCS and the client server the same one, and `ray start` exited)."""
    import socket

    from cluster.service import head

    for _ in range(200):
        ports = head.free_ports(5)
        assert len(set(ports)) == 5
    for p in ports:  # free: each can be bound on loopback now
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    # from outside the kernel's ephemeral range, where a released port may be handed to anyone
    lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(p in head.HEAD_PORTS and not lo <= p <= hi for p in ports), ports


@pytest.mark.ray
@pytest.mark.slow
def test_a_head_whose_port_was_taken_meanwhile_starts_on_new_ports(tmp_path, monkeypatch):
    """The race `free_ports` cannot close (seen in CI): a port free when picked is bound by
    someone else before Ray binds it. `ray start` then exits; `tilerun up` runs it again on new
    ports, and keeps the failed try's log beside the new one."""
    import socket

    from cluster.service import head

    real = head.free_ports
    calls = []
    with socket.socket() as taken:
        # bound, not listening: Ray's bind fails, and a connection to it is refused (the head
        # counts as up only once its client server's port answers)
        taken.bind(("127.0.0.1", real(1)[0]))

        def first_with_a_taken_port(n, rng=None):
            ports = real(n, rng)
            calls.append(ports)
            if len(calls) == 1:
                ports[2] = taken.getsockname()[1]  # the client server's port
            return ports

        monkeypatch.setattr(head, "free_ports", first_with_a_taken_port)
        info = head.start_head(tmp_path / "home", num_cpus=1)
    try:
        assert len(calls) == 2 and head.head_alive(info)
        first_try = (tmp_path / "home" / "ray-head.1.log").read_bytes().lower()
        assert b"failed to bind" in first_try or b"address already in use" in first_try
    finally:
        head.stop_head(info)
    assert not head.head_alive(info)


def test_rays_command_line_without_a_ray_script_beside_python(tmp_path, monkeypatch):
    """Ray installed without its scripts (``pip install --target``, the GPU machine): `tilerun
    up` runs Ray's CLI module with this interpreter, and that command works."""
    from cluster.service import head

    with_script = head._ray_cli()
    assert with_script == [str(Path(sys.executable).parent / "ray")]  # this venv has one
    real = sys.executable
    bare = tmp_path / "bin" / "python"  # an interpreter with no `ray` beside it
    monkeypatch.setattr(sys, "executable", str(bare))
    cli = head._ray_cli()
    assert cli == [str(bare), "-m", "ray.scripts.scripts"]
    # (run by the real interpreter: the path above only has to lack a `ray` beside it)
    out = subprocess.run([real, *cli[1:], "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "version" in out.stdout, out.stderr[-500:]


def test_a_task_whose_admission_raises_goes_back_to_the_queue_alone(tmp_path):
    """The engine's loop admits a task and something other than its input fails (here the
    engine's add_request raises once): the task is not left running with no run behind it but
    queued again, a suspect, and runs on the next turn; raising every time, it fails after
    max_attempts. A real store and a real in-process engine; the loop's thread never starts."""
    from cluster.config import EngineConfig
    from cluster.engine import Engine
    from cluster.service.loop import ServiceLoop

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("model: tiny\ndevice: cpu\nmax_attempts: 2\n")
    loop = ServiceLoop(load_spec(cfg), tmp_path)
    engine = Engine(EngineConfig.from_dict({"model": "tiny", "device": "cpu", "executor": "local"}))
    real = engine.add_request
    calls = []

    def add_request(*a, **kw):
        calls.append(1)
        if len(calls) in (1, 3, 4):
            raise RuntimeError("the scheduler broke")
        return real(*a, **kw)

    engine.add_request = add_request
    try:
        a = loop.store.add([1, 2, 3], {"max_new_tokens": 2})
        loop._admit(engine)
        t = loop.store.get(a)
        assert (t.state, t.attempts) == ("queued", 1)
        assert t.error == "RuntimeError: the scheduler broke" and loop.store.suspects() == {a}
        loop._admit(engine)  # the next turn: it runs
        assert loop.store.get(a).state == "running" and len(loop._live) == 1
        b = loop.store.add([4, 5], {"max_new_tokens": 2})
        engine.scheduler.abort_all()
        loop._live.clear()
        loop._admit(engine)  # b: raises on its first and second runs, then gives up
        loop._admit(engine)
        t = loop.store.get(b)
        assert t.state == "failed" and "gave up after 2 attempt(s)" in t.error
    finally:
        engine.shutdown()
        loop.store.close()


def test_the_loop_sweeps_the_kv_files_of_a_queued_task_cancelled_meanwhile(tmp_path):
    """A task queued again after a failed run keeps its prompt KV file for the next run; if it
    is cancelled while queued (the store ends it, not the engine's loop), the loop's periodic
    sweep removes the file (a 128K prompt of an 8B model: 16 GiB), not waiting for a restart,
    and keeps the live tasks' files, half-written ones included (a worker may be writing)."""
    from cluster.config import EngineConfig
    from cluster.engine import Engine
    from cluster.service.loop import ServiceLoop

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("model: tiny\ndevice: cpu\n")
    loop = ServiceLoop(load_spec(cfg), tmp_path)
    engine = Engine(EngineConfig.from_dict({"model": "tiny", "device": "cpu", "executor": "local"}))
    loop.engine = engine
    try:
        gone, kept = (loop.store.add([1, 2, 3], {"max_new_tokens": 50}) for _ in range(2))
        for t in (gone, kept):
            loop.store.start(t)
            loop.store.requeue(t, "worker rank 0 died", keep_tokens=True)
        loop.prefixes.dir.mkdir(parents=True)
        files = {
            name: loop.prefixes.dir / name
            for name in (
                f"{gone}.rank0.safetensors",
                f"{kept}.rank0.safetensors",
                f"{kept}.rank1.safetensors.tmp",
            )
        }
        for f in files.values():
            f.write_bytes(b"kv")
        assert loop.store.request_cancel(gone) == "cancelled"
        loop._turn()  # within SWEEP_EVERY_S of the start: no sweep yet
        assert all(f.exists() for f in files.values())
        loop._last_sweep -= 31.0
        loop._turn()
        assert not files[f"{gone}.rank0.safetensors"].exists()
        assert files[f"{kept}.rank0.safetensors"].exists()
        assert files[f"{kept}.rank1.safetensors.tmp"].exists()
        assert loop.store.get(kept).state == "running"  # admitted by those turns: still live
    finally:
        engine.shutdown()
        loop.store.close()


def test_a_loop_whose_recovery_fails_too_gives_up_its_process(tmp_path, monkeypatch):
    """A step raises and the recovery cannot write the store (here: requeue raises as on a
    full disk). The loop must not end its thread and leave an engine that answers with no task
    moving: it gives its process up, for Ray to start the engine again. A real store, a real
    in-process engine; ``os._exit`` is recorded here instead of ending the test's process,
    and the reason is left for the next engine (``engine-exit.json``)."""
    import json
    import os
    import sqlite3

    from cluster.config import EngineConfig
    from cluster.engine import Engine
    from cluster.service.loop import ServiceLoop

    cfg = tmp_path / "cluster.yaml"
    cfg.write_text("model: tiny\ndevice: cpu\n")
    loop = ServiceLoop(load_spec(cfg), tmp_path)
    engine = Engine(EngineConfig.from_dict({"model": "tiny", "device": "cpu", "executor": "local"}))
    loop.engine = engine
    gave_up = []
    monkeypatch.setattr(os, "_exit", lambda code: gave_up.append((code, loop.store.get(a).state)))

    def broken_step(*a, **kw):
        raise RuntimeError("the step broke")

    def full_disk(*a, **kw):
        raise sqlite3.OperationalError("database or disk is full")

    try:
        a = loop.store.add([1, 2, 3], {"max_new_tokens": 50})
        engine.steps.advance = broken_step
        loop.store.requeue = full_disk
        loop._serve()  # returns only once it has given up
        assert gave_up == [(70, "running")]  # for the restarted engine to requeue from the store
        record = json.loads((tmp_path / "engine-exit.json").read_text())
        assert record["reason"] == (
            "recovering from a failed step failed: OperationalError: database or disk is full"
        )
    finally:
        engine.shutdown()
        loop.store.close()


def test_status_marks_a_task_that_runs_alone(tmp_path):
    from cluster.service.commands import render

    s = TaskStore(tmp_path / "tasks.db")
    a, b = s.add([1, 2], {"max_new_tokens": 3}), s.add([3], {"max_new_tokens": 3})
    s.start(a)
    s.requeue(a, "worker rank 0 died", suspect=True)
    rows = [{**s.get(t).summary(), "alone": t in s.suspects()} for t in (a, b)]
    lines = render(rows, None).splitlines()
    assert "1 alone" in lines[2] and "worker rank 0 died" in lines[2]
    assert "alone" not in lines[3]
