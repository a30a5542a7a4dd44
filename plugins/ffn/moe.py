"""MoE: the HSA-UltraLong-MoE expert layer (Ling-2.0 style).

The first ``dense_layers`` blocks (and the chunk encoder) keep a dense SwiGLU; every later block has
``shared_experts`` always-on experts plus ``experts`` routed SwiGLU experts, of which each token uses
``active``. Router scores (sigmoid or softmax, fp32) pick the experts after adding a per-expert bias,
and the chosen experts' *unbiased* scores, normalised to sum to one, weight their outputs.

Balancing is auxiliary-loss-free (Wang et al. 2024): the bias is a buffer, never trained, and after
each optimizer step moves by ``bias_update_rate`` toward equal load (up for under-loaded experts, down
for over-loaded ones), with the load summed over all ranks so every rank keeps the same bias. An
auxiliary switch-style loss is available for ablations (``aux_loss_weight``).
"""
from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hsa_lightning.errors import ConfigError
from hsa_lightning.kernels.moe import routed_experts
from hsa_lightning.model.ffn import FFN, RoutedFFN, SwiGLUMLP, default_hidden, round_up


class MoE(FFN):
    def __init__(
        self,
        experts: int = 64,
        active: int = 4,
        expert_hidden: Optional[int] = None,
        shared_experts: int = 1,
        dense_layers: int = 1,
        dense_hidden: Optional[int] = None,
        score: Literal["sigmoid", "softmax"] = "sigmoid",
        bias_update_rate: float = 1e-3,
        aux_loss_weight: float = 0.0,
        capacity_factor: Optional[float] = None,
        multiple_of: int = 64,
    ):
        """
        Args:
            experts: routed experts per MoE layer (the paper: 64).
            active: routed experts per token (the paper: 4).
            expert_hidden: SwiGLU width of each expert; default half the dense width (the paper's choice).
            shared_experts: always-active experts (width ``expert_hidden`` each).
            dense_layers: leading blocks that keep a dense SwiGLU (Ling-2.0: 1).
            dense_hidden: width of those dense FFNs; default 8/3 d_model rounded to ``multiple_of``.
            score: router score function; the chosen experts' scores are renormalised either way.
            bias_update_rate: step of the loss-free balancing bias per optimizer step (0 disables it).
            aux_loss_weight: weight of the auxiliary load-balancing loss (0: none, the paper's setting).
            capacity_factor: if set, each expert takes at most ceil(factor * tokens * active / experts)
                tokens per forward; the rest are dropped (counted in the logs).
        """
        for name, value in (("experts", experts), ("active", active), ("multiple_of", multiple_of)):
            if value < 1:
                raise ConfigError(f"MoE {name}={value} must be >= 1")
        if active > experts:
            raise ConfigError(f"MoE active={active} must be <= experts={experts}")
        for name, value in (("shared_experts", shared_experts), ("dense_layers", dense_layers),
                            ("bias_update_rate", bias_update_rate), ("aux_loss_weight", aux_loss_weight)):
            if value < 0:
                raise ConfigError(f"MoE {name}={value} must be >= 0")
        if score not in ("sigmoid", "softmax"):
            raise ConfigError(f"MoE score={score!r} must be 'sigmoid' or 'softmax'")
        for name, value in (("expert_hidden", expert_hidden), ("dense_hidden", dense_hidden)):
            if value is not None and value < 1:
                raise ConfigError(f"MoE {name}={value} must be >= 1")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ConfigError(f"MoE capacity_factor={capacity_factor} must be > 0")
        self.experts, self.active, self.shared_experts = experts, active, shared_experts
        self.expert_hidden, self.dense_layers, self.dense_hidden = expert_hidden, dense_layers, dense_hidden
        self.score, self.bias_update_rate, self.aux_loss_weight = score, bias_update_rate, aux_loss_weight
        self.capacity_factor, self.multiple_of = capacity_factor, multiple_of

    def build(self, d_model: int, layer_index: int, init_std: float, out_std: float) -> nn.Module:
        dense = self.dense_hidden or default_hidden(d_model, self.multiple_of)
        if layer_index < self.dense_layers:  # includes the chunk encoder (-1)
            return SwiGLUMLP(d_model, dense, init_std, out_std)
        hidden = self.expert_hidden or round_up(dense // 2, self.multiple_of)
        return MoELayer(d_model, hidden, self, init_std, out_std)


class MoELayer(RoutedFFN):
    def __init__(self, d_model: int, hidden: int, spec: MoE, std: float, out_std: float):
        super().__init__()
        E = spec.experts
        self.spec, self.std, self.out_std = spec, std, out_std
        self.router = nn.Parameter(torch.empty(E, d_model))
        self.w_gate = nn.Parameter(torch.empty(E, d_model, hidden))
        self.w_up = nn.Parameter(torch.empty(E, d_model, hidden))
        self.w_down = nn.Parameter(torch.empty(E, hidden, d_model))
        self.shared = SwiGLUMLP(d_model, hidden * spec.shared_experts, std, out_std) if spec.shared_experts else None
        self.register_buffer("routing_bias", torch.zeros(E))  # persistent: resumes keep the balance
        self.register_buffer("load", torch.zeros(E), persistent=False)  # assignments since the last step
        self.register_buffer("dropped", torch.zeros(()), persistent=False)
        self._aux_loss: Optional[torch.Tensor] = None
        self.reset_parameters()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # the balancing state stays fp32 under .to(bfloat16): bf16 would swallow steps of 1e-3
        self.routing_bias.data = self.routing_bias.data.float()
        self.load.data, self.dropped.data = self.load.data.float(), self.dropped.data.float()
        return self

    def reset_parameters(self) -> None:
        for w in (self.router, self.w_gate, self.w_up):
            nn.init.normal_(w, std=self.std)
        nn.init.normal_(self.w_down, std=self.out_std)
        nn.init.zeros_(self.routing_bias)
        self.load.zero_()
        self.dropped.zero_()

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> (expert indices (N, k), normalised weights (N, k) fp32, scores (N, E) fp32)."""
        with torch.autocast(x.device.type, enabled=False):  # routing decisions in fp32 even under autocast
            logits = x.float() @ self.router.float().t()
        scores = torch.sigmoid(logits) if self.spec.score == "sigmoid" else torch.softmax(logits, dim=-1)
        indices = torch.topk(scores + self.routing_bias, self.spec.active, dim=-1).indices  # the bias only picks
        weights = torch.gather(scores, -1, indices)
        return indices, weights / weights.sum(-1, keepdim=True).clamp_min(1e-20), scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        N, E, k = x.shape[0], self.spec.experts, self.spec.active
        indices, weights, scores = self.route(x)
        capacity = None if self.spec.capacity_factor is None else -(-int(self.spec.capacity_factor * N * k) // E)
        out, counts, dropped = routed_experts(x, indices, weights, self.w_gate, self.w_up, self.w_down, capacity)
        if self.training:
            with torch.no_grad():  # activation-checkpoint recomputes count twice; balancing only uses ratios
                self.load += counts.float()
                self.dropped += dropped.float()
            if self.spec.aux_loss_weight > 0:  # switch-style: E * sum_e (share of assignments) * (mean score)
                share = counts.float() / (N * k)  # counts: assignments asked of each expert
                probs = scores / scores.sum(-1, keepdim=True)
                self._aux_loss = self.spec.aux_loss_weight * E * (share * probs.mean(0)).sum()
        if self.shared is not None:
            out = out + self.shared(x)
        return out.reshape(shape)

    # -- RoutedFFN ------------------------------------------------------------------------------
    def take_aux_loss(self) -> Optional[torch.Tensor]:
        loss, self._aux_loss = self._aux_loss, None
        return loss

    def routing_stats(self) -> dict[str, torch.Tensor]:
        load = self.load
        mean = load.mean().clamp_min(1e-20)
        stats = {"load_min": load.min() / mean, "load_max": load.max() / mean, "load_cv": load.std() / mean}
        if self.spec.capacity_factor is not None:
            stats["dropped"] = self.dropped / load.sum().clamp_min(1)  # load counts every assignment asked for
        return stats

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        load = self.load.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(load)  # every rank moves its bias by the same global signal
        if self.spec.bias_update_rate > 0 and load.sum() > 0:
            self.routing_bias += self.spec.bias_update_rate * torch.sign(load.mean() - load)
        self.load.zero_()
        self.dropped.zero_()

    def inactive_parameters(self) -> int:
        per_expert = (self.w_gate.numel() + self.w_up.numel() + self.w_down.numel()) // self.spec.experts
        return (self.spec.experts - self.spec.active) * per_expert
