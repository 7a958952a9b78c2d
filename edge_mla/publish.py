"""Writing outputs all or nothing: every file or folder edge-mla makes is written beside its final place under a
temporary name and renamed into place only when complete, so an error or Ctrl-C leaves no half-written output."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def refuse_existing(out: str | Path, force: bool) -> Path:
    out = Path(out)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --force to replace it")
    return out


@contextmanager
def staged_folder(out: str | Path) -> Iterator[Path]:
    """A fresh folder beside `out`; published as `out` (replacing it, readable by all) when the block ends
    without an error, removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
        for path in [staging, *staging.rglob("*")]:  # mkdtemp/mkstemp create private files
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def staged_file(out: str | Path) -> Iterator[Path]:
    """A temporary file beside `out`, renamed to `out` when the block ends without an error, removed otherwise."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial")
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        tmp.chmod(0o644)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
