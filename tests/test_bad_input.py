"""Bad input at every CLI command: one line naming the problem and the fix, exit code 2, no traceback.

`python tests/test_bad_input.py` rewrites the case table in docs/RELIABILITY.md from these cases.
"""
import json
import pickle
import sys
from pathlib import Path

import pytest
from safetensors.torch import save_file

from dqar.cli import main
from dqar.models import save_pipeline_folder

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_tiny_transformer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# (case id, argv with {model}/{tmp} placeholders, text the message must contain)
CASES = [
    ("unknown class id", "sample --model {model} --classes 12", "out of range"),
    ("negative class id", "sample --model {model} --classes -1", "out of range"),
    ("unknown class name", "sample --model {model} --classes shoe", "unknown class"),
    ("zero steps", "sample --model {model} --steps 0", "steps"),
    ("negative steps", "sample --model {model} --steps -5", "steps"),
    ("negative cfg", "sample --model {model} --cfg -1", "cfg"),
    ("eta out of range", "sample --model {model} --eta 2", "eta"),
    ("negative seed", "sample --model {model} --seed -1", "seed"),
    ("unknown sampler", "sample --model {model} --sampler euler", "unknown sampler"),
    ("unknown preset", "sample --model {model} --preset fast_dqar", "unknown preset"),
    ("unknown dtype", "sample --model {model} --dtype fp8", "unknown dtype"),
    ("CUDA without a GPU", "sample --model {model} --device cuda", "no GPU"),
    ("missing config file", "sample --model {model} --config {tmp}/none.toml", "does not exist"),
    ("invalid TOML", "sample --model {model} --config {tmp}/broken.toml", "not valid TOML"),
    ("mistyped config key", "sample --model {model} --config {tmp}/typo.toml", "did you mean 'warmup_frac'"),
    ("unknown top-level key", "sample --model {model} --config {tmp}/top.toml", "unknown config key"),
    ("unknown schedule", "sample --model {model} --config {tmp}/schedule.toml", "unknown schedule"),
    ("unknown quant mode", "sample --model {model} --config {tmp}/quant.toml", "unknown quant_mode"),
    ("threshold out of range", "sample --model {model} --config {tmp}/tau.toml", "entropy_tau"),
    ("SNR window inverted", "sample --model {model} --config {tmp}/snr.toml", "snr_min"),
    ("forecast order out of range", "sample --model {model} --config {tmp}/order.toml", "forecast_order"),
    ("unknown forecast axis", "sample --model {model} --config {tmp}/axis.toml", "unknown forecast_axis"),
    ("forecasting K/V", "sample --model {model} --config {tmp}/kvforecast.toml", "not K/V"),
    ("plan for another step count", "sample --model {model} --steps 7 --config {tmp}/plan_cfg.toml", "plan was made for steps"),
    ("corrupt plan file", "sample --model {model} --config {tmp}/badplan_cfg.toml", "not a valid dqar plan"),
    ("missing model folder", "sample --model {tmp}/nowhere/model", "neither an existing folder nor a hub id"),
    ("hub id offline", "sample --model someone/not-a-model", "someone/not-a-model"),
    ("truncated safetensors", "sample --model {tmp}/truncated", "safetensors"),
    ("pickle weights only", "sample --model {tmp}/pickled", "safetensors"),
    ("unwritable output folder", "sample --model {model} --steps 2 --classes 0 --out {tmp}/afile/sub", "cannot write"),
    ("bench batch 0", "bench --model {model} --batch-sizes 0", "batch sizes"),
    ("bench too few repeats", "bench --model {model} --repeats 1", "repeats"),
    ("bench unknown preset", "bench --model {model} --presets turbo", "unknown preset"),
    ("ablate missing grid", "ablate --model {model} --config {tmp}/none.toml", "does not exist"),
    ("ablate unknown grid key", "ablate --model {model} --config {tmp}/badgrid.toml --out {tmp}/abl", "unknown"),
    ("calibrate target out of range", "calibrate --model {model} --target 1.5 --out {tmp}/p.json", "target"),
    ("fid-sample zero samples", "fid-sample --model {model} --num-samples 0 --out {tmp}/s.npz", "num"),
    ("fid-sample batch 0", "fid-sample --model {model} --num-samples 4 --batch-size 0 --out {tmp}/s.npz", "batch"),
    ("fid missing samples file", "fid --samples {tmp}/none.npz --embedded", "none.npz"),
    ("fid without Inception weights", "fid --samples {tmp}/images.npz --ref {tmp}/ref.npz", "inception"),
    ("policy checkpoint missing", "sample --model {model} --config {tmp}/policy_missing.toml", "policy"),
    ("policy checkpoint not safetensors", "sample --model {model} --config {tmp}/policy_pickle.toml", "policy"),
    ("bench zero threads", "bench --model {model} --threads 0 --out {tmp}/b", "--threads"),
    ("bench unwritable output", "bench --model {model} --out {tmp}/afile/b", "cannot write"),
    ("ablate zero threads", "ablate --model {model} --threads 0 --out {tmp}/abl", "--threads"),
    ("ablate zero steps", "ablate --model {model} --steps 0 --out {tmp}/abl", "--steps"),
    ("ablate unwritable output", "ablate --model {model} --out {tmp}/afile/abl", "cannot write"),
    ("calibrate negative budget", "calibrate --model {model} --budget -1 --out {tmp}/p.json", "budget"),
    ("calibrate zero samples", "calibrate --model {model} --target 0.5 --samples 0 --out {tmp}/p.json", "--samples"),
    ("calibrate zero staleness", "calibrate --model {model} --target 0.5 --max-staleness 0 --out {tmp}/p.json", "max_staleness"),
    ("calibrate zero max patterns", "calibrate --model {model} --target 0.5 --max-patterns 0 --out {tmp}/p.json", "--max-patterns"),
    ("calibrate unwritable plan", "calibrate --model {model} --target 0.5 --out {tmp}/afile/p.json", "cannot write"),
    ("fid-sample not an .npz", "fid-sample --model {model} --num-samples 4 --out {tmp}/s.png", ".npz"),
    ("fid unwritable JSON", "fid --samples {tmp}/images.npz --embedded --json-out {tmp}/afile/o.json", "cannot write"),
    ("compared without results", "compared --results {tmp}/nowhere --doc {tmp}/C.md", "no ablation results"),
    ("fidelity zero samples", "fidelity --section engine --samples 0 --out {tmp}/f", "--samples"),
    ("fidelity zero threads", "fidelity --section dynamic --threads 0 --out {tmp}/f", "--threads"),
    ("fidelity unwritable output", "fidelity --section dynamic --out {tmp}/afile/f", "cannot write"),
    ("fidelity extend another section", "fidelity --section engine --extend per-sample --out {tmp}/f", "--extend"),
    ("fidelity extend without a saved run", "fidelity --section adaptive --extend per-sample --out {tmp}/f", "run the whole section"),
    ("fidelity --policy without --extend policy", "fidelity --section adaptive --policy {tmp}/p.safetensors --out {tmp}/f",
     "--extend policy"),
    ("fidelity extend policy missing file", "fidelity --section adaptive --extend policy --policy {tmp}/none.safetensors "
     "--out {tmp}/f", "does not exist"),
    ("policy collect attention on a flow model", "policy collect --model embedded-flux --granularity attention --out {tmp}/t.npz",
     "--granularity block"),
    ("policy collect unknown forecast kind", "policy collect --model {model} --granularity block --forecast-kind spline "
     "--out {tmp}/t.npz", "forecast_kind"),
    ("policy collect zero generations", "policy collect --model {model} --generations 0 --out {tmp}/t.npz", "generations"),
    ("policy collect negative validation", "policy collect --model {model} --validate -1 --out {tmp}/t.npz", "--validate"),
    ("policy train zero epochs", "policy train --traces {tmp}/none.npz --epochs 0", "epochs"),
    ("policy train missing traces", "policy train --traces {tmp}/none.npz --out {tmp}/p.safetensors", "does not exist"),
    ("policy distill without a policy", "policy distill --model {model} --out {tmp}/p.json", "needs a policy"),
    ("policy distill missing policy", "policy distill --model {model} --policy {tmp}/none.safetensors --out {tmp}/p.json",
     "does not exist"),
    ("policy evaluate target out of range", "policy evaluate --targets 1.5 --out {tmp}/f", "targets"),
    ("policy evaluate missing policy", "policy evaluate --policy {tmp}/none.safetensors --out {tmp}/f", "does not exist"),
]
# Cases whose problem only the loaded model can show (its classes, its files); every other case fails before any work.
NEED_THE_MODEL = {"unknown class id", "negative class id", "unknown class name", "missing model folder", "hub id offline",
                  "truncated safetensors", "pickle weights only"}


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return make_env(tmp_path_factory.mktemp("bad"))


def make_env(tmp: Path) -> dict:
    """A tiny 10-class pixel model and the broken files the cases point at."""
    model = save_pipeline_folder(tmp / "model", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    _write(tmp / "broken.toml", "[reuse\nschedule = 'linear'")
    _write(tmp / "typo.toml", "[reuse]\nwarmup = 0.2\n")
    _write(tmp / "top.toml", "steps = 50\n")
    _write(tmp / "schedule.toml", "[reuse]\nschedule = 'cosine'\n")
    _write(tmp / "quant.toml", "[reuse]\ncache_dtype = 'int8'\nquant_mode = 'row'\n")
    _write(tmp / "tau.toml", "[reuse]\ngate = true\nentropy_tau = 1.5\n")
    _write(tmp / "snr.toml", "[reuse]\nsnr_min = 10.0\nsnr_max = 1.0\n")
    _write(tmp / "order.toml", "[reuse]\nforecast_order = 3\n")
    _write(tmp / "axis.toml", "[reuse]\nforecast_order = 1\nforecast_axis = \"steps\"\n")
    _write(tmp / "kvforecast.toml", "[reuse]\ntarget = \"kv\"\nforecast_order = 1\n")
    rows = ["." * 4] + ["R" * 4] * 9
    _write(tmp / "plan.json", json.dumps({"format": "dqar-plan/1", "key": {"steps": 10}, "rows": rows}))
    _write(tmp / "plan_cfg.toml", f"[reuse]\nplan_file = '{tmp}/plan.json'\n")
    _write(tmp / "badplan.json", "{not json")
    _write(tmp / "badplan_cfg.toml", f"[reuse]\nplan_file = '{tmp}/badplan.json'\n")
    _write(tmp / "badgrid.toml", "[[sweep]]\nname = 'x'\nvary = { warmup = [0.1] }\n")
    _write(tmp / "afile", "a regular file where a folder is expected")
    truncated = save_pipeline_folder(tmp / "truncated", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    weights = truncated / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    pickled = save_pipeline_folder(tmp / "pickled", make_tiny_transformer(num_classes=10, in_channels=1, learned_sigma=False))
    (pickled / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    (pickled / "transformer" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps({"w": 1}))
    import numpy as np

    np.savez(tmp / "images.npz", arr_0=np.zeros((2, 28, 28, 1), dtype=np.uint8))
    np.savez(tmp / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    _write(tmp / "policy_missing.toml", f"[reuse]\npolicy = '{tmp}/none.safetensors'\n")
    (tmp / "policy.pt").write_bytes(pickle.dumps({"w": 1}))
    _write(tmp / "policy_pickle.toml", f"[reuse]\npolicy = '{tmp}/policy.pt'\n")
    save_file({}, str(tmp / "empty.safetensors"))
    return {"model": str(model), "tmp": str(tmp)}


def run_case(argv: str, env: dict, capsys) -> tuple[int, str]:
    args = [a.format(**env) for a in argv.split()]
    try:
        rc = main(args)
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case,argv,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2(case, argv, expect, env, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = run_case(argv, env, capsys)
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
    assert rc == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert expect.lower() in lines[0].lower(), lines[0]


def _no_work(*args, **kwargs):
    raise AssertionError("work started before the arguments were checked")


@pytest.mark.parametrize("case,argv,expect", [c for c in CASES if c[0] not in NEED_THE_MODEL],
                         ids=[c[0] for c in CASES if c[0] not in NEED_THE_MODEL])
def test_bad_arguments_fail_before_any_model_is_loaded(case, argv, expect, env, capsys, monkeypatch):
    """Every loader that starts work raises if called: the one-line error must come first."""
    import torch

    import dqar.embedded
    import dqar.models

    for module, name in ((dqar.models, "load_model"), (dqar.models, "random_dit_xl2"), (dqar.embedded, "load_classifier"),
                         (torch.jit, "load")):
        monkeypatch.setattr(module, name, _no_work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, err = run_case(argv, env, capsys)
    assert rc == 2 and expect.lower() in err.lower(), err


@pytest.mark.parametrize("case,argv", [c[:2] for c in CASES if c[0] in NEED_THE_MODEL], ids=sorted(NEED_THE_MODEL, key=[c[0] for c in CASES].index))
def test_only_the_model_cases_reach_the_loader(case, argv, env, capsys, monkeypatch):
    """The guard is live, and the cases exempt from it do need the model: they get as far as the loader."""
    import dqar.models

    monkeypatch.setattr(dqar.models, "load_model", _no_work)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(AssertionError, match="work started"):
        run_case(argv, env, capsys)


def test_reliability_doc_lists_every_case():
    doc = (ROOT / "docs" / "RELIABILITY.md").read_text()
    missing = [case for case, _, _ in CASES if f"| {case} |" not in doc]
    assert not missing, f"regenerate with `python tests/test_bad_input.py`: {missing}"


def _write_doc() -> None:
    """Run every case and rewrite the table between the markers in docs/RELIABILITY.md."""
    import contextlib
    import io
    import os
    import tempfile

    os.environ["HF_HUB_OFFLINE"] = "1"
    rows = ["| case | command | exit | message |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as d:
        e = make_env(Path(d))
        for case, argv, _ in CASES:
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):
                try:
                    rc = main([a.format(**e) for a in argv.split()])
                except SystemExit as exc:
                    rc = exc.code
            msg = [x for x in buf.getvalue().splitlines() if x.strip() and "%|" not in x][-1]
            msg = msg.replace(e["model"], "MODEL").replace(e["tmp"], "…").replace("|", "\\|")
            shown = argv.replace("{model}", "MODEL").replace("{tmp}", "…")
            rows.append(f"| {case} | `dqar {shown}` | {rc} | {msg} |")
    doc = ROOT / "docs" / "RELIABILITY.md"
    head, rest = doc.read_text().split("<!-- cases:start -->")
    _, tail = rest.split("<!-- cases:end -->")
    doc.write_text(head + "<!-- cases:start -->\n" + "\n".join(rows) + "\n<!-- cases:end -->" + tail)


if __name__ == "__main__":
    _write_doc()


def test_first_line_of_an_exception_message():
    from dqar.errors import first_line

    assert first_line(RuntimeError("no kernel\nstack detail")) == "no kernel"
    assert first_line(RuntimeError("\n  padded\nmore")) == "padded"
    assert first_line(RuntimeError()) == ""


def _plan_config(tmp: Path, name: str, key: dict, rows: list[str]) -> str:
    _write(tmp / f"{name}.json", json.dumps({"format": "dqar-plan/1", "key": key, "rows": rows}))
    return str(_write(tmp / f"{name}.toml", f"[reuse]\nplan_file = '{tmp / name}.json'\n"))


def _one_line_exit_2(rc: int, err: str, *needles: str) -> None:
    lines = [line for line in err.splitlines() if line.strip() and "%|" not in line]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_a_plan_for_another_stream_layout_is_one_line_exit_2(env, tmp_path, capsys):
    """Unkeyed but for its layout, with the right layer count: a plan made on 4 dual-stream layers, on a 4-layer DiT."""
    cfg = _plan_config(tmp_path, "dual", {"steps": 3, "streams": [2] * 4}, ["." * 4, "R" * 4, "R" * 4])
    out = tmp_path / "out"
    rc, err = run_case(f"sample --model {{model}} --steps 3 --classes 0 --quiet --config {cfg} --out {out}", env, capsys)
    _one_line_exit_2(rc, err, "plan was made for 4 layers (streams 2 x4) but", "has 4 layers (streams 1 x4)", "calibrate a plan")
    assert not out.exists()


def test_a_plan_without_a_stream_layout_still_runs(env, tmp_path, capsys):
    cfg = _plan_config(tmp_path, "old", {"steps": 3}, ["." * 4, "R" * 4, "R" * 4])
    rc, err = run_case(f"sample --model {{model}} --steps 3 --classes 0 --quiet --config {cfg} --out {tmp_path / 'out'}", env, capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["stats"]["reuse_fraction"] > 0


def test_a_flow_plan_carries_the_flow_sampler_and_its_layout(env, tmp_path, capsys, monkeypatch):
    """`dqar calibrate` on embedded-flux keys the plan with sampler "flow" (what generate runs) and its streams; the run
    config's default sampler ("ddim") does not refuse it there, and a DiT run refuses it before loading anything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    plan = tmp_path / "flux.json"
    rc, err = run_case(f"calibrate --model embedded-flux --steps 2 --samples 1 --classes 0 --target 0.3 --quiet --out {plan}", env, capsys)
    assert rc == 0, err
    key = json.loads(plan.read_text())["key"]
    assert key["sampler"] == "flow" and key["streams"] == [2] * 5 and key["model"] == "embedded-flux"
    cfg = _write(tmp_path / "flux.toml", f"[reuse]\nplan_file = '{plan}'\n")
    rc, err = run_case(f"sample --model embedded-flux --steps 2 --classes 0 --quiet --config {cfg} --out {tmp_path / 'o'}", env, capsys)
    assert rc == 0, err
    import dqar.models

    monkeypatch.setattr(dqar.models, "load_model", _no_work)
    rc, err = run_case(f"sample --model {{model}} --steps 2 --classes 0 --config {cfg} --out {tmp_path / 'o2'}", env, capsys)
    _one_line_exit_2(rc, err, "plan was made for sampler='flow' but this run has sampler='ddim'")
    rc, err = run_case(f"sample --model embedded --steps 2 --classes 0 --config {cfg} --out {tmp_path / 'o2'}", env, capsys)
    _one_line_exit_2(rc, err, "plan was made for model='embedded-flux' but this run has model='embedded'")
