"""One inference task as a YAML file: the same fields as ``tilerun run``'s flags.

```yaml
model: demo-small          # preset or checkpoint directory
prompt_file: long.txt      # or: prompt: "...", or: prompt_token_ids: [1, 2, 3]
max_new_tokens: 32
temperature: 0
device: cpu
prefill_chunk: 2048       # tokens per step (default: by device)
```

Errors name the file, the line and the field.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cluster.config import EngineConfig
from cluster.prompt_file import read_prompt_file
from scheduler.errors import ConfigError
from scheduler.fields import user_fields
from scheduler.request import SamplingParams

PROMPT_FIELDS = ("prompt", "prompt_file", "prompt_token_ids")


def sampling_fields() -> list[str]:
    return [f.name for f in user_fields(SamplingParams)]


def job_fields() -> list[str]:
    """Every field a job file (or ``tilerun run``'s flags) may set: one list."""
    return [*PROMPT_FIELDS, *sampling_fields(), *EngineConfig.field_names()]


@dataclass(frozen=True)
class Job:
    engine: EngineConfig
    sampling: SamplingParams
    prompt: str | None = None
    prompt_token_ids: tuple[int, ...] | None = None


def build_job(values: dict[str, Any], where: dict[str, str] | None = None) -> Job:
    """Validate ``values`` (from flags or YAML); ``where`` maps a field to 'file:line' for errors."""
    where = where or {}

    def at(name: str) -> str:
        return f"{where[name]}: " if name in where else ""

    prompt, ids = parse_prompt(values, at)
    if ids is not None:
        ids = tuple(ids)
    sampling_kw = {k: values[k] for k in sampling_fields() if values.get(k) is not None}
    engine_kw = {k: values[k] for k in EngineConfig.field_names() if values.get(k) is not None}
    sampling = _construct(lambda kw: SamplingParams(**kw), sampling_kw, at)
    engine = _construct(EngineConfig.from_dict, engine_kw, at)
    return Job(engine=engine, sampling=sampling, prompt=prompt, prompt_token_ids=ids)


def parse_prompt(values: dict[str, Any], at) -> tuple[str | None, list[int] | None]:
    """A job's one prompt: text (a ``prompt_file`` is read here, on the caller's side) or token
    ids (a list, or a comma-separated string). ``at(field)`` prefixes errors with 'file line N'."""
    given = [k for k in PROMPT_FIELDS if values.get(k) is not None]
    if len(given) != 1:
        raise ConfigError(
            "give exactly one of prompt, prompt_file, prompt_token_ids"
            + (f" (got {', '.join(given)})" if given else "")
        )
    text, ids = values.get("prompt"), values.get("prompt_token_ids")
    if values.get("prompt_file") is not None:
        text = read_prompt_file(values["prompt_file"], at("prompt_file"))
    if text is not None and not isinstance(text, str):
        raise ConfigError(f"{at('prompt')}prompt must be text, got {type(text).__name__}")
    if ids is not None:
        if isinstance(ids, str):
            try:
                ids = [int(x) for x in ids.replace(" ", "").split(",") if x]
            except ValueError:
                raise ConfigError(
                    f"{at('prompt_token_ids')}prompt_token_ids must be integers separated by "
                    f"commas, got {values['prompt_token_ids']!r}"
                ) from None
        if (
            not isinstance(ids, list)
            or not ids
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in ids)
        ):
            raise ConfigError(
                f"{at('prompt_token_ids')}prompt_token_ids must be a non-empty list of integers"
            )
    return text, ids


def _construct(build, kw: dict[str, Any], at):
    """``build(kw)`` with the failing field's file and line in front of the message."""
    try:
        return build(kw)
    except ConfigError as e:
        # the longest name first: "top_p" must not be taken for a field "top"
        field_name = next(
            (k for k in sorted(kw, key=len, reverse=True) if str(e).startswith(k)), None
        )
        raise ConfigError(f"{at(field_name) if field_name else ''}{e}") from None


class _JobLoader(yaml.SafeLoader):
    """Safe YAML where only ``true``/``false`` are booleans: ``no``, ``off``, ``yes`` stay
    strings, which a bool field then refuses by name, rather than YAML 1.1's guess."""


_JobLoader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in rs if tag != "tag:yaml.org,2002:bool"]
    for ch, rs in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)


def load_job_values(path: str | Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a job YAML file: its fields, and 'file line N' for each (for error messages).

    Syntax errors and unknown fields fail here, naming the line.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        node = yaml.compose(text, Loader=_JobLoader)
        data = yaml.load(text, Loader=_JobLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        # the context mark is where the broken construct starts (an unclosed '[' say), which is
        # the line to fix; the problem mark is where the parser gave up
        ctx, mark = getattr(e, "context_mark", None), getattr(e, "problem_mark", None)
        line = f" line {(ctx or mark).line + 1}" if (ctx or mark) else ""
        what = " ".join(x for x in (getattr(e, "context", None), getattr(e, "problem", None)) if x)
        raise ConfigError(f"{p}:{line}: not valid YAML: {what or e}") from None
    if not isinstance(data, dict) or not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{p}: a job file is a mapping of fields (model: ..., prompt: ...)")
    where: dict[str, str] = {}
    for k, _ in node.value:
        line = f"{p} line {k.start_mark.line + 1}"
        if k.value in where:
            raise ConfigError(
                f"{line}: field {k.value!r} is given twice (first at {where[k.value]}); keep one"
            )
        where[k.value] = line
    valid = job_fields()
    for key in data:
        if key not in valid:
            close = difflib.get_close_matches(str(key), valid, n=1)
            hint = (
                f"; did you mean {close[0]!r}?" if close else f"; valid fields: {', '.join(valid)}"
            )
            raise ConfigError(f"{where.get(key, str(p))}: unknown field {key!r}{hint}")
    if isinstance(data.get("prompt_file"), str) and not Path(data["prompt_file"]).is_absolute():
        data["prompt_file"] = str(p.parent / data["prompt_file"])
    return data, where
