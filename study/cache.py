"""Content-addressed artifact cache under ``build/cache/``.

An entry is one file ``<name>-<key>.pt`` written with :func:`torch.save`. Its key hashes
the config, the seed, the data fingerprint and the *source code* of the modules that
produced it, so changing the code invalidates the entry. Writes go to a temporary file
in the same folder, are fsync-ed, then renamed over the final name (atomic on POSIX): a
run killed at any moment leaves either the whole entry or none, and the next run resumes
from the entries that were finished. Entries must load with ``weights_only=True``
(tensors, state dicts, numbers, strings, lists, dicts).
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable



def _atomic(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temp file in ``path``'s folder, fsync it, rename it to ``path``.

    On any exception (KeyboardInterrupt included) the temp file is removed and ``path`` is
    left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same folder + fsync + rename)."""
    _atomic(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file + fsync + rename)."""
    import torch

    _atomic(path, lambda tmp: torch.save(obj, tmp))


def code_fingerprint(objs: Iterable[Any]) -> str:
    """SHA-256 (16 hex chars) of the source of modules / functions / classes ``objs``."""
    h = hashlib.sha256()
    for obj in objs:
        try:
            src = inspect.getsource(obj)
        except (TypeError, OSError):
            src = repr(obj)
        h.update(src.encode("utf-8"))
    return h.hexdigest()[:16]


def make_key(config: dict, seed: int | None = None, data_fp: str = "", code: Iterable[Any] = ()) -> str:
    """Hash (16 hex chars) of a JSON-able ``config``, ``seed``, data fingerprint and code."""
    payload = json.dumps({"config": config, "seed": seed, "data": data_fp,
                          "code": code_fingerprint(code)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class ArtifactCache:
    """Atomic, content-addressed store of expensive results.

    Example::

        cache = ArtifactCache("build/cache")
        state = cache.memo("teacher", cfg, lambda: train(...), seed=0, data_fp=fp,
                           code=[study.train, study.models])

    Args:
        root: folder of the entries.
        fresh: if True, existing entries are ignored (and overwritten) - ``--fresh``.
    """

    def __init__(self, root: str | os.PathLike, fresh: bool = False):
        self.root = Path(root)
        self.fresh = fresh
        self.root.mkdir(parents=True, exist_ok=True)
        self._refreshed: set[str] = set()

    def path(self, name: str, key: str) -> Path:
        """File of the entry ``name`` / ``key``."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        return self.root / f"{safe}-{key}.pt"

    def get(self, name: str, key: str) -> Any | None:
        """The stored object, or None if absent (or ignored because of ``fresh``).

        A file that fails to load (which atomic writes should make impossible, but a
        disk can fail) is reported by name and treated as absent: it is renamed to
        ``*.corrupt`` so nothing is lost and the entry is recomputed.
        """
        p = self.path(name, key)
        if not p.exists() or (self.fresh and str(p) not in self._refreshed):
            return None
        import torch

        try:
            return torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - reported, then recomputed
            bad = p.with_suffix(".corrupt")
            os.replace(p, bad)
            print(f"cache: entry {p} could not be read ({exc!r}); moved to {bad}, recomputing")
            return None

    def put(self, name: str, key: str, obj: Any) -> Path:
        """Store ``obj`` atomically and return its path."""
        p = self.path(name, key)
        atomic_torch_save(obj, p)
        self._refreshed.add(str(p))
        return p

    def memo(self, name: str, config: dict, compute: Callable[[], Any], *, seed: int | None = None,
             data_fp: str = "", code: Iterable[Any] = ()) -> Any:
        """Return the cached result of ``compute()`` for this (config, seed, data, code).

        ``compute`` runs only when no finished entry exists; its result is stored
        atomically before it is returned.
        """
        key = make_key(config, seed, data_fp, code)
        hit = self.get(name, key)
        if hit is not None:
            return hit
        obj = compute()
        self.put(name, key, obj)
        return obj
