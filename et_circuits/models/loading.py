"""Loading: a registered model, a registry-file entry or a model directory becomes a
HookedTransformer through one path: HF checkpoint (a family in `families.ARCHITECTURES`) ->
optional PEFT merge -> `convert.to_hooked`. transformers memory-maps the safetensors files, so a model loaded
in its checkpoint's dtype is held once, in pages of the file. Which models exist and where they
live: `registry`."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from et_circuits.core.errors import SetupError
from et_circuits.core.settings import resolve_device

from .convert import check_split, to_hooked
from .families import ARCHITECTURES, activation, rope, rope_layer_types, text_config
from .registry import get_spec, resolve_dir


def _supported_config(path: Path):
    """The HF config of a checkpoint directory, refused in one line unless the conversion
    reproduces it exactly (architecture, rope scaling, MLP without biases, an activation
    TransformerLens has, causal attention)."""
    file = path / "config.json"
    if not file.exists():
        raise SetupError(f"{path} is not a HF checkpoint directory (no config.json)")
    model_type = json.loads(file.read_text()).get("model_type")
    if model_type not in ARCHITECTURES:
        raise SetupError(
            f"{path} is not a checkpoint of a supported family (model_type={model_type!r}); "
            f"supported model types: {', '.join(ARCHITECTURES)}"
        )
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    text = text_config(config)
    for layer_type in rope_layer_types(text):
        rope(text, layer_type)
    activation(text)
    if getattr(text, "mlp_bias", False):
        raise SetupError(f"{path}: mlp_bias is not supported (TransformerLens' gated MLP has no gate or up bias)")
    if getattr(text, "use_bidirectional_attention", False):
        raise SetupError(f"{path}: use_bidirectional_attention is not supported (the conversion is causal)")
    return config


def load_hf(path: Path, dtype: torch.dtype = torch.float32, adapter: Path | None = None):
    """Load a supported checkpoint with transformers (safetensors weights stay memory-mapped
    where `dtype` is theirs) and merge a PEFT adapter into it if given."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = _supported_config(Path(path))
    with _readable(path):
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    if adapter is not None:
        from peft import PeftModel

        with _readable(adapter):
            model = PeftModel.from_pretrained(model, adapter, local_files_only=True)
        model = model.merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return model.eval(), tokenizer


@contextmanager
def _readable(path: Path):
    """Turn a checkpoint that cannot be read (truncated or corrupt safetensors, missing weight
    files) into one SetupError naming it."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:
        raise SetupError(f"{path}: a corrupt or truncated weight file ({e}); copy or download it again") from None
    except OSError as e:
        raise SetupError(f"{path}: cannot read the checkpoint ({str(e).splitlines()[0]})") from None


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype, from itself or its name ("float32", "bfloat16", "float16", "float64")."""
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    raise SetupError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")


def load(
    name_or_path: str | os.PathLike,
    device: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    path: str | os.PathLike | None = None,
    n_devices: int = 1,
):
    """Load a registered model or an HF directory as (HookedTransformer, tokenizer, spec).

    `device`: "cpu", "cuda", "cuda:1", ... (default: the first GPU if any, else the CPU; one
    that this machine lacks is a SetupError naming those it has). `dtype`: a torch dtype or its
    name. `path` overrides where the weights are looked for (for an adapter spec: the adapter
    directory; its base is resolved through the registry). `n_devices` > 1 splits the layers
    over that many GPUs from `device` on (a model larger than one GPU).
    """
    dtype = as_dtype(dtype)
    if n_devices == 1:
        device = resolve_device(device)
    else:  # check_split below says what is wrong with a split
        device = str(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    spec = get_spec(name_or_path)
    own_dir = Path(path) if path is not None else resolve_dir(spec)
    base_dir = resolve_dir(get_spec(spec.base)) if spec.is_adapter else own_dir
    check_split(
        device, n_devices, text_config(_supported_config(base_dir)).num_hidden_layers
    )  # before any weight is read
    if spec.is_adapter:
        hf_model, tokenizer = load_hf(base_dir, dtype, adapter=own_dir)
    else:
        hf_model, tokenizer = load_hf(own_dir, dtype)
    model = to_hooked(hf_model, tokenizer, device, dtype, n_devices)
    model.cfg.model_name = spec.name
    return model, tokenizer, spec
