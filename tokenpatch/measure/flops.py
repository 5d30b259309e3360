"""MAC counting on fvcore, with the handles fvcore lacks, following the real token path.

fvcore counts one multiply-add as one "flop", which is what the token-reduction papers call
FLOPs. It silently counts ``aten::scaled_dot_product_attention`` as zero; here it is counted as
``B*H*Nq*Nk*(Dqk + Dv)`` MACs (``QK^T`` plus ``AV``). Token bookkeeping ops (gather, scatter,
topk, sort, ...) and elementwise ops are counted as zero *and listed* in the report, so nothing
is dropped silently.
"""

from __future__ import annotations

from contextlib import nullcontext
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..backends import find_backend
from ..core.runner import is_patched, trace
from .evaluate import eval_mode

Shape = Sequence[int]

# Counted as zero MACs and listed: token selection/movement and elementwise arithmetic (the
# papers count neither). Any other op fvcore has no handle for is listed the same way.
ZERO_MAC_OPS = (
    "aten::gather", "aten::scatter", "aten::scatter_", "aten::index", "aten::index_select",
    "aten::topk", "aten::sort", "aten::argsort",
    "aten::add", "aten::add_", "aten::sub", "aten::rsub", "aten::mul", "aten::mul_", "aten::div",
    "aten::gelu", "aten::silu", "aten::sigmoid", "aten::softmax", "aten::mean", "aten::sum",
    "aten::scatter_add", "aten::searchsorted", "aten::cumsum", "aten::log", "aten::clamp_min",
)


def _zero_mac_handle(op: str, seen: Counter) -> Callable[[list[Any], list[Any]], int]:
    def handle(inputs: list[Any], outputs: list[Any]) -> int:
        seen[op] += 1
        return 0

    return handle


def sdpa_mac_handle(inputs: list[Any], outputs: list[Any]) -> int:
    """fvcore handle for ``aten::scaled_dot_product_attention``: QK^T plus AV multiply-adds."""
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(t) for t in inputs[:3])
    *batch, nq, dqk = q
    nk, dv = k[-2], v[-1]
    heads = 1
    for d in batch:
        heads *= d
    return heads * nq * nk * (dqk + dv)


@dataclass(frozen=True)
class MacReport:
    """MACs of one forward pass.

    Attributes:
        total: MACs of the whole model for the given input.
        per_block: MACs of each transformer block, in order.
        tokens_per_block: tokens each block's MLP computed on (sample 0's count; counts are
            the same for every sample of the static methods).
        ignored_ops: op name -> number of calls counted as zero MACs.
    """

    total: int
    per_block: list[int]
    tokens_per_block: list[int]
    ignored_ops: dict[str, int] = field(default_factory=dict)

    @property
    def gmacs(self) -> float:
        """``total`` in units of 10^9."""
        return self.total / 1e9


def as_input(model: nn.Module, input_or_shape: Union[Tensor, Shape]) -> Tensor:
    """``input_or_shape`` itself, or seeded random data of that shape on the model's device and dtype."""
    if isinstance(input_or_shape, Tensor):
        return input_or_shape
    param = next(model.parameters())
    return torch.randn(*input_or_shape, generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)


def _block_names(model: nn.Module) -> list[str]:
    blocks = {id(b) for b in find_backend(model).blocks(model)}
    return [name for name, module in model.named_modules() if id(module) in blocks]


def mac_analysis(module: nn.Module, x: Tensor) -> tuple[Any, Counter]:
    """fvcore's analysis of ``module(x)`` with this module's handles: SDPA counted, token
    bookkeeping and elementwise ops counted as zero; and the counter those zero-MAC ops fill
    as the analysis runs. Any module works (no backend needed); call it under ``no_grad``.

    Returns:
        (``fvcore.nn.FlopCountAnalysis``, Counter of zero-MAC op names).
    """
    with warnings.catch_warnings():  # fvcore's import scripts a helper with torch.jit.script
        warnings.simplefilter("ignore", FutureWarning)
        from fvcore.nn import FlopCountAnalysis

    analysis = FlopCountAnalysis(module, x)
    analysis.set_op_handle("aten::scaled_dot_product_attention", sdpa_mac_handle)
    zero_ops: Counter = Counter()
    analysis.set_op_handle(**{op: _zero_mac_handle(op, zero_ops) for op in ZERO_MAC_OPS})
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    return analysis, zero_ops


@torch.no_grad()
def count_macs(model: nn.Module, input_or_shape: Optional[Union[Tensor, Shape]] = None) -> MacReport:
    """Count the MACs of one eval-mode forward of ``model`` (patched or not).

    The count follows the data-dependent path actually taken (top-k sizes at the current keep
    ratio). The model is put in eval mode for the count and restored afterwards.

    Args:
        model: a supported ViT, patched or not.
        input_or_shape: an input batch, or its shape (random data of that shape is used); None:
            one image of the model's own input size.

    Returns:
        A :class:`MacReport`.
    """
    if input_or_shape is None:
        input_or_shape = (1, 3, *find_backend(model).input_size(model))
    x = as_input(model, input_or_shape)
    with eval_mode(model), (trace(model) if is_patched(model) else nullcontext()) as recorded:
        analysis, zero_ops = mac_analysis(model, x)
        total = analysis.total()
        by_module = analysis.by_module()
        ignored = zero_ops + analysis.unsupported_ops()
    names = _block_names(model)
    tokens = recorded.tokens_per_block if recorded is not None else [_sequence_length(model, x)] * len(names)
    return MacReport(
        total=int(total),
        per_block=[int(by_module.get(n, 0)) for n in names],
        tokens_per_block=list(tokens),
        ignored_ops={op: n for op, n in sorted(ignored.items())},
    )


def _sequence_length(model: nn.Module, x: Tensor) -> int:
    """Tokens entering the first block of an unpatched model for input ``x``."""
    first_block = find_backend(model).blocks(model)[0]
    captured: list[int] = []
    handle = first_block.register_forward_pre_hook(lambda _m, args: captured.append(args[0].shape[1]))
    try:
        model(x[:1])
    finally:
        handle.remove()
    return captured[0]
