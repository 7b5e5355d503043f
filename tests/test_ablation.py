"""dqar ablate: grid parsing, artifacts, report numbers == JSON, resume after an interrupt, claims consistent with tables."""
import copy
import json
import re
import statistics

import numpy as np
import pytest
import torch

from dqar.studies.ablation import grid as G
from dqar.reporting import findings as F
from dqar.reporting import report as R
from dqar.studies.ablation.runner import REPORT_FILE, RESULTS_FILE, AblationOptions, Evaluator, run_ablation
from dqar.cli import main as cli_main
from dqar.embedded.classifier import FashionCNN
from dqar.errors import DqarError
from dqar.models import load_model, save_pipeline_folder

from conftest import make_tiny_transformer, make_tiny_vae

SMALL_GRID = """
[study]
repeats = 3
main = ["baseline", "scheduling_only", "quant_cache_only", "full_dqar"]
[sample]
steps = 6
[[sweep]]
name = "schedule"
base = "scheduling_only"
vary = { schedule = ["step"] }
[[sweep]]
name = "steps"
base = "quant_cache_only"
vary = { "sample.steps" = [6, 8] }
"""


# ----- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny pixel-space DiT shaped like the embedded one: 28×28×1, 10 classes, 4 layers."""
    t = make_tiny_transformer(num_layers=4, sample_size=28, patch_size=7, in_channels=1, learned_sigma=False, num_classes=10)
    return save_pipeline_folder(tmp_path_factory.mktemp("m") / "tiny", t)


@pytest.fixture(scope="module")
def loaded(model_dir):
    return load_model(model_dir)


@pytest.fixture(scope="module")
def evaluator():
    torch.manual_seed(0)
    clf = FashionCNN().eval()
    with torch.no_grad():
        f = clf.features(torch.rand(64, 1, 28, 28) * 2 - 1).double().numpy()
    return Evaluator(clf, {"mu": f.mean(0), "sigma": np.cov(f, rowvar=False)}, "random test CNN")


@pytest.fixture(scope="module")
def small_grid(tmp_path_factory):
    path = tmp_path_factory.mktemp("g") / "small.toml"
    path.write_text(SMALL_GRID)
    return path


FAST = dict(progress=False, executor="patch", fidelity_samples_per_label=2)  # eager: no compiling in tests


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, loaded, evaluator):
    out = tmp_path_factory.mktemp("quick") / "ablation"
    done = run_ablation(AblationOptions(out=out, quick=True, repeats=3, fidelity_runs=None, **FAST), loaded=loaded, evaluator=evaluator)
    return done


# ----- markdown parsing ----------------------------------------------------------------------------
def parse_tables(md: str) -> list[tuple[list[str], list[list[str]]]]:
    lines, tables, i = md.splitlines(), [], 0
    while i < len(lines) - 1:
        if lines[i].startswith("|") and re.fullmatch(r"\|( ?-{3,} ?\|)+", lines[i + 1].replace(" ", "")):
            head = [c.strip() for c in lines[i].strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            tables.append((head, rows))
        else:
            i += 1
    return tables


def number(cell: str) -> tuple[float, float] | None:
    """(value in JSON units, tolerance) of a table cell, None for '—'."""
    if cell == F.DASH:
        return None
    m = re.fullmatch(r"([+-]?\d+(?:\.(\d+))?)\s*(ms|s|×|%)?", cell)
    assert m, f"unparseable cell {cell!r}"
    value, decimals, unit = float(m.group(1)), len(m.group(2) or ""), m.group(3)
    tol = 0.5 * 10 ** (-decimals) + 1e-9
    scale = {"ms": 1e-3, "%": 1e-2}.get(unit, 1.0)
    return value * scale, tol * scale


JSON_OF = {
    "Time/Sample": lambda r: r["measurements"]["time_per_sample_s"],
    "Speedup": lambda r: r["measurements"]["speedup"],
    "FLOP ceiling": lambda r: r["measurements"]["flops_ceiling"],
    "Noise": lambda r: r["measurements"]["noise"],
    "Images": lambda r: r["fidelity"]["samples"],
    "Reuse %": lambda r: r["reuse"] and r["reuse"]["reuse_fraction"],
    "Attn skipped": lambda r: r["reuse"] and r["reuse"]["attention_skipped_fraction"],
    "FLOPs skipped": lambda r: r["reuse"] and r["reuse"]["flops_skipped_fraction"],
    "Cache (MB)": lambda r: r["reuse"] and r["reuse"]["cache_bytes_peak"] / 2**20,
    "Peak mem (MB)": lambda r: r["measurements"]["peak_memory_bytes"] and r["measurements"]["peak_memory_bytes"] / 2**20,
    "Mem saved": lambda r: r["measurements"]["memory_reduction"],
    "Host syncs": lambda r: r["reuse"] and r["reuse"]["host_syncs"],
    "PSNR (dB)": lambda r: r["fidelity"]["psnr_db"],
    "SSIM": lambda r: r["fidelity"]["ssim"],
    "Max abs": lambda r: r["fidelity"]["max_abs"],
    "Class acc": lambda r: r["fidelity"]["class_accuracy"],
    "FD": lambda r: r["fidelity"]["fd"],
    "ΔFD": lambda r: r["fidelity"]["fd_delta"],
}


def interval(cell: str) -> tuple[float, float] | None:
    """(low, high) of an interval cell "[a, b]", None for '—'."""
    if cell == F.DASH:
        return None
    m = re.fullmatch(r"\[([+-]?\d+\.\d+), ([+-]?\d+\.\d+)\]", cell)
    assert m, f"unparseable interval {cell!r}"
    return float(m.group(1)), float(m.group(2))


INTERVAL_OF = {  # interval column -> (JSON path, scale of the cell)
    "95% CI": (("measurements", "speedup_sim_ci"), 1.0),
    "Acc 95% CI": (("fidelity", "class_accuracy_ci"), 100.0),
    "ΔFD 95% CI": (("fidelity", "fd_delta_ci"), 1.0),
}


def config_rows(md: str) -> dict[str, dict[str, str]]:
    """Every table row naming a configuration: name -> {header: cell}."""
    out = {}
    for head, rows in parse_tables(md):
        if head[0] not in ("Configuration", "Baseline"):
            continue
        for row in rows:
            out[row[0].strip("`")] = dict(zip(head, row))
    return out


def assert_claims_match_tables(md: str) -> None:
    """Re-derive the summary's claims from the report's own (rounded) tables and check the prose agrees.

    Speed claims rest on the intervals in the 95% CI column: "fastest" / "recommended" need intervals that
    separate; a claim must hold with a tolerance of the displayed precision ("loose"), and a claim's absence
    must not be contradicted by a row that clearly qualifies ("strict").
    """
    rows = config_rows(md)
    val = lambda name, col: number(rows[name][col])[0] if number(rows[name][col]) else None  # noqa: E731
    ci = lambda name: interval(rows[name]["95% CI"])  # noqa: E731
    cands = [n for n, r in rows.items() if r.get("Reuse %", F.DASH) != F.DASH and "same configuration" not in r["Notes"]]
    flagged = {n for n in cands if "implausible" in rows[n]["Notes"]}
    plausible = [n for n in cands if n not in flagged]
    base_acc = {n: val(n, "Class acc") for n, r in rows.items() if "reference baseline" in r["Notes"] and "Class acc" in r}
    m = re.search(r"\*\*Fidelity run\*\*: (\d+) images", md)
    need = int(m.group(1))

    def verified(n):
        return val(n, "Images") >= need

    def within(n, slack):  # slack > 0: loose, < 0: strict
        if "Acc 95% CI" in rows[n] and interval(rows[n]["Acc 95% CI"]) is not None:
            base = base_acc[rows[n].get("Baseline", "`baseline`").strip("`")]
            drop = 100 * base - interval(rows[n]["Acc 95% CI"])[1]
            if drop > F.ACC_DROP_BOUND + 10 * slack:
                return False
        return val(n, "PSNR (dB)") >= F.PSNR_BOUND_DB - slack

    def meets(n, slack):
        fd = interval(rows[n]["ΔFD 95% CI"]) if "ΔFD 95% CI" in rows[n] else None
        if "ΔFD 95% CI" in rows[n] or "Class acc" in rows[n]:  # a classifier: the quality side needs a measured ΔFD
            quality = fd is not None and fd[1] <= F.TARGET_FD_LOSS + slack
        else:
            quality = within(n, slack)
        mem = val(n, "Mem saved")
        fast = ci(n) is not None and ci(n)[0] >= F.TARGET_SPEEDUP - slack
        return (fast or (mem is not None and mem >= F.TARGET_MEMORY - slack / 10)) and quality and verified(n)

    def noise(n):
        return val(n, "Noise") or 0.0

    def above(a, b, slack):  # a's interval above b's by more than the noise
        return ci(a) is not None and ci(b) is not None and ci(a)[0] > ci(b)[1] * (1 + max(noise(a), noise(b))) - slack

    loose, strict = 0.0051, -0.0051
    summary = dict((r[0], r[1]) for head, rs in parse_tables(md) if head == ["Metric", "Value"] for r in rs)
    target_row = next(v for k, v in summary.items() if k.startswith("**Target Met**"))
    assert target_row in ("✅ Yes", "❌ No")
    met = target_row == "✅ Yes"
    assert ("Target met" in md) == met and ("Target missed" in md) == (not met)
    if met:
        assert any(meets(n, loose) for n in plausible)
    else:
        assert not any(meets(n, strict) for n in plausible)

    def check_leaders(cell, names, sure):
        """`names`: the rows the cell may name (loosely qualifying); `sure`: those that surely qualify."""
        if not sure:
            assert cell == F.DASH or not names or re.findall(r"`([^`]+)`", cell)[0] in names
            return
        top = max(val(n, "Speedup") for n in sure)
        listed = re.findall(r"`([^`]+)`", cell)
        assert listed and listed[0] in names and val(listed[0], "Speedup") >= top - 0.0051
        if cell.startswith("not distinguishable"):
            assert any(not above(listed[0], n, strict) for n in names if n != listed[0])  # something overlaps the top
        else:
            assert all(above(listed[0], n, loose) for n in sure if n != listed[0])

    check_leaders(summary["**Fastest**"], plausible, plausible)
    bound = next(v for k, v in summary.items() if k.startswith("**Fastest within fidelity bound**"))
    check_leaders(bound, [n for n in plausible if within(n, loose)], [n for n in plausible if within(n, strict)])
    fastest = [n for n in rows if re.search(r"(^|; )fastest($|;)", rows[n]["Notes"])]
    assert all(n not in flagged for n in fastest)
    if summary["**Fastest**"].startswith("not distinguishable") or summary["**Fastest**"] == F.DASH:
        assert not fastest
    rec = summary["**Recommended**"]
    eligible = [n for n in plausible if within(n, strict) and ci(n) is not None and ci(n)[0] > 1.0 + noise(n) + 0.0051 and verified(n)]
    if rec.startswith("`"):
        name = rec.strip("`")
        assert name not in flagged and within(name, loose) and ci(name)[0] > 1.0 + noise(name) - 0.0051 and verified(name)
        assert f"Use `{name}`" in md
        assert not any(above(n, name, strict) for n in eligible)  # nothing eligible is distinguishably faster
    else:
        assert not eligible
    flag_cell = summary["**Flagged implausible** (above the FLOP ceiling)"]
    assert set(re.findall(r"`([^`]+)`", flag_cell)) == flagged


# ----- grid ---------------------------------------------------------------------------------------
def test_shipped_grids_parse_and_every_step_count_has_its_own_baseline():
    assert G.builtin_grid(True) == G.builtin_grid("quick") and G.builtin_grid(False) == G.builtin_grid("default")
    for name in G.GRIDS:
        study = G.load_grid(G.builtin_grid(name))
        entries = G.expand(study)
        assert study.repeats >= 3 and [e.name for e in entries[:4]] == list(study.main)
        for e in entries:
            base = G.baseline_of(entries, e)
            assert base.is_baseline and base.run.sample == e.run.sample
        steps = {e.run.sample.steps for e in entries}
        assert len(steps) > 1 or name == "flux_quick"  # the Flux smoke grid keeps one step count
        assert all(any(b.is_baseline and b.run.sample.steps == s for b in entries) for s in steps)


@pytest.mark.parametrize("text,needle", [
    ("[study]\nrepeat = 3\n", "unknown key 'repeat'"),
    ("[sampel]\nsteps = 3\n", "unknown key 'sampel'"),
    ("[[sweep]]\nname = 'a'\nvary = { warmup_fraction = [0.1] }\n", "unknown field 'warmup_fraction'"),
    ("[[sweep]]\nname = 'a'\nbase = 'fast'\nvary = { warmup_frac = [0.1] }\n", "unknown preset 'fast'"),
    ("[[sweep]]\nname = 'a'\nvary = { warmup_frac = [0.1] }\nextra = 1\n", "unknown key 'extra'"),
    ("[[sweep]]\nname = 'a'\nvary = { warmup_frac = [] }\n", "non-empty list"),
    ("[[sweep]]\nname = 'a'\nvary = { warmup_frac = [7.0] }\n", "warmup_frac"),
    ("[study]\nrepeats = 1\n", "repeats"),
    ("[study]\nmain = ['full_dqar']\n", "must include 'baseline'"),
    ("[study]\nfidelity_runs = -1\n", "fidelity_runs"),
    ("[study]\nfidelity_runs = true\n", "fidelity_runs"),
    ("[[sweep]]\nname = 'a'\nvary = { warmup_frac = [0.1] }\n[[sweep]]\nname = 'a'\nvary = { warmup_frac = [0.1] }\n", "appears twice"),
])
def test_grid_rejects_unknown_and_invalid_keys(tmp_path, text, needle):
    path = tmp_path / "g.toml"
    path.write_text(text)
    with pytest.raises(DqarError, match=re.escape(needle)):
        G.load_grid(path)


def test_grid_sweeps_any_config_field_with_base_overrides_and_points(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text("""
[sample]
steps = 12
[[sweep]]
name = "exp"
base = { preset = "full_dqar", schedule = "exponential", warmup_frac = 0.3 }
vary = { exp_rate = [1.0, 5.0], "sample.cfg" = [1.0, 4.0] }
points = [{ schedule = "custom", custom_layers = [0, 2] }]
""")
    entries = G.expand(G.load_grid(path))
    sweep = [e for e in entries if e.sweep == "exp"]
    assert len(sweep) == 5 and {e.run.reuse.warmup_frac for e in sweep} == {0.3}
    assert {(e.run.reuse.exp_rate, e.run.sample.cfg) for e in sweep[:4]} == {(1.0, 1.0), (1.0, 4.0), (5.0, 1.0), (5.0, 4.0)}
    assert sweep[4].run.reuse.custom_layers == (0, 2) and sweep[4].name == "exp/schedule=custom,custom_layers=0-2"
    assert any(e.name == "baseline/cfg=1.0" and e.is_baseline for e in entries)  # cfg 1.0 needs its own baseline
    assert len({e.name for e in entries}) == len(entries)


# ----- the run -------------------------------------------------------------------------------------
def test_quick_run_writes_every_artifact(quick_run):
    out = quick_run.out
    assert not quick_run.interrupted and quick_run.completed == quick_run.total == len(G.expand(G.load_grid(G.builtin_grid(True))))
    for name in (REPORT_FILE, RESULTS_FILE, "comparison.png", "pareto.png", "reuse_heatmap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    data = json.loads((out / RESULTS_FILE).read_text())
    assert data["status"] == "complete" and data["artifacts"] == {"comparison": "comparison.png", "pareto": "pareto.png", "heatmap": "reuse_heatmap.png"}
    for rec in data["records"]:
        folder = out / "images" / rec["slug"]
        assert (folder / "grid.png").is_file()
        assert sorted(p.name for p in folder.glob("sample_*.png")) == [f"sample_{i:03d}_class{i}.png" for i in range(10)]
        assert rec["config_hash"] and rec["config"]["sample"]["seed"] == 42 and rec["environment"]["device"] == "cpu"
        m = rec["measurements"]
        assert len(m["times_s"]) == len(m["baseline_times_s"]) == len(m["wall_times_s"]) == 3 and m["deterministic"]
        assert m["speedup"] == pytest.approx(statistics.median(m["baseline_times_s"]) / statistics.median(m["times_s"]))
        assert (m["executor"], m["executor_note"]) == (("peer", "peers run eagerly through their own packages") if rec["peer"]
                                                       else ("patch", "asked for (--executor patch)"))
        lo, hi = m["speedup_ci"]
        slo, shi = m["speedup_sim_ci"]
        eps = 1e-12
        assert slo <= lo + eps and lo <= m["speedup"] + eps and m["speedup"] <= hi + eps and hi <= shi + eps  # the simultaneous holds the own
        assert m["implausible"] is False and m["comparisons"] == sum(
            1 for r in data["records"] if r.get("same_as") is None and (r["config"]["reuse"]["enabled"] or r["peer"]))
        if rec["reuse"] is not None:
            assert m["flops_ceiling"] == pytest.approx(1 / (1 - rec["reuse"]["flops_skipped_fraction"]))
    # a block's baseline is timed once per round: every configuration of a block shares its baseline's times
    by_block = {}
    for rec in (r for r in data["records"] if r.get("same_as") is None):
        key = (rec["measurements"]["block"], json.dumps(rec["config"]["sample"], sort_keys=True))
        by_block.setdefault(key, set()).add(tuple(rec["measurements"]["baseline_times_s"]))
    assert all(len(times) == 1 for times in by_block.values()) and len(by_block) >= 4
    assert data["study"]["clock"] == "thread_time" and data["study"]["fidelity_samples"] == 20
    full = next(r for r in data["records"] if r["name"] == "scheduling_only")
    assert full["reuse"]["reuse_fraction"] > 0 and full["fidelity"]["psnr_db"] < 100 and full["fidelity"]["class_accuracy"] is not None
    assert full["fidelity"]["samples"] == 20 and full["fidelity"]["fd"] is None  # the fidelity run; 20 images are too few for FD
    lo, hi = full["fidelity"]["class_accuracy_ci"]
    assert lo <= full["fidelity"]["class_accuracy"] <= hi
    sweep = next(r for r in data["records"] if r["name"] == "schedule/schedule=step")
    assert sweep["fidelity"]["samples"] == 10  # not a claim candidate: the timing batch only
    base = next(r for r in data["records"] if r["name"] == "baseline")
    assert base["fidelity"]["identical"] and base["measurements"]["speedup"] == 1.0 and base["fidelity"]["samples"] == 20


def test_report_numbers_equal_the_json(quick_run):
    data = json.loads((quick_run.out / RESULTS_FILE).read_text())
    md = (quick_run.out / REPORT_FILE).read_text()
    by_name = {r["name"]: r for r in data["records"]}
    rows = config_rows(md)
    assert set(by_name) <= set(rows)
    checked = 0
    for name, cells in rows.items():
        rec = by_name[name]
        for header, cell in cells.items():
            if header not in JSON_OF:
                continue
            parsed, expected = number(cell), JSON_OF[header](rec)
            if parsed is None:
                assert expected is None, (name, header)
                continue
            assert abs(parsed[0] - expected) <= parsed[1], (name, header, cell, expected)
            checked += 1
        for header, ((a, b), scale) in INTERVAL_OF.items():
            if header in cells:
                shown, expected = interval(cells[header]), rec[a][b]
                assert (shown is None) == (expected is None), (name, header)
                if shown is not None:
                    assert all(abs(x - scale * y) <= 0.0051 * scale for x, y in zip(shown, expected)), (name, header)
                    checked += 1
    assert checked > 100
    assert "fewer than 3: a test run" not in md


def test_report_claims_agree_with_its_tables(quick_run):
    assert_claims_match_tables((quick_run.out / REPORT_FILE).read_text())


def _doctor(data: dict, speedups: dict[str, float], psnrs: dict[str, float] | None = None, fd: dict[str, float] | None = None,
            width: float = 0.02, flagged: tuple = ()) -> dict:
    """The results with chosen speedups (intervals ±width), PSNRs and ΔFDs; every record with a fidelity run, no accuracy drop."""
    d = copy.deepcopy(data)
    base = next(b for b in d["records"] if b["name"] == "baseline")
    base["fidelity"].update(fd=10.0, fd_delta=0.0, fd_delta_ci=[0.0, 0.0])
    for r in d["records"]:
        src = r.get("same_as") or r["name"]
        m, f = r["measurements"], r["fidelity"]
        f["samples"] = d["study"]["fidelity_samples"]
        if r["config"]["reuse"]["enabled"]:
            x = speedups.get(src, 1.05)
            m.update(speedup=x, speedup_ci=[x - width / 2, x + width / 2], speedup_sim_ci=[x - width, x + width],
                     implausible=src in flagged, memory_reduction=-0.01, noise=0.01)
            delta = (fd or {}).get(src, 0.2)
            f.update(psnr_db=(psnrs or {}).get(src, 40.0), fd=10.0 + delta, fd_delta=delta, fd_delta_ci=[delta - 0.1, delta + 0.1],
                     accuracy_drop_points=0.0, class_accuracy=base["fidelity"]["class_accuracy"],
                     class_accuracy_ci=base["fidelity"]["class_accuracy_ci"])
    return d


def test_doctored_results_flip_the_verdict_both_ways(quick_run):
    data = json.loads((quick_run.out / RESULTS_FILE).read_text())
    missed = R.render(_doctor(data, {"full_dqar": 1.2}))
    assert "❌ **Target missed**" in missed and "| ❌ No |" in missed and "✅" not in missed
    assert "`full_dqar` at 1.20×, its interval's lower end 1.18× (needs ≥ 1.25×)" in missed
    assert_claims_match_tables(missed)

    met = R.render(_doctor(data, {"quant_cache_only": 1.4}))
    assert "✅ **Target met**" in met and "| ✅ Yes |" in met and "Target missed" not in met
    assert "highest speedup of them: `quant_cache_only`" in met and "Use `quant_cache_only`" in met
    assert_claims_match_tables(met)

    too_lossy = R.render(_doctor(data, {"quant_cache_only": 1.4}, fd={"quant_cache_only": 3.0}))
    assert "Target missed" in too_lossy and "| ❌ No |" in too_lossy
    assert_claims_match_tables(too_lossy)

    unsure = R.render(_doctor(data, {"quant_cache_only": 1.4}, fd={"quant_cache_only": 0.95}))  # ΔFD interval reaches 1.05
    assert "Target missed" in unsure and "| ❌ No |" in unsure
    assert_claims_match_tables(unsure)

    blurry = R.render(_doctor(data, {"quant_cache_only": 1.4}, psnrs={"quant_cache_only": 20.0}))
    assert "Use `quant_cache_only`" not in blurry and "outside the fidelity bound" in blurry
    assert_claims_match_tables(blurry)

    slower = R.render(_doctor(data, {name: 0.9 for name in [r["name"] for r in data["records"]]}))
    assert "| **Recommended** | baseline (no reuse) |" in slower and "keep reuse off" in slower
    assert_claims_match_tables(slower)


def test_overlapping_intervals_are_not_ranked_and_implausible_records_are_never_picked(quick_run):
    data = json.loads((quick_run.out / RESULTS_FILE).read_text())
    tied = R.render(_doctor(data, {"quant_cache_only": 1.28, "scheduling_only": 1.30}, psnrs={"scheduling_only": 45.0}, width=0.05))
    assert "| **Fastest** | not distinguishable on this machine: `scheduling_only` (1.30×), `quant_cache_only` (1.28×)" in tied
    sched, quant = (next(r for r in data["records"] if r["name"] == n)["reuse"]["flops_skipped_fraction"] for n in ("scheduling_only", "quant_cache_only"))
    assert quant > sched and "Use `quant_cache_only`" in tied  # tied in speed: the one skipping more FLOPs, not the higher PSNR
    assert "of the 2 configurations within the fidelity bound" in tied and "the one that skips the most FLOPs" in tied
    assert not re.search(r"; fastest|\| fastest", tied)
    assert_claims_match_tables(tied)

    apart = R.render(_doctor(data, {"quant_cache_only": 1.40, "scheduling_only": 1.20}))
    assert "| **Fastest** | 1.40× [1.38, 1.42] (`quant_cache_only`) |" in apart and "Use `quant_cache_only`" in apart
    assert_claims_match_tables(apart)

    ceiling = R.render(_doctor(data, {"quant_cache_only": 2.0, "scheduling_only": 1.2}, flagged=("quant_cache_only",)))
    assert "| **Flagged implausible** (above the FLOP ceiling) | `quant_cache_only` |" in ceiling
    assert "Use `scheduling_only`" in ceiling and "Use `quant_cache_only`" not in ceiling
    assert "`quant_cache_only` (2.00×" not in ceiling.split("## Executive Summary")[1].split("\n\n")[1]  # not in the summary table
    assert_claims_match_tables(ceiling)


def _stable(data: dict) -> list[dict]:
    """Records without what legitimately differs between runs (timings, memory, timestamps)."""
    out = []
    for r in data["records"]:
        r = {k: v for k, v in r.items() if k not in ("measurements", "completed")}
        out.append(r)
    return out


def test_interrupted_run_resumes_to_the_same_results(tmp_path, model_dir, loaded, evaluator, small_grid):
    opts = AblationOptions(out=tmp_path / "a", config=str(small_grid), repeats=2, progress=False, executor="patch",
                           fidelity_samples_per_label=1)
    seen = []

    def interrupt_after_three(rec):
        seen.append(rec["name"])
        if len(seen) == 3:
            raise KeyboardInterrupt

    first = run_ablation(opts, loaded=loaded, evaluator=evaluator, on_record=interrupt_after_three)
    assert first.interrupted and first.completed == 3 < first.total
    partial = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())
    assert partial["status"] == "partial" and len(partial["records"]) == 3
    md = (tmp_path / "a" / REPORT_FILE).read_text()
    assert "This report is partial: 3 of" in md and config_rows(md).keys() >= set(seen)

    with pytest.raises(DqarError, match="--resume"):
        run_ablation(opts, loaded=loaded, evaluator=evaluator)

    other = load_model(model_dir)
    with torch.no_grad():
        next(other.transformer.parameters()).add_(1.0)
    with pytest.raises(DqarError, match="model_fingerprint"):  # other weights: never mixed into one study
        run_ablation(AblationOptions(**{**opts.__dict__, "resume": True}), loaded=other, evaluator=evaluator)

    second = run_ablation(AblationOptions(**{**opts.__dict__, "resume": True}), loaded=loaded, evaluator=evaluator)
    assert not second.interrupted and second.ran == second.total - 3
    resumed = json.loads((tmp_path / "a" / RESULTS_FILE).read_text())

    run_ablation(AblationOptions(**{**opts.__dict__, "out": tmp_path / "b"}), loaded=loaded, evaluator=evaluator)
    straight = json.loads((tmp_path / "b" / RESULTS_FILE).read_text())
    assert resumed["status"] == straight["status"] == "complete"
    assert _stable(resumed) == _stable(straight)
    a, b = ((tmp_path / d / REPORT_FILE).read_text() for d in ("a", "b"))
    assert [line for line in a.splitlines() if "PSNR (dB)" in line] == [line for line in b.splitlines() if "PSNR (dB)" in line]
    # same sections and rows; sentences that depend on timing noise (which rows tie) may differ
    headings = lambda md: [line for line in md.splitlines() if line.startswith("#")]  # noqa: E731
    assert headings(a) == headings(b) and config_rows(a).keys() == config_rows(b).keys()


def test_cli_ablate_stops_with_one_line_and_resumes(tmp_path, model_dir, small_grid, capsys):
    out = tmp_path / "cli"
    args = ["ablate", "--model", str(model_dir), "--out", str(out), "--config", str(small_grid), "--repeats", "1", "--quiet",
            "--executor", "patch"]
    assert cli_main(args + ["--stop-after", "2"]) == 130  # stops after the block in which the second configuration completed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted after 4 of" in err[0] and "--resume" in err[0]
    assert cli_main(args) == 2 and "--resume" in capsys.readouterr().err
    assert cli_main(args + ["--resume"]) == 0
    data = json.loads((out / RESULTS_FILE).read_text())
    assert data["status"] == "complete" and data["study"]["classifier"] is None
    md = (out / REPORT_FILE).read_text()
    assert "Class acc" not in md and "no classifier" in md
    assert "fewer than 3: a test run" in md  # the report says when repeats were cut for a test
    assert_claims_match_tables(md)


def test_cli_default_repeats_are_at_least_three(tmp_path):
    grid = tmp_path / "g.toml"
    grid.write_text("[study]\nrepeats = 2\n")
    assert cli_main(["ablate", "--config", str(grid), "--out", str(tmp_path / "o")]) == 2


def test_claims_agree_with_tables_on_random_doctored_results(quick_run):
    """Boundary values (1.25×, 30 dB, ΔFD 1, 20% memory, intervals touching 1 and each other) and random ones:
    prose never contradicts the tables."""
    import random

    data = json.loads((quick_run.out / RESULTS_FILE).read_text())
    rng = random.Random(0)
    for _ in range(60):
        d = copy.deepcopy(data)
        measured = {}
        for r in d["records"]:
            if r["config"]["reuse"]["enabled"] and r.get("same_as") is None:
                m, f = r["measurements"], r["fidelity"]
                x = rng.choice([rng.uniform(0.7, 1.6), 1.25, 1.2499, 1.2501, 1.0, 0.9999, 1.0049])
                lo, hi = x - rng.choice([0.0, 0.01, rng.uniform(0, 0.3)]), x + rng.choice([0.0, 0.01, rng.uniform(0, 0.3)])
                m.update(speedup=x, speedup_ci=[lo, hi], speedup_sim_ci=[lo - 0.01, hi + 0.01], implausible=rng.random() < 0.15,
                         noise=rng.choice([0.0, 0.02, rng.uniform(0, 0.3)]))
                m["memory_reduction"] = rng.choice([rng.uniform(-0.1, 0.3), 0.2, 0.19999, -0.0001])
                f["psnr_db"] = rng.choice([rng.uniform(20, 60), 30.0, 29.999, 30.004, 100.0])
                f["samples"] = rng.choice([f["samples"], d["study"]["fidelity_samples"]])
                f["accuracy_drop_points"] = rng.choice([0.0, 10.0, -10.0])
                base = next(b for b in d["records"] if b["name"] == r["baseline"])
                f["class_accuracy"] = base["fidelity"]["class_accuracy"] - f["accuracy_drop_points"] / 100
                n = f["samples"]
                f["class_accuracy_ci"] = [max(0.0, f["class_accuracy"] - rng.uniform(0, 3) / n), min(1.0, f["class_accuracy"] + rng.uniform(0, 3) / n)]
                measured[r["name"]] = r
        for r in d["records"]:
            if r.get("same_as"):
                r["measurements"], r["fidelity"] = measured[r["same_as"]]["measurements"], measured[r["same_as"]]["fidelity"]
        assert_claims_match_tables(R.render(d))


def test_latent_imagenet_shaped_model_uses_the_seed_labels(tmp_path):
    """A 1000-class latent DiT with a VAE: the seed report's eight classes (named), RGB images, no classifier."""
    folder = save_pipeline_folder(tmp_path / "latent", make_tiny_transformer(num_layers=4), make_tiny_vae())
    grid = tmp_path / "main.toml"
    grid.write_text("[sample]\nsteps = 4\n")
    done = run_ablation(AblationOptions(model=str(folder), out=tmp_path / "o", config=str(grid), repeats=1, progress=False))
    data = done.results
    assert data["study"]["labels"] == [207, 360, 387, 974, 88, 417, 279, 928]
    assert data["study"]["class_names"]["207"] == "golden retriever" and data["study"]["classifier"] is None
    md = (tmp_path / "o" / REPORT_FILE).read_text()
    assert "207 (golden retriever)" in md and "Class acc" not in md
    assert sorted(p.name for p in (tmp_path / "o" / "images" / "baseline").glob("sample_*"))[0] == "sample_000_class207.png"
    assert_claims_match_tables(md)


# ----- injected clocks -----------------------------------------------------------------------------
class FakeClock:
    """A clock that runs the generation and reports `seconds(generation)` times noise in [1 - noise, 1 + noise]."""

    name, description = "fake", "an injected test clock"

    def __init__(self, seconds, noise: float, seed: int = 0):
        self.seconds, self.noise, self.rng = seconds, noise, np.random.default_rng(seed)

    def measure(self, fn):
        from dqar.studies.measure.timing import Timing

        out = fn()
        t = self.seconds(out) * self.rng.uniform(1 - self.noise, 1 + self.noise)
        return out, Timing(t, t)


def skipped(gen) -> float:
    return gen.stats.flops_skipped_fraction if gen.stats is not None else 0.0


def _clocked(tmp_path, loaded, evaluator, small_grid, clock, repeats=5):
    run_ablation(AblationOptions(out=tmp_path / "o", config=str(small_grid), repeats=repeats, **FAST),
                 loaded=loaded, evaluator=evaluator, clock=clock)
    return (tmp_path / "o" / REPORT_FILE).read_text(), json.loads((tmp_path / "o" / RESULTS_FILE).read_text())


def test_thirty_percent_clock_noise_claims_no_difference(tmp_path, loaded, evaluator, small_grid):
    """Every configuration takes the same time, measured with ±30% noise: nothing is faster, fastest or recommended."""
    md, data = _clocked(tmp_path, loaded, evaluator, small_grid, FakeClock(lambda gen: 1.0, 0.3))
    assert "| **Fastest** | not distinguishable on this machine:" in md
    assert "| **Recommended** | baseline (no reuse) |" in md and "Use `" not in md and "| ❌ No |" in md
    assert "faster than the baseline;" not in md and "slower than the baseline;" not in md
    assert "not distinguishable from the baseline on this machine" in md
    assert not any(re.search(r"(^|; )fastest($|;)", row["Notes"]) for row in config_rows(md).values())
    assert any(abs(r["measurements"]["speedup"] - 1) > 0.05 for r in data["records"])  # the noise did move the point estimates
    assert_claims_match_tables(md)


def test_a_speedup_above_its_flop_ceiling_is_flagged_and_never_recommended(tmp_path, loaded, evaluator, small_grid):
    """Reuse runs reported at a fifth of the baseline's time, whatever they skip: every one is above its ceiling."""
    md, data = _clocked(tmp_path, loaded, evaluator, small_grid, FakeClock(lambda gen: 0.2 if gen.stats and gen.stats.reused else 1.0, 0.01))
    flagged = [r for r in data["records"] if r["measurements"]["implausible"] and r.get("same_as") is None]
    reusing = [r for r in data["records"] if r["reuse"] and r["reuse"]["reused"] and r.get("same_as") is None]
    assert reusing and {r["name"] for r in flagged} == {r["name"] for r in reusing}
    for r in flagged:
        m = r["measurements"]
        assert m["speedup_ci"][0] > m["flops_ceiling"] * (1 + m["noise"]) and m["flops_ceiling"] < 4.9
    assert "| **Recommended** | baseline (no reuse) |" in md and "| **Fastest** | — |" in md
    cell = next(line for line in md.splitlines() if line.startswith("| **Flagged implausible**"))
    assert all(f"`{r['name']}`" in cell for r in flagged)
    assert all("implausible" in config_rows(md)[r["name"]]["Notes"] for r in flagged)
    assert_claims_match_tables(md)


def test_real_differences_are_claimed(tmp_path, loaded, evaluator, small_grid):
    """Time proportional to the FLOPs computed, ±1% noise: reuse is faster than the baseline, and the report says so."""
    md, data = _clocked(tmp_path, loaded, evaluator, small_grid, FakeClock(lambda gen: 1.0 - skipped(gen), 0.01))
    sched = next(r for r in data["records"] if r["name"] == "quant_cache_only")
    assert sched["measurements"]["speedup_sim_ci"][0] > 1.0 and not sched["measurements"]["implausible"]
    assert "`quant_cache_only` (patch):" in md and "faster than the baseline" in md
    assert_claims_match_tables(md)


def test_auto_times_compiled_where_the_engine_allows_and_says_why_not(tmp_path, loaded):
    """The compiled executor for plans; the gate needs the patch executor: its row says so; timed runs have diagnostics off."""
    grid = tmp_path / "g.toml"
    grid.write_text('[study]\nmain = ["baseline", "quant_cache_only", "gate"]\nfidelity_samples_per_label = 1\n[sample]\nsteps = 3\n')
    done = run_ablation(AblationOptions(out=tmp_path / "o", config=str(grid), repeats=2, progress=False), loaded=loaded, evaluator=None)
    recs = {r["name"]: r for r in done.results["records"]}
    assert recs["baseline"]["measurements"]["executor"] == recs["quant_cache_only"]["measurements"]["executor"] == "compiled"
    gate = recs["gate"]["measurements"]
    assert gate["executor"] == "patch" and "patch" in gate["executor_note"] and gate["speedup_vs_eager"] > 0
    assert recs["quant_cache_only"]["reuse"]["quant_error"] is not None  # from the untimed diagnostics run
    md = (tmp_path / "o" / REPORT_FILE).read_text()
    assert f"  - patch: {gate['executor_note']}: `gate`" in md


def test_graph_preference_tries_the_graph_executor_first(loaded):
    """--executor graph: the graph executor where the engine takes the configuration, the gate still on patch with reasons."""
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.studies.ablation.blocks import choose_executor

    s = SampleConfig(steps=3)
    assert choose_executor(loaded, RunConfig(reuse=preset("quant_cache_only"), sample=s), "graph") == ("graph", None)
    assert choose_executor(loaded, RunConfig(reuse=preset("quant_cache_only"), sample=s), "auto") == ("compiled", None)
    executor, why = choose_executor(loaded, RunConfig(reuse=preset("gate"), sample=s), "graph")
    assert executor == "patch" and why.count("patch") >= 2  # both compiled executors gave their reason
    assert choose_executor(loaded, RunConfig(reuse=preset("gate"), sample=s), "patch") == ("patch", "asked for (--executor patch)")


def test_auto_preference_is_the_graph_executor_on_cuda(loaded, monkeypatch):
    """--executor auto on CUDA (the device check patched): graph first; the gate still falls back with reasons."""
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.studies.ablation import blocks

    monkeypatch.setattr(blocks, "on_cuda", lambda transformer: True)
    s = SampleConfig(steps=3)
    assert blocks.choose_executor(loaded, RunConfig(reuse=preset("quant_cache_only"), sample=s), "auto") == ("graph", None)
    assert blocks.choose_executor(loaded, RunConfig(reuse=preset("gate"), sample=s), "auto")[0] == "patch"


def test_quick_ablation_compiles_nothing_on_a_cpu():
    """--quick is a smoke run: on a CPU it times every configuration eagerly unless --executor says otherwise."""
    from argparse import Namespace

    from dqar.cli.studies import ablate_executor

    assert ablate_executor(Namespace(executor=None, quick=True, device="cpu")) == "patch"
    assert ablate_executor(Namespace(executor=None, quick=False, device="cpu")) == "auto"
    assert ablate_executor(Namespace(executor="compiled", quick=True, device="cpu")) == "compiled"


# ----- quick stays quick ------------------------------------------------------------------------------
QUICK_GENERATIONS = 85  # every generate call of `dqar ablate --quick` (warm-ups, diagnostics, timed rounds, peers, fidelity runs)


def test_full_grid_keeps_every_point_and_default_is_a_subset_of_it():
    """--grid full is the whole study (58 configurations, 9 peers); the default grid measures only configurations of it."""
    full, default, quick = (G.expand(G.load_grid(G.builtin_grid(n))) for n in ("full", "default", "quick"))
    assert len(full) == 58 and len({e.config_hash for e in full}) == 49 and sum(e.peer is not None for e in full) == 9
    assert {e.config_hash for e in default} <= {e.config_hash for e in full}
    assert {e.sweep for e in default} == {e.sweep for e in full}  # every sweep stays, with fewer points
    assert {e.peer.method for e in default if e.peer} == {e.peer.method for e in full if e.peer}
    assert len({e.config_hash for e in default}) <= 31 and len(quick) <= 10 and len({e.config_hash for e in quick}) <= 8


def test_quick_run_stays_within_its_generation_budget(tmp_path, loaded, evaluator, monkeypatch):
    """`dqar ablate --quick` as shipped (its grid, repeats, fidelity run and CPU executor): a budget on generations, no
    compiled case, every baseline warmed up once for the whole run (blocks share it), chunk 0 of a fidelity run reused."""
    from argparse import Namespace

    from dqar.cli.studies import ablate_executor
    from dqar.studies.ablation import blocks, verify
    from dqar.studies.peers import rows as peer_rows

    calls, warmed = {"timing": 0, "fidelity": 0}, []
    for module, kind in ((blocks, "timing"), (peer_rows, "timing"), (verify, "fidelity")):
        def counted(*a, _real=module.generate, _kind=kind, **k):
            calls[_kind] += 1
            return _real(*a, **k)
        monkeypatch.setattr(module, "generate", counted)
    real_warm = blocks.warm
    monkeypatch.setattr(blocks, "warm", lambda case, *a: (warmed.append(case.name), real_warm(case, *a))[1])
    executor = ablate_executor(Namespace(executor=None, quick=True, device="cpu"))
    done = run_ablation(AblationOptions(out=tmp_path / "q", quick=True, progress=False, executor=executor), loaded=loaded,
                        evaluator=evaluator)
    data = done.results
    assert done.completed == done.total and data["status"] == "complete" and data["study"]["repeats"] == 3
    assert not any(r["measurements"]["executor"] in blocks.COMPILED for r in data["records"])
    assert len(warmed) == len(set(warmed))  # no case, no baseline, warmed up twice
    chunks = data["study"]["fidelity_samples"] // data["study"]["num_samples"]
    verified = [r for r in data["records"] if r["fidelity"]["samples"] == data["study"]["fidelity_samples"] and r.get("same_as") is None]
    assert len([r for r in verified if r["config"]["reuse"]["enabled"]]) == data["study"]["fidelity_runs"] == 1
    assert calls["fidelity"] == len(verified) * (chunks - 1)  # chunk 0 of each fidelity run is its warm-up's images
    assert verified[0]["fidelity"]["fd"] is not None  # the fidelity run reaches FD
    assert sum(calls.values()) <= QUICK_GENERATIONS, calls


def test_a_fidelity_run_from_the_warm_up_images_equals_one_generated_whole(loaded):
    from dqar.engine.config import RunConfig, SampleConfig, preset
    from dqar.generate import generate
    from dqar.studies.ablation import fidelity as AF

    run = RunConfig(reuse=preset("full_dqar"), sample=SampleConfig(steps=4))
    make = lambda r: generate(loaded, [0, 1, 2], r, executor="patch")  # noqa: E731
    whole = AF.images_of(make, run, 3, 3)
    assert torch.equal(AF.images_of(make, run, 3, 3, first=make(run).output.images), whole)


def test_cli_grid_choice_and_conflicts(tmp_path, small_grid, capsys):
    out = str(tmp_path / "o")
    assert cli_main(["ablate", "--grid", "full", "--config", str(small_grid), "--out", out]) == 2
    assert "--config and --grid" in capsys.readouterr().err
    assert cli_main(["ablate", "--quick", "--grid", "full", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--quick" in err[0]
    with pytest.raises(SystemExit):
        cli_main(["ablate", "--grid", "huge", "--out", out])
    with pytest.raises(DqarError, match="unknown grid"):
        AblationOptions(grid="huge")
