"""Write files so that a crash never leaves a half-written result under the final name."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from autoseg.errors import AutosegError


def _process_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: done once, at import, before any threads
    os.umask(mask)
    return mask


_UMASK = _process_umask()


@contextmanager
def atomic_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary folder beside `final`; swap it in for `final` only if the block succeeds. On any failure
    the previous `final` (if any) stays in place and the temporary folder is removed."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it private (0700)
    old = final.with_name(f".{final.name}.old")
    moved = False
    try:
        yield tmp
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
            moved = True
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if moved and not final.exists():
            os.replace(old, final)
        elif moved:  # another writer's folder took `final` meanwhile: ours is not needed back
            shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_path(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Keep the real suffix last so writers that infer the format from the name still work.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.stem}.", suffix=f".tmp{''.join(final.suffixes)}",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    # mkstemp makes the file private (0600); give results the permissions any new file would get.
    os.chmod(tmp, 0o666 & ~_UMASK)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: Path | str, data: Any, *, compact: bool = False) -> None:
    """Write JSON atomically; indented for people, or `compact` (one line) for large machine-read files."""
    text = json.dumps(data, separators=(",", ":")) if compact else json.dumps(data, indent=2, sort_keys=False)
    with atomic_path(path) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")


class ArtifactError(AutosegError, ValueError):
    """A JSON file that cannot be parsed; the message names it (a ValueError too, for callers that skip such files)."""


def read_json(path: Path | str) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: not valid JSON ({exc}); restore it, or delete it and rerun the step that "
                            "writes it") from None


def save_npy(path: Path | str, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array)
