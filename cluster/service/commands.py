"""``tilerun up | submit | status | result | cancel | down | dashboard``: the service's commands.

Each is a thin layer over ``cluster.service.client.Service``; errors are ``TilerunError``s that
the CLI prints as one line naming the fix.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        help="state directory (task store, cluster record); default $TILERUN_HOME or ~/.tilerun",
    )


def register(sub) -> dict[str, Any]:
    """Add the service's subcommands to ``sub``; returns name -> handler."""
    from cluster.cli import add_config_flags
    from cluster.config import ClusterConfig
    from cluster.service.spec import ServiceConfig
    from runtime.worker_config import WorkerConfig
    from scheduler.config import SchedulerConfig
    from scheduler.request import SamplingParams

    p = sub.add_parser(
        "up",
        help="start the long-lived service (Ray head, engine actor, workers)",
        description="Start an embedded Ray cluster (or attach with --address), the engine actor "
        "`tilerun-engine` and its workers; returns once they are ready.",
    )
    p.add_argument(
        "cluster",
        nargs="?",
        help="a cluster YAML file: engine fields, max_attempts, engine_restarts, num_cpus",
    )
    p.add_argument(
        "--address", help="attach to this Ray cluster (host:port) instead of starting one"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the workers")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    # the cluster file's fields, as flags that override it
    add_config_flags(p, [ServiceConfig, WorkerConfig, SchedulerConfig, ClusterConfig])

    p = sub.add_parser(
        "submit",
        help="queue one task; prints its id at once",
        description="Queue a task on the running service. Prompt files are read here, not by the "
        "server. The task is stored before the id is printed.",
    )
    p.add_argument("job", nargs="?", help="a job YAML file (flags given too override its fields)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids, e.g. 1,2,3")
    _home(p)
    p.add_argument(
        "--follow",
        action="store_true",
        help="then print its text as it is generated and its result, as `tilerun result --follow`",
    )
    p.add_argument("--timeout", type=float, help="seconds to follow it at most (--follow)")
    p.add_argument("--json", action="store_true", help='print {"id": ...}')
    add_config_flags(p, [SamplingParams])

    p = sub.add_parser("status", help="tasks and actors of the service")
    p.add_argument("id", nargs="?", help="one task (a prefix of its id is enough)")
    p.add_argument("--watch", action="store_true", help="a live table, redrawn every second")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between redraws (--watch)")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("result", help="the output of a task (the schema of `tilerun run --json`)")
    p.add_argument("id")
    p.add_argument("--wait", action="store_true", help="wait until the task finishes")
    p.add_argument(
        "--follow",
        action="store_true",
        help="print the text as it is generated (twice a second), then the result; with --json "
        "one object per piece, then the result",
    )
    p.add_argument("--timeout", type=float, help="seconds to wait at most (--wait, --follow)")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("cancel", help="cancel a queued or running task")
    p.add_argument("id")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "prune",
        help="delete finished tasks from the store",
        description="Delete done, failed and cancelled tasks (their prompts and outputs) that "
        "every given rule lets go. Queued and running tasks are never touched.",
    )
    p.add_argument(
        "--older-than",
        type=duration,
        metavar="AGE",
        help="tasks finished more than AGE ago: a number with s, m, h or d (e.g. 12h, 7d)",
    )
    p.add_argument("--keep", type=int, metavar="N", help="keep the N most recently finished")
    p.add_argument("--dry-run", action="store_true", help="list what would go; delete nothing")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser(
        "down", help="stop the engine and its workers (and the Ray head that `up` started)"
    )
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("dashboard", help="print the Ray dashboard and status page URLs")
    _home(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return {
        "up": cmd_up,
        "submit": cmd_submit,
        "status": cmd_status,
        "result": cmd_result,
        "cancel": cmd_cancel,
        "prune": cmd_prune,
        "down": cmd_down,
        "dashboard": cmd_dashboard,
    }


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def duration(text: str) -> float:
    """``90s``, ``15m``, ``12h``, ``7d`` (or plain seconds) as seconds; argparse's ``type``."""
    t = text.strip().lower()
    try:
        value = float(t[:-1]) * _UNITS[t[-1]] if t and t[-1] in _UNITS else float(t)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an age: give a number with s, m, h or d, e.g. 12h or 7d"
        )
    return value


def _out(args, obj: dict, text: str) -> None:
    print(json.dumps(obj) if args.json else text)


def cmd_up(args) -> int:
    from cluster.service.client import Service
    from cluster.service.spec import cluster_fields

    flags = {k: getattr(args, k) for k in cluster_fields() if getattr(args, k, None) is not None}
    svc = Service.up(
        args.cluster, address=args.address, home=args.home, timeout_s=args.timeout, **flags
    )
    info = svc.engine_info()
    urls = svc.urls()
    obj = {**urls, "model": info["config"]["model"], "tp": info["config"]["tp"],
           "devices": info["devices"]}  # fmt: skip
    lines = [
        f"tilerun service up: {obj['model']} on {', '.join(d['device'] for d in info['devices'])}",
        f"  Ray address:   {urls['ray_address']}",
        f"  Ray dashboard: {urls['ray_dashboard'] or '(attached cluster: its own)'}",
    ]
    if urls.get("status_page"):
        lines.append(f"  status page:   {urls['status_page']}")
    lines.append(f"  state dir:     {urls['home']}")
    _out(args, obj, "\n".join(lines))
    return 0


def cmd_submit(args) -> int:
    from cluster.job import PROMPT_FIELDS, load_job_values, sampling_fields
    from cluster.service.client import Service

    values, where = load_job_values(args.job) if args.job else ({}, {})
    names = [*PROMPT_FIELDS, *sampling_fields()]
    flags = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    # a prompt given as a flag replaces the file's prompt, whichever form either takes
    if any(k in flags for k in PROMPT_FIELDS):
        for k in PROMPT_FIELDS:
            values.pop(k, None)
    for k, v in flags.items():
        values[k] = v
        where.pop(k, None)  # a flag's error has no file line
    svc = Service(args.home)
    task_id = svc.submit_values(values, where)
    _out(args, {"id": task_id}, task_id)
    if args.follow:
        sys.stdout.flush()
        _follow(svc, task_id, args)
    return 0


def _fmt_rate(x) -> str:
    return f"{x:,.1f}" if x else "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def render(tasks: list[dict], snap: dict | None) -> str:
    rows = [
        ["ID", "STATE", "PREFILL", "GEN", "DECODE TOK/S", "TTFT S", "CONTEXT", "ATTEMPTS", "ERROR"]
    ]
    for t in tasks:
        pct = 100 * t["prefill_done"] / max(t["prefill_total"], 1)
        rows.append(
            [
                t["id"],
                t["state"],
                f"{t['prefill_done']}/{t['prefill_total']} ({pct:.0f}%)",
                f"{t['generated']}/{t['max_new_tokens']}",
                _fmt_rate(t["decode_tokens_per_s"]),
                f"{t['ttft_s']:.2f}" if t["ttft_s"] is not None else "-",
                str(t["context_len"]),
                f"{t['attempts']}{' alone' if t.get('alone') else ''}",
                (t["error"] or "")[:60],
            ]
        )
    out = [f"tasks ({len(tasks)}):", _table(rows)]
    if snap is None:
        out.append("engine: not running (tasks wait in the store; `tilerun up` resumes them)")
    else:
        e = snap["engine"]
        out.append(
            f"engine: {e['model']} tp={e['tp']} at {e['ray_address']}, "
            f"rebuilds {e.get('rebuilds', 0)}, restarts {e.get('restarts', 0)}"
        )
        if e.get("last_restart"):
            out.append(f"engine restarted: {e['last_restart']}")
        if e.get("error"):  # its workers never came up: the tasks wait in the store
            out.append(f"engine error: {e['error']}")
        elif not e.get("ready", True):
            out.append("engine: bringing its workers up")
        rows = [["RANK", "ACTOR", "NODE", "DEVICE", "PEAK MEMORY", "KV BLOCKS USED/TOTAL"]]
        for w in snap["workers"]:
            rows.append(
                [
                    str(w["rank"]),
                    w["name"],
                    w["node"][:12],
                    w["device"],
                    f"{w['peak_memory_bytes'] / 2**20:.1f} MiB",
                    f"{w['kv_used']['device']}/{w['kv_blocks']['device']} device, "
                    f"{w['kv_used']['host']}/{w['kv_blocks']['host']} host",
                ]
            )
        out.append(_table(rows))
    return "\n".join(out)


def cmd_status(args) -> int:
    from cluster.service.client import Service

    svc = Service(args.home)
    while True:
        snap = svc.snapshot()
        tasks = svc.tasks(args.id)
        if snap is not None and not args.id:
            tasks = snap["tasks"]  # live progress between the store's writes
        if args.json:
            print(json.dumps({"tasks": tasks, "engine": snap and snap["engine"],
                              "workers": snap and snap["workers"]}), flush=True)  # fmt: skip
        else:
            text = render(tasks, snap)
            if args.watch:
                sys.stdout.write("\x1b[2J\x1b[H")  # clear the screen, cursor home
            print(text, flush=True)
        if not args.watch:
            return 0
        time.sleep(args.interval)


def cmd_result(args) -> int:
    from cluster.cli import _print_summary
    from cluster.service.client import Service

    svc = Service(args.home)
    if args.follow:
        _follow(svc, args.id, args)
        return 0
    r = svc.result(args.id, wait=args.wait, timeout_s=args.timeout)
    if args.json:
        print(json.dumps(r))
    else:
        _print_summary(r)
    return 0


def _follow(svc, task_id: str, args) -> None:
    """Print a task's text as it comes (with --json one object per piece), then its result."""
    from cluster.cli import _print_summary

    for piece in svc.follow(task_id, timeout_s=args.timeout):
        if args.json:
            print(json.dumps(dataclasses.asdict(piece)), flush=True)
            continue
        if piece.restarted:
            print(
                f"\n[attempt {piece.attempt} generated other tokens; its output from the start:]",
                file=sys.stderr,
            )
        sys.stdout.write(piece.text)
        sys.stdout.flush()
    if not args.json:
        print()
    r = svc.result(task_id)
    if args.json:
        print(json.dumps(r))
    else:
        _print_summary(r)


def cmd_prune(args) -> int:
    from cluster.service.client import Service

    gone = Service(args.home).prune(args.older_than, args.keep, dry_run=args.dry_run)
    verb = "would delete" if args.dry_run else "deleted"
    text = f"{verb} {len(gone)} finished task(s)"
    if gone and args.dry_run:
        text += ": " + " ".join(gone)
    _out(args, {"deleted" if not args.dry_run else "would_delete": gone}, text)
    return 0


def cmd_cancel(args) -> int:
    from cluster.service.client import Service

    svc = Service(args.home)
    state = svc.cancel(args.id)
    task_id = svc.task(args.id).id
    msg = {
        "cancelled": f"task {task_id} cancelled",
        "running": f"task {task_id} is running: the engine cancels it after its current step",
    }.get(state, f"task {task_id} is already {state}; nothing to cancel")
    _out(args, {"id": task_id, "state": state}, msg)
    return 0


def cmd_down(args) -> int:
    from cluster.service.client import Service

    stopped = Service(args.home).down()
    msg = "engine and workers stopped" if stopped["engine"] else "no engine was running"
    if stopped["head"]:
        msg += "; the Ray head started by `tilerun up` stopped"
    _out(args, stopped, msg)
    return 0


def cmd_dashboard(args) -> int:
    from cluster.service.client import Service

    urls = Service(args.home).urls()
    if not urls["ray_address"]:
        from cluster.service.client import ServiceError

        raise ServiceError(f"no tilerun service under {urls['home']}; start one with `tilerun up`")
    lines = [f"Ray dashboard: {urls['ray_dashboard'] or '(the attached cluster’s own)'}"]
    if urls["status_page"]:
        lines.append(f"status page:   {urls['status_page']}")
    lines.append("both ask for Ray's token (~/.ray/auth_token or RAY_AUTH_TOKEN)")
    _out(args, urls, "\n".join(lines))
    return 0
