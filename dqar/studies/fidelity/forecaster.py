"""Which forecaster `full_dqar` carries: its static plan under each `forecast_kind`, on both embedded models.

`full_dqar` is one preset for every model, so its forecaster is chosen by one rule over both embedded models
(the DiT, DDIM 50, CFG 4; the Flux, 28 steps, true CFG 4), on probe seeds only: for each kind, the margin of its
paired PSNR over that model's fidelity target (`TARGETS`), and the kind with the largest worst-case margin wins.
The same plan (FLOPs skipped) serves every kind, so only the forecast differs. The evaluated seeds then score
each kind as the engine section does (PSNR, class accuracy, FD). Written by `dqar fidelity --section forecaster`
as the "Forecaster of full_dqar" section of docs/FIDELITY.md.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch

from dqar.engine.config import preset
from dqar.engine.forecasters import FORECAST_KINDS
from dqar.errors import DqarError
from dqar.models import SAMPLE_DEFAULTS
from dqar.studies.fidelity.engine import EngineSettings, run_engine
from dqar.studies.fidelity.sections import machine_description, today

SECTION = "Forecaster of full_dqar"
MODELS = ("embedded", "embedded-flux")
# Each model's PSNR target for full_dqar: the DiT's "≥ 60% of FLOPs skipped at ≥ 40 dB" (docs/FIDELITY.md "Forecast"),
# the Flux's "≥ 55% at ≥ 35 dB" (docs/FIDELITY.md "Forecast (embedded-flux)").
TARGETS = {"embedded": 40.0, "embedded-flux": 35.0}
PROBE_SEED = 1000  # probe seeds: other noise than the evaluated seeds (0 …)


@dataclass(frozen=True)
class ForecasterSettings:
    samples_per_class: int = 10  # evaluated: 100 images
    probe_per_class: int = 2  # probe: 20 images
    out_dir: str = "docs"
    machine: str = ""

    def __post_init__(self) -> None:
        if self.samples_per_class < 1 or self.probe_per_class < 1:
            raise DqarError("the forecaster study needs at least one evaluated and one probe sample per class",
                            "use --samples >= 10 --probe-samples >= 10")


def _cases():
    base = preset("full_dqar")
    return [("forecaster", kind, replace(base, forecast_kind=kind)) for kind in FORECAST_KINDS]


def _scores(model: str, per_class: int, seed: int, progress: bool) -> tuple[dict[str, dict], str]:
    """Each kind's engine row (and the baseline's) on `model`, and how it sampled, in words."""
    sample = {"steps": 50, "cfg": 4.0, **SAMPLE_DEFAULTS.get(model, {})}
    result = run_engine(EngineSettings(samples_per_class=per_class, seed=seed, model=None if model == "embedded" else model, **sample),
                        progress=progress, cases=_cases())
    return {r["name"]: r for r in result["rows"]}, result["sampling"]


def choose(probe: dict[str, dict[str, dict]]) -> tuple[str, dict[str, float]]:
    """The kind with the largest worst-case margin (probe PSNR − target) over the models; returns it and every margin."""
    worst = {k: min(probe[m][k]["psnr_db"] - TARGETS[m] for m in probe) for k in FORECAST_KINDS}
    return max(worst, key=worst.get), worst


def run_forecaster(settings: ForecasterSettings = ForecasterSettings(), progress: bool = True) -> dict:
    """Probe, choose, then score every kind on the evaluated seeds of both models; a JSON-ready dict."""
    start = time.perf_counter()
    probe = {m: _scores(m, settings.probe_per_class, PROBE_SEED, progress)[0] for m in MODELS}
    runs = {m: _scores(m, settings.samples_per_class, 0, progress) for m in MODELS}
    chosen, worst = choose(probe)
    return {"settings": asdict(settings), "targets": TARGETS, "probe": probe, "evaluated": {m: r[0] for m, r in runs.items()},
            "sampling": {m: r[1] for m, r in runs.items()}, "chosen": chosen,
            "worst_margin": worst, "shipped": preset("full_dqar").forecast_kind, "date": today(),
            "machine": settings.machine or machine_description(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "seconds": time.perf_counter() - start}


def markdown(result: dict) -> str:
    """The section: what ran, one table, and the verdict computed from it."""
    s, ev, pr = result["settings"], result["evaluated"], result["probe"]
    n_ev, n_pr = 10 * s["samples_per_class"], 10 * s["probe_per_class"]
    sampling = "; ".join(f"{m}: {result['sampling'][m]}" for m in MODELS)
    lines = [f"## {SECTION}", "",
             f"`full_dqar`'s static plan under each `forecast_kind`, on both embedded models ({sampling}). "
             f"The kind is chosen on {n_pr} probe samples (seeds from {PROBE_SEED}) by the largest worst-case margin of paired PSNR over each "
             f"model's target ({', '.join(f'{m} {t:.0f} dB' for m, t in result['targets'].items())}); {n_ev} evaluated samples (seeds from 0) "
             f"then score every kind. Regenerate: `dqar fidelity --section forecaster`. Run {result['date']} on a {result['machine']} "
             f"(torch threads: {result['threads']}), {result['seconds'] / 60:.1f} min.", "",
             f"| forecast_kind | FLOPs skipped % ({' / '.join(MODELS)}) | " + " | ".join(f"{m} probe dB | {m} dB | {m} class acc % | {m} FD" for m in MODELS)
             + " | worst margin (probe) dB |",
             "|---|---|" + "---|---|---|---|" * len(MODELS) + "---|"]
    for k in FORECAST_KINDS:
        cells = [f"{pr[m][k]['psnr_db']:.2f} | {ev[m][k]['psnr_db']:.2f} | {100 * ev[m][k]['class_accuracy']:.1f} | {ev[m][k]['fd']:.2f}"
                 for m in MODELS]
        mark = " **(chosen)**" if k == result["chosen"] else ""
        share = "/".join(f"{100 * ev[m][k]['flops_skipped']:.1f}" for m in MODELS)
        lines.append(f"| {k}{mark} | {share} | " + " | ".join(cells) + f" | {result['worst_margin'][k]:+.2f} |")
    lines += ["", *verdicts(result)]
    return "\n".join(lines) + "\n"


def verdicts(result: dict) -> list[str]:
    """Sentences computed from the numbers."""
    ev, chosen, shipped = result["evaluated"], result["chosen"], result["shipped"]
    out = [f"- Chosen on the probe seeds: `{chosen}` (worst-case margin {result['worst_margin'][chosen]:+.2f} dB); "
           f"the shipped `full_dqar` carries `{shipped}`" + (" — the same." if chosen == shipped else " — they differ: the preset is stale.")]
    for m in MODELS:
        best = max(FORECAST_KINDS, key=lambda k: ev[m][k]["psnr_db"])
        met = ev[m][chosen]["psnr_db"] >= result["targets"][m]
        where = ("it is also the best kind there" if best == chosen else
                 f"the best kind there is `{best}` ({ev[m][best]['psnr_db'] - ev[m][chosen]['psnr_db']:+.2f} dB against the chosen one)")
        out.append(f"- {m}: `{chosen}` {ev[m][chosen]['psnr_db']:.2f} dB on the evaluated seeds, target {result['targets'][m]:.0f} dB "
                   f"{'met' if met else 'missed'}; {where}.")
    return out


def write_forecaster(result: dict, out_dir: str) -> str:
    from pathlib import Path

    from dqar.io import atomic_write_json
    from dqar.reporting.documents import write_section

    out = Path(out_dir)
    atomic_write_json(out / "fidelity_forecaster.json", result)
    return str(write_section(out / "FIDELITY.md", SECTION, markdown(result)))
