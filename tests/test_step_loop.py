"""The step loop with overlap on and off, against pure-Python stand-ins for the workers.

The stand-in (``tests.test_spill_scheduler.FakeWorkers``) keeps real block contents and a model
that reads every earlier token back through the block table, so a wrong table, a block freed and
reused too early, a swap at the wrong moment or a wrong pending token changes the tokens. Here it
also runs each step only when a result is asked for: the scheduler has by then already scheduled
the next step (the most adversarial order the overlapped loop allows). Pending tokens are filled
in from what the stand-in sampled last, as the real workers do.

Every run, overlap on or off, plain or two-tier scheduler (with preemption), with stop tokens
learned late, cancels in flight and arrivals during the run, gives each sequence the tokens it
gets alone with room for everything.
"""

from __future__ import annotations

import dataclasses
import random

import pytest

from cluster.step_loop import StepLoop
from scheduler.batch import ScheduledBatch
from scheduler.config import SchedulerConfig
from scheduler.request import PENDING_TOKEN, SamplingParams, Sequence
from scheduler.scheduler import Scheduler
from scheduler.spill import SpillScheduler
from tests.test_spill_scheduler import VOCAB, FakeWorkers

STOPS = (3, 14, 15, 92, 65)  # ~5% of tokens stop a sequence that does not ignore them


@dataclasses.dataclass
class _Result:
    sampled: dict[int, int]
    logits: dict = dataclasses.field(default_factory=dict)


class _Handle:
    def __init__(self, ex: LazyExecutor, batch: ScheduledBatch) -> None:
        self.ex, self.batch, self.sampled = ex, batch, None

    def result(self) -> _Result:
        self.ex.run_until(self)
        return _Result(dict(self.sampled))


class LazyExecutor:
    """``submit`` queues a step; a step runs when its result (or a later one's) is asked for."""

    def __init__(self, sched: Scheduler, workers: FakeWorkers, depth: int = 1) -> None:
        self.sched, self.workers = sched, workers
        self.pipeline_depth = depth  # steps the overlapped loop leaves in flight
        self.queue: list[_Handle] = []
        self.last: dict[int, int] = {}  # seq_id -> token sampled last (a worker's memory)
        self.pending_filled = 0
        self.steps = 0

    def submit(self, batch: ScheduledBatch, logits: str = "none", hold: bool = False) -> _Handle:
        h = _Handle(self, batch)
        self.queue.append(h)
        return h

    def run_until(self, handle: _Handle) -> None:
        while handle.sampled is None:
            h = self.queue.pop(0)
            h.sampled = self._run(h.batch)

    def _run(self, batch: ScheduledBatch) -> dict[int, int]:
        self.steps += 1
        for sid in batch.finished_seq_ids:
            self.workers.finish([sid])
            self.last.pop(sid, None)
        chunks = []
        for c in batch.chunks:
            if PENDING_TOKEN in c.token_ids:
                assert len(c.token_ids) == 1, "only a decode chunk may carry a pending token"
                c = dataclasses.replace(c, token_ids=(self.last[c.seq_id],))
                self.pending_filled += 1
            chunks.append(c)
        sampled = self.workers.execute(self.sched, dataclasses.replace(batch, chunks=tuple(chunks)))
        self.last.update(sampled)
        return sampled


def drive(sched, workers, arrivals, overlap, cancel_at=None, max_turns=20000, depth=1):
    """Run ``arrivals`` (turn, seq_id, prompt, params) through a StepLoop whose executor asks
    for ``depth`` steps in flight; ``cancel_at``: {turn: seq_id} aborted at that turn. Returns
    (seq_id -> tokens, discarded chunks, ex)."""
    ex = LazyExecutor(sched, workers, depth)
    loop = StepLoop(sched, ex, overlap=overlap)
    arrivals = sorted(arrivals, key=lambda a: a[0])
    cancel_at = dict(cancel_at or {})
    seqs: dict[int, Sequence] = {}
    discarded = most = 0
    turn = 0
    while arrivals or loop.has_work:
        while arrivals and arrivals[0][0] <= turn:
            _, sid, prompt, params = arrivals.pop(0)
            seqs[sid] = Sequence(sid, list(prompt), params, eos_token_ids=STOPS)
            sched.add(seqs[sid])
        if turn in cancel_at:
            sched.abort(cancel_at.pop(turn))
        turn += 1
        assert turn < max_turns, "no progress"
        taken = loop.advance()
        most = max(most, loop.in_flight)
        if taken is None:
            continue
        for step in taken:
            discarded += len(step.discarded)
            for seq in step.finished:
                assert seq.status.value == "finished" and seq.num_pending >= 0
    assert loop.in_flight == 0
    assert most <= (depth if overlap else 0), "more steps in flight than asked for"
    ex.most_in_flight = most
    return {sid: s.output_ids for sid, s in seqs.items()}, discarded, ex


def workload(rng: random.Random, bs: int, n: int, stops: bool = True):
    out = []
    for sid in range(n):
        plen = max(1, rng.choice([1, 2, bs - 1, bs, bs + 1, rng.randint(1, 12 * bs)]))
        prompt = [rng.randrange(VOCAB) for _ in range(plen)]
        ignore = not stops or rng.random() < 0.3
        params = SamplingParams(max_new_tokens=rng.randint(1, 4 * bs), ignore_eos=ignore)
        out.append((rng.randint(0, 6), sid, prompt, params))
    return out


def lifetime_blocks(work, bs):
    return [-(-(len(p) + sp.max_new_tokens) // bs) for _, _, p, sp in work]


def alone(work, bs):
    """Each sequence by itself, one step at a time, room for everything: the reference."""
    out = {}
    for _, sid, prompt, params in work:
        need = lifetime_blocks([(0, sid, prompt, params)], bs)[0]
        s = Scheduler(SchedulerConfig(block_size=bs, prefill_chunk=512, max_model_len=10**6), need)
        got, _, _ = drive(s, FakeWorkers(need, 0, bs), [(0, sid, prompt, params)], False)
        out[sid] = got[sid]
    return out


def _plain(work, bs, chunk, seats):
    total = sum(lifetime_blocks(work, bs))
    cfg = SchedulerConfig(block_size=bs, prefill_chunk=chunk, max_num_seqs=seats,
                          max_model_len=10**6)  # fmt: skip
    return Scheduler(cfg, total), FakeWorkers(total, 0, bs)


def _spill(rng, work, bs, chunk, seats):
    need = max(lifetime_blocks(work, bs))
    total = sum(lifetime_blocks(work, bs))
    dev = rng.randint(1, max(1, need // 2))
    host = rng.randint(need, need + total)
    cfg = SchedulerConfig(block_size=bs, prefill_chunk=chunk, max_num_seqs=seats,
                          max_model_len=10**6)  # fmt: skip
    sched = SpillScheduler(cfg, dev, host, rng.randint(0, 2), rng.randint(0, 3))
    return sched, FakeWorkers(dev, host, bs)


@pytest.mark.parametrize("kind", ["plain", "spill"])
@pytest.mark.parametrize("seed", range(25))
def test_overlap_on_and_off_give_each_sequence_its_tokens_alone(seed, kind):
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4, 16])
    work = workload(rng, bs, rng.randint(1, 6))
    chunk = rng.choice([1, 3, bs, 2 * bs + 1, 64])
    seats = rng.randint(1, 4)
    ref = alone(work, bs)
    state = rng.getstate()
    for overlap, depth in ((False, 1), (True, 1), (True, 2), (True, 3)):
        rng.setstate(state)  # the same pool sizes every way
        sched, workers = (
            _plain(work, bs, chunk, seats)
            if kind == "plain"
            else _spill(rng, work, bs, chunk, seats)
        )
        got, _, ex = drive(sched, workers, work, overlap, depth=depth)
        assert got == ref, f"overlap={overlap} depth={depth}"
        if kind == "spill":
            t = sched.tiers
            assert (t.num_free_device, t.num_free_host) == (t.device_blocks, t.host_blocks)
            assert sched._reserved == 0
        else:
            assert sched.blocks.num_free == sched.blocks.num_blocks
        assert not sched.running and not sched.waiting
        if overlap and any(len(v) > 1 for v in ref.values()):
            assert ex.pending_filled > 0, "no step was sent before its previous token was back"
        if overlap and any(len(v) > depth for v in ref.values()):
            assert ex.most_in_flight == depth


def test_a_stop_token_learned_late_discards_the_steps_in_flight_and_frees_its_blocks_early():
    """Two sequences; the first stops on a stop token. With overlap, d extra steps of it (the
    pipeline depth) were already sent: they run, their tokens are dropped, and its blocks go to
    a waiting sequence."""
    bs = 4
    # find a prompt whose third token is a stop token, so the stop comes mid-batch
    rng = random.Random(7)
    while True:
        prompt = [rng.randrange(VOCAB) for _ in range(6)]
        probe = alone([(0, 0, prompt, SamplingParams(max_new_tokens=8))], bs)[0]
        if len(probe) == 3 and probe[-1] in STOPS:
            break
    long = [(0, 1, [1, 2, 3, 4, 5], SamplingParams(max_new_tokens=12, ignore_eos=True))]
    late = [(0, 2, [9, 9, 9], SamplingParams(max_new_tokens=4, ignore_eos=True))]
    work = [(0, 0, prompt, SamplingParams(max_new_tokens=8))] + long + late
    ref = alone(work, bs)
    for overlap, extra in ((False, 0), (True, 1), (True, 2), (True, 3)):
        # room for two lifetimes at once: the third sequence waits for the first's blocks
        need = lifetime_blocks(work, bs)
        sched = Scheduler(
            SchedulerConfig(block_size=bs, prefill_chunk=512, max_model_len=10**6, max_num_seqs=3),
            need[0] + need[1],
        )
        got, discarded, _ = drive(
            sched, FakeWorkers(sum(need), 0, bs), work, overlap, depth=max(extra, 1)
        )
        assert got == ref and got[0] == probe
        assert discarded == extra
        assert sched.blocks.num_free == sched.blocks.num_blocks


def test_length_stops_are_never_late():
    """No step is ever sent past ``max_new_tokens``: without stop tokens nothing is
    discarded, and the steps equal the tokens of a lone sequence."""
    bs = 4
    work = [(0, 0, [5] * 9, SamplingParams(max_new_tokens=7, ignore_eos=True))]
    for overlap, depth in ((False, 1), (True, 1), (True, 3)):
        sched = Scheduler(SchedulerConfig(block_size=bs, prefill_chunk=512, max_model_len=100), 8)
        got, discarded, ex = drive(sched, FakeWorkers(8, 0, bs), work, overlap, depth=depth)
        assert len(got[0]) == 7 and discarded == 0
        assert ex.steps == 1 + 6  # one prefill step, six decode steps


@pytest.mark.parametrize("kind", ["plain", "spill"])
@pytest.mark.parametrize("seed", range(8))
def test_cancel_with_a_step_in_flight(seed, kind):
    """Aborting a sequence whose step is in flight: the others keep their tokens, the
    cancelled one has a prefix of its own, every block comes back."""
    rng = random.Random(100 + seed)
    bs = rng.choice([2, 4])
    work = workload(rng, bs, 4, stops=False)
    ref = alone(work, bs)
    victim, when = rng.randrange(4), rng.randint(3, 9)
    for overlap, depth in ((False, 1), (True, 1), (True, 2)):
        if kind == "plain":
            sched, workers = _plain(work, bs, 8, 4)
        else:
            sched, workers = _spill(random.Random(seed), work, bs, 8, 4)
        got, _, _ = drive(sched, workers, work, overlap, cancel_at={when: victim}, depth=depth)
        for sid, toks in got.items():
            if sid == victim:
                assert toks == ref[sid][: len(toks)]
            else:
                assert toks == ref[sid]
        if kind == "plain":
            assert sched.blocks.num_free == sched.blocks.num_blocks
        else:
            t = sched.tiers
            assert t.num_free_device + t.num_free_host == t.num_blocks
