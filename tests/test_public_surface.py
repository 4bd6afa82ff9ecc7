"""The rest of HF PEFT's public surface (issue 14): names at HF PEFT's module paths, and what they do, each run the
same way on HF PEFT and on peftfast and compared."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
import textwrap
import warnings

import huggingface_hub
import peft
import peft.helpers
import peft.import_utils
import peft.tuners._buffer_dict
import pytest
import torch
from models import MLP, tiny_llama
from tolerances import assert_close
from torch import nn

import peftfast
import peftfast.helpers
import peftfast.import_utils
import peftfast.tuners._buffer_dict

LIBS = {"peft": peft, "peftfast": peftfast}

PROBES = [
    "is_aqlm_available",
    "is_bnb_4bit_available",
    "is_bnb_available",
    "is_diffusers_available",
    "is_eetq_available",
    "is_gptqmodel_available",
    "is_hqq_available",
    "is_inc_available",
    "is_optimum_available",
    "is_te_available",
    "is_te_pytorch_available",
    "is_torch_tpu_available",
    "is_torchao_available",
    "is_torchao_ge_v0_18_0",
    "is_xpu_available",
]
TRANSFORMERS_FLAGS = [
    "is_transformers_dtensor_tp",
    "is_transformers_ge_v5",
    "is_transformers_ge_v5_13_0",
    "is_transformers_ge_v5_17_0",
    "is_transformers_ge_v5_1_0",
    "is_transformers_ge_v5_4_0",
    "is_transformers_ge_v5_6_0",
    "is_transformers_le_4_53",
]

# Module path (under `peft` / `peftfast`) -> names imported from it by user code and integrating libraries.
NAMES = {
    "": [
        "MODEL_TYPE_TO_PEFT_MODEL_MAPPING",
        "PEFT_TYPE_TO_CONFIG_MAPPING",
        "PEFT_TYPE_TO_TUNER_MAPPING",
        "NoMatchingPeftModuleError",
        "PeftError",
        "PeftWarning",
        "convert_to_lora",
        "get_base_model_state_dict",
        "get_peft_config",
        "save_as_lora",
        "set_base_model_state_dict",
    ],
    "helpers": [
        "DoraCaching",
        "check_if_peft_model",
        "disable_input_dtype_casting",
        "rescale_adapter_scale",
        "update_forward_signature",
        "update_generate_signature",
        "update_signature",
    ],
    "utils": [
        "NoMatchingPeftModuleError",
        "PeftError",
        "PeftWarning",
        "UPCAST_DTYPES",
        "_get_submodules",
        "get_base_model_state_dict",
        "infer_device",
        "register_peft_method",
        "set_base_model_state_dict",
    ],
    "utils.other": ["ModulesToSaveWrapper", "_get_submodules", "infer_device"],
    "utils.save_and_load": ["get_base_model_state_dict", "set_base_model_state_dict"],
    "utils.error": ["NoMatchingPeftModuleError", "PeftError"],
    "utils.warning": ["PeftWarning"],
    "utils.peft_types": ["PeftType", "TaskType", "register_peft_method"],
    "import_utils": PROBES + TRANSFORMERS_FLAGS,
    "tuners._buffer_dict": ["BufferDict"],
    "tuners.tuners_utils": ["BaseTuner", "BaseTunerLayer"],
    "tuners.lora": ["LoraLayer", "LoraModel", "convert_to_lora", "save_as_lora"],
    "tuners.lora.conversion": ["convert_to_lora", "save_as_lora"],
    "mapping_func": ["get_peft_model"],
    "mapping": [
        "PEFT_TYPE_TO_CONFIG_MAPPING",
        "PEFT_TYPE_TO_PREFIX_MAPPING",
        "PEFT_TYPE_TO_TUNER_MAPPING",
        "get_peft_config",
        "inject_adapter_in_model",
    ],
}


@pytest.mark.parametrize("path", sorted(NAMES), ids=lambda path: path or "top")
def test_names_import_from_the_same_paths_as_in_peft(path):
    for lib_name in LIBS:
        module = importlib.import_module(f"{lib_name}.{path}" if path else lib_name)
        assert [name for name in NAMES[path] if not hasattr(module, name)] == [], lib_name
    for name in ("has_active_enabled_adapter", "push_to_hub", "supports_lora_conversion"):
        assert hasattr(peft.PeftModel, name) and hasattr(peftfast.PeftModel, name), name
    assert hasattr(peft.PeftConfig, "push_to_hub") and hasattr(peftfast.PeftConfig, "push_to_hub")


def _lora_mlp(lib, seed: int = 0, **config) -> nn.Module:
    torch.manual_seed(seed)
    base = MLP()
    torch.manual_seed(seed + 1)
    defaults = dict(target_modules=["lin0", "lin1"], init_lora_weights=False)
    return lib.get_peft_model(base, lib.LoraConfig(**{**defaults, **config})).eval()


def _x(rows: int = 5) -> torch.Tensor:
    return torch.randn(rows, 11, generator=torch.Generator().manual_seed(3))


# ----------------------------------------------------------------------------------------- errors and warnings


@pytest.mark.parametrize(
    "config",
    [dict(target_modules=["no_such_module"]), dict(target_modules=["lin0"], exclude_modules=["lin0"])],
    ids=["nothing-matches", "all-excluded"],
)
def test_no_matching_module_error_is_raised_where_peft_raises_it(config):
    for lib in LIBS.values():
        model = MLP()
        with pytest.raises(lib.NoMatchingPeftModuleError) as error:
            lib.get_peft_model(model, lib.LoraConfig(**config))
        assert isinstance(error.value, ValueError) and isinstance(error.value, lib.PeftError)
        assert all(type(module).__module__.startswith("torch") for module in model.modules() if module is not model)


def test_lora_bias_on_a_layer_without_bias_warns_a_peft_warning():
    for lib in LIBS.values():
        with pytest.warns(lib.PeftWarning, match="bias"):
            lib.get_peft_model(MLP(bias=False), lib.LoraConfig(target_modules=["lin0"], lora_bias=True))


# ------------------------------------------------------------------------------------------------------- helpers


def test_rescale_adapter_scale_matches_peft():
    x = _x()
    records = {}
    for lib_name, lib in LIBS.items():
        model = _lora_mlp(lib)
        model.add_adapter("other", lib.LoraConfig(target_modules=["lin1"], init_lora_weights=False, lora_alpha=3))
        model.base_model.set_adapter(["default", "other"])
        with torch.no_grad():
            before = model(x)
            with lib.helpers.rescale_adapter_scale(model, 0.25):
                inside = model(x)
            after = model(x)
        records[lib_name] = (before, inside, after)
        with pytest.raises(TypeError, match="float"):
            with lib.helpers.rescale_adapter_scale(model, "0.5"):
                pass
        with pytest.raises(ValueError, match="LoraLayer"):
            with lib.helpers.rescale_adapter_scale(MLP(), 0.5):
                pass
    for ours, theirs in zip(records["peftfast"], records["peft"]):
        assert_close(ours, theirs)
    before, inside, after = records["peftfast"]
    assert_close(after, before)
    assert not torch.allclose(inside, before, atol=1e-3)


def _cast_around_forward(module: nn.Module, storage: torch.dtype, compute: torch.dtype) -> list[str]:
    """diffusers' layerwise casting on one module: weights stored in `storage`, cast to `compute` around forward."""
    calls = []
    module.to(storage)

    def before(mod, args):
        calls.append(type(mod).__name__)
        mod.to(compute)

    def after(mod, args, output):
        mod.to(storage)

    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)
    return calls


def test_disable_input_dtype_casting_lets_module_hooks_manage_dtypes_as_in_peft():
    x = _x().to(torch.bfloat16)
    outputs = {}
    for lib_name, lib in LIBS.items():
        model = _lora_mlp(lib).to(torch.bfloat16)
        calls = []
        for name, module in model.named_modules():
            if name.endswith((".lora_A.default", ".lora_B.default")):
                calls += [_cast_around_forward(module, torch.float8_e4m3fn, torch.bfloat16)]
        layers = [module for module in model.modules() if isinstance(module, lib.tuners.tuners_utils.BaseTunerLayer)]
        with torch.no_grad(), lib.helpers.disable_input_dtype_casting(model):
            assert not any(layer.cast_input_dtype_enabled for layer in layers)
            outputs[lib_name] = model(x)
        assert all(layer.cast_input_dtype_enabled for layer in layers)
        # The hooks ran: the adapter modules were called as modules, on the uncast bf16 input.
        assert all(len(recorded) == 1 for recorded in calls)
        with lib.helpers.disable_input_dtype_casting(model, active=False):
            assert all(layer.cast_input_dtype_enabled for layer in layers)
    assert outputs["peftfast"].dtype == torch.bfloat16
    assert_close(outputs["peftfast"], outputs["peft"])


def test_check_if_peft_model_matches_peft(tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    _lora_mlp(peftfast).save_pretrained(tmp_path / "adapter")
    (tmp_path / "not-an-adapter").mkdir()
    for lib in LIBS.values():
        answers = [
            lib.helpers.check_if_peft_model(str(tmp_path / "adapter")),
            lib.helpers.check_if_peft_model(str(tmp_path / "not-an-adapter")),
            lib.helpers.check_if_peft_model("nobody/not-cached"),
        ]
        assert answers == [True, False, False]


@pytest.fixture
def restore_peft_signatures():
    """HF PEFT's update_*_signature rewrite the PeftModel class's own functions (deepcopy of a function is the
    function): put them back so that other tests see HF PEFT as installed."""
    functions = [getattr(peft.PeftModel, name) for name in ("forward", "generate")]
    saved = [(f, dict(vars(f)), f.__doc__, f.__name__, dict(f.__annotations__)) for f in functions]
    yield
    for function, attributes, doc, name, annotations_ in saved:
        for key in set(vars(function)) - set(attributes):
            delattr(function, key)
        function.__doc__, function.__name__, function.__annotations__ = doc, name, annotations_


def test_update_signature_matches_peft(restore_peft_signatures):
    ids = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(0))
    records = {}
    for lib_name, lib in LIBS.items():
        # No task type: HF PEFT's PeftModel.forward shows (*args, **kwargs) too, so both libraries update it.
        model = lib.get_peft_model(tiny_llama(), lib.LoraConfig(r=2, target_modules=["q_proj"]))
        with torch.no_grad():
            before = model(input_ids=ids).logits
        lib.helpers.update_signature(model)
        with torch.no_grad():
            after = model(input_ids=ids).logits
        records[lib_name] = (
            str(inspect.signature(model.forward)),
            str(inspect.signature(model.generate)),
            model.forward.__doc__ == type(model.get_base_model()).forward.__doc__,
        )
        assert_close(after, before)
        with pytest.raises(ValueError, match="generate"):
            lib.helpers.update_signature(model, method="backward")
    assert records["peftfast"] == records["peft"]
    assert records["peftfast"][0].startswith("(input_ids")
    assert records["peftfast"][1].startswith("(inputs")
    # Only that model changed (HF PEFT changes the class): another one's generate still shows (*args, **kwargs).
    other = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(r=2, target_modules=["q_proj"]))
    assert list(inspect.signature(other.generate).parameters) == ["args", "kwargs"]


# --------------------------------------------------------------------------------------------------------- utils


def test_infer_device_and_get_submodules_match_peft():
    assert peftfast.utils.infer_device() == peft.utils.infer_device()
    model = tiny_llama()
    key = "model.layers.1.self_attn.q_proj"
    assert peftfast.utils._get_submodules(model, key) == peft.utils._get_submodules(model, key)


def test_import_probes_answer_as_peft():
    for name in PROBES:
        assert getattr(peftfast.import_utils, name)() == getattr(peft.import_utils, name)(), name
    for name in TRANSFORMERS_FLAGS:
        assert getattr(peftfast.import_utils, name) == getattr(peft.import_utils, name), name
    with pytest.raises(AttributeError):
        peftfast.import_utils.is_no_such_probe  # noqa: B018


def test_importing_the_probes_imports_none_of_the_packages_probed():
    """`import peftfast.import_utils` must work without transformers and the other probed packages: its
    module-level imports are the standard library, packaging and torch (the probes import lazily)."""
    tree = ast.parse(inspect.getsource(peftfast.import_utils))
    imported = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported == {"__future__", "importlib", "platform", "functools", "packaging", "torch"}


def test_buffer_dict_behaves_as_peft():
    def run(buffer_dict_cls):
        buffers = buffer_dict_cls({"b": torch.ones(2), "a": torch.zeros(3)}, persistent=True)
        buffers["c"] = torch.arange(4)
        buffers.update([("e", torch.ones(1)), ("d", torch.ones(1))])
        record = [list(buffers), list(buffers.state_dict()), len(buffers), "a" in buffers, "z" in buffers]
        record += [buffers.pop("a").tolist(), list(buffers.keys())]
        del buffers["b"]
        record += [list(buffers), repr(buffers), list(buffer_dict_cls({"x": torch.ones(1)}).state_dict())]
        record.append(buffers.to(torch.float64)["e"].dtype)
        with pytest.raises(RuntimeError):
            buffers(torch.ones(1))
        with pytest.raises(TypeError):
            buffers.update(3)
        buffers.clear()
        return record + [len(buffers)]

    assert run(peftfast.tuners._buffer_dict.BufferDict) == run(peft.tuners._buffer_dict.BufferDict)


# ------------------------------------------------------------------------------------------ base model state dict


def test_base_model_state_dict_matches_peft():
    reference = {key: value.clone() for key, value in tiny_llama().state_dict().items()}
    perturbed = {key: value + 1 for key, value in reference.items()}
    records = {}
    for lib_name, lib in LIBS.items():
        config = lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
        model = lib.get_peft_model(tiny_llama(), config)
        model.add_adapter("other", lib.LoraConfig(r=3, target_modules=["v_proj", "down_proj"]))
        adapter_weights = {
            k: v.clone() for k, v in model.state_dict().items() if "lora_" in k or ".modules_to_save." in k
        }
        # The values are the model's own tensors (as a state dict's are): copy them before loading into them.
        state = {key: value.clone() for key, value in lib.get_base_model_state_dict(model).items()}
        result = lib.set_base_model_state_dict(model, perturbed)
        after = lib.get_base_model_state_dict(model)
        # strict: a missing and an unknown key are refused before anything is loaded
        broken = {key: value for key, value in perturbed.items() if key != "model.norm.weight"}
        broken["nope"] = torch.ones(1)
        with pytest.raises(RuntimeError, match="model.norm.weight"):
            lib.set_base_model_state_dict(model, {k: v * 0 for k, v in broken.items()})
        loose = lib.set_base_model_state_dict(model, broken, strict=False)
        records[lib_name] = state, tuple(result), after, tuple(loose), lib.get_base_model_state_dict(model)
        for key, value in adapter_weights.items():
            assert torch.equal(model.state_dict()[key], value), key
    ours, theirs = records["peftfast"], records["peft"]
    assert list(ours[0]) == list(theirs[0]) == list(reference)
    for key, value in reference.items():
        assert torch.equal(ours[0][key], value) and torch.equal(ours[2][key], perturbed[key])
    assert ours[1] == theirs[1] == ([], [])
    assert ours[3] == theirs[3] == (["model.norm.weight"], ["nope"])
    for key in reference:
        assert torch.equal(ours[4][key], theirs[4][key])


def test_base_model_state_dict_of_a_prompt_learning_model_matches_peft():
    for lib in LIBS.values():
        config = lib.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        model = lib.get_peft_model(tiny_llama(), config)
        assert list(lib.get_base_model_state_dict(model)) == list(tiny_llama().state_dict())


# --------------------------------------------------------------------------------------------- LoRA conversion


@pytest.mark.parametrize("rank", [2, 0.8], ids=["fixed-rank", "energy-threshold"])
def test_convert_to_lora_matches_peft(tmp_path, rank):
    torch.manual_seed(1)
    source = peft.get_peft_model(
        tiny_llama(),
        peft.LoraConfig(r=6, target_modules=["q_proj", "v_proj"], init_lora_weights=False, modules_to_save=["lm_head"]),
    )
    source.save_pretrained(tmp_path / "source")
    converted = {}
    for lib_name, lib in LIBS.items():
        model = lib.PeftModel.from_pretrained(tiny_llama(), tmp_path / "source")
        assert model.supports_lora_conversion()
        with pytest.warns(UserWarning, match="already a LoRA adapter"):
            config, state_dict = lib.convert_to_lora(model, rank)
        converted[lib_name] = (config.to_dict(), state_dict)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lib.save_as_lora(tmp_path / lib_name, model, rank)
    (our_config, ours), (their_config, theirs) = converted["peftfast"], converted["peft"]
    assert list(ours) == list(theirs)
    for key in theirs:
        assert_close(ours[key], theirs[key])
    differing = {key for key in their_config if our_config[key] != their_config[key]}
    assert differing == {"peft_version"}
    # Each library loads the other's converted folder, with the same outputs.
    ids = torch.randint(1, 101, (2, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours_loaded = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peftfast")(input_ids=ids).logits
        theirs_loaded = peftfast.PeftModel.from_pretrained(tiny_llama(), tmp_path / "peft")(input_ids=ids).logits
    assert_close(ours_loaded, theirs_loaded)


def test_convert_to_lora_at_full_rank_reproduces_the_adapter_and_refuses_what_it_cant_hold():
    model = _lora_mlp(peftfast, r=4)
    x = _x()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config, state_dict = peftfast.convert_to_lora(model, 4)
    torch.manual_seed(0)
    converted = peftfast.get_peft_model(MLP(), config)
    missing = peftfast.set_peft_model_state_dict(converted, state_dict).missing_keys
    assert not [key for key in missing if "lora_" in key]
    with torch.no_grad():
        assert_close(converted.eval()(x), model(x), kind="kernel")
    for bad_rank, error in [(0, "rank of 0"), (1.5, "between 0 and 1"), (100, "larger than")]:
        with pytest.raises(ValueError, match=error), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftfast.convert_to_lora(model, bad_rank)
    with pytest.raises(ValueError, match="trains biases"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftfast.convert_to_lora(_lora_mlp(peftfast, bias="all"), 2)
    embedding = peftfast.get_peft_model(tiny_llama(), peftfast.LoraConfig(r=2, target_modules=["embed_tokens"]))
    with pytest.raises(TypeError, match="embed_tokens.*Embedding"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peftfast.convert_to_lora(embedding, 2)
    prompt_config = peftfast.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2)
    prompt = peftfast.get_peft_model(tiny_llama(), prompt_config)
    assert not prompt.supports_lora_conversion()


# -------------------------------------------------------------------------------------- diffusers on peftfast


def test_diffusers_peft_integration_imports_from_a_peft_that_is_peftfast():
    """diffusers' PEFT code, with `peft` aliased to peftfast in a fresh interpreter: its module-level imports and the
    names its functions import from `peft` all resolve. Only LoHa/LoKr (adapter methods peftfast lacks) and
    `peft.utils.hotswap` (issue 16) are left out, by name."""
    code = textwrap.dedent(
        """
        import ast, importlib, importlib.abc, importlib.util, pathlib, sys
        import peftfast

        class PeftIsPeftfast(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            def find_spec(self, name, path=None, target=None):
                if name == "peft" or name.startswith("peft."):
                    return importlib.util.spec_from_loader(name, self)
            def create_module(self, spec):
                return importlib.import_module("peftfast" + spec.name[len("peft"):])
            def exec_module(self, module):
                pass

        sys.meta_path.insert(0, PeftIsPeftfast())
        import diffusers
        import diffusers.hooks.layerwise_casting, diffusers.loaders.lora_base, diffusers.loaders.peft
        import diffusers.training_utils, diffusers.utils.peft_utils
        assert diffusers.hooks.layerwise_casting.disable_input_dtype_casting.__module__ == "peftfast.helpers"
        assert diffusers.loaders.lora_base.BaseTunerLayer.__module__ == "peftfast.tuners.tuners_utils"

        root = pathlib.Path(diffusers.__file__).parent
        left_out = {"peft.tuners.loha.layer", "peft.tuners.lokr.layer", "peft.utils.hotswap"}
        seen, failed = 0, []
        for path in sorted(root.rglob("*.py")):
            source = path.read_text()
            if "from peft" not in source:
                continue
            for node in ast.walk(ast.parse(source)):
                if not isinstance(node, ast.ImportFrom) or node.level or (node.module or "").split(".")[0] != "peft":
                    continue
                names = [alias.name for alias in node.names if alias.name not in ("LoKrConfig", "factorization")]
                if node.module in left_out or not names:
                    continue
                seen += 1
                try:
                    module = importlib.import_module(node.module)
                    missing = [name for name in names if not hasattr(module, name)]
                except ImportError as error:
                    missing = [str(error)]
                if missing:
                    failed.append((str(path.relative_to(root)), node.module, missing))
        print(seen, failed)
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    seen, _, failed = result.stdout.strip().splitlines()[-1].partition(" ")
    assert int(seen) >= 10 and failed == "[]", result.stdout
