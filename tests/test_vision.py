"""The Fashion-MNIST lab: loader, clear errors, matched parameter counts, a tiny end-to-end run."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest
import torch

from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.lab import vision

ROOT = Path(os.environ.get(vision.ROOT_ENV) or vision.DEFAULT_ROOT)
needs_data = pytest.mark.skipif(
    not all((ROOT / f).is_file() for pair in vision.FILES.values() for f in pair),
    reason=f"Fashion-MNIST is not installed in {ROOT}: `sudo apt-get install dataset-fashion-mnist` "
           "(or `make fashion-mnist`)")


@needs_data
def test_loader_reads_both_splits():
    images, labels = vision.fashion_mnist("train")
    assert images.shape == (60_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60_000,) and labels.dtype == torch.int64
    assert torch.bincount(labels).tolist() == [6000] * 10
    test_images, test_labels = vision.fashion_mnist("test")
    assert test_images.shape == (10_000, 28, 28) and torch.bincount(test_labels).tolist() == [1000] * 10
    assert 0.25 < images[:5000].float().mean().item() / 255 < 0.32  # the known mean, 0.286


def test_missing_data_names_the_install_command(tmp_path):
    with pytest.raises(ConfigError, match=r"sudo apt-get install dataset-fashion-mnist.*PEFTLAB_FASHION_MNIST"):
        vision.fashion_mnist("train", root=tmp_path)
    with pytest.raises(ConfigError, match="split must be one of"):
        vision.fashion_mnist("valid", root=tmp_path)


def test_corrupt_files_are_clear_errors(tmp_path):
    for images, labels in vision.FILES.values():
        with gzip.open(tmp_path / images, "wb") as f:
            f.write(b"\x00\x00\x08\x03" + (2).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + b"\x00" * 100)
        with gzip.open(tmp_path / labels, "wb") as f:
            f.write(b"not an idx file")
    with pytest.raises(PeftlabError, match="truncated"):
        vision.fashion_mnist("test", root=tmp_path)


def test_flora_is_matched_to_loras_parameter_count():
    model = vision.SmallCNN(5, width=16)
    target = vision.lora_count(model, 4)
    assert target == (4 * 1 * 9 + 16 * 4) + (4 * 16 * 9 + 32 * 4) + (4 * 32 * 9 + 64 * 4)
    pattern, count = vision.matched_flora_ranks(model, target, kernel_r=3)
    assert abs(count - target) / target < 0.1
    assert pattern["conv1"][1] == 1 and pattern["conv1"][2:] == [3, 3]  # 1 input channel caps that rank
    import peftlab

    peftlab.attach(model, "flora", target_modules=list(vision.CONVS), rank_pattern=pattern)
    assert peftlab.summary(model).trainable == count


@needs_data
@pytest.mark.usefixtures("one_thread")
def test_tiny_end_to_end_run():
    config = vision.VisionConfig(width=4, pretrain_steps=3, adapt_steps=2, batch_size=8, pretrain_examples=64,
                                 adapt_examples=32, test_examples=40)
    pre, results = vision.run(config)
    assert 0 <= pre["accuracy"] <= 1
    assert [r.method for r in results] == list(vision.METHODS)
    by = {r.method: r for r in results}
    head = 16 * 5 + 5
    assert by["head"].trainable == head and by["head"].adapter == 0
    assert by["full"].adapter == sum(p.numel() for p in vision.SmallCNN(5, 4).parameters()) - head
    assert by["lora"].adapter == vision.lora_count(vision.SmallCNN(5, 4), 4)
    assert abs(by["flora"].adapter - by["lora"].adapter) / by["lora"].adapter < 0.15
    assert all(0 <= r.accuracy <= 1 and r.seconds > 0 and r.steps == 2 for r in results)
    text = vision.table(results)
    assert text.count("\n") == 1 + len(results) and "| flora |" in text
    with pytest.raises(ConfigError, match="disjoint"):
        vision.VisionConfig(pretrain_classes=(0, 1), adapt_classes=(1, 2))
