"""DyLoRA: nested ranks, slice-wise gradients, rank choice after training, files, trainer driving."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import AdapterStateError, ConfigError
from peftlab.methods import dylora
from tests.conftest import batch, out, perturb, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


class Mixed(nn.Module):
    """One module of each kind DyLoRA adapts: embedding -> conv1d -> linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv1d(6, 7, 3, padding=1)
        self.head = nn.Linear(7, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.emb(ids).transpose(1, 2)
        return self.head(torch.relu(self.conv(h)).transpose(1, 2))


def ids() -> torch.Tensor:
    return torch.randint(0, 20, (3, 11), generator=torch.Generator().manual_seed(5))


def dy_llama(**options) -> nn.Module:
    model = tiny_llama()
    peftlab.attach(model, "dylora", **{"r_max": 8, "target_modules": TARGETS, **options})
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.05)
    return model


def lora_from_prefix(dy: nn.Module, model: nn.Module, b: int, alpha: float) -> None:
    """Attach a rank-b LoRA to ``model`` holding the first b slices of ``dy``'s DyLoRA."""
    peftlab.attach(model, "lora", r=b, alpha=alpha, target_modules=TARGETS)
    lora = peftlab.adapter_parameters(model, "default")
    with torch.no_grad():
        for key, p in peftlab.adapter_parameters(dy, "default").items():
            p_b = p[:b] if ".lora_A." in key else p[:, :b]
            lora[key].copy_(p_b)


@pytest.mark.parametrize("b", [1, 3, 8])
def test_rank_b_equals_a_lora_of_rank_b(b):
    x = batch()
    dy = dy_llama(alpha=12)
    dylora.set_rank(dy, b)
    ref = tiny_llama()
    lora_from_prefix(dy, ref, b, alpha=12)
    torch.testing.assert_close(out(dy, x), out(ref, x), rtol=1e-5, atol=1e-6)
    # and merging at that rank gives the same function
    before = {k: v.clone() for k, v in dy.state_dict().items()}
    peftlab.merge(dy)
    torch.testing.assert_close(out(dy, x), out(ref, x), rtol=1e-5, atol=1e-5)
    peftlab.unmerge(dy)
    assert all(torch.equal(v, before[k]) for k, v in dy.state_dict().items())


def test_ranks_are_nested_on_every_layer_kind():
    """On embedding, conv and linear at once: rank b uses exactly the first b slices."""
    model = Mixed()
    peftlab.attach(model, "dylora", r_max=4, alpha=4, target_modules=["emb", "conv", "head"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    x = ids()
    outputs = {}
    for b in (1, 2, 4):
        dylora.set_rank(model, b)
        with torch.no_grad():
            outputs[b] = model(x)
        # zeroing the slices beyond b changes nothing at rank b
        saved = {k: v.clone() for k, v in peftlab.adapter_parameters(model, "default").items()}
        with torch.no_grad():
            for k, p in peftlab.adapter_parameters(model, "default").items():
                (p[b:] if "_A" in k else p[:, b:]).zero_()
            torch.testing.assert_close(model(x), outputs[b], rtol=0, atol=0)
            for k, p in peftlab.adapter_parameters(model, "default").items():
                p.copy_(saved[k])
    assert not torch.allclose(outputs[1], outputs[2]) and not torch.allclose(outputs[2], outputs[4])
    # merge at the chosen rank equals the unmerged model (every kind's delta_weight)
    for b in (1, 2, 4):
        dylora.set_rank(model, b)
        peftlab.merge(model)
        with torch.no_grad():
            torch.testing.assert_close(model(x), outputs[b], rtol=1e-5, atol=1e-5)
        peftlab.unmerge(model)


def slice_grads(model: nn.Module) -> dict[str, set[int]]:
    """For each adapter tensor, the rank slices that received a non-zero gradient."""
    found = {}
    for key, p in peftlab.adapter_parameters(model, "default").items():
        g = p.grad if ".lora_A." in key else p.grad.T  # rank slices along dim 0
        found[key] = {i for i in range(g.shape[0]) if g[i].abs().sum() > 0}
    return found


def step_with_rank(method: dylora.DyLoRA, b: int) -> int:
    return next(s for s in range(1000) if method.sample_rank(s, seed=0) == b)


@pytest.mark.parametrize(("options", "b", "trained"), [
    ({}, 5, {4}),  # the paper's scheme: only the b-th slice
    ({}, 1, {0}),
    ({"update_all": True}, 5, {0, 1, 2, 3, 4}),
    ({"r_min": 3}, 3, {0, 1, 2}),  # at b = r_min the first r_min slices train together
    ({"r_min": 3}, 6, {5}),
])
def test_only_the_sampled_slice_gets_gradient(options, b, trained):
    model = dy_llama(**options).train()
    method = peftlab.adapters(model)["default"]
    assert dylora.begin_step(model, step_with_rank(method, b), seed=0) == b
    model(**batch()).logits.pow(2).mean().backward()
    grads = slice_grads(model)
    assert len(grads) == 2 * 3 * 2  # A and B of 3 modules in 2 layers
    for key, slices in grads.items():
        assert slices == trained, key


def test_training_forward_uses_the_sampled_rank_and_eval_the_chosen_one():
    x = batch()
    model = dy_llama(rank=2)
    eval_2 = out(model, x)
    method = peftlab.adapters(model)["default"]
    dylora.begin_step(model, step_with_rank(method, 6), seed=0)
    model.train()
    with torch.no_grad():
        train_6 = model(**x).logits
    dylora.set_rank(model, 6)
    torch.testing.assert_close(train_6, out(model.eval(), x), rtol=0, atol=0)  # dropout is 0 in the tiny model
    dylora.set_rank(model, 2)
    torch.testing.assert_close(out(model, x), eval_2, rtol=0, atol=0)


def test_rank_sampling_is_uniform_and_a_function_of_seed_and_step():
    method = peftlab.get_method("dylora", r_min=2, r_max=5)
    draws = [method.sample_rank(s, seed=0) for s in range(4000)]
    assert draws == [method.sample_rank(s, seed=0) for s in range(4000)]
    assert draws != [method.sample_rank(s, seed=1) for s in range(4000)]
    counts = Counter(draws)
    assert sorted(counts) == [2, 3, 4, 5]
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in counts.values())


def test_saved_config_records_the_rank_and_loads_at_it(tmp_path):
    x = batch()
    model = dy_llama()
    dylora.set_rank(model, 3)
    expected = out(model, x)
    peftlab.save(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peftlab_method"] == "dylora" and config["rank"] == 3 and config["r_max"] == 8
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert {tuple(t.shape) for k, t in saved.items() if "lora_A" in k} == {(8, 32), (8, 64)}  # all r_max slices
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(out(fresh, x), expected, rtol=0, atol=0)
    dylora.set_rank(fresh, 8)  # the loaded adapter still has every rank
    dylora.set_rank(model, 8)
    torch.testing.assert_close(out(fresh, x), out(model, x), rtol=0, atol=0)


def test_set_rank_on_a_merged_adapter_remerges_at_the_new_rank():
    x = batch()
    model = dy_llama()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    dylora.set_rank(model, 2)
    at_2 = out(model, x)
    dylora.set_rank(model, 7)
    at_7 = out(model, x)
    peftlab.merge(model)
    dylora.set_rank(model, 2)
    torch.testing.assert_close(out(model, x), at_2, rtol=1e-5, atol=1e-5)
    dylora.set_rank(model, 7)
    torch.testing.assert_close(out(model, x), at_7, rtol=1e-5, atol=1e-5)
    peftlab.unmerge(model)
    assert all(torch.equal(v, base[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("options", "match"), [
    ({"r_min": 5, "r_max": 4}, "r_min .5. is larger than r_max .4."),
    ({"r_max": 0}, "r_max must be a positive integer"),
    ({"r_min": 0}, "r_min must be a positive integer"),
    ({"rank": 0}, r"rank must be None \(r_max\) or an integer in \[1, r_max=8\]"),
    ({"rank": 9}, r"rank must be None"),
    ({"alpha": 0}, "alpha must be > 0"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(ConfigError, match=match):
        peftlab.get_method("dylora", **options)


def test_bad_rank_changes_nothing():
    x = batch()
    model = dy_llama(rank=4)
    before = out(model, x)
    for bad in (0, 9):
        with pytest.raises(ConfigError, match="rank must be"):
            dylora.set_rank(model, bad)
    assert peftlab.adapters(model)["default"].rank == 4
    torch.testing.assert_close(out(model, x), before, rtol=0, atol=0)
    peftlab.attach(model, "lora", "plain", r=2, target_modules=["o_proj"])
    with pytest.raises(ConfigError, match="'plain' is 'lora', not dylora"):
        dylora.set_rank(model, 2, name="plain")
    with pytest.raises(AdapterStateError, match="no adapter named 'nope'"):
        dylora.set_rank(model, 2, name="nope")


def test_one_module_one_method():
    model = tiny_llama()
    peftlab.attach(model, "lora", target_modules=["q_proj"])
    with pytest.raises(AdapterStateError, match="already adapted by 'lora'"):
        peftlab.attach(model, "dylora", "dy", target_modules=["q_proj"])
    model = tiny_llama()
    peftlab.attach(model, "dylora", target_modules=["q_proj"])
    with pytest.raises(AdapterStateError, match="already adapted by 'dylora'"):
        peftlab.attach(model, "lora", "lo", target_modules=["q_proj"])


# ----------------------------------------------------------------------------- trainer


@pytest.fixture(scope="module")
def tok():
    from peftlab import models

    _, tokenizer = models.load("tiny-bert")
    if tokenizer is None:
        pytest.skip("the minilm package (its tokenizer) is not installed")
    return tokenizer


def dy_bert(adapter_seed: int = 0) -> nn.Module:
    from peftlab import models

    model, _ = models.load("tiny-bert", num_labels=3, seed=0, with_tokenizer=False)
    torch.manual_seed(adapter_seed)  # the adapter's initialisation
    peftlab.attach(model, "dylora", r_max=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    return model


SMALL = dict(batch_size=4, grad_accum=2, lr=5e-3, warmup_ratio=0.0, schedule="constant", eval_every=0,
             eval_examples=8, train_examples=20, max_length=24, progress=False)


@pytest.mark.usefixtures("one_thread")
def test_trainer_samples_a_rank_per_step_and_resumes_exactly(tmp_path, tok, monkeypatch):
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import TrainConfig, train

    seen: list[tuple[int, int]] = []
    original = dylora.DyLoRA.begin_step

    def spy(self, model, name, step, seed):
        original(self, model, name, step, seed)
        seen.append((step, self.sample_rank(step, seed)))

    monkeypatch.setattr(dylora.DyLoRA, "begin_step", spy)
    reference = dy_bert()
    train(reference, tok, get_task("tweets"), TrainConfig(steps=6, seed=3, **SMALL))
    method = peftlab.adapters(reference)["default"]
    assert seen == [(s, method.sample_rank(s, 3)) for s in range(6)]
    assert len({b for _, b in seen}) > 1
    seen.clear()

    model = dy_bert()
    train(model, tok, get_task("tweets"), TrainConfig(steps=3, seed=3, save_every=3, **SMALL), run_dir=tmp_path)
    resumed = dy_bert(adapter_seed=1)  # everything trained must come from the checkpoint
    train(resumed, tok, get_task("tweets"), TrainConfig(steps=6, seed=3, save_every=3, **SMALL), run_dir=tmp_path,
          resume=True)
    assert [s for s, _ in seen] == [0, 1, 2, 3, 4, 5]
    a, b = peftlab.adapter_parameters(resumed, "default"), peftlab.adapter_parameters(reference, "default")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_truncate_keeps_the_chosen_rank_only(tmp_path):
    x = batch()
    model = dy_llama()
    dylora.set_rank(model, 3)
    expected = out(model, x)
    dylora.truncate(model)
    method = peftlab.adapters(model)["default"]
    assert (method.r_max, method.r_min, method.rank) == (3, 1, None)
    params = peftlab.adapter_parameters(model, "default")
    assert {tuple(p.shape) for k, p in params.items() if "lora_A" in k} == {(3, 32), (3, 64)}
    assert all(p.requires_grad for p in params.values())
    assert model.model.layers[0].self_attn.q_proj.lora_A["default"].out_features == 3
    torch.testing.assert_close(out(model, x), expected, rtol=0, atol=0)
    peftlab.save(model, tmp_path)
    fresh = tiny_llama()
    peftlab.load(fresh, tmp_path)
    torch.testing.assert_close(out(fresh, x), expected, rtol=0, atol=0)
    peftlab.merge(model)
    with pytest.raises(AdapterStateError, match="unmerge the model before truncating"):
        dylora.truncate(model)
    # every layer kind (embedding, conv, linear)
    mixed = Mixed()
    peftlab.attach(mixed, "dylora", r_max=4, target_modules=["emb", "conv", "head"])
    perturb(peftlab.adapter_parameters(mixed, "default"), scale=0.3)
    dylora.set_rank(mixed, 2)
    with torch.no_grad():
        before = mixed(ids())
        dylora.truncate(mixed)
        torch.testing.assert_close(mixed(ids()), before, rtol=0, atol=0)
    assert mixed.conv.lora_A["default"].weight.shape == (2, 6, 3) and mixed.conv.lora_A["default"].out_channels == 2
    assert mixed.emb.lora_embedding_B["default"].shape == (6, 2)
