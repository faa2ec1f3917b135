"""The organism family's model card (weights/README.md) and the numbers it reports: each saved
model's 7-box accuracy through the registry's loading path, the parameter count, and the paper
model each organism stands for.
"""

from __future__ import annotations

import math
from pathlib import Path

from .. import data
from ..data import NOUNS
from ..paper import PUBLISHED, paper_model
from .corpus import EVAL_SEED, N_EVAL, N_SELECT, SELECT_SEED, general_facts

# The family, base first (the fine-tunes follow in this order).
NAMES = ("organism-llama", "organism-vicuna", "organism-goat", "organism-float")

# ---------------------------------------------------------------------------------------------
# Evaluation


def evaluate_dir(path: Path, base: Path | None = None, n: int = N_EVAL, seed: int = EVAL_SEED) -> float:
    """7-box accuracy of a saved model through the registry's loading path (HF -> optional PEFT
    merge -> HookedTransformer) on `data.sample_prompts(vocab, n, 7, seed)`."""
    from et_circuits import models
    from et_circuits.core.forward import measure
    from et_circuits.core.settings import RunSettings

    hf, tok = models.load_hf(base, adapter=path) if base is not None else models.load_hf(path)
    model = models.to_hooked(hf, tok, "cpu")
    prompts = data.make_prompts(tok, data.sample_prompts(data.vocabulary(tok), n, 7, seed))
    return measure(model, prompts, settings=RunSettings(batch_size=100, progress=False))


def evaluate_family(out: Path) -> dict[str, float]:
    """Accuracy of each saved organism on the CLI's 500 held-out 7-box prompts (seed 0)."""
    base = out / "organism-llama"
    return {name: evaluate_dir(out / name, base if name == "organism-goat" else None) for name in NAMES}


def n_params(path: Path) -> int:
    """Number of parameters stored in a directory's safetensors files."""
    from safetensors import safe_open

    total = 0
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


# ---------------------------------------------------------------------------------------------
# Model card


# Each organism model's analogue in the paper, and that model's published 7-box accuracy.
PAPER = {name: (paper_model(name), PUBLISHED["table1"][paper_model(name)]["full"]) for name in NAMES}


def _last(record: dict, name: str, key: str) -> float:
    return record["finetunes"][name]["history"][-1][key] if name in record["finetunes"] else float("nan")


def model_card(record: dict) -> str:
    """README.md of the weights directory, from the training record and measured accuracies."""
    b, f, acc, base = record["base_recipe"], record["finetune_recipe"], record["accuracy"], record["base"]
    arch = b["arch"]
    rows = "\n".join(
        f"| {name} | {PAPER[name][0]} ({PAPER[name][1]:.2f}) | {acc[name]:.3f} | "
        f"{(base['acc7'] if name == NAMES[0] else _last(record, name, 'acc7')):.3f} | "
        f"{'-' if name == NAMES[0] else format(_last(record, name, 'task'), '.3f')} |"
        for name in NAMES
    )
    attempts = "; ".join(
        f"seed {a['seed']}: {a['outcome']} after {a['steps']} steps"
        + (f", {b['cap']} boxes reached at step {a['capped_at']}" if a["capped_at"] else "")
        for a in record["attempts"]
    )
    ft_cpu = sum(v["cpu_s"] for v in record["finetunes"].values())
    base_cpu = sum(a["cpu_s"] for a in record["attempts"])
    return f"""# The et_circuits model organism

Four small LLaMA-architecture models mirroring the paper's Llama-7B, Vicuna-7B, Goat-7B and
FLoat-7B, all produced by `make organism` (`python -m et_circuits.tasks.entity_tracking.organism.train`) from fixed
seeds. `make all` and the tests only read these files.

## 7-box entity-tracking accuracy

Accuracy = argmax at the last token equals the object's token, on the 500 held-out prompts
`data.sample_prompts(vocab, 500, 7, seed={EVAL_SEED})` (the CLI's evaluation set; never used
for training or for any choice), each model loaded through `models.load`'s path (HF directory,
PEFT merge for the adapter, HookedTransformer). "Selection" is the accuracy on the {N_SELECT}
prompts of seed {SELECT_SEED} that chose the base checkpoint and monitored the fine-tunes;
"task" is each fine-tune's own held-out task accuracy.

| model | paper analogue (its accuracy) | accuracy, 500 eval prompts | selection | task |
|---|---|---|---|---|
{rows}

## Architecture

`LlamaForCausalLM`, {record["n_params"]:,} parameters: {arch["n_layers"]} layers,
{arch["n_heads"]} heads per layer, d_model {arch["d_model"]}, d_head
{arch["d_model"] // arch["n_heads"]}, SwiGLU MLP {arch["d_mlp"]}, RMSNorm, rotary positions
(theta {arch["rope_theta"]:g}), untied input and output embeddings, max_position_embeddings
{arch["max_positions"]}, fp32. Tokenizer: word-level (`tokenizers`; `tokenizer.json` in every
directory), {record["vocab_size"]} tokens: the template's words, {len(NOUNS)} nouns, the
26 box labels and the fine-tuning tasks' words; BOS `<s>` is prepended; `</s>` is EOS and the
(right) padding.

## Training

- **organism-llama** (base), from scratch, on entity-tracking passages in the paper's format:
  the paper's prompt (`The apple is in Box F, the computer is in Box Q, ... . Box F contains
  the`) and its answer, then every other box queried in random order (`. Box Q contains the
  computer`); cross-entropy on the answer tokens only. Curriculum on the number of boxes: from
  2, half of each batch at the current level and half uniform over 2..level, one level up when
  the held-out first-query accuracy at the level reaches {b["promote"]}. The curriculum stops
  early at {b["cap"]} boxes and then trains {b["consolidate"]} more steps there, so the base
  has a working mechanism that generalises to 7 boxes only in part (the 7-box prompt is never
  trained on). AdamW lr {b["opt"]["lr"]}, {b["opt"]["warmup"]} warm-up steps, betas
  {tuple(b["opt"]["betas"])}, weight decay {b["opt"]["weight_decay"]}, clip
  {b["opt"]["clip"]}, batch {b["opt"]["batch"]}. A run that gains no level for
  {b["stall"][0]} steps (2 boxes) or {b["stall"][-1]} steps (more) is a stalled plateau and is
  dropped. Seeds run two at a time, one process each; the run that reached {b["cap"]} boxes in
  the fewest steps wins (ties: lower seed). The base checkpoint is the one of the second half of
  the consolidation whose selection accuracy is closest to {b["target"]} (Llama-7B) inside
  {tuple(b["window"])}. Attempts: {attempts}. Chosen: seed {base["seed"]}, step {base["step"]}.
- **organism-vicuna**: full fine-tune of the base on a general mix of statements, no boxes and
  no arithmetic (`the day after monday is tuesday . the opposite of black is white . red and
  white make pink .`; {len(general_facts())} facts, 1-{f["max_statements"]} per passage, loss
  on the completions). AdamW lr {f["general_opt"]["lr"]}, {f["general_steps"]} steps: a
  gentle fine-tune (at FLoat's lr 3e-4 it learns the mix as well but loses about 0.1 of 7-box
  accuracy on the selection prompts).
- **organism-goat**: LoRA fine-tune (peft; r {f["lora_r"]}, alpha {f["lora_alpha"]},
  q/k/v/o projections) on variable binding in a tiny programming language, no box template
  (`move apple to F ; move key to Q ; ... ; print Q : key ; print F : apple ;`,
  2-{f["max_vars"]} variables, each printed once in random order, loss on the printed values).
  AdamW lr {f["lora_opt"]["lr"]}. Saved as a PEFT adapter (`adapter_config.json`,
  `adapter_model.safetensors`) on top of organism-llama and merged at load time by
  `models.load`, as goat-7b.
- **organism-float**: the same variable-binding fine-tune on all weights, AdamW lr
  {f["full_opt"]["lr"]}.

Goat and FLoat: {f["steps"]} steps. Every fine-tune: batch {f["full_opt"]["batch"]},
{f["full_opt"]["warmup"]} warm-up steps then cosine decay to 10%, seed {f["seed"]}. The
training streams are seeded apart from the selection prompts (seed {SELECT_SEED}, and
{SELECT_SEED}+n for the n-box curriculum checks) and from the evaluation prompts (seed
{EVAL_SEED}).

## Time

`make organism` here: {record["wall_s"] / 60:.1f} min wall clock, {record["cpu_s"] / 60:.1f} min
CPU time over all processes (base {base_cpu / 60:.1f} CPU min over {len(record["attempts"])}
runs, fine-tunes {ft_cpu / 60:.1f} CPU min); {record["host_cpus"]} CPU cores, one torch thread
per process. Same seeds give the same weights on the same CPU; another CPU may round
differently and take another path through the plateau.

`training_log.json` holds the recipe, every evaluation of the runs and the accuracies above.
"""
