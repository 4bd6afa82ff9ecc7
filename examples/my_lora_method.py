"""A complete adapter method outside peftfast, plugged in with one `register_peft_method` call.

"my_lora" is plain LoRA on nn.Linear layers, `y = base(x) + (alpha / r) * B(A(x))`, written from scratch: a config,
a layer and a tuner. After registration `get_peft_model`, training, `save_pretrained`, `PeftModel.from_pretrained`,
merging, status and adapter management work for it with no change to peftfast.

Run: `python examples/my_lora_method.py` (builds a tiny Llama from a config, trains a few steps, saves, reloads).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from peftfast import PeftConfig, PeftModel, get_peft_model, register_peft_method
from peftfast.tuners.tuners_utils import BaseTuner, BaseTunerLayer


@dataclass
class MyLoraConfig(PeftConfig):
    """`r`: rank; `alpha`: the update is scaled by alpha / r; `target_modules`: names (or name suffixes) of the
    nn.Linear layers to adapt."""

    _peft_type = "MY_LORA"  # the registered name, upper case: written to adapter_config.json as peft_type

    r: int = field(default=4)
    alpha: float = field(default=8.0)
    target_modules: list[str] | str | None = field(default=None)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"MyLoraConfig.r must be positive, got {self.r}.")


class MyLoraLinear(nn.Module, BaseTunerLayer):
    """An nn.Linear with one low-rank update per adapter. The per-adapter holders (`my_lora_A`, `my_lora_B`) start
    with the method's prefix, so their weights are saved and loaded as adapter weights."""

    adapter_layer_names = ("my_lora_A", "my_lora_B")
    other_param_names = ("scaling",)

    def __init__(self, base_layer: nn.Linear, adapter_name: str, r: int, alpha: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.my_lora_A = nn.ModuleDict()
        self.my_lora_B = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, alpha)

    def update_layer(self, adapter_name: str, r: int, alpha: float) -> None:
        base = self.get_base_layer()
        self.my_lora_A[adapter_name] = nn.Linear(base.in_features, r, bias=False)
        self.my_lora_B[adapter_name] = nn.Linear(r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.my_lora_A[adapter_name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.my_lora_B[adapter_name].weight)  # starts as the base model
        self.scaling[adapter_name] = alpha / r
        self.to(base.weight.device)
        self.set_adapter(self.active_adapters)

    def delta_weight(self, adapter_name: str) -> torch.Tensor:
        return self.my_lora_B[adapter_name].weight @ self.my_lora_A[adapter_name].weight * self.scaling[adapter_name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        for name in adapter_names if adapter_names is not None else self.active_adapters:
            if name in self.my_lora_A and name not in self.merged_adapters:
                self.get_base_layer().weight.data += self.delta_weight(name)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        while self.merged_adapters:
            self.get_base_layer().weight.data -= self.delta_weight(self.merged_adapters.pop())

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        for name in self.active_adapters:
            if name in self.my_lora_A:
                result = result + self.my_lora_B[name](self.my_lora_A[name](x)) * self.scaling[name]
        return result


class MyLoraModel(BaseTuner):
    """Puts a `MyLoraLinear` in place of every targeted nn.Linear (or adds the adapter to one already there)."""

    prefix = "my_lora_"
    tuner_layer_cls = MyLoraLinear

    def _create_and_replace(
        self,
        config: MyLoraConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
    ) -> None:
        if isinstance(target, MyLoraLinear):
            target.update_layer(adapter_name, config.r, config.alpha)
            return
        if not isinstance(target, nn.Linear):
            raise ValueError(f"my_lora adapts nn.Linear layers only; {current_key!r} is a {type(target).__name__}.")
        setattr(parent, target_name, MyLoraLinear(target, adapter_name, config.r, config.alpha))


register_peft_method(name="my_lora", config_cls=MyLoraConfig, model_cls=MyLoraModel)


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama_config = LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=101
    )
    model = get_peft_model(
        LlamaForCausalLM(llama_config),
        MyLoraConfig(task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj"]),
    )
    model.print_trainable_parameters()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    input_ids = torch.randint(0, 101, (4, 12))
    for step in range(5):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step}: loss {loss.item():.4f}")
    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        torch.manual_seed(0)
        loaded = PeftModel.from_pretrained(LlamaForCausalLM(llama_config), folder)
    with torch.no_grad():
        same = torch.allclose(model(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)
    print(f"reloaded adapter gives the same logits: {same}")
    print(loaded.get_model_status())


if __name__ == "__main__":
    main()
