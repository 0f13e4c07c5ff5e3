"""Target selection: names, globs, regexes, types, all-linear, exclude, layer ranges, errors."""

from __future__ import annotations

import pytest

import peftlab
from peftlab.core.targets import layer_index, parse_layers, select
from tests.conftest import tiny_bert, tiny_gpt2, tiny_llama

LINEAR_TYPES = (__import__("torch").nn.Linear,)


def sel(model, targets, **kw):
    return select(model, targets, supported=LINEAR_TYPES, supported_names=("Conv1D",), **kw)


def test_plain_names_match_path_suffix():
    assert sel(tiny_llama(), ["q_proj"]) == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    assert sel(tiny_llama(), "model.layers.1.self_attn.q_proj") == ["model.layers.1.self_attn.q_proj"]


def test_glob_regex_and_type():
    m = tiny_llama()
    assert sel(m, ["*.mlp.*_proj"]) == [f"model.layers.{i}.mlp.{p}_proj" for i in range(2)
                                        for p in ("gate", "up", "down")]
    assert sel(m, [r"re:.*\.(q|v)_proj"]) == [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2)
                                              for p in ("q", "v")]
    assert len(sel(m, ["type:Linear"])) == 2 * 7 + 1  # every Linear, the head included


def test_all_linear_skips_head_and_handles_conv1d():
    assert "lm_head" not in sel(tiny_llama(), "all-linear")
    gpt = sel(tiny_gpt2(), "all-linear")
    assert "lm_head" not in gpt and "transformer.h.0.attn.c_attn" in gpt and len(gpt) == 2 * 4


def test_exclude_and_layers():
    m = tiny_llama()
    assert sel(m, "all-linear", exclude=["*.mlp.*"], layers="1") == [
        f"model.layers.1.self_attn.{p}_proj" for p in ("q", "k", "v", "o")]
    assert sel(m, ["q_proj"], layers=[0]) == ["model.layers.0.self_attn.q_proj"]


def test_parse_layers():
    assert parse_layers("0-2,5") == {0, 1, 2, 5}
    assert parse_layers([1, "3-4"]) == {1, 3, 4}
    assert parse_layers(None) is None
    with pytest.raises(peftlab.TargetError):
        parse_layers("3-1")
    assert layer_index("model.layers.12.mlp") == 12 and layer_index("lm_head") is None


def test_unmatched_target_lists_close_names():
    with pytest.raises(peftlab.TargetError, match="q_prj.*q_proj"):
        sel(tiny_llama(), ["q_prj"])


def test_one_unmatched_entry_among_matching_ones_is_an_error():
    with pytest.raises(peftlab.TargetError, match="'vproj'"):
        sel(tiny_llama(), ["q_proj", "vproj"])


def test_selection_of_only_unsupported_types_is_an_error():
    with pytest.raises(peftlab.TargetError, match="LlamaRMSNorm"):
        sel(tiny_llama(), ["input_layernorm"])


def test_layers_that_remove_everything_is_an_error():
    with pytest.raises(peftlab.TargetError, match="layer indices present"):
        sel(tiny_llama(), ["q_proj"], layers="7")


def test_bert_names():
    assert sel(tiny_bert(), ["query", "value"]) == [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(2)
                                                    for p in ("query", "value")]


def test_failed_attach_changes_nothing():
    m = tiny_llama()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(peftlab.TargetError):
        peftlab.attach(m, "lora", target_modules=["q_proj", "nope"])
    assert peftlab.adapters(m) == {}
    assert set(m.state_dict()) == set(before)
    assert all(type(x).__module__.startswith(("torch", "transformers")) for x in m.modules())


def test_adapter_internals_are_never_targets():
    m = tiny_llama()
    peftlab.attach(m, "lora", "a", target_modules="all-linear")
    peftlab.attach(m, "lora", "b", target_modules="all-linear")
    paths = {p for p, _ in peftlab.adapters(m)["b"].adapted_layers(m, "b")}
    assert not any("lora_" in p for p in paths)
    assert len(paths) == 14
