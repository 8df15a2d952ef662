"""The fidelity harness on a small Fashion-MNIST subset, and its pieces on synthetic data."""

import os

import pytest
import torch

import tokenopt
from tokenopt.fidelity import (FASHION_MNIST_ROOT, LinearProbe, extract_features, fidelity, load_fashion_mnist,
                               to_model_input)
from tests.models import timm_model

requires_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_MNIST_ROOT, "t10k-labels-idx1-ubyte.gz")),
    reason="Fashion-MNIST missing: apt-get install dataset-fashion-mnist (scripts/dev test installs it)",
)


@requires_fmnist
def test_fashion_mnist_loads_as_documented():
    images, labels = load_fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [1000] * 10
    sub, sub_labels = load_fashion_mnist("train", 50)
    full, full_labels = load_fashion_mnist("train")
    assert torch.equal(sub, full[:50]) and torch.equal(sub_labels, full_labels[:50])
    x = to_model_input(sub[:2], 224)
    assert x.shape == (2, 3, 224, 224)
    torch.testing.assert_close(x[:, 0] * 0.229 + 0.485, x[:, 1] * 0.224 + 0.456)  # gray replicated


def test_probe_learns_a_separable_problem_and_fidelity_is_exact_for_equal_features():
    torch.manual_seed(0)
    labels = torch.arange(200) % 4
    feats = torch.randn(200, 16) * 0.1 + torch.nn.functional.one_hot(labels, 16).float() * 3
    probe = LinearProbe.fit(feats, labels)
    assert probe.accuracy(feats, labels) == 1.0
    same = fidelity(probe, feats, feats, labels)
    assert same.cosine == pytest.approx(1.0) and same.accuracy_drop == 0.0
    shuffled = fidelity(probe, feats, feats[torch.randperm(200)], labels)
    assert shuffled.accuracy_drop > 50 and shuffled.cosine < 0.9


@requires_fmnist
def test_harness_on_a_small_subset():
    model = timm_model("deit_tiny_patch16_224", depth=4, num_classes=0)
    train_x, train_y = load_fashion_mnist("train", 64)
    test_x, test_y = load_fashion_mnist("test", 32)
    base_train = extract_features(model, train_x, batch_size=16, progress=False)
    base_test = extract_features(model, test_x, batch_size=16, progress=False)
    assert base_train.shape == (64, 192)
    probe = LinearProbe.fit(base_train, train_y)
    assert probe.accuracy(base_train, train_y) > 0.9  # 64 points, 192 dims: the probe fits them
    none = tokenopt.optimize(model, policy="none")
    same = fidelity(probe, base_test, extract_features(none, test_x, batch_size=16, progress=False), test_y)
    assert same.cosine > 0.99999 and same.accuracy_drop == 0.0
    tome = tokenopt.optimize(model, policy="tome", r=40)
    reduced = fidelity(probe, base_test, extract_features(tome, test_x, batch_size=16, progress=False), test_y)
    assert reduced.cosine < same.cosine  # merging changed the features, and the harness sees it


def test_probe_select_picks_the_penalty_that_generalises():
    # 40 informative dims + 200 noise dims, 150 samples: a weak penalty overfits the noise
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(150) % 3
    centers = torch.randn(3, 40, generator=gen)
    feats = torch.cat([centers[labels] + 2.0 * torch.randn(150, 40, generator=gen),
                       torch.randn(150, 200, generator=gen)], dim=1)
    probe = LinearProbe.select(feats, labels)
    assert probe.l2 in LinearProbe.L2_GRID and probe.l2 > LinearProbe.L2_GRID[0]
    held = torch.arange(150) % 5 == 0
    weakest = LinearProbe.fit(feats[~held], labels[~held], LinearProbe.L2_GRID[0])
    chosen = LinearProbe.fit(feats[~held], labels[~held], probe.l2)
    assert chosen.accuracy(feats[held], labels[held]) >= weakest.accuracy(feats[held], labels[held])
