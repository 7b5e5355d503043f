"""Peers (dqar.studies.peers.methods) on a tiny random DiT: each really skips counted calls, changes the output, detaches exactly,
resets per generation; bad input is one line; peer rows in dqar ablate, the Compared-to section and its doc."""
import copy
import importlib.util
import json
import re

import pytest
import torch
from diffusers import DDIMScheduler

from dqar.reporting import compared as C
from dqar.studies.ablation import grid as G
from dqar.studies.peers import methods as P
from dqar.studies.core import SEED_OFFSET
from dqar.studies.ablation.runner import REPORT_FILE, RESULTS_FILE, AblationOptions, run_ablation
from dqar.cli import main as cli_main
from dqar.errors import DqarError
from dqar.models import load_model, save_pipeline_folder
from dqar.sampling import sample

from conftest import make_tiny_transformer

STEPS, LAYERS = 8, 4
CACHE_DIT = importlib.util.find_spec("cache_dit") is not None

# Settings that skip work on a tiny random model within 8 steps (its residuals change fast).
SKIPPING = {
    "pab": P.PAB(),
    "first_block_cache": P.FirstBlockCache(threshold=0.3),
    "taylorseer": P.TaylorSeer(cache_interval=2, disable_cache_before_step=2),
    "magcache": P.MagCache(threshold=0.3),
    "cache_dit": P.CacheDit(residual_diff_threshold=0.3, max_warmup_steps=2),
}
# Settings under which each peer computes everything: its wiring alone must not change a single value.
NEVER_SKIPPING = {
    "pab": P.PAB(timestep_range=(0, 1)),
    "first_block_cache": P.FirstBlockCache(threshold=0.0),
    "taylorseer": P.TaylorSeer(disable_cache_before_step=100),
    "magcache": P.MagCache(retention_ratio=1.0),
    "cache_dit": P.CacheDit(max_warmup_steps=100),
}
RUNNABLE = [m for m in P.PEERS if m != "cache_dit" or CACHE_DIT]


@pytest.fixture(scope="module")
def tiny():
    return make_tiny_transformer(num_layers=LAYERS, sample_size=28, patch_size=7, in_channels=1, learned_sigma=False, num_classes=10)


def draw(model, seed=0):
    return sample(model, [0, 1, 2], scheduler=DDIMScheduler(clip_sample=False), steps=STEPS, cfg=4.0, seed=seed).images


@pytest.fixture(scope="module")
def base(tiny, single_thread):
    return draw(tiny)


def attached(tiny, peer):
    model = copy.deepcopy(tiny)
    return model, P.attach(peer, model, STEPS, calibrate=lambda: draw(model, seed=SEED_OFFSET))


def generation(model, a, seed=0):
    with P.count_calls(a.blocks) as counts, a.generation():
        images = draw(model, seed)
    return images, dict(counts)


# ----- each peer ----------------------------------------------------------------------------------
@pytest.mark.parametrize("method", RUNNABLE)
def test_peer_skips_counted_calls_changes_output_resets_and_detaches(tiny, base, method):
    model, a = attached(tiny, SKIPPING[method])
    images, counts = generation(model, a)
    assert set(counts) == {"block", "attn1", "ff"}
    computed = P.computed_fractions(counts, {k: STEPS * LAYERS for k in counts})
    skipped = {"pab": ["attn1"], "taylorseer": ["attn1", "ff"]}.get(method, ["block", "attn1", "ff"])
    assert all(computed[k] < 1.0 for k in skipped), computed
    assert all(computed[k] == 1.0 for k in set(computed) - set(skipped)), computed
    assert 0 < min(computed.values()) and not torch.equal(images, base)
    other, _ = generation(model, a, seed=7)
    again, counts_again = generation(model, a)  # state reset: the same seed gives the same images and skips
    assert torch.equal(again, images) and counts_again == counts and not torch.equal(other, images)
    a.detach()
    with P.count_calls(a.blocks) as full:
        after = draw(model)
    assert torch.equal(after, base) and full == {k: STEPS * LAYERS for k in full}


@pytest.mark.parametrize("method", RUNNABLE)
def test_peer_that_skips_nothing_reproduces_the_baseline_exactly(tiny, base, method):
    model, a = attached(tiny, NEVER_SKIPPING[method])
    images, counts = generation(model, a)
    assert counts == {"block": STEPS * LAYERS, "attn1": STEPS * LAYERS, "ff": STEPS * LAYERS}
    assert torch.equal(images, base)
    a.detach()


def test_magcache_uses_ratios_from_its_own_calibration(tiny, base):
    model, a = attached(tiny, P.MagCache(threshold=0.3))
    ratios = a.info["mag_ratios"]
    assert a.info["calibrated"] and len(ratios) == STEPS and ratios[0] == 1.0 and len(set(ratios)) > 2
    calibrated, _ = generation(model, a)
    model2, b = attached(tiny, P.MagCache(threshold=0.3, mag_ratios=ratios))  # the same ratios given: the same images
    assert not b.info["calibrated"] and torch.equal(generation(model2, b)[0], calibrated) and not torch.equal(calibrated, base)
    with pytest.raises(DqarError, match="calibrate"):
        P.attach(P.MagCache(), copy.deepcopy(tiny), STEPS)


def test_cache_dit_runs_when_installed_else_names_the_install(monkeypatch):
    note = P.unavailable(P.CacheDit())
    assert (note is None) == CACHE_DIT
    monkeypatch.setattr(P.importlib.util, "find_spec", lambda name: None)
    note = P.unavailable(P.CacheDit())
    assert "cache-dit is not installed" in note and "pip install --no-deps cache-dit" in note
    assert all(P.unavailable(SKIPPING[m]) is None for m in P.PEERS if m != "cache_dit")


# ----- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("table,needle", [
    ({"method": "taylor_seer"}, "unknown peer method 'taylor_seer' — did you mean 'taylorseer'?"),
    ({}, "has no method"),
    ({"method": "pab", "skip": 2}, "unknown key 'skip' for peer 'pab'"),
    ({"method": "first_block_cache", "treshold": 0.1}, "did you mean 'threshold'?"),
    ({"method": "pab", "skip_range": 1}, "pab.skip_range = 1 is invalid"),
    ({"method": "pab", "timestep_range": [800, 100]}, "lo < hi"),
    ({"method": "taylorseer", "targets": ["attn2"]}, "unknown taylorseer target 'attn2'"),
    ({"method": "magcache", "mag_ratios": "x"}, "magcache.mag_ratios"),
    ({"method": "cache_dit", "residual_diff_threshold": -1}, "out of range"),
])
def test_bad_peer_tables_raise_one_line(table, needle):
    with pytest.raises(DqarError, match=re.escape(needle)) as err:
        P.from_table(table)
    assert "\n" not in str(err.value)


def test_bad_peer_in_a_grid_is_a_one_line_cli_error(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('[[peer]]\nmethod = "taylorseer"\ninterval = 3\n')
    with pytest.raises(DqarError, match="unknown key 'interval' for peer 'taylorseer'.*cache_interval"):
        G.load_grid(grid)
    assert cli_main(["ablate", "--config", str(grid), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown key 'interval'" in err[0]
    grid.write_text('[[peer]]\nmethod = "pab"\n[[peer]]\nmethod = "pab"\n')
    with pytest.raises(DqarError, match="appears twice"):
        G.load_grid(grid)
    grid.write_text('peer = 3\n')
    with pytest.raises(DqarError, match=r"\[\[peer\]\]"):
        G.load_grid(grid)


def test_grid_peers_are_entries_with_their_own_hash():
    study = G.parse_grid({"sample": {"steps": 6}, "peer": [{"method": "pab"}, {"method": "pab", "skip_range": 3}]})
    entries = G.expand(study)
    peers = [e for e in entries if e.role == "peer"]
    assert [e.name for e in peers] == ["peer/pab", "peer/pab,skip_range=3"] and entries[-2:] == peers
    assert all(not e.is_baseline and G.baseline_of(entries, e).name == "baseline" for e in peers)
    assert len({e.config_hash for e in entries}) == len(entries)


# ----- peer rows in dqar ablate ---------------------------------------------------------------------
GRID = """
[study]
main = ["baseline", "scheduling_only"]
[sample]
steps = 6
[[peer]]
method = "pab"
[[peer]]
method = "first_block_cache"
threshold = 0.3
[[peer]]
method = "magcache"
threshold = 0.3
[[peer]]
method = "cache_dit"
"""


@pytest.fixture(scope="module")
def peer_study(tmp_path_factory, single_thread):
    """A study with peers; cache_dit is made unavailable (as in CI) and taylorseer made to fail."""
    root = tmp_path_factory.mktemp("peers")
    t = make_tiny_transformer(num_layers=LAYERS, sample_size=28, patch_size=7, in_channels=1, learned_sigma=False, num_classes=10)
    folder = save_pipeline_folder(root / "tiny", t)
    grid = root / "g.toml"
    grid.write_text(GRID)
    mp = pytest.MonkeyPatch()
    mp.setattr(P.CacheDit, "unavailable", lambda self: "cache-dit is not installed (test)")
    try:
        done = run_ablation(AblationOptions(out=root / "o", config=str(grid), repeats=1, progress=False, command="dqar ablate (test)"),
                            loaded=load_model(folder), evaluator=None)
    finally:
        mp.undo()
    return done, root


def test_peer_rows_are_measured_like_configurations(peer_study):
    done, root = peer_study
    data = json.loads((root / "o" / RESULTS_FILE).read_text())
    assert data["status"] == "complete" and done.completed == done.total and data["command"] == "dqar ablate (test)"
    assert data["not_run"] == [{"name": "peer/cache_dit", "method": "cache_dit", "reason": "cache-dit is not installed (test)"}]
    peers = {r["name"]: r for r in data["records"] if r["role"] == "peer"}
    assert set(peers) == {"peer/pab", "peer/first_block_cache,threshold=0.3", "peer/magcache,threshold=0.3"}
    for r in peers.values():
        p, m = r["peer"], r["measurements"]
        assert p["baseline_counts"] == {"block": 6 * LAYERS, "attn1": 6 * LAYERS, "ff": 6 * LAYERS} and p["copy_identical"]
        assert min(p["computed"].values()) < 1.0 and r["fidelity"]["psnr_db"] < 100 and m["deterministic"]
        assert len(m["baseline_times_s"]) == len(m["times_s"]) and m["speedup"] > 0 and r["reuse"] is None
        assert (root / "o" / "images" / r["slug"] / "grid.png").is_file()
    assert peers["peer/magcache,threshold=0.3"]["peer"]["calibration_seeds"] == [1042, 1051]
    assert data["study"]["peer_method"] and data["run_seconds"] > 0


def test_compared_section_numbers_equal_the_json(peer_study):
    _, root = peer_study
    data = json.loads((root / "o" / RESULTS_FILE).read_text())
    md = (root / "o" / REPORT_FILE).read_text()
    assert "## Compared to" in md and "`peer/cache_dit`: cache-dit is not installed (test)" in md
    assert "1 not run (see Compared to)" in md
    part = md[md.index("## Compared to"):].split("\n---\n")[0]
    lines = part.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method"))
    end = next(i for i in range(start, len(lines)) if not lines[i].startswith("|"))
    cols = [c.strip() for c in lines[start].strip("|").split("|")]
    by_name = {r["name"]: r for r in data["records"]}
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[start + 2:end]]
    assert [r[0].strip("`") for r in rows] == ["scheduling_only", "peer/pab", "peer/first_block_cache,threshold=0.3",
                                               "peer/magcache,threshold=0.3"]
    for row in rows:
        rec, cells = by_name[row[0].strip("`")], dict(zip(cols, row))
        attn, mlp = C.computed(rec)
        assert cells["Speedup"] == f"{rec['measurements']['speedup']:.2f}×"
        assert cells["PSNR (dB)"] == f"{rec['fidelity']['psnr_db']:.2f}"
        assert cells["Attn computed"] == f"{100 * attn:.1f}%" and cells["MLP computed"] == f"{100 * mlp:.1f}%"
    pab = by_name["peer/pab"]
    assert C.computed(pab) == (pab["peer"]["computed"]["attn1"], pab["peer"]["computed"]["ff"])
    sched = by_name["scheduling_only"]
    assert C.computed(sched)[0] == pytest.approx(1 - sched["reuse"]["reuse_fraction"])
    fastest = max((by_name[r[0].strip("`")] for r in rows), key=lambda r: r["measurements"]["speedup"])
    assert re.search(rf"Fastest overall: (not distinguishable on this machine — )?`{re.escape(fastest['name'])}`", part)


def test_compared_doc_is_written_from_the_run(peer_study, tmp_path, capsys):
    _, root = peer_study
    doc = tmp_path / "COMPARED.md"
    doc.write_text("# Compared to\n\nHand-written intro.\n\n## How each peer is applied\n\nkept\n")
    args = ["compared", "--results", str(root / "o"), "--doc", str(doc), "--note", "test machine"]
    assert cli_main(args) == 0 and cli_main(args) == 0  # rewriting replaces the section, never duplicates it
    text = doc.read_text()
    assert text.count("## Measured:") == 1 and "Hand-written intro." in text and "## How each peer is applied" in text
    assert "`dqar ablate (test)`" in text and "test machine" in text and "| `peer/pab` |" in text
    assert "images/" not in text  # no links into a results folder from docs/
    capsys.readouterr()
    assert cli_main(["compared", "--results", str(tmp_path / "none"), "--doc", str(doc)]) == 2
    assert "run dqar ablate first" in capsys.readouterr().err


def test_a_peer_that_fails_is_reported_not_run(tmp_path, monkeypatch, single_thread):
    t = make_tiny_transformer(num_layers=2, sample_size=28, patch_size=7, in_channels=1, learned_sigma=False, num_classes=10)
    folder = save_pipeline_folder(tmp_path / "tiny", t)
    grid = tmp_path / "g.toml"
    grid.write_text('[study]\nmain = ["baseline"]\n[sample]\nsteps = 3\n[[peer]]\nmethod = "taylorseer"\n')

    def broken(self, transformer, steps, calibrate=None):
        raise ValueError("No cache context is set.\nmore")

    monkeypatch.setattr(P.TaylorSeer, "attach", broken)
    done = run_ablation(AblationOptions(out=tmp_path / "o", config=str(grid), repeats=1, progress=False),
                        loaded=load_model(folder), evaluator=None)
    assert done.completed == done.total == 2 and done.not_run[0]["name"] == "peer/taylorseer"
    assert done.not_run[0]["reason"] == "ValueError while applying or running it: No cache context is set."
    md = (tmp_path / "o" / REPORT_FILE).read_text()
    assert "`peer/taylorseer`: ValueError while applying or running it: No cache context is set." in md


def test_without_the_reset_state_would_leak_into_the_next_generation(tiny):
    """What `generation()`'s reset prevents: TaylorSeer's step counter runs on across generations otherwise."""
    model, a = attached(tiny, SKIPPING["taylorseer"])
    fresh, _ = generation(model, a)
    generation(model, a, seed=7)
    with a.context():  # the same generation without the reset
        leaked = draw(model)
    assert not torch.equal(leaked, fresh) and torch.equal(generation(model, a)[0], fresh)
    a.detach()


# ----- every family of tests/families.py, in its stock pipeline -------------------------------------
FAMILY_STEPS = 6
FAMILY_SKIPPING = {"pab": P.PAB(), "first_block_cache": P.FirstBlockCache(threshold=0.5),
                   "taylorseer": P.TaylorSeer(cache_interval=2, disable_cache_before_step=2), "magcache": P.MagCache(threshold=0.5)}
SKIPS = {"pab": {"attn1"}, "taylorseer": {"attn1", "ff"}}  # the others skip whole blocks
REFUSED = {("sd3", "first_block_cache"), ("sd35", "first_block_cache")}  # diffusers' FBC needs the last block's text stream


@pytest.fixture(scope="module")
def family_runs(single_thread):
    """Per family: (pipeline, call kwargs, stock latents, stock counted calls), built once."""
    from families import FAMILIES, run

    out = {}
    for name, build in FAMILIES.items():
        pipe, kwargs = build()
        with torch.no_grad(), P.count_calls(P.layers(pipe.transformer)) as counts:
            base = run(pipe, kwargs, FAMILY_STEPS)
        out[name] = (pipe, kwargs, base, dict(counts))
    return out


def family_generation(pipe, kwargs, a):
    from families import run

    with torch.no_grad(), P.count_calls(a.blocks) as counts, a.generation():
        latents = run(pipe, kwargs, FAMILY_STEPS)
    return latents, dict(counts)


@pytest.mark.parametrize("method", list(FAMILY_SKIPPING))
@pytest.mark.parametrize("family", ["pixart_sigma", "pixart_alpha", "sd3", "sd35", "flux", "flux_true_cfg", "wan", "qwen_image"])
def test_each_diffusers_peer_acts_on_each_family_and_detaches_exactly(family_runs, family, method):
    """Attached through diffusers' own hook functions (`apply_*`: PixArt and SD3 have no CacheMixin), the peer skips the
    calls it caches and changes the output; detached, the stock pipeline's latents and calls come back exactly."""
    from families import run

    pipe, kwargs, base, full = family_runs[family]
    t = pipe.transformer
    calibrate = lambda: run(pipe, kwargs, FAMILY_STEPS, seed=SEED_OFFSET)  # noqa: E731
    if (family, method) in REFUSED:
        with pytest.raises(DqarError, match="context_pre_only") as err:
            P.attach(FAMILY_SKIPPING[method], t, FAMILY_STEPS, calibrate=calibrate)
        assert "\n" not in str(err.value) and not getattr(getattr(t, "_diffusers_hook", None), "hooks", None)  # no hook applied
        return
    a = P.attach(FAMILY_SKIPPING[method], t, FAMILY_STEPS, calibrate=calibrate)
    try:
        latents, counts = family_generation(pipe, kwargs, a)
        skipped = SKIPS.get(method, set(P.COUNTED))
        assert all(counts[k] < full[k] for k in skipped) and all(counts[k] == full[k] for k in set(P.COUNTED) - skipped), counts
        assert not torch.equal(latents, base)
        again, counts_again = family_generation(pipe, kwargs, a)  # state reset per generation
        assert torch.equal(again, latents) and counts_again == counts
    finally:
        a.detach()
    with torch.no_grad(), P.count_calls(P.layers(t)) as after_counts:
        after = run(pipe, kwargs, FAMILY_STEPS)
    assert torch.equal(after, base) and dict(after_counts) == full


@pytest.mark.parametrize("family", ["pixart_sigma", "sd35", "flux_true_cfg", "wan", "qwen_image"])
def test_peers_that_skip_nothing_reproduce_each_family_exactly(family_runs, family):
    """The wiring alone (clock, cache context, hooks) changes no value of the stock pipeline."""
    from families import run

    pipe, kwargs, base, full = family_runs[family]
    for method, peer in NEVER_SKIPPING.items():
        if method == "cache_dit" or (family, method) in REFUSED:
            continue
        a = P.attach(peer, pipe.transformer, FAMILY_STEPS, calibrate=lambda: run(pipe, kwargs, FAMILY_STEPS, seed=SEED_OFFSET))
        try:
            latents, counts = family_generation(pipe, kwargs, a)
        finally:
            a.detach()
        assert torch.equal(latents, base) and counts == full, method
