"""`dqar bench` on the tiny random Flux and SD3 shapes (CPU): rows, FLOPs bounds, refused executors and peers."""
import pytest
import torch

from dqar.engine.config import ReuseConfig
from dqar.errors import DqarError
from dqar.models import RANDOM_FLOW, load_model
from dqar.studies.bench.runner import BenchSettings, render_table, run_bench
from dqar.studies.measure.timing import cpu_threads

REFUSED = {"noreuse_compiled", "noreuse_graph", "full_dqar_compiled", "full_dqar_graph", "full_dqar_compiled_modeldtype"}


def _bench(name, **kw):
    cpu = torch.device("cpu")
    s = BenchSettings(**{"batch_sizes": (1,), "steps": 4, "repeats": 3, "warmup": 1, "presets": ("full_dqar",), **kw})
    with cpu_threads(cpu, 1):
        return run_bench(load_model(name), cpu, s, progress=False)


@pytest.mark.parametrize("name,family,cfg", [("random-flux-tiny", "flux", 1.0), ("random-sd3-tiny", "sd3", 4.5)])
def test_flow_bench_rows_flops_and_refused_executors(name, family, cfg):
    """stock eager, dqar no reuse and full_dqar on the patch executor are timed; the compiled and graph executors refuse
    the family at enable and are listed with the engine's reason, not timed and not failed."""
    result = _bench(name, peers=(), cases=("stock_eager", "noreuse_*", "full_dqar_*"),  # compile on: its dqar rows are refused
                    executors=("eager", "compiled", "graph"))
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_eager", "noreuse_eager", "full_dqar_eager"} and result["failed"] == {}
    assert result["family"] == family and result["settings"]["cfg"] == cfg and result["resolution"] == 64
    assert {k.split("@")[0] for k in result["not_applicable"]} == REFUSED
    assert all("executor runs the class-conditional DiT (DiTTransformer2DModel)" in why for why in result["not_applicable"].values())
    full = rows["full_dqar_eager"]
    assert full["flops_skipped_fraction"] > 0 and full["speedup_bound"] == pytest.approx(1 / (1 - full["flops_skipped_fraction"]))
    assert full["vs_stock_eager"] is not None and full["vs_stock_eager_ci"] is not None and full["complete"]
    assert rows["stock_eager"]["flops_skipped_fraction"] is None and "sample_flow" in result["stock"]
    table = render_table(result)
    assert "| 1 | full_dqar_eager |" in table and "| 1 | stock_eager |" in table and "flow-matching Euler 4" in table
    assert "Not applicable: full_dqar_graph@1 — the graph executor runs the class-conditional DiT" in table


def test_flow_bench_times_the_flow_compiled_rows():
    """noreuse_flow_compiled (whole blocks compiled, nothing reused) and full_dqar_flow_compiled are timed on Flux beside the
    stock compiled row, with full_dqar's plan and FLOPs; on the DiT they are listed as not applicable, with the engine's line."""
    result = _bench("random-flux-tiny", peers=(), executors=("flow_compiled",), steps=2, cfg=4.0)
    rows = {r["case"]: r for r in result["rows"]}
    assert set(rows) == {"stock_eager", "stock_compiled", "noreuse_flow_compiled", "full_dqar_flow_compiled"} and not result["failed"]
    full = rows["full_dqar_flow_compiled"]
    assert full["setting"] == "dqar executor flow_compiled" and full["flops_skipped_fraction"] > 0
    assert full["vs_stock_compiled"] is not None and full["vs_stock_compiled_ci"] is not None
    assert rows["noreuse_flow_compiled"]["flops_skipped_fraction"] == 0
    from dqar.studies.bench.family import refusal
    from conftest import tiny_loaded
    assert "DiT kernels do not run" in refusal(tiny_loaded(), ReuseConfig(enabled=False, granularity="block"), "flow_compiled")


def test_flow_bench_peers_on_flux_and_refused_on_sd3():
    """diffusers' peers run on Flux through enable_cache (MagCache calibrated on this model); SD3's transformer has no
    enable_cache in diffusers, so its peer rows are not applicable, with that reason."""
    peers = ("pab", "first_block_cache", "taylorseer", "magcache")
    flux = _bench("random-flux-tiny", presets=(), compile=False, peers=peers, cases=("stock_eager", "peer_*"))
    assert {r["case"] for r in flux["rows"]} == {"stock_eager", *(f"peer_{p}" for p in peers)} and flux["failed"] == {}
    assert "guidance-distilled (guidance 3.5, one forward)" in render_table(flux)
    sd3 = _bench("random-sd3-tiny", presets=(), compile=False, peers=peers, cases=("stock_eager", "peer_*"))
    assert [r["case"] for r in sd3["rows"]] == ["stock_eager"]
    assert set(sd3["not_applicable"]) == {f"peer_{p}@1" for p in peers}
    assert all("has no enable_cache" in why for why in sd3["not_applicable"].values())


def test_flow_models_build_the_exact_shapes_without_memory():
    """Flux.1-dev: 19 + 38 blocks, hidden 3072 (11.9 B parameters); SD3.5-medium: 24 blocks, 13 dual; on meta, nothing allocated."""
    flux = load_model("random-flux-dev", device="meta", dtype=torch.bfloat16)
    t = flux.transformer
    assert (len(t.transformer_blocks), len(t.single_transformer_blocks), t.inner_dim) == (19, 38, 3072)
    assert t.config.guidance_embeds and tuple(t.config.axes_dims_rope) == (16, 56, 56) and t.dtype == torch.bfloat16
    assert 11.8e9 < sum(p.numel() for p in t.parameters()) < 12.0e9
    assert (flux.family, flux.resolution, flux.guidance, flux.text_tokens, flux.vae) == ("flux", 1024, 3.5, 512, None)
    sd3 = load_model("random-sd35-medium@512", device="meta", dtype=torch.float16).transformer
    assert len(sd3.transformer_blocks) == 24 and sd3.config.caption_projection_dim == 1536 and sd3.config.qk_norm == "rms_norm"
    assert tuple(sd3.config.dual_attention_layers) == tuple(range(13)) and sd3.config.pos_embed_max_size == 384
    assert load_model("random-sd35-medium@512", device="meta").resolution == 512 and set(RANDOM_FLOW) >= {"random-flux-tiny"}


@pytest.mark.parametrize("name,expect", [("random-flux-xl", "unknown random model 'random-flux-xl'"),
                                         ("random-flux-dev@500", "resolution '500' in 'random-flux-dev@500' is invalid"),
                                         ("random-dit-xl2@512", "unknown random model")])
def test_bad_random_model_names_are_one_line(name, expect):
    with pytest.raises(DqarError) as err:
        load_model(name, device="meta")
    assert expect in str(err.value) and "\n" not in str(err.value)


def test_a_model_too_big_for_the_device_is_refused_before_allocating(monkeypatch):
    """Flux.1-dev in float32 is 47.6 GB: refused in one line where it does not fit (no allocation is tried)."""
    import dqar.models

    monkeypatch.setattr(dqar.models, "free_bytes", lambda dev: 8 * 10 ** 9)
    with pytest.raises(DqarError) as err:
        load_model("random-flux-dev", device="cpu")
    assert "random-flux-dev needs 47.6 GB for its weights in float32 on cpu, 8.0 GB free" in str(err.value)
    assert load_model("random-flux-tiny").transformer.device.type == "cpu"  # tiny shapes fit


def test_bad_model_name_on_the_command_line_is_one_line_exit_2(tmp_path, capsys):
    from dqar.cli import main

    rc = main(["bench", "--model", "random-flux-xl", "--device", "cpu", "--quick", "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown random model 'random-flux-xl'" in err and err.count("\n") == 1, err


def test_bench_resolution_and_cfg_flags_reach_a_flow_run(tmp_path):
    """--resolution and --cfg on random-flux-tiny (true CFG: two forwards) and random-sd3-tiny (cfg 1: one forward)."""
    import json

    from dqar.cli import main

    for name, px, cfg, how in [("random-flux-tiny", 32, 2.0, "CFG 2.0"), ("random-sd3-tiny", 48, 1.0, "CFG 1.0")]:
        out = tmp_path / name
        rc = main(["bench", "--model", name, "--device", "cpu", "--quick", "--resolution", str(px), "--cfg", str(cfg),
                   "--batch-sizes", "1", "--steps", "2", "--presets", "--peers", "--cases", "stock_eager", "noreuse_eager",
                   "--out", str(out), "--quiet"])
        result = json.loads((out / "bench.json").read_text())
        assert rc == 0 and result["resolution"] == px and result["settings"]["cfg"] == cfg and result["model"] == name
        assert f"{px} px · flow-matching Euler 2 · {how}" in (out / "bench.md").read_text()


@pytest.mark.parametrize("flags,expect", [
    (["--model", "random-flux-tiny", "--resolution", "40"], "--resolution 40 is invalid — use a positive multiple of 16"),
    (["--model", "random-flux-tiny", "--resolution", "0"], "--resolution 0 is invalid"),
    (["--model", "random-flux-tiny", "--resolution", "x"], "argument --resolution: invalid int value"),
    (["--model", "random-flux-tiny@64", "--resolution", "128"], "--resolution 128 contradicts the model name random-flux-tiny@64"),
    (["--model", "random-sd3-tiny", "--resolution", "1024"], "random-sd3-tiny's position embedding covers at most 768 px"),
    (["--resolution", "256"], "embedded samples at the resolution it was built or trained at"),
    (["--model", "embedded-flux", "--resolution", "256"], "embedded-flux samples at the resolution it was built or trained at"),
    (["--model", "random-dit-xl2", "--resolution", "384"], "random DiT-XL/2 shapes come at 256 and 512 px, not 384"),
    (["--model", "random-flux-tiny", "--cfg", "-1"], "--cfg -1.0 is invalid — use --cfg between 0 and 100"),
    (["--model", "random-sd3-tiny", "--cfg", "nan"], "--cfg nan is invalid"),
    (["--model", "random-flux-tiny", "--cfg", "four"], "argument --cfg: invalid float value")])
def test_bad_bench_resolution_and_cfg_are_one_line_exit_2_before_loading(flags, expect, tmp_path, capsys, monkeypatch):
    import dqar.models
    from dqar.cli import main

    def no_load(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(dqar.models, "load_model", no_load)
    monkeypatch.setattr(dqar.models, "random_dit_xl2", no_load)
    try:
        rc = main(["bench", *flags, "--device", "cpu", "--quick", "--out", str(tmp_path / "b"), "--quiet"])
    except SystemExit as exc:  # argparse's own errors (not a number) exit from the parser, also with 2
        rc = exc.code
    err = capsys.readouterr().err
    assert rc == 2 and expect in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "b").exists()


def test_bench_resolution_maps_random_dit_shapes_and_embedded_flux_keeps_its_defaults():
    from types import SimpleNamespace

    from dqar.studies.bench.family import bench_model, for_model

    assert bench_model("random-dit-xl2", 512) == "random-dit-xl2-512" and bench_model("random-dit-xl2-512", 256) == "random-dit-xl2"
    assert bench_model("random-flux-dev", 512) == "random-flux-dev@512" and bench_model("embedded", None) == "embedded"
    s = for_model(BenchSettings(presets=(), peers=()), SimpleNamespace(name="embedded-flux", family="flux"))
    assert (s.steps, s.cfg) == (28, 4.0)  # dqar sample's defaults for it: true CFG 4
    assert for_model(BenchSettings(presets=(), peers=()), SimpleNamespace(name="random-flux-dev", family="flux")).cfg == 1.0
