"""``tilerun`` command line.

tilerun run --model demo-small --prompt-file long.txt --max-new-tokens 32 --json
tilerun run job.yaml
tilerun run --help   (every engine and sampling field is a flag, derived from the config classes)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import json
import logging
import sys
import time

from scheduler.errors import CapacityError, TilerunError
from scheduler.fields import field_type, user_fields


def _cli_type(cls: type, f: dataclasses.Field):
    """argparse's ``type`` for a config field (bools are handled by their own action)."""
    kind, _ = field_type(cls, f.name)
    if kind is tuple:
        return _int_list
    return kind


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"give integers separated by commas, got {text!r}"
        ) from None


def add_config_flags(p: argparse.ArgumentParser, classes: list[type]) -> list[str]:
    """One flag per user-facing field of ``classes``, help text from the field; their names.

    Flags default to None ("not given"), so a job file's field is overridden only by a flag the
    user typed. Bool fields get ``--x/--no-x``.
    """
    names = []
    for cls in classes:
        doc = (cls.__doc__ or "").strip().splitlines()
        group = p.add_argument_group(cls.__name__, doc[0] if doc else None)
        for f in user_fields(cls):
            flag = "--" + f.name.replace("_", "-")
            default = "" if f.default is None else f" (default: {_show(f.default)})"
            kw: dict = {"default": None, "dest": f.name, "help": f.metadata["help"] + default}
            if field_type(cls, f.name)[0] is bool:
                kw["action"] = argparse.BooleanOptionalAction
            else:
                kw["type"] = _cli_type(cls, f)
                if f.metadata.get("choices"):
                    kw["choices"] = f.metadata["choices"]
            group.add_argument(flag, **kw)
            names.append(f.name)
    return names


def _show(v) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, tuple):
        return ",".join(map(str, v)) or "none"
    return str(v)


def _run_parser(sub) -> None:
    from cluster.config import ClusterConfig
    from runtime.worker_config import WorkerConfig
    from scheduler.config import SchedulerConfig
    from scheduler.request import SamplingParams

    p = sub.add_parser("run", help="run one inference task")
    p.add_argument("job", nargs="?", help="a job YAML file (flags given too override its fields)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt")
    src.add_argument("--prompt-file")
    src.add_argument("--prompt-token-ids", help="comma-separated token ids, e.g. 1,2,3")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    add_config_flags(p, [SamplingParams, WorkerConfig, SchedulerConfig, ClusterConfig])


def cmd_run(args: argparse.Namespace) -> int:
    from cluster.job import PROMPT_FIELDS, build_job, job_fields, load_job_values

    values, where = load_job_values(args.job) if args.job else ({}, {})
    flags = {k: getattr(args, k) for k in job_fields() if getattr(args, k, None) is not None}
    # a prompt given as a flag replaces the file's prompt, whichever form either takes
    if any(k in flags for k in PROMPT_FIELDS):
        for k in PROMPT_FIELDS:
            values.pop(k, None)
    for k, v in flags.items():
        values[k] = v
        where.pop(k, None)  # a flag's error has no file line
    job = build_job(values, where)
    if job.engine.cluster.executor == "ray":
        from cluster.ray_cluster import start_ray_early

        # Ray's start (seconds) runs beside the imports and checks below; the executor waits
        # for it. A failed check is still said at once: the process exits, the reaper
        # takes down whatever Ray had started by then.
        start_ray_early(job.engine.cluster.ray_address)
    ids = _checked_prompt(job)

    from cluster.api import LLM
    from cluster.signals import Interrupted, StopOnSignals

    progress = None if (args.quiet or args.json) else _progress_printer()
    t0 = time.perf_counter()
    llm = None
    with StopOnSignals() as stop:
        try:
            llm = LLM(**job.engine.to_dict())
            stop.install()  # again: ray.init put its own SIGTERM handler in place
            if progress is not None:
                print(llm.ready_line, file=sys.stderr)
            out = llm.generate(ids, job.sampling, on_progress=progress)[0]
            devices = llm.engine.device_infos
        except Interrupted as e:
            return _interrupted(e, llm, args.json, t0)
        except TilerunError as e:
            # say it first: shutting down may wait on a rank stuck in a collective
            _error(e)
            if llm is not None:
                _shutdown_quietly(llm)
            return 2
        except BaseException:
            if llm is not None:
                _shutdown_quietly(llm)
            raise
        with contextlib.suppress(Interrupted):  # it was shutting down anyway
            llm.shutdown()
    m = dict(out.metrics)
    result = {
        "token_ids": out.token_ids,
        "text": out.text,
        "finish_reason": out.finish_reason,
        "metrics": m,
        "devices": devices,
        "wall_s": time.perf_counter() - t0,
    }
    if args.json:
        print(json.dumps(result))
    else:
        _print_summary(result)
    return 0


def _checked_prompt(job) -> list[int]:
    """The prompt's token ids, checked against the model (vocabulary, context, memory for this
    request) before anything starts: no cluster, no weights."""
    from cluster import preflight
    from runtime.loader import resolve_model
    from runtime.tokenizer import load_tokenizer

    w = job.engine.worker
    model = resolve_model(w.model, seed=w.weights_seed)
    limits = job.engine.scheduler.for_model(model.config.max_position_embeddings)
    if job.prompt_token_ids:
        ids = list(job.prompt_token_ids)
    else:
        if not job.prompt:
            raise CapacityError("the prompt is empty: give at least one character of text")
        ids = load_tokenizer(model.checkpoint).encode(job.prompt)
    preflight.check_prompt(ids, job.sampling, model.config, limits.max_model_len)
    need = len(ids) + job.sampling.max_new_tokens
    preflight.check_engine(job.engine, model.config, limits.max_model_len, kv_tokens=need)
    return ids


def _error(e: BaseException) -> None:
    print(f"tilerun: error: {e}", file=sys.stderr, flush=True)


def _shutdown_quietly(llm) -> None:
    with contextlib.suppress(BaseException):
        llm.shutdown()


def _interrupted(e, llm, as_json: bool, t0: float) -> int:
    """One line, what was generated so far (with --json), the workers stopped."""
    partial = getattr(e, "partial", None) or []
    tokens = partial[0].token_ids if partial else []
    if llm is not None:
        _shutdown_quietly(llm)
    if as_json:
        text = None
        if llm is not None:
            with contextlib.suppress(Exception):
                text = llm.tokenizer.decode(tokens)
        out = {"token_ids": tokens, "text": text, "finish_reason": "interrupted",
               "interrupted_by": e.name, "wall_s": time.perf_counter() - t0}  # fmt: skip
        print(json.dumps(out), flush=True)
    print(
        f"tilerun: interrupted by {e.name} after {len(tokens)} generated token(s); "
        "the workers are stopped",
        file=sys.stderr,
        flush=True,
    )
    return e.exit_code


def _progress_printer():
    def show(p) -> None:
        if p.prefill_done < p.prefill_total or p.generated <= 1:
            pct = 100 * p.prefill_done / max(p.prefill_total, 1)
            print(
                f"\rprefill {p.prefill_done}/{p.prefill_total} tokens ({pct:3.0f}%) "
                f"{p.elapsed_s:6.1f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )
        else:
            print(
                f"\rdecode  {p.generated} tokens{' ' * 24}{p.elapsed_s:6.1f}s",
                end="",
                file=sys.stderr,
                flush=True,
            )

    return show


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _print_summary(r: dict) -> None:
    m = r["metrics"]
    print(file=sys.stderr)
    print(f"devices: {', '.join(d['device'] + ' ' + d['name'] for d in r['devices'])}")
    print(
        f"generated {m['generated_tokens']} tokens ({r['finish_reason']}): {r['token_ids'][:16]}..."
    )
    if r["text"]:
        print(f"text: {r['text'][:200]!r}")

    def rate(x):
        return f"{x:,.1f}" if x else "-"

    print(
        f"prompt {m['prompt_tokens']} tokens | prefill {rate(m['prefill_tokens_per_s'])} tok/s | "
        f"TTFT {m['ttft_s']:.2f} s | decode {rate(m['decode_tokens_per_s'])} tok/s | "
        f"peak memory {_fmt_bytes(m['peak_memory_bytes'])}"
    )
    if m.get("resumed_tokens") or m.get("restored_tokens"):  # a service task run again
        print(
            f"attempt {r.get('attempts')}: went on from {m.get('resumed_tokens', 0)} tokens "
            f"generated before, read {m.get('restored_tokens', 0)} prompt positions from disk"
        )
    kv = m.get("kv")
    if kv and kv["host_blocks"]:
        print(
            f"KV cache: device {kv['device_blocks']} blocks, host {kv['host_blocks']} blocks | "
            f"moved {_fmt_bytes(kv['bytes_moved'])} ({_fmt_bytes(kv['bytes_moved_per_step'])}"
            f"/step) | exposed {kv['exposed_move_s']:.2f} s | modes {kv['modes']} | "
            f"spilled {kv['blocks_spilled']} fetched {kv['blocks_fetched']} blocks, "
            f"preempted {kv['preemptions']}x"
        )


def _version() -> str:
    try:
        return importlib.metadata.version("tilerun")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
        return "unknown (not installed)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tilerun", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="cmd", required=True)
    _run_parser(sub)
    from cluster.service.commands import register

    handlers = {"run": cmd_run, **register(sub)}
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return handlers[args.cmd](args)
    except TilerunError as e:
        print(f"tilerun: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
