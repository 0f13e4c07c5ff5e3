"""8-bit AdamW: peftlab's pure-PyTorch AdamW8bit against bitsandbytes' AdamW8bit (the oracle, on
CPU) and fp32 ``torch.optim.AdamW``; the nearest-level rounding against a brute-force search."""

from __future__ import annotations

import io

import pytest
import torch

from peftlab import quant
from peftlab.core.errors import ConfigError
from peftlab.optim import AdamW8bit, make_adamw8bit, state_bytes
from peftlab.optim import adamw8bit as adamw8bit_module

bnb = quant.import_bitsandbytes()
needs_bnb = pytest.mark.skipif(bnb is None, reason="bitsandbytes is not installed")
KW = {"lr": 1e-3, "weight_decay": 1e-2}


# ------------------------------------------------------------------------------ rounding
@pytest.mark.parametrize("kind", ["nf4", "int8", "dynamic", "udynamic"])
def test_nearest_level_is_the_nearest_level(kind):
    levels = quant._table(kind, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    low = float(levels[0])
    x = (torch.rand(20000, generator=g) * (1 - low) + low) * torch.rand(20000, generator=g) ** 6
    rounder = quant._rounder(kind, torch.device("cpu"))
    codes = rounder(x).long()
    dist = (x.double()[:, None] - levels.double()[None]).abs()  # brute force, in float64
    assert torch.equal(dist.gather(1, codes[:, None]).squeeze(1), dist.min(1).values)
    # on and next to every midpoint, at 0, -0 and the ends (beyond them too): torch.bucketize's answer
    mids = (levels[:-1] + levels[1:]) / 2
    edges = torch.cat([mids, torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0)),
                       torch.tensor([0.0, -0.0, -1.0, 1.0, 1.0000001, -1.0000001, 1e-30, -1e-30])])
    assert torch.equal(rounder(edges), torch.bucketize(edges.clamp(-1, 1), mids).to(torch.uint8))


def test_quantize_blockwise_round_trip_and_block_size():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, generator=g)
    codes, absmax = quant.quantize_blockwise(x, "dynamic", 256)
    assert codes.dtype == torch.uint8 and absmax.numel() == 4  # 1000 values: 3 whole blocks and a short one
    torch.testing.assert_close(absmax, torch.stack([x[i:i + 256].abs().max() for i in range(0, 1000, 256)]),
                               rtol=0, atol=0)
    back = quant.dequantize_blockwise(codes, absmax, quant.dynamic_map(), 256, 1000)
    assert float((back - x).norm() / x.norm()) < 0.02


# ------------------------------------------------------------------------------ optimizer
def _fit(make, steps=50, size=(256, 256)):
    g = torch.Generator().manual_seed(0)
    start = torch.randn(size, generator=g) * 0.02
    target = torch.randn(size, generator=g) * 0.02
    w = torch.nn.Parameter(start.clone())
    opt = make([w])
    for _ in range(steps):
        w.grad = 2e3 * (w.detach() - target) / target.numel()
        opt.step()
    return start, w.detach(), opt


@needs_bnb
def test_fallback_follows_fp32_adamw_as_closely_as_bitsandbytes():
    start, ref, _ = _fit(lambda ps: torch.optim.AdamW(ps, **KW))
    travelled = float((ref - start).norm())
    _, theirs, _ = _fit(lambda ps: bnb.optim.AdamW8bit(ps, **KW))
    _, ours, opt = _fit(lambda ps: AdamW8bit(ps, **KW))
    d_theirs = float((theirs - ref).norm()) / travelled
    d_ours = float((ours - ref).norm()) / travelled
    assert 0 < d_theirs < 0.1
    assert abs(d_ours - d_theirs) < 0.1 * d_theirs, (d_ours, d_theirs)
    assert float((ours - theirs).norm()) / travelled < 0.5 * d_theirs  # the two 8-bit paths: closer still
    # state: two bytes per parameter plus an fp32 absmax per 256 values and moment
    n = ours.numel()
    assert opt.state[next(iter(opt.state))]["m_absmax"].numel() == n // 256
    assert state_bytes(opt) == 2 * n + 2 * 4 * (n // 256) + 4


@needs_bnb
def test_quantized_state_after_one_step_matches_bitsandbytes():
    g = torch.Generator().manual_seed(2)
    start = torch.randn(128, 256, generator=g)
    grad = torch.randn(128, 256, generator=g) * torch.rand(128, 256, generator=g) ** 3  # a wide range of magnitudes
    a, b = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    oa, ob = AdamW8bit([a], **KW), bnb.optim.AdamW8bit([b], **KW)
    a.grad, b.grad = grad.clone(), grad.clone()
    oa.step()
    ob.step()
    torch.testing.assert_close(a, b, rtol=0, atol=1e-7)  # the step itself, from the fp32 moments
    sa, sb = oa.state[a], ob.state[b]
    for ours_codes, ours_absmax, theirs_codes, theirs_absmax, kind, moment in (
            ("m_codes", "m_absmax", "state1", "absmax1", "dynamic", (1 - 0.9) * grad),
            ("v_codes", "v_absmax", "state2", "absmax2", "udynamic", (1 - 0.999) * grad * grad)):
        torch.testing.assert_close(sa[ours_absmax], sb[theirs_absmax], rtol=0, atol=0)
        assert torch.equal(sa[ours_absmax], moment.reshape(-1, 256).abs().amax(1))  # by hand
        ours, theirs = sa[ours_codes].long(), sb[theirs_codes].reshape(-1).long()
        levels = quant._table(kind, torch.device("cpu")).double()
        scaled = (moment.reshape(-1, 256).double() / sa[ours_absmax].double()[:, None]).reshape(-1)
        dist = (scaled[:, None] - levels[None]).abs()
        assert torch.equal(dist.gather(1, ours[:, None]).squeeze(1), dist.min(1).values)  # ours: the nearest
        # bitsandbytes' CPU kernel does not always take the nearest level: values near zero (a third of v's
        # codes here) land on a larger small level. The moments the two states hold still agree:
        scale = sa[ours_absmax].double().repeat_interleave(256)
        held_ours, held_theirs = levels[ours] * scale, levels[theirs] * scale
        truth = moment.reshape(-1).double()
        assert float((held_ours - held_theirs).norm() / truth.norm()) < 0.005  # measured 0.0010 (m), 0.0006 (v)
        assert float((held_ours - truth).norm()) <= float((held_theirs - truth).norm())
        assert float((held_ours - truth).norm() / truth.norm()) < 0.02


def test_small_tensors_keep_fp32_moments_and_blocksize_is_validated():
    p = torch.nn.Parameter(torch.ones(10))
    opt = AdamW8bit([p], **KW)
    p.grad = torch.full((10,), 0.5)
    opt.step()
    assert opt.state[p]["m"].dtype == torch.float32
    # AdamW's first step by hand: w (1 - lr wd) - lr g / (|g| + eps)
    torch.testing.assert_close(p.detach(), torch.full((10,), (1 - 1e-5) - 1e-3 * 0.5 / (0.5 + 1e-8)))
    with pytest.raises(ConfigError, match="power of two"):
        AdamW8bit([p], blocksize=100)


def test_resumes_exactly_from_a_weights_only_checkpoint():
    for backend in ("torch", "auto"):
        _, w, opt = _fit(lambda ps: make_adamw8bit(ps, backend=backend, **KW), steps=5, size=(64, 96))
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        w2 = torch.nn.Parameter(w.clone())
        again = make_adamw8bit([w2], backend=backend, **KW)
        again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
        w1 = opt.param_groups[0]["params"][0]
        g = torch.randn(64, 96, generator=torch.Generator().manual_seed(5))
        for p, o in ((w1, opt), (w2, again)):
            p.grad = g.clone()
            o.step()
        assert torch.equal(w1, w2), backend


# ------------------------------------------------------------------------------ choice
@needs_bnb
def test_auto_uses_bitsandbytes_where_it_imports_and_steps_on_the_device():
    p = [torch.nn.Parameter(torch.zeros(64, 64))]
    assert adamw8bit_module.bitsandbytes_adamw8bit_works("cpu")
    assert type(make_adamw8bit(p, **KW)) is bnb.optim.AdamW8bit
    assert type(make_adamw8bit(p, backend="bitsandbytes", **KW)) is bnb.optim.AdamW8bit
    assert type(make_adamw8bit(p, backend="torch", **KW)) is AdamW8bit


def test_auto_falls_back_without_bitsandbytes(monkeypatch):
    monkeypatch.setattr(adamw8bit_module, "import_bitsandbytes", lambda: None)
    monkeypatch.setattr(adamw8bit_module, "_WORKS", {})
    p = [torch.nn.Parameter(torch.zeros(64, 64))]
    assert type(make_adamw8bit(p, **KW)) is AdamW8bit
    with pytest.raises(ConfigError, match="backend='auto'"):
        make_adamw8bit(p, backend="bitsandbytes", **KW)
    with pytest.raises(ConfigError, match="backend must be one of"):
        make_adamw8bit(p, backend="cuda")
