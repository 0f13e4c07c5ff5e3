"""``peftlab export --for vllm|peft``: exported folders loaded by peft (the oracle) give the
peftlab model's outputs; refusals name the reason and leave nothing; the source is never changed."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError
from peftlab.export import OVERRIDES_NAME, ExportRefused, export
from tests.conftest import batch, out, perturb, tiny_gpt2, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")
peft = pytest.importorskip("peft")
from peft import PeftModel  # noqa: E402

INPUTS = batch(seed=5, size=2, length=7)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def llama_with_biases(seed: int = 0, tied: bool = True) -> nn.Module:
    """Tiny Llama whose linear layers have biases (bias='all'/'lora_only' need some)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      tie_word_embeddings=tied, pad_token_id=0, attention_bias=True, mlp_bias=True)
    return LlamaForCausalLM(cfg).eval()


def untied_llama(seed: int = 0) -> nn.Module:
    return llama_with_biases(seed, tied=False)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def trained(make, method: str, folder: Path, **options) -> torch.Tensor:
    """Attach ``method`` to a fresh base, give it random (trained-like) values, save it to
    ``folder``; returns the adapted model's logits."""
    model = make()
    peftlab.attach(model, method, **options)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.2)
    want = out(model, INPUTS)
    assert not torch.allclose(want, out(make(), INPUTS), atol=1e-3), "the adapter must change the output"
    peftlab.save(model, folder)
    return want


def peft_logits(make, folder: Path) -> torch.Tensor:
    """Logits of peft's PeftModel loaded from ``folder`` onto a fresh base, with the folder's
    base overrides written into that base first."""
    base = make()
    if (folder / OVERRIDES_NAME).exists():
        overrides = load_file(folder / OVERRIDES_NAME)
        result = base.load_state_dict(overrides, strict=False)
        assert not result.unexpected_keys, result.unexpected_keys
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(base, folder).eval()
    key_warnings = [str(w.message) for w in caught if "keys" in str(w.message).lower()]
    assert not key_warnings, key_warnings
    return out(model, INPUTS)


# A naive reading of vLLM's rules (vllm/config/lora.py MaxLoRARanks; vllm/lora/peft_helper.py
# _validate_features and validate_legal; vllm/lora/lora_model.py / utils.py key parsing), written
# here independently of peftlab.export.
VLLM_RANKS = {1, 8, 16, 32, 64, 128, 256, 320, 512}


def vllm_problems(folder: Path) -> list[str]:
    config = json.loads((folder / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append("not a LoRA")
    if config["r"] not in VLLM_RANKS:
        problems.append(f"r={config['r']} is no max_lora_rank")
    if config.get("modules_to_save"):
        problems.append("modules_to_save")
    if config.get("use_dora") or config.get("lora_bias"):
        problems.append("DoRA / lora_bias")
    if config.get("bias", "none") != "none":
        problems.append("bias")
    if config.get("rank_pattern") or config.get("alpha_pattern"):
        problems.append("patterns (ignored by older vLLM)")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower() not in ("gaussian",):
        problems.append(f"init_lora_weights={init}")
    for key, t in load_file(folder / "adapter_model.safetensors").items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight", ".lora_embedding_A", ".lora_embedding_B")):
            problems.append(f"{key} is no LoRA weight")
        elif t.dim() != 2 or (t.shape[0] if "lora_A" in key or "embedding_A" in key else t.shape[1]) > config["r"]:
            problems.append(f"{key} {tuple(t.shape)} does not fit rank {config['r']}")
    return problems


LORA_CASES = {
    "plain": (tiny_llama, {"r": 8, "target_modules": TARGETS}, 8),
    "rank12-padded": (tiny_llama, {"r": 12, "alpha": 24, "target_modules": TARGETS}, 16),
    "patterns": (tiny_llama, {"r": 4, "alpha": 8, "target_modules": TARGETS, "rank_pattern": {"v_proj": 12},
                              "alpha_pattern": {"down_proj": 3.0}}, 16),
    "rslora-rank12": (tiny_llama, {"r": 12, "alpha": 5, "rslora": True, "target_modules": TARGETS}, 16),
    "rslora-patterns": (tiny_llama, {"r": 8, "alpha": 4, "rslora": True, "target_modules": TARGETS,
                                     "rank_pattern": {"q_proj": 2}}, 8),
    "bias-all": (llama_with_biases, {"r": 4, "target_modules": TARGETS, "bias": "all"}, 8),
    "bias-lora-only": (llama_with_biases, {"r": 4, "target_modules": TARGETS, "bias": "lora_only"}, 8),
    "embedding-rank12": (tiny_llama, {"r": 12, "target_modules": ["embed_tokens", "q_proj"]}, 16),
    "gpt2-conv1d-bias": (tiny_gpt2, {"r": 4, "target_modules": ["c_attn", "c_fc"], "bias": "lora_only"}, 8),
    "pissa-saved-as-rank-2r": (tiny_llama, {"r": 4, "init": "pissa", "target_modules": TARGETS}, 8),
    "modules-to-save": (untied_llama, {"r": 8, "target_modules": TARGETS, "modules_to_save": ["lm_head"]}, 8),
}


@pytest.mark.parametrize("case", list(LORA_CASES))
def test_lora_exports_load_in_peft_with_the_trained_outputs(case, tmp_path):
    make, options, rank = LORA_CASES[case]
    src = tmp_path / "adapter"
    want = trained(make, "lora", src, **options)
    before = files_of(src)

    report = export(src, tmp_path / "vllm", "vllm")
    assert files_of(src) == before
    vllm = tmp_path / "vllm"
    assert vllm_problems(vllm) == []
    config = json.loads((vllm / "adapter_config.json").read_text())
    assert config["r"] == rank
    torch.testing.assert_close(peft_logits(make, vllm), want, atol=1e-5, rtol=0)
    has_overrides = options.get("bias", "none") != "none" or bool(options.get("modules_to_save"))
    assert (vllm / OVERRIDES_NAME).exists() == has_overrides
    assert any(OVERRIDES_NAME in line for line in report.instructions) == has_overrides
    assert json.loads((vllm / "export_report.json").read_text())["converted"] == report.converted

    report = export(src, tmp_path / "peft", "peft")
    assert files_of(src) == before
    torch.testing.assert_close(peft_logits(make, tmp_path / "peft"), want, atol=1e-5, rtol=0)
    assert not (tmp_path / "peft" / OVERRIDES_NAME).exists()


def test_qlora_exports_its_lora_with_the_quantized_base_instruction(tmp_path):
    model = tiny_llama()
    peftlab.attach(model, "qlora", r=4, target_modules=["q_proj"], blocksize=32)
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path / "a")
    saved = load_file(tmp_path / "a" / "adapter_model.safetensors")
    for target in ("vllm", "peft"):
        report = export(tmp_path / "a", tmp_path / target, target)
        config = json.loads((tmp_path / target / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and not any(k.startswith("peftlab") for k in config)
        assert any("quantized base" in line for line in report.instructions)
        got = load_file(tmp_path / target / "adapter_model.safetensors")
        assert all(torch.equal(got[k][: t.shape[0], : t.shape[1]], t) for k, t in saved.items())


def test_padding_adds_zero_factors_and_keeps_the_scale(tmp_path):
    trained(tiny_llama, "lora", tmp_path / "a", r=12, alpha=24, target_modules=["q_proj"])
    report = export(tmp_path / "a", tmp_path / "v", "vllm")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (16, 32)  # 24 / 12 == 32 / 16
    src = load_file(tmp_path / "a" / "adapter_model.safetensors")
    got = load_file(tmp_path / "v" / "adapter_model.safetensors")
    for key, t in src.items():
        padded = got[key]
        if key.endswith("lora_A.weight"):
            assert torch.equal(padded[:12], t) and not padded[12:].any()
        else:
            assert torch.equal(padded[:, :12], t) and not padded[:, 12:].any()
    assert any("padded with zeros to 16" in line for line in report.converted)


def test_rslora_padding_rescales_alpha_by_the_square_root(tmp_path):
    trained(tiny_llama, "lora", tmp_path / "a", r=4, alpha=2, rslora=True, target_modules=["q_proj"])
    export(tmp_path / "a", tmp_path / "v", "vllm")
    config = json.loads((tmp_path / "v" / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and config["r"] == 8
    assert math.isclose(config["lora_alpha"] / math.sqrt(8), 2 / math.sqrt(4), rel_tol=1e-12)


def test_adalora_is_converted_to_lora_for_vllm(tmp_path):
    options = {"init_r": 4, "target_r": 2, "alpha": 6, "target_modules": TARGETS}
    want = trained(tiny_llama, "adalora", tmp_path / "a", **options)
    report = export(tmp_path / "a", tmp_path / "v", "vllm")
    assert vllm_problems(tmp_path / "v") == []
    assert any("AdaLoRA -> LoRA" in line for line in report.converted)
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "v"), want, atol=1e-5, rtol=0)
    export(tmp_path / "a", tmp_path / "p", "peft")  # peft has AdaLoRA itself
    assert json.loads((tmp_path / "p" / "adapter_config.json").read_text())["peft_type"] == "ADALORA"
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "p"), want, atol=1e-5, rtol=0)


def test_dylora_is_converted_to_lora_at_its_rank_for_vllm(tmp_path):
    want = trained(tiny_llama, "dylora", tmp_path / "a", r_max=6, rank=3, target_modules=TARGETS)
    export(tmp_path / "a", tmp_path / "v", "vllm")
    assert vllm_problems(tmp_path / "v") == []
    assert json.loads((tmp_path / "v" / "adapter_config.json").read_text())["r"] == 8
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "v"), want, atol=1e-5, rtol=0)
    report = export(tmp_path / "a", tmp_path / "p", "peft")  # peft has no DyLoRA: the same plain LoRA, unpadded
    config = json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"]) == ("LORA", 3)
    assert any("DyLoRA -> LoRA" in line for line in report.converted)
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "p"), want, atol=1e-5, rtol=0)


REFUSALS = {
    "dora-vllm": ("lora", {"r": 4, "target_modules": TARGETS, "dora": True}, "vllm", "does not support DoRA"),
    "ia3-vllm": ("ia3", {}, "vllm", "IA3 scales activations"),
    "lokr-vllm": ("lokr", {"r": 2, "target_modules": ["q_proj"]}, "vllm", "Kronecker"),
    "houlsby-peft": ("houlsby", {"reduction_factor": 4}, "peft", "peft has no bottleneck adapters"),
    "flora-peft": ("flora", {"r": 2, "target_modules": ["q_proj"]}, "peft", "peft has no FLoRA"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_name_the_reason_and_write_nothing(case, tmp_path):
    method, options, target, reason = REFUSALS[case]
    model = tiny_llama()
    peftlab.attach(model, method, **options)
    perturb(peftlab.adapter_parameters(model, "default"))
    peftlab.save(model, tmp_path / "a")
    before = files_of(tmp_path / "a")
    with pytest.raises(ExportRefused, match=reason) as e:
        export(tmp_path / "a", tmp_path / "out", target)
    assert e.value.report.refused and not e.value.report.ok
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temporary left either
    assert files_of(tmp_path / "a") == before


def test_conv_lora_is_refused_for_vllm(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 1))
    peftlab.attach(model, "lora", r=2, target_modules=["0"])
    peftlab.save(model, tmp_path / "a")
    with pytest.raises(ExportRefused, match="convolution LoRA"):
        export(tmp_path / "a", tmp_path / "out", "vllm")
    export(tmp_path / "a", tmp_path / "p", "peft")  # peft has conv LoRA


def test_output_folder_must_be_new_and_outside_the_source(tmp_path):
    trained(tiny_llama, "lora", tmp_path / "a", r=4, target_modules=["q_proj"])
    before = files_of(tmp_path / "a")
    with pytest.raises(ConfigError, match="is the source folder"):
        export(tmp_path / "a", tmp_path / "a", "vllm")
    with pytest.raises(ConfigError, match="inside the source folder"):
        export(tmp_path / "a", tmp_path / "a" / "v", "vllm")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        export(tmp_path / "a", tmp_path / "full", "vllm")
    assert (tmp_path / "full" / "x").read_text() == "keep"
    with pytest.raises(ConfigError, match="target must be one of"):
        export(tmp_path / "a", tmp_path / "v", "sglang")  # type: ignore[arg-type]
    assert files_of(tmp_path / "a") == before


def test_a_failed_write_leaves_no_output_folder(tmp_path, monkeypatch):
    import peftlab.export as export_module
    from peftlab.core.errors import PeftlabError

    trained(llama_with_biases, "lora", tmp_path / "a", r=4, target_modules=["q_proj"], bias="all")
    before = files_of(tmp_path / "a")
    calls = []

    def failing(path, data):  # the report is the last file written: fail there, after the tensors
        calls.append(path)
        if Path(path).name == "export_report.json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    real = export_module.files.write_bytes
    monkeypatch.setattr(export_module.files, "write_bytes", failing)
    with pytest.raises(PeftlabError, match="No space left"):
        export(tmp_path / "a", tmp_path / "v", "vllm")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]
    assert files_of(tmp_path / "a") == before


def test_peft_export_drops_fields_peft_does_not_have_and_refuses_values(tmp_path):
    from peftlab.core.errors import AdapterFileError

    trained(tiny_llama, "lora", tmp_path / "a", r=4, target_modules=["q_proj"])
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "not_a_peft_field": None}))
    report = export(tmp_path / "a", tmp_path / "p", "peft")
    assert any("not_a_peft_field" in line for line in report.dropped)
    assert "not_a_peft_field" not in json.loads((tmp_path / "p" / "adapter_config.json").read_text())
    config_path.write_text(json.dumps({**config, "not_a_peft_field": 3}))
    with pytest.raises((ExportRefused, AdapterFileError), match="not_a_peft_field"):
        export(tmp_path / "a", tmp_path / "p2", "peft")
    assert not (tmp_path / "p2").exists()


def test_cli_exports_and_reports_refusals(tmp_path, capsys):
    from peftlab.cli import main

    trained(tiny_llama, "lora", tmp_path / "a", r=12, target_modules=["q_proj"])
    assert main(["export", str(tmp_path / "a"), "--for", "vllm", "--out", str(tmp_path / "v")]) == 0
    printed = capsys.readouterr().out
    assert "padded with zeros to 16" in printed and "--max-lora-rank 16" in printed
    assert main(["export", str(tmp_path / "a"), "--for", "peft"]) == 0  # default: <adapter>-peft beside it
    assert (tmp_path / "a-peft" / "adapter_config.json").exists()

    model = tiny_llama()
    peftlab.attach(model, "ia3")
    peftlab.save(model, tmp_path / "i")
    assert main(["export", str(tmp_path / "i"), "--for", "vllm", "--out", str(tmp_path / "iv")]) == 3
    captured = capsys.readouterr()
    assert "IA3 scales activations" in captured.err and not (tmp_path / "iv").exists()


def test_vllm_own_rules_accept_the_export(tmp_path):
    """vLLM's PEFTHelper as the oracle, where vLLM is installed (it needs its own stack)."""
    helper = pytest.importorskip("vllm.lora.peft_helper")
    from vllm.config import LoRAConfig

    trained(tiny_llama, "lora", tmp_path / "a", r=12, target_modules=TARGETS, bias="none",
            rank_pattern={"v_proj": 4})
    export(tmp_path / "a", tmp_path / "v", "vllm")
    peft_helper = helper.PEFTHelper.from_local_dir(str(tmp_path / "v"), max_position_embeddings=None)
    peft_helper.validate_legal(LoRAConfig(max_lora_rank=16))
