"""A small decoder-only MoE whose experts differ in size: the model behind `moescope:tiny-varmoe`.

Qwen3-like blocks (RMSNorm, RoPE, grouped-query attention with q/k norms, SwiGLU experts), except
that expert `e` has its own intermediate size `expert_sizes[e]` (e.g. 4 large + 4 small). The router
of layer `i` is the plain `nn.Linear` at `model.layers.{i}.moe.router`: it returns logits, and the
block applies softmax -> top-k -> renormalise, so moescope captures it through the custom-router
path (see `moescope.models.default_custom_router`).

Registered with AutoConfig / AutoModelForCausalLM (model_type ``moescope_varmoe``) when
`moescope.models` is imported.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MoeCausalLMOutputWithPast


class VarMoeConfig(PreTrainedConfig):
    """Sizes of a VarMoe model; `expert_sizes` gives each expert's intermediate size."""

    model_type = "moescope_varmoe"

    def __init__(
        self,
        vocab_size: int = 8192,
        hidden_size: int = 128,
        num_hidden_layers: int = 4,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 32,
        expert_sizes: list[int] | tuple[int, ...] = (448, 448, 448, 448, 64, 64, 64, 64),
        num_experts_per_tok: int = 2,
        norm_topk_prob: bool = True,
        router_aux_loss_coef: float = 0.01,
        max_position_embeddings: int = 2048,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-6,
        initializer_range: float = 0.02,
        tie_word_embeddings: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.expert_sizes = [int(s) for s in expert_sizes]
        self.num_experts = len(self.expert_sizes)
        self.num_experts_per_tok = num_experts_per_tok
        self.norm_topk_prob = norm_topk_prob
        self.router_aux_loss_coef = router_aux_loss_coef
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: VarMoeConfig):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        # mask None: plain causal attention (the fast kernel); else a (B, 1, T, T) boolean mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class Expert(nn.Module):
    """SwiGLU MLP with its own intermediate size."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class VarMoeBlock(nn.Module):
    """Router (plain nn.Linear -> logits) and experts of different sizes."""

    def __init__(self, cfg: VarMoeConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.router = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(cfg.hidden_size, size) for size in cfg.expert_sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, H = x.shape
        flat = x.reshape(-1, H)  # (N, H)
        router_logits = self.router(flat)  # (N, E)
        router_probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        topk_weights, topk_ids = torch.topk(router_probs, self.top_k, dim=-1)  # (N, k)
        if self.norm_topk_prob:
            topk_weights = topk_weights / topk_weights.sum(dim=-1, keepdim=True)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(topk_ids == e)  # tokens that chose expert e, and in which slot
            if rows.numel():
                out.index_add_(0, rows, expert(flat[rows]) * topk_weights[rows, slot, None].to(flat.dtype))
        return out.view(B, T, H), router_logits


class DecoderLayer(nn.Module):
    def __init__(self, cfg: VarMoeConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.moe = VarMoeBlock(cfg)

    def forward(self, x, cos, sin, mask) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        moe_out, router_logits = self.moe(self.post_attention_layernorm(x))
        return x + moe_out, router_logits


class VarMoeModel(nn.Module):
    def __init__(self, cfg: VarMoeConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.head_dim, self.rope_theta = cfg.head_dim, cfg.rope_theta

    def rope_inv_freq(self, device: torch.device) -> torch.Tensor:
        """RoPE inverse frequencies, (hd/2,). Computed per call, never a buffer: `from_pretrained` builds the
        model on the meta device and leaves non-persistent buffers that `_init_weights` does not cover
        uninitialised (issue 12.6), so a buffer here made every load compute something different."""
        exponents = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32) / self.head_dim
        return 1.0 / self.rope_theta**exponents

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            mask = None  # causal
            positions = torch.arange(T, device=input_ids.device)[None]  # (1, T)
        else:
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()  # (T, T)
            keep = attention_mask.bool()  # (B, T); padding (left or right) is never attended to
            mask = causal[None] & keep[:, None, :] | torch.eye(T, dtype=torch.bool, device=keep.device)[None]
            mask = mask[:, None]  # (B, 1, T, T); the diagonal keeps padded rows finite
            positions = (keep.long().cumsum(-1) - 1).clamp(min=0)  # (B, T): real tokens count from 0
        freqs = positions[..., None].float() * self.rope_inv_freq(input_ids.device)  # (B|1, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B|1, 1, T, hd)
        x = self.embed_tokens(input_ids)  # (B, T, H)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        router_logits = []
        for layer in self.layers:
            x, logits = layer(x, cos, sin, mask)
            router_logits.append(logits)
        return self.norm(x), tuple(router_logits)


def load_balancing_loss(router_logits: tuple[torch.Tensor, ...], top_k: int, keep: torch.Tensor | None) -> torch.Tensor:
    """Switch-style auxiliary loss E * sum_e f_e * P_e per layer (f: chosen slots per token), averaged.

    Uniform routing gives `top_k`, as in transformers' `load_balancing_loss_func`.
    """
    losses = []
    for logits in router_logits:  # (N, E)
        probs = F.softmax(logits, dim=-1, dtype=torch.float32)
        chosen = F.one_hot(torch.topk(probs, top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()  # (N, E)
        if keep is not None:
            w = keep.reshape(-1, 1).float()
            f, p = (chosen * w).sum(0) / w.sum(), (probs * w).sum(0) / w.sum()
        else:
            f, p = chosen.mean(0), probs.mean(0)
        losses.append(probs.shape[-1] * (f * p).sum())
    return torch.stack(losses).mean()


class VarMoePreTrainedModel(PreTrainedModel):
    config_class = VarMoeConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.RMSNorm):
            nn.init.ones_(module.weight)


class VarMoeForCausalLM(VarMoePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: VarMoeConfig):
        super().__init__(config)
        self.model = VarMoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_router_logits: bool | None = None,
        **kwargs,  # use_cache, past_key_values...: no KV cache, every call recomputes the whole prefix
    ) -> MoeCausalLMOutputWithPast:
        hidden, router_logits = self.model(input_ids, attention_mask)  # (B, T, H)
        logits = self.lm_head(hidden)  # (B, T, V)
        aux_loss = None
        if output_router_logits or labels is not None:
            aux_loss = load_balancing_loss(router_logits, self.config.num_experts_per_tok, attention_mask)
        loss = None
        if labels is not None:
            ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
            loss = ce + self.config.router_aux_loss_coef * aux_loss
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            router_logits=router_logits if output_router_logits else None,
        )

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}
