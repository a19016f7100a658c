"""Block tables sent as deltas (``scheduler.table_deltas``): what the workers rebuild is exactly
the table the scheduler made, step after step, through growth, spill swaps, preemption and
resume; real workers give the same tokens with deltas as with whole tables, and a decode step's
message stops growing with the context."""

from __future__ import annotations

import pickle
import random

import pytest
import torch

from cluster import LLM, SamplingParams
from scheduler.batch import ScheduledBatch, SeqChunk
from scheduler.table_deltas import TableDelta, TableSender, TableStore
from tests.hf_models import make_hf_llama
from tests.test_spill_scheduler import FakeWorkers, plain_sched, random_workload, run, spill_sched


class DeltaWorkers(FakeWorkers):
    """The stand-in workers, reached through the wire: encode, pickle, rebuild, compare."""

    def __init__(self, *a) -> None:
        super().__init__(*a)
        self.sender, self.tables = TableSender(), TableStore()
        self.whole_bytes = self.delta_bytes = 0
        self.rewritten = 0  # steps where some table changed other than by growing

    def execute(self, sched, batch):
        wire = self.sender.encode(batch)
        assert all(isinstance(c.block_table, TableDelta) for c in wire.chunks)
        self.rewritten += any(
            c.block_table.keep < len(self.tables._tables.get(c.seq_id, ())) for c in wire.chunks
        )
        for c in wire.chunks:  # sampling parameters travel with a sequence's first chunk only
            assert (c.params is not None) == (c.seq_id not in self.tables._params)
        data = pickle.dumps(wire)
        self.delta_bytes += len(data)
        self.whole_bytes += len(pickle.dumps(batch))
        got = self.tables.expand(pickle.loads(data))
        assert got == batch, f"step {batch.step}: rebuilt tables differ"
        return super().execute(sched, got)


@pytest.mark.parametrize("seed", range(30))
def test_random_schedules_rebuild_every_table_exactly(seed):
    rng = random.Random(1000 + seed)
    bs = rng.choice([1, 2, 4, 16])
    work = random_workload(rng, bs, rng.randint(1, 6))
    chunk = rng.choice([1, 3, bs, 2 * bs + 1, 64])
    seats = rng.randint(1, 4)
    need = max(-(-(len(p) + sp.max_new_tokens) // bs) for _, _, p, sp in work)
    total = sum(-(-(len(p) + sp.max_new_tokens) // bs) for _, _, p, sp in work)
    kw = dict(block_size=bs, prefill_chunk=chunk, max_num_seqs=seats, max_model_len=10**6)
    ref = run(plain_sched(total, **kw), FakeWorkers(total, 0, bs), work)
    plain = DeltaWorkers(total, 0, bs)
    assert run(plain_sched(total, **kw), plain, work) == ref
    dev = rng.randint(1, max(1, need // 2))
    host = rng.randint(need, need + total)
    sched = spill_sched(
        dev, sink_blocks=rng.randint(0, 2), recent_blocks=rng.randint(0, 3),
        host_blocks=host, **kw,
    )  # fmt: skip
    spilled = DeltaWorkers(dev, host, bs)
    assert run(sched, spilled, work) == ref
    # every sequence's state is dropped once the next batch says it finished
    assert len(spilled.sender) == len(spilled.tables) <= seats


def test_swaps_and_preemption_rewrite_tables_and_still_match():
    """Two device blocks, three decoding tasks: tasks are paused and resumed (their tables
    rewritten to host ids and back); the rebuilt tables equal the scheduler's every step."""
    bs = 4
    prompts = [[(7 * i + j) % 97 for j in range(5 + 3 * i)] for i in range(3)]
    params = SamplingParams(max_new_tokens=9, ignore_eos=True)
    work = [(0, i, p, params) for i, p in enumerate(prompts)]
    ref = run(plain_sched(num_blocks=64, block_size=bs, max_model_len=1000),
              FakeWorkers(64, 0, bs), work)  # fmt: skip
    s = spill_sched(num_blocks=2, block_size=bs, host_blocks=32, max_model_len=1000)
    w = DeltaWorkers(2, 32, bs)
    assert run(s, w, work) == ref
    assert s.stats.preemptions >= 1 and w.swapped > 0
    assert w.rewritten > 0, "no table was rewritten: the test did not reach the case it is for"


def test_decode_message_stays_small_at_long_contexts():
    params = SamplingParams(max_new_tokens=4)
    sender = TableSender()
    sizes = []
    for blocks in (4, 2048):
        table = tuple(range(blocks))
        first = ScheduledBatch(1, (SeqChunk(blocks, (1,), blocks * 16 - 1, table, True, params),))
        sender.encode(first)
        nxt = ScheduledBatch(
            2, (SeqChunk(blocks, (2,), blocks * 16, table + (blocks,), True, params),)
        )  # noqa: E501
        sizes.append((len(pickle.dumps(nxt)), len(pickle.dumps(sender.encode(nxt)))))
    (whole_short, delta_short), (whole_long, delta_long) = sizes
    assert whole_long > 4 * whole_short  # whole tables grow with the context...
    assert delta_long <= delta_short + 16  # ...a delta does not (larger ids pickle longer)


def test_a_lost_step_is_named_not_silently_wrong():
    params = SamplingParams(max_new_tokens=4)
    sender, store = TableSender(), TableStore()
    b1 = ScheduledBatch(1, (SeqChunk(0, (1,) * 8, 0, (3, 4), False, params),))
    b2 = ScheduledBatch(2, (SeqChunk(0, (1,), 8, (3, 4, 5), True, params),))
    sender.encode(b1)  # never reaches the store
    with pytest.raises(RuntimeError, match="sequence 0 .* a step was lost"):
        store.expand(sender.encode(b2))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf_deltas")
    make_hf_llama(d, "gqa", max_position_embeddings=1024)
    return d


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 384, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.slow
def test_real_workers_same_tokens_with_deltas_and_whole_tables_under_spill(ckpt):
    """A real worker (in process) with a 64-token device tier under six tasks: blocks spill,
    tasks are preempted and resumed; deltas on and off give the same greedy tokens."""
    prompts = [_prompt(20 + 37 * i, seed=i) for i in range(6)]
    cfg = dict(model=str(ckpt), device="cpu", dtype="float32", attention="torch",
               executor="local", prefill_chunk=64, max_model_len=512, max_num_seqs=6,
               block_size=16, kv_cache_tokens=64, kv_host_tokens=4096, spill="stream")  # fmt: skip
    outs = {}
    for deltas in (False, True):
        with LLM(**cfg) as llm:
            llm.engine.executor.table_deltas = deltas
            res = llm.engine.generate(prompts, SamplingParams(max_new_tokens=12))
            outs[deltas] = [o.token_ids for o in res]
            kv = res[0].metrics["kv"]
            if deltas:
                worker = llm.engine.executor.worker
                assert len(worker.tables) > 0  # the worker did rebuild tables from deltas
    assert outs[True] == outs[False]
    assert kv["preemptions"] > 0
