"""Hostile and careless inputs (#9): checkpoints that point outside their directory or are
malformed, configs of the wrong types or sizes, sampling values that make no sense. Each is
refused in one line naming the problem, before anything heavy happens."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster import preflight
from cluster.config import EngineConfig
from runtime.config import ModelConfig
from runtime.loader import build_model, resolve_model
from runtime.memory_estimate import estimate, parameter_count
from runtime.parallel import ParallelState
from scheduler.errors import CapacityError, CheckpointError, ConfigError
from scheduler.request import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture()
def checkpoint(hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text((src / "config.json").read_text())
    return d, load_file(str(src / "model.safetensors"))


def _load(path):
    return build_model(
        resolve_model(str(path)), ParallelState(), torch.float32, torch.device("cpu")
    )


def _index(d: Path, tensors: dict, fname_for) -> None:
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: fname_for(k) for k in tensors}})
    )


# -- checkpoint files stay inside the checkpoint directory -----------------------------------


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "/etc/passwd", "sub/../../x"])
def test_index_entries_outside_the_directory_are_refused(checkpoint, entry):
    d, tensors = checkpoint
    save_file(tensors, str(d / "model.safetensors"))
    first = sorted(tensors)[0]
    _index(d, tensors, lambda k: entry if k == first else "model.safetensors")
    with pytest.raises(CheckpointError, match=f"entry {first!r}.*outside the checkpoint"):
        _load(d)


def test_weights_from_a_sibling_directory_are_refused(checkpoint):
    d, tensors = checkpoint
    other = d.parent / "other"
    other.mkdir()
    save_file(tensors, str(other / "model.safetensors"))
    _index(d, tensors, lambda k: "../other/model.safetensors")
    with pytest.raises(CheckpointError, match="outside the checkpoint directory"):
        _load(d)


def test_a_link_pointing_outside_is_refused(checkpoint):
    d, tensors = checkpoint
    other = d.parent / "elsewhere"
    other.mkdir()
    save_file(tensors, str(other / "model.safetensors"))
    (d / "model.safetensors").symlink_to(other / "model.safetensors")
    with pytest.raises(CheckpointError, match="links to .*elsewhere.*outside the checkpoint"):
        _load(d)


def test_a_fifo_is_refused_at_once_not_opened(checkpoint):
    d, tensors = checkpoint
    save_file(tensors, str(d / "model-1.safetensors"))
    os.mkfifo(d / "model-2.safetensors")
    names = sorted(tensors)
    _index(d, tensors, lambda k: "model-2.safetensors" if k == names[0] else "model-1.safetensors")
    t0 = time.monotonic()
    with pytest.raises(
        CheckpointError, match="'model-2.safetensors' .* is not a regular file .*FIFO"
    ):
        _load(d)
    assert time.monotonic() - t0 < 10


def test_a_missing_shard_is_named(checkpoint):
    d, tensors = checkpoint
    save_file(tensors, str(d / "model-1.safetensors"))
    _index(d, tensors, lambda k: "model-2.safetensors")
    with pytest.raises(CheckpointError, match="'model-2.safetensors' does not exist in"):
        _load(d)


def test_weight_map_not_a_mapping(checkpoint):
    d, tensors = checkpoint
    save_file(tensors, str(d / "model.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": ["a", "b"]}))
    with pytest.raises(CheckpointError, match="'weight_map' must be a mapping .* got list"):
        _load(d)


# -- malformed safetensors --------------------------------------------------------------------


def _raw(d: Path, header: bytes | dict, data: bytes = b"", claimed: int | None = None) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(h) if claimed is None else claimed
    (d / "model.safetensors").write_bytes(struct.pack("<Q", n) + h + data)


def test_truncated_file(checkpoint):
    d, tensors = checkpoint
    save_file(tensors, str(d / "model.safetensors"))
    blob = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(blob[: len(blob) - 100])
    with pytest.raises(CheckpointError, match="spans bytes .*truncated or corrupt"):
        _load(d)
    (d / "model.safetensors").write_bytes(blob[:5])
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        _load(d)


def test_header_not_json(checkpoint):
    d, _ = checkpoint
    _raw(d, b"{not json at all")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        _load(d)


def test_header_longer_than_the_file(checkpoint):
    d, _ = checkpoint
    _raw(d, b"{}", claimed=10**12)
    with pytest.raises(CheckpointError, match=r"header claims 1000000000000 bytes .* has 2"):
        _load(d)


def test_offsets_past_the_end(checkpoint):
    d, _ = checkpoint
    header = {"model.norm.weight": {"dtype": "F32", "shape": [64], "data_offsets": [0, 256]}}
    _raw(d, header, data=b"\0" * 16)
    with pytest.raises(CheckpointError, match="'model.norm.weight' spans bytes \\[0, 256\\).*16"):
        _load(d)


def test_integer_weights_are_refused_not_cast(checkpoint):
    d, tensors = checkpoint
    name = "model.layers.0.mlp.up_proj.weight"
    tensors[name] = torch.ones_like(tensors[name], dtype=torch.int64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"tensor {name} .* is I64; weights must be floating"):
        _load(d)


# -- HF config types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("tie_word_embeddings", "yes", "tie_word_embeddings must be true or false, got 'yes'"),
        ("eos_token_id", "</s>", "eos_token_id must be an integer token id"),
        ("bos_token_id", 1.5, "bos_token_id must be an integer token id"),
        ("rope_scaling", "linear", "rope_scaling must be a mapping such as"),
        ("rms_norm_eps", "1e-5", "rms_norm_eps must be a number"),
        ("rope_theta", None, "rope_theta must be a number"),
    ],
)
def test_hf_config_field_types(tmp_path, field, value, expected):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, field: value}))
    with pytest.raises(ConfigError, match=expected):
        ModelConfig.from_hf(tmp_path)


def test_config_json_holding_a_list(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2, 3]")
    with pytest.raises(ConfigError, match="holds a JSON list, expected an object"):
        ModelConfig.from_hf(tmp_path)


def test_missing_model_directory_is_not_called_a_preset(tmp_path):
    with pytest.raises(ConfigError, match="model directory .*nope.* does not exist.*demo-small"):
        resolve_model(str(tmp_path / "nope"))


# -- sampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw, expected",
    [
        ({"temperature": float("nan")}, "temperature must be a finite number"),
        ({"temperature": float("inf")}, "temperature must be a finite number"),
        ({"temperature": True}, "temperature must be a finite number"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*63\), got -1"),
        ({"seed": 2**64}, "seed must be an integer in"),
    ],
)
def test_sampling_values_that_make_no_sense(kw, expected):
    with pytest.raises(ConfigError, match=expected):
        SamplingParams(**kw)


# -- memory and preflight -------------------------------------------------------------------------


def test_parameter_count_matches_the_built_model():
    cfg = ModelConfig(**BASE)
    model = build_model.__globals__["LlamaForCausalLM"](
        cfg, ParallelState(), torch.float32, torch.device("cpu")
    )
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "over",
    [{"vocab_size": 2**25, "hidden_size": 4096}, {"num_hidden_layers": 10**9}],
)
def test_oversized_configs_are_refused_with_figure_and_budget(over):
    cfg = ModelConfig(**{**BASE, **over})
    t0 = time.monotonic()
    with pytest.raises(
        CapacityError, match=r"needs about [\d.]+ GiB .* but [\d.]+ GiB is available"
    ):
        preflight.check_engine(EngineConfig.from_dict(dict(device="cpu")), cfg, 4096)
    assert time.monotonic() - t0 < 2


def test_estimate_counts_the_kv_cache():
    cfg = ModelConfig(**BASE)
    small = estimate(cfg, "float32", kv_tokens=16)
    big = estimate(cfg, "float32", kv_tokens=16 * 1024)
    # 2 (K,V) x layers x tokens x kv heads x head_dim x 4 bytes
    assert big.kv_cache - small.kv_cache == 2 * 1 * (16 * 1024 - 16) * 2 * 8 * 4


def test_preflight_refuses_before_anything_starts():
    cfg = ModelConfig(**{**BASE, "num_attention_heads": 8, "num_key_value_heads": 8})
    with pytest.raises(ConfigError, match="tp=3 does not divide the model's num_attention_heads=8"):
        preflight.check_engine(EngineConfig.from_dict(dict(device="cpu", tp=3)), cfg, 4096)
    with pytest.raises(
        ConfigError, match="comm='nccl' runs on cuda devices, but the workers use cpu"
    ):
        preflight.check_engine(
            EngineConfig.from_dict(dict(device="cpu", tp=2, comm="nccl")), cfg, 4096
        )
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA GPU on this host"):
            preflight.check_engine(EngineConfig.from_dict(dict(device="cuda")), cfg, 4096)


def test_preflight_prompt_checks():
    cfg = ModelConfig(**BASE)
    p = SamplingParams(max_new_tokens=4)
    with pytest.raises(CapacityError, match="the prompt is empty"):
        preflight.check_prompt([], p, cfg, 100)
    with pytest.raises(CapacityError, match=r"token id\(s\) \[64, -1\] are outside"):
        preflight.check_prompt([1, 64, -1], p, cfg, 100)
    with pytest.raises(
        CapacityError, match="= 104 exceeds the model's context limit max_model_len=100 by 4"
    ):
        preflight.check_prompt([1] * 100, p, cfg, 100)


# -- the same through the CLI: exit 2, one line, no traceback, no cluster -----------------------


def _cli(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line_error(r: subprocess.CompletedProcess, expected: str) -> None:
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    # the machine's own start-up warning (no bytecode for torch and ray, on images that set
    # PYTHONDONTWRITEBYTECODE) is not about the input; everything else is the one line
    lines = [
        ln
        for ln in r.stderr.splitlines()
        if ln.strip() and not ln.startswith("WARNING cluster.bytecode:")
    ]
    assert len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("tilerun: error: ") and expected in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--tp", "3"], "tp=3 does not divide the model's num_attention_heads=8"),
        (["--tp", "2", "--comm", "nccl"], "comm='nccl' runs on cuda devices"),
        (["--model", "/nonexistent/ckpt"], "model directory '/nonexistent/ckpt' does not exist"),
        # 27 GB of weights and 254 GiB of KV: more than the hosts these run on (the GPU
        # machine's 128 GiB held the 8B shape in float32, 32 GB, and ran it)
        (
            [
                "--model",
                "llama2-7b",
                "--dtype",
                "float32",
                "--tp",
                "4",
                "--max-new-tokens",
                "260000",
            ],
            "GiB is available",
        ),
    ],
)
def test_cli_refuses_before_starting_ray(args, expected):
    t0 = time.monotonic()
    r = _cli("--prompt", "hello", "--device", "cpu", *args)
    _one_line_error(r, expected)
    assert time.monotonic() - t0 < 30  # no cluster start-up (38 s before)


def _without_dashboard_packages(tmp_path, **env) -> dict:
    """An environment in which one of Ray's dashboard packages does not import, as with a
    minimal ``pip install ray`` (seen on the GPU machine: Ray logged an error on stderr and
    refused to start)."""
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "aiohttp_cors.py").write_text(  # as Python says it, which Ray's agent expects
        "raise ModuleNotFoundError(\"No module named 'aiohttp_cors'\", name='aiohttp_cors')\n"
    )
    path = os.pathsep.join(p for p in (str(shadow), os.environ.get("PYTHONPATH")) if p)
    out = {**os.environ, "PYTHONPATH": path}
    out.pop("TILERUN_DASHBOARD", None)
    return {**out, **env}


def test_dashboard_choice_for_tilerun_up_and_the_embedded_cluster(monkeypatch):
    """The rule both starts follow (``tilerun up``'s ``ray start`` fails just as ``ray.init``
    does when asked for a dashboard without its packages)."""
    from cluster import dashboard_choice as dc

    gap = "No module named 'aiohttp_cors'"
    monkeypatch.delenv("TILERUN_DASHBOARD", raising=False)
    monkeypatch.setattr(dc, "missing_packages", lambda: None)
    assert dc.choose_dashboard() == (True, None)
    monkeypatch.setattr(dc, "missing_packages", lambda: gap)
    on, why = dc.choose_dashboard()
    assert not on and why.startswith(f"off: its packages are missing ({gap}); Fix: pip install")
    monkeypatch.setenv("TILERUN_DASHBOARD", "0")
    assert dc.choose_dashboard() == (False, "off (TILERUN_DASHBOARD=0)")
    monkeypatch.setenv("TILERUN_DASHBOARD", "1")
    with pytest.raises(ConfigError, match=r"TILERUN_DASHBOARD=1 asks for .* \(No module named"):
        dc.choose_dashboard()


@pytest.mark.ray
def test_a_cluster_without_the_dashboards_packages_starts_without_it(tmp_path):
    """Unasked, the embedded cluster goes without the dashboard and says why; a refused run
    still says one line; asked for by TILERUN_DASHBOARD=1, the missing package is named."""
    run = ["--prompt", "hello", "--device", "cpu", "--model", "tiny", "--max-new-tokens", "2"]
    env = _without_dashboard_packages(tmp_path)
    demo = (
        "from cluster.api import LLM\n"
        "with LLM(model='tiny', device='cpu') as llm:\n"
        "    print(llm.generate([[1, 2, 3]])[0].token_ids)\n"
        "    print(llm.engine.executor.cluster)\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", demo], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "dashboard dependencies failed" not in r.stderr, r.stderr[-2000:]
    # (aiohttp_cors, or the first of them a minimal install lacks)
    assert "'dashboard_off': \"off: its packages are missing (No module named '" in r.stdout, (
        r.stdout
    )
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", *run, "--tp", "3"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    _one_line_error(r, "tp=3 does not divide")
    r = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "run", *run],
        cwd=ROOT, env={**env, "TILERUN_DASHBOARD": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    _one_line_error(r, "TILERUN_DASHBOARD=1 asks for Ray's dashboard, but its packages are missing")
    assert "pip install 'ray[default]'" in r.stderr


# -- prompts ------------------------------------------------------------------------------------


def test_prompt_file_that_is_not_a_regular_file_is_named(tmp_path):
    from cluster.prompt_file import read_prompt_file

    os.mkfifo(tmp_path / "fifo")
    cases = [(tmp_path, "is a directory"), (tmp_path / "fifo", "is a FIFO"),
             (Path("/dev/zero"), "is a device"), (tmp_path / "none", "does not exist")]  # fmt: skip
    for path, expected in cases:
        t0 = time.monotonic()
        with pytest.raises(ConfigError, match=f"prompt_file .* {expected}"):
            read_prompt_file(path)
        assert time.monotonic() - t0 < 5


def test_prompt_file_over_the_limit_is_refused_before_reading(tmp_path):
    from cluster.prompt_file import read_prompt_file

    big = tmp_path / "big.txt"
    with open(big, "wb") as f:
        f.truncate(3 * 2**30)  # sparse: 3 GiB that would take minutes to tokenise
    with pytest.raises(ConfigError, match="is 3,221,225,472 bytes, over the limit of 67,108,864"):
        read_prompt_file(big)
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        read_prompt_file(tmp_path / "bad.txt")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--prompt", ""], "the prompt is empty"),
        (["--prompt-file", "EMPTY"], "the prompt is empty"),
        (["--prompt-file", "/dev/null"], "is a device"),
        (["--prompt-token-ids", "1,2,99999"], "token id(s) [99999] are outside"),
        (
            ["--prompt", "hello", "--max-model-len", "8", "--max-new-tokens", "4"],
            "exceeds the model's context limit max_model_len=8",
        ),
    ],
)
def test_cli_refuses_bad_prompts_before_starting_ray(tmp_path, args, expected):
    (tmp_path / "empty.txt").write_text("")
    args = [str(tmp_path / "empty.txt") if a == "EMPTY" else a for a in args]
    t0 = time.monotonic()
    r = _cli("--device", "cpu", "--model", "tiny", *args)
    _one_line_error(r, expected)
    assert time.monotonic() - t0 < 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a host without CUDA")
def test_cli_cuda_without_cuda_fails_at_once():
    t0 = time.monotonic()
    r = _cli("--prompt", "hi", "--model", "tiny", "--device", "cuda")
    _one_line_error(r, "device='cuda' was asked for but torch sees no CUDA GPU on this host")
    assert time.monotonic() - t0 < 30  # the autoscaler waited 60 s before


def test_worker_refuses_before_allocating(tmp_path):
    """The worker's own check (for workers on hosts the driver cannot see): a config far too
    large is refused in load_model, naming the device, before any tensor exists."""
    from runtime.worker import Worker
    from runtime.worker_config import WorkerConfig
    from scheduler.config import SchedulerConfig

    (tmp_path / "config.json").write_text(
        json.dumps({**BASE, "vocab_size": 2**25, "hidden_size": 4096, "num_attention_heads": 32,
                    "num_key_value_heads": 32})
    )  # fmt: skip
    source = resolve_model(str(tmp_path))
    w = Worker(WorkerConfig(model=str(tmp_path), device="cpu"), source,
               SchedulerConfig().for_model(source.config.max_position_embeddings))  # fmt: skip
    w.init_device()
    t0 = time.monotonic()
    with pytest.raises(CapacityError, match=r"on cpu of rank 0: .* GiB is available"):
        w.load_model()
    assert w.model is None and time.monotonic() - t0 < 2
