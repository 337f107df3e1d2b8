"""AdamW with the reference's parameter groups, and warmup + linear decay."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from tasks.engine.config import OptimConfig


def parameter_groups(model: nn.Module, config: OptimConfig, heads: Iterable[str] = (),
                     text: Iterable[nn.Parameter] = ()) -> list[dict]:
    """AdamW parameter groups: weight decay on every weight except biases and LayerNorm parameters.

    Parameters are grouped by (lr, decay). With `config.head_lr` set, the top-level modules named in `heads` train
    at that lr; with `config.text_lr` set, the `text` parameters (a BERT-initialised text stream) train at that
    one. Groups come out in a fixed order: base, heads, text. Which modules are heads and which parameters are
    text is the task's to say (`Task.parameter_groups`).
    """
    no_decay = {id(p) for m in model.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()}
    heads = set(heads) if config.head_lr is not None else set()
    text = {id(p) for p in text} if config.text_lr is not None else set()
    lrs = {"base": config.lr, "head": config.head_lr, "text": config.text_lr}
    buckets: dict[tuple[str, bool], list[nn.Parameter]] = {(k, d): [] for k in lrs for d in (True, False)}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        kind = "head" if name.split(".", 1)[0] in heads else "text" if id(param) in text else "base"
        buckets[(kind, not (name.endswith("bias") or id(param) in no_decay))].append(param)
    return [
        {"params": params, "weight_decay": config.weight_decay if decays else 0.0, "lr": lrs[kind]}
        for (kind, decays), params in buckets.items()
        if kind == "base" or params
    ]


def build_optimizer(groups: list[dict], config: OptimConfig, fused: bool = False) -> torch.optim.AdamW:
    """AdamW over `groups` (`parameter_groups`) with the config's betas and eps."""
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, **({"fused": True} if fused else {})
    )


def warmup_steps_for(config: OptimConfig, total_steps: int) -> int:
    return int(config.warmup) if config.warmup >= 1 else int(round(config.warmup * total_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps to the base lr, then linear decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total - step) / max(1, total - warmup))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

