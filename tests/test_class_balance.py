"""Site-local class balancing and image jitter (issue 20): a plan may carry a rule
(``class_weights = "balanced"`` or ``"logit-adjust"``) that each site turns into numbers from its
own training labels; the rule, never a site's numbers, is in the plan and its hash; malformed values
are refused naming them; record-level DP refuses the rule (its weights depend on the data)."""
from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from insitu.data.dataset import FederatedData, SiteData
from insitu.errors import ConfigError, ProtocolError
from insitu.federation.task import TaskSpec
from insitu.learn.balance import ClassBalance, balanced_weights, label_counts, log_prior
from insitu.learn.train import TrainConfig, loss_fn, random_jitter, site_loss, train_local
SHAPE = (1, 28, 28)


def tiny_images() -> FederatedData:
    """Three sites of 8×8 images with very different label mixes (10 %, 50 %, 85 % positive, exact)."""
    g = torch.Generator().manual_seed(7)

    def split(n: int, pos: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.zeros(n)
        y[:pos] = 1.0
        X = torch.randn(n, 1, 8, 8, generator=g) + (2 * y - 1).view(-1, 1, 1, 1) * 0.5
        return X, y

    sites = tuple(SiteData(f"s{i}", *split(40, p), *split(10, max(1, p // 4)), *split(10, max(1, p // 4)))
                  for i, p in enumerate((4, 20, 34)))
    return FederatedData("skewed", sites, (1, 8, 8), 2, ("image",))


def _plan(**opts):
    from insitu.apps.simulate import SimulationConfig

    return SimulationConfig(dataset="pneumoniamnist", data="x.npz", **opts).resolved().plan_for(SHAPE, 1, ("image",))


def test_balanced_weights_and_prior_from_the_labels_known_answer():
    y = torch.tensor([0, 1, 1, 1, 1, 1, 1, 1.0])  # 1 normal, 7 pneumonia
    assert label_counts(y, 2) == [1, 7]
    assert balanced_weights(y, 2) == pytest.approx((8 / 2, 8 / 14))
    assert log_prior(y, 2) == pytest.approx((math.log(2 / 10), math.log(8 / 10)))
    assert balanced_weights(torch.ones(5), 2) == (1.0, 0.5)  # an absent class gets 1 (no record uses it)
    assert all(math.isfinite(v) for v in log_prior(torch.ones(5), 2))  # smoothed: a missing class stays finite
    yc = torch.tensor([0, 2, 2, 2])
    assert balanced_weights(yc, 3) == pytest.approx((4 / 3, 1.0, 4 / 9))


def test_site_loss_turns_the_rule_into_numbers_from_the_given_labels():
    out = torch.tensor([[0.3], [-1.2], [2.0], [0.1]])
    y = torch.tensor([1.0, 0.0, 1.0, 1.0])
    each = torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1), y, reduction="none")
    w = torch.tensor([4 / 6, 2.0, 4 / 6, 4 / 6])  # 1 normal, 3 pneumonia: n / (2 n_c)
    assert float(site_loss(1, ClassBalance.BALANCED, y)(out, y)) == pytest.approx(float((each * w).mean()))
    shift = math.log(4 / 6) - math.log(2 / 6)  # log(π₁/π₀), smoothed (3+1)/(4+2) over (1+1)/(4+2)
    adj = torch.nn.functional.binary_cross_entropy_with_logits(out.squeeze(-1) + shift, y)
    assert float(site_loss(1, ClassBalance.LOGIT_ADJUST, y)(out, y)) == pytest.approx(float(adj))
    assert float(site_loss(1, (1.0, 0.5), y)(out, y)) == pytest.approx(float(loss_fn(1, (1.0, 0.5))(out, y)))
    logits = torch.randn(4, 3)
    yc = torch.tensor([0, 2, 2, 1])
    prior = torch.tensor(log_prior(yc, 3))
    want = torch.nn.functional.cross_entropy(logits + prior, yc)
    assert float(site_loss(3, ClassBalance.LOGIT_ADJUST, yc)(logits, yc)) == pytest.approx(float(want))


def test_training_with_the_rule_equals_training_with_that_sites_own_numbers():
    data = tiny_images()
    a, b = data.sites[0], data.sites[1]  # 5 % and 90 % positive
    task = TaskSpec(model="cnn", input_shape=(1, 8, 8), num_outputs=1, schema=("image",), lr=0.05, local_steps=4, batch_size=16)

    def trained(weights, site):
        model = task.build_model(0)
        cfg = TrainConfig(lr=0.05, steps=4, batch_size=16, class_weights=weights)
        train_local(model, site.X_train, site.y_train, cfg, torch.Generator().manual_seed(3), num_outputs=1)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    rule_a = trained(ClassBalance.BALANCED, a)
    assert torch.equal(rule_a, trained(balanced_weights(a.y_train, 2), a))
    assert not torch.equal(rule_a, trained(balanced_weights(b.y_train, 2), a))  # not another site's numbers


def test_every_site_in_a_federation_weighs_with_its_own_label_counts(monkeypatch):
    import insitu.learn.train as train

    from insitu.apps.simulate import simulate

    seen: list[list[int]] = []
    real = train.balanced_weights

    def spy(y, k):
        seen.append(label_counts(y, k))
        return real(y, k)

    monkeypatch.setattr(train, "balanced_weights", spy)
    data = tiny_images()
    s = simulate(data=data, rounds=2, local_steps=2, lr=0.05, batch_size=16, optimizer="sgd", class_weights="balanced",
                 baselines=False, write=False)
    own = sorted(label_counts(site.y_train, 2) for site in data.sites)
    assert sorted(seen) == sorted(own * 2)  # each site, each round, its own training labels and no one else's
    assert s["config"]["class_weights"] == "balanced"


def test_the_rule_is_in_the_plan_and_hash_and_plans_without_it_keep_theirs():
    fixed, balanced, adjust, none = (_plan(class_weights=v) for v in ("1,0.5", "balanced", "logit-adjust", "none"))
    assert balanced.task.class_weights is ClassBalance.BALANCED and adjust.task.class_weights is ClassBalance.LOGIT_ADJUST
    assert balanced.task.to_meta()["class_weights"] == "balanced"  # the rule travels, not numbers
    assert fixed.task.to_meta()["class_weights"] == [1.0, 0.5]
    assert "class_weights" not in none.task.to_meta() and "augment_jitter" not in fixed.task.to_meta()
    assert len({p.content_hash() for p in (fixed, balanced, adjust, none)}) == 4
    for p in (balanced, adjust):
        assert TaskSpec.from_meta(p.task.to_meta()) == p.task
        assert type(p).from_meta(p.to_meta()).content_hash() == p.content_hash()
    assert balanced.task.train_config().class_weights is ClassBalance.BALANCED


@pytest.mark.parametrize("bad", ["balancd", "Balanced-ish", "1,heavy"])
def test_a_malformed_rule_is_refused_naming_it(bad):
    with pytest.raises(ConfigError, match=f"balanced, logit-adjust.*{bad}"):
        _plan(class_weights=bad)


@pytest.mark.parametrize("bad", ["balancd", ["balanced"], 3, {"rule": "balanced"}, True])
def test_a_malformed_rule_from_a_peer_is_refused(bad):
    meta = _plan(class_weights="balanced").task.to_meta()
    with pytest.raises(ProtocolError, match="class_weights"):
        TaskSpec.from_meta({**meta, "class_weights": bad})


def test_record_level_dp_refuses_the_rule_and_keeps_fixed_weights():
    from insitu.learn.dpsgd import per_sample_loss

    with pytest.raises(ConfigError, match="record-level DP's clip bound.*fixed weights"):
        _plan(class_weights="balanced", dp="record", epsilon=3.0)
    with pytest.raises(ConfigError, match="logit-adjust"):
        _plan(class_weights="logit-adjust", dp="record", epsilon=3.0)
    p = _plan(class_weights="1,0.5", dp="record", epsilon=3.0)  # fixed numbers stay allowed under DP-SGD
    assert p.task.class_weights == (1.0, 0.5)
    site = _plan(class_weights="balanced", dp="site", epsilon=3.0)  # site level clips the whole update: allowed
    assert site.task.class_weights is ClassBalance.BALANCED
    with pytest.raises(ConfigError, match="fixed class weights only"):
        per_sample_loss(1, ClassBalance.BALANCED)


def test_dpsgd_trains_with_fixed_weights_and_refuses_a_rule():
    from insitu.learn.dpsgd import DPSGDConfig, dp_sgd_train

    data = tiny_images()
    site = data.sites[0]
    task = TaskSpec(model="cnn", input_shape=(1, 8, 8), num_outputs=1, schema=("image",), lr=0.05, local_steps=2, batch_size=16)
    dp = DPSGDConfig(noise_multiplier=1.0, clip=1.0, sampling_rate=0.2)
    model = task.build_model(0)
    out = dp_sgd_train(model, site.X_train, site.y_train, TrainConfig(lr=0.05, steps=2, class_weights=(1.0, 0.5)), dp,
                      torch.Generator().manual_seed(0), num_outputs=1, noise_generator=torch.Generator().manual_seed(1))
    assert out["steps"] == 2
    with pytest.raises(ConfigError, match="fixed class weights only"):
        dp_sgd_train(task.build_model(0), site.X_train, site.y_train, TrainConfig(lr=0.05, steps=2, class_weights=ClassBalance.BALANCED),
                    dp, torch.Generator().manual_seed(0), num_outputs=1)


def test_jitter_rotates_scales_and_stretches_contrast_reproducibly():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 1, 28, 28, generator=g)
    a = random_jitter(x, (10.0, 0.1, 0.2), torch.Generator().manual_seed(5))
    b = random_jitter(x, (10.0, 0.1, 0.2), torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.allclose(a, x, atol=1e-3)
    c = random_jitter(x, (0.0, 0.0, 0.5), torch.Generator().manual_seed(5))  # contrast only: the mean of each image stays
    assert torch.allclose(c.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-5) and not torch.allclose(c, x, atol=1e-3)
    stretch = (c - c.mean(dim=(2, 3), keepdim=True)).flatten(1).norm(dim=1) / (x - x.mean(dim=(2, 3), keepdim=True)).flatten(1).norm(dim=1)
    assert float(stretch.min()) >= 0.5 - 1e-5 and float(stretch.max()) <= 1.5 + 1e-5
    rot = random_jitter(x, (45.0, 0.0, 0.0), torch.Generator().manual_seed(5))  # geometry only: pixels move, range kept
    assert float(rot.min()) >= float(x.min()) - 1e-6 and float(rot.max()) <= float(x.max()) + 1e-6


def test_jitter_is_a_plan_field_checked_and_hashed():
    on, off = _plan(augment_jitter="10,0.1,0.2"), _plan()
    assert on.task.augment_jitter == (10.0, 0.1, 0.2) and on.task.to_meta()["augment_jitter"] == [10.0, 0.1, 0.2]
    assert on.task.train_config().augment_jitter == (10.0, 0.1, 0.2)
    assert "augment_jitter" not in off.task.to_meta() and on.content_hash() != off.content_hash()
    assert TaskSpec.from_meta(on.task.to_meta()) == on.task
    assert _plan(augment_jitter="none").content_hash() == replace(off, task=replace(off.task, augment_jitter=None)).content_hash()
    for bad in ("10,0.1", "90,0.1,0.2", "0,0,0", "10,a,0.2"):
        with pytest.raises(ConfigError, match=f"augment_jitter must be three numbers.*{bad}" if "a" in bad else "augment_jitter must be three"):
            _plan(augment_jitter=bad)
    with pytest.raises(ProtocolError, match="augment_jitter"):
        TaskSpec.from_meta({**on.task.to_meta(), "augment_jitter": [10, 0.1, float("nan")]})


def test_a_deployed_job_carries_the_rule_and_jitter_and_refuses_malformed_ones():
    from insitu.coordinator.jobs import JobSpec

    job = {"name": "x", "sites": ["a", "b"], "dataset": "pneumoniamnist", "rounds": 2,
           "task": {"input_shape": [1, 28, 28], "num_outputs": 1, "schema": ["image"]}}
    spec = JobSpec.from_dict({**job, "class_weights": "balanced", "augment_jitter": [10, 0.1, 0.2]})
    assert spec.plan.task.class_weights is ClassBalance.BALANCED and spec.plan.task.augment_jitter == (10.0, 0.1, 0.2)
    with pytest.raises(ConfigError, match="'balansed'"):
        JobSpec.from_dict({**job, "class_weights": "balansed"})
    with pytest.raises(ConfigError, match=r"augment_jitter must be three numbers.*\[10\]"):
        JobSpec.from_dict({**job, "augment_jitter": [10]})
