"""The flow_compiled executor: patch's outputs and stats within float32 tolerance, no recompile in a second generation,
one-line refusals, and the process-wide compiled copies and FLOP counts (random-flux-tiny, 3 steps, true CFG)."""
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

import dqar
from dqar.engine.api import resolve_executor
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
from dqar.engine.flow_compiled import stock_forwards
from dqar.errors import DqarError
from dqar.generate import generate
from dqar.models import load_model

from conftest import make_tiny_transformer

# compiled graphs round differently in the last bit; under INT8 a value at a rounding boundary lands one INT8 step
# apart, which the following evaluations carry (as for the DiT's compiled executor, tests/test_compiled.py)
TOLERANCE = dict(atol=2e-3, rtol=1e-3)
CONFIGS = {
    "full_dqar": preset("full_dqar"),  # block granularity, anchored INT8 history, forecast order 2
    "attention_model": ReuseConfig(schedule="constant", cache_dtype="model"),  # attention granularity, copies
}


@pytest.fixture(scope="module")
def flux():
    return load_model("random-flux-tiny")


def _run(cfg: ReuseConfig, steps: int = 3) -> RunConfig:
    return RunConfig(reuse=cfg, sample=SampleConfig(steps=steps, cfg=4.0, seed=0))  # true CFG: cond and uncond forwards


@pytest.mark.parametrize("name", list(CONFIGS))
def test_flow_compiled_matches_patch(flux, name):
    """Same plan on both executors: identical reuse mask, FLOPs and bytes; latents within float32 + INT8-step tolerance."""
    run = _run(CONFIGS[name])
    ref = generate(flux, [0], run, executor="patch")
    got = generate(flux, [0], run, executor="flow_compiled")
    assert got.executor == "flow_compiled" and got.stats.reused > 0
    assert got.stats.reuse_mask == ref.stats.reuse_mask
    assert got.stats.flops_skipped == ref.stats.flops_skipped and got.stats.cache_bytes_peak == ref.stats.cache_bytes_peak
    torch.testing.assert_close(got.output.latents, ref.output.latents, **TOLERANCE)


class _Seen(dict):
    """The process's compiled copies, recording which keys a generation asks for."""

    def __init__(self, copies):
        super().__init__(copies)
        self.seen = set()

    def get(self, key, default=None):
        self.seen.add(key)
        return super().get(key, default)


def test_a_second_generation_never_recompiles(flux, monkeypatch):
    """Every copy compiles in the first generation; the second (a new attachment) runs them with recompiles an error,
    and asks for one copy per block spec (at this run's shapes: other tests' shapes have copies of their own)."""
    run = _run(preset("full_dqar"))
    generate(flux, [0], run, executor="flow_compiled")
    graphs = counters["stats"]["unique_graphs"]
    seen = _Seen(stock_forwards().copies)
    monkeypatch.setattr(stock_forwards(), "copies", seen)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = generate(flux, [0], run, executor="flow_compiled")
    assert counters["stats"]["unique_graphs"] == graphs and out.stats.reused > 0
    specs = [key[0] for key in seen.seen]
    assert specs.count("FluxTransformerBlock") == specs.count("FluxSingleTransformerBlock") == 1  # shared by same-spec blocks


def test_refusals_are_one_line_and_leave_the_model_untouched(flux):
    t = flux.transformer
    cases = [(replace(preset("full_dqar"), gate=True), "measure inside eager forwards"),
             (ReuseConfig(target="kv"), "not K/V")]
    for cfg, words in cases:
        with pytest.raises(DqarError, match=words) as err:
            dqar.enable(t, cfg, executor="flow_compiled")
        assert "\n" not in str(err.value) and not hasattr(t, "_diffusers_hook")
    with pytest.raises(DqarError, match="compiled path of the families the DiT kernels do not run"):
        dqar.enable(make_tiny_transformer(num_layers=2), preset("full_dqar"), executor="flow_compiled")


def test_auto_stays_patch_on_the_cpu_and_detach_restores(flux):
    t = flux.transformer
    executor, why = resolve_executor(t, preset("full_dqar"), None)
    assert executor == "patch" and why == "patch: not on CUDA"
    with dqar.enable(t, preset("full_dqar"), executor="flow_compiled") as h:
        assert h.executor == "flow_compiled" and hasattr(t, "_diffusers_hook")
    assert not hasattr(t, "_diffusers_hook")


def test_a_failing_compile_is_one_line(flux, monkeypatch):
    """A compiler that fails at the first call of a new copy (here a new batch shape): one line naming the block spec."""
    import dqar.engine.flow_compiled as fc
    from dqar.engine.variants import own_code

    def no_compiler(gm, example_inputs):
        raise RuntimeError("no compiler on this machine")

    monkeypatch.setattr(fc, "compiled_copy", lambda fn, name, mode: torch.compile(own_code(fn, name), backend=no_compiler))
    with pytest.raises(DqarError, match="torch.compile of the stock Flux.*Block forward failed: .*no compiler") as err:
        generate(flux, [0, 1, 2], _run(preset("full_dqar"), steps=2), executor="flow_compiled")
    assert "\n" not in err.value.problem and not hasattr(flux.transformer, "_diffusers_hook")
