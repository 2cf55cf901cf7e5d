"""A Llama-style causal language model with a Miras memory as its token mixer, in Hugging Face
`transformers` conventions: `MirasConfig`, `MirasForCausalLM` (`save_pretrained`,
`from_pretrained`, `generate`), registered with the Auto classes under model_type "mirasc".

Block: x + Mixer(RMSNorm(x)), then x + SwiGLU(RMSNorm(x)); the mixer is a `MirasLayer`, or a
sliding-window attention on the layers listed in `attention_layers` (a hybrid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from mirasc.catalog import resolve, spec_text
from mirasc.decode import StepState
from mirasc.layers import MirasLayer, SlidingWindowAttention
from mirasc.spec import Spec

# transformers 5.24 renamed the generation cache from `past_key_values` to `cache`, in the model's
# arguments and in its outputs; the older name still works there, with a deprecation warning.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class MirasConfig(PretrainedConfig):
    """`spec` is the memory's YAML text (a shipped name or a path is read into it), so a saved
    config is whole."""

    model_type = "mirasc"

    def __init__(self, spec: str = "", vocab_size: int = 256, hidden_size: int = 128,
                 num_hidden_layers: int = 2, num_heads: int = 4, head_dim: int | None = None,
                 intermediate_size: int | None = None, conv_size: int = 4, gate_rank: int = 32,
                 attention_layers: tuple[int, ...] = (), attention_window: int = 64,
                 attention_heads: int | None = None, norm_eps: float = 1e-5,
                 initializer_range: float = 0.02, backend: str = "auto",
                 tie_word_embeddings: bool = True, **kwargs):
        self.spec = spec_text(spec)[0] if spec else spec
        self.vocab_size, self.hidden_size = vocab_size, hidden_size
        self.num_hidden_layers, self.num_heads, self.head_dim = num_hidden_layers, num_heads, head_dim
        self.intermediate_size = intermediate_size or 4 * hidden_size
        self.conv_size, self.gate_rank = conv_size, gate_rank
        self.attention_layers = list(attention_layers)
        self.attention_window = attention_window
        self.attention_heads = attention_heads or num_heads
        self.norm_eps, self.initializer_range, self.backend = norm_eps, initializer_range, backend
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)


class SwiGLU(nn.Module):
    """W_down (silu(W_gate x) * W_up x)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: MirasConfig, index: int, spec: Spec):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if index in config.attention_layers:
            self.mixer = SlidingWindowAttention(config.hidden_size, config.attention_heads,
                                                config.attention_window)
        else:
            self.mixer = MirasLayer(spec, config.hidden_size, config.num_heads,
                                    head_dim=config.head_dim, conv_size=config.conv_size,
                                    gate_rank=config.gate_rank, norm_eps=config.norm_eps,
                                    backend=config.backend)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, state=None, use_cache=False):
        y, state = self.mixer(self.mixer_norm(x), state, use_cache)
        x = x + y
        return x + self.mlp(self.mlp_norm(x)), state


class MirasCache:
    """Per-layer recurrent states (the memory's O(1) `StepState`, convolution tails; keys and
    values of the attention window) and the number of tokens seen."""

    def __init__(self, num_layers: int):
        self.states: list[dict | None] = [None] * num_layers
        self.seen = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Follow beam search: keep, for each new beam, the state of the beam it came from."""
        self.states = [_select(state, beam_idx) for state in self.states]


def _select(x, index):
    if isinstance(x, torch.Tensor):
        return x.index_select(0, index.to(x.device))
    if isinstance(x, StepState):
        return x.select(index)
    if isinstance(x, dict):
        return {k: _select(v, index) for k, v in x.items()}
    if isinstance(x, tuple | list):
        return type(x)(_select(v, index) for v in x)
    return x


class MirasPreTrainedModel(PreTrainedModel):
    config_class = MirasConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=self.config.initializer_range)


class MirasModel(MirasPreTrainedModel):
    def __init__(self, config: MirasConfig):
        super().__init__(config)
        if not config.spec:
            raise ValueError("MirasConfig.spec is empty: give the memory spec (a .yaml path or "
                             "its YAML text)")
        spec = resolve(config.spec)  # parsed once; a bad spec fails here, naming field and line
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i, spec) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def set_input_embeddings(self, value):
        self.embed = value

    def forward(self, input_ids, cache: MirasCache | None = None, use_cache: bool = False):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, time], got {list(input_ids.shape)}")
        if (not torch.compiler.is_compiling() and input_ids.numel()  # no data-dependent branch
                and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size)):
            raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}); got values in "
                             f"[{int(input_ids.min())}, {int(input_ids.max())}]")
        if use_cache and cache is None:
            cache = MirasCache(len(self.layers))
        x = self.embed(input_ids)
        for i, layer in enumerate(self.layers):
            state = cache.states[i] if cache is not None else None
            x, state = layer(x, state, use_cache or cache is not None)
            if cache is not None:
                cache.states[i] = state
        if cache is not None:
            cache.seen += input_ids.shape[1]
        return self.norm(x), cache


class MirasForCausalLM(MirasPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed.weight"}

    def __init__(self, config: MirasConfig):
        super().__init__(config)
        self.model = MirasModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # the recurrent state lives in a MirasCache, made on the first call

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids, attention_mask=None, cache: MirasCache | None = None,
                use_cache: bool | None = None, labels=None, return_dict: bool = True,
                past_key_values: MirasCache | None = None, **kwargs):
        """Logits for input_ids [B, T]; with `labels` the next-token cross-entropy (-100 ignored).
        A `cache` (`past_key_values` before transformers 5.24) continues the sequences it holds."""
        if cache is not None and past_key_values is not None:
            raise ValueError("give the cache as `cache` or as `past_key_values`, not both")
        cache = past_key_values if cache is None else cache
        if (attention_mask is not None and not torch.compiler.is_compiling()
                and not bool(attention_mask.all())):
            raise ValueError("attention_mask has padding: a recurrent memory reads every token, so "
                             "batch sequences of equal length (or generate one sequence at a time)")
        hidden, cache = self.model(input_ids, cache, bool(use_cache))
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})


AutoConfig.register("mirasc", MirasConfig)
AutoModelForCausalLM.register(MirasConfig, MirasForCausalLM)
