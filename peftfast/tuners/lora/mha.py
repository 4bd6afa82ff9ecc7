"""LoRA on `torch.nn.MultiheadAttention`, in HF PEFT 0.21.2's layout and with its outputs.

Layout (so state_dict keys and adapter files are PEFT's): the layer holds the `nn.MultiheadAttention` as
`base_layer`, its own `lora_A` [r, E] / `lora_B` [3E, r] for the packed input projection `in_proj_weight` [3E, E],
and the attention's `out_proj` becomes a `lora.Linear` with the out projection's adapters:
`attn.lora_A.<adapter>.weight`, `attn.base_layer.out_proj.lora_A.<adapter>.weight`, ... Only attentions with one
packed input projection (kdim == vdim == embed_dim) are supported, as in HF PEFT.

Forward. HF PEFT merges the deltas into the weights before every forward and subtracts them afterwards, so that
torch's attention picks them up; its backward then takes full d_out x d_in weight gradients. peftfast runs the
attention itself with the projections as `ops.lora_linear` calls (base GEMM plus the low-rank term, fused on the
triton backend), and the rest exactly as `nn.MultiheadAttention` does (masks, `is_causal`, `need_weights`,
`batch_first`, `bias_k`/`bias_v`, `add_zero_attn`, attention dropout): the same outputs without merged weights, and
a backward with rank-r adapter gradients only. What that reproduces of HF PEFT 0.21.2, to give its outputs and
gradients:
- `lora_dropout` is not applied (merged weights have no dropout), neither are in_proj's `lora_B` biases;
- the out_proj delta counts twice in the output and once in the adapter's gradient: PEFT's merge writes `W + dW`
  into out_proj and then merges out_proj's LoRA layer, adding `dW` again outside autograd (huggingface/peft#3774);
  so an adapter trained with PEFT is run as it was trained. Merging does the same.
The layer carries a no-op forward pre-hook, so that torch's `TransformerEncoderLayer` skips its fused inference path,
which reads the base weights alone (under HF PEFT it silently runs without the adapters in eval mode). As in HF PEFT,
mixed-adapter batches (`adapter_names=`) and aLoRA are refused on this layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ..tuners_utils import BaseTunerLayer
from .layer import Linear, LoraLayer, delta_on_cpu_in_fp32


def _blocks_fused_encoder_path(module: nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing: TransformerEncoderLayer takes its fused path only without hooks."""
    return None


def _read_through(name: str) -> property:
    """A read-only property that returns the wrapped attention's attribute `name`."""
    return property(lambda self: getattr(self.get_base_layer(), name), doc=f"The attention's `{name}`.")


class MultiheadAttention(nn.Module, LoraLayer):
    """LoRA on an `nn.MultiheadAttention`: `W_in + s * B A` for the packed input projection, a `lora.Linear` on
    out_proj (see the module docstring for what follows HF PEFT 0.21.2)."""

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 0,
        lora_alpha: float = 1,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_alora: bool = False,
        **kwargs: Any,
    ) -> None:
        attention = base_layer.get_base_layer() if isinstance(base_layer, BaseTunerLayer) else base_layer
        if not attention._qkv_same_embed_dim:
            raise ValueError(
                "LoRA on nn.MultiheadAttention needs query, key and value of the embedding size (one packed "
                f"in_proj_weight), as in HF PEFT; this one has embed_dim={attention.embed_dim}, "
                f"kdim={attention.kdim}, vdim={attention.vdim}."
            )
        if not isinstance(attention.out_proj, nn.Linear):
            raise TypeError(
                f"LoRA on nn.MultiheadAttention needs its out_proj to be an nn.Linear, got "
                f"{type(attention.out_proj).__name__}."
            )
        _check_not_alora(use_alora)
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.in_features, self.out_features = attention.embed_dim, 3 * attention.embed_dim
        self._active_adapter = adapter_name
        adapter_kwargs = dict(
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        # HF PEFT's order: out_proj's layer first, then update_layer (which sets out_proj's adapter up again), so a
        # seeded model draws the same initial weights as PEFT's.
        attention.out_proj = Linear(attention.out_proj, adapter_name, r=r, **adapter_kwargs)
        self.update_layer(adapter_name, r, **adapter_kwargs)
        self.register_forward_pre_hook(_blocks_fused_encoder_path)

    def update_layer(
        self,
        adapter_name: str,
        r: int,
        lora_alpha: float,
        lora_dropout: float,
        init_lora_weights: bool | str,
        use_rslora: bool,
        lora_bias: bool = False,
        autocast_adapter_dtype: bool = True,
        use_alora: bool = False,
        **kwargs: Any,
    ) -> None:
        _check_not_alora(use_alora)
        self._set_hyperparameters(adapter_name, r, lora_alpha, use_rslora, lora_dropout)
        self.lora_A[adapter_name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[adapter_name] = nn.Linear(r, self.out_features, bias=lora_bias)
        self.lora_bias[adapter_name] = lora_bias
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self._move_adapter_to_base(adapter_name, autocast_adapter_dtype, fresh=True)
        self.base_layer.out_proj.update_layer(
            adapter_name,
            r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            init_lora_weights=init_lora_weights,
            use_rslora=use_rslora,
            lora_bias=lora_bias,
            autocast_adapter_dtype=autocast_adapter_dtype,
        )
        self.set_adapter(self.active_adapters)

    # nn.MultiheadAttention's attributes, read through (code that inspects the attention module keeps working).
    embed_dim = _read_through("embed_dim")
    kdim = _read_through("kdim")
    vdim = _read_through("vdim")
    _qkv_same_embed_dim = _read_through("_qkv_same_embed_dim")
    num_heads = _read_through("num_heads")
    dropout = _read_through("dropout")
    batch_first = _read_through("batch_first")
    head_dim = _read_through("head_dim")
    in_proj_weight = _read_through("in_proj_weight")
    in_proj_bias = _read_through("in_proj_bias")
    bias_k = _read_through("bias_k")
    bias_v = _read_through("bias_v")
    add_zero_attn = _read_through("add_zero_attn")

    @property
    def out_proj(self) -> nn.Module:
        return self.get_base_layer().out_proj.get_base_layer()

    def merge_masks(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor | None, int | None]:
        return self.get_base_layer().merge_masks(*args, **kwargs)

    # Merging.
    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """The in_proj delta `scaling * B @ A` [3E, E] (out_proj's is its own layer's `get_delta_weight`)."""
        weight_A, weight_B = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        scaling = self.scaling[adapter]
        return delta_on_cpu_in_fp32(weight_A, weight_B, weight_B.dtype, lambda A, B: (B @ A) * scaling)

    def _merge_deltas(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(in_proj delta, the out_proj delta HF PEFT adds besides out_proj's own merge), in the base dtype."""
        attention = self.get_base_layer()
        out_proj = attention.out_proj
        delta_in = self.get_delta_weight(adapter).to(attention.in_proj_weight.dtype)
        delta_out = out_proj.get_delta_weight(adapter).to(out_proj.get_base_layer().weight.dtype)
        return delta_in, delta_out

    def _check_safe_merge(self, adapter_names: list[str] | None, layer_name: str) -> None:
        attention = self.get_base_layer()
        weight_in = attention.in_proj_weight.data
        weight_out = attention.out_proj.get_base_layer().weight.data
        for adapter in self._adapters_to_merge(adapter_names, warn=False):
            delta_in, delta_out = self._merge_deltas(adapter)
            weight_in, weight_out = weight_in + delta_in, weight_out + 2 * delta_out
            if not (torch.isfinite(weight_in).all() and torch.isfinite(weight_out).all()):
                raise ValueError(
                    f"NaNs or infs detected while merging adapter {adapter!r} into layer {layer_name!r}; nothing was "
                    "merged. The adapter weights are probably broken."
                )

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas to in_proj_weight and to out_proj (out_proj's twice, as HF PEFT 0.21.2 does)."""
        attention = self.get_base_layer()
        out_proj = attention.out_proj
        for adapter in self._adapters_to_merge(adapter_names):
            if safe_merge:
                self._check_safe_merge([adapter], type(attention).__name__)
            delta_in, delta_out = self._merge_deltas(adapter)
            attention.in_proj_weight.data += delta_in
            out_proj.get_base_layer().weight.data += delta_out
            out_proj.merge(safe_merge=safe_merge, adapter_names=[adapter])
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtract merged deltas again (in_proj, and out_proj's twice), last merged first."""
        if not self.merged:
            return
        attention = self.get_base_layer()
        out_proj = attention.out_proj
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.scaling:
                continue
            delta_in, delta_out = self._merge_deltas(adapter)
            attention.in_proj_weight.data -= delta_in
            out_proj.get_base_layer().weight.data -= delta_out
        out_proj.unmerge()

    # Forward.
    def forward(self, query: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "adapter_names" in kwargs:
            raise TypeError("lora.MultiheadAttention does not support mixed adapter batches (as in HF PEFT).")
        previous_dtype = query.dtype
        active = self._present_active_adapters()
        if self.disable_adapters and self.merged:
            self.unmerge()
        if self.disable_adapters or self.merged or not active:
            output, weights = self.base_layer(query, *args, **kwargs)
        else:
            out_proj = self.get_base_layer().out_proj
            if out_proj.active_adapters != self.active_adapters:
                raise ValueError(
                    f"The out_proj of this MultiheadAttention has the active adapters {out_proj.active_adapters} but "
                    f"the attention has {self.active_adapters}; set the adapters on the model (set_adapter), not on "
                    "one of the two layers."
                )
            output, weights = self._attention(active, query, *args, **kwargs)
        return output.to(previous_dtype), None if weights is None else weights.to(previous_dtype)

    def _attention(
        self,
        active: list[str],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`nn.MultiheadAttention.forward` (its general path) with the adapters in the projections."""
        attention = self.get_base_layer()
        key_padding_mask = F._canonical_mask(
            mask=key_padding_mask,
            mask_name="key_padding_mask",
            other_type=F._none_or_dtype(attn_mask),
            other_name="attn_mask",
            target_type=query.dtype,
        )
        attn_mask = F._canonical_mask(
            mask=attn_mask,
            mask_name="attn_mask",
            other_type=None,
            other_name="",
            target_type=query.dtype,
            check_other=False,
        )
        # Which of query, key and value are one tensor decides how the packed projection is split (as in torch).
        self_attention, shared_kv = query is key and key is value, key is value
        batch_first = attention.batch_first and query.dim() == 3
        if batch_first:
            query, key, value = (tensor.transpose(1, 0) for tensor in (query, key, value))
        output, weights = self._multi_head_attention(
            active,
            query,
            key,
            value,
            key_padding_mask,
            need_weights,
            attn_mask,
            average_attn_weights,
            is_causal,
            self_attention,
            shared_kv,
        )
        return (output.transpose(1, 0) if batch_first else output), weights

    def _multi_head_attention(
        self,
        active: list[str],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None,
        need_weights: bool,
        attn_mask: torch.Tensor | None,
        average_attn_weights: bool,
        is_causal: bool,
        self_attention: bool,
        shared_kv: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`F.multi_head_attention_forward` on sequence-first inputs, with `_in_projection`/`_out_projection` for
        the projections."""
        attention = self.get_base_layer()
        num_heads = attention.num_heads
        is_batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
        if not is_batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        tgt_len, batch, embed_dim = query.shape
        src_len = key.shape[0]
        if is_causal and attn_mask is None:
            raise RuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer module method "
                "`generate_square_subsequent_mask` to create this mask."
            )
        if is_causal and key_padding_mask is None and not need_weights:
            # scaled_dot_product_attention builds the causal mask itself.
            attn_mask = None
        elif is_causal and key_padding_mask is not None:
            is_causal = False
        if embed_dim != attention.embed_dim:
            raise AssertionError(f"was expecting embedding dimension of {attention.embed_dim}, but got {embed_dim}")
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        head_dim = embed_dim // num_heads
        q, k, v = self._in_projection(active, query, key, value, self_attention, shared_kv)

        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be {(tgt_len, src_len)}."
                    )
                attn_mask = attn_mask.unsqueeze(0)
            elif attn_mask.dim() == 3:
                if attn_mask.shape != (batch * num_heads, tgt_len, src_len):
                    raise RuntimeError(
                        f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                        f"{(batch * num_heads, tgt_len, src_len)}."
                    )
            else:
                raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
        if attention.bias_k is not None and attention.bias_v is not None:
            k = torch.cat([k, attention.bias_k.repeat(1, batch, 1)])
            v = torch.cat([v, attention.bias_v.repeat(1, batch, 1)])
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        # [batch * heads, length, head_dim]
        q = q.view(tgt_len, batch * num_heads, head_dim).transpose(0, 1)
        k = k.view(k.shape[0], batch * num_heads, head_dim).transpose(0, 1)
        v = v.view(v.shape[0], batch * num_heads, head_dim).transpose(0, 1)
        if attention.add_zero_attn:
            zeros = torch.zeros((batch * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
            k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
            if attn_mask is not None:
                attn_mask = F.pad(attn_mask, (0, 1))
            if key_padding_mask is not None:
                key_padding_mask = F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[1]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (batch, src_len):
                raise AssertionError(
                    f"expecting key_padding_mask shape of {(batch, src_len)}, but got {key_padding_mask.shape}"
                )
            key_padding_mask = (
                key_padding_mask.view(batch, 1, 1, src_len)
                .expand(-1, num_heads, -1, -1)
                .reshape(batch * num_heads, 1, src_len)
            )
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        dropout_p = attention.dropout if attention.training else 0.0

        if need_weights:
            q_scaled = q * math.sqrt(1.0 / head_dim)
            if attn_mask is not None:
                scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
            else:
                scores = torch.bmm(q_scaled, k.transpose(-2, -1))
            weights = F.softmax(scores, dim=-1)
            if dropout_p > 0.0:
                weights = F.dropout(weights, p=dropout_p)
            output = torch.bmm(weights, v).transpose(0, 1).reshape(tgt_len * batch, embed_dim)
            output = self._out_projection(active, output).view(tgt_len, batch, -1)
            weights = weights.view(batch, num_heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if not is_batched:
                output, weights = output.squeeze(1), weights.squeeze(0)
            return output, weights

        if attn_mask is not None:
            if attn_mask.shape[0] == 1 and attn_mask.dim() == 3:
                attn_mask = attn_mask.unsqueeze(0)
            else:
                attn_mask = attn_mask.view(batch, num_heads, -1, src_len)
        q = q.view(batch, num_heads, tgt_len, head_dim)
        k = k.view(batch, num_heads, src_len, head_dim)
        v = v.view(batch, num_heads, src_len, head_dim)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
        output = output.permute(2, 0, 1, 3).reshape(batch * tgt_len, embed_dim)
        output = self._out_projection(active, output).view(tgt_len, batch, -1)
        if not is_batched:
            output = output.squeeze(1)
        return output, None

    def _in_projection(
        self,
        active: list[str],
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        self_attention: bool,
        shared_kv: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v = x @ (W_in + sum_i s_i B_i A_i)[rows].T + b_in[rows] for their rows of the packed projection:
        one GEMM for self-attention, two when key is value, three otherwise (torch's split)."""
        attention = self.get_base_layer()
        weight, bias = attention.in_proj_weight, attention.in_proj_bias
        embed_dim = attention.embed_dim
        lora_A, lora_B, _, scaling, _ = self._lora_weights(active)
        no_bias, no_dropout = [None] * len(active), [0.0] * len(active)

        def project(x: torch.Tensor, first: int, last: int) -> torch.Tensor:
            part_bias = None if bias is None else bias[first:last]
            part_B = [B[first:last] for B in lora_B]
            # A batch_first input arrives transposed; torch's matmul multiplies a transposed 3-D input by a weight
            # that needs no gradient as a batched GEMM against a broadcast weight (~8x slower on CPU, E=512, 1024
            # tokens): multiply the contiguous layout and transpose the product instead.
            flip = x.dim() == 3 and not x.is_contiguous() and x.transpose(0, 1).is_contiguous()
            rows = x.transpose(0, 1) if flip else x
            y = ops.lora_linear(
                rows, weight[first:last], part_bias, lora_A, part_B, no_bias, scaling, no_dropout, training=False
            )
            return y.transpose(0, 1) if flip else y

        if self_attention:
            packed = project(query, 0, 3 * embed_dim).unflatten(-1, (3, embed_dim)).movedim(-2, 0).contiguous()
            return packed[0], packed[1], packed[2]
        q = project(query, 0, embed_dim).contiguous()
        if shared_kv:
            packed = project(key, embed_dim, 3 * embed_dim).unflatten(-1, (2, embed_dim)).movedim(-2, 0).contiguous()
            return q, packed[0], packed[1]
        k = project(key, embed_dim, 2 * embed_dim).contiguous()
        return q, k, project(value, 2 * embed_dim, 3 * embed_dim).contiguous()

    def _out_projection(self, active: list[str], x: torch.Tensor) -> torch.Tensor:
        """x @ (W_out + 2 * sum_i dW_i).T + b_out + sum_i s_i * lora_B_bias_i, with dW_i = s_i B_i A_i of out_proj's
        adapters and one dW_i and the lora_B biases outside autograd: HF PEFT 0.21.2's values and gradients."""
        out_proj = self.get_base_layer().out_proj
        base = out_proj.get_base_layer()
        lora_A, lora_B, lora_B_bias, scaling, _ = out_proj._lora_weights(active)
        count = len(active)
        result = ops.lora_linear(
            x,
            base.weight,
            base.bias,
            lora_A + [A.detach() for A in lora_A],
            lora_B + [B.detach() for B in lora_B],
            [None] * count + [None if bias is None else bias.detach() for bias in lora_B_bias],
            scaling * 2,
            [0.0] * (2 * count),
            training=False,
        )
        self._record_backend("lora_linear")
        return result

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def _check_not_alora(use_alora: bool) -> None:
    if use_alora:
        raise ValueError(
            "Invalid or unsupported variant combination: ('alora_invocation_tokens',): aLoRA adapts Linear layers "
            "only, not nn.MultiheadAttention (as in HF PEFT)."
        )


def dispatch_multihead_attention(
    target: nn.Module, adapter_name: str, lora_config: Any, **kwargs: Any
) -> nn.Module | None:
    """The LoRA layer for an `nn.MultiheadAttention`, or None for any other layer."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if not isinstance(base, nn.MultiheadAttention):
        return None
    kwargs = {k: v for k, v in kwargs.items() if k != "fan_in_fan_out"}
    return MultiheadAttention(target, adapter_name, **kwargs)
