"""`dqar bench`: the stock transformer (eager and under torch.compile) vs dqar's no-reuse path vs presets, in one process.

Every case draws the same labels and noise; all cases of one batch size are warmed up once, then
timed round-robin over the repeats on the device's clock (dqar.studies.timing: the sampling thread's
CPU time on CPU, CUDA events on GPU, wall time beside); every ratio is a ratio of medians with a
paired bootstrap interval (dqar.studies.intervals), against the stock eager and the stock compiled
model. Timed runs have diagnostics off. Ratios are what travels between machines; absolute times are
only meaningful on a quiet device.
"""
from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import torch
from tqdm import tqdm

from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.errors import DqarError
from dqar.engine.plan import Plan
from dqar.generate import generate
from dqar.labels import cycle_labels
from dqar.sampling import make_scheduler
from dqar.studies.blocks import timed_run
from dqar.studies.intervals import ratio_ci
from dqar.studies.timing import clock_for, median, round_robin, seconds, walls, warm_up
from dqar.tuning.distill import executed_plan

BLOCK_PRESET = "block_reuse"
STOCK_EAGER, STOCK_COMPILED = "stock_eager", "stock_compiled"


@dataclass(frozen=True)
class BenchSettings:
    """What `dqar bench` measures."""

    batch_sizes: tuple[int, ...] = (1, 8, 32)  # images per generation (CFG doubles the rows)
    steps: int = 50
    cfg: float = 4.0
    repeats: int = 5
    warmup: int = 1
    presets: tuple[str, ...] = ("full_dqar", "quant_cache_only", BLOCK_PRESET)
    compile: bool = True  # include compiled rows
    stock: bool = True  # include diffusers' DiTPipeline where the model allows it
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise DqarError(f"batch sizes {self.batch_sizes} are invalid", "use positive integers, e.g. --batch-sizes 1 8 32")
        if self.repeats < 3:
            raise DqarError(f"repeats = {self.repeats} is too few for a median", "use --repeats 3 or more")
        if self.steps < 1:
            raise DqarError(f"steps = {self.steps} is invalid", "use steps >= 1")
        for p in self.presets:
            preset(p)


@dataclass(frozen=True)
class BenchRow:
    case: str
    batch: int
    median_s: float  # seconds per generation of `batch` images, on the clock
    per_sample_s: float
    times_s: list[float] = field(default_factory=list)  # round 1, 2, ...
    wall_times_s: list[float] = field(default_factory=list)
    vs_stock_eager: float | None = None  # stock eager time / this time (speedup)
    vs_stock_eager_ci: list[float] | None = None
    vs_stock_compiled: float | None = None
    vs_stock_compiled_ci: list[float] | None = None
    reuse_fraction: float | None = None


def stock_supported(loaded) -> str | None:
    """Why diffusers' DiTPipeline cannot run this model, or None when it can."""
    if loaded.vae is None:
        return "no VAE (DiTPipeline always decodes)"
    if loaded.null_class != 1000:
        return f"{loaded.num_classes} classes (DiTPipeline hard-codes null class 1000)"
    return None


def _labels(loaded, batch: int) -> list[int]:
    return cycle_labels(loaded.num_classes, batch, stride=7)


def _run(s: BenchSettings, cfg: ReuseConfig) -> RunConfig:
    return timed_run(RunConfig(reuse=cfg, sample=SampleConfig(steps=s.steps, cfg=s.cfg, sampler="ddim", seed=s.seed)))


def _case(loaded, labels, s: BenchSettings, cfg: ReuseConfig | None, executor: str | None = None,
          plan: Plan | None = None) -> tuple[Callable, Callable]:
    """A closure running one generation (`cfg` None: nothing attached), and one returning its last stats."""
    run = _run(s, cfg or ReuseConfig(enabled=False))
    last = []

    def one():
        gen = generate(loaded, labels, run, executor=executor, plan=plan)
        last[:] = [gen.stats]
        return gen

    return one, (lambda: last[0] if last else None)


def distilled_plan(loaded, labels, s: BenchSettings, cfg: ReuseConfig) -> Plan:
    """Run the dynamic decider once (eager) and freeze the decisions it took into a plan for the compiled path."""
    return executed_plan(loaded, labels, _run(s, cfg))


def _pipeline_case(loaded, labels, s: BenchSettings, transformer) -> Callable:
    from diffusers import DiTPipeline

    pipe = DiTPipeline(transformer=transformer, vae=loaded.vae, scheduler=make_scheduler("ddim", loaded.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    gen = lambda: [torch.Generator().manual_seed(s.seed + i) for i in range(len(labels))]  # noqa: E731
    return lambda: pipe(labels, num_inference_steps=s.steps, guidance_scale=s.cfg, generator=gen(), output_type="pt")


def _stock_case(loaded, labels, s: BenchSettings, transformer) -> Callable:
    """The stock model, nothing of dqar attached: diffusers' DiTPipeline where it runs the model, else dqar's no-reuse
    loop (bit-identical to it, tests/test_sampling.py) around `transformer`."""
    if s.stock and stock_supported(loaded) is None:
        return _pipeline_case(loaded, labels, s, transformer)
    model = replace(loaded, transformer=transformer)
    run = _run(s, ReuseConfig(enabled=False))
    return lambda: generate(model, labels, run)


@functools.lru_cache(maxsize=8)
def compiled_transformer(transformer):
    """The whole transformer under torch.compile, in the mode and dtype of dqar's compiled executor (default mode, static shapes)."""
    return torch.compile(transformer, dynamic=False)


def cases_for(loaded, batch: int, s: BenchSettings) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """Name → generation closure for one batch size, and name → stats getter."""
    labels = _labels(loaded, batch)
    runs, stats = {}, {}
    runs[STOCK_EAGER] = _stock_case(loaded, labels, s, loaded.transformer)
    if s.compile:
        runs[STOCK_COMPILED] = _stock_case(loaded, labels, s, compiled_transformer(loaded.transformer))
    off = ReuseConfig(enabled=False)
    runs["noreuse_eager"], stats["noreuse_eager"] = _case(loaded, labels, s, None)
    if s.compile:
        runs["noreuse_compiled"], stats["noreuse_compiled"] = _case(loaded, labels, s, off, "compiled")
        runs["noreuse_graph"], stats["noreuse_graph"] = _case(loaded, labels, s, off, "graph")  # one whole-model graph
    for name in s.presets:
        cfg = preset(name)
        runs[f"{name}_eager"], stats[f"{name}_eager"] = _case(loaded, labels, s, cfg, "patch")
        if s.compile and cfg.cfg_share == "none":  # CFG sharing runs on the patch executor only
            plan = None
            if cfg.gate:  # the gate's decisions, taken once eagerly, become a plan: zero syncs, compiled
                plan, cfg = distilled_plan(loaded, labels, s, cfg), replace(cfg, gate=False)
            runs[f"{name}_compiled"], stats[f"{name}_compiled"] = _case(loaded, labels, s, cfg, "compiled", plan)
            runs[f"{name}_graph"], stats[f"{name}_graph"] = _case(loaded, labels, s, cfg, "graph", plan)  # a graph per plan row
            if cfg.cache_dtype == "int8":  # same plan, model-dtype cache: the INT8 overhead
                model_cfg = replace(cfg, cache_dtype="model")
                runs[f"{name}_compiled_modeldtype"], stats[f"{name}_compiled_modeldtype"] = _case(loaded, labels, s, model_cfg, "compiled", plan)
    return runs, stats


def run_bench(loaded, device: torch.device, s: BenchSettings, progress: bool = True,
              on_batch: Callable[[dict], None] | None = None, clock=None) -> dict:
    """Time every case at every batch size; returns a JSON-ready dict.

    A case that raises during its warm-up is dropped from the timing and listed under "failed"
    with its error, so one broken backend does not cost the other rows. `on_batch` receives the
    result so far after each batch size (the CLI writes it, so a killed run keeps finished batches).
    `clock`: the timing clock (default: the device's; tests inject one).
    """
    clock = clock or clock_for(device)
    rows: list[BenchRow] = []
    failed: dict[str, str] = {}
    result = {"settings": asdict(s), "model": loaded.name, "device": _device_name(device), "dtype": str(loaded.transformer.dtype),
              "torch": torch.__version__, "clock": clock.name, "clock_method": clock.description,
              "stock": "DiTPipeline" if s.stock and stock_supported(loaded) is None else
              f"dqar's no-reuse loop around the stock transformer ({stock_supported(loaded) if s.stock else 'stock pipeline off'})",
              "rows": [], "failed": failed}
    for batch in s.batch_sizes:
        runs, stats = cases_for(loaded, batch, s)
        with tqdm(total=len(runs) * (s.warmup + s.repeats), desc=f"bench batch {batch}", disable=not progress) as bar:
            for name, error in warm_up(runs, s.warmup, on_step=lambda _: bar.update(1))[1].items():
                failed[f"{name}@{batch}"] = error
                del runs[name]
                bar.update(s.repeats)
            timed = round_robin(runs, clock, s.repeats, on_step=lambda _: bar.update(1))
        rows.extend(_rows(batch, timed, stats))
        result["rows"] = [asdict(r) for r in rows]
        if on_batch:
            on_batch(result)
    return result


def _rows(batch: int, timed: dict, stats: dict[str, Callable]) -> list[BenchRow]:
    times = {name: seconds(runs) for name, runs in timed.items()}
    refs = {ref: times.get(ref) for ref in (STOCK_EAGER, STOCK_COMPILED)}
    out = []
    for name, ts in times.items():
        st = stats[name]() if name in stats else None
        ratio = {ref: (median(t) / median(ts), ratio_ci(t, ts)) if t else (None, None) for ref, t in refs.items()}
        out.append(BenchRow(case=name, batch=batch, median_s=median(ts), per_sample_s=median(ts) / batch, times_s=ts,
                            wall_times_s=walls(timed[name]), vs_stock_eager=ratio[STOCK_EAGER][0], vs_stock_eager_ci=ratio[STOCK_EAGER][1],
                            vs_stock_compiled=ratio[STOCK_COMPILED][0], vs_stock_compiled_ci=ratio[STOCK_COMPILED][1],
                            reuse_fraction=st.reuse_fraction if st is not None else None))
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _ratio(v: float | None, ci: list[float] | None) -> str:
    if v is None:
        return "–"
    return f"{v:.2f}× [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{v:.2f}×"


def render_table(result: dict) -> str:
    """Markdown table of a bench result."""
    st = result["settings"]
    lines = [f"model {result['model']} · {result['device']} · {result['dtype']} · torch {result['torch']} · "
             f"DDIM {st['steps']} · CFG {st['cfg']} · median of {st['repeats']} rounds · clock: {result.get('clock_method', '')}",
             "", f"Stock: {result.get('stock', '')}. Ratios: stock time / case time, with 95% paired-bootstrap intervals "
             "(an interval that contains 1.00 is no difference on this machine).",
             "", "| batch | case | s / sample | vs stock eager | vs stock compiled | reuse % |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        ru = f"{100 * r['reuse_fraction']:.1f}" if r["reuse_fraction"] is not None else "–"
        lines.append(f"| {r['batch']} | {r['case']} | {r['per_sample_s']:.4f} | {_ratio(r['vs_stock_eager'], r['vs_stock_eager_ci'])} "
                     f"| {_ratio(r['vs_stock_compiled'], r['vs_stock_compiled_ci'])} | {ru} |")
    for case, error in result.get("failed", {}).items():
        lines.append(f"\nNot timed: {case} failed in warm-up — {error}")
    return "\n".join(lines)
