"""Interoperability with peft (a test-only dependency): files go both ways and compute the same.

* peftlab -> peft: attach + perturb with peftlab, ``peftlab.save``, ``PeftModel.from_pretrained``.
* peft -> peftlab: ``get_peft_model`` with non-identity LoRA weights, ``save_pretrained``,
  ``peftlab.load``.
* merging a loaded peft adapter with peftlab equals peft's own ``merge_and_unload``.

Every comparison is fp32 logits with atol = rtol = 1e-5, on fresh bases built from the same seed.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import AdapterFileError
from peftlab.core.layer import AdapterLayer
from tests.conftest import batch, out, perturb, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.filterwarnings("ignore::RuntimeWarning"),
    pytest.mark.usefixtures("one_thread"),
]

TOL = {"atol": 1e-5, "rtol": 1e-5}
INPUTS = batch()
MODELS: dict[str, Callable[..., nn.Module]] = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}



def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, **TOL)


def _differs(a: torch.Tensor, b: torch.Tensor) -> bool:
    return not torch.allclose(a, b, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- peftlab -> peft
# (model, peftlab options, expected target_modules in adapter_config.json or None: don't check)
TO_PEFT = {
    "llama-qv": ("llama", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}, ["q_proj", "v_proj"]),
    "bert-qv": ("bert", {"r": 4, "alpha": 8, "target_modules": ["query", "value"]}, ["query", "value"]),
    "llama-rslora": ("llama", {"r": 4, "alpha": 8, "rslora": True,
                               "target_modules": ["q_proj", "v_proj", "down_proj"]}, None),
    "bert-rslora": ("bert", {"r": 4, "alpha": 16, "rslora": True, "target_modules": ["query", "value"]}, None),
    "llama-patterns": ("llama", {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"],
                                 "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                 "alpha_pattern": {"o_proj": 3.0}}, None),
    "bert-patterns": ("bert", {"r": 4, "alpha": 8, "target_modules": ["query", "value", "dense"],
                               "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 2.0, "output.dense": 5.0}},
                      None),
    "bert-bias-lora-only": ("bert", {"r": 4, "target_modules": ["query", "value"], "bias": "lora_only"}, None),
    "bert-bias-all": ("bert", {"r": 4, "target_modules": ["query", "value"], "bias": "all"}, None),
    "bert-modules-to-save": ("bert", {"r": 4, "target_modules": ["query", "value"],
                                      "modules_to_save": ["classifier"]}, None),
    "bert-embedding": ("bert", {"r": 4, "alpha": 8, "target_modules": ["word_embeddings", "query"]}, None),
    "llama-embedding": ("llama", {"r": 4, "alpha": 8, "target_modules": ["embed_tokens", "v_proj"]}, None),
    "llama-glob": ("llama", {"r": 4, "target_modules": ["*.self_attn.q_proj"]},
                   ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]),
    "llama-regex": ("llama", {"r": 4, "target_modules": [r"re:.*\.(q|v)_proj"]},
                    ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    "llama-type-exclude": ("llama", {"r": 4, "target_modules": ["type:Linear"],
                                     "exclude_modules": ["lm_head", "*.mlp.*", "k_proj"]},
                           ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
                            "model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.q_proj",
                            "model.layers.1.self_attn.v_proj", "model.layers.1.self_attn.o_proj"]),
    "llama-layers": ("llama", {"r": 4, "target_modules": ["q_proj", "v_proj"], "layers": [1]},
                     ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]),
    "bert-glob-layers": ("bert", {"r": 4, "target_modules": ["*.attention.self.*"], "layers": ["0"],
                                  "exclude_modules": ["key"]},
                         ["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"]),
    "gpt2-conv1d": ("gpt2", {"r": 4, "alpha": 8, "target_modules": ["c_attn"]}, ["c_attn"]),
    "gpt2-conv1d-rslora-bias": ("gpt2", {"r": 4, "target_modules": ["c_attn", "c_fc"], "rslora": True,
                                         "bias": "lora_only"}, None),
}


@pytest.mark.parametrize("case", list(TO_PEFT))
def test_peftlab_file_loads_in_peft(case, tmp_path):
    kind, options, targets = TO_PEFT[case]
    make = MODELS[kind]
    base_logits = out(make(), INPUTS)
    model = make()
    peftlab.attach(model, "lora", **options)
    perturb(peftlab.adapter_parameters(model, "default"))
    want = out(model, INPUTS)
    assert _differs(want, base_logits), "the perturbed adapter must change the output"
    peftlab.save(model, tmp_path)

    config = json.loads((tmp_path / "adapter_config.json").read_text())
    if targets is not None:
        assert sorted(config["target_modules"]) == sorted(targets)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = PeftModel.from_pretrained(make(), tmp_path)
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not key_warnings, key_warnings  # peft warns about missing/unexpected adapter keys
    loaded.eval()
    _close(out(loaded, INPUTS), want)
    # peft found every tensor peftlab wrote (none silently dropped)
    peft_keys = set(peft.get_peft_model_state_dict(loaded))
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "adapter_model.safetensors")) <= peft_keys


# ----------------------------------------------------------------------------- peft -> peftlab
def _lora_config(**kw) -> LoraConfig:
    kw.setdefault("init_lora_weights", False)  # B random: the adapter changes the output
    return LoraConfig(**kw)


# (model, LoraConfig kwargs, perturb peft's trainable tensors too)
FROM_PEFT = {
    "llama-qv": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}, False),
    "bert-qv": ("bert", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}, False),
    "llama-rslora": ("llama", {"r": 4, "lora_alpha": 8, "use_rslora": True,
                               "target_modules": ["q_proj", "v_proj", "gate_proj"]}, False),
    "bert-rslora": ("bert", {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": ["query", "value"]},
                    False),
    "llama-patterns": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "o_proj"],
                                 "rank_pattern": {"v_proj": 2, r"layers\.1\.self_attn\.q_proj": 6},
                                 "alpha_pattern": {"o_proj": 3}}, False),
    "bert-patterns": ("bert", {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value", "dense"],
                               "rank_pattern": {"value": 2}, "alpha_pattern": {"query": 2, "output.dense": 5}},
                      False),
    "bert-bias-lora-only": ("bert", {"r": 4, "target_modules": ["query", "value"], "bias": "lora_only"}, True),
    "bert-bias-all": ("bert", {"r": 4, "target_modules": ["query", "value"], "bias": "all"}, True),
    "bert-modules-to-save": ("bert", {"r": 4, "target_modules": ["query", "value"],
                                      "modules_to_save": ["classifier"]}, True),
    "bert-embedding": ("bert", {"r": 4, "lora_alpha": 8, "target_modules": ["word_embeddings", "query"]}, False),
    "llama-embedding": ("llama", {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "v_proj"]}, False),
    "llama-regex-string": ("llama", {"r": 4, "target_modules": r".*\.layers\.1\.self_attn\.(q|v)_proj"}, False),
    "bert-regex-string": ("bert", {"r": 4, "lora_alpha": 16,
                                   "target_modules": r".*layer\.0\.attention\.self\.(query|value)"}, False),
    "llama-layers-to-transform": ("llama", {"r": 4, "target_modules": ["q_proj", "v_proj"],
                                            "layers_to_transform": [1]}, False),
    "gpt2-conv1d": ("gpt2", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True}, False),
}


def _peft_adapter(kind: str, kw: dict, also_perturb: bool, tmp_path, **save_kw) -> tuple[torch.Tensor, nn.Module]:
    make = MODELS[kind]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = get_peft_model(make(), _lora_config(**kw))
    if also_perturb:  # biases and modules_to_save copies are not random after init_lora_weights=False
        perturb({n: p for n, p in pm.named_parameters() if p.requires_grad})
    pm.eval()
    want = out(pm, INPUTS)
    assert _differs(want, out(make(), INPUTS)), "the peft adapter must change the output"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.save_pretrained(tmp_path, **save_kw)
    return want, pm


@pytest.mark.parametrize("case", list(FROM_PEFT))
def test_peft_file_loads_in_peftlab(case, tmp_path):
    """peft's default save_pretrained. NB: for a target in peft's EMBEDDING_LAYER_NAMES
    ('embed_tokens', 'lm_head') peft also writes the base embedding as
    ``<path>.base_layer.weight`` (save_embedding_layers='auto'), which peftlab must accept."""
    kind, kw, also_perturb = FROM_PEFT[case]
    want, _ = _peft_adapter(kind, kw, also_perturb, tmp_path)
    model = MODELS[kind]()
    peftlab.load(model, tmp_path)
    assert set(peftlab.adapters(model)) == {"default"}
    _close(out(model, INPUTS), want)


def test_peft_embedding_adapter_without_base_embedding_loads(tmp_path):
    """The same Llama embed_tokens adapter saved with save_embedding_layers=False (LoRA tensors only)."""
    kind, kw, also_perturb = FROM_PEFT["llama-embedding"]
    want, _ = _peft_adapter(kind, kw, also_perturb, tmp_path, save_embedding_layers=False)
    model = MODELS[kind]()
    peftlab.load(model, tmp_path)
    _close(out(model, INPUTS), want)


MERGE_CASES = ["llama-qv", "llama-patterns", "bert-bias-all", "bert-modules-to-save", "bert-embedding",
               "llama-embedding", "llama-rslora", "gpt2-conv1d"]


@pytest.mark.parametrize("case", MERGE_CASES)
def test_merge_of_loaded_peft_adapter_matches_peft_merge(case, tmp_path):
    kind, kw, also_perturb = FROM_PEFT[case]
    # LoRA tensors only (see test_peft_file_loads_in_peftlab for peft's extra embedding weight)
    want, pm = _peft_adapter(kind, kw, also_perturb, tmp_path, save_embedding_layers=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = pm.merge_and_unload()
    peft_logits = out(peft_merged, INPUTS)
    model = MODELS[kind]()
    peftlab.load(model, tmp_path)
    if "embed_tokens" in kw["target_modules"]:
        # tiny_llama ties lm_head to embed_tokens: peft's merge changes the output head too (its
        # merged logits differ from the unmerged ones); peftlab refuses and changes nothing
        assert not torch.allclose(peft_logits, want, atol=1e-3)
        before = out(model, INPUTS)
        with pytest.raises(peftlab.core.errors.AdapterStateError, match="tied input and output embeddings"):
            peftlab.merge_and_unload(model)
        _close(out(model, INPUTS), before)
        return
    _close(peft_logits, want)
    merged = peftlab.merge_and_unload(model)
    assert peftlab.adapters(merged) == {}
    assert not any(isinstance(m, AdapterLayer) for m in merged.modules())
    assert set(merged.state_dict()) == set(MODELS[kind]().state_dict())
    _close(out(merged, INPUTS), peft_logits)


def test_named_adapter_round_trips_both_ways(tmp_path):
    """A non-default name: peft writes dir/<name>, peftlab reads it there, and back."""
    _, pm = _peft_adapter("llama", {"r": 4, "target_modules": ["q_proj"]}, False, tmp_path / "a")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm.add_adapter("task", _lora_config(r=2, target_modules=["v_proj"]))
        pm.set_adapter("task")
        want_task = out(pm, INPUTS)
        pm.save_pretrained(tmp_path / "a")
    assert (tmp_path / "a" / "task" / "adapter_model.safetensors").is_file()
    model = tiny_llama()
    peftlab.load(model, tmp_path / "a" / "task", name="task")
    _close(out(model, INPUTS), want_task)

    peftlab.save(model, tmp_path / "b")
    assert (tmp_path / "b" / "task" / "adapter_config.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        back = PeftModel.from_pretrained(tiny_llama(), tmp_path / "b" / "task", adapter_name="task")
    _close(out(back.eval(), INPUTS), want_task)


# ----------------------------------------------------------------------------- options peftlab lacks
def _peft_lora_fields() -> dict[str, object]:
    """Every field peft's LoraConfig writes to adapter_config.json, with its default (from peft itself)."""
    import peft

    return peft.LoraConfig().to_dict()


def test_every_peft_lora_field_is_read_described_or_refused():
    """A new peft field cannot slip through unread: each is implemented, metadata, or refused."""
    from peftlab.methods.lora import PEFT_HANDLED, PEFT_METADATA

    fields = _peft_lora_fields()
    rest = sorted(set(fields) - PEFT_HANDLED - PEFT_METADATA)
    # what is left must be refused whenever it is set: spot-check that the default is 'unset'
    for name in rest:
        assert fields[name] in (None, False, {}, [], ""), (name, fields[name])


@pytest.mark.parametrize(("field", "value"), [
    ("alora_invocation_tokens", [5, 6]), ("lora_bias", True), ("ensure_weight_tying", True),
    ("layer_replication", [[0, 1]]), ("trainable_token_indices", [1, 2]), ("init_lora_weights", "corda"),
    ("init_lora_weights", "pissa_niter_4"), ("init_lora_weights", "loftq"), ("use_qalora", True)])
def test_an_option_peftlab_lacks_is_refused_by_name(field, value, tmp_path):
    import json

    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFileError, match=field):
        peftlab.load(model, tmp_path)
    assert peftlab.adapters(model) == {} and all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_an_unconverted_pissa_adapter_from_a_randomized_svd_is_refused_with_the_way_out(tmp_path):
    from peft import LoraConfig, get_peft_model

    get_peft_model(tiny_llama(), LoraConfig(target_modules=["q_proj"], init_lora_weights="pissa_niter_2")
                   ).save_pretrained(tmp_path)
    with pytest.raises(AdapterFileError, match="path_initial_model_for_weight_conversion"):
        peftlab.load(tiny_llama(), tmp_path)