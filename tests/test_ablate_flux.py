"""dqar ablate and the peers on a flow model (the embedded Flux, a few steps): the model is a parameter of the study core.

Each peer attaches with Flux's module names and skips counted work over both block lists; a tiny grid runs end to end
and writes its report, with the configurations the Flux family refuses as refused rows carrying the engine's reason.
"""
import json

import pytest
import torch

from dqar.engine.config import RunConfig, SampleConfig, preset
from dqar.generate import generate
from dqar.models import load_model
from dqar.studies.ablation import grid as G
from dqar.studies.ablation.runner import REPORT_FILE, RESULTS_FILE, AblationOptions, run_ablation
from dqar.studies.peers import methods as P
from dqar.studies.peers import work as W
from dqar.studies.peers.rows import attach_peer, model_copy

STEPS = 4
LABELS = [0, 7]
SKIPPING = {  # settings that skip work within 4 steps
    "pab": P.PAB(),
    "first_block_cache": P.FirstBlockCache(threshold=0.5),
    "taylorseer": P.TaylorSeer(cache_interval=2, disable_cache_before_step=2),
    "magcache": P.MagCache(threshold=0.5),
}
GRID = """
[study]
repeats = 3
samples_per_label = 1
fidelity_samples_per_label = 1
main = ["baseline", "full_dqar"]

[sample]
steps = 2
cfg = 4.0

[[sweep]]
name = "refused"
base = "scheduling_only"
points = [{ cfg_share = "cond_to_uncond" }, { target = "kv" }]

[[peer]]
method = "first_block_cache"
threshold = 0.5
"""


@pytest.fixture(scope="module")
def flux(single_thread):
    return load_model("embedded-flux")


@pytest.fixture(scope="module")
def run():
    return RunConfig(reuse=preset("baseline"), sample=SampleConfig(steps=STEPS, cfg=4.0))


@pytest.fixture(scope="module")
def base(flux, run):
    per_layer: list = []
    with W.count_calls(W.layers(flux.transformer), per_layer) as counts:
        images = generate(flux, LABELS, run).output.images
    return images, dict(counts), per_layer


def test_layers_are_both_block_lists(flux, base):
    layers = W.layers(flux.transformer)
    assert len(layers) == len(flux.transformer.transformer_blocks) + len(flux.transformer.single_transformer_blocks)
    _, counts, per_layer = base
    assert counts == {k: STEPS * 2 * len(layers) for k in W.COUNTED}  # true CFG: two forwards per step
    assert len(per_layer) == len(layers)


def test_module_patterns_follow_the_family(flux):
    assert P.module_patterns(flux.transformer, "attn1") == [r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"]
    assert P.module_patterns(flux.transformer, "ff") == [r"transformer_blocks\.\d+\.ff", r"transformer_blocks\.\d+\.ff_context"]


@pytest.mark.parametrize("method", list(SKIPPING))
def test_each_peer_attaches_on_flux_and_skips_work(flux, run, base, method):
    images, counts, _ = base
    model = model_copy(flux)
    row = attach_peer(SKIPPING[method], model, LABELS, run)
    with W.count_calls(row.attached.blocks) as mine:
        out = row.generate().output.images
    row.attached.detach()
    computed = W.computed_fractions(mine, counts)
    assert min(computed.values()) < 1.0, computed
    assert not torch.equal(out, images)
    assert torch.equal(generate(model, LABELS, run).output.images, images)  # detached: computes exactly as before


def test_weighted_share_counts_dual_and_single_blocks(flux, run):
    per_layer: list = []
    with W.count_calls(W.layers(flux.transformer), per_layer), W.captured_forward(flux.transformer) as forward:
        generate(flux, LABELS[:1], run)
    weights = W.work_weights(flux, forward)
    assert len(weights) == len(per_layer) and all(a > 0 and f > 0 for a, f in weights)
    assert W.skipped_share(per_layer, per_layer, weights) == 0.0


def test_flux_grids_and_model_defaults():
    assert G.grid_for("quick", "embedded-flux") == "flux_quick" and G.grid_for("default", "embedded-flux") == "flux_default"
    assert G.grid_for("full", "embedded-flux") == "full" and G.grid_for("quick", None) == "quick"
    for name in ("flux_quick", "flux_default"):
        study = G.load_grid(G.builtin_grid(name))
        assert study.sample.cfg == 4.0 and G.expand(study)
    full = G.with_model_defaults(G.load_grid(G.builtin_grid("full")), "embedded-flux")
    assert (full.sample.steps, full.sample.cfg) == (28, 4.0)


def test_ablate_on_flux_writes_the_report_with_refused_rows(flux, tmp_path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    out = tmp_path / "out"
    done = run_ablation(AblationOptions(out=out, config=str(grid), progress=False, repeats=1, executor="patch"), loaded=flux)
    assert done.completed == done.total and not done.interrupted
    res = json.loads((out / RESULTS_FILE).read_text())
    assert res["environment"]["family"] == "flux"
    names = {r["name"] for r in res["records"]}
    assert {"baseline", "full_dqar", "peer/first_block_cache,threshold=0.5"} <= names
    refused = {n["name"]: n["reason"] for n in res["not_run"] if n.get("refused")}
    assert set(refused) == {"refused/cfg_share=cond_to_uncond", "refused/target=kv"}
    assert "cfg_share" in refused["refused/cfg_share=cond_to_uncond"] and "kv" in refused["refused/target=kv"]
    ran = {r["name"]: r["measurements"]["executor"] for r in res["records"]}
    assert ran["full_dqar"] == ran["baseline"] == "patch" and ran["peer/first_block_cache,threshold=0.5"] == "peer"
    peer = next(r for r in res["records"] if r["name"].startswith("peer/"))
    assert peer["peer"]["baseline_counts"]["block"] == 2 * 2 * len(W.layers(flux.transformer))  # per forward, both lists
    report = (out / REPORT_FILE).read_text()
    assert "## Refused" in report and "refused/target=kv" in report and "flow matching, 2 steps, true CFG 4" in report


def test_auto_times_flux_on_flow_compiled_and_its_baseline_alike(flux):
    """`--executor auto` on a CPU: compiled stock blocks for a non-DiT family (the DiT keeps 'compiled'), the baseline too."""
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.models import load_model
    from dqar.studies.ablation import blocks as B

    sample = SampleConfig(steps=2, cfg=4.0)
    assert B.choose_executor(flux, RunConfig(reuse=preset("full_dqar"), sample=sample), "auto")[0] == "flow_compiled"
    assert B.baseline_executor(flux, sample, "auto") == "flow_compiled"
    assert B.choose_executor(flux, RunConfig(reuse=preset("full_dqar"), sample=sample), "patch")[0] == "patch"
    dit = load_model("embedded")
    assert B.choose_executor(dit, RunConfig(reuse=preset("full_dqar"), sample=sample), "auto")[0] == "compiled"
