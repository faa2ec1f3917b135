"""A researcher's own pair through the whole pipeline: `make all MODELS="my-base my-ft"
REGISTRY=models.toml` on a tiny random checkpoint and a LoRA adapter on it, named in a registry
file: a LLaMA with grouped-query attention (as Llama-3, Mistral and Qwen2 have), and a Qwen3
(per-head q/k norms, grouped-query attention, tied embeddings as its small sizes have; the
adapter on every linear layer)."""

import subprocess
from pathlib import Path

import pytest

from tests import checkpoints

pytestmark = pytest.mark.xdist_group("processes-2")  # starts processes (make test: one per group at a time)


ROOT = Path(__file__).resolve().parents[2]
SMALL = {
    "CIRCUIT_ARGS": "--n 16 --minimality-n 16 --reference-n 16 --completeness-random 1 --quiet",
    "DCM_ARGS": "--n-train 32 --n-eval 16 --n-test 16 --seeds 1 --resamples 2 --extra none --quiet",
    "CMAP_ARGS": "--n 16 --quiet",
    "KNOCKOUT_ARGS": "--n 16 --quiet",
}


FAMILIES = {"llama": {}, "qwen3": {"tie_word_embeddings": True}}


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(FAMILIES))
def test_make_all_on_a_registry_pair(tmp_path, arch):
    hf = checkpoints.make(tmp_path / "base", arch, n_kv_heads=2, seed=3, **FAMILIES[arch])
    checkpoints.make_adapter(hf, tmp_path / "lora")
    (tmp_path / "models.toml").write_text(
        '[models.my-base]\npath = "base"\n\n[models.my-ft]\nbase = "my-base"\nadapter = "lora"\n'
    )
    results, figures = tmp_path / "results", tmp_path / "figures"
    variables = [f"{k}={v}" for k, v in SMALL.items()]
    command = [
        "make",
        "-C",
        str(ROOT),
        "-o",
        ".venv/.installed",
        "all",
        "MODELS=my-base my-ft",
        f"REGISTRY={tmp_path / 'models.toml'}",
        f"RESULTS={results}",
        f"FIGURES={figures}",
        *variables,
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("my-base", "my-ft"):
        assert (results / name / "circuit.json").exists() and (results / name / "dcm.json").exists()
    for table in ("table1.csv", "overlap.csv", "dcm.csv", "cmap.csv", "knockout.csv"):
        assert (results / table).stat().st_size > 0, table
    assert "my-ft" in (results / "cmap.csv").read_text()
    assert (figures / "report.html").stat().st_size > 1_000_000  # plotly.js inlined once, and the figures
    again = subprocess.run([*command[:5], "-q", *command[5:]], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0  # everything is up to date
