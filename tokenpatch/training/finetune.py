"""Short fine-tuning of a patched model by self-distillation from its unpatched weights.

The teacher is a frozen copy of the model's weights as they were before fine-tuning, run
unpatched. It must be a copy: the same weights at ``keep_ratio=1.0`` would move with the
student, and the two can then agree on anything (measured on the real DeiT-Tiny: top-1 fell
from 72.0 to 11.6 % while the loss went to 0.02; see docs/guides/finetune.md). The student is the patched model in train
mode. Labels are optional: with none, the loss is the distillation term alone. The method's own
losses join with the weights its options give them (``Method.training_losses``: e.g.
DynamicViT's ratio loss with ``ratio_weight``, IdleViT's token-cut loss with ``cut_weight``,
IA-RED²'s REINFORCE loss priced by ``kept_penalty``); set them with the method's options.
The defaults (:class:`FinetuneConfig`) are a measured recipe, the same for every method: mixup of
the training images (teacher and student see the same blend, so a small folder gives new inputs
every step) and AdamW with warm-up and cosine decay over ``steps`` or over a time budget
(``minutes``), changed every step or held through each epoch (``lr_epoch_steps``, as DeiT's loop
steps timm's scheduler). A moving average of the weights (timm's ``ModelEmaV3``) can be kept beside
the model (``ema``). Also available: a feature loss on the head's input (``feature_weight``), the
embedding and the blocks before the first reducing block frozen (``freeze_prefix``, faster steps)
and a frozen backbone (``train_backbone=False``). Options a method asks to change per step (SaiT's
dense steps) are applied for that step only. The loop times its phases (data, teacher, student);
the last history record has their images/s.

Under ``torchrun`` (``torch.distributed`` initialised), the model is wrapped in
``DistributedDataParallel`` for the steps; give each process its own shard of the data.
"""

from __future__ import annotations

import copy
import itertools
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..backends import find_backend
from ..core.distributed import in_process_group, is_main_process
from ..core.runner import collecting, context_of, overriding, remove_patch
from ..errors import InvalidOptionError, TokenPatchError
from ..measure.allocator import trimming
from ..measure.evaluate import eval_mode, logits_of
from ..measure.runtime import AMP_DTYPES
from .loop import Budget, LoopTimes
from .losses import DistillationLoss, FeatureDistillationLoss, TokenDistillationLoss
from .state import Position, load_state, save_state, set_rng_state


@contextmanager
def unpatched_behaviour(model: nn.Module) -> Iterator[nn.Module]:
    """Run a patched model as its unpatched self (keep ratio 1.0, eval mode, no grad), then restore.

    The keep ratio is overridden for this thread's passes only.
    """
    with overriding(model, keep_ratio=1.0), eval_mode(model), torch.no_grad():
        yield model


def frozen_teacher(model: nn.Module) -> nn.Module:
    """A frozen, unpatched copy of a patched ``model``'s current weights, in eval mode."""
    teacher = copy.deepcopy(model)
    remove_patch(teacher)
    return teacher.eval().requires_grad_(False)


@dataclass
class FinetuneConfig:
    """Options of :func:`finetune`. The defaults are the measured recipe (docs/benchmarks/finetune-defaults.md).

    Attributes:
        steps: optimisation steps (ignored when ``minutes`` is set).
        minutes: train for this long instead of a number of steps: the learning-rate schedule
            follows the share of the time spent, and the loop stops at the first step boundary
            past the budget (None: use ``steps``). Under ``torchrun`` every process stops at the
            same step.
        lr: peak AdamW learning rate (cosine decay to ``lr * min_lr_ratio`` after warm-up).
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up steps.
        clip_norm: gradient-norm clip (None: off).
        temperature: distillation temperature.
        label_weight: weight of cross-entropy on labels when a batch has them (0: distillation
            only; needs ``mixup=0``).
        eval_every: run the evaluation callback every this many steps (0: only at the end).
        module_lr: learning rate of the method's own new modules (DynamicViT's predictors),
            which start from scratch and need a larger one than the pretrained weights.
        feature_weight: weight of :class:`~tokenpatch.training.losses.FeatureDistillationLoss`
            on the features the classifier reads (any method; 0: off).
        train_backbone: False trains only the method's own modules (e.g. ``iared2``'s
            interpreters) and leaves the pretrained weights as they are.
        freeze_prefix: keep the embedding and the blocks before the method's first reducing
            block as they are. They compute exactly what the teacher computes, and no gradient
            has to flow back through them on all the tokens, so each step is faster (1.3x for
            ``idle`` on DeiT-Tiny), but in the same time training every weight won back more
            (docs/benchmarks/finetune-defaults.md), so it is off by default.
        mixup: alpha of mixup on the training images (0: off). Each batch is blended with a
            shuffled copy of itself by a Beta(alpha, alpha) weight, and teacher and student see
            the same blend, so a small folder yields new inputs every step (Beyer et al.,
            CVPR 2022: "a good teacher is patient and consistent"). Distillation only: no labels.
        accum_steps: batches whose gradients add up before each optimisation step (a step on
            ``accum_steps`` x the batch size, to float tolerance; mixup blends within a batch).
        amp: ``"bf16"`` or ``"fp16"``: the teacher's and the student's forward passes under
            autocast (fp16 with a grad scaler); the weights and the optimizer stay in fp32.
        save_every: write the resumable training state (:mod:`tokenpatch.training.state`) to
            ``state_path`` every this many steps (0: never).
        state_path: the training state file (written atomically; by rank 0 under torchrun).
        distill_weight: weight of the distillation of the teacher's logits (0: labels only).
        feature_normalize: the feature loss compares L2-normalised features (IdleViT's form).
        cutmix: alpha of CutMix for labelled batches (timm's ``Mixup``, which also mixes the
            labels into soft targets; with ``mixup`` it switches between the two per batch).
            Labelled batches with ``label_weight > 0`` are mixed this way (``mixup`` and
            ``cutmix``); unlabelled ones by the blend described under ``mixup``.
        label_smoothing: smoothing of the labels' cross-entropy (of the soft targets when mixed).
        decay_every_weight: False applies no weight decay to biases, norm weights and the
            model's ``no_weight_decay()`` tensors (timm's position embedding and class token),
            as timm's optimizer factory and the papers' code do.
        freeze_tokens: keep the model's ``no_weight_decay()`` tensors (timm's position embedding
            and class token) as they are (IdleViT leaves them out of its optimizer).
        token_distill_weight: weight of :class:`~tokenpatch.training.losses.TokenDistillationLoss`
            on the final patch tokens the student kept (DynamicViT's token distillation; methods
            that mask tokens in training, on timm models; 0: off).
        lr_epoch_steps: hold the learning rate through epochs of this many steps, as the loop of
            DeiT's ``main.py`` (which IdleViT and EViT train with) does: it calls timm's
            scheduler with the index of the epoch just finished, so epoch ``e`` trains at the
            cosine's value at the start of epoch ``max(e - 1, 0)``, warm-up included (None: a new
            value every step). Needs a number of steps, not ``minutes``.
    """

    steps: int = 200
    minutes: Optional[float] = None
    lr: float = 5e-5
    weight_decay: float = 0.05
    warmup_steps: int = 5
    min_lr_ratio: float = 0.1
    clip_norm: Optional[float] = 1.0
    temperature: float = 1.0
    label_weight: float = 0.0
    eval_every: int = 0
    module_lr: float = 1e-3
    feature_weight: float = 0.0
    train_backbone: bool = True
    freeze_prefix: bool = False
    mixup: float = 1.0
    accum_steps: int = 1
    amp: Optional[str] = None
    save_every: int = 0
    state_path: Optional[str] = None
    distill_weight: float = 1.0
    feature_normalize: bool = False
    cutmix: float = 0.0
    label_smoothing: float = 0.0
    decay_every_weight: bool = True
    freeze_tokens: bool = False
    token_distill_weight: float = 0.0
    lr_epoch_steps: Optional[int] = None


def scheduled_step(config: FinetuneConfig, step: int) -> int:
    """The 0-based step whose learning rate 0-based ``step`` trains at: itself, or with
    ``lr_epoch_steps`` the first step of the epoch before its own (see :class:`FinetuneConfig`)."""
    if config.lr_epoch_steps is None:
        return step
    return max(step // config.lr_epoch_steps - 1, 0) * config.lr_epoch_steps


def lr_factor(config: FinetuneConfig, step: int, progress: float) -> float:
    """Share of the peak learning rate at 0-based ``step``: linear warm-up over ``warmup_steps``, then
    cosine decay to ``min_lr_ratio`` as ``progress`` (share of the steps or of the time spent) goes 0 -> 1."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return config.min_lr_ratio + (1 - config.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _repeat(batches: Iterable[Any], position: Optional[Position] = None) -> Iterator[Any]:
    """Iterate ``batches`` again and again (re-iterating, unlike ``itertools.cycle``, holds no
    copies), from ``position`` (epoch, batches of it already read), which is kept up to date.

    A ``DataLoader`` whose sampler orders by epoch (``DistributedSampler``,
    :class:`~tokenpatch.training.sampling.EpochSampler`) is told each pass's epoch, so every epoch
    is shuffled anew, alike in every process; an ``EpochSampler`` also skips the batches already
    read without loading them (other iterables are read and the batches dropped).

    Raises:
        TokenPatchError: when a pass over ``batches`` yields nothing (empty, or a spent iterator).
    """
    position = position if position is not None else Position()
    sampler = getattr(batches, "sampler", None)
    for epoch in itertools.count(position.epoch):
        skip = position.batches if epoch == position.epoch else 0
        position.epoch, position.batches = epoch, skip
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        if skip and hasattr(sampler, "skip_next"):
            sampler.skip_next(skip * batches.batch_size)
            skip = 0
        iterator = itertools.islice(iter(batches), skip, None)
        empty = True
        for batch in trimming(iterator):
            empty = False
            position.batches += 1
            yield batch
        if empty and not position.batches:
            raise TokenPatchError("no training batches: the data is empty (or a one-shot iterator already spent)")


def mixed(images: Tensor, alpha: float) -> Tensor:
    """(B, 3, H, W) images blended with a shuffled copy of the batch by one Beta(alpha, alpha) weight."""
    weight = float(torch.distributions.Beta(alpha, alpha).sample())
    return weight * images + (1 - weight) * images[torch.randperm(images.shape[0], device=images.device)]


def _split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Optional[Tensor]]:
    """(images, labels or None where any is unknown) of a batch, on the model's ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True), None
    images, labels = batch[0], batch[1] if len(batch) > 1 else None
    known = isinstance(labels, Tensor) and (labels >= 0).all()
    return images.to(device, non_blocking=True), labels.to(device, non_blocking=True) if known else None


@contextmanager
def head_features(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the (B, C) features ``model``'s classifier reads: one tensor per forward pass in the context.

    Works on patched and unpatched timm and transformers classifiers (a forward pre-hook on the
    backend's ``head``).
    """
    captured: list[Tensor] = []
    handle = find_backend(model).head(model).register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


@contextmanager
def final_tokens(model: nn.Module) -> Iterator[list[Tensor]]:
    """Collect the (B, N, C) patch tokens out of ``model``'s final norm (the prefix tokens left
    out): one tensor per forward pass in the context. All N are there only where the pass keeps
    every token in place (a training-mode pass of a method that masks tokens, or the unpatched model).

    Raises:
        TokenPatchError: the model's family names no final norm (one line).
    """
    backend = find_backend(model)
    prefix = backend.num_prefix_tokens(model)
    captured: list[Tensor] = []
    handle = backend.final_norm(model).register_forward_hook(lambda _, args, out: captured.append(out[:, prefix:]))
    try:
        yield captured
    finally:
        handle.remove()


class Targets(NamedTuple):
    """A forward pass's outputs the losses compare: (B, classes) logits, and the (B, C) pooled
    features and (B, N, C) final patch tokens where a loss needs them (else None)."""

    logits: Tensor
    features: Optional[Tensor] = None
    tokens: Optional[Tensor] = None

    def float(self) -> "Targets":
        """The same in float32 (from an autocast pass)."""
        return Targets(*(t.float() if t is not None else None for t in self))


def _outputs(network: nn.Module, model: nn.Module, images: Tensor, features: bool, tokens: bool) -> Targets:
    """The :class:`Targets` of ``network`` (``model`` or a wrapper of it) on ``images``, with the
    pooled features and the final tokens ``model`` computed when asked."""
    with ExitStack() as stack:
        pooled = stack.enter_context(head_features(model)) if features else None
        normed = stack.enter_context(final_tokens(model)) if tokens else None
        logits = logits_of(model, network(images))
    return Targets(logits, pooled[0] if pooled else None, normed[0] if normed else None)


def teacher_targets(teacher: nn.Module, images: Tensor, config: FinetuneConfig) -> Targets:
    """The teacher's :class:`Targets` on ``images``: the features and tokens when ``config`` has their losses."""
    with torch.no_grad():
        return _outputs(teacher, teacher, images, config.feature_weight > 0, config.token_distill_weight > 0)


def student_loss(model: nn.Module, targets: Targets, images: Tensor, labels: Optional[Tensor],
                 config: FinetuneConfig, distill: DistillationLoss, network: Optional[nn.Module] = None) -> Tensor:
    """The student's loss against the teacher's ``targets`` (from :func:`teacher_targets`): distillation,
    plus weighted cross-entropy on labels, the feature and token losses and the method's own losses."""
    student = _outputs(network or model, model, images, targets.features is not None, targets.tokens is not None)
    task_loss = config.distill_weight * distill.per_sample(student.logits, targets.logits)
    if labels is not None and config.label_weight > 0:  # (B,) classes, or (B, classes) soft targets when mixed
        smoothing = config.label_smoothing if labels.ndim == 1 else 0.0  # soft targets come smoothed
        task_loss = task_loss + config.label_weight * F.cross_entropy(student.logits, labels, reduction="none",
                                                                      label_smoothing=smoothing)
    loss = task_loss.mean()
    if targets.features is not None:
        features = FeatureDistillationLoss(normalize=config.feature_normalize)
        loss = loss + config.feature_weight * features(student.features, targets.features)
    ctx = context_of(model)
    if targets.tokens is not None:
        kept = ctx.method.kept_token_mask(model)
        loss = loss + config.token_distill_weight * TokenDistillationLoss()(student.tokens, targets.tokens, kept)
    for weight, method_loss in ctx.method.training_losses(ctx.config):
        loss = loss + weight * method_loss(model, task_loss)
    return loss


def training_loss(model: nn.Module, teacher: nn.Module, images: Tensor, labels: Optional[Tensor],
                  config: FinetuneConfig, distill: DistillationLoss, network: Optional[nn.Module] = None) -> Tensor:
    """Distillation to the teacher, plus weighted cross-entropy on labels and the method losses.

    Args:
        network: what to run the forward through (a ``DistributedDataParallel`` wrapper of
            ``model``); None runs ``model``.
    """
    return student_loss(model, teacher_targets(teacher, images, config), images, labels, config, distill, network)


@contextmanager
def step_options(model: nn.Module, step: int) -> Iterator[None]:
    """Apply the method's per-step option overrides (e.g. SaiT's dense steps) for one step, in this thread."""
    ctx = context_of(model)
    with overriding(model, **ctx.method.training_overrides(ctx.config, step)):
        yield


def prefix_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of a patched model that run before its first reducing block: the embedding
    (every parameter registered before the blocks, as timm and transformers register them in
    forward order) and the blocks before the first one the method's plan reduces."""
    ctx = context_of(model)
    blocks = ctx.backend.blocks(model)
    first = next((i for i, ratio in enumerate(ctx.settings.plan) if ratio is not None), len(blocks))
    stop = {id(p) for block in blocks[first:] for p in block.parameters()}
    stop.update(id(p) for p in find_backend(model).head(model).parameters())
    before: list[nn.Parameter] = []
    for p in model.parameters():
        if id(p) in stop:
            break
        before.append(p)
    return before


def trained_parameters(model: nn.Module, config: FinetuneConfig) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(pretrained weights that ``config`` trains, the method's own modules' weights)."""
    modules = context_of(model).modules
    own = [p for p in modules.parameters() if p.requires_grad] if modules is not None else []
    if not config.train_backbone:
        return [], own
    skipped = {id(p) for p in own} | {id(p) for p in prefix_parameters(model) if config.freeze_prefix}
    skipped |= {id(p) for p in named_no_weight_decay(model) if config.freeze_tokens}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in skipped], own


def _parameter_groups(model: nn.Module, config: FinetuneConfig) -> list[dict[str, Any]]:
    """Pretrained weights at ``lr``; the method's new modules at ``module_lr``; each split into
    decayed and not decayed weights unless ``config.decay_every_weight``."""
    backbone, own = trained_parameters(model, config)
    exempt = {id(p) for p in no_decay_parameters(model)} if not config.decay_every_weight else set()
    groups = []
    for params, lr in ((backbone, config.lr), (own, config.module_lr)):
        for decayed in (True, False):
            chosen = [p for p in params if (id(p) not in exempt) == decayed]
            if chosen:
                groups.append({"params": chosen, "lr": lr, "weight_decay": config.weight_decay if decayed else 0.0})
    if not groups:
        raise TokenPatchError("nothing to train: train_backbone=False and the method has no modules of its own")
    return groups


def named_no_weight_decay(model: nn.Module) -> list[nn.Parameter]:
    """The parameters a timm model names in ``no_weight_decay()`` (position embedding, class and
    register tokens); none for a model without it."""
    names = model.no_weight_decay() if callable(getattr(model, "no_weight_decay", None)) else set()
    return [p for name, p in model.named_parameters() if name in names]


def no_decay_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters timm's optimizer factory exempts from weight decay: every 1-D tensor (biases,
    norm weights, layer scales) and the :func:`named_no_weight_decay` ones."""
    named = {id(p) for p in named_no_weight_decay(model)}
    return [p for p in model.parameters() if p.ndim <= 1 or id(p) in named]


@contextmanager
def training_only(model: nn.Module, trained: list[nn.Parameter]) -> Iterator[None]:
    """Stop gradients to every parameter of ``model`` not in ``trained`` while open."""
    keep = {id(p) for p in trained}
    stopped = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in stopped:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in stopped:
            p.requires_grad_(True)


def _distributed(model: nn.Module) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when running under torchrun, else ``model``."""
    if not in_process_group():
        return model
    device = next(model.parameters()).device
    return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def finetune(model: nn.Module, batches: Iterable[Any], config: FinetuneConfig = FinetuneConfig(),
             evaluate: Optional[Callable[[nn.Module], dict[str, float]]] = None,
             progress: bool = True, teacher: Optional[nn.Module] = None,
             resume: Optional[str] = None, ema: Optional[nn.Module] = None) -> list[dict[str, float]]:
    """Fine-tune a patched ``model`` in place by self-distillation.

    Args:
        model: a patched model (its unpatched self is the teacher).
        batches: an iterable of (B, 3, H, W) ``images`` or ``(images, labels)`` (labels < 0 mean
            "none"); it is cycled until ``config.steps`` steps (or ``config.minutes``) are done,
            ``config.accum_steps`` batches per step.
        config: optimisation options.
        evaluate: called with the model (in eval mode) every ``config.eval_every`` steps and at
            the end; its dict is added to the history (and its dict on ``ema.module``, with keys
            prefixed ``ema_``).
        progress: show a progress bar with loss and images/s.
        teacher: the model to distil from; None takes :func:`frozen_teacher` of ``model`` (before
            ``resume`` loads anything: pass the model as the first run started from).
        resume: a training state written by ``config.save_every`` to continue from (weights,
            optimizer, step, data position and random generators). Bit-identical to the
            uninterrupted run on the CPU when ``batches`` comes back the same way in every run
            (the job's :class:`~tokenpatch.training.sampling.EpochSampler` loader does).
        ema: a moving average of ``model``, updated after every optimisation step and saved in
            the training state: timm's ``ModelEmaV3(model, decay=...)`` made before the call (any
            module with ``update(model)`` and the averaged model as ``module``).

    Returns:
        History: one dict per step of this run (``step``, ``loss``, ``lr`` and the evaluation's
        keys); the last one also has the loop's throughput by phase (:meth:`LoopTimes.rates`:
        ``data_img_s``, ``teacher_img_s``, ``student_img_s``, ``loop_img_s``) and ``seconds``.
    """
    check_loop_options(config)
    check_token_distillation(model, config)
    teacher = teacher if teacher is not None else frozen_teacher(model)
    groups = _parameter_groups(model, config)
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    device = next(model.parameters()).device
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    position = _resumed(resume, model, optimizer, scaler, config, ema)
    ctx = context_of(model)
    signals = ctx.method.training_signals(ctx.config)
    with collecting(model, signals), training_only(model, [p for g in groups for p in g["params"]]):
        network = _distributed(model)  # after freezing: DDP syncs the parameters that require grad
        step = _Step(model, network, teacher, config, optimizer, scaler, ema)
        history = _steps(step, batches, position, evaluate, progress)
    model.eval()
    return history


def check_loop_options(config: FinetuneConfig) -> None:
    """Refuse options the loop cannot run: accumulation, saving and autocast settings."""
    if not (isinstance(config.accum_steps, int) and config.accum_steps >= 1):
        raise InvalidOptionError(f"accum_steps must be a positive integer, got {config.accum_steps!r}")
    if not (isinstance(config.save_every, int) and config.save_every >= 0):
        raise InvalidOptionError(f"save_every must be a whole number of steps, got {config.save_every!r}")
    if config.save_every and not config.state_path:
        raise InvalidOptionError("save_every needs state_path, the file to write the training state to")
    if config.amp is not None and config.amp not in AMP_DTYPES:
        raise InvalidOptionError(f"amp must be one of {', '.join(AMP_DTYPES)} or None, got {config.amp!r}")
    if config.lr_epoch_steps is not None:
        if not (isinstance(config.lr_epoch_steps, int) and config.lr_epoch_steps >= 1):
            raise InvalidOptionError(f"lr_epoch_steps must be a positive integer, got {config.lr_epoch_steps!r}")
        if config.minutes is not None:
            raise InvalidOptionError(f"a learning rate held per epoch needs a number of steps, not minutes={config.minutes}")


def check_token_distillation(model: nn.Module, config: FinetuneConfig) -> None:
    """Refuse ``token_distill_weight`` for a method that keeps no token mask in training or a
    model whose final norm tokenpatch does not know, in one line, before anything is trained."""
    if config.token_distill_weight <= 0:
        return
    method = context_of(model).method
    if not method.masks_tokens_in_training:
        raise InvalidOptionError(f"token_distill_weight: {method.name} removes tokens in training, so its final tokens "
                                 "do not line up with the teacher's (methods that mask instead: dynamicvit)")
    find_backend(model).final_norm(model)


def _resumed(path: Optional[str], model: nn.Module, optimizer: torch.optim.Optimizer,
             scaler: Optional[torch.amp.GradScaler], config: FinetuneConfig, ema: Optional[nn.Module]) -> Position:
    """Load the state at ``path`` into the model, its moving average, optimizer, scaler and
    generators; its position (the start when there is no ``path``)."""
    if path is None:
        return Position()
    resumed = load_state(path, model, ema)
    if config.minutes is None and resumed.position.step >= config.steps:
        raise InvalidOptionError(f"--resume {path}: the run already did {resumed.position.step} of its "
                                 f"{config.steps} steps")
    optimizer.load_state_dict(resumed.optimizer)
    if scaler is not None and resumed.scaler is not None:
        scaler.load_state_dict(resumed.scaler)
    set_rng_state(resumed.rng)
    return resumed.position


class _Step:
    """One optimisation step: ``accum_steps`` micro-batches whose gradients add up (DDP syncs the
    last one only), under autocast when ``config.amp``, with fp16's grad scaler, then clipping,
    the optimizer and the moving average."""

    def __init__(self, model: nn.Module, network: nn.Module, teacher: nn.Module, config: FinetuneConfig,
                 optimizer: torch.optim.Optimizer, scaler: Optional[torch.amp.GradScaler],
                 ema: Optional[nn.Module] = None) -> None:
        self.model, self.network, self.teacher, self.config = model, network, teacher, config
        self.optimizer, self.scaler, self.ema = optimizer, scaler, ema
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.distill = DistillationLoss(config.temperature)
        self.device = next(model.parameters()).device
        self.mixer: Optional[Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]] = None

    def mix(self, images: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        """(images, labels) as the step trains on them: labelled batches (when labels count) mixed
        by timm's ``Mixup``/``CutMix`` into (B, classes) soft targets; unlabelled ones blended
        (:func:`mixed`) and left unlabelled."""
        config = self.config
        if labels is not None and config.label_weight > 0 and (config.mixup > 0 or config.cutmix > 0):
            if images.shape[0] % 2:
                raise TokenPatchError(f"mixing labelled images (timm's Mixup) needs an even batch size, got {images.shape[0]}")
            if self.mixer is None:
                from timm.data import Mixup

                classes = find_backend(self.model).head(self.model).out_features
                self.mixer = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix,
                                   label_smoothing=config.label_smoothing, num_classes=classes)
            return self.mixer(images, labels)
        if config.mixup > 0:
            return mixed(images, config.mixup), None
        return images, labels

    def autocast(self) -> ContextManager:
        """Autocast to ``config.amp`` on the model's device (nothing without it)."""
        if self.config.amp is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=AMP_DTYPES[self.config.amp])

    def targets(self, images: Tensor) -> Targets:
        """The teacher's targets on ``images`` (see :func:`teacher_targets`), in float32."""
        with self.autocast():
            return teacher_targets(self.teacher, images, self.config).float()

    def backward(self, step: int, targets: Targets, images: Tensor,
                 labels: Optional[Tensor], last: bool) -> float:
        """Add one micro-batch's gradients (its loss over ``accum_steps``); returns that share."""
        self.model.train()
        sync = last or not isinstance(self.network, nn.parallel.DistributedDataParallel)
        with step_options(self.model, step), (nullcontext() if sync else self.network.no_sync()):
            with self.autocast():
                loss = student_loss(self.model, targets, images, labels, self.config, self.distill, self.network)
            loss = loss.float() / self.config.accum_steps
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        return loss.item()

    def apply(self) -> None:
        """Clip the summed gradients, step the optimizer, clear the gradients and update the
        moving average."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)

    def evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """``evaluate`` on the model in eval mode, and on the moving average (keys ``ema_...``)."""
        self.model.eval()
        scores = evaluate(self.model)
        if self.ema is not None:
            scores.update({f"ema_{key}": value for key, value in evaluate(self.ema.module).items()})
        return scores


def _steps(step: _Step, batches: Iterable[Any], position: Position,
           evaluate: Optional[Callable[[nn.Module], dict[str, float]]], progress: bool) -> list[dict[str, float]]:
    """The optimisation loop of :func:`finetune` from ``position``; returns its history."""
    config, optimizer = step.config, step.optimizer
    peaks = [g.get("initial_lr", g["lr"]) for g in optimizer.param_groups]
    for group, peak in zip(optimizer.param_groups, peaks):
        group["initial_lr"] = peak  # kept in the optimizer's state, so a resumed run finds the peaks
    budget, times = Budget(config.steps, config.minutes, spent=position.seconds), LoopTimes()
    history: list[dict[str, float]] = []
    with budget.progress_bar(enabled=progress and is_main_process(), done=position.step) as bar:
        source = _repeat(batches, position)
        for number in itertools.count(position.step + 1):
            at = scheduled_step(config, number - 1)
            factor = lr_factor(config, at, budget.progress(at, config.warmup_steps))
            for group, peak in zip(optimizer.param_groups, peaks):
                group["lr"] = peak * factor
            loss = sum(_micro_step(step, number, source, times, last=k == config.accum_steps - 1)
                       for k in range(config.accum_steps))
            if not _finite_everywhere(loss, step.device):
                raise TokenPatchError(f"the loss became {loss} at step {number} (every process stops; nothing is "
                                      f"saved from this step on): lower the learning rate ({peaks[0] * factor:.3g} here)")
            with times.phase("student"):
                step.apply()
            done = budget.done(number)
            record = {"step": number, "loss": loss, "lr": peaks[0] * factor}
            if evaluate is not None and (done or (config.eval_every and number % config.eval_every == 0)) and is_main_process():
                record.update(step.evaluate(evaluate))
            history.append(record)
            if config.save_every and number % config.save_every == 0:
                position.step, position.seconds = number, budget.spent_so_far()
                save_state(config.state_path, step.model, optimizer, position, step.scaler, step.ema)
            budget.advance(bar, number, loss=f"{loss:.4f}", img_s=f"{times.rates().get('loop_img_s', 0.0):.1f}")
            if done:
                break
    if not all(bool(torch.isfinite(p).all()) for p in step.model.parameters()):  # the last update, whose loss no step saw
        raise TokenPatchError(f"the weights became non-finite in the last step ({number}): lower the learning rate "
                              f"({peaks[0] * factor:.3g} here); nothing is saved")
    history[-1].update(times.rates(), seconds=budget.elapsed())
    return history


def _finite_everywhere(loss: float, device: torch.device) -> bool:
    """True when this step's loss is finite in every process (all of them then stop together); a
    single process reads its own loss, with no device round trip."""
    if not in_process_group():
        return math.isfinite(loss)
    diverged = torch.tensor([0.0 if math.isfinite(loss) else 1.0], device=device)
    torch.distributed.all_reduce(diverged)
    return diverged.item() == 0.0


def _micro_step(step: _Step, number: int, source: Iterator[Any], times: LoopTimes, last: bool) -> float:
    """Read one batch, get the teacher's targets and add the student's gradients; the loss share."""
    with times.phase("data"):
        images, labels = step.mix(*_split_batch(next(source), step.device))
    with times.phase("teacher"):
        targets = step.targets(images)
    with times.phase("student"):
        loss = step.backward(number, targets, images, labels, last)
    times.images += images.shape[0]
    return loss
