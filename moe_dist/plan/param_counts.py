"""Parameter counts from ``ModelConfig`` alone: no model is built and torch is not imported, so
they work for the 18B preset and inside ``moe-plan``. The one place the architecture's sizes are
written down outside ``moe_dist.model``; ``tests/unit/test_param_counts.py`` holds them equal to
``sum(p.numel())`` of built models.

Legend: d d_model, f d_ff, E experts, L layers, kvd = kv_heads x head_dim, c matrices per expert
(swiglu 3: gate, up, down; silu_mlp 2: up, down). No biases anywhere; a tied head counts once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    """Parameters by role."""

    embedding: int
    lm_head: int          # 0 when tied
    attention: int        # wq, wk, wv (or the fused wqkv), wo of all layers
    norms: int            # two RMSNorms per layer + the final one
    router: int
    experts: int          # routed experts (split by expert parallelism)
    shared_expert: int
    active_experts: int   # routed-expert parameters one token uses: top_k experts per layer
    tensors: tuple        # ((numel, how many), ...): every weight is its own module (bias-free Linear, norm)

    @property
    def total(self) -> int:
        return self.embedding + self.lm_head + self.attention + self.norms + self.router + self.experts + \
            self.shared_expert

    @property
    def non_expert(self) -> int:
        return self.total - self.experts

    @property
    def active(self) -> int:
        """Per token: everything but the routed experts, plus ``top_k`` of them per layer
        (embedding and head counted in full, the usual convention)."""
        return self.non_expert + self.active_experts

    @property
    def largest_module(self) -> int:
        """The largest parameter: the staging buffer of a sharded build, and about what ZeRO-3 gathers at
        once (a layer's stacked experts, or the embedding)."""
        return max(numel for numel, _ in self.tensors)

    def persistent(self, threshold: float) -> int:
        """Params ZeRO-3 keeps whole on every GPU (numel below stage3_param_persistence_threshold)."""
        return sum(numel * k for numel, k in self.tensors if numel < threshold)

    def muon(self, optimizer: str) -> tuple[int, int]:
        """(non-expert, expert) parameters Muon trains: every 2-D matrix but the embedding and
        the output head (``optim.uses_muon``, DeepSpeed's rule); AdamW takes the rest."""
        if optimizer != "muon":
            return 0, 0
        return self.attention + self.shared_expert + self.router, self.experts


def count_params(m: ModelConfig) -> ParamCounts:
    d, f, e, L, kvd = m.d_model, m.d_ff, m.num_experts, m.n_layers, m.kv_heads * m.head_dim
    qd = m.n_heads * m.head_dim  # = d
    c = 3 if m.expert_type == "swiglu" else 2
    expert = c * d * f
    emb = m.vocab_size * d
    # As the model holds them: each routed expert matrix stacked over the E experts, (E, F, D) per layer.
    # Attention: wqkv (rows [Q | K | V]) and wo with fused_qkv, else wq, wo (d x qd) and wk, wv (d x kvd).
    attn = ((d * (qd + 2 * kvd), L), (d * qd, L)) if m.fused_qkv else ((d * qd, 2 * L), (d * kvd, 2 * L))
    tensors = ((emb, 1 if m.tie_embeddings else 2), (d, 2 * L + 1), (e * d, L), *attn,
               (e * d * f, c * L), (d * f, c * L * int(m.shared_expert)))
    return ParamCounts(
        embedding=emb, lm_head=0 if m.tie_embeddings else emb, attention=L * (2 * d * qd + 2 * d * kvd),
        norms=(2 * L + 1) * d, router=L * e * d, experts=L * e * expert,
        shared_expert=L * expert if m.shared_expert else 0, active_experts=L * m.top_k * expert, tensors=tensors)
