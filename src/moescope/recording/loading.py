"""Loading a model and tokenizer by name: a local folder, a Hugging Face id, or `moescope:NAME`."""

from __future__ import annotations

from pathlib import Path

from moescope.errors import ModelLoadError

# names of torch dtypes (torch is imported only to load a model: a command that finds none never imports it)
DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
          "bfloat16": "bfloat16", "bf16": "bfloat16"}


class ModelNotHereError(ModelLoadError):
    """A model asked for from this machine only (local_only) is not on it."""


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but torch sees no CUDA device; use --device cpu")
    return device


def resolve_model_path(name: str) -> str:
    """`moescope:NAME` -> the shipped model's folder; anything else is returned unchanged."""
    if name.startswith("moescope:"):
        from moescope.models import shipped_model_path

        return str(shipped_model_path(name.split(":", 1)[1]))
    return name


def default_router(name: str):
    """The router declaration a shipped custom model (``moescope:tiny-varmoe``) needs, else None."""
    if not name.startswith("moescope:"):
        return None
    from moescope.models import default_custom_router

    return default_custom_router(name.split(":", 1)[1])


def _checked_path(name: str) -> tuple[str, bool]:
    """(path or hub id, whether it is a local folder); a local path must be a model folder."""
    path = resolve_model_path(name)
    local = Path(path).exists()
    if local and not (Path(path) / "config.json").is_file():
        raise ModelLoadError(f"{path} has no config.json; point at a Hugging Face model folder")
    if not local and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ModelLoadError(f"model folder {path} does not exist")
    return path, local


def on_this_machine(name: str) -> bool:
    """Whether `name` loads without the network: a folder, a shipped model, or a hub id whose config.json is in
    the local Hugging Face cache. Looks at the disk only."""
    path = resolve_model_path(name)
    if Path(path).exists():
        return True
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        return False
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(path, "config.json"), str)
    except ValueError:  # not a valid repository id
        return False


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The tokenizer alone (the vLLM backend loads the model itself)."""
    from transformers import AutoTokenizer

    path, _ = _checked_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {name!r}: {str(err).strip().splitlines()[0]}") from None


# transformers reads a legacy pytorch_model.bin with torch.load(weights_only=True): a checkpoint that would
# run code is refused with this (the pickle module's) error, which becomes a ModelLoadError here
def _unpickling_refused():
    import torch

    return torch.serialization.pickle.UnpicklingError


def load_model(name: str, *, device: str = "auto", dtype: str = "auto", device_map: str | None = None,
               trust_remote_code: bool = False, local_only: bool = False):
    """(model, tokenizer) ready for inference. Errors are one line that says what to do.

    local_only: load from this machine only (a folder, a shipped model, the Hugging Face cache), never the
    network: a model that is not here raises ModelNotHereError at once, with no hub request and no retry.
    """
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if local_only and not on_this_machine(name):  # before torch and transformers are imported: no cost
        raise ModelNotHereError(f"model {name!r} is not on this machine (no such folder, not in the Hugging Face cache)")
    path, local = _checked_path(name)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # loading bars would bury moescope's own one-line messages
    kwargs = dict(dtype=DTYPES[dtype] if dtype == "auto" else getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code)
    if local_only:
        kwargs["local_files_only"] = True  # what HF_HUB_OFFLINE does, for this call only
    if device_map:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                  **({"local_files_only": True} if local_only else {}))
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError, _unpickling_refused()) as err:  # a pickled checkpoint's code is refused, never run
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = "" if local else " (is the id right, and is it in your Hugging Face cache or reachable online?)"
        raise ModelLoadError(f"cannot load model {name!r}{hint}: {first}") from None
    if not device_map:
        model.to(resolve_device(device))
    model.eval()
    return model, tokenizer


def model_skeleton(path: str, trust_remote_code: bool):
    """The Hugging Face model class on the meta device: layers and routing policy, no weights, no memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the model config of {path!r}: {str(err).strip().splitlines()[0]}") from None
