"""Mixed-adapter batches (``peftlab.per_row``): every row equals that row run alone with its adapter.

The oracle is the row alone, in a batch of one, with its adapter made the active one by
``peftlab.use`` (or the base model under ``peftlab.disabled``): a different code path (one adapter
per layer, plain ``F.linear``) from the routed one (tiles, ``bmm``, ``index_add``)."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import peftlab
from peftlab.core.errors import AdapterStateError, PeftlabError
from peftlab.core.routing import tile
from tests.conftest import perturb, tiny_llama
from tests.test_architectures import SPECS, build, options

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

ROUTED = {"lora", "dylora", "qlora", "adalora", "vera", "houlsby", "pfeiffer", "compacter"}
"""The methods whose adapters serve mixed batches; every other registered method must refuse by name."""

NAMES = ["a", "b", None, "b", "a", "__base__", "b"]


def _attach_two(model: nn.Module, method: str, arch: str = "llama", **extra) -> list[str]:
    """Adapters 'a' and 'b' of ``method`` (one where the method does not share a model)."""
    names = ["a", "b"] if peftlab.method_class(method).multi_adapter else ["a"]
    for i, n in enumerate(names):
        opts = {**options(arch, method, model), **extra}
        if method in ("lora", "qlora") and i:
            opts["r"] = 4  # different ranks: padded to one shape in the stacked weights
        peftlab.attach(model, method, name=n, **opts)
        perturb(peftlab.adapter_parameters(model, n), seed=10 + i, scale=0.05)
    return names


def _inputs(b: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i:i + 1] for k, v in b.items()}


def _per_row_reference(model: nn.Module, b: dict[str, torch.Tensor], names: list) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for i, n in enumerate(names):
            if n in (None, "__base__"):
                with peftlab.disabled(model):
                    rows.append(model(**_inputs(b, i)).logits.float())
            else:
                peftlab.use(model, n)
                rows.append(model(**_inputs(b, i)).logits.float())
    return torch.cat(rows)


def _routed(model: nn.Module, b: dict[str, torch.Tensor], names: list) -> torch.Tensor:
    with torch.inference_mode(), peftlab.per_row(model, names):
        return model(**b).logits.float()


def _batch(arch: str, rows: int, seed: int = 1) -> dict[str, torch.Tensor]:
    kind = SPECS[arch][3]
    g = torch.Generator().manual_seed(seed)
    if kind == "vision":
        return {"pixel_values": torch.randn(rows, 3, 16, 16, generator=g)}
    x = torch.randint(3, 120, (rows, 6), generator=g)
    out = {"input_ids": x}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, 120, (rows, 3), generator=g)
    return out


def _close(out: torch.Tensor, ref: torch.Tensor, tol: float = 1e-6) -> None:
    """fp32: within ``tol`` of the output's scale (the base model alone differs by 1.07e-6 between a
    batch and its rows on T5, whose logits reach 4.6: a batched kernel sums in another order)."""
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * max(1.0, ref.abs().max().item()))


@pytest.mark.parametrize("method", sorted(peftlab.methods()))
def test_every_method_serves_mixed_batches_or_refuses_by_name(method: str) -> None:
    model = build("opt")  # linear layers with biases: every method applies
    names = _attach_two(model, method, "opt")
    rows = [n if n is None or n in names or n == "__base__" else names[0] for n in NAMES]
    b = _batch("opt", len(rows))
    model.eval()
    if method not in ROUTED:
        before = peftlab.active(model)
        with pytest.raises(PeftlabError, match=re.escape(method) + r"|no per-row form|input sequence|in place"):
            _routed(model, b, rows)
        assert peftlab.active(model) == before
        return
    _close(_routed(model, b, rows), _per_row_reference(model, b, rows))


@pytest.mark.parametrize("arch", sorted(SPECS))
@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_architecture_matrix(arch: str, method: str) -> None:
    model = build(arch)
    if method == "lora" and arch == "vit":
        pass
    _attach_two(model, method, arch)
    model.eval()
    b = _batch(arch, len(NAMES))
    _close(_routed(model, b, NAMES), _per_row_reference(model, b, NAMES))


def test_dora_and_rslora_rows() -> None:
    model = tiny_llama()
    peftlab.attach(model, "lora", name="dora", r=6, dora=True)
    peftlab.attach(model, "lora", name="rs", r=8, rslora=True, target_modules=["q_proj", "v_proj"])
    peftlab.attach(model, "lora", name="plain", r=2, target_modules=["o_proj"])
    for i, n in enumerate(("dora", "rs", "plain")):
        perturb(peftlab.adapter_parameters(model, n), seed=i, scale=0.05)
    names = ["dora", "rs", None, "plain", "dora", "plain", "rs", "rs"]
    b = _batch("llama", len(names))
    _close(_routed(model, b, names), _per_row_reference(model, b, names))


def test_bf16_rows_within_bf16_tolerance() -> None:
    model = tiny_llama().to(torch.bfloat16)
    _attach_two(model, "lora")
    b = _batch("llama", len(NAMES))
    out, ref = _routed(model, b, NAMES), _per_row_reference(model, b, NAMES)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_generate_per_step_scores_equal_a_no_cache_forward_of_each_row() -> None:
    model = tiny_llama()
    for i, n in enumerate(("a", "b", "c")):
        peftlab.attach(model, "lora", name=n, r=4 + 2 * i)
        perturb(peftlab.adapter_parameters(model, n), seed=i, scale=0.2)
    names = ["a", None, "c", "b", "a"]
    prompt = _batch("llama", len(names))["input_ids"]
    steps = 5
    with torch.inference_mode(), peftlab.per_row(model, names):
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                             do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    assert gen.sequences.shape == (len(names), prompt.shape[1] + steps)
    with torch.inference_mode():
        for i, n in enumerate(names):
            for t in range(steps):
                prefix = gen.sequences[i:i + 1, :prompt.shape[1] + t]
                if n is None:
                    with peftlab.disabled(model):
                        ref = model(prefix, use_cache=False).logits[0, -1]
                else:
                    peftlab.use(model, n)
                    ref = model(prefix, use_cache=False).logits[0, -1]
                _close(gen.scores[t][i], ref, 1e-5)
                assert gen.sequences[i, prompt.shape[1] + t] == ref.argmax()


def test_generate_with_beams_maps_repeated_rows_to_their_request() -> None:
    model = tiny_llama()
    for i, n in enumerate(("a", "b")):
        peftlab.attach(model, "lora", name=n, r=4)
        perturb(peftlab.adapter_parameters(model, n), seed=i, scale=0.3)
    names = ["a", "b", None]
    prompt = _batch("llama", 3)["input_ids"]
    kw = dict(max_new_tokens=4, num_beams=3, num_return_sequences=2, do_sample=False, pad_token_id=0)
    with torch.inference_mode(), peftlab.per_row(model, names):
        together = model.generate(prompt, attention_mask=torch.ones_like(prompt), **kw)
    with torch.inference_mode():
        for i, n in enumerate(names):
            row = prompt[i:i + 1]
            if n is None:
                with peftlab.disabled(model):
                    alone = model.generate(row, attention_mask=torch.ones_like(row), **kw)
            else:
                peftlab.use(model, n)
                alone = model.generate(row, attention_mask=torch.ones_like(row), **kw)
            assert torch.equal(together[2 * i:2 * i + 2], alone)


class _CountProducts(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.mm, torch.ops.aten.addmm,
                                   torch.ops.aten.baddbmm):
            self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "houlsby"])
def test_matrix_products_per_layer_do_not_grow_with_the_adapters(method: str) -> None:
    """Grouped products, not a loop over adapters: 2 or 8 adapters in a batch of 8 rows cost the
    same number of matrix-product kernels."""
    counts = []
    for n in (2, 8):
        model = tiny_llama()
        for i in range(n):
            peftlab.attach(model, method, name=f"t{i}")
        names = [f"t{i % n}" for i in range(8)]
        b = _batch("llama", 8)
        with torch.inference_mode(), peftlab.per_row(model, names):
            model(**b)  # stacks the weights
            with _CountProducts() as c:
                model(**b)
        counts.append(c.count)
    assert counts[0] == counts[1]


@given(st.lists(st.integers(0, 5), min_size=1, max_size=64))
@settings(max_examples=200, deadline=None)
def test_tiles_cover_every_row_once_within_twice_the_rows(assignment: list[int]) -> None:
    rows_of: dict[str, list[int]] = {}
    for row, a in enumerate(assignment):
        rows_of.setdefault(f"x{a}", []).append(row)
    order = sorted(rows_of)
    owners, chunks, t = tile(rows_of, order)
    assert sorted(r for c in chunks for r in c) == list(range(len(assignment)))
    assert all(1 <= len(c) <= t for c in chunks)
    assert all(set(c) <= set(rows_of[o]) for o, c in zip(owners, chunks))
    assert len(chunks) <= 2 * len(order)
    assert len(chunks) * t <= 2 * len(assignment)


def _fingerprint(model: nn.Module) -> tuple:
    return (peftlab.active(model), {k: v.clone() for k, v in model.state_dict().items()},
            [(type(m), dict(getattr(m, "__dict__", {})).get("peftlab_disabled")) for m in model.modules()])


def _same(a: tuple, b: tuple) -> None:
    assert a[0] == b[0] and a[2] == b[2]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def test_refusals_name_the_fix_and_change_nothing() -> None:
    model = build("opt")
    _attach_two(model, "lora", "opt")
    b = _batch("opt", 3)
    model.eval()
    before = _fingerprint(model)
    cases = [
        (["a", "zz", None], r"no adapter named \['zz'\]"),
        ("a", r"one adapter name .* per batch row"),
        ([], r"one adapter name"),
    ]
    for names, match in cases:
        with pytest.raises(PeftlabError, match=match):
            _routed(model, b, names)
        _same(_fingerprint(model), before)
    with pytest.raises(AdapterStateError, match=r"not a multiple of 2"):
        _routed(model, b, ["a", "b"])
    _same(_fingerprint(model), before)
    with pytest.raises(AdapterStateError, match=r"torch.inference_mode"):
        with peftlab.per_row(model, ["a", "b", None]):
            model(**b)
    _same(_fingerprint(model), before)
    model.train()
    with pytest.raises(AdapterStateError, match=r"model.eval\(\)"):
        _routed(model, b, ["a", "b", None])
    model.eval()
    peftlab.merge(model)
    with pytest.raises(AdapterStateError, match=r"merged .* peftlab.unmerge"):
        _routed(model, b, ["a", "b", None])
    peftlab.unmerge(model)
    with torch.inference_mode(), peftlab.per_row(model, ["a", "b", None]):
        with pytest.raises(AdapterStateError, match="already open"):
            with peftlab.per_row(model, ["a", "b", None]):
                pass
    peftlab.attach(model, "lora", name="biased", bias="lora_only", activate=False)
    with pytest.raises(AdapterStateError, match=r"'biased' .* trains base tensors in place.*export"):
        _routed(model, b, ["a", "biased", None])


def test_input_side_and_fusion_adapters_are_refused_with_the_reason() -> None:
    model = tiny_llama()
    peftlab.attach(model, "prompt_tuning", name="p", num_virtual_tokens=2)
    with pytest.raises(AdapterStateError, match=r"'p' \(prompt_tuning\) changes the input sequence"):
        _routed(model, _batch("llama", 2), ["p", None])
    model = tiny_llama()
    peftlab.attach(model, "fusion", name="f", adapters={"x": {"method": "houlsby"}, "y": {"method": "houlsby"}})
    with pytest.raises(AdapterStateError, match=r"'f' cannot serve .*FusionUnit has no per-row form"):
        _routed(model, _batch("llama", 2), ["f", None])


def test_the_block_leaves_the_model_as_it_was() -> None:
    model = tiny_llama()
    _attach_two(model, "lora")
    peftlab.use(model, "b")
    b = _batch("llama", 4)
    model.eval()
    with torch.inference_mode():
        plain = model(**b).logits
    before = _fingerprint(model)
    _routed(model, b, ["a", None, "a", None])
    _same(_fingerprint(model), before)
    with torch.inference_mode():
        assert torch.equal(model(**b).logits, plain)
    assert model.peftlab.routing is None


def test_stacked_weights_are_reused_and_follow_every_change() -> None:
    from peftlab.core import routing

    model = tiny_llama()
    _attach_two(model, "lora")
    model.eval()
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    b = _batch("llama", len(NAMES))
    _routed(model, b, NAMES)
    first = routing._STACKS[layer][1]
    _routed(model, b, list(reversed(NAMES)))
    assert routing._STACKS[layer][1] is first  # another batch, same adapters: not rebuilt
    with torch.no_grad():
        peftlab.adapter_parameters(model, "b")["model.layers.0.self_attn.q_proj.lora_B.b.weight"].mul_(3)
    _close(_routed(model, b, NAMES), _per_row_reference(model, b, NAMES))  # an in-place change is seen
    assert routing._STACKS[layer][1] is not first
    peftlab.attach(model, "lora", name="c", r=2)
    perturb(peftlab.adapter_parameters(model, "c"), seed=7, scale=0.05)
    names = ["c", *NAMES]
    b = _batch("llama", len(names))
    _close(_routed(model, b, names), _per_row_reference(model, b, names))
    peftlab.detach(model)
    assert layer not in routing._STACKS  # the stacks go with the adapters
