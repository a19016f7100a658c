"""KV prefix files (runtime/kv_prefix.py): rows saved from any tier come back bit for bit into
other device blocks; files that do not match, or are cut short, are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from runtime import kv_prefix
from runtime.kv_cache import KVCache


def _cache(host_dtype=None, dtype=torch.bfloat16) -> KVCache:
    kv = KVCache(3, 8, 16, 2, 8, dtype, torch.device("cpu"), host_blocks=6, host_dtype=host_dtype)
    g = torch.Generator().manual_seed(0)
    kv.k_all.copy_(torch.randn(kv.k_all.shape, generator=g))
    kv.v_all.copy_(torch.randn(kv.v_all.shape, generator=g))
    return kv


def _rows(kv: KVCache, table, tokens, layer, kind) -> torch.Tensor:
    return kv_prefix._block_rows(kv, layer, list(table))[kind][:tokens]


@pytest.mark.parametrize("host_dtype", [None, "fp8"])
def test_rows_from_both_tiers_come_back_into_other_device_blocks(tmp_path, host_dtype):
    src = _cache(host_dtype)
    # blocks 2 and 3 spilled to host blocks 9 and 12 (global ids: device 0..7, host 8..13)
    src.copy_blocks(0, [(2, 9), (3, 12)])
    for layer in (1, 2):
        src.copy_blocks(layer, [(2, 9), (3, 12)])
    table, tokens = (5, 9, 12, 1), 55  # the last block partly filled
    meta = {**kv_prefix.layout(src, 0, 1), "key": "abc"}
    path = kv_prefix.save(src, list(table), tokens, tmp_path / "t", meta)
    assert path == tmp_path / "t.rank0.safetensors" and not list(tmp_path.glob("*.tmp"))
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file
        assert f.get_tensor("v.2").shape == (tokens, 2, 8)
    dst = _cache(host_dtype)
    dst.k_all.zero_()
    dst.v_all.zero_()
    reader = kv_prefix.PrefixReader(path, {**kv_prefix.layout(dst, 0, 1), "key": "abc"})
    new_table = (7, 0, 3, 4)
    reader.write_rows(dst, new_table, 0, 20)  # two calls, as two prefill chunks would
    reader.write_rows(dst, new_table, 20, tokens)
    for layer in range(3):
        for kind in (0, 1):
            want = _rows(src, table, tokens, layer, kind)
            got = _rows(dst, new_table, tokens, layer, kind)
            assert torch.equal(want, got), (layer, kind)
    # what was spilled to fp8 comes back as the attention read it: dequantised
    if host_dtype == "fp8":
        assert not torch.equal(
            src.layers[0][0][2], _rows(src, table, 32, 0, 0)[16:32].view(16, 2, 8)
        )


def test_a_file_that_does_not_match_or_is_cut_short_is_refused(tmp_path):
    src = _cache()
    meta = {**kv_prefix.layout(src, 0, 2), "key": "abc"}
    path = kv_prefix.save(src, [1, 2], 20, tmp_path / "t", meta)
    dst = _cache(dtype=torch.float16)
    with pytest.raises(ValueError, match="dtype"):
        kv_prefix.PrefixReader(path, {**kv_prefix.layout(dst, 0, 2), "key": "abc"})
    with pytest.raises(ValueError, match="key"):
        kv_prefix.PrefixReader(path, {**kv_prefix.layout(src, 0, 2), "key": "other"})
    reader = kv_prefix.PrefixReader(path, meta)
    with pytest.raises(ValueError, match="holds 20 tokens"):
        reader.write_rows(src, (1, 2), 0, 21)
    with pytest.raises(ValueError, match="device blocks"):
        reader.write_rows(src, (1, 9), 0, 20)
    assert kv_prefix.read_meta(path)["tokens"] == "20"
    with pytest.raises(OSError, match="would leave less than"):  # a disk kept from filling
        kv_prefix.save(src, [1, 2], 20, tmp_path / "full", meta, keep_free=1 << 60)
    assert not list(tmp_path.glob("full*"))
    # the metadata right but a tensor short of rows (damaged, or written by other code): refused
    # from its header, before any row reaches a cache
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in list(f.keys())}
        whole = f.metadata()
    tensors["v.1"] = tensors["v.1"][:19].clone()
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=whole)
    with pytest.raises(ValueError, match=r"v\.1 is \[19, 2, 8\], not \[20, 2, 8\]"):
        kv_prefix.PrefixReader(tmp_path / "short.safetensors", meta)
    path.write_bytes(path.read_bytes()[:100])  # a torn file is no checkpoint
    assert kv_prefix.read_meta(path) is None
    assert kv_prefix.read_meta(tmp_path / "missing") is None


# -- through the engine: a prompt saved by one set of workers, restored by new ones ----------
NEW = 12
PLAIN = dict(block_size=16, kv_cache_tokens=4096, kv_host_tokens=0, spill="off")
SPILL = dict(block_size=16, kv_cache_tokens=128, kv_host_tokens=4096, spill="stream")


def _llm(device="cpu", **kw):
    from cluster import LLM

    cfg = dict(device=device, prefill_chunk=64)
    if device == "cpu":
        cfg.update(dtype="float32", attention="torch")
    return LLM("tiny", executor="local", max_model_len=512, **cfg, **kw)


def _run(llm, prompt, **prefix):
    """One request through the engine's step loop; returns it and its chunks that restored."""
    from cluster import SamplingParams

    e = llm.engine
    seq = e.add_request(prompt, SamplingParams(max_new_tokens=NEW), **prefix)
    restored = []
    while e.steps.has_work:
        for step in e.steps.advance() or []:
            restored += [c for c in step.batch.chunks if c.kv_prefix is not None]
    return seq, restored


def _prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("tiers", ["plain", "spill"])
def test_a_restored_prompt_generates_the_tokens_of_the_run_that_saved_it(tmp_path, tiers):
    """Saved with the prompt's blocks on the device (or, spilling, mostly on the host), read
    back by new workers into the blocks their prefill chunks would have written: the same
    tokens, with only the last prompt position computed. A file of another prompt, read
    instead, changes them: the rows really come from the file."""
    prompt, other = _prompt(300, 1), _prompt(300, 2)
    stem, kw = tmp_path / "kv" / "task", PLAIN if tiers == "plain" else SPILL
    with _llm(**kw) as llm:
        saved, _ = _run(llm, prompt, save_prefix=(str(stem), "key-1"))
        _run(llm, other, save_prefix=(str(tmp_path / "other"), "key-2"))
        if tiers == "spill":
            assert llm.engine.scheduler.stats.blocks_spilled > 0
    assert kv_prefix.read_meta(kv_prefix.rank_path(stem, 0))["tokens"] == "300"
    with _llm(**kw) as llm:  # new workers: an empty cache
        seq, restored = _run(llm, prompt, restore_prefix=(str(stem), 300))
        wrong, _ = _run(llm, prompt, restore_prefix=(str(tmp_path / "other"), 300))
        fresh, _ = _run(llm, prompt)
    assert seq.output_ids == saved.output_ids == fresh.output_ids
    assert seq.restore_tokens == 299 and sum(len(c.token_ids) for c in restored) == 299
    assert max(c.seq_len for c in restored) == 299  # the last position was computed
    assert wrong.output_ids != saved.output_ids


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("tiers", ["plain", "spill"])
def test_a_restored_prompt_on_cuda_gives_the_saving_runs_tokens(tmp_path, tiers):
    """The same on a GPU (its default dtype and attention, CUDA graphs for decode): the rows
    go through host memory both ways."""
    prompt = _prompt(300, 3)
    stem, kw = tmp_path / "task", PLAIN if tiers == "plain" else SPILL
    with _llm("cuda", **kw) as llm:
        saved, _ = _run(llm, prompt, save_prefix=(str(stem), "k"))
    with _llm("cuda", **kw) as llm:
        seq, restored = _run(llm, prompt, restore_prefix=(str(stem), 300))
    assert seq.output_ids == saved.output_ids and sum(len(c.token_ids) for c in restored) == 299
