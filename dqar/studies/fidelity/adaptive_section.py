"""The "Adaptive" section of docs/FIDELITY.md, rendered from `run_adaptive` results; every verdict is computed here."""
from __future__ import annotations

import math
from pathlib import Path

from dqar.io import atomic_write_json
from dqar.studies.fidelity.adaptive import SECTION

# Targets of the verifying-decider issue (embedded DiT, DDIM 50, CFG 4); the same are applied to embedded-flux.
GAIN_DB = 1.0  # verify − best static at 60% and 70% of FLOPs skipped, with the interval above 0
GAIN_SHARES = (0.6, 0.7)
FRONTIER = (0.80, 35.0)  # ≥ 80% of FLOPs skipped at ≥ 35 dB


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def _ci(ci) -> str:
    return "–" if not ci else f"[{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _row(target, row: dict, reference: dict) -> str:
    acc, ref_acc = row.get("class_accuracy"), reference.get("class_accuracy")
    drop = None if acc is None or ref_acc is None else 100 * (ref_acc - acc)
    cal = row.get("calibration") or {}
    tuned = "–" if not cal else ("yes" if cal["reached"] else "no") + f", probe share {100 * cal['calibrated_share']:.1f}%"
    return (f"| {target} | {row['name']} | {100 * row['flops_skipped']:.1f}% | {_f(row['psnr_db'])} | "
            f"{_f(row.get('delta_db'), '{:+.2f}')} {_ci(row.get('delta_ci'))} | {_f(acc and 100 * acc, '{:.1f}%')} "
            f"({_f(drop, '{:+.1f}')}) | {_f(row.get('fd'), '{:.1f}')} | {row['host_syncs_per_evaluation']:.2f} | "
            f"{tuned} |")


def table(result: dict) -> list[str]:
    ref = result["reference"]
    lines = ["| target | configuration | FLOPs skipped | PSNR (dB) | Δ vs best static, 95% CI | class accuracy (drop, points) "
             "| FD | host syncs / evaluation | τ calibrated to the target on probe seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in result["shipped"].items():
        lines.append(_row(f"shipped `{name}`", {k: v for k, v in row.items() if k not in ("delta_db", "delta_ci")}, ref))
    for comp in [result["at_full_dqar"], *result["targets"]]:
        label = f"{100 * comp['target']:.1f}%" + (" (full_dqar's)" if comp is result["at_full_dqar"] else "")
        for decider in ("static", "verify", "gate"):
            for kind, row in comp.get(decider, {}).items():
                if row is not None:
                    best = " **(best static, chosen on probe seeds)**" if decider == "static" and kind == comp["best_static_kind"] else ""
                    lines.append(_row(label, {**row, "name": row["name"] + best}, ref))
    return lines


def _matched(row: dict, target: float, tol: float) -> bool:
    return abs(row["flops_skipped"] - target) <= tol


def verdicts(result: dict) -> list[str]:
    """Sentences computed from the numbers: the gain target at 60/70%, matched work, the frontier."""
    tol, out = result["settings"]["tolerance"], []
    for comp in result["targets"]:
        if not any(abs(comp["target"] - s) < 1e-9 for s in GAIN_SHARES):
            continue
        rows = [r for r in comp["verify"].values() if r is not None and r.get("delta_db") is not None]
        if not rows:
            out.append(f"- At {comp['target']:.0%}: no static plan within ±{tol:.0%} to compare with.")
            continue
        best = max(rows, key=lambda r: r["delta_db"])
        met = best["delta_db"] >= GAIN_DB and best["delta_ci"] and best["delta_ci"][0] > 0
        matched = _matched(best, comp["target"], tol)
        out.append(f"- At {comp['target']:.0%} of FLOPs skipped, the best verifying decider ({best['name']}, "
                   f"{100 * best['flops_skipped']:.1f}% skipped{'' if matched else f', outside ±{tol:.0%}'}) is "
                   f"{best['delta_db']:+.2f} dB {_ci(best['delta_ci'])} against the best static plan: target "
                   f"≥ +{GAIN_DB:.1f} dB with the interval above 0 **{'met' if met and matched else 'missed'}**.")
    out += gate_verdicts(result)
    rows = [r for c in [result["at_full_dqar"], *result["targets"]] for d in ("static", "verify", "gate", "per_sample", "policy")
            for r in c.get(d, {}).values() if r is not None] + list(result["shipped"].values())
    good = [r for r in rows if r["psnr_db"] >= FRONTIER[1]]
    top = max(good, key=lambda r: (r["flops_skipped"], r["psnr_db"])) if good else None  # ties: the better PSNR
    out.append(f"- Frontier: the most FLOPs skipped at ≥ {FRONTIER[1]:.0f} dB is "
               + (f"{100 * top['flops_skipped']:.1f}% ({top['name']}, {top['psnr_db']:.2f} dB)" if top else "none")
               + f"; target ≥ {FRONTIER[0]:.0%} **{'met' if top and top['flops_skipped'] >= FRONTIER[0] else 'missed'}**.")
    refused = {k: v for c in [result["at_full_dqar"], *result["targets"]] for k, v in c.get("refused", {}).items()}
    for kind, why in refused.items():
        out.append(f"- The verifying decider with `{kind}` did not run on `{result['model']}`: {why}")
    out += stale_presets(result)
    a, f = result["shipped"].get("adaptive"), result["shipped"]["full_dqar"]
    if a is None:
        out.append(f"- The shipped `adaptive` preset did not run: {result.get('adaptive_refused')}")
        return out
    out.append(f"- The shipped `adaptive` preset (fixed τ, no calibration) skips {100 * a['flops_skipped']:.1f}% at "
               f"{a['psnr_db']:.2f} dB; `full_dqar` skips {100 * f['flops_skipped']:.1f}% at {f['psnr_db']:.2f} dB "
               f"(paired difference {a.get('delta_db', float('nan')):+.2f} dB {_ci(a.get('delta_ci'))}, at different work).")
    return out


def stale_presets(result: dict) -> list[str]:
    """A sentence per shipped row whose preset has changed since the run (the fields that differ, then → now)."""
    import json
    from dataclasses import asdict

    from dqar.engine.config import PRESETS, preset

    out = []
    for name, row in result["shipped"].items():
        if name not in PRESETS or "config" not in row:
            continue
        now = json.loads(json.dumps(asdict(preset(name))))
        then = json.loads(json.dumps(row["config"]))  # as saved: tuples are lists
        changed = [f"{k}: {then.get(k)} → {v}" for k, v in now.items() if k in then and then[k] != v]
        if changed:
            out.append(f"- The shipped `{name}` rows ran the preset as it was then; it has changed since ({'; '.join(changed)}): "
                       "today's is measured in \"Forecaster of full_dqar\" and \"Engine\".")
    return out


def gate_verdicts(result: dict) -> list[str]:
    """The probe-error gate against the best static plan at each target it ran at, and whether a preset may use it."""
    from dqar.engine.config import PRESETS

    tol, out, wins, ran, unreachable, same = result["settings"]["tolerance"], [], [], False, {}, []
    for comp in [result["at_full_dqar"], *result["targets"]]:
        if "gate" not in comp:
            continue
        ran = True
        for key, share in comp.get("gate_unreachable", {}).items():
            unreachable.setdefault(key, (share, []))[1].append(f"{comp['target']:.1%}")
        pairs = [(row, comp.get("verify", {}).get(key.split("/")[0])) for key, row in comp["gate"].items() if key.endswith("/constant")]
        same += [abs(g["psnr_db"] - v["psnr_db"]) for g, v in pairs
                 if v and (g.get("calibration") or {}).get("max_interval") == (v.get("calibration") or {}).get("max_interval")]
        rows = [r for r in comp["gate"].values() if r is not None and r.get("delta_db") is not None]
        if not rows:
            continue
        best = max(rows, key=lambda r: r["delta_db"])
        matched = _matched(best, comp["target"], tol)
        lo, hi = best["delta_ci"]
        word = "beats" if lo > 0 else "loses to" if hi < 0 else "is not distinguishable from"
        if lo > 0 and matched:
            wins.append(f"{comp['target']:.1%}")
        out.append(f"- At {comp['target']:.1%}, the best probe-error gate ({best['name']}, {100 * best['flops_skipped']:.1f}% "
                   f"skipped{'' if matched else f', outside ±{tol:.0%}'}) {word} the best static plan: "
                   f"{best['delta_db']:+.2f} dB {_ci(best['delta_ci'])}.")
    if not ran:
        return out
    for key, (share, targets) in unreachable.items():
        out.append(f"- The probe-error gate ({key.replace('/', ', ')}) cannot reach {', '.join(targets)}: even at τ = ∞ with "
                   f"the largest cap it skips {100 * share:.1f}%.")
    if same:  # probe "first", every layer eligible: the gate decides as the verifying decider (tests/test_probe_gate.py)
        out.append(f"- On the constant schedule the gate's rows are the verifying decider's with the same kind and cap: their "
                   f"PSNR differs by at most {max(same):.2f} dB over {len(same)} pairs.")
    again = [(c["target"], c["gate_base_psnr_db"], c["static"][c["best_static_kind"]]["psnr_db"])
             for c in [result["at_full_dqar"], *result["targets"]] if "gate_base_psnr_db" in c]
    if again:  # rows added to a saved result: their Δ is paired with the best static plan measured again
        out.append("- The gate rows' Δ is paired with the best static plan measured again in the same run: "
                   + "; ".join(f"{100 * t:.1f}%: {new:.2f} dB (table: {old:.2f})" for t, new, old in again) + ".")
    used = [n for n, v in PRESETS.items() if v.get("gate_signal") == "probe_error"]
    out.append("- The probe-error gate " + (f"beats the best static plan at matched work at {', '.join(wins)}"
               if wins else "beats the best static plan at matched work at no target") + "; presets using it: "
               + (", ".join(f"`{n}`" for n in used) if used else "none") + ".")
    return out


def _word(ci) -> str:
    return "beats" if ci[0] > 0 else "loses to" if ci[1] < 0 else "is not distinguishable from"


def per_sample_lines(result: dict) -> list[str]:
    """The per-sample refresh rows (`adaptive_split.extend_with_per_sample`) against the batch decider, and the verdict."""
    from dqar.engine.config import PRESETS

    comps = [c for c in [result["at_full_dqar"], *result["targets"]] if c.get("per_sample")]
    if not comps:
        return []
    tol, ref = result["settings"]["tolerance"], result["reference"].get("class_accuracy")
    lines = ["", "**Per-sample refresh.** The verifying decider with `verify_per_sample = true`: each sample (its CFG rows "
             "together) refreshes on its own probe error; the batch splits after the probe block, each later block "
             "computing the refreshing rows only (no copy of the model). τ is calibrated to the same target on the same "
             "calibration seeds as the batch decider's. Δ: paired per-sample PSNR differences with 95% bootstrap intervals.", "",
             "| target | batch decider: skipped, PSNR | per-sample: skipped, PSNR | Δ per-sample − batch | Δ vs best static "
             "| class accuracy | host syncs / evaluation |", "|---|---:|---:|---:|---:|---:|---:|"]
    tally: dict[str, list[str]] = {"beats": [], "loses to": [], "is not distinguishable from": []}
    static_wins, unmatched = [], []
    for comp in comps:
        label = f"{100 * comp['target']:.1f}%" + (" (full_dqar's)" if comp is result["at_full_dqar"] else "")
        for row in comp["per_sample"].values():
            acc = row.get("class_accuracy")
            lines.append(f"| {label} | {100 * row['batch_flops_skipped']:.1f}%, {_f(row['batch_psnr_db'])} | "
                         f"{100 * row['flops_skipped']:.1f}%, {_f(row['psnr_db'])} | {row['delta_vs_batch_db']:+.2f} "
                         f"{_ci(row['delta_vs_batch_ci'])} | {_f(row.get('delta_db'), '{:+.2f}')} {_ci(row.get('delta_ci'))} | "
                         f"{_f(acc and 100 * acc, '{:.1f}%')} ({_f(None if acc is None or ref is None else 100 * (ref - acc), '{:+.1f}')}) | "
                         f"{row['host_syncs_per_evaluation']:.2f} |")
            if not (_matched(row, comp["target"], tol) and abs(row["batch_flops_skipped"] - comp["target"]) <= tol):
                unmatched.append(label)
                continue
            if row["delta_vs_batch_ci"]:
                tally[_word(row["delta_vs_batch_ci"])].append(label)
            if row.get("delta_ci") and row["delta_ci"][0] > 0:
                static_wins.append(label)
    said = [f"{word} the batch decider at {', '.join(at)}" for word, at in tally.items() if at]
    used = [n for n, v in PRESETS.items() if v.get("verify_per_sample")]
    run = result.get("per_sample_run")
    if run:
        lines += ["", f"Measured {run['when']} on {run['machine']}: `{run['command']}` ({run['seconds']} s)."]
    lines += ["", "- Per-sample refresh " + ("; ".join(said) if said else "was not compared at matched work")
              + (f" (work not matched within ±{tol:.0%} at {', '.join(unmatched)})" if unmatched else "") + "; it beats the "
              "best static plan at " + (", ".join(static_wins) if static_wins else "no target") + ". Presets using it: "
              + (", ".join(f"`{n}`" for n in used) if used else "none") + "."]
    return lines


def policy_lines(result: dict) -> list[str]:
    """The learned policies' rows (`adaptive_policy.run_policy_rows`, kept as `policy_rows`) and their verdicts."""
    from dqar.engine.config import PRESETS

    pr = result.get("policy_rows")
    if not pr:
        return []
    tol, ref, attn = result["settings"]["tolerance"], result["reference"], pr["attention_share"]
    shares = ", ".join(f"{100 * c['target']:.0f}% ({100 * c['share']:.1f}% of the FLOPs)" for c in pr["targets"])
    lines = ["", f"**Learned policies at matched work.** A policy reuses attention outputs only: all of them are "
             f"{100 * attn:.1f}% of the FLOPs, so the targets above are out of its reach. Each policy is compared at "
             f"{shares} of the attention cells reused (threshold bisected on 4 knob-search images), against the best "
             "static plan at that FLOPs share chosen on the probe seeds (whole-block plans per forecast kind, and static "
             f"attention schedules at that reuse); the same {result['settings']['samples']} evaluated samples."
             + (f" Measured {pr['when']} (`dqar.studies.fidelity.adaptive_policy.run_policy_rows`)." if pr.get("when") else ""), "",
             "| attention reused | configuration | FLOPs skipped | PSNR (dB) | Δ vs best static, 95% CI | class accuracy "
             "(drop, points) | FD | host syncs / evaluation | |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    verdicts_, used = [], [n for n, v in PRESETS.items() if v.get("policy")]
    for comp in pr["targets"]:
        label = f"{100 * comp['target']:.0f}%"
        if comp.get("static"):
            lines.append(_row(label, {**comp["static"], "name": comp["static"]["name"] + " **(best static)**",
                                      "delta_db": 0.0, "delta_ci": [0.0, 0.0]}, ref))
        for row in comp["policy"].values():
            lines.append(_row(label, row, ref))
            if row.get("delta_ci") and comp.get("static"):
                gap = abs(row["flops_skipped"] - comp["static"]["flops_skipped"])
                verdicts_.append(f"- At {label} of the attention cells, {row['name']} ({100 * row['flops_skipped']:.1f}% of the "
                                 f"FLOPs{'' if gap <= tol else f', {100 * gap:.1f} points from the static plan'}) "
                                 f"{_word(row['delta_ci'])} the best static plan ({comp['static']['name']}): "
                                 f"{row['delta_db']:+.2f} dB {_ci(row['delta_ci'])}.")
        b = comp.get("between")
        if b:
            verdicts_.append(f"- At {label}, the {b['second']} policy {_word(b['delta_ci'])} the {b['first']} policy: "
                             f"{b['delta_db']:+.2f} dB {_ci(b['delta_ci'])} (paired).")
    verdicts_.append("- Presets using a learned policy: " + (", ".join(f"`{n}`" for n in used) if used else "none") + ".")
    return lines + [""] + verdicts_


def block_policy_lines(result: dict) -> list[str]:
    """The block-feature policies' rows (`adaptive_policy.extend_with_policy`) against the best static plan, and verdicts."""
    from dqar.engine.config import PRESETS

    comps = [c for c in [result["at_full_dqar"], *result["targets"]] if c.get("policy")]
    if not comps:
        return []
    tol, ref, info = result["settings"]["tolerance"], result["reference"], result.get("block_policies", {})
    described = "; ".join(f"`{n}`: {len(p['features'])} features ({', '.join(p['features'])}), labels up to age {p['max_age']}, "
                          f"{p['forecast_kind']} forecasts" for n, p in info.items())
    lines = ["", "**Block-feature policies at matched work.** A policy on the model-agnostic block features "
             f"(docs/POLICY.md) reuses whole blocks, so it reaches these targets. {described}. Each runs with full_dqar's "
             "INT8 history and its own forecaster, every layer a candidate up to its labelled age, its threshold bisected "
             "on 4 knob-search images (other seeds) to the target's FLOPs share; Δ is paired with the target's best "
             "static plan, measured again in the same run.", "",
             "| target | configuration | FLOPs skipped | PSNR (dB) | Δ vs best static, 95% CI | class accuracy (drop, points) "
             "| FD | host syncs / evaluation | threshold search: within ±2% on the search seeds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    said, wins = [], []
    for comp in comps:
        label = f"{100 * comp['target']:.1f}%" + (" (full_dqar's)" if comp is result["at_full_dqar"] else "")
        static = comp["static"][comp["best_static_kind"]]
        lines.append(_row(label, {**static, "name": static["name"] + f" **(best static; again: {comp['policy_base_psnr_db']:.2f} dB)**",
                                  "delta_db": 0.0, "delta_ci": [0.0, 0.0]}, ref))
        for row in comp["policy"].values():
            lines.append(_row(label, row, ref))
            matched = _matched(row, comp["target"], tol)
            said.append(f"- At {label}, {row['name']} ({100 * row['flops_skipped']:.1f}% skipped"
                        f"{'' if matched else f', outside ±{tol:.0%}'}) {_word(row['delta_ci'])} the best static plan: "
                        f"{row['delta_db']:+.2f} dB {_ci(row['delta_ci'])}.")
            if matched and row["delta_ci"][0] > 0:
                wins.append(label)
        b = comp.get("policy_between")
        if b:
            one, two = comp["policy"][b["first"]], comp["policy"][b["second"]]
            apart = abs(one["flops_skipped"] - two["flops_skipped"]) > tol
            if apart:
                said.append(f"- At {label}, policies `{b['second']}` and `{b['first']}` ran at different work "
                            f"({100 * two['flops_skipped']:.1f}% and {100 * one['flops_skipped']:.1f}% skipped): paired "
                            f"difference {b['delta_db']:+.2f} dB {_ci(b['delta_ci'])}, no verdict between them.")
            else:
                said.append(f"- At {label}, policy `{b['second']}` {_word(b['delta_ci'])} policy `{b['first']}`: "
                            f"{b['delta_db']:+.2f} dB {_ci(b['delta_ci'])} (paired).")
    used = [n for n, v in PRESETS.items() if v.get("policy")]
    run = result.get("policy_run")
    if run:
        lines += ["", f"Measured {run['when']} on {run['machine']}: `{run['command']}` ({run['seconds']} s)."]
    said.append("- A block-feature policy beats the best static plan at matched work at "
                + (", ".join(wins) if wins else "no target") + "; presets using a learned policy: "
                + (", ".join(f"`{n}`" for n in used) if used else "none") + ".")
    return lines + [""] + said


POLICY_DOC_SECTION = "On the verify signal: the probe feature"


def policy_doc_body(result: dict, shipped_report: dict, command: str) -> str:
    """docs/POLICY.md's section on the probe-feature policy: held-out fit against the shipped policy's, and the
    matched-work verdicts of the "Adaptive" section (`policy_lines`), all from the numbers."""
    pr, names = result["policy_rows"], list(result["policy_rows"]["policies"])
    new, old = pr["training"]["heldout"], shipped_report["heldout"]
    same = pr["training"]["split"]["heldout_generations"] == shipped_report["split"]["heldout_generations"]
    fit = [f"| {k} | {old[k]:.4f} | {new[k]:.4f} |" for k in ("r2_log", "spearman", "mse_log")]
    better = new["mse_log"] < old["mse_log"]
    mine, theirs = pr["training"]["collect"], shipped_report.get("collect") or {}
    differ = sorted(k for k in set(mine) | set(theirs) if k != "probe_feature" and mine.get(k, 0) != theirs.get(k, 0))
    settings_same = pr["training"].get("settings") == shipped_report.get("settings")
    verdict = [line for line in policy_lines(result) if line.startswith("- ")]
    return "\n".join([
        f"## {POLICY_DOC_SECTION}", "",
        "`dqar.tuning.collect.CollectSettings(probe_feature=True)` adds `log_probe_error` (`dqar.engine.features`): the "
        "first layer's last measured change, one evaluation late, for every layer; a policy trained on it never reuses "
        "that layer, which computes and stores at every evaluation. A checkpoint names its features, so the shipped "
        "policies (8 features) load and act as before; a checkpoint naming another set is refused in one line.", "",
        f"Collected and trained on {mine['generations']} generations of {mine['batch']} samples (seeds from {mine['seed']}; "
        + ("the shipped policy's collect settings" if not differ else f"collect settings other than the shipped policy's: {', '.join(differ)}")
        + (", its training settings" if settings_same else ", other training settings")
        + f"; {pr['training']['parameters']:,} parameters; collect {pr['training']['collect_wall_seconds']:.0f} s, "
        f"train {pr['training']['train_wall_seconds']:.0f} s), held out on "
        f"{'the same' if same else 'other'} {len(pr['training']['split']['heldout_generations'])} generations:", "",
        "| held out | shipped (8 features) | with the probe feature |", "|---|---:|---:|", *fit, "",
        f"The probe feature {'lowers' if better else 'does not lower'} the held-out MSE of the log label "
        f"({old['mse_log']:.4f} → {new['mse_log']:.4f}). At matched work on the embedded DiT "
        f"({result['settings']['samples']} evaluated samples, docs/FIDELITY.md \"Adaptive\"; `{names[0]}` and `{names[1]}` "
        "below):", "", *verdict, "", f"Measured with `{command}`.", ""])


def section_body(result: dict, command: str, when: str, machine: str) -> str:
    s = result["settings"]
    gated = any("gate" in c for c in [result["at_full_dqar"], *result["targets"]])
    head = [f"Model `{result['model']}`, {result['steps']} steps, CFG {result['cfg']}, {s['samples']} evaluated samples; "
            f"static plans chosen on {s['probe_samples']} probe samples and τ calibrated on {s['calib_samples']} "
            f"(other seeds), matched work ±{s['tolerance']:.0%}. PSNR against no reuse on the same seeds; Δ: mean per-sample "
            "difference to the best static plan at the same target, 95% percentile-bootstrap interval. Measured "
            f"{when} on {machine}: `{command}`."
            + (" Rows \"gate ε\": the online gate on the probe block's forecast error (`gate = true`, `gate_signal = "
               "\"probe_error\"`) with the adaptive preset's history and forecast, on the layer schedule named, its τ scale "
               "bisected on the calibration seeds." if gated else ""), ""]
    done, asked = len(result["targets"]), len(s["targets"])
    if done < asked:
        head += [f"**Partial run**: {done} of the {asked} targets ({', '.join(f'{t:.0%}' for t in s['targets'][done:])} "
                 "not yet measured) when this section was written.", ""]
    return "\n".join(head + table(result) + [""] + verdicts(result) + per_sample_lines(result) + block_policy_lines(result)
                     + policy_lines(result)) + "\n"


def write_adaptive(result: dict, out_dir: Path, command: str, machine: str = "") -> Path:
    """The JSON beside the docs and the model's own section in FIDELITY.md ("Adaptive", "Adaptive (embedded-flux)")."""
    from dqar.reporting.documents import write_section
    from dqar.studies.fidelity.sections import file_stem, machine_description, section_name, today

    out_dir = Path(out_dir)
    written = result.setdefault("written", {"command": command, "when": result.get("when") or today(),
                                            "machine": machine or machine_description()})  # an extension keeps the run's
    atomic_write_json(out_dir / f"{file_stem('fidelity_adaptive', result['model'])}.json", result)
    name = section_name(SECTION, result["model"])
    body = f"## {name}\n\n" + section_body(result, written["command"], written["when"], written["machine"])
    return write_section(out_dir / "FIDELITY.md", name, body)
