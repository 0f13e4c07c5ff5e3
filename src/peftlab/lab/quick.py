"""A short fine-tune of the embedded encoder on tweet sentiment, method by method.

It is the smallest honest comparison: same model, data, steps and seed for each method; it
reports trainable parameters, training throughput and validation accuracy.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

import peftlab
from peftlab import models
from peftlab.lab.data import tweets

DEFAULT_METHODS: dict[str, dict] = {
    "full": {},
    "lora": {"r": 8, "alpha": 16, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    "bitfit": {"modules_to_save": ["classifier"]},
}
LEARNING_RATES = {"full": 5e-5, "lora": 1e-3, "bitfit": 1e-3}


@dataclass(frozen=True)
class Result:
    method: str
    trainable: int
    percent: float
    seconds: float
    examples_per_s: float
    accuracy_before: float
    accuracy: float


def _encode(tok, texts: list[str], max_len: int) -> dict[str, torch.Tensor]:
    return tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")


@torch.no_grad()
def accuracy(model, tok, data, batch_size: int = 64, max_len: int = 64) -> float:
    model.eval()
    right = 0
    for i in range(0, len(data), batch_size):
        chunk = data[i:i + batch_size]
        logits = model(**_encode(tok, [e.text for e in chunk], max_len)).logits
        right += int((logits.argmax(-1) == torch.tensor([e.label for e in chunk])).sum())
    return right / len(data)


def run(method: str, options: dict, *, train_size: int = 2000, eval_size: int = 500, epochs: int = 1,
        batch_size: int = 32, max_len: int = 64, seed: int = 0) -> Result:
    torch.manual_seed(seed)
    model, tok = models.load("minilm", num_labels=3, seed=seed)
    rng = random.Random(seed)
    train = rng.sample(tweets("train"), train_size)
    val = tweets("validation")[:eval_size]
    before = accuracy(model, tok, val, max_len=max_len)
    if method == "full":
        trainable, percent = sum(p.numel() for p in model.parameters()), 100.0
    else:
        peftlab.attach(model, method, **options)
        s = peftlab.summary(model)
        trainable, percent = s.trainable, s.percent
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LEARNING_RATES.get(method, 1e-3), weight_decay=0.01)
    model.train()
    start = time.perf_counter()
    steps = [(e, i) for e in range(epochs) for i in range(0, len(train), batch_size)]
    bar = tqdm(steps, desc=f"{method:>7}", leave=False)
    for _, i in bar:
        chunk = train[i:i + batch_size]
        enc = _encode(tok, [e.text for e in chunk], max_len)
        loss = model(**enc, labels=torch.tensor([e.label for e in chunk])).loss
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{method}: loss became {loss.item()} at step {bar.n}; lower the learning rate")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - start
    return Result(method, trainable, percent, seconds, epochs * len(train) / seconds, before,
                  accuracy(model, tok, val, max_len=max_len))


def main(methods: list[str] | None = None, **kw) -> list[Result]:
    chosen = methods or list(DEFAULT_METHODS)
    results = [run(m, DEFAULT_METHODS.get(m, {}), **kw) for m in chosen]
    full = next((r for r in results if r.method == "full"), None)
    print(f"\nminilm on tweets (3 classes): {kw.get('train_size', 2000)} training examples, 1 epoch, seed 0")
    print(f"{'method':<8} {'trainable':>12} {'% of base':>10} {'train s':>8} {'ex/s':>7} "
          f"{'acc before':>10} {'acc after':>9} {'vs full':>8}")
    for r in results:
        rel = f"{r.accuracy / full.accuracy:.3f}" if full else "-"
        print(f"{r.method:<8} {r.trainable:>12,} {r.percent:>9.3f}% {r.seconds:>8.1f} {r.examples_per_s:>7.1f} "
              f"{r.accuracy_before:>10.3f} {r.accuracy:>9.3f} {rel:>8}")
    return results
