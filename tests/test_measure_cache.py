"""ONNX exports and latency measurements are cached by weights fingerprint; --retime re-measures."""
from types import SimpleNamespace

import pandas as pd
import torch
import torch.nn as nn

from study.cache import ArtifactCache
from study.profiles import PROFILES
from study.sections import measure


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x)


def test_latency_and_onnx_are_reused_until_retime(tmp_path, monkeypatch):
    calls, exports = [], []

    def fake_compare(items, hw, runtime, gmacs, errors, verbose, **settings):
        calls.append(sorted(items))
        df = pd.DataFrame([{"name": t, "threads": 1, "rounds": 3, "error": "",
                            **{k: 1.0 + i for i, k in enumerate(measure.COLUMNS)}} for t in items])
        df.attrs["protocol"] = {"runtime": runtime, "orders": [list(items)]}
        return df

    real_export = measure.export_onnx
    monkeypatch.setattr(measure.bench, "compare_latency", fake_compare)
    monkeypatch.setattr(measure, "export_onnx", lambda m, p, hw, **kw: exports.append(p) or real_export(m, p, hw, **kw))
    torch.manual_seed(0)
    model = Tiny()
    ctx = SimpleNamespace(profile=PROFILES["smoke"], cache=ArtifactCache(tmp_path / "cache"), retime=False)

    plans = []

    def run(out):
        plan = measure.LatencyPlan(ctx, (16, 16), tmp_path / out)
        plan.add("a", model)
        plans.append(plan)
        return plan.measure()["a"]

    first = run("one")
    second = run("two")
    assert first["timing"] == "measured" and second["timing"] == "cached"
    # a warm run's tables still say how they were measured (02 read attrs["protocol"] and failed)
    assert plans[1].tables["ort"].attrs["protocol"] == plans[0].tables["ort"].attrs["protocol"]
    assert len(calls) == 2 and len(exports) == 1  # ort + torch timed once; exported once
    assert second["latency_ms_p50_ort"] == first["latency_ms_p50_ort"]
    assert (tmp_path / "two" / "a.onnx").read_bytes() == (tmp_path / "one" / "a.onnx").read_bytes()
    ctx.retime = True
    assert run("three")["timing"] == "measured" and len(calls) == 4
    ctx.retime = False
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # other weights: another export and another measurement
    assert run("four")["timing"] == "measured" and len(exports) == 2


def test_cached_file_makes_once_copies_after_and_leaves_no_partial_file(tmp_path):
    ctx = SimpleNamespace(cache=ArtifactCache(tmp_path / "cache"))
    made = []

    def make(p):
        made.append(p)
        p.write_bytes(b"int8 model")
        return p

    a = measure.cached_file(ctx, tmp_path / "a" / "m.onnx", {"int8": "abc", "recipe": "r1"}, make)
    b = measure.cached_file(ctx, tmp_path / "b" / "m.onnx", {"int8": "abc", "recipe": "r1"}, make)
    assert a.read_bytes() == b.read_bytes() == b"int8 model" and len(made) == 1
    measure.cached_file(ctx, tmp_path / "c.onnx", {"int8": "abc", "recipe": "r2"}, make)  # another recipe
    assert len(made) == 2

    def broken(p):
        p.write_bytes(b"half")
        raise KeyboardInterrupt

    try:
        measure.cached_file(ctx, tmp_path / "d.onnx", {"int8": "xyz"}, broken)
    except KeyboardInterrupt:
        pass
    files = list((tmp_path / "cache" / "files").iterdir())
    assert len(files) == 2 and not any(f.name.startswith(".") for f in files)  # no partial entry kept
    assert not (tmp_path / "d.onnx").exists()


def test_cached_latency_reuses_the_measurement_of_the_same_files_until_retime(tmp_path, monkeypatch):
    """05 / 07 / 08 time model files directly: same bytes, same settings -> cached (with the
    protocol attrs); other bytes, other settings or --retime -> measured again."""
    calls = []

    def fake_compare(items, hw, **kw):
        calls.append((sorted(items), kw.get("rounds")))
        df = pd.DataFrame([{"name": t, "threads": 1, "rounds": kw.get("rounds", 5), "latency_ms_p50": 2.0,
                            "error": ""} for t in items])
        df.attrs["protocol"] = {"rounds": kw.get("rounds", 5)}
        return df

    monkeypatch.setattr(measure.bench, "compare_latency", fake_compare)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    a.write_bytes(b"model a")
    b.write_bytes(b"model b")
    ctx = SimpleNamespace(profile=PROFILES["smoke"], cache=ArtifactCache(tmp_path / "cache"), retime=False)
    first = measure.cached_latency(ctx, {"a": a, "b": b}, None, rounds=3)
    second = measure.cached_latency(ctx, {"a": a, "b": b}, None, rounds=3)
    assert list(first["timing"]) == ["measured"] * 2 and list(second["timing"]) == ["cached"] * 2
    assert second.attrs["protocol"] == {"rounds": 3} and len(calls) == 1
    assert list(second["latency_ms_p50"]) == list(first["latency_ms_p50"])
    measure.cached_latency(ctx, {"a": a, "b": b}, None, rounds=4)          # other settings
    b.write_bytes(b"model b, retrained")
    measure.cached_latency(ctx, {"a": a, "b": b}, None, rounds=3)          # other bytes
    ctx.retime = True
    measure.cached_latency(ctx, {"a": a, "b": b}, None, rounds=3)          # asked to re-time
    assert len(calls) == 4
    import pytest

    with pytest.raises(FileNotFoundError, match="'c'"):
        measure.cached_latency(ctx, {"c": tmp_path / "missing.onnx"}, None)


def test_export_model_follows_the_profiles_onnx_simplify_and_is_cached(tmp_path, monkeypatch):
    import numpy as np

    from study import quant

    seen = []
    real = measure.export_onnx
    monkeypatch.setattr(measure, "export_onnx",
                        lambda m, p, hw, simplify=True: seen.append(simplify) or real(m, p, hw, simplify=simplify))
    torch.manual_seed(0)
    model = Tiny()
    cache = ArtifactCache(tmp_path / "cache")
    smoke = SimpleNamespace(profile=PROFILES["smoke"], cache=cache)
    cpu = SimpleNamespace(profile=PROFILES["cpu"], cache=cache)
    assert not measure.onnx_simplify(smoke) and measure.onnx_simplify(cpu)
    a = measure.export_model(smoke, model, tmp_path / "a.onnx", (16, 16))
    b = measure.export_model(cpu, model, tmp_path / "b.onnx", (16, 16))
    c = measure.export_model(cpu, model, tmp_path / "c.onnx", (16, 16))   # same weights and shape: the cache
    assert seen == [False, True] and c.read_bytes() == b.read_bytes()
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    for f in (a, b):                                                       # both graphs compute the model
        np.testing.assert_allclose(quant.ort_predict(f, x), ref, rtol=1e-4, atol=1e-5)
