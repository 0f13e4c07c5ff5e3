"""Operations are transactions: every public operation completes or leaves the model exactly
as it was, for every registered method.

The fault-injection tests make the k-th call of any of a set of internal steps raise (class
swaps, container and parameter registration, hook installation, base-tensor swaps, merges,
in-place tensor writes, ``requires_grad`` changes, ...), for every k up to the number of calls
the operation makes, and compare a full fingerprint of the model before and after.
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core import errors, inputs, layer, slots
from peftlab.core.method import method_class
from peftlab.core.transaction import before_write, transaction
from peftlab.methods import bottleneck
from peftlab import quant
from tests.conftest import METHOD_EXAMPLES, TINY, batch, out, perturb

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- fingerprint
def _bits(t: torch.Tensor) -> Any:
    if t.device.type == "meta":
        return ("meta", t.dtype, tuple(t.shape))
    return (t.dtype, tuple(t.shape), t.detach().cpu().contiguous().view(-1).view(torch.uint8).clone())


def _plain(v: Any) -> Any:
    """A comparable form of a module attribute (tensors by their bits)."""
    if isinstance(v, torch.Tensor):
        return _bits(v)
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (bool, int, float, str, type(None))):
        return v
    return (type(v).__name__, id(v))


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """Everything an operation may change: module classes by path, parameters and buffers
    (identity, values, requires_grad, version counter), hooks, module attributes, the registry."""
    fp: dict[str, Any] = {}
    fp["modules"] = [(p, type(m), id(m), m.training) for p, m in model.named_modules(remove_duplicate=False)]
    fp["parameters"] = [(n, id(p), p.requires_grad, p._version, _bits(p))
                        for n, p in model.named_parameters(remove_duplicate=False)]
    fp["buffers"] = [(n, id(b), b._version, _bits(b)) for n, b in model.named_buffers(remove_duplicate=False)]
    fp["state_dict"] = list(model.state_dict())
    hooks, attrs = {}, {}
    for p, m in model.named_modules(remove_duplicate=False):
        hooks[p] = {k: list(v) for k, v in vars(m).items() if "hook" in k and isinstance(v, dict)}
        attrs[p] = {k: _plain(v) for k, v in vars(m).items()
                    if k not in ("_parameters", "_buffers", "_modules") and "hook" not in k}
    fp["hooks"], fp["attrs"] = hooks, attrs
    reg = model.__dict__.get("peftlab")
    if reg is not None:
        fp["registry"] = {
            "id": id(reg), "active": list(reg.active), "disabled": reg.disabled,
            "originals": {k: None if v is None else _bits(v) for k, v in reg.originals.items()},
            "adapters": {n: (id(s), s.method, s.base_keys, None if s.own is None else
                             {k: _bits(v) for k, v in s.own.items()}, [id(h) for h in s.hooks])
                         for n, s in reg.adapters.items()},
        }
    return fp


def assert_same(a: dict[str, Any], b: dict[str, Any], what: str = "") -> None:
    for key in a.keys() | b.keys():
        x, y = a.get(key), b.get(key)
        if not _equal(x, y):
            raise AssertionError(f"{what}: model {key} changed: {_first_difference(x, y)}")


def _equal(x: Any, y: Any) -> bool:
    if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
        return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return len(x) == len(y) and all(_equal(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    return type(x) is type(y) and x == y


def _first_difference(x: Any, y: Any, path: str = "") -> str:
    if isinstance(x, dict) and isinstance(y, dict):
        if x.keys() != y.keys():
            return f"{path}: keys {sorted(map(str, x.keys() ^ y.keys()))[:6]} differ"
        for k in x:
            if not _equal(x[k], y[k]):
                return _first_difference(x[k], y[k], f"{path}.{k}")
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        if len(x) != len(y):
            return f"{path}: length {len(x)} vs {len(y)}"
        for i, (a, b) in enumerate(zip(x, y)):
            if not _equal(a, b):
                return _first_difference(a, b, f"{path}[{i}]")
    return f"{path}: {str(x)[:200]} vs {str(y)[:200]}"


# ----------------------------------------------------------------------------- fault injection
FAULT_COUNTS: dict[str, dict[str, int]] = {}
"""Per operation: calls made, faults injected, failed (and rolled back), absorbed."""


class InjectedFault(Exception):
    """Raised by an internal step that the test made fail."""


STEPS: list[tuple[Any, str]] = [
    (layer.AdapterLayer, "adopt"),
    (layer.AdapterLayer, "_init_containers"),
    (layer.AdapterLayer, "remove_adapter"),
    (layer.AdapterLayer, "restore"),
    (layer.MergeableLayer, "merge_adapter"),
    (layer.MergeableLayer, "_unmerge_last"),
    (slots, "train_base_tensors"),
    (slots, "swap_out_base"),
    (slots, "swap_in_base"),
    (slots, "forget_base"),
    (slots, "add_module_copies"),
    (slots.CopyLayer, "add_copy"),
    (inputs, "install"),
    (bottleneck, "install"),
    (quant.QuantizedModule, "convert"),
    (nn.Module, "register_parameter"),
    (nn.Module, "register_buffer"),
    (nn.Module, "add_module"),
    (nn.Module, "register_forward_pre_hook"),
    (nn.Module, "register_forward_hook"),
    (nn.Module, "requires_grad_"),
    (nn.Module, "__setattr__"),
    (torch.Tensor, "copy_"),
    (torch.Tensor, "requires_grad_"),
]
"""Internal steps that the injector can make fail: peftlab's own steps and the torch calls
every change goes through (containers, parameters, hooks, in-place writes, grad flags)."""


_PEFTLAB = str(Path(peftlab.__file__).parent)


def _call_site() -> tuple[tuple[str, int], ...]:
    """Where in peftlab the current step was called from (the innermost peftlab frames)."""
    frame, site = sys._getframe(2), []
    while frame is not None and len(site) < 4:
        if frame.f_code.co_filename.startswith(_PEFTLAB):
            site.append((frame.f_code.co_filename, frame.f_lineno))
        frame = frame.f_back
    return tuple(site)


class Injector:
    """Counts calls of :data:`STEPS` while active; the ``fail_at``-th call raises. With
    ``record`` it notes each call's step and peftlab call site."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_at: int | None = None
        self.failed_in = ""
        self.sites: list[tuple[str, tuple[tuple[str, int], ...]]] | None = None

    @contextlib.contextmanager
    def active(self, fail_at: int | None, record: bool = False) -> Iterator[Injector]:
        self.calls, self.fail_at, self.failed_in = 0, fail_at, ""
        self.sites = [] if record else None
        saved = []
        for owner, attr in STEPS:
            if not hasattr(owner, attr):
                continue
            raw = owner.__dict__.get(attr)
            saved.append((owner, attr, raw))
            if isinstance(raw, classmethod):
                setattr(owner, attr, classmethod(self._wrap(raw.__func__, attr)))
            else:
                setattr(owner, attr, self._wrap(getattr(owner, attr), attr))
        try:
            yield self
        finally:
            for owner, attr, raw in reversed(saved):
                if raw is None:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, raw)

    def _wrap(self, fn: Callable[..., Any], attr: str) -> Callable[..., Any]:
        def step(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.sites is not None:
                self.sites.append((attr, _call_site()))
            if self.calls == self.fail_at:
                self.failed_in = attr
                raise InjectedFault(f"injected fault at call {self.calls} ({attr})")
            return fn(*args, **kwargs)

        return step


def _caused_by_fault(e: BaseException | None) -> bool:
    while e is not None:
        if isinstance(e, InjectedFault) or "injected fault" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def fault_points(sites: list[tuple[str, tuple[tuple[str, int], ...]]]) -> list[int]:
    """The calls to fail: the first and the last call of every distinct (step, call site) of an
    undisturbed run, so each internal step fails once with the least and once with the most
    work done before it (a step repeated per module fails at the first and the last module)."""
    first: dict[Any, int] = {}
    last: dict[Any, int] = {}
    for k, key in enumerate(sites, start=1):
        first.setdefault(key, k)
        last[key] = k
    return sorted(set(first.values()) | set(last.values()))


def run_faults(setup: Callable[[], nn.Module], op: Callable[[nn.Module], Any], what: str) -> dict[str, int]:
    """Run ``op`` on the model ``setup`` builds with a fault at each internal step (see
    :func:`fault_points`). A failed run must leave the model's fingerprint unchanged (the same
    model is reused, so each rollback also proves the model still works); a run whose fault was
    absorbed (a fallback path) must have completed."""
    inj = Injector()
    probe = setup()
    torch.manual_seed(0)
    with inj.active(None, record=True):
        op(probe)
    total = inj.calls
    assert total > 0 and inj.sites is not None, f"{what}: the operation made no injectable call"
    ks = fault_points(inj.sites)
    model = setup()
    before = fingerprint(model)
    failed = absorbed = 0
    for k in ks:
        torch.manual_seed(0)
        try:
            with inj.active(k):
                op(model)
        except BaseException as e:  # noqa: BLE001 - any exception must leave the model as it was
            assert _caused_by_fault(e), f"{what}: fault at call {k} ({inj.failed_in}) surfaced as {e!r}"
            assert not any("could not fully undo" in n for n in getattr(e, "__notes__", [])), e.__notes__
            assert_same(before, fingerprint(model), f"{what}, fault at call {k}/{total} ({inj.failed_in})")
            failed += 1
        else:  # the fault was absorbed (e.g. a fallback path); the operation completed
            absorbed += 1
            model = setup()
            before = fingerprint(model)
    torch.manual_seed(0)
    op(model)  # the model that survived every rollback still takes the operation
    stats = {"calls": total, "injected": len(ks), "failed": failed, "absorbed": absorbed}
    FAULT_COUNTS[what] = stats
    return stats


# ----------------------------------------------------------------------------- cases
def first_model(method: str) -> str:
    return next(iter(METHOD_EXAMPLES[method]))


def attached(method: str, model_name: str, names: tuple[str, ...] = ("default",), seed: int = 3) -> nn.Module:
    model = TINY[model_name](0)
    opts = METHOD_EXAMPLES[method][model_name]
    for i, n in enumerate(names):
        extra = {"modules_to_save": []} if i and method == "bitfit" else {}
        torch.manual_seed(i)
        peftlab.attach(model, method, n, **{**opts, **extra})
        perturb(peftlab.adapter_parameters(model, n), seed=seed + i, scale=0.05)
    return model


METHODS = sorted(METHOD_EXAMPLES)


@pytest.mark.parametrize("method", METHODS)
def test_attach_is_atomic_under_injected_faults(method):
    model_name = first_model(method)
    opts = METHOD_EXAMPLES[method][model_name]
    stats = run_faults(lambda: TINY[model_name](0), lambda m: peftlab.attach(m, method, **opts),
                       f"attach {method} on {model_name}")
    assert stats["failed"] > 0


@pytest.mark.parametrize("method", [m for m in METHODS if method_class(m).multi_adapter])
def test_second_attach_is_atomic_under_injected_faults(method):
    model_name = first_model(method)
    opts = dict(METHOD_EXAMPLES[method][model_name])
    if method == "bitfit":
        opts["modules_to_save"] = []
    stats = run_faults(lambda: attached(method, model_name), lambda m: peftlab.attach(m, method, "other", **opts),
                       f"second attach {method}")
    assert stats["failed"] > 0


@pytest.mark.parametrize("method", [m for m in METHODS if not method_class(m).trains_base_weights])
def test_detach_is_atomic_under_injected_faults(method):
    model_name = first_model(method)
    mergeable = method_class(method).mergeable

    def setup() -> nn.Module:
        model = attached(method, model_name)
        if mergeable:
            peftlab.merge(model)  # detach must unmerge first
        return model

    run_faults(setup, lambda m: peftlab.detach(m), f"detach {method}")


@pytest.mark.parametrize("method", [m for m in METHODS if method_class(m).mergeable])
def test_merge_and_unmerge_are_atomic_under_injected_faults(method):
    model_name = first_model(method)
    names = ("default", "other") if method_class(method).multi_adapter and method != "bitfit" else ("default",)

    def setup() -> nn.Module:
        model = attached(method, model_name, names)
        peftlab.use(model, *names)
        return model

    def merged() -> nn.Module:
        model = setup()
        peftlab.merge(model)
        return model

    if any(isinstance(lay, layer.MergeableLayer) for _, lay in layer.adapter_layers(setup())):
        run_faults(setup, lambda m: peftlab.merge(m), f"merge {method}")
        run_faults(merged, lambda m: peftlab.unmerge(m), f"unmerge {method}")
    else:  # the update already lives in the base tensors: merging writes nothing (tested below)
        model = setup()
        before = fingerprint(model)
        peftlab.merge(model)
        peftlab.unmerge(model)
        assert_same(before, fingerprint(model), f"no-op merge of {method}")
    run_faults(setup, lambda m: peftlab.merge_and_unload(m), f"merge_and_unload {method}")


@pytest.mark.parametrize("method", [m for m in METHODS if method_class(m).multi_adapter])
def test_use_is_atomic_under_injected_faults(method):
    model_name = first_model(method)
    mergeable = method_class(method).mergeable

    def setup() -> nn.Module:
        model = attached(method, model_name, ("default", "other"))
        peftlab.use(model, "default")
        if mergeable and method != "bitfit":
            peftlab.merge(model)  # switching away unmerges it
        return model

    run_faults(setup, lambda m: peftlab.use(m, "other"), f"use {method}")


@pytest.mark.parametrize("method", METHODS)
def test_load_is_atomic_under_injected_faults(method, tmp_path):
    model_name = first_model(method)
    peftlab.save(attached(method, model_name), tmp_path)
    run_faults(lambda: TINY[model_name](0), lambda m: peftlab.load(m, tmp_path), f"load {method}")


def test_transaction_restores_identity_hooks_and_logged_writes():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    handle = model[0].register_forward_hook(lambda *a: None)
    before = fingerprint(model)
    with pytest.raises(KeyError), transaction(model):
        model[0].__class__ = type("Swapped", (nn.Linear,), {})
        model[1].weight.requires_grad_(False)
        model.add_module("extra", nn.ReLU())
        model[0].register_forward_pre_hook(lambda *a: None)
        before_write(model[0].weight)
        with torch.no_grad():
            model[0].weight.add_(1)
        del model[1].bias
        raise KeyError("boom")
    assert_same(before, fingerprint(model))
    handle.remove()  # a handle taken before the transaction still works
    assert not model[0]._forward_hooks


def test_unlogged_write_is_reported():
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(KeyError) as info, transaction(model):
        with torch.no_grad():
            model[0].weight.add_(1)
        raise KeyError("boom")
    assert any("without before_write" in n for n in info.value.__notes__)


def test_nested_transaction_restores_its_own_start():
    model = nn.Sequential(nn.Linear(2, 2))
    with transaction(model):
        model.add_module("kept", nn.ReLU())
        mid = fingerprint(model)
        with pytest.raises(KeyError), transaction(model):
            model.add_module("dropped", nn.ReLU())
            raise KeyError("inner")
        assert_same(mid, fingerprint(model))
    assert hasattr(model, "kept")


# ----------------------------------------------------------------------------- the review's cases
def _llama() -> nn.Module:
    return TINY["tiny-llama"](0)


@pytest.mark.parametrize(("name", "options", "match"), [
    ("forward", {"target_modules": ["q_proj"]}, "attribute of torch's nn.ModuleDict"),
    ("keys", {"target_modules": ["q_proj"]}, "pick another name"),
    ("default", {"r": True}, "r must be an integer"),
    ("default", {"rank_pattern": {"(": 4}}, "rank_pattern key '\\(' is not a regular expression"),
    ("default", {"r": 10 ** 9}, "rank 1000000000 .* larger than both of its dimensions"),
    ("default", {"alpha": float("nan")}, "alpha must be a finite number"),
    ("default", {"target_modules": ["q_proj", "nope"]}, "matches no module"),
])
def test_failed_attach_changes_nothing(name, options, match):
    model = _llama()
    before = fingerprint(model)
    with pytest.raises(errors.PeftlabError, match=match):
        peftlab.attach(model, "lora", name, **options)
    assert_same(before, fingerprint(model))
    peftlab.attach(model, "lora", target_modules=["q_proj"])  # nothing was left half-done
    peftlab.detach(model)


def test_failure_late_in_attach_is_rolled_back(monkeypatch):
    """A failure after every module was adapted (here: in activation) undoes all of it."""
    model = TINY["tiny-gpt2"](0)
    peftlab.attach(model, "lora", "a", target_modules=["c_attn"], bias="all")
    perturb(peftlab.adapter_parameters(model, "a"))
    before = fingerprint(model)

    def broken(*args, **kwargs):
        raise RuntimeError("activation failed")

    monkeypatch.setattr(peftlab.api, "use", broken)
    with pytest.raises(RuntimeError, match="activation failed"):
        peftlab.attach(model, "lora", "b", target_modules=["c_attn", "c_fc"], bias="all")
    assert_same(before, fingerprint(model))


def test_detach_while_merged_unmerges_first_and_gives_the_exact_base():
    model = _llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, "lora", target_modules=["q_proj", "v_proj", "down_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.merge(model)
    peftlab.detach(model)
    assert peftlab.adapters(model) == {}
    for k, v in model.state_dict().items():
        assert torch.equal(v, base[k]), k


def test_unmerge_then_detach_gives_the_exact_base():
    model = _llama().to(torch.bfloat16)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    peftlab.attach(model, "lora", target_modules=["q_proj", "v_proj"])
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.merge(model)
    peftlab.unmerge(model)
    peftlab.detach(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("method", ["lora", "dylora", "flora"])
def test_fp16_merge_that_overflows_is_refused_and_changes_nothing(method):
    model = _llama().half()
    opts = {"lora": {"r": 4}, "dylora": {"r_max": 4}, "flora": {"r": 4}}[method]
    peftlab.attach(model, method, target_modules=["q_proj"], **opts)
    with torch.no_grad():
        for p in peftlab.adapter_parameters(model, "default").values():
            p.fill_(200.0)  # the update is finite in fp32 but far beyond fp16's 65504
    before = fingerprint(model)
    with pytest.raises(FloatingPointError, match="NaN/inf .* in their dtype"):
        peftlab.merge(model)
    assert_same(before, fingerprint(model))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("targets", [["lm_head"], ["embed_tokens"]])
def test_merge_into_a_tied_weight_is_refused(targets):
    model = _llama()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    peftlab.attach(model, "lora", target_modules=targets)
    perturb(peftlab.adapter_parameters(model, "default"))
    before = fingerprint(model)
    with pytest.raises(errors.AdapterStateError, match="tied .* Untie the weights first .*exclude_modules"):
        peftlab.merge(model)
    with pytest.raises(errors.AdapterStateError, match="tied"):
        peftlab.merge_and_unload(model)
    assert_same(before, fingerprint(model))


def test_merge_after_untying_works():
    model = _llama()
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.config.tie_word_embeddings = False
    peftlab.attach(model, "lora", target_modules=["lm_head"])
    perturb(peftlab.adapter_parameters(model, "default"))
    x = batch()
    expected = out(model, x)
    peftlab.merge(model)
    torch.testing.assert_close(out(model, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["lora", "dylora", "flora"])
@pytest.mark.parametrize("order", [None, ["b", "a"]], ids=["active-order", "reversed"])
def test_unmerge_is_bit_exact_with_two_active_adapters_in_bf16(method, order):
    model = _llama().to(torch.bfloat16)
    opts = {"lora": {"r": 4}, "dylora": {"r_max": 4}, "flora": {"r": 4}}[method]
    for i, n in enumerate(("a", "b")):
        peftlab.attach(model, method, n, target_modules=["q_proj", "v_proj", "down_proj"], **opts)
        perturb(peftlab.adapter_parameters(model, n), seed=i + 1, scale=0.3)
    peftlab.use(model, "a", "b")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for _ in range(3):
        peftlab.merge(model, order)
        peftlab.unmerge(model)
    changed = sum(int((v != before[k]).sum()) for k, v in model.state_dict().items())
    assert changed == 0
    peftlab.merge(model, order)
    with peftlab.disabled(model):  # disabled() unmerges and re-merges exactly too
        pass
    peftlab.detach(model, "a")
    peftlab.detach(model, "b")
    base = _llama().to(torch.bfloat16).state_dict()
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- config refusals
NUMERIC_REFUSALS = [
    ("lora", "alpha", float("nan")), ("lora", "alpha", float("inf")), ("lora", "alpha", -1.0),
    ("lora", "alpha_pattern", {"q_proj": float("nan")}), ("lora", "alpha_pattern", {"q_proj": -2.0}),
    ("lora", "alpha_pattern", {"q_proj": float("inf")}),
    ("lora", "r", True), ("lora", "r", 2.5), ("lora", "r", "8"), ("lora", "rank_pattern", {"q_proj": True}),
    ("lora", "rslora", "false"), ("lora", "rslora", 0), ("lora", "dropout", float("nan")),
    ("dylora", "alpha", float("nan")), ("dylora", "alpha", -4.0), ("dylora", "alpha", float("-inf")),
    ("dylora", "r_max", True), ("dylora", "r_min", 1.0), ("dylora", "rank", True), ("dylora", "update_all", "false"),
    ("flora", "scale", float("nan")), ("flora", "scale", float("inf")), ("flora", "scale", -1.0),
    ("flora", "r", True), ("flora", "kernel_r", 2.0), ("flora", "rank_pattern", {"(": [2, 2]}),
    ("qlora", "alpha", float("nan")), ("qlora", "alpha", -1.0), ("qlora", "alpha_pattern", {"q": float("nan")}),
    ("qlora", "r", True), ("qlora", "double_quant", "false"), ("qlora", "blocksize", True),
    ("houlsby", "layer_norm", "false"), ("houlsby", "scaling", float("nan")), ("houlsby", "reduction_factor", 0.5),
    ("compacter", "phm_dim", True), ("galore", "eight_bit", "false"), ("galore", "scale", float("nan")),
    ("fusion", "train_adapters", "false"),
]


@pytest.mark.parametrize(("method", "field_name", "value"), NUMERIC_REFUSALS,
                         ids=[f"{m}-{f}-{v!r}" for m, f, v in NUMERIC_REFUSALS])
def test_bad_field_values_are_refused_when_the_method_is_built(method, field_name, value):
    with pytest.raises(errors.ConfigError, match=field_name):
        peftlab.get_method(method, **{field_name: value})


def test_string_booleans_are_refused_for_every_bool_field_of_every_method():
    import dataclasses
    import typing

    checked = 0
    for name in peftlab.methods():
        cls = method_class(name)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints.get(f.name) is bool:
                with pytest.raises(errors.ConfigError, match=f.name):
                    cls.from_options({f.name: "false"})
                checked += 1
    assert checked >= 8


def test_alpha_pattern_value_scales_the_update():
    model = _llama()
    peftlab.attach(model, "lora", r=4, alpha=8, target_modules=["q_proj"], alpha_pattern={"layers.1.self_attn.q_proj": 2})
    assert model.model.layers[0].self_attn.q_proj.scaling("default") == 2.0
    assert model.model.layers[1].self_attn.q_proj.scaling("default") == 0.5
    assert math.isfinite(out(model, batch()).sum().item())


def test_report_fault_counts(capsys):
    """Not a check: prints how many faults each operation took (run with -s to see it)."""
    if FAULT_COUNTS:
        with capsys.disabled():
            total = sum(s["injected"] for s in FAULT_COUNTS.values())
            print(f"\n{len(FAULT_COUNTS)} operations, {total} injected faults")
            for what, s in sorted(FAULT_COUNTS.items()):
                print(f"  {what}: {s}")


# ----------------------------------------------------------------------------- generated configs
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import copy  # noqa: E402
import dataclasses  # noqa: E402
import typing  # noqa: E402

ENTRIES = st.sampled_from([
    "q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head", "self_attn", "mlp", "model", "norm", "query",
    "value", "dense", "classifier", "word_embeddings", "c_attn", "layers.0.self_attn.q_proj", "*.q_proj",
    "*.layer.*.attention.*", "model.layers.*.mlp.*", "re:.*proj", "re:(", "re:.*\\.1\\..*", "re:[", "type:Linear",
    "type:Embedding", "type:LayerNorm", "type:Nope", "all-linear", "", "nope", "forward", "q_projj", ".*attn.*",
    ".*mlp.*", ".*attention.*"])
"""Target entries: exact names, globs, regexes (some invalid), types, and names that do not exist."""
PATTERN_KEYS = st.sampled_from(["q_proj", "v_proj", "layers\\.0\\..*", "(", "query", "nope", "*"])
MEMBERS = st.sampled_from([{"method": "houlsby"}, {"method": "pfeiffer", "reduction_factor": 8},
                           {"method": "compacter", "phm_dim": 2}, {"method": "lora"}, {"method": 5}, {},
                           "houlsby", {"method": "houlsby", "reduction_factor": 0}, {"method": "houlsby", "x": 1}])
JUNK = st.sampled_from([None, "", "x", 3, -1, 2.5, True, [], {}, float("nan")])
NAMES = st.sampled_from(["default", "default", "task_a", "forward", "a.b", "", "train", "x" * 3, "keys"])


def _values(hint: Any, name: str) -> st.SearchStrategy[Any]:
    """Valid and invalid values for a field of type ``hint`` named ``name``."""
    if name in ("target_modules", "exclude_modules", "modules_to_save", "quantize_also", "placement"):
        entries = st.sampled_from(["attn", "ffn", "x"]) if name == "placement" else ENTRIES
        return st.lists(entries, max_size=3) | entries | JUNK
    if name == "layers":
        item = st.integers(-1, 3) | st.sampled_from(["0-1", "1", "x", "3-1", "0,1"])
        return st.none() | st.lists(item, max_size=3) | item | JUNK
    if name == "adapters":
        return st.dictionaries(st.sampled_from(["a", "b", "forward", "x.y"]), MEMBERS, max_size=3) | JUNK
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, __import__("types").UnionType):
        return st.one_of([_values(a, name) for a in args])
    if hint is type(None):
        return st.none()
    if hint is bool:
        return st.booleans() | st.sampled_from(["false", "true", 0, 1, None])
    if hint is int:
        return st.integers(-2, 40) | st.sampled_from([True, 2.5, "8", None, 10 ** 9])
    if hint is float:
        return (st.floats(-2, 50, allow_nan=False)
                | st.sampled_from([float("nan"), float("inf"), -float("inf"), "1.0", True, None, 0.0]))
    if hint is str:
        return st.sampled_from(["", "nope", "default", "none", "all", "lora_only", "gaussian", "random", "mlp",
                                "lstm", "vocab", "nf4", "int8", "auto", "bf16", "relu", "gelu", 3, None])
    if origin is dict:
        key = PATTERN_KEYS if name.endswith("pattern") else st.sampled_from(["a", "blocks", "attn_out", "x"])
        return st.dictionaries(key, _values(args[1], "") if args else JUNK, max_size=2) | JUNK
    if origin is tuple or origin is list or hint in (tuple, list):
        item = _values(args[0], "") if args else JUNK
        return st.lists(item, max_size=3) | JUNK
    if hint is Any:
        return JUNK
    return st.lists(st.integers(-1, 40), max_size=4) | JUNK  # e.g. a Sequence[int]


def config_strategy(method: str, model_name: str) -> st.SearchStrategy[dict[str, Any]]:
    """The method's example options with up to three of its fields replaced by generated values
    (so that most examples get past the field checks and reach the model)."""
    cls = method_class(method)
    hints = typing.get_type_hints(cls)
    optional = {f.name: _values(hints.get(f.name, Any), f.name) for f in dataclasses.fields(cls)
                if f.name != "tokenizer"}
    base = METHOD_EXAMPLES[method][model_name]
    chosen = st.lists(st.sampled_from(sorted(optional)), max_size=3, unique=True)  # few fields at a time
    return chosen.flatmap(lambda keys: st.fixed_dictionaries({k: optional[k] for k in keys})).map(
        lambda o: {**base, **o})


@pytest.mark.parametrize("method", METHODS)
def test_generated_configs_raise_only_peftlab_errors_and_change_nothing(method):
    model_name = first_model(method)
    template = TINY[model_name](0)
    holder: dict[str, nn.Module] = {}

    def fresh(existing: bool) -> nn.Module:
        model = copy.deepcopy(template)
        if existing:  # a model that already carries an adapter: the registry must be restored too
            peftlab.attach(model, method, "existing", **METHOD_EXAMPLES[method][model_name])
        return model

    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(options=config_strategy(method, model_name), name=NAMES,
           existing=st.booleans() if method_class(method).multi_adapter else st.just(False))
    def check(options: dict[str, Any], name: str, existing: bool) -> None:
        key = f"existing={existing}"
        model = holder.pop(key, None) or fresh(existing)
        before = fingerprint(model)
        try:
            peftlab.attach(model, method, name, **options)
        except errors.PeftlabError as e:
            assert_same(before, fingerprint(model), f"{method} {options} name={name!r}: {e}")
            holder[key] = model  # unchanged: reuse it
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"{method} {options} name={name!r} raised {type(e).__name__} (not a peftlab "
                                 f"error): {e}") from e
        else:
            assert name in peftlab.adapters(model)

    check()


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_file_missing_one_tensor_changes_nothing(method, tmp_path):
    """The review's case: a QLoRA file with one tensor missing left 4 layers quantized."""
    from safetensors.torch import load_file, save_file

    peftlab.save(attached(method, "tiny-llama"), tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    del tensors[sorted(tensors)[-1]]
    save_file(tensors, weights)  # a plain file (no peftlab header): as another tool would write it
    model = _llama()
    before = fingerprint(model)
    with pytest.raises(errors.AdapterFileError, match="missing"):
        peftlab.load(model, tmp_path)
    assert_same(before, fingerprint(model))
    assert not any(isinstance(m, quant.QuantizedModule) for m in model.modules())
