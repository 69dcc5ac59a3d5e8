"""Declarative model specifications: validated, canonical, built by the site, capped by policy; the
built-in models written as specifications are the same networks (parameters and outputs)."""
from __future__ import annotations

import copy
import hashlib
import json

import numpy as np
import pytest
import torch

from insitu.errors import ConfigError, PolicyViolation
from insitu.learn.models import build_model, get_flat, num_params
from insitu.learn.spec import (BUILTIN_SPECS, ModelPolicy, build_from_spec, canonical_json, count_params,
                               validate_spec)


@pytest.mark.parametrize("name, shape, outputs", [
    ("logreg", (13,), 1), ("mlp", (13,), 1), ("logreg", (1, 28, 28), 1), ("mlp", (1, 28, 28), 3),
    ("cnn", (1, 28, 28), 1), ("cnn", (28, 28), 2), ("cnn", (3, 28, 28), 4),
])
def test_builtin_models_as_specs_are_the_same_networks(name, shape, outputs):
    for seed in (0, 7):
        old = build_model(name, shape, outputs, seed=seed)
        new = build_from_spec(BUILTIN_SPECS[name], shape, outputs, seed=seed)
        assert num_params(new) == num_params(old) == count_params(BUILTIN_SPECS[name], shape, outputs)
        np.testing.assert_array_equal(get_flat(new), get_flat(old))  # same initial parameters, same order
        x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(seed))
        old.eval(), new.eval()
        with torch.no_grad():
            torch.testing.assert_close(new(x), old(x), rtol=0, atol=0)


def test_canonical_json_fills_defaults_and_ignores_key_order():
    a = {"layers": [{"type": "conv2d", "out_channels": 4, "kernel_size": 3}, {"type": "maxpool", "kernel_size": 2},
                    {"type": "flatten"}, {"type": "linear", "out_features": "outputs"}]}
    b = {"layers": [{"kernel_size": 3, "type": "conv2d", "out_channels": 4, "stride": 1, "padding": 0, "bias": True},
                    {"stride": 2, "kernel_size": 2, "type": "maxpool"},
                    {"type": "flatten"}, {"out_features": "outputs", "type": "linear", "bias": True}]}
    assert canonical_json(a) == canonical_json(b) == canonical_json(json.dumps(b))
    c = copy.deepcopy(a)
    c["layers"][0]["out_channels"] = 5
    assert hashlib.sha256(canonical_json(c).encode()).digest() != hashlib.sha256(canonical_json(a).encode()).digest()
    assert validate_spec(a)["layers"][1] == {"kernel_size": 2, "stride": 2, "type": "maxpool"}


@pytest.mark.parametrize("layers, problem", [
    ([{"type": "conv3d", "out_channels": 3}], "layer 0: type: unknown value 'conv3d'"),
    ([{"type": "flatten"}, {"type": "linear", "out_features": 0}], "layer 1 (linear): out_features must be an integer from 1"),
    ([{"type": "flatten"}, {"type": "linear", "out_features": "outputs", "activation": "relu"}],
     "layer 1 (linear): unknown key(s) ['activation']"),
    ([{"type": "flatten"}, {"type": "dropout", "p": 1.0}, {"type": "linear", "out_features": "outputs"}],
     "layer 1 (dropout): p must be a number in [0, 1)"),
    ([{"type": "linear", "out_features": "outputs"}], "layer 0 (linear): needs a vector (features,) or a sequence"),
    ([{"type": "conv2d", "out_channels": 4, "kernel_size": 15}, {"type": "flatten"},
      {"type": "linear", "out_features": "outputs"}], "layer 0 (conv2d): kernel 15 does not fit the 8×8 image"),
    ([{"type": "flatten"}, {"type": "lstm", "hidden_size": 8}], "layer 1 (lstm): needs a sequence (length, features)"),
    ([{"type": "flatten"}, {"type": "embedding", "num_embeddings": 4, "embedding_dim": 2}],
     "layer 1 (embedding): an embedding reads integer codes, so it must be the first layer"),
    ([{"type": "conv2d", "out_channels": 6, "kernel_size": 3}, {"type": "groupnorm", "groups": 4}],
     "layer 1 (groupnorm): 4 groups do not divide 6 channels"),
    ([{"type": "flatten"}, {"type": "linear", "out_features": 3}], "ends in shape (3,); it must end in (2,)"),
    ([{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "bias": "yes"}], "layer 0 (conv2d): bias must be true or false"),
    ([{"type": "conv2d", "kernel_size": 3}], "layer 0 (conv2d): needs out_channels"),
])
def test_invalid_specs_are_refused_naming_the_layer(layers, problem):
    with pytest.raises(ConfigError) as exc:
        build_from_spec({"layers": layers}, (1, 8, 8), 2)
    assert problem in str(exc.value)


def test_bad_spec_containers():
    for spec, problem in [("{", "not JSON"), ([], "must be an object"), ({"layers": []}, "non-empty list"),
                          ({"layers": [{"type": "relu"}], "code": "import os"}, "unknown key(s) ['code']"),
                          ({"layers": [{"type": "relu"}] * 65}, "at most 64")]:
        with pytest.raises(ConfigError, match=None) as exc:
            validate_spec(spec)
        assert problem in str(exc.value)


def test_policy_caps_parameters_before_building():
    spec = {"layers": [{"type": "flatten"}, {"type": "linear", "out_features": 4096}, {"type": "relu"},
                       {"type": "linear", "out_features": "outputs"}]}
    n = count_params(spec, (1, 28, 28), 1)
    assert n == 784 * 4096 + 4096 + 4096 + 1
    with pytest.raises(PolicyViolation, match=f"has {n:,} parameters; this site's policy allows at most 1,000,000"):
        build_from_spec(spec, (1, 28, 28), 1, policy=ModelPolicy(max_params=1_000_000))
    assert num_params(build_from_spec(spec, (1, 28, 28), 1, policy=ModelPolicy(max_params=n))) == n


def test_sequence_and_normalisation_vocabulary_builds_and_counts_right():
    seq = {"layers": [{"type": "lstm", "hidden_size": 16, "num_layers": 2}, {"type": "layernorm"},
                      {"type": "dropout", "p": 0.1}, {"type": "linear", "out_features": "outputs"}]}
    m = build_from_spec(seq, (12, 5), 1, seed=3)
    assert num_params(m) == count_params(seq, (12, 5), 1)
    assert m(torch.randn(4, 12, 5)).shape == (4, 1)
    gru = {"layers": [{"type": "gru", "hidden_size": 8, "output": "sequence"}, {"type": "gelu"}, {"type": "flatten"},
                      {"type": "linear", "out_features": "outputs"}]}
    assert build_from_spec(gru, (6, 3), 2)(torch.randn(2, 6, 3)).shape == (2, 2)
    assert num_params(build_from_spec(gru, (6, 3), 2)) == count_params(gru, (6, 3), 2)
    emb = {"layers": [{"type": "embedding", "num_embeddings": 50, "embedding_dim": 4}, {"type": "gru", "hidden_size": 8},
                      {"type": "tanh"}, {"type": "linear", "out_features": "outputs"}]}
    m = build_from_spec(emb, (7,), 1)
    assert num_params(m) == count_params(emb, (7,), 1)
    assert m(torch.randint(0, 50, (3, 7)).float()).shape == (3, 1)
    with pytest.raises(ValueError, match="codes outside 0..49"):
        m(torch.full((1, 7), 50.0))
    img = {"layers": [{"type": "conv2d", "out_channels": 8, "kernel_size": 3, "stride": 2}, {"type": "batchnorm"},
                      {"type": "groupnorm", "groups": 2}, {"type": "sigmoid"}, {"type": "avgpool", "kernel_size": 2},
                      {"type": "flatten"}, {"type": "batchnorm"}, {"type": "linear", "out_features": "outputs", "bias": False}]}
    m = build_from_spec(img, (3, 17, 17), 5)
    assert num_params(m) == count_params(img, (3, 17, 17), 5)
    assert m(torch.randn(4, 3, 17, 17)).shape == (4, 5)


def test_spec_model_trains_like_the_builtin_one():
    """Same seed, same data, same trainer: the spec-built CNN ends where the built-in one does."""
    from insitu.learn.train import TrainConfig, train_local

    g = torch.Generator().manual_seed(0)
    X, y = torch.randn(64, 1, 28, 28, generator=g), (torch.rand(64, generator=g) > 0.5).float()
    ends = []
    for model in (build_model("cnn", (1, 28, 28), 1, seed=2), build_from_spec(BUILTIN_SPECS["cnn"], (1, 28, 28), 1, seed=2)):
        before = get_flat(model)
        train_local(model, X, y, TrainConfig(lr=0.05, steps=5, batch_size=8), torch.Generator().manual_seed(1), num_outputs=1)
        assert not np.array_equal(before, get_flat(model))
        ends.append(get_flat(model))
    np.testing.assert_array_equal(ends[0], ends[1])
