"""GaLoreAdamW and the galore method: the algorithm, its variants, resume, bad input, the estimator."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from torch import nn

import peftlab
from peftlab.core.errors import ConfigError, TargetError
from peftlab.optim import galore as G
from peftlab.optim.galore import GaLoreAdamW, galore_param_groups, galore_weights
from tests.conftest import batch, tiny_bert, tiny_gpt2, tiny_llama


pytestmark = pytest.mark.usefixtures("one_thread")


def grads(shape: tuple[int, ...], steps: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def run(opt: torch.optim.Optimizer, p: nn.Parameter, gs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for g in gs:
        p.grad = g.clone()
        opt.step()
        out.append(p.detach().clone())
    return out


# ----------------------------------------------------------------------------- the algorithm
@pytest.mark.parametrize("shape", [(6, 10), (10, 6)], ids=["left", "right"])
def test_full_rank_identity_projector_equals_adamw(shape, monkeypatch):
    """With r = min(m, n), an orthonormal identity projector and scale 1, GaLore is AdamW."""
    monkeypatch.setattr(G, "_projector", lambda grad, rank, right: torch.eye(grad.shape[1] if right else grad.shape[0]))
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8)
    opt = GaLoreAdamW([{"params": [b], "galore": True}], lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99), eps=1e-8,
                      rank=min(shape), scale=1.0, update_proj_gap=2)
    gs = grads(shape, 6)
    for x, y in zip(run(ref, a, gs), run(opt, b, gs)):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)
    state, r = opt.state[b], min(shape)
    assert state["right"] is (shape[0] > shape[1])  # the shorter side is projected
    assert state["exp_avg"].shape == ((shape[0], r) if state["right"] else (r, shape[1]))


def test_untargeted_parameters_get_plain_adamw():
    torch.manual_seed(1)
    w0 = torch.randn(7, 3)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    ref = torch.optim.AdamW([a], lr=3e-3, weight_decay=0.01)
    opt = GaLoreAdamW([{"params": [b]}], lr=3e-3, weight_decay=0.01, rank=2)
    gs = grads((7, 3), 4)
    for x, y in zip(run(ref, a, gs), run(opt, b, gs)):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape", [(8, 20), (20, 8)], ids=["left", "right"])
def test_projector_is_top_r_singular_subspace_and_update_lies_in_it(shape):
    r = 3
    p = nn.Parameter(torch.zeros(shape))
    opt = GaLoreAdamW([{"params": [p], "galore": True}], lr=0.1, rank=r, update_proj_gap=5, scale=0.5)
    g = grads(shape, 1, seed=3)[0]
    p.grad = g.clone()
    opt.step()
    state = opt.state[p]
    proj = state["projector"]
    right = shape[0] > shape[1]
    assert state["right"] is right and proj.shape == (min(shape), r)
    torch.testing.assert_close(proj.T @ proj, torch.eye(r), rtol=0, atol=1e-5)  # orthonormal columns
    s = torch.linalg.svdvals(g)
    low = g @ proj if right else proj.T @ g
    torch.testing.assert_close(low.pow(2).sum(), s[:r].pow(2).sum(), rtol=1e-5, atol=0)  # the top-r energy
    delta = p.detach()
    residual = delta - (delta @ proj @ proj.T if right else proj @ proj.T @ delta)
    assert residual.abs().max() < 1e-6 and delta.abs().max() > 1e-3  # a rank-r update in that subspace
    # the first Adam step: m_hat = R, v_hat = R^2, so the r-space direction is R / (|R| + eps), projected
    # back, times lr (0.1) and scale (0.5), from zero weights
    direction = low / (low.abs() + 1e-8)
    expected = -0.1 * 0.5 * (direction @ proj.T if right else proj @ direction)
    torch.testing.assert_close(delta, expected, rtol=1e-5, atol=1e-7)


def test_projector_refreshes_every_gap_steps_and_moments_stay_in_r_space():
    p = nn.Parameter(torch.zeros(6, 9))
    opt = GaLoreAdamW([{"params": [p], "galore": True}], lr=1e-2, rank=2, update_proj_gap=3)
    seen = []
    for g in grads((6, 9), 7, seed=5):
        p.grad = g
        opt.step()
        seen.append(opt.state[p]["projector"].clone())
        assert opt.state[p]["exp_avg"].shape == (2, 9)
    changed = [not torch.equal(seen[i], seen[i - 1]) for i in range(1, 7)]
    assert changed == [False, False, True, False, False, True]  # new SVD at steps 1, 4, 7


def test_state_bytes_on_targeted_weights_vs_adamw():
    """rank 128 on smollm2-135m's shapes: projector + r-space moments <= 0.35x AdamW's moments."""
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
    galore = sum(G.state_bytes(s, rank=128, elem=4) for s in shapes)
    adamw = sum(2 * math.prod(s) * 4 for s in shapes)
    assert galore / adamw == pytest.approx(2187264 / 7077888) and galore / adamw <= 0.35
    # and the formula is what the optimizer really holds
    model = tiny_llama()
    model.requires_grad_(True)
    opt = GaLoreAdamW.for_model(model, [r".*attn.*", r".*mlp.*"], lr=1e-3, rank=8)
    model(**batch(), labels=batch()["input_ids"]).loss.backward()
    opt.step()
    targeted = galore_weights(model, [r".*attn.*", r".*mlp.*"])
    expected = sum(G.state_bytes(tuple(p.shape), rank=8, elem=4) for p in targeted.values())
    assert opt.state_bytes(targeted.values()) == expected
    assert opt.state_bytes(targeted.values()) < 0.7 * sum(2 * p.numel() * 4 for p in targeted.values())


def test_weight_decay_is_decoupled_and_scale_multiplies_the_update():
    def delta(scale: float, wd: float) -> torch.Tensor:
        p = nn.Parameter(torch.ones(4, 8))
        opt = GaLoreAdamW([{"params": [p], "galore": True, "weight_decay": wd}], lr=0.1, rank=2, scale=scale)
        p.grad = grads((4, 8), 1, seed=2)[0]
        opt.step()
        return p.detach() - 1

    torch.testing.assert_close(delta(2.0, 0.0), 2 * delta(1.0, 0.0), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(delta(1.0, 0.5) - delta(1.0, 0.0), torch.full((4, 8), -0.05), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- galore-torch as the oracle
def _galore_torch(param: nn.Parameter, *, proj_type: str, **hyper: float) -> torch.optim.Optimizer:
    """The GaLore authors' optimizer (galore-torch) on one projected weight."""
    reference = pytest.importorskip("galore_torch")
    return reference.GaLoreAdamW([{"params": [param], "rank": 3, "update_proj_gap": 4, "scale": 0.5,
                                   "proj_type": proj_type}], no_deprecation_warning=True, **hyper)


# galore-torch's "std" projects the left side when m < n and the right side when m >= n; peftlab
# projects the left side when m <= n (the paper's Algorithm 2 assumes m <= n). They agree on every
# non-square shape; a square weight is compared with galore-torch's explicit "left".
@pytest.mark.parametrize(("shape", "proj_type"), [((8, 20), "std"), ((20, 8), "std"), ((12, 12), "left"),
                                                   ((8, 20), "left"), ((20, 8), "right")])
def test_matches_galore_torch_without_weight_decay(shape, proj_type):
    """12 steps, rank 3, a projector refresh every 4 steps (at steps 1, 5, 9), scale 0.5.

    The two differ only in rounding and in where eps sits: galore-torch divides by
    ``sqrt(v) + eps`` and folds the bias corrections into the step size, i.e. it uses
    ``eps / sqrt(1 - beta2^t)`` against peftlab's (torch.optim.AdamW's) ``eps``; with eps = 1e-8
    and projected gradients of order 1 that moves the direction by < 1e-6 relative. The tolerance,
    1e-6 on weights of order 1 (ulp(2) = 2.4e-7), allows a few ulps of fp32 rounding; the
    weights move by ~2.5e-2, so a wrong projector, side, scale, bias correction or refresh step
    shows as a difference of order 1e-3 or more.
    """
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    reference = _galore_torch(a, proj_type=proj_type, lr=1e-2, eps=1e-8, weight_decay=0.0)
    opt = GaLoreAdamW([{"params": [b], "galore": True}], lr=1e-2, eps=1e-8, rank=3, update_proj_gap=4, scale=0.5)
    for g in grads(shape, 12, seed=4):
        a.grad, b.grad = g.clone(), g.clone()
        reference.step()
        opt.step()
    assert (b.detach() - w0).abs().max() > 1e-2  # it moved far more than the tolerance
    torch.testing.assert_close(b.detach(), a.detach(), rtol=0, atol=1e-6)


def test_matches_galore_torch_with_weight_decay_up_to_its_order():
    """galore-torch decays after the update (``W = (W - u)(1 - lr wd)``), peftlab before it
    (``W = W (1 - lr wd) - u``, as torch.optim.AdamW). The gap that opens in one step is
    ``lr wd |u|``, and an old gap shrinks by ``1 - lr wd``, so after N steps the weights differ by
    at most the sum of ``lr wd max|u_t|`` over the steps (plus rounding), which is what is checked;
    without decay they agree to rounding (above)."""
    shape, lr, wd = (8, 20), 1e-2, 0.1
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    a, b = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    reference = _galore_torch(a, proj_type="std", lr=lr, eps=1e-8, weight_decay=wd)
    opt = GaLoreAdamW([{"params": [b], "galore": True}], lr=lr, eps=1e-8, weight_decay=wd, rank=3,
                      update_proj_gap=4, scale=0.5)
    bound = 0.0
    for g in grads(shape, 12, seed=4):
        a.grad, b.grad = g.clone(), g.clone()
        before = b.detach().clone()
        reference.step()
        opt.step()
        bound += lr * wd * float((b.detach() - before * (1 - lr * wd)).abs().max())  # lr wd |u_t|
    gap = float((a.detach() - b.detach()).abs().max())
    assert 0.2 * bound < gap <= bound + 1e-6, (gap, bound)  # the decay order explains the whole gap


# ----------------------------------------------------------------------------- 8-bit moments
def test_blockwise_codec_round_trip():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-4, 0, 5000)
    codes, absmax = G.quantize_blockwise(x, signed=True)
    assert codes.dtype == torch.int8 and codes.numel() == 5000 and absmax.numel() == math.ceil(5000 / G.BLOCK)
    y = G.dequantize_blockwise(codes, absmax, x)
    blockmax = absmax.repeat_interleave(G.BLOCK)[:5000]
    assert ((y - x).abs() / blockmax).max() < 1 / 127  # companded: within one code step of sqrt
    v = x * x
    codes, absmax = G.quantize_blockwise(v, signed=False)
    assert codes.dtype == torch.uint8
    w = G.dequantize_blockwise(codes, absmax, v)
    assert (w >= 0).all() and ((w - v).abs() / absmax.repeat_interleave(G.BLOCK)[:5000]).max() < 4 / 255


def test_bitsandbytes_codec_round_trip_and_refused_off_cuda():
    pytest.importorskip("bitsandbytes")
    x = torch.randn(3000)
    codes, absmax = G.quantize_bnb(x, signed=True)
    assert codes.dtype == torch.uint8 and absmax.dtype == torch.float32
    assert (G.dequantize_bnb(codes, absmax, x, signed=True) - x).abs().max() < 0.05 * x.abs().max()
    p = nn.Parameter(torch.zeros(80, 80))
    with pytest.raises(ConfigError, match="CUDA.*quantizer='blockwise'"):
        GaLoreAdamW([{"params": [p], "galore": True}], eight_bit=True, quantizer="bitsandbytes")


def test_eight_bit_tracks_full_precision_and_stores_a_quarter():
    """Least squares on a 64 x 128 weight: 8-bit GaLore follows 32-bit GaLore's loss closely."""
    g = torch.Generator().manual_seed(0)
    x, target = torch.randn(256, 128, generator=g), torch.randn(256, 64, generator=g)

    def train(eight_bit: bool) -> tuple[list[float], GaLoreAdamW]:
        w = nn.Parameter(torch.zeros(64, 128))
        opt = GaLoreAdamW([{"params": [w], "galore": True}], lr=0.05, rank=32, update_proj_gap=10, scale=1.0,
                          eight_bit=eight_bit)
        losses = []
        for _ in range(40):
            loss = (x @ w.T - target).pow(2).mean()
            losses.append(float(loss.detach()))
            w.grad = None
            loss.backward()
            opt.step()
        return losses, opt

    full, opt32 = train(False)
    low, opt8 = train(True)
    assert opt8.quantizer == "blockwise" and opt8.state[next(iter(opt8.state))]["exp_avg_q"].dtype == torch.int8
    assert low[-1] < 0.8 * low[0] and abs(low[-1] - full[-1]) < 0.05 * full[0]
    moments32 = opt32.state_bytes() - 64 * 32 * 4
    moments8 = opt8.state_bytes() - 64 * 32 * 4
    assert moments8 / moments32 == pytest.approx((1 + 4 / G.BLOCK) / 4)


# ----------------------------------------------------------------------------- layer-wise
def _llama_loss(model: nn.Module, seed: int) -> torch.Tensor:
    x = batch(seed=seed)
    return model(**x, labels=x["input_ids"]).loss


def test_layerwise_equals_stepwise_and_never_holds_all_gradients():
    a, b = tiny_llama(), tiny_llama()
    for m in (a, b):
        peftlab.attach(m, "galore", rank=4, update_proj_gap=2, target_modules=[r".*attn.*", r".*mlp.*"])
        m.train()
    opt_a = peftlab.adapters(a)["default"].make_optimizer(a, lr=1e-2, weight_decay=0.01)
    method_b = peftlab.get_method("galore", rank=4, update_proj_gap=2, target_modules=[r".*attn.*", r".*mlp.*"],
                                  layerwise=True)
    params_b = [p for p in b.parameters() if p.requires_grad]
    live = []  # gradients alive whenever one is complete (probes run before the optimizer's hooks)
    probe = [p.register_post_accumulate_grad_hook(lambda _: live.append(sum(q.grad is not None for q in params_b)))
             for p in params_b]
    opt_b = method_b.make_optimizer(b, lr=1e-2, weight_decay=0.01)
    for step in range(3):
        _llama_loss(a, step).backward()
        opt_a.step()
        opt_a.zero_grad()
        _llama_loss(b, step).backward()
        opt_b.step()
        assert all(p.grad is None for p in params_b)
    for h in probe:
        h.remove()
    assert max(live) == 1  # at most the gradient being stepped exists at a time
    for (n, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-6, msg=n)


def test_layerwise_refuses_gradient_accumulation_and_ddp(monkeypatch):
    model = tiny_llama()
    peftlab.attach(model, "galore", rank=4, target_modules=[r".*mlp.*"], layerwise=True)
    method = peftlab.adapters(model)["default"]
    with pytest.raises(ConfigError, match="grad_accum=2.*layerwise=False"):
        method.make_optimizer(model, lr=1e-3, grad_accum=2)
    opt = method.make_optimizer(model, lr=1e-3)
    model.train()
    _llama_loss(model, 0).backward()
    with pytest.raises(ConfigError, match="gradient accumulation cannot work layer-wise"):
        _llama_loss(model, 1).backward()  # a second backward before optimizer.step()
    opt.remove_hooks()
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    with pytest.raises(ConfigError, match="DDP"):
        method.make_optimizer(model, lr=1e-3)
    with pytest.raises(ConfigError, match="DDP"):
        GaLoreAdamW.for_model(model, [r".*mlp.*"], rank=4, layerwise=True)


# ----------------------------------------------------------------------------- checkpoint and resume
@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32", "8bit"])
def test_resume_gives_the_same_next_steps(eight_bit):
    def fresh() -> tuple[nn.Module, GaLoreAdamW]:
        model = tiny_llama()
        model.requires_grad_(True).train()
        return model, GaLoreAdamW.for_model(model, [r".*attn.*", r".*mlp.*"], lr=1e-2, weight_decay=0.01,
                                            rank=4, update_proj_gap=3, eight_bit=eight_bit)

    def steps(model, opt, seeds):
        for s in seeds:
            opt.zero_grad()
            _llama_loss(model, s).backward()
            opt.step()

    whole, opt = fresh()
    steps(whole, opt, range(6))
    half, opt = fresh()
    steps(half, opt, range(2))
    buf = io.BytesIO()
    torch.save({"model": half.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    state = next(iter(saved["optimizer"]["state"].values()))
    assert all(isinstance(v, (torch.Tensor, int, float, bool)) for v in state.values())
    resumed, opt2 = fresh()
    resumed.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    if eight_bit:
        absmax = [s["exp_avg_absmax"] for s in opt2.state.values() if "exp_avg_absmax" in s]
        assert absmax and all(t.dtype == torch.float32 for t in absmax)
    steps(resumed, opt2, range(2, 6))  # crosses the projector refresh at step 4
    for (n, x), y in zip(whole.named_parameters(), resumed.parameters()):
        assert torch.equal(x, y), n


# ----------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_the_fix():
    model = tiny_llama()
    with pytest.warns(UserWarning, match="clamped to min"):
        opt = GaLoreAdamW.for_model(model.requires_grad_(True), [r".*mlp.*"], rank=1000)
    p = next(iter(galore_weights(model, [r".*mlp.*"]).values()))
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["rank"] == min(p.shape)
    with pytest.raises(TargetError, match="match no Linear.*q_proj"):
        galore_weights(model, [r".*nothing.*"])
    with pytest.raises(TargetError, match="not a regular expression"):
        galore_weights(model, ["(unclosed"])
    gpt2 = tiny_gpt2()  # GPT-2's Conv1D weights are projected like nn.Linear ones
    assert sorted(galore_weights(gpt2)) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                                                  for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    for bad in (0, -5):
        with pytest.raises(ConfigError, match="update_proj_gap must be an integer >= 1"):
            peftlab.get_method("galore", update_proj_gap=bad)
        with pytest.raises(ConfigError, match="update_proj_gap"):
            GaLoreAdamW([nn.Parameter(torch.zeros(2, 2))], update_proj_gap=bad)
    with pytest.raises(ConfigError, match="rank must be"):
        peftlab.get_method("galore", rank=0)
    with pytest.raises(ConfigError, match="scale"):
        peftlab.get_method("galore", scale=-1.0)
    with pytest.raises(ConfigError, match="only 2-D"):
        GaLoreAdamW([{"params": [nn.Parameter(torch.zeros(3))], "galore": True}])
    frozen = tiny_llama().requires_grad_(False)
    with pytest.raises(ConfigError, match="none of which requires grad"):
        galore_param_groups(frozen, [r".*mlp.*"])


# ----------------------------------------------------------------------------- the method
def test_method_trains_every_base_tensor_and_saves_the_full_model(tmp_path):
    model = tiny_bert()
    peftlab.attach(model, "galore", rank=4, modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "bert.embeddings.word_embeddings.weight" in trainable and "classifier.weight" not in trainable
    assert "classifier.peftlab_copy.default.weight" in trainable
    opt = peftlab.adapters(model)["default"].make_optimizer(model, lr=1e-3, weight_decay=0.1)
    groups = opt.param_groups
    assert groups[0]["galore"] and len(groups[0]["params"]) == 2 * 6  # q, k, v, o, intermediate, output per layer
    assert {g["weight_decay"] for g in groups[1:]} == {0.1, 0.0}
    peftlab.save(model, tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert sum(t.numel() for t in saved.values()) == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert not list(tmp_path.glob("*.bin"))
    assert set(peftlab.merge_and_unload(model).state_dict()) == set(tiny_bert().state_dict())


def test_lab_trainer_trains_and_resumes_exactly(tmp_path):
    from peftlab import models
    from peftlab.lab.tasks import get_task
    from peftlab.lab.trainer import TrainConfig, train

    model, tok = models.load("tiny-bert", num_labels=3, with_tokenizer=True)
    if tok is None:
        pytest.skip("the minilm package (its tokenizer) is not installed")
    task = get_task("tweets")
    settings = dict(batch_size=4, lr=5e-3, warmup_ratio=0.2, eval_every=0, eval_examples=8, train_examples=20,
                    max_length=24, progress=False)

    def fresh() -> nn.Module:
        m, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
        peftlab.attach(m, "galore", rank=4, update_proj_gap=2, modules_to_save=["classifier"])
        return m

    whole = fresh()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(whole, tok, task, TrainConfig(steps=4, **settings))
        part = fresh()
        train(part, tok, task, TrainConfig(steps=2, save_every=2, **settings), run_dir=tmp_path)
        again = fresh()
        train(again, tok, task, TrainConfig(steps=4, save_every=2, **settings), run_dir=tmp_path, resume=True)
    changed = [n for n, p in whole.named_parameters() if p.requires_grad]
    assert changed
    for (n, x), y in zip(whole.named_parameters(), again.parameters()):
        assert torch.equal(x, y), n
    with pytest.raises(ConfigError, match="grad_accum=2"):
        layerwise, _ = models.load("tiny-bert", num_labels=3, with_tokenizer=False)
        peftlab.attach(layerwise, "galore", rank=4, layerwise=True)
        train(layerwise, tok, task, TrainConfig(steps=1, grad_accum=2, **settings))


def test_transformers_trainer_accepts_the_optimizer(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_llama().train()
    model.requires_grad_(True)
    opt = GaLoreAdamW.for_model(model, [r".*attn.*", r".*mlp.*"], lr=1e-2, rank=4, update_proj_gap=2)
    before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    data = [{"input_ids": x, "labels": x} for x in batch(size=8)["input_ids"]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None)).train()
    assert opt.state[model.model.layers[0].mlp.up_proj.weight]["step"] == 3
    assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, before)


# ----------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("eight_bit", [False, True], ids=["fp32", "8bit"])
def test_estimator_counts_the_real_optimizer_state(eight_bit):
    from peftlab import models
    from peftlab.estimate import estimate

    options = {"rank": 8, "target_modules": [r".*attn.*", r".*mlp.*"], "eight_bit": eight_bit}
    e = estimate("tiny-llama", "galore", options, dtype="fp32", mixed_precision=False, device="cpu")
    model, _ = models.load("tiny-llama", with_tokenizer=False)
    peftlab.attach(model, "galore", **options)
    opt = peftlab.adapters(model)["default"].make_optimizer(model, lr=1e-3)
    model.train()
    for p in model.parameters():
        p.grad = torch.randn_like(p) if p.requires_grad else None
    opt.step()
    assert e.optimizer == opt.state_bytes()
    adamw = estimate("tiny-llama", "full", dtype="fp32", mixed_precision=False, device="cpu")
    assert e.optimizer < adamw.optimizer



def test_eight_bit_moments_larger_than_one_chunk():
    """A moment above G.CHUNK elements is initialised and updated chunk by chunk, like one piece."""
    shape = (1030, 1030)
    assert math.prod(shape) > G.CHUNK
    gs = grads(shape, 2, seed=7)
    lr = 1e-3
    a, b = nn.Parameter(torch.zeros(shape)), nn.Parameter(torch.zeros(shape))
    full = run(GaLoreAdamW([a], lr=lr), a, gs)
    low = run(GaLoreAdamW([b], lr=lr, eight_bit=True, quantizer="blockwise"), b, gs)
    torch.testing.assert_close(low[0], full[0], rtol=0, atol=1e-7)  # step 1 starts from exact zero moments
    diff = (low[1] - full[1]).abs()
    assert diff.max() < 0.5 * lr and diff.mean() < 0.01 * lr and not torch.equal(low[1], full[1])
