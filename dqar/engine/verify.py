"""The verifying decider (`decider = "verify"`): one probe block computed in full checks the forecast of all the others.

At each evaluation inside the reuse window (after warm-up, before cool-down) the probe layer (`verify_probe`:
"first", "last" or an index) computes. Its history is stored only when the rest of the model refreshes, so the
forecast it reads has the age every other layer's forecast has; its fresh output is compared with that forecast,
`ε = mean|fresh − forecast| / mean|fresh|` (relative L1 of the stored value: the block's residual at block
granularity, the attention output at attention granularity). `ε > τ(progress) · verify_scale` (τ linear between the
`verify_tau` knots) refreshes the layers that run after the probe: the later layers of this evaluation, and the
earlier layers at the next one (probe "first": all of them at once; probe "last": all of them, one evaluation
later). Otherwise they reuse their forecast. A group reuses at least `verify_min_interval` and at most
`verify_max_interval` evaluations in a row; a decision those bounds force reads nothing. The earlier layers'
first evaluation after a refresh (or after warm-up) reuses unchecked: the error measured then is of the old history.

Streams: a probe with an image and a text stream (Flux, SD3 joint blocks) is judged by the max of the per-stream
errors, not an image-token-weighted mean: the text tokens are few (a weighted mean all but ignores them), yet
every later block attends to them, so a stale text stream spoils every image token. The max is reduced on the
device: still one scalar. On embedded-flux (12 steps) the text error stayed below the image's at every step, so
there both rules read the image error; the max only decides differently where the text stream drifts more.

CFG branches run as separate forwards (Flux's true CFG: "cond" then "uncond", `dqar.engine.branches`): an
evaluation is a denoising step, decided once, on the probe of the branch that runs it first; every later branch
of that step replays the same reuse and store rows (`replaying`) and its probe is not read. So both predictions
that CFG combines have the same age (a fresh cond against a stale uncond would put the staleness in the
difference that the guidance scale amplifies), both branch histories keep the same store pattern, plans and
intervals count steps, and a step costs one host read, not two. What this gives up: the uncond forecast is not
checked on its own. Measured (embedded-flux, 20 steps, true CFG 4, 4 prompts, τ at the median error): the two
branches' probe errors correlate at 0.99, uncond's is 12% higher on average, and its own verdict would match
cond's at 18 of 19 steps; deciding per branch would buy that one step at the price of mismatched ages.

Decisions are per generation (one for the whole batch). Reading ε is one device→host read of one scalar, at most
once per evaluation, counted in `ReuseStats.host_syncs`; with probe "first" it happens inside the forward, right
after the probe. Runs at block or attention granularity on every executor: "patch" (every family
`dqar.engine.adapter` describes), "flow_compiled" (the non-DiT families: `forwards` over compiled stock blocks),
"fused" / "compiled" (the DiT: the probe's block kernel returns its residual or attention output, which `observe`
compares; decisions stay outside every graph, so none recompiles) and "graph" (the DiT: an evaluation
it decides runs as two graphs, up to the probe and after it, with the verdict read on the host in between; a graph
per (rows before the probe, stores) and per (rows after it, stores), a handful, since each group's row is uniform).
"""
from __future__ import annotations

import numpy as np
import torch

from dqar.engine.plan import reuse_window
from dqar.engine.signals import Needs
from dqar.errors import DqarError

PROBES = ("first", "last")


def probe_index(probe, num_layers: int) -> int:
    """The probe's layer index: "first" 0, "last" L − 1, or the index itself (checked against the model)."""
    if probe == "first":
        return 0
    if probe == "last":
        return num_layers - 1
    if not 0 <= probe < num_layers:
        raise DqarError(f"verify_probe = {probe} does not exist in a {num_layers}-layer model",
                        f"use 'first', 'last' or an index in [0, {num_layers - 1}]")
    return int(probe)


def tau_schedule(knots, scale: float, num_evaluations: int) -> np.ndarray:
    """(E,) host thresholds: τ at each evaluation's progress e / (E − 1), linear between the (progress, τ) knots, × scale."""
    progress = np.arange(num_evaluations) / max(num_evaluations - 1, 1)
    xs, ys = zip(*knots)
    return np.interp(progress, xs, ys) * scale


def relative_l1(fresh: torch.Tensor, forecast: torch.Tensor) -> torch.Tensor:
    """mean|fresh − forecast| / mean|fresh| over the whole batch: () float32 on the device."""
    fresh = fresh.float()
    return (fresh - forecast.float()).abs().mean() / fresh.abs().mean().clamp_min(1e-12)


def stream_error(pairs) -> torch.Tensor:
    """The max over streams of `relative_l1` for (fresh, forecast) pairs, e.g. image (B, T, C) and text (B, S, C): ()."""
    errors = [relative_l1(fresh, forecast) for fresh, forecast in pairs]
    return errors[0] if len(errors) == 1 else torch.stack(errors).max()


class VerifyDecider:
    """Per generation: refresh decisions from the probe block's forecast error (module docstring)."""

    needs = Needs()  # the engine measures the probe itself (`observe`): no signal recorder
    verifies = True  # the engine calls `observe` when the probe computes
    name = "the verifying decider"

    def __init__(self, cfg):
        self.cfg = cfg
        self.probe = -1
        self.errors = np.zeros(0)  # (E,) ε read at each evaluation (NaN: not read), the last generation's

    def begin(self, ctx) -> None:
        e, l = ctx.num_evaluations, ctx.num_layers
        cfg = self.cfg
        self.num_layers, self.probe = l, probe_index(cfg.verify_probe, l)
        start, stop = reuse_window(cfg, e) if cfg.enabled else (e, e)
        self.active = np.zeros(e, dtype=bool)  # (E,) evaluations inside the reuse window
        self.active[start:stop] = True
        self.tau = tau_schedule(cfg.verify_tau, cfg.verify_scale, e)  # (E,)
        self.errors = np.full(e, np.nan)
        self.decisions = np.zeros((e, l), dtype=bool)  # (E, L) reuse rows as decided
        self.stores = np.ones((e, l), dtype=bool)  # (E, L) store rows as decided
        self.decided = -1  # the last evaluation decided: a later branch of it replays (module docstring)
        self.replaying = False  # the current forward is a later CFG branch of a decided evaluation
        self.replays = np.zeros(e, dtype=np.int64)  # (E,) forwards that replayed each evaluation's decision
        self.since_before = self.since_after = 0  # consecutive reuses of the layers before / after the probe
        self.reuse_before = True  # the verdict for the layers before the probe at the next evaluation
        self.probe_group_after = self.probe < l - 1  # the probe stores with the later layers (else with the earlier)
        self._row = self._store = ()

    def _set(self, e: int, before: bool, after: bool) -> tuple[bool, ...]:
        p, l = self.probe, self.num_layers
        row = (before,) * p + (False,) + (after,) * (l - p - 1)
        probe_stores = not (after if self.probe_group_after else before)
        self._row = row
        self._store = tuple(not r for r in row[:p]) + (probe_stores,) + tuple(not r for r in row[p + 1:])
        self.decisions[e], self.stores[e] = row, self._store
        return row

    def row(self, evaluation: int) -> tuple[bool, ...]:
        if evaluation <= self.decided:  # a later CFG branch of this step: the same rows, nothing measured
            self.replaying = True
            self.replays[evaluation] += 1
            self._row, self._store = tuple(self.decisions[evaluation].tolist()), tuple(self.stores[evaluation].tolist())
            return self._row
        self.replaying, self.decided = False, evaluation
        if not self.active[evaluation]:
            self.since_before = self.since_after = 0
            self.reuse_before = True  # the window opens on a fresh history: the earlier layers' first reuse is unchecked
            self._row, self._store = (False,) * self.num_layers, (True,) * self.num_layers
            self.decisions[evaluation], self.stores[evaluation] = self._row, self._store
            return self._row
        before = self.reuse_before and self.probe > 0
        self.since_before = self.since_before + 1 if before else 0
        return self._set(evaluation, before, True)  # the later layers' True is provisional: `verdict` decides it

    def store_row(self, evaluation: int) -> tuple[bool, ...]:
        return self._store

    def _forced(self, since: int, blind: bool = False) -> bool | None:
        """True reuse / False refresh where the interval bounds decide; None where the error does."""
        if since >= self.cfg.verify_max_interval:
            return False
        if since < self.cfg.verify_min_interval or blind:
            return True
        return None

    def verdict(self, evaluation: int, error: torch.Tensor | None) -> tuple[tuple[bool, ...], tuple[bool, ...], bool]:
        """The probe computed at an active evaluation, with forecast error `error` (() on the device; None: no history).

        Returns (reuse row, store row, whether ε was read to the host).
        """
        e, p, l = evaluation, self.probe, self.num_layers
        before_now = self._row[p - 1] if p else False  # the earlier layers' decision at this evaluation (taken at `row`)
        after = self._forced(self.since_after) if p < l - 1 else False
        nxt = e + 1 < len(self.active) and self.active[e + 1] and p > 0
        blind = not self.probe_group_after and not before_now  # the probe refreshes with the earlier layers now
        before = self._forced(self.since_before, blind) if nxt else False
        read = error is not None and (after is None or before is None)
        if read:
            self.errors[e] = float(error)  # the one device→host read of this evaluation
        ok = error is not None and bool(self.errors[e] <= self.tau[e])
        after = ok if after is None else after
        before = ok if before is None else before
        if p < l - 1:
            self.since_after = self.since_after + 1 if after else 0
        self.reuse_before = before
        row = self._set(e, before_now, after)
        return row, self._store, read


EXECUTORS = ("patch", "fused", "compiled", "flow_compiled", "graph")  # graph: two graphs per evaluation (`dqar.engine.graph`)


def check(engine_cfg, layout, executor: str) -> None:
    """One line where the verifying decider cannot run: K/V targets. Every described family and executor runs it."""
    if executor not in EXECUTORS:
        raise DqarError(f"the verifying decider runs on {', '.join(EXECUTORS)}, not '{executor}'", "use executor = 'patch'")
    if engine_cfg.target == "kv":
        raise DqarError("the verifying decider compares cached attention or block outputs, not K/V", "use target = 'attention'")
    if engine_cfg.verify_per_sample and executor != "patch":
        raise DqarError(f"per-sample refresh splits the batch between blocks: it runs on the 'patch' executor, not '{executor}'",
                        "use executor = 'patch', or verify_per_sample = false")


def observe(engine, layer: int, *fresh: torch.Tensor | None) -> None:
    """The probe computed `fresh`, one tensor per output stream in slot order (image (B, T, C), text (B, S, C) or None),
    before it is stored: measure ε against its forecast and apply the verdict (not in a replaying CFG branch)."""
    st, decider = engine.state, engine.verifier
    if decider.replaying or not decider.active[st.evaluation]:
        return
    slot = engine.slots[layer]
    pairs = [(f, st.cache.read(slot + i, count=False)) for i, f in enumerate(fresh) if f is not None and st.cache.has(slot + i)]
    error = stream_error(pairs) if pairs and st.cache.has(slot) else None  # ()
    st.row, st.store, read = decider.verdict(st.evaluation, error)
    st.host_syncs += read
