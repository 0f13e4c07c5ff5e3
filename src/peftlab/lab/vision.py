"""Convolutional evaluation: a small CNN pre-trained on some Fashion-MNIST classes, adapted to the others.

The data come from the Debian/Ubuntu package ``dataset-fashion-mnist`` (the four idx ``.gz`` files
under ``/usr/share/datasets/fashion-mnist``; ``PEFTLAB_FASHION_MNIST`` points elsewhere). The
experiment, all on CPU in well under a minute per method:

1. :func:`pretrain`: a 3-conv CNN (:class:`SmallCNN`) learns classes 0-4 (T-shirt, trouser,
   pullover, dress, coat).
2. :func:`adapt`: a copy gets a new head for classes 5-9 (sandal, shirt, sneaker, bag, ankle
   boot) and trains on a small subset of them with one method: full fine-tuning, the new head
   alone, LoRA on the convolutions (peftlab's conv LoRA: the kernel reshaped to an
   ``out x (in*kh*kw)`` matrix of rank r) or FLoRA on the convolutions with ranks chosen so its
   parameter count matches LoRA's (:func:`matched_flora_ranks`). The head trains in full with
   every method (``modules_to_save``).
3. :func:`run` returns accuracy on the test images of the new classes, trainable parameters and
   training time per method; :func:`table` formats them.

Example:
    >>> from peftlab.lab import vision
    >>> pretrained, results = vision.run(vision.VisionConfig(adapt_steps=120))
    >>> print(vision.table(results))
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import gzip
import math
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from peftlab.core.errors import ConfigError, PeftlabError

__all__ = ["CLASSES", "SmallCNN", "VisionConfig", "VisionResult", "adapt", "fashion_mnist", "matched_flora_ranks",
           "pretrain", "run", "table"]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ROOT_ENV = "PEFTLAB_FASHION_MNIST"
INSTALL = "apt-get install dataset-fashion-mnist"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MEAN, STD = 0.2860, 0.3530
"""Pixel mean and standard deviation of the Fashion-MNIST training images (scaled to [0, 1])."""
CONVS = ("conv1", "conv2", "conv3")
METHODS = ("full", "head", "lora", "flora")


# ----------------------------------------------------------------------------- data


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The folder holding the four idx files: ``root``, else ``$PEFTLAB_FASHION_MNIST``, else the
    Debian package's folder. Missing files are an error that says how to install them."""
    path = Path(root) if root is not None else Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT)
    missing = [name for pair in FILES.values() for name in pair if not (path / name).is_file()]
    if missing:
        raise ConfigError(f"Fashion-MNIST is not in {path} (missing {', '.join(missing)}). Install the Debian/Ubuntu "
                          f"package: `sudo {INSTALL}` (or `make fashion-mnist`), or set {ROOT_ENV} to a folder "
                          "with the four idx .gz files")
    return path


def _read_idx(path: Path, magic: int) -> tuple[tuple[int, ...], bytes]:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 8 or struct.unpack(">I", raw[:4])[0] != magic:
        raise PeftlabError(f"{path} is not an idx file of the expected kind (magic {magic:#x}); reinstall "
                           f"the package (`sudo apt-get install --reinstall dataset-fashion-mnist`)")
    ndim = magic & 0xFF
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    if len(body) != math.prod(dims):
        raise PeftlabError(f"{path} is truncated ({len(body)} of {math.prod(dims)} bytes); reinstall the package")
    return dims, body


@functools.lru_cache(maxsize=4)
def _load(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    images_file, labels_file = FILES[split]
    dims, body = _read_idx(path / images_file, 0x803)
    images = torch.frombuffer(bytearray(body), dtype=torch.uint8).reshape(dims)
    (n,), body = _read_idx(path / labels_file, 0x801)
    labels = torch.frombuffer(bytearray(body), dtype=torch.uint8).to(torch.int64)
    if n != dims[0]:
        raise PeftlabError(f"{path}: {dims[0]} images but {n} labels in the {split} split; reinstall the package")
    return images, labels


def fashion_mnist(split: str = "train",
                  root: str | os.PathLike[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images, labels)`` of a split: ``uint8`` images ``N x 28 x 28`` and ``int64`` labels 0-9.

    Args:
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000).
        root: The folder of the idx files (see :func:`data_root`).
    """
    if split not in FILES:
        raise ConfigError(f"split must be one of {sorted(FILES)}; got {split!r}")
    return _load(data_root(root), split)


def _select(images: torch.Tensor, labels: torch.Tensor, classes: tuple[int, ...], k: int | None,
            seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of ``classes`` (labels renumbered 0..len-1), normalised; a seeded subset of ``k``."""
    keep = torch.isin(labels, torch.tensor(classes))
    x, y = images[keep], labels[keep]
    if k is not None and k < len(y):
        idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:k].sort().values
        x, y = x[idx], y[idx]
    remap = torch.full((10,), -1, dtype=torch.int64)
    remap[torch.tensor(classes)] = torch.arange(len(classes))
    return ((x.float() / 255.0 - MEAN) / STD).unsqueeze(1), remap[y]


# ----------------------------------------------------------------------------- model


class SmallCNN(nn.Module):
    """Three 3x3 convolutions (``width``, ``2*width``, ``4*width`` channels; max-pooling after the
    first two), global average pooling and a linear ``head``."""

    def __init__(self, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.head = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.conv3(x))
        return self.head(x.mean(dim=(2, 3)))


# ----------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class VisionConfig:
    """The experiment's settings; every field has a working default.

    Attributes:
        pretrain_classes / adapt_classes: Fashion-MNIST class ids of the two phases.
        width: Channels of the first convolution.
        pretrain_steps, adapt_steps: Optimizer steps of each phase (batch ``batch_size``).
        pretrain_examples: Training images of the pre-training classes (a seeded subset); ``None``: all.
        adapt_examples: Training images of the new classes used for adaptation (a seeded subset).
        test_examples: Test images to score each phase on (a seeded subset); ``None``: all 5,000.
        lr_pretrain, lr_full, lr_head, lr_adapter: AdamW peak learning rates (cosine decay, no warm-up).
        lora_r: LoRA's rank on every convolution; FLoRA is matched to its parameter count.
        flora_kernel_r: FLoRA's rank of the two spatial modes (3: no reduction of a 3x3 kernel).
        seed: Seeds data subsets, the order of batches and every initialisation.
        methods: Which adaptations to run (``full``, ``head``, ``lora``, ``flora``).
    """

    pretrain_classes: tuple[int, ...] = (0, 1, 2, 3, 4)
    adapt_classes: tuple[int, ...] = (5, 6, 7, 8, 9)
    width: int = 16
    pretrain_steps: int = 300
    adapt_steps: int = 120
    batch_size: int = 64
    pretrain_examples: int | None = None
    adapt_examples: int | None = 1000
    test_examples: int | None = None
    lr_pretrain: float = 3e-3
    lr_full: float = 1e-3
    lr_head: float = 1e-2
    lr_adapter: float = 5e-3
    lora_r: int = 4
    flora_kernel_r: int = 3
    seed: int = 0
    methods: tuple[str, ...] = METHODS

    def __post_init__(self) -> None:
        overlap = set(self.pretrain_classes) & set(self.adapt_classes)
        if overlap or not self.pretrain_classes or not self.adapt_classes:
            raise ConfigError(f"pretrain_classes and adapt_classes must be non-empty and disjoint (both have "
                              f"{sorted(overlap)})")
        if not set(self.pretrain_classes) | set(self.adapt_classes) <= set(range(10)):
            raise ConfigError("Fashion-MNIST classes are 0-9")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ConfigError(f"unknown vision method(s) {unknown}; choose from {list(METHODS)}")


@dataclass
class VisionResult:
    """One adaptation: test accuracy on the new classes, parameters and time."""

    method: str
    accuracy: float
    trainable: int
    """Parameters that trained, the new head included."""
    adapter: int
    """Trainable parameters outside the head (the method's own)."""
    seconds: float
    steps: int
    options: dict[str, Any] = field(default_factory=dict)


def _fit(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float, batch_size: int,
         seed: int) -> float:
    """AdamW with cosine decay over ``steps`` on seeded batches; returns the training seconds."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(y), generator=g)
    pos = 0
    model.train()
    began = time.perf_counter()
    for _ in range(steps):
        if pos + batch_size > len(y):
            order, pos = torch.randperm(len(y), generator=g), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - began
    model.eval()
    return seconds


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    was = model.training
    model.eval()
    correct = sum(int((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum())
                  for i in range(0, len(y), batch_size))
    model.train(was)
    return correct / len(y)


def pretrain(config: VisionConfig = VisionConfig(), root: str | os.PathLike[str] | None = None
             ) -> tuple[SmallCNN, float, float]:
    """Train :class:`SmallCNN` on ``pretrain_classes``; returns ``(model, test accuracy, seconds)``."""
    x, y = _select(*fashion_mnist("train", root), config.pretrain_classes, config.pretrain_examples, config.seed)
    tx, ty = _select(*fashion_mnist("test", root), config.pretrain_classes, config.test_examples, config.seed)
    torch.manual_seed(config.seed)
    model = SmallCNN(len(config.pretrain_classes), config.width)
    seconds = _fit(model, x, y, config.pretrain_steps, config.lr_pretrain, config.batch_size, config.seed)
    return model, accuracy(model, tx, ty), seconds


def lora_count(model: nn.Module, r: int) -> int:
    """Parameters of LoRA (rank ``r``) on the convolutions of ``model``."""
    total = 0
    for name in CONVS:
        conv = getattr(model, name)
        total += r * conv.in_channels * math.prod(conv.kernel_size) + conv.out_channels * r
    return total


def matched_flora_ranks(model: nn.Module, target: int, kernel_r: int) -> tuple[dict[str, list[int]], int]:
    """FLoRA ranks for the convolutions of ``model`` whose parameter count is closest to ``target``.

    One channel rank ``r`` for all layers (capped by each layer's channel counts, e.g. 1 for the
    input side of a 1-channel first layer) and ``kernel_r`` for the spatial modes; returns the
    ``rank_pattern`` and its parameter count.
    """
    from peftlab.methods.flora import flora_parameter_count

    best: tuple[int, dict[str, list[int]], int] | None = None
    for r in range(1, 257):
        pattern = {}
        count = 0
        for name in CONVS:
            conv = getattr(model, name)
            ranks = [min(r, conv.out_channels), min(r, conv.in_channels),
                     *(min(kernel_r, k) for k in conv.kernel_size)]
            pattern[name] = ranks
            count += flora_parameter_count(conv.weight.shape, ranks)
        if best is None or abs(count - target) < abs(best[2] - target):
            best = (r, pattern, count)
        if count > target:
            break
    assert best is not None
    return best[1], best[2]


def adapt(pretrained: SmallCNN, method: str, config: VisionConfig = VisionConfig(),
          root: str | os.PathLike[str] | None = None) -> VisionResult:
    """Adapt a copy of ``pretrained`` to ``adapt_classes`` with ``method``; the copy gets a new head."""
    import peftlab

    if method not in METHODS:
        raise ConfigError(f"unknown vision method {method!r}; choose from {list(METHODS)}")
    x, y = _select(*fashion_mnist("train", root), config.adapt_classes, config.adapt_examples, config.seed)
    tx, ty = _select(*fashion_mnist("test", root), config.adapt_classes, config.test_examples, config.seed)
    model = copy.deepcopy(pretrained)
    torch.manual_seed(config.seed + 1)
    model.head = nn.Linear(model.head.in_features, len(config.adapt_classes))
    head = sum(p.numel() for p in model.head.parameters())
    options: dict[str, Any] = {}
    if method == "full":
        model.requires_grad_(True)
        lr = config.lr_full
    elif method == "head":
        model.requires_grad_(False)
        model.head.requires_grad_(True)
        lr = config.lr_head
    else:
        if method == "lora":
            options = {"r": config.lora_r, "alpha": 2 * config.lora_r}
        else:
            pattern, _ = matched_flora_ranks(model, lora_count(model, config.lora_r), config.flora_kernel_r)
            options = {"rank_pattern": pattern}
        peftlab.attach(model, method, target_modules=list(CONVS), modules_to_save=["head"], **options)
        lr = config.lr_adapter
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    seconds = _fit(model, x, y, config.adapt_steps, lr, config.batch_size, config.seed)
    return VisionResult(method, accuracy(model, tx, ty), trainable, trainable - head, seconds, config.adapt_steps,
                        options)


def run(config: VisionConfig = VisionConfig(), root: str | os.PathLike[str] | None = None,
        progress: bool = False) -> tuple[dict[str, float], list[VisionResult]]:
    """Pre-train once, then adapt with every method of ``config.methods``.

    Returns:
        ``({"accuracy": ..., "seconds": ...} of the pre-training, [one result per method])``.
    """
    model, acc, seconds = pretrain(config, root)
    if progress:
        print(f"pre-trained on classes {list(config.pretrain_classes)}: accuracy {acc:.4f} in {seconds:.1f} s",
              flush=True)
    results = []
    for method in config.methods:
        result = adapt(model, method, config, root)
        if progress:
            print(f"{method}: accuracy {result.accuracy:.4f}, {result.trainable:,} trainable, {result.seconds:.1f} s",
                  flush=True)
        results.append(result)
    return {"accuracy": acc, "seconds": seconds}, results


def table(results: list[VisionResult]) -> str:
    """A Markdown table of the results."""
    lines = ["| method | test accuracy | trainable params | of which adapter | train time (s) |",
             "|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.method} | {r.accuracy:.4f} | {r.trainable:,} | {r.adapter:,} | {r.seconds:.1f} |")
    return "\n".join(lines)


def as_dict(result: VisionResult) -> dict[str, Any]:
    return dataclasses.asdict(result)
