"""Compile-cache artifacts on the CPU: saved after a compile, loaded into an empty inductor cache as a hit; a missing or
corrupt file costs one warning line, never the run."""
import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.utils import fresh_cache
from torch.compiler._cache import CacheArtifactManager

from dqar.studies.measure import compile_cache


def _fn(x):
    return torch.sin(x) * 2 + x.cos()  # (8, 8) → (8, 8)


def _compile_once():
    torch.compile(_fn, dynamic=False)(torch.randn(8, 8))


@pytest.fixture
def isolated():
    """A process with no compiled frames and no recorded artifacts, in an empty inductor cache."""
    torch._dynamo.reset()
    torch.compiler.reset()
    with CacheArtifactManager.with_fresh_cache(), fresh_cache():
        yield
    torch._dynamo.reset()


def test_saved_artifacts_load_as_a_cache_hit(isolated, tmp_path):
    lines, file = [], tmp_path / "c" / "compile_cache.bin"
    _compile_once()
    saved = compile_cache.save(file, log=lines.append)
    assert saved["saved"]["inductor"] >= 1 and file.is_file() and "saved" in lines[-1]
    torch._dynamo.reset()
    torch.compiler.reset()
    with fresh_cache():  # an empty on-disk cache: only the artifacts can make the next compile a hit
        loaded = compile_cache.load(file, log=lines.append)
        assert loaded["loaded"]["inductor"] >= 1 and loaded["warning"] is None
        hits = counters["inductor"]["fxgraph_cache_hit"]
        _compile_once()
        assert counters["inductor"]["fxgraph_cache_hit"] == hits + 1


def test_the_environment_variable_names_the_file(isolated, tmp_path, monkeypatch):
    file = tmp_path / "env.bin"
    monkeypatch.setenv(compile_cache.ENV, str(file))
    _compile_once()
    assert compile_cache.save(log=lambda m: None)["path"] == str(file) and file.is_file()
    monkeypatch.delenv(compile_cache.ENV)
    assert compile_cache.load(log=lambda m: None) is None and compile_cache.save(log=lambda m: None) is None  # no file: nothing


def test_saving_keeps_what_the_file_held(isolated, tmp_path):
    """A later stage that compiles other graphs does not drop the earlier stage's artifacts from the file."""
    file = tmp_path / "c.bin"
    _compile_once()
    first = compile_cache.save(file, log=lambda m: None)["saved"]
    with CacheArtifactManager.with_fresh_cache(), fresh_cache():
        torch._dynamo.reset()
        torch.compile(lambda x: torch.tanh(x) @ x.T, dynamic=False)(torch.randn(8, 8))
        second = compile_cache.save(file, log=lambda m: None)["saved"]
    assert second["inductor"] == first["inductor"] + 1


@pytest.mark.parametrize("content", [None, b"not an artifact file", b""])
def test_a_missing_or_corrupt_file_warns_in_one_line_and_continues(isolated, tmp_path, content, capsys):
    file = tmp_path / "bad.bin"
    if content is not None:
        file.write_bytes(content)
    loaded = compile_cache.load(file)
    err = capsys.readouterr().err
    assert loaded["loaded"] is None and len(err.strip().splitlines()) == 1 and err.startswith("warning: compile cache")
    _compile_once()  # compiling still works, and the file is replaced by a good one
    assert compile_cache.save(file, log=lambda m: None)["saved"]["inductor"] >= 1
    assert compile_cache.load(file, log=lambda m: None)["loaded"]["inductor"] >= 1


def test_an_unwritable_file_warns_instead_of_raising(isolated, tmp_path):
    lines = []
    _compile_once()
    (tmp_path / "dir.bin").mkdir()
    out = compile_cache.save(tmp_path / "dir.bin", log=lines.append)
    assert out["saved"] is None and "not saved" in out["warning"] and len(lines) == 1


def test_bench_loads_before_the_first_warm_up_and_saves_before_the_timing(tmp_path, monkeypatch):
    """run_bench: the cache is loaded first and saved after each batch's warm-ups, so a stage killed while timing keeps it."""
    from dqar.studies.bench import runner as bench
    from dqar.studies.bench.runner import BenchSettings, run_bench

    from conftest import tiny_loaded

    events = []
    monkeypatch.setattr(compile_cache, "load", lambda path=None, log=None: events.append("load") or {"path": str(path)})
    monkeypatch.setattr(compile_cache, "save", lambda path=None, log=None: events.append("save") or {"path": str(path)})
    s = BenchSettings(batch_sizes=(1, 2), steps=2, repeats=3, presets=(), compile=False, peers=(), executors=("eager",))
    result = run_bench(tiny_loaded(), torch.device("cpu"), s, progress=False, cache_path=tmp_path / "c.bin",
                       log=lambda m: events.append("warm-up") if m.startswith("warm-up") else None,
                       on_update=lambda r: events.append("timed" if any(row["times_s"] for row in r["rows"]) else "published"))
    first, second = (i for i, e in enumerate(events) if e == "save")
    assert events[0] == "load" and events.count("save") == 2
    assert [e for e in events[1:first] if e != "published"] == ["warm-up"] * 4  # 2 passes over stock_eager, noreuse_eager
    assert events[first + 1] == "timed" and "timed" in events[first + 1:second]  # saved before any round is timed
    assert result["compile_cache"]["load"] == {"path": str(tmp_path / "c.bin")}
