"""What the code itself says: parameter tensors after the real ``attach``, and the model's structure.

Nothing here is a per-method formula. For each method the model is built on the meta device, the
method is attached with :func:`peftlab.attach` exactly as a user would, and then

* every parameter tensor is listed with its shape, dtype and whether it trains
  (:class:`TensorInfo`); counts agree with :func:`peftlab.summary` by construction;
* one forward pass on the meta device (batch 1, :data:`PROBE_TOKENS` tokens, train mode, costs
  no compute) records, through module hooks, the *sites* where autograd keeps tensors for the
  backward pass: the input of every linear layer whose weight trains (grouped by the tensor they
  share, so ``q/k/v`` count once, and an adapter that casts its input to its own dtype counts its
  copy), normalisation inputs, activation functions, dropout masks, and every
  ``scaled_dot_product_attention`` call with its real query/key shapes.

The closed forms in :mod:`peftlab.estimate.formulas` turn these sites into bytes for any batch and
sequence length.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from peftlab.core.errors import ConfigError
from peftlab.estimate.arch import Arch, ModelSource, arch_of

PROBE_TOKENS = 16
"""Sequence length of the meta-device probe forward (any length works; sizes are per token)."""

FULL = "full"
"""Name of the registered full fine-tuning method (``peftlab.methods.full``); kept for callers that
imported it from here. It is counted like every other method: attached, then listed."""

FUSED_NORMS = ("LayerNorm", "RMSNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d")
"""Norm classes computed by one kernel that keeps only its input (plus per-token statistics);
other ``*Norm`` modules (transformers' Python RMSNorm) keep an fp32 upcast of their input."""

ACT_SAVED = {"NewGELUActivation": 4, "FastGELUActivation": 4, "QuickGELUActivation": 2,
             "GELUActivation": 1, "GELUTanh": 1, "PytorchGELUTanh": 1, "SiLUActivation": 1, "SiLU": 1,
             "GELU": 1, "ReLU": 1, "Tanh": 1, "Sigmoid": 1, "Mish": 1}
"""Tensors of the activation's input size kept for backward, by class: 1 for a fused kernel,
more for Python formulas (``NewGELU`` keeps its input, ``tanh`` output and both product operands)."""


@dataclass(frozen=True)
class TensorInfo:
    """One parameter tensor (tied tensors once)."""

    key: str
    shape: tuple[int, ...]
    elem: int
    """Bytes per element as built (LoRA adapters of a half-precision base are fp32)."""
    floating: bool
    trainable: bool
    adapter: bool
    """Created by the method (not a base-model tensor)."""
    linear: bool
    """A base model's 2-D linear weight other than the output head: what 4-bit quantization stores
    in 4 bits when it is frozen (QLoRA), and what GaLore projects when it trains."""
    block: int | None = None
    """Transformer block the tensor belongs to (None: outside the blocks)."""
    stage: str = "head"
    """When its gradient appears in the backward pass, which runs in reverse order of the forward:
    ``"head"`` at the start (last used after the blocks: LM head, final norm, a tied embedding),
    ``"block"`` during its block's backward, ``"early"`` at the end (used only before the blocks:
    embeddings, soft prompts, prefix encoders). A tensor no module call shows counts as ``"head"``,
    the conservative choice (its gradient then lives through the whole backward)."""

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bytes(self) -> int:
        return self.numel * self.elem


@dataclass(frozen=True)
class Site:
    """A tensor autograd keeps for backward, per token (or per sequence) of the probe.

    ``bytes`` is per element: ``"act"`` means the activation dtype, ``"mask"`` a dropout mask (1 byte
    on CUDA, the activation dtype on CPU), an int a fixed size (an fp32 upcast, an adapter's copy).
    """

    block: int | None
    kind: str
    width: int
    count: float
    bytes: str | int
    per_token: bool
    label: str
    after: bool = False
    """Outside the blocks and after them (final norm, LM-head input): freed before the blocks'
    backward starts; ``False`` for sites before the blocks (embeddings), kept to the end."""


@dataclass(frozen=True)
class AttentionCall:
    """One ``scaled_dot_product_attention`` call of the probe."""

    block: int | None
    heads: int
    kv_heads: int
    """Key/value heads as passed (after ``repeat_kv`` when the model expands them)."""
    head_dim: int
    extra_keys: int
    """Key positions beyond the queries (prefix tokens)."""
    dropout: float
    masked: bool
    gqa: bool


@dataclass(frozen=True)
class Structure:
    """Saved-tensor sites of one forward, plus what the closed forms need besides them."""

    sites: tuple[Site, ...]
    attention: tuple[AttentionCall, ...]
    block_inputs: tuple[tuple[int, int], ...]
    """``(block, width)`` of every block input in the graph (what full recomputation keeps)."""
    blocks: int
    first_block: int | None
    """First block in the autograd graph (None: none is)."""
    extra_tokens: int
    """Positions the model added to each sequence (prompt tokens), seen in the probe."""
    gated: bool
    loss_vocab: int
    """Vocabulary of the per-token LM loss (0: no LM head, the loss is negligible)."""
    graph_linears: tuple[int, ...] = ()
    """Weight sizes (elements) of the linear layers run inside the graph (autocast casts them)."""
    max_linear: int = 0


@dataclass(frozen=True)
class Counts:
    """Everything counted from one attached meta model."""

    method: str
    options: dict[str, Any]
    method_obj: Any
    tensors: tuple[TensorInfo, ...]
    buffers_bytes: int
    total: int
    base: int
    trainable: int
    arch: Arch
    structure: Structure
    block_params: tuple[int, ...] = field(default=())
    """Bytes of each block's parameters (what ZeRO-3/FSDP gathers for one layer)."""
    quantized: tuple[tuple[str, int, int, int], ...] = field(default=())
    """Weights the attach itself quantized (QLoRA): (kind, weights, code bytes, constant bytes) per
    module, from the modules' ``quant_info()``; their buffers are not in ``buffers_bytes``."""
    optimizer_state: dict[str, tuple[int, int]] | None = None
    """State of the optimizer the method brings, from ``Method.optimizer_state_elements``:
    ``{trainable key: (elements in the state dtype, fixed bytes)}``; None: it brings none."""


_CACHE: dict[tuple, Counts] = {}
_LOCK = threading.Lock()


def count(source: ModelSource, method: str | Any, options: dict[str, Any] | None, dtype: torch.dtype) -> Counts:
    """Attach ``method`` to ``source`` built on the meta device and count (cached per arguments).

    Raises:
        ConfigError: The method does not apply to this model (e.g. BitFit on a model without
            biases); the message is the method's own, prefixed with the model name.
    """
    from peftlab.core.method import Method, get_method

    options = dict(options or {})
    if isinstance(method, Method):
        if options:
            raise ConfigError("pass options either inside the Method instance or with a method name, not both")
        name, method_obj = method.method_name, method
    else:
        name, method_obj = str(method), get_method(str(method), **options)
    key = (source, name, type(method_obj), method_obj.to_json(), str(dtype))
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key]
    counts = _count(source, name, method_obj, dtype)
    with _LOCK:
        _CACHE[key] = counts
    return counts


def _count(source: ModelSource, name: str, method_obj: Any, dtype: torch.dtype) -> Counts:
    import peftlab

    model = source.build_meta(dtype)
    try:
        peftlab.attach(model, method_obj)
    except ConfigError as e:
        raise type(e)(f"{name} on {source.name}: {e}") from e
    named = list(model.named_parameters(remove_duplicate=False))
    unique = {id(p): (k, p) for k, p in reversed(named)}
    params = sorted(unique.values(), key=lambda kp: kp[0])
    s = peftlab.summary(model)
    total, base, trainable = s.total, s.base, s.trainable
    base_keys = set(peftlab.adapters(model) and _base_keys(model))
    adapter_ids = {id(t) for k, t in peftlab.adapter_parameters(model, "default").items() if k not in base_keys}
    linear = _linear_weights(model)
    quantized = tuple((i.kind, i.numel, i.code_bytes, i.constant_bytes)
                      for i in (m.quant_info() for m in model.modules() if callable(getattr(m, "quant_info", None))))
    buffers = {id(b): b for b in model.buffers()}
    buffers_bytes = sum(b.numel() * b.element_size() for b in buffers.values()) - sum(q[2] + q[3] for q in quantized)
    arch = arch_of(model.config)
    blocks_path, blocks = _blocks(model, arch.layers)
    block_params = tuple(sum(p.numel() * p.element_size() for p in {id(q): q for q in b.parameters()}.values())
                         for b in blocks)
    structure, last_call, blocks_end = _probe(model, blocks_path, blocks, source.head, method_obj)
    placement = _placement(named, blocks_path, last_call, blocks_end)
    tensors = tuple(TensorInfo(k, tuple(p.shape), p.element_size(), p.is_floating_point(), p.requires_grad,
                               id(p) in adapter_ids, id(p) in linear and id(p) not in adapter_ids,
                               *placement[id(p)])
                    for k, p in params)
    opt_state = method_obj.optimizer_state_elements(model, "default")
    return Counts(name, method_obj.options(), method_obj, tensors, buffers_bytes,
                  total, base, trainable, arch, structure, block_params, quantized, opt_state)


def _placement(named: list[tuple[str, nn.Parameter]], blocks_path: str | None, last_call: dict[str, int],
               blocks_end: int | None) -> dict[int, tuple[int | None, str]]:
    """``{id(parameter): (block, stage)}`` (see :attr:`TensorInfo.stage`).

    A tensor under the blocks' ``ModuleList`` belongs to its block. Any other tensor is placed by
    the last forward call of a module holding it (under any of its names, so a tied embedding is
    placed by the LM head that reuses it): after the last block ends -> ``"head"``, before ->
    ``"early"``; no call seen -> ``"head"``.
    """
    prefix = f"{blocks_path}." if blocks_path else None
    out: dict[int, tuple[int | None, str]] = {}
    last: dict[int, int] = {}
    for key, p in named:
        if prefix and key.startswith(prefix):
            out.setdefault(id(p), (int(key[len(prefix):].split(".", 1)[0]), "block"))
        module = key.rsplit(".", 1)[0] if "." in key else ""
        # the innermost module holding the tensor that ran, else an enclosing one that did
        parts = module.split(".") if module else []
        for n in range(len(parts), -1, -1):
            call = last_call.get(".".join(parts[:n]))
            if call is not None:
                last[id(p)] = max(last.get(id(p), -1), call)
                break
    for key, p in named:
        if id(p) in out:
            continue
        call = last.get(id(p))
        early = call is not None and blocks_end is not None and call <= blocks_end
        out[id(p)] = (None, "early" if early else "head")
    return out


def _base_keys(model: nn.Module) -> list[str]:
    from peftlab.core import slots

    return [k for s in slots.registry(model).adapters.values() for k in s.base_keys]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or any(c.__name__ == "Conv1D" for c in type(m).__mro__)


def _linear_weights(model: nn.Module) -> set[int]:
    """Ids of the 2-D floating weights of linear layers other than the output head (bitsandbytes'
    ``Linear4bit`` replaces exactly these in QLoRA; GaLore projects the gradients of these)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = set()
    for m in model.modules():
        w = getattr(m, "weight", None)
        if _is_linear(m) and m is not head and isinstance(w, nn.Parameter) and w.dim() == 2 and w.is_floating_point():
            out.add(id(w))
    return out


def _blocks(model: nn.Module, layers: int) -> tuple[str | None, list[nn.Module]]:
    """The ``ModuleList`` of transformer blocks: the largest one with ``num_hidden_layers`` entries."""
    best: tuple[int, str | None, list[nn.Module]] = (-1, None, [])
    for path, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == layers:
            size = sum(p.numel() for p in m.parameters())
            if size > best[0]:
                best = (size, path, list(m))
    return best[1], best[2]


class _SDPA(TorchFunctionMode):
    """Records ``scaled_dot_product_attention`` calls (shapes, dropout, mask) during the probe."""

    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is torch.nn.functional.scaled_dot_product_attention:
            self.probe.on_sdpa(args, kwargs, out)
        elif func is torch.nn.functional.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            # A trainable weight no linear module call shows (a DyLoRA rank slice, a Kronecker
            # product, an adapter factor applied with F.linear inside its layer's forward): its
            # input is saved for the weight's gradient all the same.
            if isinstance(w, torch.Tensor) and w.requires_grad and id(w) not in self.probe.module_weights:
                self.probe.on_derived_linear(args[0], w)
        elif func in _ADDMMS and len(args) >= 3:
            # ``addmm(y, x, W)`` with a trainable 2-D ``W`` (VeRA's scaled B): ``x`` is kept, as for ``x @ W``.
            x, w = args[1], args[2]
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.requires_grad and w.dim() == 2
                    and x.dim() == 2 and x.shape[-1] == w.shape[0] and self.probe.tokens(x) >= PROBE_TOKENS
                    and id(w) not in self.probe.module_weights):  # GPT-2's Conv1D: its module call counted it
                self.probe.on_derived_linear(x, w.T)
        elif func in _MULS and len(args) >= 2:
            # ``x * v`` with ``v`` a trainable parameter (or a view of one) smaller than the activation
            # ``x`` ((IA)^3's scales, VeRA's lambda_d): autograd keeps ``x`` for ``v``'s gradient.
            for x, v in ((args[0], args[1]), (args[1], args[0])):
                if isinstance(x, torch.Tensor) and isinstance(v, torch.Tensor) and self.probe.scales(x, v):
                    self.probe.on_scaled(x, v)
                    break
        elif func in _ADDCMULS and len(args) >= 3:
            # ``y + x * v`` in one call (``addcmul``, VeRA's in-place add of its scaled update): as for ``x * v``.
            for x, v in ((args[1], args[2]), (args[2], args[1])):
                if isinstance(x, torch.Tensor) and isinstance(v, torch.Tensor) and self.probe.scales(x, v):
                    self.probe.on_scaled(x, v)
                    break
        elif func in _BMMS and len(args) >= 2:
            # ``bmm(X, W)`` with a trainable batch of square matrices ``W`` and ``X`` a view of an activation
            # (OFT's rotation blocks on an ``(r, N, b)`` view of a layer input): the activation is
            # kept for ``W``'s gradient, once however many products read it, at its own width.
            x, w = args[0], args[1]
            root = x._base if isinstance(x, torch.Tensor) and x._base is not None else x
            if (isinstance(root, torch.Tensor) and root is not x and isinstance(w, torch.Tensor) and w.requires_grad
                    and w.dim() == 3 and w.shape[-1] == w.shape[-2] and root.is_floating_point()
                    and root.dim() >= 2 and id(root) not in self.probe.model_tensors
                    and self.probe.tokens(root) >= PROBE_TOKENS):
                self.probe.on_derived_linear(root, w)
        elif func in _MATMULS and len(args) >= 2:
            # ``x @ W`` with a trainable 2-D ``W`` (FLoRA's factors and core, LoRA on embeddings):
            # the activation ``x`` is saved for ``W``'s gradient, as with a linear layer.
            x, w = args[0], args[1]
            if (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor) and w.requires_grad and w.dim() == 2
                    and x.dim() >= 2 and x.shape[-1] == w.shape[0] and self.probe.tokens(x) >= PROBE_TOKENS
                    and id(w) not in self.probe.module_weights):
                self.probe.on_derived_linear(x, w.T)
            elif self.probe.batched(x, w):
                # ``W @ X`` with a trainable 2-D ``W`` and a matrix ``X`` per position (LoKr's Kronecker
                # factors, ``W1 X W2^T`` per token): ``X`` is kept for ``W``'s gradient.
                self.probe.on_batched_product(w, x)
        return out


_MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.mm)
_ADDMMS = (torch.addmm, torch.Tensor.addmm)
_BMMS = (torch.bmm, torch.Tensor.bmm)
_ADDCMULS = (torch.addcmul, torch.Tensor.addcmul, torch.Tensor.addcmul_)
_MULS = (torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__)


@dataclass
class _Group:
    block: int | None
    width: int
    tokens: int
    elem: int
    dtype: torch.dtype
    call: int
    members: list[tuple[str, int, bool, int]] = field(default_factory=list)
    """``(path, out_features, weight trains, weight elements)``."""
    after_attention: bool = False


class _Probe:
    """Hooks for the meta forward; see the module docstring."""

    def __init__(self, model: nn.Module, blocks_path: str | None, blocks: list[nn.Module]) -> None:
        self.model = model
        self.calls = 0
        self.keep: list[torch.Tensor] = []
        self.groups: dict[int, _Group] = {}
        self.sites: list[tuple[int, Site]] = []
        self.attention: list[tuple[int, AttentionCall]] = []
        self.block_inputs: list[tuple[int, int, int]] = []
        self.block_ends: dict[int, int] = {}
        self.last_call: dict[str, int] = {}
        self.module_weights: set[int] = set()
        """Ids of the weights of linear modules whose calls the hooks recorded (not derived)."""
        """Module path -> number of its last call (when its parameters were last used)."""
        self.linears: list[tuple[int, int]] = []
        self.first_trainable: int | None = None
        self.block: int | None = None
        self.last_sdpa_block: int | None = None
        self.dtype = next(model.parameters()).dtype
        self.block_of: dict[str, int] = {}
        prefix = f"{blocks_path}." if blocks_path else None
        for path, _ in model.named_modules():
            if prefix and path.startswith(prefix):
                self.block_of[path] = int(path[len(prefix):].split(".", 1)[0])
        self.model_tensors = {id(t) for t in [*model.parameters(), *model.buffers()]}
        """Parameters and buffers: never activations, whatever their shape."""
        self.norm_parameters = {id(p) for m in model.modules() if "Norm" in type(m).__name__
                                for p in m.parameters(recurse=False)}
        """A norm's trained weight keeps its input through :meth:`_norm` already."""
        self.handles = []
        index = {id(b): i for i, b in enumerate(blocks)}
        self.open_calls: dict[int, list[int]] = {}
        """Call numbers of the module calls not yet returned, per module (to date a post hook)."""
        for path, m in model.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._pre(path, m, index.get(id(m))), with_kwargs=True))
            self.handles.append(m.register_forward_hook(self._post))
            if id(m) in index:
                self.handles.append(m.register_forward_hook(self._leave_block))

    def close(self) -> None:
        for h in self.handles:
            h.remove()

    def _pre(self, path: str, m: nn.Module, block_index: int | None) -> Callable:  # noqa: C901
        trains_here = any(p.requires_grad for p in m.parameters(recurse=False)) or any(
            isinstance(c, (nn.ParameterDict, nn.ParameterList)) and any(p.requires_grad for p in c.parameters())
            for c in m.children())
        block = self.block_of.get(path)
        name = type(m).__name__
        norm = "Norm" in name and not list(m.children())
        linear = _is_linear(m)
        dropout = isinstance(m, nn.modules.dropout._DropoutNd)
        act = name in ACT_SAVED or type(m).__module__ in ("transformers.activations", "torch.nn.modules.activation")

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self.calls += 1
            call = self.calls
            self.last_call[path] = call
            self.open_calls.setdefault(id(module), []).append(call)
            # The graph starts at the first call that owns a trainable tensor or receives a tensor
            # that requires grad (a soft prompt in the embeddings, a prefix in a cache argument).
            if self.first_trainable is None and (trains_here or _needs_grad(args, kwargs)):
                self.first_trainable = call
            if block_index is not None:
                self.block = block_index
            x = _first_tensor(args, kwargs)
            if x is None or not x.is_floating_point() or x.dim() == 0:
                return
            if block_index is not None:
                self.block_inputs.append((call, block_index, x.shape[-1]))
            if linear:
                self._linear(path, module, x, block, call)
            elif norm:
                self._norm(path, module, x, block, call, name)
            elif dropout and module.training and getattr(module, "p", 0) > 0:
                self._site(call, block, "dropout", x, 1, "mask", f"{path} dropout mask")
            elif act and not dropout:
                saved = ACT_SAVED.get(name, 1)
                self._site(call, block, "activation", x, saved, "act", f"{path} ({name}) input")

        return hook

    def _post(self, module: nn.Module, args: tuple, out: Any) -> None:
        calls = self.open_calls.get(id(module))
        call = calls.pop() if calls else None
        # A module that uses its trainable tensors without calling a submodule (F.linear on a
        # slice, as DyLoRA does) shows only in its output: the graph starts at that call.
        if self.first_trainable is None and call is not None and _needs_grad((out,), {}):
            self.first_trainable = call

    def _leave_block(self, module: nn.Module, args: tuple, out: Any) -> None:
        if self.block is not None:
            self.block_ends[self.block] = self.calls
        self.block = None

    def tokens(self, x: torch.Tensor) -> int:
        """Token positions of an activation (every dimension but the last)."""
        return x.numel() // max(1, x.shape[-1])

    def _site(self, call: int, block: int | None, kind: str, x: torch.Tensor, count: float, nbytes: str | int,
              label: str) -> None:
        tokens = self.tokens(x)
        self.sites.append((call, Site(block, kind, int(x.shape[-1]), count, nbytes, tokens >= PROBE_TOKENS, label)))

    def on_derived_linear(self, x: torch.Tensor, w: torch.Tensor) -> None:
        """``F.linear(x, w)`` with a trainable ``w`` that is not a module's parameter (or ``x @ w.T``)."""
        if not x.is_floating_point() or x.dim() == 0:
            return
        self.calls += 1
        if self.first_trainable is None:
            self.first_trainable = self.calls
        self.keep.append(x)
        g = self.groups.get(id(x))
        if g is None:
            g = _Group(self.block, int(x.shape[-1]), self.tokens(x), x.element_size(), x.dtype, self.calls)
            self.groups[id(x)] = g
        g.members.append(("<derived weight>", int(w.shape[0]), True, w.numel()))

    def batched(self, w: torch.Tensor, x: torch.Tensor) -> bool:
        """Whether ``w @ x`` applies a trainable 2-D ``w`` to a matrix per position of an activation
        ``x`` (leading dimensions: the positions; at least three dimensions)."""
        return (isinstance(w, torch.Tensor) and isinstance(x, torch.Tensor) and w.requires_grad and w.dim() == 2
                and x.dim() >= 3 and x.is_floating_point() and x.shape[-2] == w.shape[1]
                and id(x if x._base is None else x._base) not in self.model_tensors
                and x.numel() // max(1, x.shape[-1] * x.shape[-2]) >= PROBE_TOKENS)

    def on_batched_product(self, x: torch.Tensor, w: torch.Tensor) -> None:
        """``w @ x`` (see :meth:`batched`): ``x`` is kept, grouped with every other view of the same
        tensor (so products reading one layer input count it once), as wide as a position's matrix."""
        root = x if x._base is None else x._base
        self.calls += 1
        if self.first_trainable is None:
            self.first_trainable = self.calls
        self.keep.append(root)
        positions = x.numel() // max(1, x.shape[-1] * x.shape[-2])
        g = self.groups.get(id(root))
        if g is None:
            g = _Group(self.block, x.shape[-1] * x.shape[-2], positions, x.element_size(), x.dtype, self.calls)
            self.groups[id(root)] = g
        g.members.append(("<batched product>", int(w.shape[0]), True, w.numel()))

    def scales(self, x: torch.Tensor, v: torch.Tensor) -> bool:
        """Whether ``x * v`` is an activation ``x`` scaled by a trainable parameter ``v`` (or a view
        of one) with fewer elements: a product that keeps ``x`` for ``v``'s gradient."""
        owner = v if v._base is None else v._base
        return (v.requires_grad and id(owner) in self.model_tensors and id(owner) not in self.norm_parameters
                and x.is_floating_point() and x.dim() >= 2 and v.numel() < x.numel()
                and id(x if x._base is None else x._base) not in self.model_tensors
                and self.tokens(x) >= PROBE_TOKENS)

    def on_scaled(self, x: torch.Tensor, v: torch.Tensor) -> None:
        """``x * v`` (see :meth:`scales`): ``x`` is kept, once however many products read it."""
        self.calls += 1
        if self.first_trainable is None:
            self.first_trainable = self.calls
        self.keep.append(x)
        g = self.groups.get(id(x))
        if g is None:
            g = _Group(self.block, int(x.shape[-1]), self.tokens(x), x.element_size(), x.dtype, self.calls)
            self.groups[id(x)] = g
        g.members.append(("<trained scale>", 0, True, v.numel()))

    def _linear(self, path: str, m: nn.Module, x: torch.Tensor, block: int | None, call: int) -> None:
        self.keep.append(x)
        self.module_weights.add(id(m.weight))
        g = self.groups.get(id(x))
        if g is None:
            g = _Group(block, int(x.shape[-1]), self.tokens(x), x.element_size(), x.dtype, call)
            g.after_attention = self.last_sdpa_block is not None and self.last_sdpa_block == block
            self.groups[id(x)] = g
        self.last_sdpa_block = None
        w = m.weight
        if isinstance(m, nn.Linear):  # from the module, not the weight: a quantized layer's weight is packed codes
            out_features, numel = m.out_features, m.in_features * m.out_features
        else:  # GPT-2 Conv1D stores (in, out)
            out_features, numel = w.shape[1], w.numel()
        g.members.append((path, int(out_features), bool(w.requires_grad), numel))
        self.linears.append((call, numel))

    def _norm(self, path: str, m: nn.Module, x: torch.Tensor, block: int | None, call: int, name: str) -> None:
        trains = any(p.requires_grad for p in m.parameters(recurse=False))
        fused = any(c.__name__ in FUSED_NORMS and c.__module__.startswith("torch.") for c in type(m).__mro__)
        if fused:
            self._site(call, block, "norm", x, 1, "act", f"{path} ({name}) input")
            self._site(call, block, "norm", x.new_empty(x.shape[:-1] + (2,)), 1, 4, f"{path} mean/rstd (fp32)")
        else:  # Python RMSNorm: x.to(float32) is kept by pow/mul; weight * normalised keeps the product input
            self._site(call, block, "norm", x, 1, 4, f"{path} ({name}) input upcast to fp32")
            if trains:
                self._site(call, block, "norm", x, 1, "act", f"{path} ({name}) normalised input (weight trains)")

    def on_sdpa(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        q, k = args[0], args[1]
        self.calls += 1
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        dropout = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
        self.attention.append((self.calls, AttentionCall(self.block, int(q.shape[-3]), int(k.shape[-3]),
                                                         int(q.shape[-1]), int(k.shape[-2] - q.shape[-2]),
                                                         float(dropout or 0.0), mask is not None,
                                                         bool(kwargs.get("enable_gqa", False)))))
        self.last_sdpa_block = self.block

    def structure(self, blocks: int, head: str) -> Structure:
        start = self.first_trainable

        def in_graph(call: int) -> bool:
            return start is not None and call >= start

        end = max(self.block_ends.values(), default=None)

        def after(call: int) -> bool:
            return end is not None and call > end

        sites = [replace(s, after=True) if s.block is None and after(c) else s for c, s in self.sites if in_graph(c)]
        act_widths = {s.width for _, s in self.sites if s.kind == "activation" and s.block is not None}
        gated = any(g.block is not None and sum(1 for m in g.members if m[1] in act_widths) >= 2
                    for g in self.groups.values())
        for g in sorted(self.groups.values(), key=lambda g: g.call):
            if not any(m[2] for m in g.members):
                continue  # a frozen linear needs only its weight to pass the gradient on
            nbytes: str | int = "act" if g.dtype == self.dtype else g.elem
            names = [p.rsplit(".", 1)[-1] for p, *_ in g.members]
            label = "input of " + ", ".join(dict.fromkeys(names))
            kind = "attention-output" if g.after_attention and nbytes == "act" else "linear-input"
            sites.append(Site(g.block, kind, g.width, 1, nbytes, g.tokens >= PROBE_TOKENS, label,
                              g.block is None and after(g.call)))
        if gated:
            for c, s in self.sites:
                if s.kind == "activation" and s.block is not None and in_graph(c):
                    sites.append(Site(s.block, "gate-product", s.width, 2, "act", s.per_token,
                                      "gated MLP: activation output and up projection, kept by their product"))
        attention = tuple(a for c, a in self.attention if in_graph(c))
        # A block is in the graph when anything in it runs after the first trainable tensor.
        spans: dict[int, tuple[int, int, int]] = {}
        for call, block, width in self.block_inputs:
            spans.setdefault(block, (call, self.block_ends.get(block, call), width))
        block_inputs = tuple((b, w) for b, (c0, c1, w) in sorted(spans.items()) if in_graph(c1))
        first_block = block_inputs[0][0] if block_inputs else None
        tokens = [g.tokens for g in self.groups.values() if g.block is not None]
        extra = max(tokens) - PROBE_TOKENS if tokens else 0
        vocab = 0
        if head == "causal-lm" and hasattr(self.model, "get_output_embeddings"):
            vocab = int(getattr(self.model.get_output_embeddings(), "out_features", 0) or 0)
        graph_linears = tuple(n for c, n in self.linears if in_graph(c))
        return Structure(tuple(sites), attention, block_inputs, blocks, first_block, max(0, extra), gated, vocab,
                         graph_linears, max((n for _, n in self.linears), default=0))


def _needs_grad(args: tuple, kwargs: dict) -> bool:
    """Whether a tensor among the arguments (or one level inside a tuple, list, dict, or a
    transformers output or cache object, a few levels deep) requires grad."""
    def tensors(v: Any, depth: int = 0) -> Iterable[torch.Tensor]:
        if isinstance(v, torch.Tensor):
            yield v
        elif depth < 4:
            if isinstance(v, dict):
                items: Iterable[Any] = v.values()
            elif isinstance(v, (tuple, list)):
                items = v
            elif hasattr(v, "__dict__") and not isinstance(v, nn.Module):
                items = vars(v).values()
            else:
                return
            for x in items:
                yield from tensors(x, depth + 1)

    return any(t.requires_grad for v in (*args, *kwargs.values()) for t in tensors(v))


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def _probe(model: nn.Module, blocks_path: str | None, blocks: list[nn.Module], head: str,
           method_obj: Any) -> tuple[Structure, dict[str, int], int | None]:
    """Run the meta forward with hooks; return the :class:`Structure`, the last call number of every
    module path, and the call number at which the last block ended (None: no block ran)."""
    probe = _Probe(model, blocks_path, blocks)
    model.train()
    ids = torch.ones(1, PROBE_TOKENS, dtype=torch.long, device="meta")
    try:
        with torch.enable_grad(), _SDPA(probe):
            model(input_ids=ids)
    except Exception as e:  # a model whose forward cannot run on meta tensors
        raise ConfigError(f"the meta-device probe forward of {type(model).__name__} failed ({type(e).__name__}: "
                          f"{e}); the estimator needs a model whose forward runs on the meta device") from e
    finally:
        probe.close()
    return probe.structure(len(blocks), head), dict(probe.last_call), max(probe.block_ends.values(), default=None)

