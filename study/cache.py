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

import ast
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

PACKAGE = "study"


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


def _study_imports(module_name: str) -> set[str]:
    """Names of the ``study`` modules that ``module_name``'s source imports (parsed, not run)."""
    mod = sys.modules.get(module_name)
    if mod is None:
        import importlib

        mod = importlib.import_module(module_name)
    path = getattr(mod, "__file__", None)
    if not path:
        return set()
    tree = ast.parse(Path(path).read_text(encoding="utf-8"))
    pkg = module_name if path.endswith("__init__.py") else module_name.rpartition(".")[0]
    found: set[str] = set()

    def resolve(level: int, name: str | None) -> str:
        base = pkg.split(".")
        if level > 1:
            base = base[: len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node.level, node.module) if node.level else (node.module or "")
            if target.split(".")[0] != PACKAGE:
                continue
            found.add(target)
            for a in node.names:  # "from . import prune" imports a module
                sub = f"{target}.{a.name}"
                if _module_file(sub):
                    found.add(sub)
    return {m for m in found if _module_file(m)}


def _module_file(name: str) -> Path | None:
    """Source file of the ``study`` module ``name`` (package ``__init__`` included), or None."""
    root = Path(__file__).resolve().parent.parent
    rel = Path(*name.split("."))
    for cand in (root / rel.with_suffix(".py"), root / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def code_closure(*modules: Any) -> list[str]:
    """Sorted names of ``modules`` and every ``study`` module they import, transitively.

    Imports are read from the source with :mod:`ast` (``import study.x``, ``from . import
    x``, ``from ..prune import f``, in-function imports included), so a cache key built
    from the closure covers the code a result actually calls: editing any module in it
    changes the key. Modules may be given as module objects or dotted names.
    """
    todo = [m if isinstance(m, str) else m.__name__ for m in modules]
    seen: set[str] = set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(_study_imports(name) - seen)
    return sorted(seen)


def closure_fingerprint(*modules: Any) -> str:
    """SHA-256 (16 hex chars) of the source files in :func:`code_closure` of ``modules``."""
    h = hashlib.sha256()
    for name in code_closure(*modules):
        h.update(name.encode())
        h.update(_module_file(name).read_bytes())
    return h.hexdigest()[:16]


def make_key(config: dict, seed: int | None = None, data_fp: str = "", modules: Iterable[Any] = ()) -> str:
    """Hash (16 hex chars) of a JSON-able ``config``, ``seed``, data fingerprint and code.

    The code part is :func:`closure_fingerprint` of ``modules``: the source of those
    modules and of every ``study`` module they import, so keys are derived, never
    hand-listed.
    """
    payload = json.dumps({"config": config, "seed": seed, "data": data_fp,
                          "code": closure_fingerprint(*modules) if modules else ""},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


class ArtifactCache:
    """Atomic, content-addressed store of expensive results.

    Example::

        cache = ArtifactCache("build/cache")
        state = cache.memo("teacher", cfg, lambda: train(...), seed=0, data_fp=fp,
                           modules=["study.sections.common"])

    Args:
        root: folder of the entries (new entries are always written here).
        fresh: if True, existing entries are ignored (and overwritten) - ``--fresh``.
        extra_roots: other caches to read from when ``root`` lacks an entry
            (``--cache-dir DIR``: a course instructor's, already trained). They are used as
            they are - never written, never renamed, even when read-only.
    """

    def __init__(self, root: str | os.PathLike, fresh: bool = False, extra_roots: Iterable = ()):
        self.root = Path(root)
        self.fresh = fresh
        self.root.mkdir(parents=True, exist_ok=True)
        self.extra_roots = [Path(r) for r in extra_roots if r]
        for r in self.extra_roots:
            if not r.is_dir():
                raise FileNotFoundError(f"--cache-dir {r}: no such folder (a cache from another build, "
                                        "e.g. build/cache)")
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
        if self.fresh and str(p) not in self._refreshed:
            return None
        if not p.exists():
            for r in self.extra_roots:  # read-only caches: load as is, never move
                q = r / p.name
                if q.exists():
                    import torch

                    try:
                        return torch.load(q, map_location="cpu", weights_only=True)
                    except Exception as exc:  # noqa: BLE001 - reported, then recomputed locally
                        print(f"cache: entry {q} (--cache-dir) could not be read ({exc!r}); recomputing")
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
             data_fp: str = "", modules: Iterable[Any] = ()) -> Any:
        """Return the cached result of ``compute()`` for this (config, seed, data, code).

        ``modules``: the modules whose import closure made the result (see
        :func:`make_key`). ``compute`` runs only when no finished entry exists; its result
        is stored atomically before it is returned.
        """
        key = make_key(config, seed, data_fp, modules)
        hit = self.get(name, key)
        if hit is not None:
            return hit
        obj = compute()
        self.put(name, key, obj)
        return obj
