"""AdaLoRA against a naive reference written here and against peft's implementation: the SVD-form
forward and merge, importance scores and masks (naive and peft's RankAllocator on the same
gradients), the orthogonality penalty, files both ways (pruned ranks included), a trainer run
whose ranks fall to the budget, exact continuation from saved state, and config handling."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, PeftlabError
from peftlab.methods.adalora import AdaLoRA, budget_schedule
from tests.conftest import perturb, tiny_bert, tiny_gpt2, tiny_llama

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"), pytest.mark.usefixtures("one_thread")]
CASES = {"llama": (tiny_llama, ["q_proj", "v_proj", "down_proj"]), "gpt2": (tiny_gpt2, ["c_attn", "c_fc"]),
         "bert": (tiny_bert, ["query", "value", "output.dense"])}
X = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(1))
OPTS = dict(init_r=4, target_r=2, tinit=1, tfinal=2, delta_t=2, total_step=9, alpha=6)
PEFT_OPTS = dict(init_r=4, target_r=2, tinit=1, tfinal=2, deltaT=2, total_step=9, lora_alpha=6)


def logits(model: nn.Module, x: torch.Tensor = X) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits.float()


def triplets(model: nn.Module, name: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """{module path: (A, E, B)} of a peftlab AdaLoRA adapter."""
    return {p: (layer.lora_A[name], layer.lora_E[name], layer.lora_B[name])
            for p, layer in peftlab.adapters(model)[name].layers_of(model, name)}


def peft_triplets(pm: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    from peft.tuners.adalora import AdaLoraLayer

    return {p.replace("base_model.model.", ""): (m.lora_A["default"], m.lora_E["default"], m.lora_B["default"])
            for p, m in pm.named_modules() if isinstance(m, AdaLoraLayer)}


def copy_into_peft(model: nn.Module, pm: nn.Module) -> None:
    ours, theirs = triplets(model), peft_triplets(pm)
    assert ours.keys() == theirs.keys()
    with torch.no_grad():
        for p in ours:
            for a, b in zip(ours[p], theirs[p]):
                b.copy_(a)


# --------------------------------------------------------------------------- maths against a naive reference
def test_forward_and_delta_equal_the_svd_formula():
    model = tiny_llama()
    peftlab.attach(model, "adalora", init_r=4, target_r=2, target_modules=["q_proj"], alpha=5)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    layer = model.model.layers[0].self_attn.q_proj
    a, e, b = layer.lora_A["default"], layer.lora_E["default"], layer.lora_B["default"]
    x = torch.randn(3, 32)
    scale = 5 / (4 + 1e-5)
    want = x @ layer.weight.T + scale * (x @ a.T @ torch.diag(e.view(-1)) @ b.T)
    torch.testing.assert_close(layer(x), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(layer.delta_weight("default"), scale * b @ torch.diag(e.view(-1)) @ a,
                               atol=1e-6, rtol=1e-6)


def test_identity_at_init_and_merge_unmerge():
    model = tiny_llama()
    with torch.no_grad():
        base = logits(model)
    peftlab.attach(model, "adalora", **OPTS, target_modules=["q_proj", "down_proj"])
    torch.testing.assert_close(logits(model), base, atol=0, rtol=0)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    adapted = logits(model)
    weight = model.model.layers[0].self_attn.q_proj.weight.clone()
    peftlab.merge(model)
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    peftlab.unmerge(model)
    assert torch.equal(model.model.layers[0].self_attn.q_proj.weight, weight)


def naive_step(state: dict, tensors: dict, grads: dict, beta1: float, beta2: float) -> None:
    """The paper's Eq. 8-10 element by element: I = |w g|, Ibar = b1 Ibar + (1-b1) I,
    U = b2 U + (1-b2) |I - Ibar|."""
    for key, w in tensors.items():
        ipt = (w * grads[key]).abs()
        bar, unc = state.get(key, (torch.zeros_like(w), torch.zeros_like(w)))
        bar = beta1 * bar + (1 - beta1) * ipt
        unc = beta2 * unc + (1 - beta2) * (ipt - bar).abs()
        state[key] = (bar, unc)


def naive_masks(state: dict, paths: list[str], budget: int) -> dict[str, list[bool]]:
    """Triplet i's score S(E_i) + mean_j S(A_ij) + mean_j S(B_ji) (S = Ibar * U); the
    (held - budget) lowest scores over all layers are pruned (ties at the threshold too)."""
    scores = {}
    for p in paths:
        sa = state[(p, "A")][0] * state[(p, "A")][1]
        se = state[(p, "E")][0] * state[(p, "E")][1]
        sb = state[(p, "B")][0] * state[(p, "B")][1]
        scores[p] = [float(se[i, 0]) + (float(sa[i].mean()) + float(sb[:, i].mean())) for i in range(sa.shape[0])]
    ordered = sorted(s for v in scores.values() for s in v)
    drop = len(ordered) - budget
    threshold = ordered[drop - 1]
    return {p: [s > threshold for s in v] for p, v in scores.items()}


def fake_gradients(model_tensors: dict, step: int) -> dict:
    """Reproducible gradients; the first module's are 1000x smaller, so its triplets go first."""
    g = torch.Generator().manual_seed(100 + step)
    first = sorted({p for p, _ in model_tensors})[0]
    return {k: torch.randn(t.shape, generator=g) * (1e-3 if k[0] == first else 1.0)
            for k, t in sorted(model_tensors.items())}


def test_scores_and_masks_equal_a_naive_reference():
    model = tiny_llama()
    method = AdaLoRA(**OPTS, target_modules=["q_proj", "v_proj", "down_proj"])
    peftlab.attach(model, method)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    paths = list(triplets(model))
    state: dict = {}
    masks = None
    for step in range(OPTS["total_step"] + 2):
        tensors = {(p, side): t for p, ts in triplets(model).items() for side, t in zip("AEB", ts)}
        grads = fake_gradients(tensors, step)
        with torch.no_grad():
            for k, t in tensors.items():
                t.sub_(0.01 * grads[k])  # the optimizer step, before the allocation
                t.grad = grads[k].clone()
        final = OPTS["total_step"] - OPTS["tfinal"]
        before = {k: t.detach().clone() for k, t in tensors.items()}
        if step < final:
            naive_step(state, {k: t.detach() for k, t in tensors.items()}, grads, 0.85, 0.85)
        peftlab.adapters(model)["default"].end_step(model, "default", step, 0)
        budget, now = budget_schedule(step, 4 * len(paths), 2 * len(paths), 1, 2, 9, 2)
        if step == final:
            budget, now = 2 * len(paths), True
        if step < final:
            for p, layer in peftlab.adapters(model)["default"].layers_of(model, "default"):
                st = layer.adalora_state["default"]
                for side in "AEB":
                    torch.testing.assert_close(getattr(st, f"ipt_{side}"), state[(p, side)][0], atol=1e-7, rtol=1e-6)
                    torch.testing.assert_close(getattr(st, f"unc_{side}"), state[(p, side)][1], atol=1e-7, rtol=1e-6)
        masking = (now and step <= final) or step > final  # after the final allocation: every step
        if now and step <= final:
            masks = naive_masks(state, paths, budget)
        for p, (a, e, b) in triplets(model).items():
            want = before[(p, "E")].clone()
            if masking:  # between allocations pruned E may move again (peft's behaviour too)
                want[~torch.tensor(masks[p])] = 0.0
            assert torch.equal(e.detach(), want), (step, p)
    kept = {p: sum(m) for p, m in masks.items()}
    assert sum(kept.values()) <= 2 * len(paths) and kept[sorted(paths)[0]] == 0  # the small-gradient module
    assert peftlab.adapters(model)["default"].ranks(model, "default") == {p: (k, 4) for p, k in kept.items()}


def run_both(arch: str, steps: int):
    """The same adapter in peft and peftlab, driven by the same gradients for ``steps`` steps
    through peft's update_and_allocate and peftlab's end_step."""
    import peft

    build, targets = CASES[arch]
    pm = peft.get_peft_model(build(), peft.AdaLoraConfig(**PEFT_OPTS, target_modules=targets,
                                                         fan_in_fan_out=arch == "gpt2"))
    model = build()
    peftlab.attach(model, "adalora", **OPTS, target_modules=targets)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    copy_into_peft(model, pm)
    for step in range(steps):
        ours = {(p, side): t for p, ts in triplets(model).items() for side, t in zip("AEB", ts)}
        theirs = {(p, side): t for p, ts in peft_triplets(pm).items() for side, t in zip("AEB", ts)}
        grads = fake_gradients(ours, step)
        with torch.no_grad():
            for k in ours:
                for t in (ours[k], theirs[k]):
                    t.sub_(0.01 * grads[k])
                    t.grad = grads[k].clone()
        pm.base_model.update_and_allocate(step)
        peftlab.adapters(model)["default"].end_step(model, "default", step, 0)
        for k in ours:
            assert torch.equal(ours[k].detach(), theirs[k].detach()), (step, k)
        if step < OPTS["total_step"] - OPTS["tfinal"]:
            alloc = pm.base_model.rankallocator
            for p, layer in peftlab.adapters(model)["default"].layers_of(model, "default"):
                st = layer.adalora_state["default"]
                for side in "AEB":
                    n = f"{p}.lora_{side}.default"
                    torch.testing.assert_close(getattr(st, f"ipt_{side}"), alloc.exp_avg_ipt[n], atol=0, rtol=0)
                    torch.testing.assert_close(getattr(st, f"unc_{side}"), alloc.exp_avg_unc[n], atol=0, rtol=0)
    return pm, model


@pytest.mark.parametrize("arch", sorted(CASES))
def test_allocation_equals_peft_rank_allocator_on_the_same_gradients(arch):
    pm, model = run_both(arch, OPTS["total_step"] + 1)
    theirs = {k.replace(".lora_E.default", ".lora_E"): list(map(bool, v))
              for k, v in pm.peft_config["default"].rank_pattern.items()}
    ours = {k: list(v) for k, v in peftlab.adapters(model)["default"].rank_pattern.items()}
    assert ours == theirs
    assert not all(all(v) for v in ours.values())  # something was pruned


def test_orthogonal_penalty_equals_peft():
    import peft

    pm = peft.get_peft_model(tiny_llama(), peft.AdaLoraConfig(**PEFT_OPTS, target_modules=["q_proj", "down_proj"],
                                                              orth_reg_weight=0.3))
    model = tiny_llama()
    peftlab.attach(model, "adalora", **OPTS, target_modules=["q_proj", "down_proj"], orth_reg_weight=0.3)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    copy_into_peft(model, pm)
    peft_loss = pm.base_model(input_ids=X, labels=X).loss  # a PeftModel without task_type skips the penalty
    plain = model(input_ids=X, labels=X).loss
    extra = peftlab.adapters(model)["default"].extra_loss(model, "default")
    torch.testing.assert_close(plain + extra, peft_loss, atol=1e-6, rtol=1e-6)
    # the naive formula: weight * mean over P and Q of ||P^T P - I||_F, ||Q Q^T - I||_F
    terms = [torch.linalg.norm(m - torch.eye(m.shape[0])) for a, _, b in triplets(model).values()
             for m in (a @ a.T, b.T @ b)]
    torch.testing.assert_close(extra, 0.3 * sum(terms) / len(terms), atol=1e-6, rtol=1e-6)
    zero = AdaLoRA(orth_reg_weight=0.0, init_r=4, target_r=2, target_modules=["q_proj"])
    assert zero.extra_loss(model, "default") is None


# --------------------------------------------------------------------------- files both ways
@pytest.mark.parametrize("arch", sorted(CASES))
def test_peftlab_file_loads_in_peft(arch, tmp_path):
    from peft import PeftModel

    build, targets = CASES[arch]
    model = build()
    peftlab.attach(model, "adalora", **OPTS, target_modules=targets)
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    want = logits(model)
    peftlab.save(model, tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits(loaded.merge_and_unload()), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_peft_file_loads_in_peftlab_and_merges_as_peft(arch, tmp_path):
    import peft

    build, targets = CASES[arch]
    pm = peft.get_peft_model(build(), peft.AdaLoraConfig(**PEFT_OPTS, target_modules=targets,
                                                         fan_in_fan_out=arch == "gpt2"))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.3)
    pm.save_pretrained(tmp_path)
    pm.eval()
    model = build()
    peftlab.load(model, tmp_path)
    torch.testing.assert_close(logits(model), logits(pm), atol=1e-5, rtol=1e-5)
    peftlab.merge(model)
    torch.testing.assert_close(logits(model), logits(pm.merge_and_unload()), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", sorted(CASES))
def test_pruned_allocation_files_load_both_ways(arch, tmp_path):
    """After the final allocation (one module pruned to rank 0), each library's file gives the
    other library the same outputs, with tensors at the kept ranks."""
    from peft import PeftModel

    build, _ = CASES[arch]
    pm, model = run_both(arch, OPTS["total_step"] + 1)
    pm.eval()
    want = logits(model)
    torch.testing.assert_close(logits(pm), want, atol=1e-5, rtol=1e-5)
    peftlab.save(model, tmp_path / "ours")
    pm.save_pretrained(tmp_path / "theirs")
    for folder in ("ours", "theirs"):
        config = json.loads((tmp_path / folder / "adapter_config.json").read_text())
        assert {k: list(v) for k, v in config["rank_pattern"].items()} == \
            {k: list(v) for k, v in peftlab.adapters(model)["default"].rank_pattern.items()}
    from safetensors.torch import load_file

    ours_t, theirs_t = (load_file(str(tmp_path / f / "adapter_model.safetensors")) for f in ("ours", "theirs"))
    assert ours_t.keys() == theirs_t.keys()
    assert all(torch.equal(ours_t[k], theirs_t[k]) for k in ours_t)
    assert min(t.shape[0] for k, t in ours_t.items() if k.endswith("lora_E")) == 0  # a rank-0 module

    in_peft = PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    torch.testing.assert_close(logits(in_peft), want, atol=1e-5, rtol=1e-5)
    in_lab = build()
    peftlab.load(in_lab, tmp_path / "theirs")
    torch.testing.assert_close(logits(in_lab), want, atol=1e-5, rtol=1e-5)
    kept = peftlab.adapters(model)["default"].ranks(model, "default")
    assert peftlab.adapters(in_lab)["default"].ranks(in_lab, "default") == kept
    assert sum(p.numel() for p in peftlab.adapter_parameters(in_lab, "default").values()) < \
        sum(p.numel() for p in peftlab.adapter_parameters(model, "default").values())
    peftlab.merge(in_lab)
    torch.testing.assert_close(logits(in_lab), want, atol=1e-5, rtol=1e-5)
    again = build()  # a loaded pruned adapter saves the same file again
    peftlab.load(again, tmp_path / "ours")
    peftlab.save(again, tmp_path / "again")
    again_t = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert again_t.keys() == ours_t.keys() and all(torch.equal(again_t[k], ours_t[k]) for k in ours_t)


def test_conv2d_matches_peft_both_ways(tmp_path):
    import peft
    from peft import PeftModel

    def net() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 6, 3, stride=2, dilation=1),
                             nn.Flatten(), nn.Linear(6 * 3 * 3, 5))

    x = torch.randn(2, 3, 8, 8)
    model = net()
    peftlab.attach(model, "adalora", init_r=3, target_r=2, total_step=5, target_modules=["0", "2", "4"])
    perturb(peftlab.adapter_parameters(model, "default"), scale=0.3)
    with torch.no_grad():
        want = model(x)
    peftlab.save(model, tmp_path / "ours")
    loaded = PeftModel.from_pretrained(net(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), want, atol=1e-5, rtol=1e-5)
    conv = model[2]
    with torch.no_grad():
        d = conv.delta_weight("default")
        h = torch.relu(model[0](x))
        torch.testing.assert_close(conv(h), nn.functional.conv2d(h, conv.weight + d, conv.bias, stride=2),
                                   atol=1e-5, rtol=1e-5)
    pm = peft.get_peft_model(net(), peft.AdaLoraConfig(init_r=3, target_r=2, total_step=5,
                                                       target_modules=["0", "2", "4"]))
    perturb({k: p for k, p in pm.named_parameters() if p.requires_grad}, scale=0.3)
    pm.save_pretrained(tmp_path / "theirs")
    pm.eval()
    fresh = net()
    peftlab.load(fresh, tmp_path / "theirs")
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pm(x), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- training
def _tiny_run():
    from tests.test_tasks import tiny_causal_lm, word_tokenizer

    rows = [{"prompt": f"what is {w}?", "response": f"{w} is a word."} for w in
            ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "rock", "sea", "sky", "fish"]]
    tok = word_tokenizer([t for r in rows for t in r.values()])
    return rows, tok, tiny_causal_lm


def test_trainer_prunes_ranks_to_the_budget_and_the_summary_shows_them(tmp_path):
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import TrainConfig, train

    rows, tok, build = _tiny_run()
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    model = build(len(tok))
    peftlab.attach(model, "adalora", init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3, alpha=32,
                   target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    config = TrainConfig(steps=12, batch_size=4, lr=2e-2, eval_every=0, max_length=32, progress=False)
    result = train(model, tok, get_task("file", data=path), config)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    method = peftlab.adapters(model)["default"]
    ranks = method.ranks(model, "default")
    assert len(ranks) == 8 and sum(k for k, _ in ranks.values()) <= 2 * 8
    assert sum(k for k, _ in ranks.values()) >= 2 * 8 - 2  # ties at the threshold are rare
    assert len({k for k, _ in ranks.values()}) > 1  # unequal ranks: an allocation, not a uniform cut
    for path_, (a, e, b) in triplets(model).items():  # pruned triplets stay at E = 0 after the final steps
        mask = model.get_submodule(path_).adalora_state["default"].mask
        assert torch.all(e.detach()[~mask] == 0) and torch.all(e.detach()[mask] != 0)
    text = str(peftlab.summary(model))
    assert f"rank allocation {sum(k for k, _ in ranks.values())} of 48 triplets kept over 8 layers" in text
    for path_, (k, r) in ranks.items():
        assert any(line.startswith(path_) and line.rstrip().endswith(f"{k}/{r}") for line in text.splitlines())
    mean_v = sum(k for p, (k, _) in ranks.items() if p.endswith("v_proj")) / 2
    assert "mean kept rank by module name: q_proj" in text and f"v_proj {mean_v:.1f}" in text
    peftlab.save(model, tmp_path / "adapter")
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert {k.removesuffix(".lora_E"): sum(v) for k, v in config_json["rank_pattern"].items()} == \
        {p: k for p, (k, _) in ranks.items()}


def _manual_run(model: nn.Module, steps: range, optimizer: torch.optim.Optimizer) -> None:
    method = peftlab.adapters(model)["default"]
    model.train()
    for step in steps:
        x = torch.randint(2, 100, (2, 6), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=x, labels=x).loss + method.extra_loss(model, "default")
        loss.backward()
        optimizer.step()
        method = peftlab.adapters(model)["default"]
        method.end_step(model, "default", step, 0)
        optimizer.zero_grad(set_to_none=True)


def test_training_state_is_what_an_exact_resume_needs():
    """Trainable tensors + optimizer + Method.training_state, copied into a fresh run, continue
    bit-identically (tensors and scores); without the training state the scores differ."""
    opts = dict(init_r=4, target_r=2, total_step=10, tinit=1, tfinal=2,
                target_modules=["q_proj", "v_proj", "down_proj"])

    def fresh():
        model = tiny_llama()
        torch.manual_seed(0)
        peftlab.attach(model, "adalora", **opts)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-2)

    ref, ref_opt = fresh()
    _manual_run(ref, range(12), ref_opt)

    results = []
    for with_state in (True, False):
        first, first_opt = fresh()
        _manual_run(first, range(5), first_opt)
        saved = {k: v.detach().clone() for k, v in peftlab.adapter_parameters(first, "default").items()}
        state = {k: v.clone() for k, v in peftlab.adapters(first)["default"].training_state(first, "default").items()}
        opt_state = first_opt.state_dict()
        second, second_opt = fresh()
        with torch.no_grad():
            for k, t in peftlab.adapter_parameters(second, "default").items():
                t.copy_(saved[k])
            if with_state:
                for k, t in peftlab.adapters(second)["default"].training_state(second, "default").items():
                    t.copy_(state[k])
        second_opt.load_state_dict(opt_state)
        _manual_run(second, range(5, 12), second_opt)
        ref_state = peftlab.adapters(ref)["default"].training_state(ref, "default")
        results.append(all(torch.equal(t, peftlab.adapter_parameters(ref, "default")[k])
                           for k, t in peftlab.adapter_parameters(second, "default").items())
                       and all(torch.equal(t, ref_state[k]) for k, t in
                               peftlab.adapters(second)["default"].training_state(second, "default").items()))
    assert results == [True, False]
    assert set(state) and all(".adalora_state.default." in k for k in state)
    assert set(state) <= set(ref.state_dict())


def test_trainer_resume_is_exact(tmp_path):
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import TrainConfig, train

    rows, tok, build = _tiny_run()
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))

    def model():
        m = build(len(tok))
        torch.manual_seed(0)
        peftlab.attach(m, "adalora", init_r=4, target_r=2, total_step=8, tinit=1, tfinal=2,
                       target_modules=["q_proj", "v_proj"])
        return m

    config = TrainConfig(steps=8, batch_size=4, lr=2e-2, eval_every=0, max_length=32, progress=False, save_every=4,
                         schedule="constant", warmup_ratio=0.0)  # a schedule that does not depend on the total
    ref = model()
    train(ref, tok, get_task("file", data=path), config, run_dir=tmp_path / "a")
    short = model()
    train(short, tok, get_task("file", data=path), TrainConfig(**{**config.to_dict(), "steps": 4}),
          run_dir=tmp_path / "b")
    resumed = model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(resumed, tok, get_task("file", data=path), config, run_dir=tmp_path / "b", resume=True)
    ours, want = peftlab.adapter_parameters(resumed, "default"), peftlab.adapter_parameters(ref, "default")
    assert all(torch.equal(ours[k], want[k]) for k in want)


# --------------------------------------------------------------------------- config
def test_every_peft_adalora_field_is_read_described_or_refused():
    import peft

    from peftlab.methods import adalora

    fields = set(peft.AdaLoraConfig(total_step=10).to_dict())
    known = adalora.PEFT_HANDLED | adalora.PEFT_METADATA | adalora.PEFT_IGNORED
    written = set(AdaLoRA().to_config())
    assert fields <= written | {"peft_version", "auto_mapping", "base_model_name_or_path", "revision"}
    refused = fields - known
    defaults = peft.AdaLoraConfig(total_step=10).to_dict()
    for name in sorted(refused):  # every other field at a non-default value is refused by name
        value = {"loftq_config": {"loftq_bits": 4}, "layers_pattern": "layers", "qalora_group_size": 8}.get(
            name, True if defaults[name] in (None, False) else "x")
        config = {**AdaLoRA().to_config(), name: value}
        with pytest.raises(ConfigError, match=name):
            AdaLoRA.from_config(config)
    assert AdaLoRA.from_config(AdaLoRA().to_config()) == AdaLoRA()


def test_peft_config_round_trip_and_names():
    m = AdaLoRA(init_r=6, target_r=3, total_step=50, tinit=5, tfinal=10, delta_t=4, beta1=0.8, beta2=0.9,
                orth_reg_weight=0.1, alpha=16, dropout=0.1, target_modules=("q_proj",), init="random",
                rank_pattern={"model.layers.0.self_attn.q_proj.lora_E": (True, False, True, True, False, True)})
    config = m.to_config()
    assert config["deltaT"] == 4 and config["lora_alpha"] == 16 and config["init_lora_weights"] is False
    assert AdaLoRA.from_config(json.loads(json.dumps(config))) == m


@pytest.mark.parametrize(("options", "message"), [
    ({"init_r": 0}, "init_r must be a positive"),
    ({"init_r": 4, "target_r": 5}, r"target_r must be in \[0, init_r=4\]"),
    ({"total_step": 0}, "total_step must be a positive"),
    ({"tinit": 30, "tfinal": 20, "total_step": 40}, "leave a budgeting phase"),
    ({"delta_t": 0}, "delta_t must be"),
    ({"beta1": 1.0}, r"beta1 must be in \(0, 1\)"),
    ({"orth_reg_weight": -1.0}, "orth_reg_weight must be >= 0"),
    ({"alpha": 0}, "alpha must be > 0"),
    ({"init": "pissa"}, "init must be one of"),
    ({"rank_pattern": {"q_proj": [True] * 12}}, "must name a module's lora_E"),
    ({"rank_pattern": {"q_proj.lora_E": [True] * 3}}, "has 3 entries"),
])
def test_bad_options_name_the_fix(options, message):
    with pytest.raises(ConfigError, match=message):
        AdaLoRA(**options)


def test_rank_pattern_of_another_model_is_refused_and_nothing_changes():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(PeftlabError, match="rank_pattern names modules that are not adapted"):
        peftlab.attach(model, "adalora", init_r=2, target_r=1, target_modules=["q_proj"],
                       rank_pattern={"encoder.layer.0.query.lora_E": [True, False]})
    assert not any(isinstance(m, peftlab.core.layer.AdapterLayer) for m in model.modules())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_options_peft_ignores_are_ignored_with_a_warning():
    with pytest.warns(UserWarning, match="peft's AdaLoRA ignores.*use_rslora"):
        m = AdaLoRA.from_config({**AdaLoRA().to_config(), "r": 16, "use_rslora": True})
    assert m == AdaLoRA()


def test_unsupported_layers_and_peft_options_are_refused():
    model = tiny_llama()
    with pytest.raises(PeftlabError, match="supported"):
        peftlab.attach(model, "adalora", target_modules=["embed_tokens"])
    with pytest.raises(ConfigError, match="bias"):
        AdaLoRA.from_config({**AdaLoRA().to_config(), "bias": "all"})
    with pytest.raises(ConfigError, match="total_step"):
        AdaLoRA.from_config({**AdaLoRA().to_config(), "total_step": None})
