"""The engine's fidelity table on an embedded model: presets, refresh intervals, cache formats, granularity.

Every configuration samples the same labels and noise as the no-reuse baseline; PSNR/SSIM
are paired against it, class accuracy and FD use the embedded classifier. The INT8 rows
share one plan with the model-dtype row above them, so their difference is the cache alone.
A configuration the model's family cannot run (the gate on Flux) is a row with the engine's
refusal, checked as `dqar.enable` checks it. Written by `dqar fidelity --section engine` as the
"Engine" section of docs/FIDELITY.md (the DiT) or "Engine (<model>)" (`--model embedded-flux`).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from dqar.engine.config import QUANT_MODES, PRESETS, ReuseConfig, RunConfig, SampleConfig, preset
from dqar.errors import DqarError
from dqar.studies.core import Study, baseline_row, embedded_evaluator, make_reference, study_row
from dqar.studies.fidelity.sections import (DEFAULT_MODEL, command, file_stem, machine_description, refusal, run_line,
                                            sampling_words, section_name, today)

SECTION = "Engine"


@dataclass(frozen=True)
class EngineSettings:
    samples_per_class: int = 10
    steps: int = 50
    cfg: float = 4.0
    seed: int = 0
    out_dir: str = "docs"
    model: str | None = None  # None: the embedded DiT
    machine: str = ""  # where it ran, in words ("" = `machine_description()`)

    def __post_init__(self) -> None:
        if self.samples_per_class < 1:
            raise DqarError(f"samples per class = {self.samples_per_class} is invalid", "use 1 or more")
        SampleConfig(steps=self.steps, cfg=self.cfg, seed=self.seed)


def engine_cases() -> list[tuple[str, str, ReuseConfig]]:
    """(group, name, config): presets, refresh intervals 2/3/4 (all layers after 20% warmup), cache formats, granularity."""
    cases = [("preset", name, preset(name)) for name in PRESETS if name != "baseline"]
    for k in (2, 3, 4):
        base = ReuseConfig(schedule="constant", warmup_frac=0.2, layer_frac=1.0, refresh_interval=k, max_staleness=k, cache_dtype="model")
        cases.append(("refresh", f"refresh {k}, model dtype", base))
        for mode in QUANT_MODES if k == 2 else ():  # the cache formats under one shared plan
            cases.append(("refresh", f"refresh {k}, INT8 per {mode}", replace(base, cache_dtype="int8", quant_mode=mode)))
        cases.append(("granularity", f"refresh {k}, block reuse, model dtype", replace(base, granularity="block")))
    return cases


COLUMNS = ("reuse", "flops_skipped", "psnr_db", "ssim", "quant_error", "class_accuracy", "fd")


def run_engine(settings: EngineSettings = EngineSettings(), progress: bool = True,
               cases: list[tuple[str, str, ReuseConfig]] | None = None) -> dict:
    """Generate the baseline and every case (default `engine_cases()`) on the settings' model; returns a JSON-ready dict."""
    from dqar.models import load_model

    loaded = load_model(settings.model)
    labels = [c for c in range(loaded.num_classes) for _ in range(settings.samples_per_class)]
    sample = SampleConfig(steps=settings.steps, cfg=settings.cfg, seed=settings.seed)
    start = time.perf_counter()
    study = Study(loaded, make_reference(loaded, labels, RunConfig(sample=sample), embedded_evaluator(loaded)))
    rows = [baseline_row({"group": "baseline", "name": "baseline (no reuse)"}, COLUMNS, study.reference, self_paired=False)]
    for group, name, cfg in tqdm(engine_cases() if cases is None else cases, desc="engine fidelity", disable=not progress):
        reason = refusal(loaded, cfg)
        if reason:
            rows.append({"group": group, "name": name, "refused": reason, "config": asdict(cfg)})
            continue
        gen, scores = study.measure(RunConfig(reuse=cfg, sample=sample))
        rows.append(study_row({"group": group, "name": name}, COLUMNS, gen.stats, scores, config=asdict(cfg)))
    return {"settings": asdict(settings), "model": loaded.name, "sampling": sampling_words(loaded, settings.steps, settings.cfg),
            "date": today(), "machine": settings.machine or machine_description(), "threads": torch.get_num_threads(),
            "samples": len(labels), "torch": torch.__version__, "seconds": time.perf_counter() - start, "rows": rows}


def rerun_engine(settings: EngineSettings, names: list[str], old: dict, progress: bool = True) -> dict:
    """Re-measure the named rows of an earlier result `old` (same settings) and merge them in; the rest are kept.

    The baseline is regenerated too and must score exactly as before (the same seeds, the same model), or the merge is
    refused: only then are the kept rows still paired with the same reference. The merge is recorded in `reruns`.
    """
    known = {name: (group, cfg) for group, name, cfg in engine_cases()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise DqarError(f"unknown engine row(s) {', '.join(unknown)}", f"use names from: {'; '.join(known)}")
    if _comparable(old["settings"]) != _comparable(asdict(settings)):
        raise DqarError("the saved engine result was run with other settings", "rerun with its model, steps, cfg, seed and samples")
    new = run_engine(settings, progress, cases=[(known[n][0], n, known[n][1]) for n in names])
    base_old, base_new = old["rows"][0], new["rows"][0]
    same_fd = base_old.get("fd") == base_new.get("fd") or math.isclose(base_old["fd"], base_new["fd"], rel_tol=1e-6)
    if base_old.get("class_accuracy") != base_new.get("class_accuracy") or not same_fd:  # FD's eigen-solve varies in ~1e-7
        raise DqarError("the regenerated baseline does not score as the saved one (another model or torch build)",
                        "run the whole section again instead of --rows")
    merged = dict(old, rows=_merged_rows(old["rows"], new["rows"][1:], list(known)))
    kept = [r for r in old.get("reruns", []) if not set(r["rows"]) <= set(names)]  # a rerun these rows supersede goes
    merged["reruns"] = [*kept, {"rows": names, "date": new["date"], "machine": new["machine"],
                                                "torch": new["torch"], "seconds": new["seconds"]}]
    return merged


def _merged_rows(rows: list[dict], fresh: list[dict], order: list[str]) -> list[dict]:
    """`rows` with each fresh row in place of its namesake; a fresh row new to them goes after the last row that comes
    before it in `order` (after the baseline if none). Every other row is kept where it was, whatever its name."""
    by = {r["name"]: r for r in fresh}
    out = [by.pop(r["name"], r) for r in rows]
    for name, row in by.items():
        before = set(order[:order.index(name)])
        at = max((i for i, r in enumerate(out) if r["name"] in before), default=0)
        out.insert(at + 1, row)
    return out


def _comparable(settings: dict) -> dict:
    """What must match for a merge: the settings without where they ran or were written, a key an older result lacks
    at its default, and the DiT named one way (None or "embedded")."""
    full = {**asdict(EngineSettings()), **settings}
    full["model"] = None if full["model"] in (None, DEFAULT_MODEL) else full["model"]
    return {k: v for k, v in full.items() if k not in ("out_dir", "machine")}


def _reruns(result: dict) -> str:
    return "".join(f" Rows {', '.join(r['rows'])} re-measured {r['date']} on a {r['machine']} ({r['seconds'] / 60:.1f} min; "
                   "`--rows`, the baseline regenerated and scoring as before)." for r in result.get("reruns", []))


def _f(v, fmt: str, scale: float = 1.0) -> str:
    return "–" if v is None else format(scale * v, fmt)


def _error(v: float | None) -> str:
    """A relative error: 4 decimals, or 2 significant digits below 0.001 (an anchored INT8 history's)."""
    return "–" if v is None else (f"{v:.1e}" if 0 < v < 1e-3 else f"{v:.4f}")


def markdown(result: dict) -> str:
    """The section: settings line, one table, and findings computed from the rows."""
    s = result["settings"]
    rows = result["rows"]
    base = rows[0]
    model = s.get("model")
    name = "Embedded model" if model in (None, DEFAULT_MODEL) else f"Model {model}"
    sampling = result.get("sampling") or f"DDIM {s['steps']}, CFG {s['cfg']}"
    regen = command("engine", result, f" --samples {result['samples']}")
    lines = [f"## {section_name(SECTION, model)}", "",
             f"{name}, {sampling}, {result['samples']} samples ({s['samples_per_class']} per class), "
             f"seed {s['seed']}; PSNR/SSIM paired against the no-reuse baseline from the same noise; class accuracy and FD "
             f"(embedded classifier features vs the Fashion-MNIST test split). Regenerate: "
             f"`{regen}`"
             + (f".{run_line(result)}" if "date" in result else f" (the recorded run took {result['seconds'] / 60:.0f} min).")
             + _reruns(result)
             + (" Refused rows name the engine's reason (checked as `dqar.enable` checks it)." if any("refused" in r for r in rows) else ""),
             "",
             "| configuration | reuse % | FLOPs skipped % | PSNR dB | SSIM | INT8 rel. error | class acc % | FD |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['name']} | refused: {r['refused']} | | | | | | |")
            continue
        lines.append(f"| {r['name']} | {100 * r['reuse']:.1f} | {100 * r['flops_skipped']:.1f} | {_f(r['psnr_db'], '.2f')} | "
                     f"{_f(r['ssim'], '.4f')} | {_error(r['quant_error'])} | {_f(r['class_accuracy'], '.1f', 100)} | {_f(r['fd'], '.2f')} |")
    lines += ["", *findings(rows, base)]
    return "\n".join(lines) + "\n"


def findings(rows: list[dict], base: dict) -> list[str]:
    """Sentences derived from the table."""
    out = []
    refused = [r for r in rows if "refused" in r]
    rows = [r for r in rows if "refused" not in r]
    by = {r["name"]: r for r in rows}
    for k in (2, 3, 4):
        model = by.get(f"refresh {k}, model dtype")
        if not model:
            continue
        int8 = [by[n] for n in (f"refresh {k}, INT8 per {m}" for m in QUANT_MODES) if n in by]
        line = f"- Refresh {k}: {100 * model['reuse']:.1f}% reuse at {model['psnr_db']:.2f} dB in the model dtype"
        if int8:
            worst = min(int8, key=lambda r: r["psnr_db"])
            line += (f"; under the same plan INT8 costs at most {model['psnr_db'] - worst['psnr_db']:.2f} dB "
                     f"({worst['name'].split('per ')[1]} scales worst)")
        out.append(line + ".")
        block = by.get(f"refresh {k}, block reuse, model dtype")
        if block:
            out.append(f"- Refresh {k}, block granularity: {100 * block['flops_skipped']:.1f}% of FLOPs skipped (attention: "
                       f"{100 * model['flops_skipped']:.1f}%) at {block['psnr_db']:.2f} dB (attention: {model['psnr_db']:.2f} dB).")
    if base.get("class_accuracy") is not None:
        acc = [r for r in rows[1:] if abs(r["class_accuracy"] - base["class_accuracy"]) <= 0.01 + 1e-9]
        out.append(f"- {len(acc)} of {len(rows) - 1} configurations keep class accuracy within 1 point of the baseline "
                   f"({100 * base['class_accuracy']:.1f}%).")
    if refused:
        out.append(f"- {len(refused)} configuration{'s' if len(refused) > 1 else ''} refused on this model: "
                   + ", ".join(r["name"] for r in refused) + ".")
    return out


def write_engine(result: dict, out_dir: str | Path) -> Path:
    from dqar.io import atomic_write_json
    from dqar.reporting.documents import write_section

    out = Path(out_dir)
    model = result["settings"].get("model")
    atomic_write_json(out / f"{file_stem('fidelity_engine', model)}.json", result)
    return write_section(out / "FIDELITY.md", section_name(SECTION, model), markdown(result))
