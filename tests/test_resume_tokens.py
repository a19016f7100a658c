"""A task resumed after some generated tokens (they end its prompt, its seeded sampler skips
their draws) goes on with the tokens the uninterrupted run generates, through the engine and
new workers; with its prompt's KV read from disk too."""

from __future__ import annotations

import pytest
import torch

from cluster import LLM, SamplingParams

NEW, DONE = 40, 15  # tokens asked for; tokens the first run got before it "died"


def _llm():
    return LLM("tiny", executor="local", device="cpu", dtype="float32", attention="torch",
               prefill_chunk=64, max_model_len=512)  # fmt: skip


def _run(llm, prompt, params, skip=0, **prefix):
    e = llm.engine
    seq = e.add_request(prompt, params, **prefix)
    seq.skip_draws = skip
    while e.steps.has_work:
        e.steps.advance()
    return seq.output_ids


@pytest.mark.parametrize("sampled", [False, True])
def test_a_resumed_task_goes_on_with_the_uninterrupted_runs_tokens(tmp_path, sampled):
    prompt = torch.randint(0, 500, (200,), generator=torch.Generator().manual_seed(9)).tolist()
    params = SamplingParams(
        max_new_tokens=NEW, **({"temperature": 0.9, "seed": 3} if sampled else {})
    )
    rest = SamplingParams(**{**params.__dict__, "max_new_tokens": NEW - DONE})
    stem = tmp_path / "t"
    with _llm() as llm:
        whole = _run(llm, prompt, params, save_prefix=(str(stem), "k"))
    with _llm() as llm:  # new workers
        resumed = _run(llm, prompt + whole[:DONE], rest, skip=DONE)
        restored = _run(
            llm, prompt + whole[:DONE], rest, skip=DONE, restore_prefix=(str(stem), 200)
        )
        if sampled:  # without skipping the draws a seeded task takes another path
            assert _run(llm, prompt + whole[:DONE], rest) != whole[DONE:]
    assert resumed == restored == whole[DONE:]


def test_a_resumed_run_saves_the_prompt_alone_for_the_next_run(tmp_path):
    """A run that goes on from tokens (its prompt longer than the task's) saves the KV of the
    task's prompt positions only, which the run after it reads back."""
    from runtime import kv_prefix

    prompt = torch.randint(0, 500, (150,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_new_tokens=NEW)
    rest = SamplingParams(max_new_tokens=NEW - DONE)
    stem = tmp_path / "t"
    with _llm() as llm:
        whole = _run(llm, prompt, params)
        resumed = _run(llm, prompt + whole[:DONE], rest, save_prefix=(str(stem), "k", 150))
    assert kv_prefix.read_meta(kv_prefix.rank_path(stem, 0))["tokens"] == "150"
    with _llm() as llm:
        again = _run(llm, prompt + whole[:DONE], rest, restore_prefix=(str(stem), 150))
    assert resumed == again == whole[DONE:]
