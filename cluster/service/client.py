"""The service from Python: what the commands do, callable from scripts.

>>> from cluster.service.client import Service
>>> svc = Service.up("cluster.yaml")   # or Service.up(model="tiny", device="cpu"): the same fields
>>> ids = [svc.submit(prompt="Once upon a time", max_new_tokens=32) for _ in range(8)]
>>> outs = [svc.result(i, wait=True) for i in ids]    # the schema of `tilerun run --json`
>>> svc.down()

``submit``, ``result``, ``cancel`` and the task part of ``status`` touch only the task store, so
they answer at once and work while the engine restarts; ``up``, ``down`` and the actor part of
``status`` talk to Ray.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cluster.service import head
from cluster.service.follow import Follower, Piece
from cluster.service.home import (
    ENGINE_NAME,
    NAMESPACE,
    read_json,
    remove_json,
    resolve_home,
    store_path,
    write_json,
)
from cluster.service.spec import (
    ServiceSpec,
    build_spec,
    engine_mismatch,
    load_cluster_file,
    parse_task,
    sampling_dict,
)
from cluster.service.store import TERMINAL, Task, TaskStore
from scheduler.errors import ConfigError, TilerunError

# Before Ray is first imported (it reads its configuration then): a tilerun cluster checks every
# call's token, so clients present Ray's own (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token).
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


class ServiceError(TilerunError, RuntimeError):
    """The service is not where the home directory says, or a task id is unknown."""


def connect(address: str) -> None:
    """Join the cluster at ``address`` as a driver in the ``tilerun`` namespace (token auth on)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_AUTH_MODE") == "token":
        # Ray imported before this module (``import ray`` first in a user's script) read its
        # configuration without token mode; without this the cluster refuses every call
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    try:
        ray.init(
            address=address,
            namespace=NAMESPACE,
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except ConnectionError as e:
        raise ServiceError(
            f"cannot reach the Ray cluster at {address}: {e}. Fix: `tilerun up` (or check "
            "--address and that RAY_AUTH_TOKEN / ~/.ray/auth_token holds the cluster's token)"
        ) from None


class Service:
    """A handle on the service whose state lives in ``home``."""

    def __init__(self, home: str | Path | None = None) -> None:
        self.home = resolve_home(home)
        self._store: TaskStore | None = None

    @property
    def store(self) -> TaskStore:
        if self._store is None:
            self._store = TaskStore(store_path(self.home))
        return self._store

    # -- up / down ---------------------------------------------------------------------------
    @classmethod
    def up(
        cls,
        cluster_file: str | Path | None = None,
        *,
        address: str | None = None,
        home: str | Path | None = None,
        timeout_s: float = 600.0,
        **engine_fields: Any,
    ) -> Service:
        """Start (or attach to) Ray, start the engine actor, wait until its workers are ready."""
        svc = cls(home)
        values, where = load_cluster_file(cluster_file) if cluster_file else ({}, {})
        for k, v in engine_fields.items():
            values[k] = v
            where.pop(k, None)
        spec = build_spec(values, where)
        svc._up(spec, address or spec.engine.cluster.ray_address, timeout_s)
        return svc

    def _up(self, spec: ServiceSpec, address: str | None, timeout_s: float) -> None:
        import ray

        self.store  # noqa: B018 - create the store before anything runs
        cluster = read_json(self.home, "cluster.json")
        if cluster and cluster.get("started_by_tilerun") and not head.head_alive(cluster):
            cluster = None  # a head we started is gone (machine restarted): start another
        if cluster and address and cluster["address"] != address:
            raise ServiceError(
                f"{self.home} already serves the cluster at {cluster['address']}; "
                f"Fix: `tilerun down --home {self.home}` first, or use another --home"
            )
        if cluster is None:
            address = address or os.environ.get("RAY_ADDRESS")
            if address:
                cluster = {"address": address, "started_by_tilerun": False}
            else:
                cluster = head.start_head(self.home, spec.service.num_cpus)
            write_json(self.home, "cluster.json", cluster)
        try:
            connect(cluster["address"])
            from cluster.service.engine_actor import EngineActor

            try:
                engine = ray.get_actor(ENGINE_NAME, namespace=NAMESPACE)
            except ValueError:
                # pinned to this node: the task store is a file on it
                from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

                here = ray.get_runtime_context().get_node_id()
                engine = EngineActor.options(
                    name=ENGINE_NAME,
                    namespace=NAMESPACE,
                    lifetime="detached",
                    # Ray starts a dead engine again by itself (see engine_actor)
                    max_restarts=spec.service.engine_restarts,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
                ).remote(spec.to_dict(), str(self.home), cluster["address"])
            try:
                info = ray.get(engine.ready.remote(timeout_s))
            except ray.exceptions.RayTaskError as e:
                with contextlib.suppress(Exception):
                    ray.kill(engine)
                cause = getattr(e, "cause", None)
                if isinstance(cause, TilerunError):
                    raise cause from None
                raise
            if info["config"] != spec.to_dict():
                raise ServiceError(
                    f"an engine with other settings already runs on {cluster['address']} "
                    "(tilerun up is idempotent only with the same cluster file). "
                    f"Fix: `tilerun down --home {self.home}`, then `tilerun up` again"
                )
        except BaseException:
            if cluster.get("started_by_tilerun"):
                with contextlib.suppress(Exception):
                    ray.shutdown()
                head.stop_head(cluster)
                remove_json(self.home, "cluster.json")
            raise
        write_json(self.home, "engine.json", info)

    def down(self) -> dict[str, Any]:
        """Stop the engine and its workers, and the Ray head if ``up`` started it."""
        import ray

        cluster = read_json(self.home, "cluster.json")
        if cluster is None:
            raise ServiceError(f"no tilerun service recorded under {self.home}; nothing to stop")
        stopped = {"engine": False, "head": False}
        reachable = not cluster.get("started_by_tilerun") or head.head_alive(cluster)
        if reachable:
            connect(cluster["address"])
            try:
                engine = ray.get_actor(ENGINE_NAME, namespace=NAMESPACE)
            except ValueError:
                engine = None
            if engine is not None:
                with contextlib.suppress(Exception):
                    ray.get(engine.shutdown.remote(), timeout=120)
                ray.kill(engine, no_restart=True)
                stopped["engine"] = True
            ray.shutdown()
        if cluster.get("started_by_tilerun"):
            head.stop_head(cluster)
            stopped["head"] = True
        remove_json(self.home, "engine.json")
        remove_json(self.home, "cluster.json")
        return stopped

    # -- tasks -------------------------------------------------------------------------------
    def engine_info(self) -> dict[str, Any]:
        info = read_json(self.home, "engine.json")
        if info is None:
            raise ServiceError(
                f"no tilerun service under {self.home}: start one with "
                f"`tilerun up CLUSTER.yaml --home {self.home}`"
            )
        return info

    def submit(
        self,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        **fields: Any,
    ) -> str:
        """Store a task (committed before this returns) and give its id. ``fields`` are job
        fields: sampling (max_new_tokens, temperature, top_p, seed) and, optionally, engine fields,
        which must equal the running engine's."""
        values = dict(fields)
        if prompt is not None:
            values["prompt"] = prompt
        if prompt_token_ids is not None:
            values["prompt_token_ids"] = list(prompt_token_ids)
        return self.submit_values(values)

    def submit_values(self, values: dict[str, Any], where: dict[str, str] | None = None) -> str:
        """Validate job fields (from a job file and flags) against the engine, then store."""
        from cluster.config import EngineConfig
        from runtime.tokenizer import load_tokenizer
        from scheduler.scheduler import Scheduler, SchedulerConfig

        info = self.engine_info()
        engine = info["config"]
        given = {k: values[k] for k in EngineConfig.field_names() if values.get(k) is not None}
        engine_mismatch(given, engine)
        text, ids, sampling = parse_task(values, where)
        if ids is None:
            ids = load_tokenizer(info["checkpoint"]).encode(text)
        vocab = info["vocab_size"]
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ConfigError(
                f"prompt_token_ids {bad[:5]} are outside the model's vocabulary [0, {vocab}); "
                "give ids the model's tokenizer makes, or a text prompt"
            )
        fits = Scheduler(
            SchedulerConfig(
                block_size=info["block_size"],
                max_model_len=info["max_model_len"],
                # only the KV pool decides whether a prompt fits; engines before this key: 512
                prefill_chunk=info.get("prefill_chunk", 512),
            ),
            info["num_blocks"],
        )
        fits.check_fits(len(ids), sampling)
        return self.store.add(ids, sampling_dict(sampling), prompt_text=text)

    def task(self, task_id: str) -> Task:
        found = self.store.find(task_id)
        if not found:
            raise ServiceError(
                f"no task {task_id!r} under {self.home}; `tilerun status` lists the tasks"
            )
        if len(found) > 1:
            raise ServiceError(
                f"task id {task_id!r} is ambiguous ({len(found)} tasks start with it); "
                "give more of it"
            )
        return found[0]

    def result(self, task_id: str, wait: bool = False, timeout_s: float | None = None) -> dict:
        """The output of a finished task (the schema of ``tilerun run --json``)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            t = self.task(task_id)
            if t.state in TERMINAL or not wait:
                break
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(
                    f"task {t.id} is still {t.state} after {timeout_s:.0f}s; "
                    "`tilerun status` shows its progress"
                )
            time.sleep(0.2)
        if t.state == "done":
            return {"id": t.id, "state": t.state, "attempts": t.attempts, **t.output}
        if t.state == "failed":
            raise ServiceError(f"task {t.id} failed after {t.attempts} attempt(s): {t.error}")
        if t.state == "cancelled":
            raise ServiceError(f"task {t.id} was cancelled")
        raise ServiceError(
            f"task {t.id} is {t.state} (prefill {t.prefill_done}/{t.prefill_total}, "
            f"{t.generated} generated); `tilerun result {t.id} --wait` waits for it"
        )

    def follow(
        self, task_id: str, timeout_s: float | None = None, poll_s: float = 0.2
    ) -> Iterator[Piece]:
        """The task's text as it is generated (``cluster.service.follow``), until it ends; then
        ``result(task_id)`` gives its output (or raises its failure). A task that ended before
        gives its whole text at once."""
        t = self.task(task_id)
        if t.state == "done":
            yield Piece(t.output["text"] or "", t.output["token_ids"], t.attempts)
            return
        if t.state in TERMINAL:
            return
        from runtime.tokenizer import load_tokenizer

        follower = Follower(load_tokenizer(self.engine_info()["checkpoint"]).decode)
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            t = self.store.get(t.id)
            if t.state == "done":
                piece = follower.feed(t.attempts, t.output["token_ids"], final=True)
            elif t.state in TERMINAL:
                return
            else:
                got = self.store.partial(t.id)
                piece = follower.feed(*got) if got else None
            if piece is not None:
                yield piece
            if t.state == "done":
                return
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceError(
                    f"task {t.id} is still {t.state} after {timeout_s:.0f}s; "
                    f"`tilerun result {t.id} --follow` goes on following it"
                )
            time.sleep(poll_s)

    def cancel(self, task_id: str) -> str:
        return self.store.request_cancel(self.task(task_id).id)

    def prune(
        self, older_than_s: float | None = None, keep: int | None = None, dry_run: bool = False
    ) -> list[str]:
        """Delete finished tasks finished more than ``older_than_s`` ago and not among the
        ``keep`` latest (each rule only where given; at least one). Returns their ids."""
        if older_than_s is None and keep is None:
            raise ServiceError("prune needs a rule: --older-than AGE (e.g. 7d) and/or --keep N")
        if keep is not None and keep < 0:
            raise ServiceError(f"--keep must be 0 or more, not {keep}")
        before = None if older_than_s is None else time.time() - older_than_s
        return self.store.prune(before, keep, dry_run=dry_run)

    def tasks(self, task_id: str | None = None) -> list[dict]:
        if task_id:
            return [self.task(task_id).summary()]
        return [t.summary() for t in self.store.list()]

    def snapshot(self) -> dict[str, Any] | None:
        """The engine's snapshot (workers and live progress), or None when it is not running."""
        import ray

        cluster = read_json(self.home, "cluster.json")
        if cluster is None:
            return None
        if cluster.get("started_by_tilerun") and not head.head_alive(cluster):
            return None
        connect(cluster["address"])
        try:
            engine = ray.get_actor(ENGINE_NAME, namespace=NAMESPACE)
            return ray.get(engine.snapshot.remote(), timeout=60)
        except (ValueError, ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            return None

    def urls(self) -> dict[str, Any]:
        cluster = read_json(self.home, "cluster.json") or {}
        return {
            "ray_address": cluster.get("address"),
            "ray_dashboard": cluster.get("dashboard"),
            "status_page": (read_json(self.home, "engine.json") or {}).get("status_page"),
            "home": str(self.home),
        }
