"""Small models built from code (nothing can be downloaded), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in: int = 11, d_hidden: int = 23, d_out: int = 5, bias: bool = True) -> None:
        super().__init__()
        self.lin0 = nn.Linear(d_in, d_hidden, bias=bias)
        self.relu = nn.ReLU()
        self.lin1 = nn.Linear(d_hidden, d_hidden, bias=bias)
        self.lin2 = nn.Linear(d_hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.relu(self.lin1(self.relu(self.lin0(x)))))


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1d = nn.Conv1d(3, 6, 3, padding=1)
        self.conv2d = nn.Conv2d(6, 7, 3, stride=2)
        self.conv2d_1x1 = nn.Conv2d(7, 5, 1)
        self.conv3d = nn.Conv3d(2, 4, (2, 3, 3))
        self.head = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor, volume: torch.Tensor) -> torch.Tensor:
        batch, channels, length = x.shape
        h = self.conv1d(x).reshape(batch, 6, 1, length).expand(batch, 6, 9, length)
        h = self.conv2d_1x1(self.conv2d(h))
        v = self.conv3d(volume).mean(dim=(1, 2, 3, 4))
        return self.head(h.mean(dim=(2, 3))) + v[:, None]


class EmbeddingModel(nn.Module):
    def __init__(self, vocab: int = 37, dim: int = 13) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=0)
        self.lin = nn.Linear(dim, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lin(self.emb(ids))


def tiny_llama(seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = dict(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
    )
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config)).eval()


CACHE_SPELLINGS = ("cache", "past_key_values")


def _llama_with_other_cache_spelling():
    """A LlamaForCausalLM whose forward takes its key/value cache by the spelling the installed transformers does
    *not* use (`past_key_values` before 5.24, `cache` since), and whose `prepare_inputs_for_generation` returns it
    under that name: with the real Llama beside it, one run covers both spellings. Passing it the installed
    spelling raises, as an unknown keyword does."""
    import inspect

    from transformers import LlamaForCausalLM

    signature = inspect.signature(LlamaForCausalLM.forward)
    own = next(name for name in CACHE_SPELLINGS if name in signature.parameters)
    other = next(name for name in CACHE_SPELLINGS if name != own)

    class LlamaWithOtherCacheSpelling(LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            if own in kwargs:
                raise TypeError(f"forward() got an unexpected keyword argument {own!r}")
            if other in kwargs:
                kwargs[own] = kwargs.pop(other)
            return super().forward(*args, **kwargs)

        def prepare_inputs_for_generation(self, *args, **kwargs):
            if other in kwargs:
                kwargs[own] = kwargs.pop(other)
            inputs = super().prepare_inputs_for_generation(*args, **kwargs)
            if own in inputs:
                inputs[other] = inputs.pop(own)
            return inputs

    parameters = [p.replace(name=other) if p.name == own else p for p in signature.parameters.values()]
    LlamaWithOtherCacheSpelling.forward.__signature__ = signature.replace(parameters=parameters)
    return LlamaWithOtherCacheSpelling, other


def tiny_llama_other_cache_spelling(seed: int = 0, **overrides):
    """`tiny_llama(seed)`'s weights in a model taking its cache by the other spelling (see above); returns the model
    and that spelling."""
    model_class, spelling = _llama_with_other_cache_spelling()
    reference = tiny_llama(seed, **overrides)
    model = model_class(reference.config).eval()
    model.load_state_dict(reference.state_dict())
    return model, spelling


def tiny_gpt2(seed: int = 0, **overrides):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=97, n_positions=64, bos_token_id=1, eos_token_id=2)
    config.update(overrides)
    return GPT2LMHeadModel(GPT2Config(**config)).eval()


def tiny_llama_classifier(seed: int = 0, num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(config).eval()


def quantize_to_4bit(
    model: nn.Module,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    quant_storage: torch.dtype = torch.uint8,
    compute_dtype: torch.dtype | None = torch.float32,
    skip: tuple[str, ...] = ("lm_head", "score"),
    cpu_repack: bool = False,
) -> nn.Module:
    """Replace every nn.Linear (except `skip`) by a bitsandbytes Linear4bit holding its weight quantized, as
    transformers' `BitsAndBytesConfig(load_in_4bit=True, ...)` does; marks the model `is_loaded_in_4bit`.

    bitsandbytes repacks a 4-bit weight in place into a CPU-only layout on its first eval-mode, no-grad forward on a
    CPU with AVX512-BF16 (with absmax rounded to bf16). `cpu_repack=False` turns that off, so that every model built
    here keeps the standard layout whatever the CPU; tests of the repacked layout ask for it."""
    import bitsandbytes as bnb

    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is not nn.Linear or child_name in skip:
                continue
            quantized = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=compress_statistics,
                quant_type=quant_type,
                quant_storage=quant_storage,
            )
            quantized.weight = bnb.nn.Params4bit(
                child.weight.data.clone(),
                requires_grad=False,
                quant_type=quant_type,
                compress_statistics=compress_statistics,
                quant_storage=quant_storage,
                module=quantized,
            ).to(child.weight.device)
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            quantized.support_avx512bf16_for_cpu = quantized.support_avx512bf16_for_cpu and cpu_repack
            setattr(module, child_name, quantized)
    model.is_loaded_in_4bit = True
    return model
