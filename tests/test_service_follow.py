"""`tilerun result --follow`'s follower and the store's partial rows: the pieces concatenate to
the output (tokens and text), a character split across tokens waits for its last byte, a new
attempt that repeats the shown tokens shows nothing twice, one that differs says so."""

from __future__ import annotations

from cluster.service.follow import Follower
from cluster.service.store import TaskStore
from runtime.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def _pieces(snapshots, final):
    f = Follower(TOK.decode)
    got = [f.feed(a, t) for a, t in snapshots]
    got.append(f.feed(snapshots[-1][0] if snapshots else 1, final, final=True))
    return [p for p in got if p is not None]


def test_pieces_concatenate_to_the_output_and_hold_split_characters():
    out = list("héllo wörld ✓ ".encode()) + [300, 301] + list(b"done")
    # snapshots cut inside the two-byte é, the three-byte ✓ and among ids without text
    cuts = [0, 2, 3, 9, 15, 16, 18, 21, len(out) - 1]
    pieces = _pieces([(1, out[:c]) for c in cuts], out)
    assert "".join(p.text for p in pieces) == TOK.decode(out) == "héllo wörld ✓ done"
    assert [t for p in pieces for t in p.token_ids] == out
    assert all("\ufffd" not in p.text for p in pieces)  # nothing half-decoded was shown
    assert not any(p.restarted for p in pieces)


def test_a_new_attempt_that_repeats_the_tokens_shows_nothing_twice():
    out = list(b"the same greedy tokens again")
    snaps = [(1, out[:10]), (1, out[:20]), (2, []), (2, out[:5]), (2, out[:20]), (2, out[:25])]
    pieces = _pieces(snaps, out)
    assert "".join(p.text for p in pieces) == TOK.decode(out)
    assert [t for p in pieces for t in p.token_ids] == out
    assert not any(p.restarted for p in pieces)
    # while attempt 2 catches up with the 20 tokens shown, nothing is emitted
    f = Follower(TOK.decode)
    assert [f.feed(*s_) is None for s_ in snaps[:5]] == [False, False, True, True, True]


def test_a_new_attempt_on_another_path_starts_the_output_again():
    first, second = list(b"sampled one way"), list(b"sampled another way")
    snaps = [(1, first[:12]), (2, []), (2, second[:12]), (2, second)]
    pieces = _pieces(snaps, second)
    starts = [i for i, p in enumerate(pieces) if p.restarted]
    assert len(starts) == 1 and pieces[starts[0]].attempt == 2
    after = pieces[starts[0] :]
    assert "".join(p.text for p in after) == "sampled another way"
    assert [t for p in after for t in p.token_ids] == second


def test_store_keeps_the_running_attempts_tokens_until_it_ends(tmp_path):
    s = TaskStore(tmp_path / "tasks.db")
    a = s.add([1, 2, 3], {"max_new_tokens": 8})
    s.progress([], {a: (1, [5])})
    assert s.partial(a) is None  # queued: nothing is running to have tokens
    assert s.start(a) == 1
    s.progress([(a, 3, 2, None, None)], {a: (1, [5, 6])})
    assert s.partial(a) == (1, [5, 6])
    s.progress([], {a: (0, [9, 9, 9])})  # a stale attempt's write is ignored
    assert s.partial(a) == (1, [5, 6])
    s.requeue(a, "a worker died")
    assert s.partial(a) is None
    assert s.start(a) == 2
    s.progress([], {a: (2, [5, 6, 7])})
    assert TaskStore(tmp_path / "tasks.db").partial(a) == (2, [5, 6, 7])  # another process
    s.finish(a, "done", output={"token_ids": [5, 6, 7, 8], "metrics": {}})
    assert s.partial(a) is None
