"""The learned policy with the probe feature (`features.PROBE_FEATURES`): traces, training, decisions; policies trained
without it keep their 8 features and act as before."""
import numpy as np
import pytest

import dqar
from dqar.engine import policy as policy_module
from dqar.engine.config import ReuseConfig
from dqar.engine.features import FEATURES, MISSING_CHANGE, PROBE_FEATURES, PROBE_LAYER
from dqar.engine.policy import PolicyDecider
from dqar.engine.policy_net import PolicyCheckpoint, load_policy, save_policy
from dqar.engine.signals import relative_change
from dqar.errors import DqarError
from dqar.tuning.collect import CollectSettings, collect_traces, load_traces, save_traces
from dqar.tuning.train import TrainSettings, train_policy

from conftest import E, CountSyncs, constant_checkpoint, drive, make_tiny_transformer, tiny_loaded

SCHEDULE = dict(schedule="constant", warmup_frac=0.1, refresh_interval=4, max_staleness=3)
COLLECT = dict(generations=4, batch=1, steps=6, max_age=3, entropy_rows=4)


@pytest.fixture(scope="module")
def model():
    return make_tiny_transformer(num_layers=4)


@pytest.fixture(scope="module")
def both_traces():
    loaded = tiny_loaded()
    plain = collect_traces(loaded, CollectSettings(**COLLECT), progress=False)
    probe = collect_traces(loaded, CollectSettings(**COLLECT, probe_feature=True), progress=False)
    return plain, probe


def zero_policy(log_error: float, features=PROBE_FEATURES) -> PolicyCheckpoint:
    """A policy predicting exp(log_error) everywhere, over the feature set `features`."""
    return constant_checkpoint(log_error, features, {"num_layers": 4, "entropy_rows": 4})


def test_probe_traces_add_one_column_and_keep_the_others(both_traces, tmp_path):
    plain, probe = both_traces
    assert plain.features.shape[1] == len(FEATURES) and probe.features.shape[1] == len(PROBE_FEATURES)
    assert np.array_equal(plain.features, probe.features[:, : len(FEATURES)])  # the 8 features are the same numbers
    col = probe.features[:, -1]
    assert np.all(col[probe.evaluation == 1] == np.log(MISSING_CHANGE))  # no probe change before evaluation 2
    for g in np.unique(probe.group):  # one value per (generation, evaluation): the probe's, for every layer
        for e in range(2, COLLECT["steps"]):
            values = col[(probe.group == g) & (probe.evaluation == e)]
            assert np.ptp(values) == 0
    assert len(np.unique(col)) > COLLECT["steps"]
    path = tmp_path / "probe.npz"
    save_traces(probe, path)
    assert tuple(load_traces(path).meta["features"]) == PROBE_FEATURES


def test_a_probe_policy_trains_round_trips_and_never_reuses_the_probe(both_traces, tmp_path):
    result = train_policy(both_traces[1], TrainSettings(hidden=(16, 16), epochs=5, batch_size=64), progress=False)
    path = tmp_path / "probe_policy.safetensors"
    save_policy(result.checkpoint, path)
    ckpt = load_policy(path)
    assert tuple(ckpt.meta["features"]) == PROBE_FEATURES and ckpt.feature_mean.shape == (len(PROBE_FEATURES),)
    counter = CountSyncs()
    cfg = ReuseConfig(**SCHEDULE, policy=str(path), policy_threshold=1.0)
    three = tiny_loaded().transformer  # the model the traces were collected on
    with dqar.enable(three, cfg) as h:
        drive(three, h, guard=counter)
        mask, stats = np.array(h.stats.reuse_mask, dtype=bool), h.stats
        assert h.engine.decider.probe == PROBE_LAYER
    assert not mask[:, PROBE_LAYER].any() and mask[:, 1:].any()
    assert stats.host_syncs == counter.count <= E - 1


def test_the_feature_read_while_sampling_is_the_probes_last_change(model, tmp_path, monkeypatch):
    path = tmp_path / "zero.safetensors"
    save_policy(zero_policy(0.0), path)  # predicts error 1: never reuses, every layer computes
    seen, outs = {}, []
    build = policy_module.feature_matrix

    def spy(**kwargs):
        seen[len(seen) + 1] = float(kwargs["probe_error"])  # evaluations 1.. in order: every one has candidates
        return build(**kwargs)

    monkeypatch.setattr(policy_module, "feature_matrix", spy)
    hook = model.transformer_blocks[PROBE_LAYER].attn1.register_forward_hook(lambda m, a, out: outs.append(out.detach()))
    try:
        with dqar.enable(model, ReuseConfig(**{**SCHEDULE, "warmup_frac": 0.0}, policy=str(path), policy_threshold=0.5)) as h:
            drive(model, h)
            assert h.stats.reused == 0
    finally:
        hook.remove()
    assert len(outs) == E and sorted(seen) == list(range(1, E))
    assert seen[1] == MISSING_CHANGE
    for e in range(2, E):
        assert seen[e] == pytest.approx(float(relative_change(outs[e - 1], outs[e - 2])), rel=1e-5)


def test_policies_without_the_probe_feature_keep_eight_features(model, tmp_path):
    from dqar.studies.fidelity.policy_eval import shipped_policy

    for ckpt in (load_policy(shipped_policy()), load_policy(shipped_policy().with_name("policy_order2.safetensors"))):
        assert tuple(ckpt.meta["features"]) == FEATURES
        assert PolicyDecider(ReuseConfig(**SCHEDULE, policy="x"), checkpoint=ckpt).probe is None
    path = tmp_path / "plain.safetensors"
    save_policy(zero_policy(-20.0, FEATURES), path)  # always reuse: the probe layer reuses too
    with dqar.enable(model, ReuseConfig(**SCHEDULE, policy=str(path), policy_threshold=0.5)) as h:
        drive(model, h)
        assert np.array(h.stats.reuse_mask, dtype=bool)[:, PROBE_LAYER].any()


def test_a_checkpoint_naming_another_feature_set_is_refused(tmp_path):
    path = tmp_path / "odd.safetensors"
    ckpt = zero_policy(0.0)
    save_policy(PolicyCheckpoint(ckpt.net, ckpt.feature_mean, ckpt.feature_std, 0.0, 1.0,
                                 {**ckpt.meta, "features": [*FEATURES, "log_other"]}), path)
    with pytest.raises(DqarError, match="none of this version's sets"):
        load_policy(path)
