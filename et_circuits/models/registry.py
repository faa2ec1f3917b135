"""Which models exist and where their weights are. The built-in registry (the paper's 7B models
and the organism), a user's registry file (TOML) and model directories given directly all
become a `ModelSpec`, which `loading.load` loads one way.

A registry file maps names to HF directories, or to a base model plus a PEFT adapter:

    [models.my-base]
    path = "/data/qwen2-0.5b"     # relative paths are relative to this file
    [models.my-ft]
    base = "my-base"              # any registered name: built in, or in this file
    adapter = "/data/my-lora"

It is chosen with `use_registry(FILE)` (the CLI's `--registry FILE`) or, failing that, the
environment variable ET_CIRCUITS_REGISTRY (which the Makefile's `REGISTRY=` sets). Its names
are added to the built-in ones and win where they coincide.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from et_circuits.core.errors import SetupError

# The model organism's weights ship with the package, beside the task they were trained on.
ORGANISM_DIR = Path(__file__).parents[1] / "tasks" / "entity_tracking" / "organism" / "weights"
MODELS_DIR_VAR = "ET_CIRCUITS_MODELS"
REGISTRY_VAR = "ET_CIRCUITS_REGISTRY"
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class ModelSpec:
    """One model's identity and where its weights live.

    `base` names another spec when this one is a PEFT adapter: its directory then holds the
    adapter, merged into the base's weights at load. `origin` says where a model declared
    outside the built-in registry came from (a registry-file entry, a directory given
    directly); its `local_dir` is then the only place looked at.
    """

    name: str
    hf_repo: str | None = None
    local_dir: Path | None = None
    base: str | None = None
    origin: str | None = None

    @property
    def env_var(self) -> str:
        return "ET_CIRCUITS_" + self.name.upper().replace("-", "_")

    @property
    def is_adapter(self) -> bool:
        return self.base is not None


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("llama-7b", hf_repo="huggyllama/llama-7b"),
        ModelSpec("vicuna-7b", hf_repo="AlekseyKorshuk/vicuna-7b"),
        ModelSpec("goat-7b", hf_repo="tiedong/goat-lora-7b", base="llama-7b"),
        ModelSpec("float-7b", hf_repo="nikhil07prakash/float-7b"),
        ModelSpec("organism-llama", local_dir=ORGANISM_DIR / "organism-llama"),
        ModelSpec("organism-vicuna", local_dir=ORGANISM_DIR / "organism-vicuna"),
        ModelSpec("organism-goat", local_dir=ORGANISM_DIR / "organism-goat", base="organism-llama"),
        ModelSpec("organism-float", local_dir=ORGANISM_DIR / "organism-float"),
    ]
}
ORGANISM = [n for n in REGISTRY if n.startswith("organism-")]

_chosen: dict[str, ModelSpec] | None = None  # the file given to use_registry, parsed


# ---------------------------------------------------------------------------------------------
# registry files


def use_registry(path: str | os.PathLike | None) -> dict[str, ModelSpec]:
    """Make a registry file's models known by name in this process, in place of
    $ET_CIRCUITS_REGISTRY (`None`: back to that variable). Reads and checks the whole file now,
    so a malformed entry fails before any work; returns its models."""
    global _chosen
    _chosen = None if path is None else read_registry(path)
    return dict(_chosen or {})


def registered() -> dict[str, ModelSpec]:
    """Every model known by name: the built-in ones, then the registry file's."""
    if _chosen is not None:
        return {**REGISTRY, **_chosen}
    env = os.environ.get(REGISTRY_VAR)
    return {**REGISTRY, **(read_registry(env) if env else {})}


def read_registry(path: str | os.PathLike) -> dict[str, ModelSpec]:
    """The models of a registry file (format in this module's docstring). A malformed file or
    entry is a SetupError of one line that names it."""
    file = Path(path).expanduser().absolute()
    table = _read_toml(file)
    models = table.get("models")
    if set(table) != {"models"} or not isinstance(models, dict):
        raise SetupError(f"registry {file}: expected only [models.<name>] tables")
    specs = {name: _entry(file, name, entry) for name, entry in models.items()}
    for spec in specs.values():
        if spec.is_adapter:
            _check_base(spec, {**REGISTRY, **specs})
    return specs


def _read_toml(file: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        raise SetupError("registry files need Python 3.11 or later (tomllib)") from None
    try:
        with file.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise SetupError(f"registry {file} cannot be read: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise SetupError(f"registry {file} is not valid TOML: {e}") from None


def _entry(file: Path, name: str, entry) -> ModelSpec:
    """One `[models.<name>]` table: `path`, or `base` and `adapter`."""
    where = f"{file} [models.{name}]"
    if not SAFE_NAME.fullmatch(name):
        raise SetupError(f"{where}: a model name is letters, digits, '.', '_' and '-', starting with a letter or digit")
    if not isinstance(entry, dict):
        raise SetupError(f"{where}: expected a table with path, or base and adapter")
    unknown = sorted(set(entry) - {"path", "base", "adapter"})
    if unknown:
        raise SetupError(f"{where}: unknown key {unknown[0]!r}; expected path, or base and adapter")
    if "adapter" in entry and "base" not in entry:
        raise SetupError(f'{where}: an adapter needs a base (base = "<registered name>")')
    if "base" in entry and "adapter" not in entry:
        raise SetupError(f'{where}: a base needs an adapter (adapter = "<PEFT adapter directory>")')
    if "path" in entry and "adapter" in entry:
        raise SetupError(f"{where}: give path, or base and adapter, not both")
    if "path" not in entry and "adapter" not in entry:
        raise SetupError(f'{where}: missing path (path = "<HF model directory>")')
    if "path" in entry:
        return ModelSpec(name, local_dir=_dir(file, where, entry, "path"), origin=where)
    base = _text(where, entry, "base")
    return ModelSpec(name, local_dir=_dir(file, where, entry, "adapter"), base=base, origin=where)


def _text(where: str, entry: dict, key: str) -> str:
    value = entry[key]
    if not isinstance(value, str) or not value:
        raise SetupError(f"{where}: {key} must be a non-empty string, got {value!r}")
    return value


def _dir(file: Path, where: str, entry: dict, key: str) -> Path:
    """A directory of an entry; a relative one is relative to the registry file."""
    path = Path(_text(where, entry, key)).expanduser()
    return path if path.is_absolute() else file.parent / path


def _check_base(spec: ModelSpec, known: dict[str, ModelSpec]) -> None:
    if spec.base not in known:
        raise SetupError(f"{spec.origin}: unknown base {spec.base!r}; known models: {', '.join(known)}")
    if known[spec.base].is_adapter:
        raise SetupError(f"{spec.origin}: base {spec.base!r} is itself an adapter; a base is a full model")


# ---------------------------------------------------------------------------------------------
# model arguments


def get_spec(model: str | os.PathLike) -> ModelSpec:
    """The spec of a model argument: a registered name, or an HF model directory."""
    name = str(model)
    known = registered()
    if name in known:
        return known[name]
    path = Path(name)
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            raise SetupError(
                f"{name} is a PEFT adapter; give it a base in a registry file "
                f'([models.<name>] base = "<base model>", adapter = "{name}")'
            )
        return ModelSpec(result_name(name), local_dir=path, origin="the directory given")
    raise SetupError(f"unknown model {name!r} (not a directory either); known models: {', '.join(known)}")


def result_name(model: str | os.PathLike) -> str:
    """The filesystem-safe name of a model's result folder: a registered name as it is (they
    are checked safe), else the folder name of the model's directory with every character but
    letters, digits, '.', '_' and '-' replaced by '_'."""
    name = str(model)
    if name in registered():
        return name
    folder = Path(os.path.abspath(Path(name).expanduser())).name  # "." and "x/" name their folder
    return re.sub(r"[^A-Za-z0-9._-]", "_", folder).lstrip(".") or "model"


# ---------------------------------------------------------------------------------------------
# where the weights are


def _hf_cache_dir(repo: str) -> Path | None:
    """A snapshot of `repo` already in the HF cache, without touching the network."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo, local_files_only=True))
    except Exception:
        return None


def candidate_dirs(spec: ModelSpec) -> list[tuple[str, Path | None]]:
    """Where `spec`'s directory is looked for, in order, as (description, path) pairs."""
    if spec.origin is not None:
        return [(spec.origin, spec.local_dir)]
    env = os.environ.get(spec.env_var)
    models_dir = os.environ.get(MODELS_DIR_VAR)
    found = [
        (f"${spec.env_var}", Path(env) if env else None),
        (f"${MODELS_DIR_VAR}/{spec.name}", Path(models_dir) / spec.name if models_dir else None),
    ]
    if spec.local_dir is not None:
        found.append(("the organism directory", spec.local_dir))
    if spec.hf_repo is not None:
        found.append((f"HF cache for {spec.hf_repo}", _hf_cache_dir(spec.hf_repo)))
    return found


def _unset(where: str) -> str:
    if where.startswith("HF cache"):
        from huggingface_hub.constants import HF_HUB_CACHE

        return f"not under {HF_HUB_CACHE}"
    return "unset"


def resolve_dir(spec: ModelSpec) -> Path:
    """The first directory for `spec` that holds its config (adapter_config.json for an
    adapter, config.json otherwise), or a SetupError naming every place searched."""
    marker = "adapter_config.json" if spec.is_adapter else "config.json"
    searched = []
    for where, path in candidate_dirs(spec):
        if path is not None and (path / marker).exists():
            return path
        searched.append(f"{where} ({path or _unset(where)})")
    if spec.origin is not None:
        raise SetupError(f"weights for {spec.name} not found: {spec.local_dir} ({spec.origin}) has no {marker}")
    hint = " (or `make organism` to train the organism)" if spec.name in ORGANISM else ""
    raise SetupError(
        f"weights for {spec.name} not found; searched: {'; '.join(searched)}. "
        f"Set {spec.env_var}=/path/to/hf-dir or {MODELS_DIR_VAR}=/dir/containing/{spec.name}{hint}"
    )
