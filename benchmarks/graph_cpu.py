"""Thread-CPU time per generation: stock eager, torch.compile of the stock transformer, graph no-reuse, full_dqar on graph."""
import time, json, torch
from dataclasses import replace
torch.set_num_threads(1)
from dqar.models import load_model
from dqar.generate import generate
from dqar.engine.config import ReuseConfig, RunConfig, SampleConfig, preset
loaded = load_model("embedded")
labels = [i % 10 for i in range(8)]
def run(cfg): return RunConfig(reuse=cfg, sample=SampleConfig(steps=20, cfg=4.0, sampler="ddim", seed=0))
off = ReuseConfig(enabled=False)
comp = replace(loaded, transformer=torch.compile(loaded.transformer, dynamic=False))
cases = {
 "stock_eager": lambda: generate(loaded, labels, run(off)),
 "stock_compiled": lambda: generate(comp, labels, run(off)),
 "noreuse_graph": lambda: generate(loaded, labels, run(off), executor="graph"),
 "full_dqar_graph": lambda: generate(loaded, labels, run(preset("full_dqar")), executor="graph"),
 "full_dqar_compiled": lambda: generate(loaded, labels, run(preset("full_dqar")), executor="compiled"),
}
with torch.no_grad():
    for n, f in cases.items():
        t = time.time(); g = f(); print(n, "warm-up s", round(time.time() - t, 1), getattr(g, "stats", None) and {k: getattr(g.stats, k) for k in ("graphs", "fallback_evaluations", "compile_seconds", "reuse_fraction")}, flush=True)
    times = {n: [] for n in cases}
    for r in range(5):
        for n, f in cases.items():
            t = time.thread_time(); f(); times[n].append(time.thread_time() - t)
import statistics as st
med = {n: st.median(v) for n, v in times.items()}
print(json.dumps({n: round(v, 4) for n, v in med.items()}))
print("vs stock_compiled:", {n: round(med["stock_compiled"] / v, 3) for n, v in med.items()})
