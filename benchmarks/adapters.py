"""Adapter-family measurements on the embedded ``minilm`` (BERT, 6 blocks), CPU.

    PYTHONPATH=src python benchmarks/adapters.py params        # sizes and latency vs LoRA
    PYTHONPATH=src python benchmarks/adapters.py train         # tweet accuracy after a short run
    PYTHONPATH=src python benchmarks/adapters.py drop-latency  # AdapterDrop + parallel multi-task inference
    PYTHONPATH=src python benchmarks/adapters.py drop-score    # accuracy vs dropped blocks (plain vs robust)
    PYTHONPATH=src python benchmarks/adapters.py fusion        # AdapterFusion: tweets + chat topic (after train)

Each section prints a table and writes ``benchmarks/results/adapters_<section>.json`` (and a copy in
``runs/adapters/``). Latency is the CPU time of
one thread (median of repeated runs), so that other processes on a shared machine disturb it
little; ratios are within one run.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import peftlab
from peftlab import models
from peftlab.lab.tasks import FileTask, get_task
from peftlab.lab.trainer import TrainConfig, train
from peftlab.methods.bottleneck import adapter_drop
from peftlab.methods.fusion import fuse, fusion_weights, parallel_forward

OUT = Path("runs/adapters")
STEPS, BATCH, LENGTH, TEST = 200, 16, 64, 600


RESULTS = Path(__file__).resolve().parent / "results"


def save(section: str, data: object) -> None:
    """The section's figures, in ``runs/adapters/`` (next to the trained adapters) and in
    ``benchmarks/results/adapters_<section>.json`` (kept with the code)."""
    OUT.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": data}, indent=2) + "\n"
    (OUT / f"{section}.json").write_text(text)
    (RESULTS / f"adapters_{section}.json").write_text(text)


def timed(fn, reps: int = 5) -> float:
    with torch.no_grad():
        fn()
        runs = []
        for _ in range(reps):
            start = time.process_time()  # CPU time of this (single-threaded) process: robust to other load
            fn()
            runs.append(time.process_time() - start)
    return statistics.median(runs)


def fit(model, tok, task, lr: float, steps: int = STEPS) -> None:
    train(model, tok, task, TrainConfig(steps=steps, batch_size=BATCH, lr=lr, eval_every=0, eval_examples=200,
                                        max_length=LENGTH, seed=0, progress=False))


def accuracy(model, tok, task) -> float:
    test = task.examples("test")[:TEST]
    return task.evaluate(model, tok, test, batch_size=32, max_length=LENGTH)["accuracy"]


def params() -> None:
    torch.set_num_threads(1)
    x = {"input_ids": torch.randint(1000, 2000, (8, LENGTH))}
    base, _ = models.load("minilm", num_labels=3, with_tokenizer=False)
    t0 = timed(lambda: base(**x))
    rows = {"base": {"trainable": 0, "ms": 1000 * t0, "vs_base": 1.0}}
    for method in ("houlsby", "pfeiffer", "compacter", "lora"):
        model, _ = models.load("minilm", num_labels=3, with_tokenizer=False)
        peftlab.attach(model, method)
        t = timed(lambda m=model: m(**x))
        rows[method] = {"trainable": peftlab.summary(model).trainable, "ms": 1000 * t, "vs_base": t / t0}
    print(f"{'method':<10} {'trainable':>10} {'batch 8 ms':>10} {'vs base':>8}")
    for k, r in rows.items():
        print(f"{k:<10} {r['trainable']:>10,} {r['ms']:>10.1f} {r['vs_base']:>8.2f}")
    save("params", rows)


def train_section(methods: tuple[str, ...] = ("houlsby", "pfeiffer", "compacter", "lora")) -> None:
    task = get_task("tweets")
    rows = {}
    for method in methods:
        model, tok = models.load("minilm", num_labels=3, seed=0)
        peftlab.attach(model, method, modules_to_save=["classifier"])
        lr = peftlab.method_class(method).suggested_lr
        start = time.perf_counter()
        fit(model, tok, task, lr)
        n_head = sum(p.numel() for k, p in peftlab.adapter_parameters(model, "default").items() if "classifier" in k)
        rows[method] = {"trainable_without_head": peftlab.summary(model).trainable - n_head, "lr": lr,
                        "accuracy": accuracy(model, tok, task), "train_s": time.perf_counter() - start}
        peftlab.save(model, OUT / "tweets" / method)
        print(method, rows[method], flush=True)
    save("train-" + "-".join(methods), rows)


def drop_latency() -> None:
    torch.set_num_threads(1)
    model, _ = models.load("minilm", num_labels=3, with_tokenizer=False)
    for i in range(8):
        peftlab.attach(model, "houlsby", f"t{i}")
    x = {"input_ids": torch.randint(1000, 2000, (4, LENGTH))}
    rows = {}
    for n in (1, 2, 4, 8):
        names = [f"t{i}" for i in range(n)]
        times = []
        for k in range(7):
            with adapter_drop(model, k):
                times.append(timed(lambda: parallel_forward(model, x, names), reps=3))
        rows[n] = {"ms": [1000 * t for t in times], "relative": [t / times[0] for t in times]}
        print(f"N={n}: " + " ".join(f"k={k}:{r:.2f}" for k, r in enumerate(rows[n]["relative"])), flush=True)
    save("drop_latency", rows)


def drop_score(method: str = "pfeiffer") -> None:
    """The adapter trained by ``train`` (plain) against one trained with robust AdapterDrop."""
    task = get_task("tweets")
    rows = {}
    for label, opts in (("plain", {}), ("robust", {"robust_drop": True})):
        model, tok = models.load("minilm", num_labels=3, seed=0)
        if label == "plain":
            peftlab.load(model, OUT / "tweets" / method)
        else:
            peftlab.attach(model, method, modules_to_save=["classifier"], **opts)
            fit(model, tok, task, peftlab.method_class(method).suggested_lr)
        scores = []
        for k in range(7):
            with adapter_drop(model, k):
                scores.append(accuracy(model, tok, task))
        rows[label] = scores
        print(label, " ".join(f"k={k}:{s:.3f}" for k, s in enumerate(scores)), flush=True)
    save("drop_score", rows)


def topic_task() -> FileTask:
    """Which chatterbot-corpus file a question comes from (21 topics), split by a hash of the text."""
    import yaml

    from peftlab.lab import data

    path = OUT / "chat_topics.csv"
    OUT.mkdir(parents=True, exist_ok=True)
    rows = {}
    for f in sorted(data.chat_corpus_dir().glob("*.yml")):
        doc = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
        for conv in doc.get("conversations") or []:
            if isinstance(conv, list) and conv:
                q = " ".join(str(conv[0]).split())
                rows.setdefault(q, f.stem)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["text", "label", "split"])
        for q, topic in sorted(rows.items()):
            w.writerow([q, topic, data._split_of(q)])
    return FileTask(path)


def fusion(method: str = "pfeiffer", steps: int = 150) -> None:
    tasks = {"sentiment": get_task("tweets"), "topic": topic_task()}
    lr = peftlab.method_class(method).suggested_lr
    trained, single = {}, {}
    for name, task in tasks.items():  # stage 1: one adapter per task (ST-A), each with its own head
        model, tok = models.load("minilm", num_labels=task.num_labels, seed=0)
        if name == "sentiment" and (OUT / "tweets" / method).is_dir():  # trained by the train section
            peftlab.load(model, OUT / "tweets" / method, name)
        else:
            peftlab.attach(model, method, name, modules_to_save=["classifier"])
            fit(model, tok, task, lr, steps=steps)
        single[name] = accuracy(model, tok, task)
        trained[name] = {k: v.detach().clone() for k, v in peftlab.adapter_parameters(model, name).items()
                         if "classifier" not in k}
        print(f"stage 1 {name}: {single[name]:.3f} ({task.num_labels} classes)", flush=True)
    rows = {}
    for name, task in tasks.items():  # stage 2: a fusion (and a new head) per target task
        model, tok = models.load("minilm", num_labels=task.num_labels, seed=0)
        for other, tensors in trained.items():
            peftlab.attach(model, method, other)
            with torch.no_grad():
                for k, v in peftlab.adapter_parameters(model, other).items():
                    v.copy_(tensors[k])
        fuse(model, list(trained), modules_to_save=["classifier"])
        fit(model, tok, task, peftlab.method_class("fusion").suggested_lr, steps=steps)
        score = accuracy(model, tok, task)
        weights = fusion_weights(model)
        mean = {n: statistics.mean(w[n] for w in weights.values()) for n in trained}
        rows[name] = {"single_adapter": single[name], "fusion": score, "mean_fusion_weight": mean,
                      "weights_per_site": weights}
        print(f"fusion on {name}: {score:.3f} vs single {single[name]:.3f}; mean weights {mean}", flush=True)
    save("fusion", rows)


SECTIONS = {"params": params, "train": train_section, "drop-latency": drop_latency, "drop-score": drop_score,
            "fusion": fusion}

if __name__ == "__main__":
    for arg in sys.argv[1:] or list(SECTIONS):
        SECTIONS[arg]()
