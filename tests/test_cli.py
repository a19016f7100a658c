"""``tilerun run`` as a user runs it: a real subprocess, JSON out, clear errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def tilerun(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_run_json_local_executor(hf_checkpoint):
    path, _ = hf_checkpoint
    r = tilerun(
        "run",
        "--model",
        str(path),
        "--prompt-token-ids",
        "1,2,3,4",
        "--max-new-tokens",
        "5",
        "--device",
        "cpu",
        "--executor",
        "local",
        "--json",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 5
    m = out["metrics"]
    for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_memory_bytes"):
        assert m[key] is not None and m[key] > 0, key


@pytest.mark.ray
@pytest.mark.slow
def test_run_job_yaml_on_ray_same_tokens_as_flags(tmp_path):
    (tmp_path / "p.txt").write_text("A long story about tiles.")
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: tiny\nprompt_file: p.txt\nmax_new_tokens: 6\ntemperature: 0\ndevice: cpu\n"
        "prefill_chunk: 8\n"
    )
    r = tilerun("run", str(job), "--json")
    assert r.returncode == 0, r.stderr
    via_yaml = json.loads(r.stdout)
    r2 = tilerun(
        "run",
        "--model",
        "tiny",
        "--prompt",
        "A long story about tiles.",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        "--executor",
        "local",
        "--json",
    )
    assert r2.returncode == 0, r2.stderr
    assert via_yaml["token_ids"] == json.loads(r2.stdout)["token_ids"]
    assert isinstance(via_yaml["text"], str)


@pytest.mark.slow
def test_sampling_is_seeded(hf_checkpoint):
    path, _ = hf_checkpoint
    args = [
        "run",
        "--model",
        str(path),
        "--prompt",
        "hello",
        "--max-new-tokens",
        "8",
        "--temperature",
        "1.0",
        "--top-p",
        "0.9",
        "--device",
        "cpu",
        "--executor",
        "local",
        "--json",
    ]
    a = json.loads(tilerun(*args, "--seed", "1").stdout)["token_ids"]
    b = json.loads(tilerun(*args, "--seed", "1").stdout)["token_ids"]
    c = json.loads(tilerun(*args, "--seed", "2").stdout)["token_ids"]
    assert a == b and a != c


@pytest.mark.slow
def test_sampling_seed_never_changes_a_presets_weights():
    """Greedy decoding of a preset is the same whatever the sampling seed; the weights' seed
    is its own field and does change them."""
    base = ["run", "--model", "tiny", "--prompt-token-ids", "5,6,7", "--max-new-tokens", "6",
            "--device", "cpu", "--executor", "local", "--json"]  # fmt: skip
    runs = [tilerun(*base, *extra) for extra in (["--seed", "1"], ["--seed", "2"],
                                                 ["--weights-seed", "1"])]  # fmt: skip
    assert all(r.returncode == 0 for r in runs), [r.stderr for r in runs]
    seed1, seed2, other_weights = (json.loads(r.stdout)["token_ids"] for r in runs)
    assert seed1 == seed2
    assert other_weights != seed1


def _main(capsys, *args: str) -> tuple[int, str, str]:
    """``tilerun ARGS`` in this process (``main`` is what the console script calls)."""
    from cluster.cli import main

    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's --help and --version
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_version_and_derived_flags(capsys):
    rc, out, _ = _main(capsys, "--version")
    assert rc == 0 and out.startswith("tilerun ")
    rc, helptext, _ = _main(capsys, "run", "--help")
    # every config field is a flag, with its help text
    for flag in ("--max-num-seqs", "--gpu-memory-utilization", "--q-tile", "--kv-tile",
                 "--weights-seed", "--no-overlap", "--no-cuda-graphs", "--placement-timeout-s"):  # fmt: skip
        assert flag in helptext, flag
    assert "share of the accelerator's memory" in " ".join(helptext.split())


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("model: tiny\nprompt: hi\nmax_new_tokens: [3\n", "line 3"),
        (
            "model: tiny\nprompt: hi\npromt_file: x\n",
            "line 3: unknown field 'promt_file'; did you mean",
        ),
        ("model: tiny\nprompt: hi\ntemperature: -1\n", "line 3: temperature must be >= 0"),
        (
            "model: tiny\nprompt: hi\nattention: flashy\n",
            "valid: auto, efficient_cuda, fa2_cpu, flash_cpu, sdpa, torch, triton",
        ),
        ("model: nope\nprompt: hi\n", "unknown model preset 'nope'; valid presets:"),
        ("model: tiny\n", "give exactly one of prompt, prompt_file, prompt_token_ids"),
        (
            "model: tiny\nprompt: hi\noverlap: no\n",
            "line 3: overlap must be true or false, got 'no'",
        ),
        ("model: tiny\nprompt: hi\ntp: true\n", "line 3: tp must be an integer, got True"),
        ("model: tiny\nprompt: hi\ntop_p: .nan\n", "line 3: top_p must be a finite number"),
        (
            "model: tiny\nprompt: hi\nmodel: tiny\n",
            "line 3: field 'model' is given twice (first at",
        ),
    ],
)
def test_bad_job_files_name_the_problem(tmp_path, capsys, yaml_text, expected):
    job = tmp_path / "job.yaml"
    job.write_text(yaml_text + "device: cpu\n" if "[3" not in yaml_text else yaml_text)
    rc, _, err = _main(capsys, "run", str(job), "--executor", "local")
    assert rc == 2
    assert err.startswith("tilerun: error: ") and err.count("\n") == 1, err
    assert expected in err, err


def test_prompt_longer_than_model_says_by_how_much(capsys):
    rc, _, err = _main(
        capsys,
        "run",
        "--model",
        "tiny",
        "--prompt-token-ids",
        ",".join(["1"] * 4000),
        "--max-new-tokens",
        "200",
        "--device",
        "cpu",
        "--executor",
        "local",
    )
    assert rc == 2
    assert "exceeds the model's context limit max_model_len=4096 by 104 tokens" in err


def test_prompt_longer_than_cache_says_by_how_much(capsys):
    rc, _, err = _main(
        capsys,
        "run",
        "--model",
        "tiny",
        "--prompt-token-ids",
        ",".join(["1"] * 300),
        "--max-new-tokens",
        "20",
        "--kv-cache-tokens",
        "256",
        "--device",
        "cpu",
        "--executor",
        "local",
    )
    assert rc == 2
    assert "exceeds the KV cache capacity of 256 tokens by 64 tokens" in err


@pytest.mark.ray
@pytest.mark.slow
def test_run_tp2_over_mpi_json_matches_tp1():
    """The issue's command: `tilerun run ... --tp 2 --comm mpi --json` on a 2-core machine."""
    base = ["run", "--model", "tiny", "--prompt-token-ids", "5,6,7,8,9", "--max-new-tokens", "6",
            "--device", "cpu", "--json"]  # fmt: skip
    r = tilerun(*base, "--tp", "2", "--comm", "mpi")
    assert r.returncode == 0, r.stderr
    tp2 = json.loads(r.stdout)
    assert len(tp2["devices"]) == 2
    tp1 = json.loads(tilerun(*base, "--executor", "local").stdout)
    assert tp2["token_ids"] == tp1["token_ids"]


@pytest.mark.slow
def test_flags_override_job_file_fields(tmp_path):
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny\nprompt: hello\nmax_new_tokens: 9\ndevice: cpu\n")
    r = tilerun("run", str(job), "--max-new-tokens", "3", "--prompt-token-ids", "1,2",
                "--executor", "local", "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["token_ids"]) == 3 and out["metrics"]["prompt_tokens"] == 2
