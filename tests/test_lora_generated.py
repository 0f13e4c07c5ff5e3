"""peft interop over generated LoRA configurations: hypothesis draws valid peft ``LoraConfig``s
(targets as a list or a regular expression, rank and alpha patterns, rsLoRA, bias modes,
layers_to_transform with layers_pattern, modules_to_save, the initialisations, dropout) on four
architectures and checks both directions in eval mode (fp32, 1e-5):

* peft trains (its tensors nudged), saves; peftlab loads onto a fresh base: same outputs;
* peftlab attaches the same configuration, trains, saves; peft loads: same outputs.

The fields drawn are peft's own (``LoraConfig().to_dict()``); a field peftlab does not implement,
set in a peft file, is refused naming it. The default run is derandomized (the same examples
every time); ``-m slow`` draws fresh ones.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import peftlab
from peftlab.core.errors import AdapterFileError
from tests.conftest import TINY

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]

# arch -> (builder, linear leaf names, block-list name, modules_to_save candidates)
ARCHS: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    "llama": ("tiny-llama", ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"), "layers",
              ()),
    "gpt2": ("tiny-gpt2", ("c_attn", "c_proj", "c_fc"), "h", ()),
    "bert": ("tiny-bert", ("query", "key", "value", "dense"), "layer", ("classifier",)),
    "t5": ("tiny-t5", ("q", "k", "v", "o", "wi", "wo"), "block", ()),
}
BIASED = {"gpt2", "bert"}


def inputs(arch: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    x = torch.randint(3, 120, (2, 6), generator=g)
    out = {"input_ids": x, "attention_mask": torch.ones_like(x)}
    if arch == "t5":
        out["decoder_input_ids"] = torch.randint(3, 120, (2, 3), generator=g)
    return out


def outputs(model, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs(arch)).logits.float()


def nudge(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))


@st.composite
def lora_configs(draw) -> tuple[str, dict]:
    """``(arch, kwargs of peft.LoraConfig)``, valid for peft."""
    arch = draw(st.sampled_from(sorted(ARCHS)))
    _, names, blocks, heads = ARCHS[arch]
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=len(names), unique=True))
    r = draw(st.integers(1, 8))
    config: dict = {"r": r, "lora_alpha": draw(st.sampled_from([r, 2 * r, 16, 3.5])),
                    "use_rslora": draw(st.booleans()), "lora_dropout": draw(st.sampled_from([0.0, 0.1]))}
    if draw(st.booleans()):
        config["target_modules"] = chosen
        if draw(st.booleans()):
            config["layers_to_transform"] = draw(st.sampled_from([[0], [1], [0, 1], 1]))
            config["layers_pattern"] = draw(st.sampled_from([None, blocks, [blocks]]))
    else:  # a regular expression, full-matched against module paths
        config["target_modules"] = rf".*\.({'|'.join(chosen)})"
    if draw(st.booleans()):
        config["rank_pattern"] = {draw(st.sampled_from(chosen)): draw(st.integers(1, 8))}
    if draw(st.booleans()):
        config["alpha_pattern"] = {draw(st.sampled_from(chosen)): draw(st.sampled_from([1.0, 8.0, 24.0]))}
    if arch in BIASED:
        config["bias"] = draw(st.sampled_from(["none", "all", "lora_only"]))
    if heads:
        config["modules_to_save"] = list(heads)
    inits = [True, False, "gaussian", "pissa"] + ([] if arch == "gpt2" else ["olora"])  # peft's OLoRA breaks Conv1D
    config["init_lora_weights"] = draw(st.sampled_from(inits))
    if config["init_lora_weights"] in ("pissa", "olora") and config["use_rslora"] and (
            config.get("rank_pattern") or config.get("alpha_pattern")):
        config["use_rslora"] = False  # peft cannot convert that combination at save (neither can peftlab)
    if arch == "gpt2":
        config["fan_in_fan_out"] = True
    return arch, config


def _peft_model(arch: str, config: dict):
    from peft import LoraConfig, get_peft_model

    try:
        cfg = LoraConfig(**config)
    except ValueError:
        assume(False)
    base = TINY[ARCHS[arch][0]](0)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return get_peft_model(base, cfg)
    except ValueError:  # e.g. layers that select no module: peft refuses the configuration
        assume(False)


CASES = settings(max_examples=24, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@CASES
@given(case=lora_configs(), seed=st.integers(0, 3))
def test_peft_files_load_into_peftlab(case, seed, tmp_path_factory):
    arch, config = case
    theirs = _peft_model(arch, config)
    nudge(theirs, seed)
    expected = outputs(theirs, arch)
    where = tmp_path_factory.mktemp("peft")
    theirs.save_pretrained(where)
    fresh = TINY[ARCHS[arch][0]](0).eval()
    peftlab.load(fresh, where)
    assert torch.allclose(outputs(fresh, arch), expected, atol=1e-5), config


@CASES
@given(case=lora_configs(), seed=st.integers(0, 3))
def test_peftlab_files_load_into_peft(case, seed, tmp_path_factory):
    from peft import PeftModel

    from peftlab.methods.lora import LoRA

    arch, config = case
    _peft_model(arch, config)  # only configurations peft accepts
    peft_dict = {"peft_type": "LORA", **config}
    if isinstance(config.get("layers_to_transform"), int):
        peft_dict["layers_to_transform"] = [config["layers_to_transform"]]
    method = LoRA.from_config(json.loads(json.dumps(peft_dict)))
    model = TINY[ARCHS[arch][0]](0).eval()
    peftlab.attach(model, method)
    nudge(model, seed)
    expected = outputs(model, arch)
    where = tmp_path_factory.mktemp("peftlab")
    peftlab.save(model, where)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = PeftModel.from_pretrained(TINY[ARCHS[arch][0]](0), where)
    assert torch.allclose(outputs(loaded, arch), expected, atol=1e-5), config


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=lora_configs(), seed=st.integers(0, 100))
def test_many_more_peft_files_load_into_peftlab(case, seed, tmp_path_factory):
    test_peft_files_load_into_peftlab.hypothesis.inner_test(case, seed, tmp_path_factory)


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(case=lora_configs(), seed=st.integers(0, 100))
def test_many_more_peftlab_files_load_into_peft(case, seed, tmp_path_factory):
    test_peftlab_files_load_into_peft.hypothesis.inner_test(case, seed, tmp_path_factory)


def _unimplemented_fields() -> dict[str, object]:
    """Every peft LoraConfig field peftlab neither implements nor treats as metadata, with a
    value that turns it on (the test fails if a new peft field has no entry here)."""
    import peft

    from peftlab.methods.lora import PEFT_HANDLED, PEFT_METADATA

    values = {"alora_invocation_tokens": [5, 6], "lora_bias": True, "ensure_weight_tying": True,
              "layer_replication": [[0, 1]], "trainable_token_indices": [1, 2], "use_qalora": True,
              "loftq_config": {"loftq_bits": 4}, "eva_config": {"rho": 2.0}, "corda_config": {"cache_file": "x"},
              "lora_ga_config": {"direction": "ArB2r"}, "megatron_config": {"x": 1}, "runtime_config": {"x": 1},
              "target_parameters": None, "arrow_config": {"top_k": 2}, "use_bdlora": {"x": 1},
              "velora_config": {"x": 1}, "kasa_config": {"x": 1}}
    fields = peft.LoraConfig().to_dict()
    rest = sorted(set(fields) - PEFT_HANDLED - PEFT_METADATA)
    out = {}
    for name in rest:
        if name in values and values[name] is not None:
            out[name] = values[name]
        elif fields[name] in (None, False, {}, [], ""):
            out[name] = True  # a value that is set; peftlab must refuse it by name whatever it is
    return out


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(sorted(_unimplemented_fields())))
def test_an_unimplemented_peft_field_is_refused_by_name(field, tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    where = tmp_path_factory.mktemp("field")
    get_peft_model(TINY["tiny-llama"](0), LoraConfig(target_modules=["q_proj"])).save_pretrained(where)
    cfg = json.loads((where / "adapter_config.json").read_text())
    cfg[field] = _unimplemented_fields()[field]
    (where / "adapter_config.json").write_text(json.dumps(cfg))
    model = TINY["tiny-llama"](0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=field):
        peftlab.load(model, where)
    assert peftlab.adapters(model) == {}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
