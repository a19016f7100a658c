"""``--spill auto`` checks the cost model's cooperate pick against measured step times
(``runtime.spill_tuner``): every candidate is timed, the fastest runs, a new kind of step or
``RECHECK`` committed steps time them again."""

from __future__ import annotations

import pytest

from runtime.spill_tuner import SpillTuner, step_kind


def _run(tuner, kind, seconds: dict[str, float], steps: int) -> list[str]:
    """``steps`` steps of ``kind`` where a step run as candidate m takes ``seconds[m]``."""
    ran = []
    for _ in range(steps):
        mode = tuner.pick(kind, tuple(seconds))
        tuner.record(kind, mode, seconds[mode])
        ran.append(mode)
    return ran


def test_times_both_modes_then_runs_the_faster():
    kind = step_kind(1, True, 4096)
    # as measured on the H100: cooperate 171 ms, stream 151 ms a step
    ran = _run(SpillTuner(trials=2), kind, {"cooperate": 0.171, "stream": 0.151}, 10)
    assert ran[:4] == ["cooperate", "stream", "cooperate", "stream"]
    assert ran[4:] == ["stream"] * 6
    # where the CPU's help pays, it keeps helping
    ran = _run(SpillTuner(trials=2), kind, {"cooperate": 0.110, "stream": 0.151}, 10)
    assert ran[4:] == ["cooperate"] * 6


def test_the_committed_mode_follows_its_latest_times():
    t, kind = SpillTuner(trials=2), step_kind(1, True, 4096)
    _run(t, kind, {"cooperate": 0.110, "stream": 0.151}, 4)
    # the CPU gets busy: cooperate steps now take longer than streaming did
    ran = _run(t, kind, {"cooperate": 0.200, "stream": 0.151}, 4)
    assert ran == ["cooperate", "stream", "stream", "stream"]


def test_the_other_mode_is_timed_again_after_recheck_steps():
    t, kind = SpillTuner(trials=1, recheck=5), step_kind(2, True, 9000)
    ran = _run(t, kind, {"cooperate": 0.171, "stream": 0.151}, 2 + 5)
    assert ran == ["cooperate", "stream"] + ["stream"] * 5
    # now cooperate is faster: the recheck finds it
    ran = _run(t, kind, {"cooperate": 0.100, "stream": 0.151}, 3)
    assert ran == ["cooperate", "cooperate", "cooperate"]


def test_each_kind_is_timed_on_its_own():
    t = SpillTuner(trials=1)
    a, b = step_kind(1, True, 4096), step_kind(2, True, 4096)
    assert _run(t, a, {"cooperate": 0.2, "stream": 0.1}, 3) == ["cooperate", "stream", "stream"]
    assert _run(t, b, {"cooperate": 0.1, "stream": 0.2}, 3) == [
        "cooperate",
        "stream",
        "cooperate",
    ]
    assert set(t.summary()) == {str(a), str(b)}


def test_kinds_group_host_block_counts_within_a_fifth():
    assert step_kind(1, True, 4096) == step_kind(1, True, 4300)
    assert step_kind(1, True, 4096) != step_kind(1, True, 5200)
    assert step_kind(1, True, 4096) != step_kind(1, False, 4096)
    assert step_kind(1, True, 0) == step_kind(1, True, 1)


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="trials"):
        SpillTuner(trials=0)
    with pytest.raises(ValueError, match="recheck"):
        SpillTuner(recheck=0)


def test_three_candidates_the_middle_one_wins():
    """The model's CPU share, half of it, none: where the CPU's serial time makes the model's
    share too big and streaming alone is link-bound, half the share is fastest."""
    t, kind = SpillTuner(trials=2), step_kind(1, True, 4096)
    seconds = {"cooperate": 0.171, "cooperate-half": 0.120, "stream": 0.151}
    ran = _run(t, kind, seconds, 9)
    assert ran[:6] == ["cooperate", "cooperate-half", "stream"] * 2
    assert ran[6:] == ["cooperate-half"] * 3
    assert t.summary()[str(kind)] == pytest.approx(seconds)
