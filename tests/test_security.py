"""Untrusted files: a pickle that would run code is refused by every loader a user can point at; output stays in --out.

Each payload, when unpickled, creates a marker file (`open(marker, "w")`): the stand-in for arbitrary code.
`test_the_payload_runs_when_unpickled` shows the payloads are live, so "no marker" means "not unpickled".
"""
import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dqar.studies.ablation import grid as G
from dqar.studies.ablation.runner import AblationOptions, run_ablation
from dqar.cli import main as cli_main
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig
from dqar.studies.scale.distributed import read_part
from dqar.embedded.classifier import load_stats
from dqar.embedded.train import STATE_FILE, EmbeddedModelConfig, train_embedded
from dqar.errors import DqarError
from dqar.studies.scale.fid import load_reference, read_labels
from dqar.generate import generate
from dqar.models import WEIGHTS, load_model, save_pipeline_folder
from dqar.engine.plan import build_plan
from dqar.engine.policy_net import load_policy
from dqar.tuning.collect import load_traces

from conftest import make_tiny_transformer

pytestmark = pytest.mark.usefixtures("single_thread")


class Payload:
    """Unpickling this opens `marker` for writing, creating it."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickle_file(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"weights": Payload(marker)}, protocol=2))
    return path


def torch_file(path: Path, marker: Path) -> Path:
    torch.save({"model": {"w": torch.zeros(2)}, "extra": Payload(marker)}, path)  # torch's zip format
    return path


def object_npz(path: Path, marker: Path) -> Path:
    """An .npz whose arr_0 is an object array holding the payload (np.savez pickles it)."""
    np.savez(path, arr_0=np.array([Payload(marker)], dtype=object))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny 10-class pixel-space model folder (8×8×1)."""
    t = make_tiny_transformer(num_layers=2, num_classes=10, in_channels=1, learned_sigma=False)
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "tiny", t)


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "the payload ran"


def test_the_payload_runs_when_unpickled(tmp_path):
    for write in (pickle_file, torch_file):
        m = tmp_path / f"ran_{write.__name__}"
        f = write(tmp_path / f"{write.__name__}.bin", m)
        (pickle.loads(f.read_bytes()) if write is pickle_file else torch.load(f, weights_only=False))
        assert m.exists()
    m = tmp_path / "ran_npz"
    with np.load(object_npz(tmp_path / "o.npz", m), allow_pickle=True) as z:
        z["arr_0"]
    assert m.exists()


# ----- model weights ----------------------------------------------------------------------------------
@pytest.mark.parametrize("write", [pickle_file, torch_file])
def test_model_folder_with_only_pickle_weights_is_refused(tmp_path, marker, write):
    folder = save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_layers=1, num_classes=10, in_channels=1, learned_sigma=False))
    (folder / "transformer" / WEIGHTS).unlink()
    write(folder / "transformer" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(DqarError, match="only safetensors weights are loaded"):
        load_model(folder)


def test_pickle_next_to_safetensors_is_ignored(tmp_path, marker):
    folder = save_pipeline_folder(tmp_path / "m", make_tiny_transformer(num_layers=1, num_classes=10, in_channels=1, learned_sigma=False))
    torch_file(folder / "transformer" / "diffusion_pytorch_model.bin", marker)
    assert load_model(folder).num_classes == 10


# ----- training checkpoint ----------------------------------------------------------------------------
def _fake_fashion_mnist(root: Path, n: int = 8) -> Path:
    """Gzipped IDX files with `n` random 28×28 images, in the layout dqar.embedded.data reads."""
    root.mkdir()
    rng = np.random.default_rng(0)
    head = lambda magic, *dims: np.array([magic, *dims], dtype=">u4").tobytes()  # noqa: E731
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(head(0x803, n, 28, 28) + images.tobytes()))
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(head(0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes()))
    return root


@pytest.mark.parametrize("write", [pickle_file, torch_file])
def test_training_resume_refuses_a_checkpoint_with_code(tmp_path, marker, write):
    out = tmp_path / "run"
    out.mkdir()
    write(out / STATE_FILE, marker)
    tiny = EmbeddedModelConfig(num_layers=1, heads=1, head_dim=8)
    with pytest.raises(DqarError, match="can be loaded safely"):
        train_embedded(out, steps=1, batch_size=2, data_dir=_fake_fashion_mnist(tmp_path / "data"), resume=True,
                       progress=False, model_config=tiny)


# ----- policy checkpoints, plans --------------------------------------------------------------------
@pytest.mark.parametrize("write", [pickle_file, torch_file])
def test_policy_checkpoint_with_code_is_refused(model_dir, tmp_path, marker, write):
    path = write(tmp_path / "policy.pt", marker)
    with pytest.raises(DqarError, match="not a safetensors file"):
        load_policy(path)
    run = RunConfig(reuse=ReuseConfig(policy=str(path)), sample=SampleConfig(steps=2))
    with pytest.raises(DqarError, match="not a safetensors file"):
        generate(load_model(model_dir), [0], run)


@pytest.mark.parametrize("write", [pickle_file, torch_file])
def test_plan_file_with_code_is_refused(tmp_path, marker, write, capsys, model_dir):
    path = write(tmp_path / "plan.json", marker)
    with pytest.raises(DqarError, match="not a valid dqar plan"):
        build_plan(ReuseConfig(plan_file=str(path)), 4, 2)
    (tmp_path / "c.toml").write_text(f"[reuse]\nplan_file = '{path}'\n")
    assert cli_main(["sample", "--model", str(model_dir), "--config", str(tmp_path / "c.toml"), "--steps", "4",
                     "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "not a valid dqar plan" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "ablate"])
def test_pickle_as_toml_config_is_refused(tmp_path, marker, capsys, model_dir, command):
    path = pickle_file(tmp_path / "config.toml", marker)
    assert cli_main([command, "--model", str(model_dir), "--config", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "not valid TOML" in capsys.readouterr().err


# ----- npz inputs ------------------------------------------------------------------------------------
def _good_samples(path: Path, **extra) -> Path:
    np.savez(path, arr_0=np.zeros((2, 28, 28, 1), dtype=np.uint8), **extra)
    return path


def _fid(argv: list[str], capsys) -> str:
    assert cli_main(["fid", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    return err[0]


def test_fid_refuses_object_array_samples(tmp_path, marker, capsys):
    samples = object_npz(tmp_path / "s.npz", marker)
    assert "not uint8" in _fid(["--samples", str(samples), "--embedded"], capsys)
    inception = pickle_file(tmp_path / "inception.pt", marker)
    assert "not uint8" in _fid(["--samples", str(samples), "--ref", str(samples), "--inception", str(inception)], capsys)


def test_fid_refuses_object_array_reference(tmp_path, marker, capsys):
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.array([Payload(marker)], dtype=object), sigma=np.eye(1))
    samples = _good_samples(tmp_path / "s.npz")
    assert "Object arrays cannot be loaded" in _fid(["--samples", str(samples), "--ref", str(ref), "--embedded"], capsys)
    with pytest.raises(DqarError, match="Object arrays cannot be loaded"):
        load_reference(ref)
    with pytest.raises(DqarError, match="Object arrays cannot be loaded"):
        load_stats(ref)


def test_sample_labels_as_object_array_are_refused(tmp_path, marker):
    samples = _good_samples(tmp_path / "s.npz", labels=np.array([Payload(marker), 1], dtype=object))
    with pytest.raises(DqarError, match="labels in .* cannot be read"):
        read_labels(samples, 2)


def test_traces_and_sample_parts_with_object_arrays_are_not_unpickled(tmp_path, marker):
    bad = object_npz(tmp_path / "bad.npz", marker)
    with pytest.raises(DqarError, match="not readable"):
        load_traces(bad)
    assert read_part(bad, np.arange(1)) is None  # an unreadable part is generated again


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_inception_loader_does_not_unpickle_plain_pickles(tmp_path, marker, capsys):
    samples = _good_samples(tmp_path / "s.npz")
    ref = tmp_path / "ref.npz"
    np.savez(ref, mu=np.zeros(4), sigma=np.eye(4))
    for write in (pickle_file, torch_file):
        inception = write(tmp_path / f"inception_{write.__name__}.pt", marker)
        assert "as TorchScript" in _fid(["--samples", str(samples), "--ref", str(ref), "--inception", str(inception)], capsys)


# ----- output paths ------------------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet="./_-\\ a", max_size=12))
def test_slug_is_one_safe_path_component(name):
    s = G.slug(name)
    assert s and s not in (".", "..") and not s.startswith(".")
    assert not set(s) & set("/\\\0") and len(s) <= G.SLUG_MAX + 9
    root = Path("/out/images")
    assert (root / s).parent == root and os.path.normpath(root / s) == str(root / s)


@settings(max_examples=500, deadline=None)
@given(st.text(alphabet="./_-= a", max_size=8), st.text(alphabet="./_-= a", max_size=8))
def test_distinct_names_get_distinct_slugs(a, b):
    assert (G.slug(a) == G.slug(b)) == (a == b)


@pytest.mark.parametrize("a,b", [("a/_b", "a_/b"), ("a/b", "a__b"), (".", ".."), ("", "-"), ("x", "x."), ("p q", "p+q"),
                                 ("s/plan_file=plans/a.json", "s/plan_file=plans__a.json")])
def test_names_that_once_shared_a_folder_no_longer_do(a, b):
    assert G.slug(a) != G.slug(b)


def test_shipped_grid_folders_keep_their_names():
    for quick in (False, True):
        for entry in G.expand(G.load_grid(G.builtin_grid(quick))):
            assert entry.slug == entry.name.replace("/", "__")


@pytest.mark.parametrize("name", ["../../escape", "a/b", "", "x y"])
def test_sweep_names_with_path_characters_are_refused(tmp_path, name):
    grid = tmp_path / "g.toml"
    grid.write_text(f'[study]\nmain = ["baseline"]\n[[sweep]]\nname = "{name}"\nvary = {{ warmup_frac = [0.5] }}\n')
    with pytest.raises(DqarError, match="give every sweep a name"):
        G.load_grid(grid)


DOTS_GRID = """
[study]
main = ["baseline"]
[sample]
steps = 3
[[sweep]]
name = ".."
base = "quant_cache_only"
vary = { warmup_frac = [0.4] }
[[sweep]]
name = "."
base = "quant_cache_only"
vary = { "calibrate.target_fraction" = [0.3] }
"""


def test_ablation_writes_only_inside_out(tmp_path, model_dir):
    """Sweeps named '..' and '.' (one calibrated, so it saves a plan) write nothing outside --out."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "grid.toml").write_text(DOTS_GRID)
    before = set(tmp_path.rglob("*"))
    out = work / "a" / "out"
    done = run_ablation(AblationOptions(out=out, config=str(work / "grid.toml"), repeats=1, progress=False),
                        loaded=load_model(model_dir), evaluator=None)
    assert done.completed == done.total == 3
    created = set(tmp_path.rglob("*")) - before
    assert all(p == out or out in p.parents for p in created - {work / "a"}), sorted(map(str, created))
    folders = {p.name for p in (out / "images").iterdir()}
    assert folders == {G.slug(n) for n in ("baseline", "../warmup_frac=0.4", "./target_fraction=0.3")}
    assert [p.parent for p in (out / "plans").iterdir()] == [out / "plans"]
