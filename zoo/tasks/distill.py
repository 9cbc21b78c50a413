"""Training against a frozen teacher, for any family: teacher, losses, per-phase freezing, model-owned loss terms.

A recipe's `loss.distill` mapping configures it (every key optional except `teacher`):

    teacher: deit_small_patch16_224     # any timm / zoo model name
    checkpoint: /path/teacher.pth       # local weights file, loaded through the model's checkpoint filter
    teacher_kwargs: {}                  # constructor overrides of the teacher
    cls_weight: 1.0                     # the task's own classification loss
    kl_weight: 0.5                      # KL(student || teacher) on logits, batchmean (DeiT / Sparsifiner)
    token_weight: 0.5                   # MSE between the final patch tokens of student and teacher
    attn_weight: 0.0                    # the model's own loss against the teacher's attention maps (below)
    temperature: 1.0                    # of the KL term
    trainable: ['*.mask_predictor.*']   # only parameters matching these globs train ...
    frozen: []                          # ... or these are frozen (applied after `trainable`)

Model-owned terms: a student that implements `TeacherAttentionStudent` (`set_attention_reconstruction`,
`teacher_attention_loss`) adds `attn_weight * model.teacher_attention_loss(teacher_maps)`, where the maps are the
teacher's softmax attention per block, recorded by `AttentionRecorder` from any attention module with timm's
layout (`qkv` Linear, `num_heads`, `scale`). The task never names the family.
"""
import fnmatch
import logging
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional, Protocol, Sequence, Tuple, runtime_checkable

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['DistillConfig', 'DistillLoss', 'TeacherAttentionStudent', 'AttentionRecorder', 'build_teacher',
           'kl_to_teacher', 'patch_token_mse', 'set_trainable']

_logger = logging.getLogger(__name__)


@dataclass
class DistillConfig:
    """The `loss.distill` mapping of a recipe (see the module docstring)."""
    teacher: str
    checkpoint: Optional[str] = None
    teacher_kwargs: Dict = field(default_factory=dict)
    cls_weight: float = 1.0
    kl_weight: float = 0.5
    token_weight: float = 0.5
    attn_weight: float = 0.0
    temperature: float = 1.0
    trainable: Optional[List[str]] = None
    frozen: List[str] = field(default_factory=list)

    @classmethod
    def from_dict(cls, values: Dict) -> 'DistillConfig':
        """Validated config; an unknown key is a ValueError naming it and the allowed keys."""
        allowed = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f'unknown key(s) {unknown} in loss.distill; allowed: {", ".join(allowed)}')
        if not values.get('teacher'):
            raise ValueError('loss.distill needs `teacher` (a timm / zoo model name)')
        return cls(**values)


@runtime_checkable
class TeacherAttentionStudent(Protocol):
    """A student that scores itself against a teacher's attention maps (e.g. Sparsifiner's predictors)."""

    def set_attention_reconstruction(self, enabled: bool = True) -> None:
        """Record what `teacher_attention_loss` needs during training-mode forwards (or stop doing so)."""

    def teacher_attention_loss(self, teacher_attention: Sequence[torch.Tensor]) -> torch.Tensor:
        """Loss of the last forward against the teacher's per-block (B, H, N, N) softmax attention."""


def build_teacher(name: str, checkpoint: Optional[str] = None, num_classes: Optional[int] = None,
                  **kwargs) -> nn.Module:
    """Frozen, eval-mode teacher: a timm / zoo model, with weights from a local file when given.

    The file goes through timm's pretrained-file path (the family's checkpoint filter, strict keys).
    """
    if num_classes is not None:
        kwargs['num_classes'] = num_classes
    if checkpoint:
        overlay = dict(file=str(checkpoint))
        if num_classes is not None:
            overlay['num_classes'] = num_classes
        kwargs.update(pretrained=True, pretrained_cfg_overlay=overlay)
    teacher = timm.create_model(name, **kwargs).eval()
    teacher.requires_grad_(False)
    return teacher


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.) -> torch.Tensor:
    """KL(teacher || student) of (B, classes) logits, both log-softmaxed, 'batchmean', times T^2 (official at T=1)."""
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, reduction='batchmean', log_target=True) * temperature ** 2


def patch_token_mse(student_tokens: torch.Tensor, teacher_tokens: torch.Tensor, num_prefix_tokens: int = 1
                    ) -> torch.Tensor:
    """Mean squared error between the (B, N, C) final tokens of student and teacher, prefix (cls) tokens left out."""
    if student_tokens.shape != teacher_tokens.shape:
        raise ValueError(f'student tokens {tuple(student_tokens.shape)} and teacher tokens '
                         f'{tuple(teacher_tokens.shape)} differ')
    return F.mse_loss(student_tokens[:, num_prefix_tokens:], teacher_tokens[:, num_prefix_tokens:].detach())


def set_trainable(model: nn.Module, trainable: Optional[Sequence[str]] = None, frozen: Sequence[str] = ()
                  ) -> List[str]:
    """Freeze by parameter-name globs: with `trainable`, only matching parameters train, without it those the model
    itself leaves trainable (a model freezes what no loss of its current mode reaches); then `frozen` ones stop.

    Returns the names that train. A pattern that matches no parameter is a ValueError (a typo would otherwise
    silently freeze or train the wrong part).
    """
    names = [name for name, _ in model.named_parameters()]
    for pattern in [*(trainable or []), *frozen]:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f'parameter pattern {pattern!r} matches no parameter of {type(model).__name__}')
    chosen = []
    for name, param in model.named_parameters():
        train = param.requires_grad if trainable is None else any(fnmatch.fnmatch(name, p) for p in trainable)
        train = train and not any(fnmatch.fnmatch(name, p) for p in frozen)
        param.requires_grad_(train)
        if train:
            chosen.append(name)
    if not chosen:
        raise ValueError('the trainable / frozen patterns leave no parameter to train')
    return chosen


def _has_attention_layout(module: nn.Module) -> bool:
    return isinstance(getattr(module, 'qkv', None), nn.Linear) and hasattr(module, 'num_heads') \
        and hasattr(module, 'scale')


class AttentionRecorder:
    """Records the softmax attention (B, H, N, N) of every timm-layout attention module of a model, in order.

    Recomputed from each module's input with its own qkv, q/k norms and scale (fused attention never forms it).
    Use as `with AttentionRecorder(teacher) as maps: teacher(x)`; `maps` then holds one tensor per block.
    """

    def __init__(self, model: nn.Module):
        self.modules = [m for m in model.modules() if _has_attention_layout(m)]
        if not self.modules:
            raise ValueError(f'{type(model).__name__} has no attention module with a qkv Linear, num_heads and '
                             f'scale to record')
        self.maps: List[torch.Tensor] = []
        self._hooks = []

    def _record(self, module: nn.Module, args: Tuple, output) -> None:
        x = args[0]
        batch, tokens, _ = x.shape
        q, k, _ = module.qkv(x).reshape(batch, tokens, 3, module.num_heads, -1).permute(2, 0, 3, 1, 4)
        q = getattr(module, 'q_norm', nn.Identity())(q)
        k = getattr(module, 'k_norm', nn.Identity())(k)
        self.maps.append(((q @ k.transpose(-2, -1)) * module.scale).softmax(dim=-1))

    def __enter__(self) -> List[torch.Tensor]:
        self.maps = []
        self._hooks = [m.register_forward_hook(self._record) for m in self.modules]
        return self.maps

    def __exit__(self, *exc) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


class DistillLoss(nn.Module):
    """cls_weight * task loss + kl_weight * KL + token_weight * token MSE + attn_weight * model's attention term.

    Holds the frozen teacher (kept in eval mode whatever `train()` is called with). Call as
    `loss, parts = distill(model, images, targets)`; `parts` has each weighted term, detached, for logging.
    """

    def __init__(self, config: DistillConfig, task_loss: Callable, num_classes: Optional[int] = None,
                 teacher: Optional[nn.Module] = None):
        super().__init__()
        self.config = config
        self.task_loss = task_loss
        self.teacher = teacher if teacher is not None else build_teacher(
            config.teacher, config.checkpoint, num_classes=num_classes, **config.teacher_kwargs)

    def train(self, mode: bool = True) -> 'DistillLoss':
        super().train(mode)
        self.teacher.eval()
        return self

    def prepare_student(self, model: nn.Module) -> List[str]:
        """Apply the phase's freezing and switch the model's attention term on or off; returns trainable names."""
        attention = self.config.attn_weight > 0
        if isinstance(model, TeacherAttentionStudent):
            model.set_attention_reconstruction(attention)
        elif attention:
            raise ValueError(f'loss.distill.attn_weight > 0 needs a model with teacher_attention_loss; '
                             f'{type(model).__name__} has none')
        names = set_trainable(model, self.config.trainable, self.config.frozen)
        _logger.info('distillation: %d of %d parameter tensors train', len(names), len(list(model.parameters())))
        return names

    def forward(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        c = self.config
        tokens = model.forward_features(images)
        logits = model.forward_head(tokens)
        with torch.no_grad():
            if c.attn_weight > 0:
                with AttentionRecorder(self.teacher) as teacher_maps:
                    teacher_tokens = self.teacher.forward_features(images)
            else:
                teacher_maps = []
                teacher_tokens = self.teacher.forward_features(images)
            teacher_logits = self.teacher.forward_head(teacher_tokens)
        parts = {}
        if c.cls_weight:
            parts['cls'] = c.cls_weight * self.task_loss(logits, targets)
        if c.kl_weight:
            parts['kl'] = c.kl_weight * kl_to_teacher(logits, teacher_logits, c.temperature)
        if c.token_weight:
            parts['token'] = c.token_weight * patch_token_mse(tokens, teacher_tokens,
                                                              getattr(model, 'num_prefix_tokens', 1))
        if c.attn_weight:
            parts['attn'] = c.attn_weight * model.teacher_attention_loss(teacher_maps)
        if not parts:
            raise ValueError('every loss.distill weight is 0: nothing to train')
        return sum(parts.values()), {k: v.detach() for k, v in parts.items()}

