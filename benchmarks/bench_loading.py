"""Loading memory: peak resident memory while `models.load` reads a random checkpoint (LLaMA,
or `--arch`) of about 1B parameters in bf16, against the checkpoint's size on disk. Goal: at most 1.5x (no fp32
copy, no second full copy of the weights on the CPU).

    python benchmarks/bench_loading.py            # ~1B parameters (2 GB in bf16)
    python benchmarks/bench_loading.py --small    # a tiny checkpoint, to test this script
    python benchmarks/bench_loading.py --arch gemma2   # another family's layout (model_type)

The checkpoint is written to a temporary directory; a fresh process loads it and reports the
growth of its resident memory's high-water mark (Linux /proc/self/status VmHWM, reset after
the imports) over what the imports took. The
last line is `loading peak_rss_ratio=<peak growth / size on disk> after_forward_ratio=<the same
once a forward pass has read every weight>`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = {
    "1b": dict(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=32000,
    ),
    "small": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=None,
    ),
}

CHILD = r"""
import json, sys
import torch
sys.path.insert(0, sys.argv[2])
from et_circuits import models

def status(key):  # kB, from /proc/self/status
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))

before = status("VmRSS")
open("/proc/self/clear_refs", "w").write("5")  # reset the high-water mark to the current RSS
model, _, _ = models.load(sys.argv[1], device="cpu", dtype=torch.bfloat16)
peak = status("VmHWM")
with torch.no_grad():
    model(torch.tensor([[1, 2, 3]]))  # touches every weight
used = status("VmHWM")
n = sum(p.numel() for p in model.parameters())
found = {"before_kib": before, "peak_kib": peak, "used_kib": used, "parameters": n, "dtype": str(model.cfg.dtype)}
print(json.dumps(found))
"""


def make_checkpoint(path: Path, geometry: dict, arch: str = "llama") -> int:
    """A random model of `arch` (an HF model_type) in bf16 with the organism's tokenizer;
    returns its size on disk in bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    sys.path.insert(0, str(ROOT))
    from et_circuits.tasks.entity_tracking.organism.tokenizer import build_tokenizer

    tok = build_tokenizer()
    config = AutoConfig.for_model(
        arch,
        **{**geometry, "vocab_size": geometry["vocab_size"] or len(tok)},
        head_dim=geometry["hidden_size"] // geometry["num_attention_heads"],  # Qwen3, Gemma default to their own
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a tiny checkpoint, to test this script")
    p.add_argument("--arch", default="llama", help="the checkpoint's model_type (default llama)")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        size = make_checkpoint(Path(tmp), GEOMETRY["small" if args.small else "1b"], args.arch)
        proc = subprocess.run([sys.executable, "-c", CHILD, tmp, str(ROOT)], capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = (found["peak_kib"] - found["before_kib"]) * 1024
    used = (found["used_kib"] - found["before_kib"]) * 1024
    ratio = grown / size
    print(
        f"{args.arch}: {found['parameters'] / 1e9:.2f}B parameters, {size / 2**30:.2f} GiB on disk ({found['dtype']}); "
        f"imports took {found['before_kib'] / 2**20:.2f} GiB; peak RSS grew by {grown / 2**30:.2f} GiB while "
        f"loading (the weights stay memory-mapped from the file) and by {used / 2**30:.2f} GiB "
        f"({used / size:.2f}x the size on disk) once a forward pass has read every weight"
    )
    print(f"loading peak_rss_ratio={ratio:.2f} after_forward_ratio={used / size:.2f}")
    return ratio


if __name__ == "__main__":
    main()
