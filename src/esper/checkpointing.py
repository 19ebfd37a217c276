"""Atomic checkpoint files and safe loading.

A checkpoint is written to a temporary file in the same folder, flushed to disk and
renamed over the target: a crash mid-write leaves the previous file intact. Loading
uses ``weights_only=True`` so a file carrying code is refused, and every failure is a
`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
import tomllib
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, foreign or incompatible."""


def _atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Run ``write`` on a temp file beside ``path``, fsync it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    _atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with one clear error type for every failure."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    _check_looks_like_torch(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = _unpickler_detail(str(exc))
        with path.open("rb") as f:
            is_pickle = f.read(1) == b"\x80"  # a pickle protocol header, not random bytes
        if is_pickle or "GLOBAL" in detail:
            # weights_only refuses globals it does not know: a file carrying code lands here.
            raise CheckpointError(
                f"checkpoint {str(path)!r} was refused: it holds more than tensors and "
                f"primitives, so weights-only loading rejects it; it may carry code ({detail})"
            ) from None
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt ({detail})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint {str(path)!r} is corrupt or truncated ({first})"
        ) from None
    except Exception as exc:  # arbitrary bytes break the unpickler in arbitrary ways
        raise CheckpointError(
            f"{str(path)!r} is not a checkpoint: torch cannot read it "
            f"({type(exc).__name__}: {str(exc).strip() or 'no detail'})"
        ) from None


# torch.save writes a zip archive; files of torch < 1.6 (and pickles) start with a
# pickle protocol opcode. Anything else makes torch's unpickler fail with a message
# about the first byte ("KeyError: 101" for a file starting with "e").
_ZIP_MAGIC, _PICKLE_PROTO = b"PK\x03\x04", 0x80


def _check_looks_like_torch(path: Path) -> None:
    """Refuse, by its first bytes, a file that is not a torch checkpoint at all, saying
    what it looks like (a TOML or text file) instead of what torch tripped over."""
    with path.open("rb") as f:
        head = f.read(4096)
    if not head:
        raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: the file is empty")
    if head.startswith(_ZIP_MAGIC) or head[0] == _PICKLE_PROTO:
        return
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut by the 4 KB window
            raise CheckpointError(
                f"{str(path)!r} is corrupt or not a checkpoint: it is neither a torch zip "
                "archive nor a pickle"
            ) from None
    kind = "a text file"
    if path.stat().st_size <= 1 << 20:  # small enough to parse whole
        with contextlib.suppress(UnicodeDecodeError, tomllib.TOMLDecodeError):
            tomllib.loads(path.read_text(encoding="utf-8"))
            kind = "a TOML file, such as a run's config.toml"
    raise CheckpointError(f"{str(path)!r} is not a checkpoint (it looks like {kind})")


_BOILERPLATE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _unpickler_detail(message: str) -> str:
    """The one informative line of torch's long weights-only error."""
    _, _, tail = message.partition("WeightsUnpickler error:")
    lines = [ln.strip() for ln in (tail or message).splitlines() if ln.strip()]
    useful = [ln for ln in lines if not ln.startswith(_BOILERPLATE)]
    return useful[0].rstrip(".") if useful else "unpickling failed"
