"""Tiny random Hugging Face models shared by the tests (PyTorch, CPU, float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import transformers

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


@dataclasses.dataclass(frozen=True)
class TinySpec:
    """A tiny architecture to test: the family and the knobs that change the math."""

    name: str
    family: str
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool
    llama3_rope: bool = False
    layers: int = 2
    vocab: int = 97

    def hf_config(self) -> transformers.PretrainedConfig:
        common = dict(vocab_size=self.vocab, hidden_size=self.heads * self.head_dim,
                      intermediate_size=3 * self.head_dim, num_hidden_layers=self.layers,
                      num_attention_heads=self.heads, num_key_value_heads=self.kv_heads,
                      max_position_embeddings=512, tie_word_embeddings=self.tied,
                      rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
                      pad_token_id=None)
        if self.family == "qwen2":
            return transformers.Qwen2Config(**common)
        if self.family == "qwen3":
            # head_dim deliberately not hidden_size / heads: Qwen3 decouples them.
            common["hidden_size"] = self.heads * self.head_dim // 2
            return transformers.Qwen3Config(head_dim=self.head_dim, **common)
        if self.llama3_rope:
            common["rope_parameters"] = dict(LLAMA3_ROPE)
        return transformers.LlamaConfig(head_dim=self.head_dim, **common)


SPECS = (
    TinySpec("qwen2-h32-g2-untied", "qwen2", heads=4, kv_heads=2, head_dim=32, tied=False),
    TinySpec("qwen2-h64-g7-tied", "qwen2", heads=7, kv_heads=1, head_dim=64, tied=True),
    TinySpec("llama-h32-g1-llama3rope", "llama", heads=4, kv_heads=4, head_dim=32, tied=False,
             llama3_rope=True),
    TinySpec("llama-h64-g2-tied", "llama", heads=4, kv_heads=2, head_dim=64, tied=True),
    TinySpec("qwen3-h32-g2-tied", "qwen3", heads=4, kv_heads=2, head_dim=32, tied=True),
    TinySpec("qwen3-h64-g7-untied", "qwen3", heads=7, kv_heads=1, head_dim=64, tied=False),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}


def tiny_hf_model(spec: TinySpec, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 HF model whose weights are large enough to give peaked logits
    (so greedy decoding has no near-ties) and whose norms and biases are not trivial."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(spec.hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / np.sqrt(p.shape[-1]) * 1.5)
    return model


def hf_logits(model, ids: np.ndarray, attention_mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        kwargs = {}
        if attention_mask is not None:
            kwargs["attention_mask"] = torch.as_tensor(attention_mask)
        return model(torch.as_tensor(ids), **kwargs).logits.float().numpy()
