"""The Gluon prefill kernel's barrier protocol, simulated on the CPU (one CTA).

``runtime/attention/gluon_prefill_hopper.py`` coordinates a producer warp and two consumer warp
groups through mbarriers: K/V ready and empty rings (empty counts both groups), the drain of
tiles one group does not need, the ping-pong turns, and ``v_fixed`` for the zeroed last V tile.
A mistake there hangs the GPU rather than failing a test, so this script replays the same
program order with mbarrier phase-parity semantics under random interleavings and checks that
nothing deadlocks and every read finds the tile it expects, for chunk offsets, lengths and tile
starts around the 64/128 boundaries, 2 and 3 stages, ping-pong on and off. It mirrors the kernel
by hand: run it after changing the protocol there.

    python scripts/gluon_prefill_protocol.py
"""

import random


class Bar:
    """An mbarrier: ``count`` arrivals complete a phase; a wait on parity p passes once the
    phase of that parity before the current one has completed (PTX try_wait.parity)."""

    def __init__(self, count):
        self.count, self.pending, self.phase = count, 0, 0

    def arrive(self, n=1):
        self.pending += n
        assert self.pending <= self.count
        if self.pending == self.count:
            self.pending, self.phase = 0, self.phase + 1

    def passes(self, parity):
        return (self.phase & 1) != parity


def cdiv(a, b):
    return -(-a // b)


def run(ctx, q_len, m0, STAGES=2, BM=64, BN=128, PINGPONG=True, seed=0):
    seq_len = ctx + q_len
    hi = ctx + min(m0 + 2 * BM, q_len)
    n_tiles = cdiv(hi, BN)
    n_first = cdiv(ctx + min(m0 + BM, q_len), BN)
    n_second = n_tiles if m0 + BM < q_len else 0
    n_turns = min(n_first, n_second) - 1
    fix_last = n_tiles * BN > seq_len
    kr = [Bar(1) for _ in range(STAGES)]
    vr = [Bar(1) for _ in range(STAGES)]
    ke = [Bar(2) for _ in range(STAGES)]
    ve = [Bar(2) for _ in range(STAGES)]
    turns = [Bar(1), Bar(1)]
    vfix = Bar(1)
    turns[0].arrive()
    kbuf = [None] * STAGES
    vbuf = [None] * STAGES
    vfixed_flag = [False]
    reads = []

    def producer():
        for j in range(n_tiles):
            s, ph = j % STAGES, (j // STAGES) & 1
            yield ("wait", ke[s], ph ^ 1)
            kbuf[s] = j
            kr[s].arrive()  # expect + TMA landing
            yield ("step",)
            yield ("wait", ve[s], ph ^ 1)
            vbuf[s] = j
            vr[s].arrive()
            yield ("step",)
        last = n_tiles - 1
        if fix_last:
            s = last % STAGES
            yield ("wait", vr[s], (last // STAGES) & 1)
            assert vbuf[s] == last
            vfixed_flag[0] = True
            vfix.arrive()

    def wait_v(t):
        if fix_last and t == n_tiles - 1:
            yield ("wait", vfix, 0)
            assert vfixed_flag[0]
        else:
            yield ("wait", vr[t % STAGES], (t // STAGES) & 1)

    def consumer(WG):
        r0 = m0 + WG * BM
        hi_w = ctx + min(r0 + BM, q_len)
        n = cdiv(hi_w, BN)
        if r0 >= q_len:
            n = 0
        if n > 0:
            yield ("wait", kr[0], 0)
            assert kbuf[0] == 0
            reads.append((WG, "k", 0))
            ke[0].arrive()
            for j in range(1, n):
                s, ph = j % STAGES, (j // STAGES) & 1
                yield ("wait", kr[s], ph)
                yield from wait_v(j - 1)
                if PINGPONG and j <= n_turns:
                    yield ("wait", turns[WG], (j - 1) & 1)
                assert kbuf[s] == j, (WG, j, kbuf)
                assert vbuf[(j - 1) % STAGES] == j - 1
                reads.append((WG, "k", j))
                reads.append((WG, "v", j - 1))
                if PINGPONG and j <= n_turns:
                    turns[1 - WG].arrive()
                yield ("step",)
                ke[s].arrive()  # after the scores' wait
                yield ("step",)
                assert vbuf[(j - 1) % STAGES] == j - 1  # still there while PV runs
                ve[(j - 1) % STAGES].arrive()
            yield from wait_v(n - 1)
            assert vbuf[(n - 1) % STAGES] == n - 1
            reads.append((WG, "v", n - 1))
            ve[(n - 1) % STAGES].arrive()
        for j in range(n, n_tiles):
            s, ph = j % STAGES, (j // STAGES) & 1
            yield ("wait", kr[s], ph)
            ke[s].arrive()
            yield ("wait", vr[s], ph)
            ve[s].arrive()

    agents = {"P": producer(), "C0": consumer(0), "C1": consumer(1)}
    blocked = {k: None for k in agents}
    rng = random.Random(seed)
    done = set()
    while len(done) < 3:
        progressed = False
        order = list(agents)
        rng.shuffle(order)
        for name in order:
            if name in done:
                continue
            ev = blocked[name]
            if ev is not None:
                if not ev[1].passes(ev[2]):
                    continue
                blocked[name] = None
            try:
                nxt = next(agents[name])
            except StopIteration:
                done.add(name)
                progressed = True
                continue
            progressed = True
            if nxt[0] == "wait" and not nxt[1].passes(nxt[2]):
                blocked[name] = nxt
            break
        if not progressed:
            raise RuntimeError(f"deadlock ctx={ctx} q_len={q_len} m0={m0}: {blocked}")
    # every consumer with rows read each of its tiles' K and V once
    for WG in (0, 1):
        r0 = m0 + WG * BM
        n = 0 if r0 >= q_len else cdiv(ctx + min(r0 + BM, q_len), BN)
        got = sorted(t for w, kind, t in reads if w == WG and kind == "k")
        assert got == list(range(n)), (WG, got, n)
        got = sorted(t for w, kind, t in reads if w == WG and kind == "v")
        assert got == list(range(n)), (WG, got, n)
    return n_tiles


cases = 0
for ctx in (0, 1, 63, 64, 127, 128, 129, 300, 1000):
    for q_len in (1, 2, 63, 64, 65, 100, 127, 128, 129, 200, 255, 256, 257, 700, 1023):
        for m0 in range(0, q_len, 128):
            for stages in (2, 3):
                for pp in (True, False):
                    for seed in range(3):
                        run(ctx, q_len, m0, STAGES=stages, PINGPONG=pp, seed=seed)
                        cases += 1
print("ok", cases, "cases")
