"""dqar.studies.scale.fid and `dqar fid`: embedded-classifier FD offline, a TorchScript extractor in Inception's place, bad input."""
import json

import numpy as np
import pytest
import torch

import dqar.embedded as emb
from dqar.cli import main as cli_main
from dqar.embedded import classifier as clf_mod
from dqar.embedded.data import load_split
from dqar.studies.scale.fid import INCEPTION_URL, fid_embedded, fid_inception, open_samples

from conftest import FASHION_MNIST

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")


def write_npz(path, arr, **extra):
    np.savez(path, arr_0=arr, **extra)
    return path


def to_hwc_uint8(x):
    """(N, 1, 28, 28) in [-1, 1] → (N, 28, 28, 1) uint8."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory):
    """A briefly trained classifier and the reference statistics of 64 real test images."""
    folder = tmp_path_factory.mktemp("clf")
    clf_mod.train_classifier(folder, steps=4, limit=256, test_limit=64, batch_size=32, progress=False, data_dir=FASHION_MNIST)
    return folder


class FakeInception(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: same call, (B, 32) features of uint8 (B, 3, H, W) (2048 in the real one)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(48, 32, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1) @ self.w  # (B, 32)


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    path = tmp_path_factory.mktemp("inc") / "inception-2015-12-05.pt"
    torch.jit.script(FakeInception()).save(str(path))
    return path


def fake_stats(arr):
    from dqar.metrics import feature_stats

    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
    return feature_stats(FakeInception()(x).double())


def test_streamed_batches_equal_the_array(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    samples = open_samples(write_npz(tmp_path / "s.npz", arr))
    assert samples.shape == (7, 5, 4, 3)
    assert np.array_equal(np.concatenate(list(samples.batches(3))), arr)


def test_embedded_fd_ranks_real_images_below_noise(clf_dir, tmp_path):
    x, y = load_split("test", data_dir=FASHION_MNIST, limit=64)
    real = write_npz(tmp_path / "real.npz", to_hwc_uint8(x), labels=y.numpy())
    noise = write_npz(tmp_path / "noise.npz", np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8))
    r = fid_embedded(real, folder=clf_dir)
    n = fid_embedded(noise, folder=clf_dir)
    assert r.fid < 1e-6 * n.fid + 1e-6  # the reference statistics are of exactly these images
    assert n.fid > 0 and r.features == "embedded-classifier" and r.num_samples == 64
    with torch.no_grad():  # the labels stored with the samples are scored by the same classifier
        expected = float((clf_mod.load_classifier(clf_dir)(x).argmax(1) == y).float().mean())
    assert r.class_accuracy == pytest.approx(expected) and n.class_accuracy is None


def test_shipped_classifier_scores_real_test_images_near_zero(tmp_path):
    x, _ = load_split("test", data_dir=FASHION_MNIST, limit=500)
    real = fid_embedded(write_npz(tmp_path / "real.npz", to_hwc_uint8(x)))
    noise = fid_embedded(write_npz(tmp_path / "noise.npz", np.random.default_rng(0).integers(0, 256, (500, 28, 28, 1), dtype=np.uint8)))
    assert real.fid < 0.1 * noise.fid and real.reference == "embedded:fashion-mnist-test"


def test_fid_embedded_cli_on_generated_samples(clf_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(emb, "load_classifier", lambda device="cpu", folder=None: clf_mod.load_classifier(clf_dir, device))
    monkeypatch.setattr(emb, "load_reference_stats", lambda folder=None: clf_mod.load_stats(clf_dir / clf_mod.STATS_FILE))
    samples, record = tmp_path / "e.npz", tmp_path / "fid.json"
    assert cli_main(["fid-sample", "--model", "embedded", "--num-samples", "4", "--batch-size", "4", "--steps", "2",
                     "--out", str(samples), "--device", "cpu", "--quiet"]) == 0
    assert cli_main(["fid", "--samples", str(samples), "--embedded", "--device", "cpu", "--json-out", str(record)]) == 0
    out = json.loads(record.read_text())
    assert out["num_samples"] == 4 and out["image_shape"] == [28, 28, 1] and np.isfinite(out["fid"]) and out["fid"] > 0
    assert out["reference"] == "embedded:fashion-mnist-test" and out["class_accuracy"] is not None
    assert f"FID {out['fid']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize("channels", [3, 1])
def test_inception_fid_with_a_torchscript_extractor(inception, tmp_path, channels):
    rng = np.random.default_rng(channels)
    arr = rng.integers(0, 256, (12, 16, 16, channels), dtype=np.uint8)
    other = rng.integers(0, 128, (12, 16, 16, channels), dtype=np.uint8)
    samples = write_npz(tmp_path / "s.npz", arr)
    mu, sigma = fake_stats(arr)
    same = tmp_path / "same.npz"
    np.savez(same, mu=mu, sigma=sigma)
    mu2, sigma2 = fake_stats(other)
    diff = tmp_path / "diff.npz"
    np.savez(diff, mu=mu2, sigma=sigma2, arr_0=other)  # ADM reference batches also hold the images
    zero = fid_inception(samples, same, inception, batch_size=5)
    far = fid_inception(samples, diff, inception, batch_size=5)
    assert zero.fid < 1e-6 * far.fid and far.fid > 0
    assert far.features == "inception-v3-pool3" and far.image_shape == (16, 16, channels)


def test_fid_cli_writes_json(inception, tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    mu, sigma = fake_stats(arr[::-1].copy() // 2)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    write_npz(tmp_path / "s.npz", arr)
    args = ["fid", "--samples", str(tmp_path / "s.npz"), "--ref", str(tmp_path / "ref.npz"), "--inception", str(inception),
            "--device", "cpu", "--json-out", str(tmp_path / "o.json")]
    assert cli_main(args) == 0
    assert json.loads((tmp_path / "o.json").read_text())["fid"] > 0


def _cases(tmp, inception):
    good = write_npz(tmp / "good.npz", np.zeros((4, 8, 8, 3), np.uint8))
    np.savez(tmp / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    np.savez(tmp / "small_ref.npz", mu=np.zeros(128), sigma=np.eye(128))
    np.savez(tmp / "no_arr.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    write_npz(tmp / "float.npz", np.zeros((4, 8, 8, 3), np.float32))
    (tmp / "text.npz").write_text("not a zip")
    ref = ["--ref", str(tmp / "ref.npz")]
    return [
        (["--samples", str(good), *ref], "inception-2015-12-05.pt"),  # no weights: what to download and how to pass it
        (["--samples", str(good), *ref, "--inception", str(tmp / "absent.pt")], INCEPTION_URL),
        (["--samples", str(good), *ref, "--inception", str(tmp / "text.npz")], "not load"),
        (["--samples", str(tmp / "absent.npz"), *ref], "does not exist"),
        (["--samples", str(good), "--ref", str(tmp / "absent.npz")], "does not exist"),
        (["--samples", str(good)], "--ref is required"),
        (["--samples", str(tmp / "no_arr.npz"), *ref], "has no arr_0"),
        (["--samples", str(tmp / "float.npz"), *ref], "not uint8"),
        (["--samples", str(tmp / "text.npz"), *ref], "not an .npz"),
        (["--samples", str(good), "--ref", str(good)], "no mu/sigma"),
        (["--samples", str(good), "--ref", str(tmp / "small_ref.npz"), "--inception", str(inception)], "128-d"),
        (["--samples", str(good), "--embedded"], "28×28×1"),
        (["--samples", str(good), *ref, "--batch-size", "0"], "--batch-size = 0"),
    ]


def test_bad_input_is_one_line(tmp_path, inception, capsys):
    for args, match in _cases(tmp_path, inception):
        assert cli_main(["fid", "--device", "cpu", *args]) == 2, args
        err = capsys.readouterr().err
        assert match in err and err.count("\n") == 1, (args, err)
