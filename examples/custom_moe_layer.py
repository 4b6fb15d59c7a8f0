"""A training backend's own MoE layers, built on moelora's functional and routing ops.

    python examples/custom_moe_layer.py --steps 60

A backend that owns its modules (its own parameter layout, sharding or fusion) calls the
ops directly instead of injecting :class:`moelora.MoELoRALinear`:

- ``moelora.route(logits, k)``: top-k ids and gate weights, plus per-expert assignment
  counts, summed probabilities and the logsumexp per token: everything the Switch
  load-balancing loss and the router z-loss need, in one pass, differentiable in the logits.
- ``moelora.moe_lora(x, A, B, ids, weights, scaling=, base_out=)``: the fused MoE-LoRA
  delta (Triton kernels on GPU), differentiable in x, A, B, the weights and base_out.
- ``moelora.dispatch_metadata`` / ``dispatch`` / ``combine``: tokens sorted by expert (with
  ``block_size``, each expert's rows padded to whole blocks, so blocks can be multiplied
  by their expert's weights without reading counts on the host), and the weighted sum back
  to token order. Both directions are differentiable.
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import moelora


def router_aux_loss(routed: moelora.RouteResult, num_tokens: int, lb_coef: float = 0.01,
                    z_coef: float = 0.001) -> torch.Tensor:
    """Switch load balancing E * sum_e f_e P_e (f from counts, P from prob_sums) + router z-loss."""
    num_experts = routed.counts.shape[0]
    fraction = routed.counts.float() / num_tokens  # slots per token routed to e (no gradient)
    mean_prob = routed.prob_sums.float() / num_tokens  # mean router probability of e (gradient)
    load_balancing = num_experts * torch.sum(fraction * mean_prob)
    return lb_coef * load_balancing + z_coef * routed.lse.float().square().mean()


class MoELoRAProjection(nn.Module):
    """A frozen linear layer plus E LoRA experts chosen per token by the layer's own router."""

    def __init__(self, d_in: int, d_out: int, num_experts: int = 4, top_k: int = 2, r: int = 4, alpha: float = 8):
        super().__init__()
        self.base = nn.Linear(d_in, d_out).requires_grad_(False)
        self.router = nn.Parameter(torch.randn(num_experts, d_in) / math.sqrt(d_in))
        self.lora_a = nn.Parameter(torch.randn(num_experts, r, d_in) / math.sqrt(d_in))
        self.lora_b = nn.Parameter(torch.zeros(num_experts, d_out, r))
        self.top_k, self.scaling = top_k, alpha / r
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        logits = F.linear(tokens.float(), self.router)  # fp32 router logits
        routed = moelora.route(logits, self.top_k, mode="softmax_topk", renormalize=True)
        self.aux_loss = router_aux_loss(routed, tokens.shape[0])
        out = moelora.moe_lora(tokens, self.lora_a, self.lora_b, routed.ids, routed.weights.to(x.dtype),
                               scaling=self.scaling, base_out=self.base(tokens))
        return out.reshape(*x.shape[:-1], -1)


class DispatchedExpertFFN(nn.Module):
    """A mixture of E two-layer FFN experts: tokens dispatched to expert-sorted blocks, each
    block multiplied by its expert's weights (a batched matmul standing in for a backend's
    grouped GEMM), and combined back with the gate weights."""

    def __init__(self, d_model: int, d_hidden: int, num_experts: int = 4, top_k: int = 2, block_size: int = 8):
        super().__init__()
        self.router = nn.Parameter(torch.randn(num_experts, d_model) / math.sqrt(d_model))
        self.w_in = nn.Parameter(torch.randn(num_experts, d_hidden, d_model) / math.sqrt(d_model))
        self.w_out = nn.Parameter(torch.randn(num_experts, d_model, d_hidden) / math.sqrt(d_hidden))
        self.top_k, self.block_size = top_k, block_size
        self.aux_loss = torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        routed = moelora.route(F.linear(tokens.float(), self.router), self.top_k, mode="topk_softmax")
        self.aux_loss = router_aux_loss(routed, tokens.shape[0])
        meta = moelora.dispatch_metadata(routed.ids, self.w_in.shape[0], block_size=self.block_size)
        blocks = moelora.dispatch(tokens, meta).view(-1, self.block_size, tokens.shape[-1])
        expert = meta.block_expert.clamp(min=0).long()  # unused blocks (-1) compute rows nobody reads
        hidden = F.gelu(torch.bmm(blocks, self.w_in[expert].transpose(1, 2)))
        rows = torch.bmm(hidden, self.w_out[expert].transpose(1, 2)).reshape(-1, tokens.shape[-1])
        out = moelora.combine(rows, meta, routed.weights.to(x.dtype))
        return out.reshape(x.shape)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The same mixture token by token (for checking)."""
        tokens = x.reshape(-1, x.shape[-1])
        routed = moelora.route(F.linear(tokens.float(), self.router), self.top_k, mode="topk_softmax")
        out = torch.zeros_like(tokens)
        for t in range(tokens.shape[0]):
            for j in range(self.top_k):
                e = int(routed.ids[t, j])
                expert_out = self.w_out[e] @ F.gelu(self.w_in[e] @ tokens[t])
                out[t] = out[t] + routed.weights[t, j].to(x.dtype) * expert_out
        return out.reshape(x.shape)


class TinyMoEModel(nn.Module):
    def __init__(self, d_model: int = 16):
        super().__init__()
        self.proj = MoELoRAProjection(d_model, d_model)
        self.ffn = DispatchedExpertFFN(d_model, 2 * d_model)
        self.head = nn.Linear(d_model, 1)

    def forward(self, x):
        h = self.proj(x)
        return self.head(h + self.ffn(h)).squeeze(-1)

    def aux_loss(self):
        return self.proj.aux_loss + self.ffn.aux_loss


def check_against_references(model: TinyMoEModel, x: torch.Tensor) -> None:
    """The route-based aux loss equals moelora's per-layer losses; the dispatched FFN equals
    its token-by-token form."""
    tokens = x.reshape(-1, x.shape[-1])
    logits = F.linear(tokens, model.proj.router)
    routed = moelora.route(logits, model.proj.top_k, mode="softmax_topk", renormalize=True)
    expected = (0.01 * moelora.load_balancing_loss(torch.softmax(logits, -1), routed.ids, logits.shape[-1])
                + 0.001 * moelora.router_z_loss(logits))
    torch.testing.assert_close(router_aux_loss(routed, tokens.shape[0]), expected)
    torch.testing.assert_close(model.ffn(x), model.ffn.reference(x), rtol=1e-5, atol=1e-5)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model = TinyMoEModel()
    x = torch.randn(4, 8, 16)
    target = torch.sin(x.sum(-1))
    check_against_references(model, x)

    initial = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    losses = []
    for _ in range(args.steps):
        loss = F.mse_loss(model(x), target) + model.aux_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    check_against_references(model, x)
    untrained = [name for name, p in model.named_parameters() if p.requires_grad and torch.equal(p, initial[name])]
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} over {args.steps} steps; untrained parameters: {untrained}")
    return {"losses": losses, "untrained": untrained}


if __name__ == "__main__":
    main()
