"""Reading a ``prompt_file`` safely: a regular file, of bounded size, in UTF-8.

The CLI runs as the user, so a prompt file may be any file the user can read. A job submitted to
a shared service is different: the service must not read files on its own host on a job's say-so,
so service mode reads prompt files on the submitting side and sends the text (see the README).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scheduler.errors import ConfigError

# Far beyond any context window tilerun serves (256K tokens is ~1 MiB of text), far below a
# size whose tokenisation would take minutes and gigabytes.
MAX_PROMPT_FILE_BYTES = 64 * 1024 * 1024


def read_prompt_file(path: str | Path, where: str = "", limit: int | None = None) -> str:
    """The text of ``path``; refuses a missing path, anything but a regular file (a directory,
    device or FIFO, which could block forever), a file over ``limit`` bytes (default
    ``TILERUN_MAX_PROMPT_FILE_BYTES`` or 64 MiB), and text that is not UTF-8."""
    if limit is None:
        limit = int(os.environ.get("TILERUN_MAX_PROMPT_FILE_BYTES", MAX_PROMPT_FILE_BYTES))
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(f"{where}prompt_file {str(p)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"{where}prompt_file {str(p)!r} cannot be read: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory"
            if stat.S_ISDIR(st.st_mode)
            else "a FIFO"
            if stat.S_ISFIFO(st.st_mode)
            else "a device"
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "not a regular file"
        )
        raise ConfigError(f"{where}prompt_file {str(p)!r} is {kind}; give a text file")
    if st.st_size > limit:
        raise ConfigError(
            f"{where}prompt_file {str(p)!r} is {st.st_size:,} bytes, over the limit of "
            f"{limit:,} (TILERUN_MAX_PROMPT_FILE_BYTES)"
        )
    try:
        with open(p, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise ConfigError(f"{where}prompt_file {str(p)!r} cannot be read: {e.strerror}") from None
    if len(data) > limit:  # it grew after the stat
        raise ConfigError(f"{where}prompt_file {str(p)!r} is over the limit of {limit:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{where}prompt_file {str(p)!r} is not UTF-8 text (byte {e.start})"
        ) from None


__all__ = ["read_prompt_file", "MAX_PROMPT_FILE_BYTES"]
