"""What ``tilerun up`` reads (a cluster file) and what ``tilerun submit`` checks before storing.

A cluster file holds the engine fields of job files (``EngineConfig``) plus the service's own
(``ServiceConfig``); ``tilerun up``'s flags are the same fields and override the file's:

```yaml
model: demo-small      # required: preset or checkpoint directory (relative to this file)
device: cpu
tp: 2
prefill_chunk: 2048    # tokens per step (default: by device, 8192 on GPUs, 2048 on CPUs)
max_attempts: 3        # runs of a task before it is marked failed (deaths, stalls, failed steps)
engine_restarts: -1    # times Ray restarts a dead engine by itself (-1: always, 0: never)
kv_prefix_min_tokens: 2048  # keep prompts this long on disk for a re-run (default: CPUs only)
num_cpus: 4            # logical CPUs of the Ray head that `tilerun up` starts (not with --address)
```

A task is checked on the submitting side against the running engine (``engine.json``): unknown
or mistyped fields, engine fields that differ from the engine's, token ids outside the vocabulary,
and prompts that cannot fit are refused with the field and the fix; nothing is stored then.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.config import EngineConfig
from scheduler.errors import ConfigError
from scheduler.fields import check_fields, option, user_fields
from scheduler.request import SamplingParams


@dataclass(frozen=True)
class ServiceConfig:
    """The service's own fields (besides the engine's)."""

    max_attempts: int = option(
        3, help="runs of a task (the first included) before a worker or engine death, a stalled "
        "worker or a failed step marks it failed", minimum=1,
    )  # fmt: skip
    engine_restarts: int = option(
        -1,
        help="times Ray restarts the engine after its process dies (it rebuilds the workers and "
        "runs the tasks it ran again, an attempt counted); -1: always, 0: never (`tilerun up` "
        "brings it back)",
        minimum=-1,
    )
    kv_prefix_min_tokens: int | None = option(
        None,
        help="tasks with at least this many prompt tokens have their prompt's KV saved to the "
        "state directory once prefilled, so that a run after a worker or engine death reads it "
        "back instead of prefilling again (deleted when the task ends); 0: never; default 2048 "
        "on CPU workers, 0 on GPUs and NPUs (the save is written in the prefill's last step, "
        "and there it takes longer than the prefill it would spare)",
        minimum=0,
    )
    num_cpus: int | None = option(
        None,
        help="logical CPUs of the Ray head `tilerun up` starts (default max(cores, 4); "
        "not with --address)",
        minimum=1,
    )

    def __post_init__(self) -> None:
        check_fields(self)


SERVICE_FIELDS = tuple(f.name for f in user_fields(ServiceConfig))


@dataclass(frozen=True)
class ServiceSpec:
    """What ``tilerun up`` starts: one engine and the service around it."""

    engine: EngineConfig
    service: ServiceConfig = dataclasses.field(default_factory=ServiceConfig)

    def __post_init__(self) -> None:
        if self.engine.cluster.executor != "ray":
            raise ConfigError(
                f"executor={self.engine.cluster.executor!r}: the service runs its workers as Ray "
                "actors; drop the executor field (or use `tilerun run --executor local`)"
            )

    def to_dict(self) -> dict[str, Any]:
        return {**self.engine.to_dict(), **dataclasses.asdict(self.service)}

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ServiceSpec:
        d = dict(d)
        service = ServiceConfig(**{k: d.pop(k) for k in SERVICE_FIELDS if k in d})
        return ServiceSpec(EngineConfig.from_dict(d), service)


def cluster_fields() -> list[str]:
    return [*EngineConfig.field_names(), *SERVICE_FIELDS]


def load_spec(path: str | Path) -> ServiceSpec:
    """A cluster file, parsed and checked."""
    return build_spec(*load_cluster_file(path))


def load_cluster_file(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse a cluster YAML file into fields (checked: unknown, missing model; each error names
    the file and line). ``build_spec`` then checks the values."""
    p = Path(path)
    data, where = load_yaml_mapping(p, cluster_fields(), what="cluster file")
    if "model" not in data:
        raise ConfigError(
            f"{p}: missing field 'model'; add `model: demo-small` (a preset) or "
            "`model: /path/to/checkpoint` (a Hugging Face checkpoint directory)"
        )
    model = data["model"]
    if isinstance(model, str) and not Path(model).is_absolute() and (p.parent / model).is_dir():
        data["model"] = str((p.parent / model).resolve())
    return data, where


def build_spec(values: dict[str, Any], where: dict[str, str] | None = None) -> ServiceSpec:
    """Validate cluster fields (from a file and flags); errors name the file's line."""
    from cluster.job import _construct

    where = where or {}

    def at(name: str | None) -> str:
        return f"{where[name]}: " if name in where else ""

    return _construct(ServiceSpec.from_dict, values, at)


def sampling_dict(p: SamplingParams) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["stop_token_ids"] = list(d["stop_token_ids"])
    return d


def sampling_from_dict(d: dict[str, Any]) -> SamplingParams:
    return SamplingParams(**{**d, "stop_token_ids": tuple(d.get("stop_token_ids", ()))})


def engine_mismatch(given: dict[str, Any], engine: dict[str, Any]) -> None:
    """A job's engine fields must match the running engine's (one engine serves every task)."""
    for k, v in given.items():
        if k in engine and engine[k] != v:
            raise ConfigError(
                f"{k}={v!r} differs from the running service's {k}={engine[k]!r}; one engine "
                f"serves every task: drop {k} from the job, or start the service with it "
                "(`tilerun down`, then `tilerun up` with a cluster file that sets it)"
            )


def load_yaml_mapping(p: Path, valid: list[str], what: str) -> tuple[dict, dict[str, str]]:
    """A YAML mapping's fields and 'file line N' for each; syntax errors and unknown fields fail
    here, naming the line (as job files do)."""
    import difflib

    from cluster.job import _JobLoader

    if not p.is_file():
        raise ConfigError(f"{what} {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=_JobLoader)
        data = yaml.load(text, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "context_mark", None) or getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{p}:{line}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{p}: a {what} is a mapping of fields (model: ..., tp: ...)")
    where: dict[str, str] = {}
    for k, _ in node.value:
        line = f"{p} line {k.start_mark.line + 1}"
        if k.value in where:
            raise ConfigError(
                f"{line}: field {k.value!r} is given twice (first at {where[k.value]}); keep one"
            )
        where[k.value] = line
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(valid)}"
            raise ConfigError(f"{where.get(key, str(p))}: unknown field {key!r}{hint}")
    return data, where


def parse_task(values: dict[str, Any], where: dict[str, str] | None = None):
    """The prompt (text or token ids) and sampling parameters of a submitted job.

    The prompt rules are ``cluster.job.parse_prompt``'s, as for ``tilerun run``; no
    ``EngineConfig`` is built (the engine already exists). Prompt files are read here, on the
    submitting side.
    """
    from cluster.job import _construct, parse_prompt, sampling_fields

    where = where or {}

    def at(name: str | None) -> str:
        return f"{where[name]}: " if name in where else ""

    text, ids = parse_prompt(values, at)
    kw = {k: values[k] for k in sampling_fields() if values.get(k) is not None}
    sampling = _construct(lambda kw: SamplingParams(**kw), kw, at)
    return text, ids, sampling
