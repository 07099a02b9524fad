"""The tiny trained models shipped with moescope, usable offline as ``moescope:NAME``.

Each lives in ``weights/<name>/`` as bf16 safetensors + config.json + tokenizer files and loads with
`AutoModelForCausalLM.from_pretrained(shipped_model_path(name))`. Importing this package registers
the custom ``moescope_varmoe`` architecture with the Auto classes. They are trained and measured by the
repository's top-level `training/` folder (`python -m training.train`, `python -m training.evaluate`), which
is not part of the installed package.

Examples
--------
>>> sorted(SHIPPED_MODELS)
['tiny-dense', 'tiny-dsv3', 'tiny-moe', 'tiny-varmoe']
>>> shipped_model_path("tiny-moe").name
'tiny-moe'
"""

from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM

from moescope.errors import ModelLoadError
from moescope.models.varmoe import VarMoeConfig, VarMoeForCausalLM

__all__ = ["SHIPPED_MODELS", "WEIGHTS_DIR", "VarMoeConfig", "VarMoeForCausalLM", "default_custom_router",
           "shipped_model_path"]

WEIGHTS_DIR = Path(__file__).parent / "weights"

SHIPPED_MODELS: dict[str, str] = {
    "tiny-moe": "Qwen3-MoE, 4 layers, hidden 128, 8 experts of 256, top-2, 8k byte-level BPE (4.4 M parameters)",
    "tiny-dense": "Qwen3 dense twin of tiny-moe: one MLP of 512 = same active parameters per token (2.0 M)",
    "tiny-varmoe": "custom MoE with experts of different sizes (4 x 448 + 4 x 64), top-2; custom-router capture",
    "tiny-dsv3": "DeepSeek-V3 style: MLA, dense first layer, 16 experts of 128, sigmoid scores, correction bias, "
                 "top-3 within the best 2 of 4 groups, 1 shared expert",
}

# Kept in sync with architectures.VAR_EXPERT_SIZES (a test checks); read from config.json when present.
_VARMOE_EXPERT_SIZES = (448, 448, 448, 448, 64, 64, 64, 64)

try:
    AutoConfig.register(VarMoeConfig.model_type, VarMoeConfig)
    AutoModelForCausalLM.register(VarMoeConfig, VarMoeForCausalLM)
except ValueError:  # already registered (module reloaded)
    pass


def shipped_model_path(name: str) -> Path:
    """Folder of shipped model `name` (accepts ``moescope:NAME``).

    Raises ModelLoadError for an unknown name, or when the package was installed without its weights.
    """
    name = name.removeprefix("moescope:")
    if name not in SHIPPED_MODELS:
        raise ModelLoadError(f"unknown shipped model {name!r}; shipped models: {', '.join(SHIPPED_MODELS)}")
    folder = WEIGHTS_DIR / name
    if not (folder / "config.json").is_file():
        raise ModelLoadError(
            f"shipped model {name!r} has no weights at {folder}; reinstall moescope, or train them from a clone of "
            f"the repository with python -m training.train --model {name}"
        )
    return folder


def default_custom_router(name: str):
    """The CustomRouter that captures shipped model `name`, or None when discovery finds it unaided."""
    from moescope.adapters.discover import CustomRouter
    from moescope.adapters.spec import RouterOutput

    name = name.removeprefix("moescope:")
    if name != "tiny-varmoe":
        return None
    return CustomRouter(
        pattern="model.layers.*.moe.router",
        top_k=2,
        output=RouterOutput.LOGITS,
        renormalize=True,
        expert_sizes=_VARMOE_EXPERT_SIZES,
    )
