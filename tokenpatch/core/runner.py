"""Installing and removing the patched forwards, and running a pass through them.

A patched model keeps its class, modules, parameters and buffers. Only instance attributes
are added: each block's ``forward`` becomes a ``functools.partial`` routing through the
method (picklable, deep-copyable and traceable by ``torch.export``), the model's ``forward`` gains input checks, and ``_tokenpatch`` holds the shared
:class:`PatchContext`. Removing them restores the class forwards exactly. A method with
trainable parts (e.g. DynamicViT's predictors) adds them as one submodule named ``tokenpatch``,
so they appear in ``state_dict`` under the ``tokenpatch.`` prefix; ``unpatch`` removes it.

Forward wrappers installed before patching: a module whose ``forward`` was wrapped the way
Hugging Face accelerate does it (the wrapper in ``forward``, the wrapped forward in
``_old_forward``: device placement and offload hooks) keeps its wrapper; the patch replaces
``_old_forward`` and ``unpatch`` puts the original back. Any other instance-level ``forward`` is
refused with an error naming the module: the patch could not run inside it.

Dense outputs: a caller that reads block outputs (``forward_features``, timm's
``forward_intermediates``, a transformers ``last_hidden_state`` or ``hidden_states``) gets the
full token grid, every original token in its order (:meth:`Method.restore_grid`), while the
blocks after it go on with the reduced tokens. The backend says which block outputs a model
call returns (:meth:`Backend.returned_blocks`); a call that returns only the head's output
restores nothing, so the head sees the method's own tokens. ``outputs="reduced"`` returns the
reduced tokens everywhere instead, with their positions in :func:`output_positions`.

Re-entrancy: nothing on the model changes during a forward. The options live in an immutable
:class:`Settings` snapshot that a configuration change replaces whole; a pass takes the
snapshot when it starts and keeps its own :class:`~tokenpatch.core.state.PassState`, in
thread-local storage, so one patched model serves many threads. ``trace``, per-thread option
overrides, training signals and the training pass's outputs for the losses are per thread too.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .. import __version__
from ..errors import InvalidOptionError, NotPatchedError, TokenPatchError, UnsupportedModelError
from .blocks import Backend, ModelFacts
from .method import Method, MethodConfig
from .pieces import padded_block
from .records import Trace
from .sidecar import write_sidecar
from .state import PassState

CONTEXT_ATTR = "_tokenpatch"
INDEX_ATTR = "_tokenpatch_index"
SAVED_ATTR = "_tokenpatch_saved_forward"
MODULES_NAME = "tokenpatch"
#: where accelerate-style hooks keep the forward they wrap
WRAPPED_FORWARD = "_old_forward"
#: what block outputs dense-output callers get: every original token, or the reduced tokens
OUTPUTS = ("full", "reduced")


@dataclasses.dataclass(frozen=True)
class Settings:
    """One consistent configuration: the method's options and the per-block plan derived from them."""

    config: MethodConfig
    plan: tuple[Optional[float], ...]


def build_config(method: Method, keep_ratio: Optional[float], options: dict[str, Any]) -> MethodConfig:
    """``method``'s options dataclass from keyword options (validated later, against a depth).

    Raises:
        InvalidOptionError: an option the method does not have.
    """
    fields = {f.name for f in dataclasses.fields(method.config_class)}
    unknown = sorted(set(options) - fields)
    if unknown:
        valid = ", ".join(sorted(fields - {"keep_ratio"})) or "none"
        raise InvalidOptionError(f"unknown option(s) {unknown} for method {method.name!r}; valid options: {valid}")
    if keep_ratio is not None:
        options = {**options, "keep_ratio": keep_ratio}
    return method.config_class(**options)


class PatchContext:
    """What a patched model and its blocks share: backend, method, settings, per-thread pass data.

    Attributes:
        modules: the method's trainable modules (registered on the model), or None.
    """

    def __init__(self, backend: Backend, method: Method, config: MethodConfig, facts: ModelFacts,
                 outputs: str = "full") -> None:
        if outputs not in OUTPUTS:
            raise InvalidOptionError(f"outputs must be one of {', '.join(OUTPUTS)}, got {outputs!r}")
        self.outputs = outputs
        self.backend = backend
        self.facts = facts
        self.method = method
        self.num_prefix = facts.num_prefix
        self.depth = facts.depth
        self.modules: Optional[nn.Module] = None  # set by patch() once the options are validated
        self.local = threading.local()
        self.settings = self.settle(config)

    # Pickling and deepcopy carry the configuration, never a thread's pass data.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "local"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.local = threading.local()

    @property
    def config(self) -> MethodConfig:
        """The options passes started now use (this thread's override, if any)."""
        return self.current_settings().config

    def settle(self, config: MethodConfig) -> Settings:
        """Validate ``config`` for this model and derive its plan (the context is unchanged)."""
        config.validate(self.depth)
        config.check_model(self.facts)
        self.method.check_compatible(config, self.facts)
        return Settings(config, tuple(self.method.schedule(config, self.depth)))

    def set_config(self, config: MethodConfig) -> None:
        """Validate and adopt ``config`` for passes that start after this call (atomic)."""
        self.settings = self.settle(config)

    def with_options(self, base: MethodConfig, options: dict[str, Any]) -> MethodConfig:
        """A copy of ``base`` with ``options`` changed (not validated yet)."""
        fixed = sorted(set(options) & self.method.structural_options)
        if fixed:
            raise InvalidOptionError(
                f"option(s) {fixed} of {self.method.name!r} are fixed at patch time; re-patch to change them")
        return build_config(self.method, None, {**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)},
                                                 **options})

    def config_dict(self) -> dict[str, Any]:
        """``{"method": name, "options": {...}}`` of the model's settings (JSON-ready)."""
        return {"method": self.method.name, "options": self.settings.config.to_dict()}

    def current_settings(self) -> Settings:
        """The settings a pass started now in this thread uses."""
        return getattr(self.local, "override", None) or self.settings

    def begin_pass(self, x: Tensor) -> PassState:
        """This thread's new pass, whose first block receives (B, N, C) ``x``."""
        settings = self.current_settings()
        state = PassState.start(x, self.num_prefix, self.depth, settings.config, settings.plan,
                                self.method.start_pass(settings.config), getattr(self.local, "trace", None),
                                self.modules, getattr(self.local, "collect", frozenset()), self.grid_from(),
                                self.facts.class_token)
        self.local.state = state
        return state

    def grid_from(self) -> int:
        """The first block whose output the current call reads as the full grid (``depth``: none)."""
        if self.outputs == "reduced":
            return self.depth
        returned = getattr(self.local, "returned", "last")  # blocks called directly: the last output is read
        return {"head": self.depth, "last": self.depth - 1, "all": 0}[returned]

    def end_pass(self, state: PassState, training: bool) -> None:
        """Release a finished pass; a training pass leaves its outputs for the losses."""
        if training:
            self.local.aux = state.aux
        if getattr(self.local, "state", None) is state:
            self.local.state = None

    def run_block(self, block: nn.Module, index: int, x: Tensor, extra: dict[str, Any]) -> Tensor:
        """Forward of block ``index`` on (B, N, C) tokens (and the block's ``extra`` arguments)
        under this thread's pass."""
        if x.shape[0] == 0:  # an empty batch has no tokens to choose from: the block's own (empty) output
            return self.backend.run_original(original_forward(block), x, extra)
        state = getattr(self.local, "state", None)
        if index == 0 or state is None:  # every pass enters through block 0
            state = self.begin_pass(x)
        elif state.grid_tokens is not None:  # the previous block returned the full grid
            x = state.from_grid(x)
        ratio = state.plan[index]
        if ratio is None or ratio >= 1.0:
            out = self.untouched_block(block, x, extra, state)
            state.record(index, x.shape[1], out.shape[1])
        else:
            out = self.method.reduce_block(self.backend.view(block, extra), x, state, index, ratio, state.config)
        if index >= state.grid_from:
            grid = self.method.restore_grid(out, state)
            state.grid_tokens = None if grid is out else out
            out = grid
        if self.outputs == "reduced":
            self.local.output_positions = state.grid_positions(out.shape[1])
        if index == self.depth - 1:
            self.end_pass(state, block.training)
        return out

    def untouched_block(self, block: nn.Module, x: Tensor, extra: dict[str, Any], state: PassState) -> Tensor:
        """A block the schedule leaves alone: its own forward, or, once tokens left and its
        attention depends on where tokens sit, the same block from pieces at their positions."""
        if x.shape[1] != state.num_tokens:
            view = self.backend.view(block, extra)
            if view.uses_positions:
                return padded_block(view, x, state)
        return self.backend.run_original(original_forward(block), x, extra)


def context_of(model: nn.Module) -> PatchContext:
    """The model's :class:`PatchContext`, or :class:`NotPatchedError`."""
    ctx = model.__dict__.get(CONTEXT_ATTR) if isinstance(model, nn.Module) else None
    if ctx is None:
        raise NotPatchedError(f"{type(model).__name__} is not patched; call tokenpatch.patch(model, ...) first")
    return ctx


def is_patched(model: nn.Module) -> bool:
    """True if ``model`` carries a tokenpatch patch."""
    return isinstance(model, nn.Module) and CONTEXT_ATTR in model.__dict__


def _block_forward(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    ctx: PatchContext = block.__dict__[CONTEXT_ATTR]
    x, extra = ctx.backend.block_input(args, dict(kwargs))
    return ctx.backend.block_output(block, ctx.run_block(block, block.__dict__[INDEX_ATTR], x, extra))


def _model_forward(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    ctx: PatchContext = model.__dict__[CONTEXT_ATTR]
    ctx.local.aux = {}
    with _model_call(model, ctx, args, kwargs, ctx.backend.returned_blocks(model, kwargs)):
        return original_forward(model)(*args, **kwargs)


def _all_blocks_call(model: nn.Module, name: str, *args: Any, **kwargs: Any) -> Any:
    """A model method that returns every block's output (timm's ``forward_intermediates``)."""
    ctx: PatchContext = model.__dict__[CONTEXT_ATTR]
    with _model_call(model, ctx, args, kwargs, "all"):
        return getattr(type(model), name)(model, *args, **kwargs)


@contextmanager
def _model_call(model: nn.Module, ctx: PatchContext, args: tuple[Any, ...], kwargs: dict[str, Any],
                returned: str) -> Iterator[None]:
    """Check a model-level call and run it as a fresh pass whose caller reads ``returned`` block outputs."""
    ctx.backend.check_input(model, args, kwargs)
    if torch.is_grad_enabled() and ctx.backend.gradient_checkpointing(model):
        raise TokenPatchError(
            "gradient checkpointing re-runs blocks during backward, which a patched model's per-pass token "
            f"state does not allow; {ctx.backend.disable_checkpointing_hint()}"
        )
    previous = getattr(ctx.local, "state", None), getattr(ctx.local, "returned", "last")
    # a fresh pass, even if a block-level pass of this thread was left open
    ctx.local.state, ctx.local.returned = None, returned
    try:
        yield
    finally:
        ctx.local.state, ctx.local.returned = previous


def original_forward(module: nn.Module) -> Any:
    """The forward the patch wraps: the class forward, or the one an accelerate-style hook wraps."""
    saved = module.__dict__.get(SAVED_ATTR)
    if saved is not None and WRAPPED_FORWARD in module.__dict__:
        return saved
    return type(module).forward.__get__(module)


def _slot(module: nn.Module, where: str, name: str) -> str:
    """The attribute the patched ``name`` goes in: itself, or ``_old_forward`` for a hooked forward."""
    if name == "forward" and WRAPPED_FORWARD in module.__dict__:
        return WRAPPED_FORWARD
    if name in module.__dict__:
        raise UnsupportedModelError(
            f"{where} ({type(module).__name__}) has an instance-level {name} wrapper installed before patching; "
            "tokenpatch can't run inside it: patch first and wrap afterwards, or remove the wrapper "
            f"(accelerate-style hooks that keep the wrapped forward in {WRAPPED_FORWARD} are supported)"
        )
    return name


def _install_forward(module: nn.Module, forward: Callable[..., Any], where: str, name: str = "forward",
                     *extra: Any) -> None:
    """Put ``forward`` bound to ``module`` (and ``extra``) in the slot of method ``name``: a
    ``functools.partial`` of a module-level function, which pickles, deep-copies and traces
    (``torch.export`` reads its ``func``)."""
    slot = _slot(module, where, name)
    if slot == WRAPPED_FORWARD:
        module.__dict__[SAVED_ATTR] = module.__dict__[WRAPPED_FORWARD]
    module.__dict__[slot] = functools.partial(forward, module, *extra)


def _saving_call(model: nn.Module, name: str, save_directory: Any, *args: Any, **kwargs: Any) -> Any:
    """A patched model's ``save_pretrained``: the model's own weights as the class saves them (the
    method's modules left out, so a plain ``from_pretrained`` loads the unpatched model cleanly),
    then the tokenpatch config and the modules' weights beside them (:mod:`tokenpatch.core.sidecar`)."""
    ctx: PatchContext = model.__dict__[CONTEXT_ATTR]
    state = kwargs.pop("state_dict", None)
    state = model.state_dict() if state is None else state
    prefix = f"{MODULES_NAME}."
    own = {k: v for k, v in state.items() if not k.startswith(prefix)}
    result = getattr(type(model), name)(model, save_directory, *args, state_dict=own, **kwargs)
    if kwargs.get("is_main_process", True):
        write_sidecar(save_directory, {**ctx.config_dict(), "tokenpatch_version": __version__},
                      {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
    return result


def _is_ours(forward: Any) -> bool:
    return isinstance(forward, functools.partial) and forward.func in (_block_forward, _model_forward, _all_blocks_call,
                                                                       _saving_call)


def _remove_forward(module: nn.Module) -> None:
    if SAVED_ATTR in module.__dict__:
        module.__dict__[WRAPPED_FORWARD] = module.__dict__.pop(SAVED_ATTR)
    for name in [k for k, v in module.__dict__.items() if _is_ours(v)]:
        del module.__dict__[name]
    module.__dict__.pop(CONTEXT_ATTR, None)
    module.__dict__.pop(INDEX_ATTR, None)


def install(model: nn.Module, ctx: PatchContext) -> None:
    """Attach ``ctx`` and the patched forwards to ``model`` and its blocks (all or nothing)."""
    try:
        for index, block in enumerate(ctx.backend.blocks(model)):
            _install_forward(block, _block_forward, f"block {index}")
            block.__dict__[CONTEXT_ATTR] = ctx
            block.__dict__[INDEX_ATTR] = index
        if ctx.modules is not None:
            if MODULES_NAME in model._modules:
                raise TokenPatchError(f"{type(model).__name__} already has a submodule named {MODULES_NAME!r}")
            model.add_module(MODULES_NAME, ctx.modules)
        _install_forward(model, _model_forward, "the model")
        for name in ctx.backend.all_block_outputs(model):
            _install_forward(model, _all_blocks_call, "the model", name, name)
        for name in ctx.backend.saving_methods(model):
            _install_forward(model, _saving_call, "the model", name, name)
        model.__dict__[CONTEXT_ATTR] = ctx
    except Exception:
        uninstall(model, ctx.backend, ctx.modules)
        raise


def uninstall(model: nn.Module, backend: Backend, modules: Optional[nn.Module]) -> None:
    """Remove everything :func:`install` added (attributes, the method's modules); safe on a partly patched model."""
    for module in [*backend.blocks(model), model]:
        _remove_forward(module)
    if modules is not None and model._modules.get(MODULES_NAME) is modules:
        del model._modules[MODULES_NAME]


def remove_patch(model: nn.Module) -> None:
    """Restore a patched model's original forwards and drop the method's modules.

    Raises:
        NotPatchedError: if the model is not patched.
    """
    ctx = context_of(model)
    uninstall(model, ctx.backend, ctx.modules)


def reconfigure(model: nn.Module, **options: Any) -> None:
    """Change a patched model's options for the passes that start after this call (atomic).

    Raises:
        NotPatchedError: the model is not patched.
        InvalidOptionError: an unknown, fixed or out-of-range option (nothing changes).
    """
    ctx = context_of(model)
    ctx.set_config(ctx.with_options(ctx.settings.config, options))


@contextmanager
def overriding(model: nn.Module, **options: Any) -> Iterator[MethodConfig]:
    """Run this thread's passes with ``options`` changed while the context is open.

    Other threads keep the model's own options; the override is built from the options set
    when the context opens. Yields the overriding config.
    """
    ctx = context_of(model)
    settings = ctx.settle(ctx.with_options(ctx.current_settings().config, options))
    previous = getattr(ctx.local, "override", None)
    ctx.local.override = settings
    try:
        yield settings.config
    finally:
        ctx.local.override = previous


@contextmanager
def trace(model: nn.Module) -> Iterator[Trace]:
    """Record per-block token counts and positions of a patched model's passes in this thread.

    The :class:`~tokenpatch.core.records.Trace` holds the most recent pass made inside the
    context by the thread that opened it; passes of other threads are not recorded.

    Raises:
        NotPatchedError: if ``model`` is not patched.
    """
    ctx = context_of(model)
    recorder = Trace()
    previous = getattr(ctx.local, "trace", None)
    ctx.local.trace = recorder
    try:
        yield recorder
    finally:
        ctx.local.trace = previous


@contextmanager
def collecting(model: nn.Module, signals: frozenset[str]) -> Iterator[None]:
    """Ask the method to produce extra training signals in this thread's passes while open."""
    ctx = context_of(model)
    previous = getattr(ctx.local, "collect", frozenset())
    ctx.local.collect = previous | frozenset(signals)
    try:
        yield
    finally:
        ctx.local.collect = previous


def output_positions(model: nn.Module) -> Tensor:
    """Where the tokens a block returned last in this thread came from, for ``outputs="reduced"``.

    Returns:
        (B, N') original position of each token of the last block output of this thread's latest
        pass (0 is the first prefix token); -1 for a token that is no single original token
        (EViT's fused token, the padding of a padded batch).

    Raises:
        NotPatchedError: the model is not patched.
        TokenPatchError: the model returns the full grid (``outputs="full"``: the positions
            are simply ``0..N-1``) or this thread has run no pass yet.
    """
    ctx = context_of(model)
    if ctx.outputs != "reduced":
        raise TokenPatchError('output_positions needs a model patched with outputs="reduced"; with outputs="full" '
                              "every block output a caller reads is the full grid, in the original order")
    positions = getattr(ctx.local, "output_positions", None)
    if positions is None:
        raise TokenPatchError("output_positions: this thread has not run the patched model yet")
    return positions


def last_training_outputs(model: nn.Module, name: str, wanted_by: str) -> list:
    """What this thread's last training-mode pass left under ``name`` for a loss.

    Raises:
        TokenPatchError: the pass left none (not a training pass, or a method that makes none).
    """
    ctx = context_of(model)
    values = getattr(ctx.local, "aux", {}).get(name)
    if not values:
        raise TokenPatchError(
            f"{wanted_by} found no {name!r} inputs from the last forward pass of this {ctx.method.name!r} model; "
            f"it needs a training-mode pass (model.train()) of a method that produces them"
        )
    return values
