#!/usr/bin/env python
"""peftlab LoRA vs Hugging Face peft LoRA: training step time, peak memory, inference latency.

Everything is measured in ONE invocation, on the same model, LoRA config, data and seed, and
reported as ratios ``peftlab / peft`` (and ``variant / base`` for inference), never as bare
absolute claims: absolute seconds and bytes depend on the machine, the ratios much less.

How (see benchmarks/README.md for the long version):

* Training: every (variant, repeat) runs in its own fresh Python subprocess, so the peak RSS of
  one variant never includes the other's allocations. The pairs run in ABBA order
  (peftlab, peft, then peft, peftlab, ...) over ``--repeats`` and the medians over repeats are
  compared, which cancels slow drift of the machine (thermal, page cache, neighbours) and any
  advantage of running first or second in a pair.
  In each subprocess: load model -> attach LoRA -> AdamW -> warm-up steps -> timed steps.
  A step is forward + backward + optimizer.step + zero_grad. The peak RSS is the kernel's
  high-water mark (``getrusage(RUSAGE_SELF).ru_maxrss``); it is reset with
  ``/proc/self/clear_refs`` just before the first training step (Linux), so the training peak
  is measured on its own, and the peak increase over the after-model-load RSS isolates the
  method's training overhead (activations saved for backward, gradients, Adam state).
* Inference: one subprocess holds base, peftlab merged (merge_and_unload), peftlab unmerged,
  peft unmerged and peft merged, all with the SAME non-zero LoRA weights (lora_B perturbed, then
  copied from peftlab into peft, and the outputs checked to agree). Forwards under
  ``torch.inference_mode`` are interleaved round-robin (a rotating start per round) and the
  median per variant is compared with the base model's.

Usage:
    python benchmarks/lora_vs_peft.py                 # full run (several minutes on 2 cores)
    python benchmarks/lora_vs_peft.py --quick         # smoke test on tiny-llama, < 60 s
    python benchmarks/lora_vs_peft.py --steps 8 --repeats 3 --batch 4 --seq 256 \
        --out benchmarks/results/lora_vs_peft.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

RESULT_MARK = "@@LORA_VS_PEFT_RESULT@@ "
HERE = Path(__file__).resolve().parent

TARGETS = {
    "train_step_time_ratio": 1.0,  # peftlab / peft, median step seconds
    "train_peak_rss_ratio": 1.0,  # peftlab / peft, whole-process peak RSS
    "train_peak_rss_increase_ratio": 1.0,  # peftlab / peft, training peak minus after-load RSS
    "merged_latency_ratio": 1.01,  # peftlab merged / base, every inference batch size
}


# ============================================================================ helpers (both sides)
def n_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def ru_maxrss_bytes() -> int:
    # Linux reports kilobytes (macOS bytes; this benchmark targets Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


CONTENDED_CORES = 0.25
"""A step/run during which other processes kept more than this many cores busy counts as contended."""


class CpuProbe:
    """Wall time, this process's CPU time and the whole machine's busy CPU time, to tell how
    many cores *other* processes used during an interval (the machine may be shared)."""

    _tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @classmethod
    def _stat(cls) -> tuple[float, float] | None:
        """(busy seconds of all CPUs, seconds stolen by the hypervisor) from /proc/stat."""
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except OSError:
            return None
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        steal = v[7] if len(v) > 7 else 0
        guest = sum(v[8:10])  # already counted in user/nice
        return (sum(v) - idle - steal - guest) / cls._tick, steal / cls._tick

    def __init__(self) -> None:
        self.wall, self.cpu, self.stat = time.perf_counter(), time.process_time(), self._stat()

    def since(self, start: CpuProbe) -> dict[str, float | None]:
        wall = self.wall - start.wall
        cpu = self.cpu - start.cpu
        foreign = steal = None
        if self.stat is not None and start.stat is not None and wall > 0:
            foreign = max(0.0, (self.stat[0] - start.stat[0] - cpu) / wall)
            steal = (self.stat[1] - start.stat[1]) / wall
        return {"wall_s": wall, "cpu_s": cpu, "foreign_cores": foreign, "steal_cores": steal}


def wait_idle(max_wait_s: float, threshold: float = CONTENDED_CORES, window_s: float = 2.0) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until other processes use < ``threshold`` cores over ``window_s``."""
    t0 = time.perf_counter()
    last = None
    while True:
        a = CpuProbe()
        time.sleep(window_s)
        last = CpuProbe().since(a)["foreign_cores"]
        waited = time.perf_counter() - t0
        if last is None or last < threshold or waited >= max_wait_s:
            return {"waited_s": waited, "foreign_cores": last, "idle": last is not None and last < threshold}


def boot_ci(a: list[float], b: list[float], *, paired: bool, n: int = 4000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of median(a) / median(b). ``paired``: resample indices jointly
    (interleaved rounds: a[i] and b[i] ran next to each other); else resample each independently."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if paired:
            idx = [rng.randrange(len(a)) for _ in a]
            ra, rb = [a[i] for i in idx], [b[i] for i in idx]
        else:
            ra = [a[rng.randrange(len(a))] for _ in a]
            rb = [b[rng.randrange(len(b))] for _ in b]
        out.append(statistics.median(ra) / statistics.median(rb))
    out.sort()
    return [out[int(0.025 * n)], out[int(0.975 * n) - 1]]


def setup_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def lora_kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    return dict(r=cfg["r"], alpha=cfg["alpha"], dropout=cfg["dropout"], target_modules=list(cfg["targets"]))


def peft_config(cfg: dict[str, Any]) -> Any:
    import peft

    return peft.LoraConfig(r=cfg["r"], lora_alpha=cfg["alpha"], lora_dropout=cfg["dropout"],
                           target_modules=list(cfg["targets"]))


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


# ============================================================================ training worker
def train_worker(cfg: dict[str, Any]) -> None:
    setup_worker(cfg["threads"])
    import torch

    from peftlab import models  # imports peftlab itself too

    if cfg["variant"] == "peft":
        import peft  # noqa: F401  - imported before the load, as peftlab is: its import is not training overhead

    t0 = time.perf_counter()
    model, _ = models.load(cfg["model"], with_tokenizer=False, seed=cfg["seed"])
    load_s = time.perf_counter() - t0
    gc.collect()
    rss_after_load = current_rss_bytes()
    vocab = model.config.vocab_size

    torch.manual_seed(cfg["seed"])
    if cfg["variant"] == "peftlab":
        import peftlab

        net = peftlab.attach(model, "lora", **lora_kwargs(cfg))
    else:
        import peft

        net = peft.get_peft_model(model, peft_config(cfg))
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg["lr"])

    g = torch.Generator().manual_seed(cfg["seed"])
    n_total = cfg["warmup"] + cfg["steps"]
    batches = [torch.randint(0, vocab, (cfg["batch"], cfg["seq"]), generator=g) for _ in range(n_total)]

    gc.collect()
    rss_after_attach = current_rss_bytes()
    peak_before_training = ru_maxrss_bytes()  # load + attach peak
    reset_ok = reset_peak_rss()

    times, cpu, foreign, steal, losses = [], [], [], [], []
    for ids in batches:
        start = CpuProbe()
        loss = net(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        d = CpuProbe().since(start)
        times.append(d["wall_s"])
        cpu.append(d["cpu_s"])
        foreign.append(d["foreign_cores"])
        steal.append(d["steal_cores"])
        losses.append(loss.item())
        del loss
    peak_training = ru_maxrss_bytes()  # since the reset: the training steps only (if reset_ok)
    timed = times[cfg["warmup"]:]
    clean = [t for t, f in zip(timed, foreign[cfg["warmup"]:]) if f is not None and f < CONTENDED_CORES]
    emit({
        "variant": cfg["variant"],
        "load_s": load_s,
        "trainable_params": sum(p.numel() for p in params),
        "step_s_all": times,
        "step_s_median": statistics.median(timed),
        "step_cpu_s_all": cpu,
        "step_cpu_s_median": statistics.median(cpu[cfg["warmup"]:]),
        "step_foreign_cores": foreign,
        "step_steal_cores": steal,
        "step_s_clean": clean,
        "contended_steps": len(timed) - len(clean),
        "losses": losses,
        "rss_after_load": rss_after_load,
        "rss_after_attach": rss_after_attach,
        "peak_rss_before_training": peak_before_training,
        "peak_rss_training": peak_training,
        "peak_rss_process": max(peak_before_training, peak_training),
        "peak_rss_increase": peak_training - rss_after_load,
        "hwm_reset": reset_ok,
        "torch_threads": torch.get_num_threads(),
    })


# ============================================================================ inference worker
def infer_worker(cfg: dict[str, Any]) -> None:
    setup_worker(cfg["threads"])
    import peft
    import torch

    import peftlab
    from peftlab import models
    from peftlab.core.layer import adapter_layers

    base, _ = models.load(cfg["model"], with_tokenizer=False, seed=cfg["seed"])
    base.eval()
    torch.manual_seed(cfg["seed"])

    # --- peftlab, unmerged, with a non-zero LoRA (lora_B perturbed, fixed seed)
    pl_unmerged = peftlab.attach(copy.deepcopy(base), "lora", **lora_kwargs(cfg))
    g = torch.Generator().manual_seed(cfg["seed"] + 1)
    with torch.no_grad():
        for _, layer in adapter_layers(pl_unmerged):
            w = layer.lora_B["default"].weight
            w.copy_(torch.randn(w.shape, generator=g) * cfg["lora_b_std"])
    lora_state = {k: v.detach().clone() for k, v in pl_unmerged.state_dict().items() if ".lora_" in k}

    def load_lora(model: Any, prefix_strip: str = "") -> int:
        n = 0
        with torch.no_grad():
            for k, v in model.state_dict(keep_vars=True).items():
                if ".lora_" in k:
                    key = k[len(prefix_strip):] if k.startswith(prefix_strip) else k
                    v.copy_(lora_state[key])
                    n += 1
        return n

    # --- peftlab merged: a fresh copy with the same LoRA weights, folded in
    pl_merged = peftlab.attach(copy.deepcopy(base), "lora", **lora_kwargs(cfg))
    load_lora(pl_merged)
    pl_merged = peftlab.merge_and_unload(pl_merged)

    # --- peft unmerged / merged, same LoRA weights copied in
    pe_unmerged = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    n_copied = load_lora(pe_unmerged, "base_model.model.")
    assert n_copied == len(lora_state), (n_copied, len(lora_state))
    pe_merged = peft.get_peft_model(copy.deepcopy(base), peft_config(cfg))
    load_lora(pe_merged, "base_model.model.")
    pe_merged = pe_merged.merge_and_unload()
    for m in (pl_unmerged, pl_merged, pe_unmerged, pe_merged):
        m.eval()

    variants = {
        "base": base,
        "peftlab_merged": pl_merged,
        "peftlab_unmerged": pl_unmerged,
        "peft_unmerged": pe_unmerged,
        "peft_merged": pe_merged,
    }

    # --- sanity: merged weights differ from base; every LoRA variant computes the same function
    t = cfg["targets"][0]
    name = next(n for n, _ in base.named_modules() if n.endswith(t))
    w_base = base.get_submodule(name).weight
    w_merged = pl_merged.get_submodule(name).weight
    checks: dict[str, Any] = {
        "merged_weight_max_abs_change": float((w_merged - w_base).abs().max()),
        "peftlab_merged_is_plain_linear": type(pl_merged.get_submodule(name)) is torch.nn.Linear,
        "lora_tensors_copied_into_peft": n_copied,
    }
    g = torch.Generator().manual_seed(cfg["seed"] + 2)
    ids = torch.randint(0, base.config.vocab_size, (1, min(cfg["seq"], 64)), generator=g)
    with torch.inference_mode():
        logits = {k: m(input_ids=ids, use_cache=False).logits.float() for k, m in variants.items()}
    ref = logits["peftlab_unmerged"]
    for k, v in logits.items():
        checks[f"max_abs_logit_diff_{k}_vs_peftlab_unmerged"] = float((v - ref).abs().max())
    checks["lora_changes_output"] = checks["max_abs_logit_diff_base_vs_peftlab_unmerged"] > 1e-4
    del logits, ref

    # --- timing: interleaved, rotating start, median per variant
    order = list(variants)
    results: dict[str, Any] = {}
    for batch, runs in zip(cfg["infer_batches"], cfg["infer_runs"]):
        g = torch.Generator().manual_seed(cfg["seed"] + 3)
        x = torch.randint(0, base.config.vocab_size, (batch, cfg["seq"]), generator=g)
        times: dict[str, list[float]] = {k: [] for k in order}
        foreign: dict[str, list[float | None]] = {k: [] for k in order}
        steal: dict[str, list[float | None]] = {k: [] for k in order}
        with torch.inference_mode():
            for _ in range(cfg["infer_warmup"]):
                for k in order:
                    variants[k](input_ids=x, use_cache=False)
            for i in range(runs):
                rot = order[i % len(order):] + order[:i % len(order)]
                for k in rot:
                    start = CpuProbe()
                    variants[k](input_ids=x, use_cache=False)
                    d = CpuProbe().since(start)
                    times[k].append(d["wall_s"])
                    foreign[k].append(d["foreign_cores"])
                    steal[k].append(d["steal_cores"])
        med = {k: statistics.median(v) for k, v in times.items()}
        # per-round paired ratios (variant / base of the same round), a drift-robust cross-check
        paired = {k: statistics.median(a / b for a, b in zip(times[k], times["base"])) for k in order}
        # rounds in which no run of any variant was contended: the same comparison, quiet rounds only
        quiet = [i for i in range(runs) if all(foreign[k][i] is not None and foreign[k][i] < CONTENDED_CORES
                                               for k in order)]
        med_quiet = ({k: statistics.median(times[k][i] for i in quiet) for k in order} if len(quiet) >= 5 else None)
        results[str(batch)] = {"runs": runs, "times_s": times, "foreign_cores": foreign, "steal_cores": steal,
                               "median_s": med,
                               "ratio_to_base_ci95": {k: boot_ci(times[k], times["base"], paired=True,
                                                                 seed=cfg["seed"]) for k in order},
                               "quiet_rounds": len(quiet), "median_s_quiet": med_quiet,
                               "ratio_to_base_quiet": ({k: med_quiet[k] / med_quiet["base"] for k in order}
                                                       if med_quiet else None),
                               "ratio_to_base": {k: med[k] / med["base"] for k in order},
                               "paired_ratio_to_base": paired}
    emit({"checks": checks, "by_batch": results, "torch_threads": torch.get_num_threads()})


# ============================================================================ driver
def run_worker(kind: str, cfg: dict[str, Any], timeout: float) -> dict[str, Any]:
    idle = wait_idle(cfg["wait_idle_s"]) if cfg["wait_idle_s"] > 0 else None
    env = dict(os.environ)
    n = str(cfg["threads"])
    env.update(OMP_NUM_THREADS=n, MKL_NUM_THREADS=n, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--_cfg", json.dumps(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-4000:] + "\n" + proc.stderr[-8000:] + "\n")
        raise RuntimeError(f"{kind} worker failed (rc={proc.returncode}) for {cfg.get('variant', '')}")
    out = json.loads(lines[-1][len(RESULT_MARK):])
    out["subprocess_wall_s"] = wall
    out["wait_idle"] = idle
    return out


def machine_info() -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import peftlab

    cpu_model = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total = None
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemTotal"):
                mem_total = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": n_cores(),
        "cpu_model": cpu_model,
        "mem_total_bytes": mem_total,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "peftlab": peftlab.__version__,
        "torch_parallel": torch.__config__.parallel_info().splitlines()[:6],
    }


def verdict(value: float, target: float, interval: list[float]) -> dict[str, Any]:
    """``met``: the point estimate is within the target. ``conclusive``: the noise interval lies
    entirely on one side of the target (otherwise the measurement cannot tell, on this machine)."""
    lo, hi = interval
    return {"value": value, "target": f"<= {target}", "met": value <= target, "interval": interval,
            "conclusive": hi <= target or lo > target}


def mib(x: float) -> str:
    return f"{x / 2**20:,.0f} MiB"


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    quick = args.quick
    cfg = {
        "model": args.model or ("tiny-llama" if quick else "smollm2-135m"),
        "r": 8, "alpha": 16, "dropout": 0.0, "targets": ["q_proj", "v_proj"],
        "lr": 1e-4, "seed": args.seed,
        "batch": args.batch or (2 if quick else 4),
        "seq": args.seq or (32 if quick else 256),
        "steps": args.steps or (3 if quick else 8),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "repeats": args.repeats or (1 if quick else 3),
        "threads": args.threads or n_cores(),
        "infer_batches": [1] if quick else [1, 4],
        "infer_runs": [args.infer_runs or 5] if quick else [args.infer_runs or 40, max(8, (args.infer_runs or 40) // 2)],
        "infer_warmup": 1 if quick else 2,
        "lora_b_std": 0.02,
        "wait_idle_s": args.wait_idle if args.wait_idle is not None else (0 if quick else 120),
        "contended_cores_threshold": CONTENDED_CORES,
        "quick": quick,
        "device": "cpu", "dtype": "float32",
    }
    return cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="timed training steps per run (default 8)")
    p.add_argument("--warmup", type=int, default=None, help="untimed warm-up steps per run (default 2)")
    p.add_argument("--repeats", type=int, default=None, help="alternating repeats per variant (default 3)")
    p.add_argument("--batch", type=int, default=None, help="training batch size (default 4)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default 256)")
    p.add_argument("--infer-runs", type=int, default=None,
                   help="timed forwards per variant at batch 1 (default 40; batch 4 gets half, >= 8)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in every worker (default: all cores)")
    p.add_argument("--model", default=None, help="peftlab.models name (default smollm2-135m; --quick: tiny-llama)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each worker, wait up to this many seconds for other processes to leave the "
                        "CPU idle (default 120; --quick: 0)")
    p.add_argument("--quick", action="store_true", help="tiny settings on tiny-llama: smoke-test in < 60 s")
    p.add_argument("--skip-train", action="store_true", help="inference part only")
    p.add_argument("--skip-infer", action="store_true", help="training part only")
    p.add_argument("--out", default=str(HERE / "results" / "lora_vs_peft.json"), help="JSON results file")
    p.add_argument("--_worker", choices=["train", "infer"], help=argparse.SUPPRESS)
    p.add_argument("--_cfg", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._worker:
        cfg = json.loads(args._cfg)
        (train_worker if args._worker == "train" else infer_worker)(cfg)
        return 0

    cfg = build_config(args)
    started = time.perf_counter()
    info = machine_info()
    print(f"# lora_vs_peft: model={cfg['model']} batch={cfg['batch']} seq={cfg['seq']} steps={cfg['steps']} "
          f"warmup={cfg['warmup']} repeats={cfg['repeats']} threads={cfg['threads']}", file=sys.stderr, flush=True)
    timeout = 600 if cfg["quick"] else 3600

    train: dict[str, Any] = {}
    if not args.skip_train:
        runs: dict[str, list[dict[str, Any]]] = {"peftlab": [], "peft": []}
        for rep in range(cfg["repeats"]):
            # ABBA order (peftlab, peft / peft, peftlab / ...): neither always runs first, so a
            # first-in-pair effect or a slow drift of the machine cancels out over the repeats.
            for variant in (("peftlab", "peft") if rep % 2 == 0 else ("peft", "peftlab")):
                r = run_worker("train", {**cfg, "variant": variant}, timeout)
                runs[variant].append(r)
                print(f"#   train repeat {rep + 1}/{cfg['repeats']} {variant:8s}: median step "
                      f"{r['step_s_median']:.3f} s (cpu {r['step_cpu_s_median']:.2f} s), peak RSS "
                      f"{mib(r['peak_rss_process'])}, increase {mib(r['peak_rss_increase'])}; contended steps "
                      f"{r['contended_steps']}/{cfg['steps']}", file=sys.stderr, flush=True)
        med = {v: {k: statistics.median(r[k] for r in rs)
                   for k in ("step_s_median", "step_cpu_s_median", "peak_rss_process", "peak_rss_training", "peak_rss_increase",
                             "rss_after_load", "rss_after_attach")}
               for v, rs in runs.items()}
        ratios = {
            "train_step_time_ratio": med["peftlab"]["step_s_median"] / med["peft"]["step_s_median"],
            "train_peak_rss_ratio": med["peftlab"]["peak_rss_process"] / med["peft"]["peak_rss_process"],
            "train_peak_rss_increase_ratio": med["peftlab"]["peak_rss_increase"] / med["peft"]["peak_rss_increase"],
        }
        clean = {v: [t for r in rs for t in r["step_s_clean"]] for v, rs in runs.items()}
        n_min = max(3, cfg["steps"] // 2)
        if all(len(c) >= n_min for c in clean.values()):
            ratios["train_step_time_ratio_uncontended"] = statistics.median(clean["peftlab"]) / statistics.median(clean["peft"])
        pooled = {v: [t for r in rs for t in r["step_s_all"][cfg["warmup"]:]] for v, rs in runs.items()}
        spread = {"train_step_time_ratio": boot_ci(pooled["peftlab"], pooled["peft"], paired=False, seed=cfg["seed"])}
        for k, key in (("train_peak_rss_ratio", "peak_rss_process"), ("train_peak_rss_increase_ratio", "peak_rss_increase")):
            a, b = [r[key] for r in runs["peftlab"]], [r[key] for r in runs["peft"]]
            spread[k] = [min(a) / max(b), max(a) / min(b)]
        ratios["train_step_cpu_time_ratio"] = med["peftlab"]["step_cpu_s_median"] / med["peft"]["step_cpu_s_median"]
        per_repeat_time_ratio = [a["step_s_median"] / b["step_s_median"] for a, b in zip(runs["peftlab"], runs["peft"])]
        train = {
            "runs": runs, "median_over_repeats": med, "ratios": ratios,
            "ratio_intervals": spread,
            "ratio_interval_kinds": {"train_step_time_ratio": "95% bootstrap of median(pooled timed steps) ratio",
                                     "train_peak_rss_ratio": "[min, max] over all pairs of runs",
                                     "train_peak_rss_increase_ratio": "[min, max] over all pairs of runs"},
            "per_repeat_step_time_ratio": per_repeat_time_ratio,
            "trainable_params": {v: rs[0]["trainable_params"] for v, rs in runs.items()},
            "first_loss": {v: rs[0]["losses"][0] for v, rs in runs.items()},
            "uncontended_steps": {v: len(c) for v, c in clean.items()},
            "uncontended_step_s_median": {v: statistics.median(c) if c else None for v, c in clean.items()},
            "contended_steps": {v: sum(r["contended_steps"] for r in rs) for v, rs in runs.items()},
        }

    infer: dict[str, Any] = {}
    if not args.skip_infer:
        print("#   inference: base / peftlab merged / peftlab unmerged / peft unmerged / peft merged ...",
              file=sys.stderr, flush=True)
        infer = run_worker("infer", cfg, timeout)

    # ---------------------------------------------------------------- targets
    targets: dict[str, Any] = {}
    if train:
        for k in ("train_step_time_ratio", "train_peak_rss_ratio", "train_peak_rss_increase_ratio"):
            targets[k] = verdict(train["ratios"][k], TARGETS[k], train["ratio_intervals"][k])
    if infer:
        for b, res in infer["by_batch"].items():
            v = res["ratio_to_base"]["peftlab_merged"]
            targets[f"merged_latency_ratio_batch{b}"] = verdict(v, TARGETS["merged_latency_ratio"],
                                                                res["ratio_to_base_ci95"]["peftlab_merged"])

    result = {
        "benchmark": "lora_vs_peft",
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config": cfg, "machine": info, "train": train, "inference": infer, "targets": targets,
        "all_targets_met": all(t["met"] for t in targets.values()),
        "targets_missed_beyond_noise": [k for k, t in targets.items() if not t["met"] and t["conclusive"]],
        "total_wall_s": time.perf_counter() - started,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    print(markdown(result))
    print(f"\nJSON: {out}", file=sys.stderr)
    return 0


def markdown(res: dict[str, Any]) -> str:
    cfg, m = res["config"], res["machine"]
    lines = [
        f"## peftlab vs peft: LoRA r={cfg['r']} alpha={cfg['alpha']} dropout={cfg['dropout']} on "
        f"{'/'.join(cfg['targets'])}, {cfg['model']}, {cfg['dtype']} {cfg['device']}",
        "",
        f"Machine: {m['cpus_usable']} cores ({m['cpu_model'] or 'unknown CPU'}), torch {m['torch']}, "
        f"transformers {m['transformers']}, peft {m['peft']}, peftlab {m['peftlab']}; torch threads {cfg['threads']}.",
        "",
    ]
    tr = res["train"]
    if tr:
        med = tr["median_over_repeats"]
        r = tr["ratios"]
        lines += [
            f"### Training (batch {cfg['batch']} x seq {cfg['seq']}, AdamW lr {cfg['lr']}; "
            f"{cfg['warmup']} warm-up + {cfg['steps']} timed steps; medians over {cfg['repeats']} alternating "
            "fresh-subprocess repeats)",
            "",
            "| metric | peftlab | peft | ratio peftlab/peft | target | met |",
            "|---|---:|---:|---:|---:|:---:|",
            f"| median step time | {med['peftlab']['step_s_median']:.3f} s | {med['peft']['step_s_median']:.3f} s "
            f"| **{r['train_step_time_ratio']:.3f}** | <= 1.0 | {_yn(r['train_step_time_ratio'] <= 1.0)} |",
            f"| peak RSS (process) | {mib(med['peftlab']['peak_rss_process'])} | {mib(med['peft']['peak_rss_process'])} "
            f"| **{r['train_peak_rss_ratio']:.3f}** | <= 1.0 | {_yn(r['train_peak_rss_ratio'] <= 1.0)} |",
            f"| peak RSS increase over after-load | {mib(med['peftlab']['peak_rss_increase'])} | "
            f"{mib(med['peft']['peak_rss_increase'])} | **{r['train_peak_rss_increase_ratio']:.3f}** | <= 1.0 | "
            f"{_yn(r['train_peak_rss_increase_ratio'] <= 1.0)} |",
            f"| median step CPU time (all threads) | {med['peftlab']['step_cpu_s_median']:.2f} s | "
            f"{med['peft']['step_cpu_s_median']:.2f} s | {r['train_step_cpu_time_ratio']:.3f} | | |",
            (f"| median step time, uncontended steps only | {tr['uncontended_step_s_median']['peftlab']:.3f} s "
             f"({tr['uncontended_steps']['peftlab']} steps) | {tr['uncontended_step_s_median']['peft']:.3f} s "
             f"({tr['uncontended_steps']['peft']} steps) | {r['train_step_time_ratio_uncontended']:.3f} | | |"
             if "train_step_time_ratio_uncontended" in r else
             f"| median step time, uncontended steps only | too few uncontended steps "
             f"({tr['uncontended_steps']['peftlab']}, {tr['uncontended_steps']['peft']}) | | | | |"),
            f"| RSS after model load | {mib(med['peftlab']['rss_after_load'])} | {mib(med['peft']['rss_after_load'])} "
            f"| {med['peftlab']['rss_after_load'] / med['peft']['rss_after_load']:.3f} | | |",
            f"| trainable params | {tr['trainable_params']['peftlab']:,} | {tr['trainable_params']['peft']:,} | "
            f"{tr['trainable_params']['peftlab'] / tr['trainable_params']['peft']:.3f} | | |",
            f"| first-step loss | {tr['first_loss']['peftlab']:.5f} | {tr['first_loss']['peft']:.5f} | | | |",
            "",
            "Step-time ratio 95% bootstrap interval (pooled timed steps): "
            f"[{tr['ratio_intervals']['train_step_time_ratio'][0]:.3f}, {tr['ratio_intervals']['train_step_time_ratio'][1]:.3f}]. "
            "Per-repeat step-time ratios: " + ", ".join(f"{x:.3f}" for x in tr["per_repeat_step_time_ratio"])
            + f". Steps during which other processes kept > {cfg['contended_cores_threshold']} cores busy: "
            f"peftlab {tr['contended_steps']['peftlab']}, peft {tr['contended_steps']['peft']} "
            f"(of {cfg['steps'] * cfg['repeats']} each).",
            "",
        ]
    inf = res["inference"]
    if inf:
        lines += [
            f"### Inference latency (forward, seq {cfg['seq']}, torch.inference_mode; interleaved, median)",
            "",
            "| batch | variant | median | ratio to base | 95% CI | paired ratio to base | ratio to base, quiet rounds |",
            "|---:|---|---:|---:|---:|---:|---:|",
        ]
        for b, rb in inf["by_batch"].items():
            for k in ("base", "peftlab_merged", "peftlab_unmerged", "peft_merged", "peft_unmerged"):
                ratio = rb["ratio_to_base"][k]
                bold = f"**{ratio:.3f}**" if k == "peftlab_merged" else f"{ratio:.3f}"
                quiet = rb.get("ratio_to_base_quiet")
                q = f"{quiet[k]:.3f} ({rb['quiet_rounds']}/{rb['runs']})" if quiet else f"n/a ({rb.get('quiet_rounds', 0)}/{rb['runs']})"
                lo, hi = rb["ratio_to_base_ci95"][k]
                lines.append(f"| {b} | {k} | {rb['median_s'][k] * 1e3:.1f} ms "
                             f"| {bold} | [{lo:.3f}, {hi:.3f}] | {rb['paired_ratio_to_base'][k]:.3f} | {q} |")
            lines.append(f"| {b} | peftlab_unmerged / peft_unmerged | | "
                         f"{rb['median_s']['peftlab_unmerged'] / rb['median_s']['peft_unmerged']:.3f} | | | |")
            lines.append(f"| {b} | peftlab_merged / peft_merged | | "
                         f"{rb['median_s']['peftlab_merged'] / rb['median_s']['peft_merged']:.3f} | | | |")
        c = inf["checks"]
        lines += [
            "",
            f"Checks: merged weight max |change| {c['merged_weight_max_abs_change']:.2e}; LoRA changes the output: "
            f"{c['lora_changes_output']}; max |logit diff| vs peftlab unmerged: "
            + ", ".join(f"{k.split('diff_')[1].split('_vs')[0]} {v:.1e}" for k, v in c.items()
                        if k.startswith("max_abs_logit_diff") and "base" not in k),
            "",
        ]
    lines += ["### Targets", "",
              "Interval: training step time and merged latency, 95% bootstrap of the ratio of medians; peak RSS, "
              "[min, max] of the ratio over all pairs of runs. 'within noise': the interval straddles the goal, "
              "so this machine cannot tell whether the goal is met.", "",
              "| target | value | interval | goal | met |", "|---|---:|---:|---:|:---:|"]
    for k, t in res["targets"].items():
        lo, hi = t["interval"]
        note = "" if t["conclusive"] else " (within noise)"
        lines.append(f"| {k} | {t['value']:.3f} | [{lo:.3f}, {hi:.3f}] | {t['target']} | {_yn(t['met'])}{note} |")
    lines.append("")
    missed = [k for k, t in res["targets"].items() if not t["met"]]
    clear_miss = [k for k in missed if res["targets"][k]["conclusive"]]
    lines.append(f"All targets met: {_yn(res['all_targets_met'])}"
                 + (f"; missed beyond noise: {', '.join(clear_miss) or 'none'}" if missed else "")
                 + f" (total wall {res['total_wall_s']:.0f} s)")
    return "\n".join(lines)


def _yn(b: bool) -> str:
    return "yes" if b else "NO"


if __name__ == "__main__":
    sys.exit(main())
