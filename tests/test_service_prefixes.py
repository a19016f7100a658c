"""The service's prefix files (cluster/service/prefixes.py) without Ray: which run saves, which
restores, what counts as whole, and what is removed."""

from __future__ import annotations

import torch

from cluster.service.prefixes import Prefixes
from cluster.service.spec import ServiceSpec
from cluster.service.store import TaskStore
from runtime import kv_prefix
from runtime.kv_cache import KVCache


def _spec(**kw) -> ServiceSpec:
    return ServiceSpec.from_dict({"model": "tiny", "device": "cpu", "tp": 2, **kw})


def _write(p: Prefixes, task, rank: int, tokens: int, key: str | None = None, tp: int = 2) -> None:
    kv = KVCache(2, 4, 16, 1, 8, torch.float32, torch.device("cpu"))
    meta = {**kv_prefix.layout(kv, rank, tp), "key": key or p.key(task.prompt_token_ids)}
    kv_prefix.save(kv, [0, 1, 2, 3], tokens, p.stem(task.id), meta)


def test_a_long_task_saves_then_restores_once_every_rank_file_is_whole(tmp_path):
    store = TaskStore(tmp_path / "tasks.db")
    long, short = store.add(list(range(40)), {}), store.add(list(range(10)), {})
    long, short = store.get(long), store.get(short)
    p = Prefixes(tmp_path, _spec(kv_prefix_min_tokens=32))
    p.for_device("cuda")  # an asked threshold stays
    assert p.request(short) == {}
    stem = str(tmp_path / "kv" / long.id)
    assert p.request(long) == {"save_prefix": (stem, p.key(long.prompt_token_ids), 40)}
    _write(p, long, 0, 40)
    assert not p.whole(long)  # rank 1's file is missing
    _write(p, long, 1, 39)
    assert not p.whole(long)  # ... holds another length
    _write(p, long, 1, 40, key="another prompt or config")
    assert not p.whole(long)
    _write(p, long, 1, 40)
    assert p.whole(long) and p.request(long) == {"restore_prefix": (stem, 40)}
    p.enabled = False  # a worker on another node than the engine
    assert p.request(long) == {}
    p.enabled = True
    other = Prefixes(tmp_path, _spec(kv_prefix_min_tokens=32, dtype="bfloat16"))
    assert not other.whole(long)  # another engine config makes other KV
    p.remove(long.id)
    assert not list((tmp_path / "kv").iterdir())


def test_the_default_saves_on_cpu_workers_only_and_sweep_keeps_live_tasks(tmp_path):
    store = TaskStore(tmp_path / "tasks.db")
    t = store.get(store.add(list(range(3000)), {}))
    p = Prefixes(tmp_path, _spec())
    p.for_device("cuda")
    assert p.request(t) == {}
    p.for_device("cpu")
    assert "save_prefix" in p.request(t)
    _write(p, t, 0, 40)
    gone = store.get(store.add([1], {}))
    _write(p, gone, 0, 40)
    (tmp_path / "kv" / f"{t.id}.rank1.safetensors.123.tmp").write_bytes(b"half")
    p.sweep({t.id})
    assert [f.name for f in (tmp_path / "kv").iterdir()] == [f"{t.id}.rank0.safetensors"]
