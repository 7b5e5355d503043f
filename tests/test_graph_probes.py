"""CUDA-only failure modes of the graph executor, caught on the CPU.

Under `mode="reduce-overhead"` inductor captures a CUDA graph only if every input the graph mutates has a static
address, it skips capture on a graph break or a recompile, and a replay overwrites the same output buffer each call.
None of that shows on a CPU run with the default mode; these probes look at what the compiler is handed instead:
an aot backend reads which inputs are mutated and which are static, `torch._dynamo.explain` counts graphs and breaks,
dynamo's `error_on_recompile` guards the second generation, and a fake replay hands out one persistent buffer.
"""
import contextlib

import pytest
import torch
from torch._functorch.aot_autograd import aot_module_simplified
from torch._guards import TracingContext

import dqar
from dqar.engine.config import ReuseConfig

from conftest import drive, make_tiny_transformer

E = 6
KINDS = {
    "model": ReuseConfig(schedule="constant", warmup_frac=0.0),
    "int8": ReuseConfig(schedule="constant", warmup_frac=0.0, cache_dtype="int8"),
    "anchored": ReuseConfig(schedule="constant", granularity="block", forecast_order=2, refresh_interval=3, max_staleness=2,
                            warmup_frac=0.0, cache_dtype="int8"),
}


@pytest.fixture
def model():
    """A fresh model per test: the graph executor keeps a model's compiled graphs across handles."""
    return make_tiny_transformer(num_layers=2)


class Probe:
    """Stands in for `torch.compile`: every compiled copy goes through an aot backend that records what it is handed."""

    def __init__(self, wrap=None):
        self.graphs: list[dict] = []  # per compiled graph: inputs, static indices, mutated indices
        self.calls: list[tuple] = []  # (the function compiled, the args of its first call)
        self.wrap = wrap or (lambda fn: fn)

    def backend(self, gm, example_inputs):
        def forward(g, inputs):
            meta = TracingContext.try_get().fw_metadata
            self.graphs.append({"inputs": inputs, "static": set(meta.static_input_indices),
                                "mutated": {i for i, info in enumerate(meta.input_info) if info.mutates_data}})
            return g
        return aot_module_simplified(gm, example_inputs, fw_compiler=forward)

    def compile(self, fn=None, **kwargs):
        kwargs.pop("mode", None), kwargs.pop("backend", None)
        compiled = self.original(fn, backend=self.backend, **kwargs)

        def first_call(*args, **kw):
            if not any(f is fn for f, _ in self.calls):
                self.calls.append((fn, args))
            return compiled(*args, **kw)
        return self.wrap(first_call)

    @contextlib.contextmanager
    def installed(self, monkeypatch):
        torch._dynamo.reset()
        self.original = torch.compile
        monkeypatch.setattr(torch, "compile", self.compile)
        yield self
        monkeypatch.setattr(torch, "compile", self.original)
        torch._dynamo.reset()


def _per_evaluation(t: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a graph input is one of the values that change every evaluation: latents, timestep, labels, forecast weights."""
    latents = t.shape == x.shape and t.is_floating_point()
    per_row = t.ndim == 1 and t.shape[0] == x.shape[0]  # (B,) timestep or labels
    weights = t.is_floating_point() and t.ndim == 2 and t.shape[0] == 2  # (L, K) forecast weights of the 2 layers
    index = t.ndim == 0 and not t.is_floating_point()  # an evaluation index into a static weight table
    return latents or per_row or weights or index


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_mutated_graph_input_is_static(model, kind, monkeypatch):
    """A mutated input without a static address makes inductor skip the CUDA graph ("mutated inputs")."""
    x = torch.zeros(4, 4, 8, 8)
    with Probe().installed(monkeypatch) as probe, dqar.enable(model, KINDS[kind], executor="graph") as h:
        drive(model, h, evaluations=E)
    assert probe.graphs, "the graph executor compiled nothing"
    for g in probe.graphs:
        assert g["mutated"], "the history is updated in place inside the graph"
        assert g["mutated"] <= g["static"], f"mutated inputs without a static address: {sorted(g['mutated'] - g['static'])}"
        moving = [i for i, t in enumerate(g["inputs"]) if i not in g["static"]]
        assert all(_per_evaluation(g["inputs"][i], x) for i in moving), \
            [(i, tuple(g["inputs"][i].shape), g["inputs"][i].dtype) for i in moving]
        assert 3 <= len(moving) <= 4  # latents, timestep, labels (+ weights when forecasting)


def test_each_pattern_is_one_graph_without_breaks(model, monkeypatch):
    cfg = KINDS["anchored"]
    with Probe().installed(monkeypatch) as probe, dqar.enable(model, cfg, executor="graph") as h:
        drive(model, h, evaluations=E)
        patterns = h.stats.graphs
        assert patterns >= 2 and len(probe.calls) == patterns
        for fn, args in probe.calls:
            with torch.no_grad():  # as sampling runs: the blocks are nested compile regions (dqar.engine.graph._region)
                explained = torch._dynamo.explain(fn)(*args)
            assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def _drive_stride0(model, handle, evaluations=E):
    """`drive` with the timestep as the samplers pass it: one scalar expanded to the batch (a stride-0 view)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 4, 8, 8, generator=g)  # (2N, C, H, W)
    labels = torch.tensor([3, 7, 1000, 1000])
    handle.begin_generation(evaluations)
    outs = []
    with torch.no_grad():
        for e in range(evaluations):
            t = torch.tensor(999 - 80 * e).expand(x.shape[0])  # (2N,) stride 0
            outs.append(model(x, timestep=t, class_labels=labels).sample)
            x = x - 0.05 * outs[-1][:, :4]
    handle.end_generation()
    return outs


@pytest.mark.parametrize("kind", ["model", "anchored"])
def test_second_generation_never_recompiles(model, kind, monkeypatch):
    with Probe().installed(monkeypatch) as probe, dqar.enable(model, KINDS[kind], executor="graph") as h:
        first = _drive_stride0(model, h)
        compiled = len(probe.graphs)
        with torch._dynamo.config.patch(error_on_recompile=True):
            second = _drive_stride0(model, h)
        assert len(probe.graphs) == compiled
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def _replay_into_one_buffer(fn):
    """A fake CUDA-graph replay: every call writes its result into one persistent buffer and returns that buffer."""
    out: list[torch.Tensor] = []

    def replay(*args, **kwargs):
        result = fn(*args, **kwargs)
        if not torch.is_tensor(result):
            return result
        if not out:
            out.append(torch.empty_like(result))
        return out[0].copy_(result)
    return replay


@pytest.mark.parametrize("kind", ["model", "anchored"])
def test_outputs_survive_a_replay_that_overwrites_its_buffer(model, kind, monkeypatch):
    cfg = KINDS[kind]
    with Probe(_replay_into_one_buffer).installed(monkeypatch), dqar.enable(model, cfg, executor="graph") as h:
        got = drive(model, h, evaluations=E)
    with dqar.enable(model, cfg, executor="patch") as h:
        want = drive(model, h, evaluations=E)
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


def test_blocks_are_nested_compile_regions_while_sampling(model, monkeypatch):
    """Under no_grad each pattern's graph calls its blocks as invoke_subgraph regions (compiled once per decision);
    with DQAR_NESTED_REGIONS=0 the region wrapper is the plain layer function."""
    from dqar.engine import graph as G

    cfg = KINDS["anchored"]
    with Probe().installed(monkeypatch) as probe, dqar.enable(model, cfg, executor="graph") as h:
        drive(model, h, evaluations=E)
        fn, args = probe.calls[0]
        with torch.no_grad():
            explained = torch._dynamo.explain(fn)(*args)
    code = explained.graphs[0].code
    assert "invoke_subgraph" in code and code.count("invoke_subgraph(") >= 2  # one call per block
    monkeypatch.setenv("DQAR_NESTED_REGIONS", "0")
    assert G._region(G.layer) is G.layer
