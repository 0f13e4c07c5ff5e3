"""Predicted vs measured peak memory of a few training steps, per method, on the embedded models.

    python benchmarks/estimate_vs_measured.py                     # minilm + smollm2-135m, every method
    python benchmarks/estimate_vs_measured.py --models minilm --batch 8 --seq 128 --json out.json
    python benchmarks/estimate_vs_measured.py --published         # the published GPU peaks table (no run)

Each (model, method) runs in its own subprocess, so one measurement never sees another's memory:

* **CPU** (the default without a GPU): the model is loaded with ``peftlab.models.load`` (fp32), the
  method attached, every tensor copied into anonymous memory (the checkpoint is memory-mapped, and
  its pages would otherwise count only once touched), then the *baseline* resident set size is
  read and the kernel's peak counter reset (``/proc/self/clear_refs``). A few AdamW steps follow
  (``zero_grad(set_to_none=False)``, the estimator's assumption that gradient buffers stay
  resident; AdamW creates its states in the first step, so later steps hold the peak). Measured =
  peak RSS (``VmHWM``) minus the baseline, so the weights, which are in the baseline, are left out
  of both sides: predicted = estimate total minus weights. The worker runs with glibc's mmap
  threshold fixed at 64 KiB (``MALLOC_MMAP_THRESHOLD_``), so a freed tensor goes back to the
  system and RSS tracks live tensors, as ``max_memory_allocated`` does on CUDA; the peak under
  glibc's default (dynamic) threshold, which keeps freed tensors in the heap, is printed too.
* **CUDA** (``--device cuda``, when a GPU is present): the same steps on the GPU; measured =
  ``torch.cuda.max_memory_allocated()``, which includes the weights but not the CUDA context, so
  predicted = ``Estimate.allocated_peak`` (the peak phase without the CUDA context).

The estimate is asked for the loop's own setting (``set_to_none=False``: the gradients stay
allocated between steps); its peak is the largest phase of the step
(:mod:`peftlab.estimate.phases`). ``--published`` prints the table of independently published GPU
peaks (:mod:`peftlab.estimate.published`) recomputed from the estimator, as in ``docs/estimate.md``.

Targets: predicted/measured within 0.8-1.2 on CPU and 0.9-1.1 on CUDA.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MMAP_THRESHOLD = 64 * 1024
"""Allocations of this size and larger are mmapped, and unmapped when freed (glibc)."""


def _rss_kib(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1))


def _trim() -> None:
    """Return freed heap pages to the system so the baseline is not inflated by load-time garbage."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def method_options(model_name: str, method: str) -> dict[str, Any]:
    """Options used for ``method`` on ``model_name``: the method's defaults, plus training the new
    classification head (``modules_to_save``) on encoder classifiers, as one would in practice
    (every method alike, full fine-tuning included)."""
    if _head(model_name) == "classifier":
        return {"modules_to_save": ["classifier"]}
    return {}


def _head(model_name: str) -> str:
    from peftlab.estimate.arch import resolve

    return resolve(model_name).head


def _build(model_name: str, random_init: bool) -> Any:
    """The embedded model (real weights), or with ``random_init`` the same architecture built from
    its config numbers with random weights (any preset too; for machines without the packages)."""
    from peftlab import models

    if not random_init:
        model, _ = models.load(model_name, with_tokenizer=False)
        return model
    import transformers

    from peftlab.estimate.arch import resolve

    src = resolve(model_name)
    auto = {"causal-lm": transformers.AutoModelForCausalLM,
            "classifier": transformers.AutoModelForSequenceClassification}[src.head]
    model = auto.from_config(src.config())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model


def worker(model_name: str, method: str, batch: int, seq: int, steps: int, device: str,
           random_init: bool = False) -> dict[str, Any]:
    """Train ``steps`` steps and return the measured peak (runs in a fresh process)."""
    import torch

    import peftlab

    torch.manual_seed(0)
    model = _build(model_name, random_init)
    options = method_options(model_name, method)
    peftlab.attach(model, method, **options)
    with torch.no_grad():  # into anonymous memory: no memory-mapped checkpoint pages left behind
        for t in list(model.parameters()) + list(model.buffers()):
            t.data = t.data.clone()
    _trim()
    model.train()
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, seq))
    if _head(model_name) == "causal-lm":
        labels = ids.clone()
    else:
        labels = torch.randint(0, model.config.num_labels, (batch,))
    weights = sum(t.numel() * t.element_size() for t in {id(p): p for p in model.parameters()}.values())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    params = [p for p in model.parameters() if p.requires_grad]
    if device == "cuda":
        model.to("cuda")
        ids, labels = ids.cuda(), labels.cuda()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    # the optimizer the method trains with (GaLore's, QLoRA's 8-bit option), as the estimate assumes
    own = [o for o in (m.make_optimizer(model, lr=1e-5) for m in peftlab.adapters(model).values()) if o is not None]
    optimizer = own[0] if own else torch.optim.AdamW(params, lr=1e-5)
    _trim()
    baseline = _rss_kib("VmRSS") * 1024
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss  # the output (logits) is dropped before backward
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    seconds = time.perf_counter() - start
    if device == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = _rss_kib("VmHWM") * 1024 - baseline
    return {"measured": measured, "baseline": baseline, "weights": weights, "seconds": seconds,
            "trainable": sum(p.numel() for p in params), "options": options}


def predict(model_name: str, method: str, batch: int, seq: int, device: str) -> dict[str, Any]:
    from peftlab.estimate import estimate

    options = method_options(model_name, method)
    e = estimate(model_name, method, options or None, batch=batch, seq=seq, dtype="fp32", mixed_precision=False,
                 optimizer="adamw", device=device, set_to_none=False)  # the worker's zero_grad(set_to_none=False)
    if device == "cuda":
        predicted = e.allocated_peak
    else:
        predicted = e.total - e.weights - e.quant_constants
    return {"predicted": predicted, "estimate": e.to_dict()}


def measure(model_name: str, method: str, batch: int, seq: int, steps: int, device: str,
            fixed_threshold: bool = True, random_init: bool = False) -> dict[str, Any]:
    """Run :func:`worker` in a subprocess and return its JSON."""
    cmd = [sys.executable, __file__, "--worker", model_name, method, str(batch), str(seq), str(steps), device,
           str(int(random_init))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if fixed_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        return {"error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mb(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--models", nargs="*", default=["minilm", "smollm2-135m"])
    p.add_argument("--methods", nargs="*", help="default: full and every registered method")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--json", help="write every row (with the full estimates) here")
    p.add_argument("--random-init", action="store_true",
                   help="build each model from its config numbers with random weights (presets too, e.g. "
                        "llama-2-7b on a large GPU); memory does not depend on the weights' values")
    p.add_argument("--published", action="store_true",
                   help="print the published GPU peaks recomputed from the estimator (docs/estimate.md) and exit")
    p.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.published:
        from peftlab.estimate.published import markdown

        print(markdown())
        return 0
    if args.worker:
        name, method, batch, seq, steps, device, random_init = args.worker
        print(json.dumps(worker(name, method, int(batch), int(seq), int(steps), device, random_init == "1")))
        return 0

    import torch

    import peftlab

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    methods = args.methods or list(peftlab.methods())
    target = 0.1 if device == "cuda" else 0.2
    what = "max_memory_allocated" if device == "cuda" else "peak RSS over the loaded model"
    print(f"device {device} ({what}), fp32 weights, AdamW, batch {args.batch} x seq {args.seq}, {args.steps} steps; "
          f"target predicted/measured within 1 +- {target}")
    cpu = device == "cpu"
    extra = " default allocator MiB |" if cpu else ""
    print(f"| model | method | trainable | predicted MiB | measured MiB | predicted/measured |{extra}")
    print("|---|---|---:|---:|---:|---:|" + ("---:|" if cpu else ""))
    rows = []
    for model_name in args.models:
        for method in methods:
            try:
                pred = predict(model_name, method, args.batch, args.seq, device)
            except peftlab.ConfigError as e:
                print(f"| {model_name} | {method} | n/a | n/a | n/a | {str(e).split(': ', 2)[-1][:60]} |")
                rows.append({"model": model_name, "method": method, "error": str(e)})
                continue
            got = measure(model_name, method, args.batch, args.seq, args.steps, device, random_init=args.random_init)
            if "error" in got:
                print(f"| {model_name} | {method} | | {mb(pred['predicted'])} | failed | {got['error'][:60]} |")
                rows.append({"model": model_name, "method": method, **pred, **got})
                continue
            ratio = pred["predicted"] / got["measured"]
            flag = "" if abs(ratio - 1) <= target else " (outside target)"
            dynamic = measure(model_name, method, args.batch, args.seq, args.steps, device, False,
                              args.random_init) if cpu else {}
            cell = f" {mb(dynamic['measured'])} |" if "measured" in dynamic else (" failed |" if cpu else "")
            print(f"| {model_name} | {method} | {got['trainable']:,} | {mb(pred['predicted'])} | "
                  f"{mb(got['measured'])} | {ratio:.2f}{flag} |{cell}", flush=True)
            rows.append({"model": model_name, "method": method, "ratio": ratio, **pred, **got,
                         "measured_default_allocator": dynamic.get("measured")})
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "batch": args.batch, "seq": args.seq,
                                               "steps": args.steps, "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
