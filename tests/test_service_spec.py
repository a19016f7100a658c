"""``tilerun submit`` reads prompt files on the submitting side under the same rules as
``tilerun run`` (a regular UTF-8 file under the size limit), and never hangs on a FIFO."""

from __future__ import annotations

import os

import pytest

from cluster.service.spec import parse_task
from scheduler.errors import ConfigError


def test_submit_reads_a_prompt_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("Once upon a time", encoding="utf-8")
    text, ids, sampling = parse_task({"prompt_file": str(f), "max_new_tokens": 3})
    assert (text, ids, sampling.max_new_tokens) == ("Once upon a time", None, 3)


def test_submit_refuses_a_directory_a_fifo_and_an_oversized_file(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="is a directory"):
        parse_task({"prompt_file": str(tmp_path)})
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="FIFO"):
        parse_task({"prompt_file": str(fifo)})
    big = tmp_path / "big.txt"
    big.write_text("x" * 2048, encoding="utf-8")
    monkeypatch.setenv("TILERUN_MAX_PROMPT_FILE_BYTES", "1024")
    with pytest.raises(ConfigError, match="over the limit of 1,024"):
        parse_task({"prompt_file": str(big)})
