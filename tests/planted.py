"""Hand-built TransformerLens models (LLaMA geometry: RMSNorm, rotary, gated MLP) whose answer
depends, by construction, on one known head at one known position, plus random tiny LLaMAs and
prompt sets for the oracle comparisons, and scaled random LLaMA checkpoints loaded through the
package (`scaled_llama`) for the path-patching, discovery and sweep tests.

The planted model (`planted_model`)
-----------------------------------
Tokens: BOS (0), fillers (1..15; 1 doubles as padding) and eight *answer-class* tokens (16..23).
Every prompt holds exactly one answer-class token, at a position that varies between prompts;
its answer is that token. Residual stream (d_model 32):

    dim 0        CONST   1 in every token's embedding
    dim 1        MARK    1 in the embedding of answer-class tokens
    dims 2..9    IDENT   one-hot identity of the answer-class token
    dims 10..17  OUT     where the planted head writes; the unembedding reads only these
    dims 18..31  FILL    one-hot identity of a filler token (so fillers differ)

The planted head L1H0 at the last token: its query reads CONST, its key reads MARK, both in the
rotary pair with the lowest frequency (dims 3 and 7 of d_head 8, with a large rotary base), so
it attends to the single answer-class token wherever it is (weight ~1 - 1e-9). Its value copies
IDENT, its W_O writes it into OUT, and the unembedding maps OUT[i] to answer token i with a
margin of ~20 logits. Every other head (all of layer 0, L1H1-L1H3) has random W_Q, W_K, W_V and
W_O = 0: no effect at all. MLPs are zero. So: accuracy 1; patching the head's z at the last
token from a prompt with another answer makes the model answer that one; nothing else matters.

`without_head` is the same model with the planted head's W_V zeroed: its z is 0, so the model
has no answer (all logits 0, argmax BOS, accuracy 0), but its W_O still reads z, so patching the
head's z from the planted model restores the answer (CMAP's "model without the head"). Zeroing
W_O instead would make every z patch a no-op.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from et_circuits import models
from et_circuits.core.prompts import PromptSet
from tests.conftest import make_checkpoint

# ---------------------------------------------------------------------------------------------
# The planted model's layout

BOS = 0
FILLERS = tuple(range(1, 16))
PAD = FILLERS[0]
ANSWERS = tuple(range(16, 24))
D_VOCAB = 24
CONST, MARK = 0, 1
IDENT = tuple(range(2, 10))
OUT = tuple(range(10, 18))
FILL = tuple(range(18, 32))  # fillers 2..15 (filler 1 = PAD has none of its own)
D_MODEL, D_HEAD, N_HEADS, N_LAYERS = 32, 8, 4, 2
PLANTED = (1, 0)  # the head that finds and copies the answer, at the last token
NO_EFFECT = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS) if (layer, head) != PLANTED]
SLOW = D_HEAD // 2 - 1  # the rotary pair (SLOW, SLOW + D_HEAD // 2) with the lowest frequency


def llama_config(
    n_layers: int,
    n_heads: int,
    d_model: int,
    d_head: int,
    d_vocab: int,
    n_kv_heads: int | None = None,
    rotary_base: float = 10000.0,
) -> HookedTransformerConfig:
    """A TransformerLens config with the settings of a converted LLaMA checkpoint (RMSNorm,
    non-adjacent rotary pairs over the whole head, gated SiLU MLP, final RMSNorm, fp32 CPU)."""
    return HookedTransformerConfig(
        d_model=d_model,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=2 * d_model,
        n_layers=n_layers,
        n_ctx=64,
        eps=1e-6,
        d_vocab=d_vocab,
        act_fn="silu",
        n_key_value_heads=n_kv_heads,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=rotary_base,
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        device="cpu",
        dtype=torch.float32,
        default_prepend_bos=True,
        seed=0,
    )


def _zero_(model: HookedTransformer) -> None:
    """Every weight and bias 0, every RMSNorm weight 1."""
    for name, p in model.named_parameters():
        p.fill_(1.0 if name.endswith(".w") else 0.0)


@torch.no_grad()
def planted_model() -> HookedTransformer:
    """The model described in the module docstring."""
    model = HookedTransformer(llama_config(N_LAYERS, N_HEADS, D_MODEL, D_HEAD, D_VOCAB, rotary_base=1e6))
    _zero_(model)
    embed = model.embed.W_E
    for token in (BOS, *FILLERS, *ANSWERS):
        embed[token, CONST] = 1.0
    for i, token in enumerate(FILLERS[1:]):
        embed[token, FILL[i]] = 1.0
    for i, token in enumerate(ANSWERS):
        embed[token, MARK] = 1.0
        embed[token, IDENT[i]] = 1.0

    g = torch.Generator().manual_seed(0)
    for layer, head in NO_EFFECT:  # they attend and read, but write nothing
        attn = model.blocks[layer].attn
        for w in (attn.W_Q, attn.W_K, attn.W_V):
            w[head] = 0.3 * torch.randn(D_MODEL, D_HEAD, generator=g)

    layer, head = PLANTED
    attn = model.blocks[layer].attn
    attn.W_Q[head, CONST, SLOW] = 2.5  # query: "find the answer-class token" from every position
    attn.W_K[head, MARK, SLOW] = 2.5  # key: "I am the answer-class token"
    for i in range(len(ANSWERS)):
        attn.W_V[head, IDENT[i], i] = 1.0  # value: which answer token it is
        attn.W_O[head, i, OUT[i]] = 1.0  # output: into OUT, which the unembedding reads
        model.unembed.W_U[OUT[i], ANSWERS[i]] = 4.0
    return model.eval()


@torch.no_grad()
def without_head(model: HookedTransformer, head: tuple[int, int] = PLANTED) -> HookedTransformer:
    """A copy of `model` whose `head` reads nothing (W_V zeroed): its z is 0 everywhere."""
    other = _copy(model)
    other.blocks[head[0]].attn.W_V[head[1]] = 0.0
    return other


def _copy(model: HookedTransformer) -> HookedTransformer:
    other = HookedTransformer(model.cfg)
    other.load_state_dict(model.state_dict())
    return other.eval()


# ---------------------------------------------------------------------------------------------
# Planted prompts


def planted_prompts(n: int, seed: int, seq: int = 12, min_len: int = 7) -> PromptSet:
    """`n` prompts of `min_len`..`seq` real tokens (right-padded to `seq`): BOS, fillers, one
    answer-class token somewhere in 1..len-3, last token a filler. Positions: "last", "answer"
    (where the answer-class token sits), and the three names the paper's groups act at:
    "query_label" = last - 2 and "prev_query_label" = answer + 1 (both carry no information
    here; they give the other groups somewhere to be)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((n, seq), PAD)
    mask = torch.zeros(n, seq, dtype=torch.long)
    answers, where, last = [], [], []
    fillers = torch.tensor(FILLERS)
    for b in range(n):
        length = int(torch.randint(min_len, seq + 1, (1,), generator=g))
        ids[b, 0] = BOS
        ids[b, 1:length] = fillers[torch.randint(len(FILLERS), (length - 1,), generator=g)]
        at = int(torch.randint(1, length - 2, (1,), generator=g))
        answer = ANSWERS[int(torch.randint(len(ANSWERS), (1,), generator=g))]
        ids[b, at] = answer
        mask[b, :length] = 1
        answers.append(answer)
        where.append(at)
        last.append(length - 1)
    last_t, where_t = torch.tensor(last), torch.tensor(where)
    positions = {"last": last_t, "answer": where_t, "query_label": last_t - 2, "prev_query_label": where_t + 1}
    return PromptSet(ids, torch.tensor(answers), positions, mask)


def other_answers(prompts: PromptSet, seed: int) -> PromptSet:
    """The same prompts with each answer-class token replaced by another answer-class token
    (path patching's corrupt prompts: same positions, another answer)."""
    g = torch.Generator().manual_seed(seed)
    ids = prompts.input_ids.clone()
    new = []
    for b in range(len(prompts)):
        shift = int(torch.randint(1, len(ANSWERS), (1,), generator=g))
        token = ANSWERS[(ANSWERS.index(int(prompts.answers[b])) + shift) % len(ANSWERS)]
        ids[b, int(prompts.positions["answer"][b])] = token
        new.append(token)
    return PromptSet(ids, torch.tensor(new), dict(prompts.positions), prompts.attention_mask)


# ---------------------------------------------------------------------------------------------
# Random tiny LLaMAs and prompts for the oracle comparisons


@torch.no_grad()
def random_llama(
    seed: int,
    n_kv_heads: int | None = None,
    n_layers: int = 4,
    n_heads: int = 4,
    d_model: int = 32,
    d_head: int = 8,
    d_vocab: int = 40,
    std: float = 0.25,
) -> HookedTransformer:
    """A random LLaMA-geometry model whose weights are large enough (std 0.25 at d_model 32,
    ~10x a trained model's) that every head visibly changes the output."""
    model = HookedTransformer(llama_config(n_layers, n_heads, d_model, d_head, d_vocab, n_kv_heads))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith(".w"):
            p.fill_(1.0)
        elif p.ndim >= 2:
            p.copy_(std * torch.randn(p.shape, generator=g))
        else:
            p.zero_()
    return model.eval()


def scaled_llama(path, n_kv_heads: int | None = None, dtype: torch.dtype = torch.float32):
    """A 4-layer, 4-head random LLaMA checkpoint (d_model 32, seed 1) saved to `path` and loaded
    with `models.load` (with the organism tokenizer), its weight matrices scaled up 10x so that
    heads have visible effects; returns (model, tokenizer)."""
    make_checkpoint(path, n_layers=4, n_heads=4, n_kv_heads=n_kv_heads, d_model=32, seed=1)
    model, tok, _ = models.load(path, device="cpu", dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(10)
    return model, tok


def random_prompts(n: int, seed: int, d_vocab: int = 40, seq: int = 14, min_len: int = 10) -> PromptSet:
    """`n` random prompts of `min_len`..`seq` tokens (right-padded with token 1; token 0 is BOS)
    with positions "last", "query_label" = last - 2 and "prev_query_label" anywhere in
    2..last - 4; answers are random tokens (tests usually replace them with the model's own
    predictions)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, d_vocab, (n, seq), generator=g)
    ids[:, 0] = BOS
    mask = torch.zeros(n, seq, dtype=torch.long)
    last, prev = [], []
    for b in range(n):
        length = int(torch.randint(min_len, seq + 1, (1,), generator=g))
        ids[b, length:] = 1
        mask[b, :length] = 1
        last.append(length - 1)
        prev.append(int(torch.randint(2, length - 4, (1,), generator=g)))
    last_t = torch.tensor(last)
    positions = {"last": last_t, "query_label": last_t - 2, "prev_query_label": torch.tensor(prev)}
    return PromptSet(ids, torch.randint(2, d_vocab, (n,), generator=g), positions, mask)


def corrupted(prompts: PromptSet, seed: int, d_vocab: int = 40) -> PromptSet:
    """Path patching's corrupt prompts for `random_prompts`: new tokens at the previous query
    label, the query label and one position between (same lengths and positions)."""
    g = torch.Generator().manual_seed(seed)
    ids = prompts.input_ids.clone()
    for b in range(len(prompts)):
        prev, query = int(prompts.positions["prev_query_label"][b]), int(prompts.positions["query_label"][b])
        for at in (prev, int(torch.randint(prev + 1, query, (1,), generator=g)), query):
            ids[b, at] = (ids[b, at] - 2 + int(torch.randint(1, d_vocab - 2, (1,), generator=g))) % (d_vocab - 2) + 2
    return PromptSet(ids, prompts.answers, dict(prompts.positions), prompts.attention_mask)


@torch.no_grad()
def with_own_answers(model: HookedTransformer, prompts: PromptSet, keep_every: int = 1) -> PromptSet:
    """`prompts` whose answer is the model's own argmax at the last token (so the full model is
    right), except every `keep_every`-th prompt keeps its random answer when `keep_every` > 1
    (so full accuracy is below 1 and faithfulness differs from circuit accuracy)."""
    logits = model(prompts.input_ids)
    rows = torch.arange(len(prompts))
    own = logits[rows, prompts.positions["last"]].argmax(-1)
    if keep_every > 1:
        own = torch.where(rows % keep_every == 0, prompts.answers, own)
    return prompts.replace(answers=own)


def source_prompts(base: PromptSet, seed: int) -> PromptSet:
    """DCM's source prompts for `base`: other random planted prompts (other lengths, other
    answer positions) whose answer differs from the paired base prompt's."""
    source = planted_prompts(len(base), seed, base.seq_len)
    ids, answers = source.input_ids.clone(), source.answers.clone()
    for b in range(len(base)):
        if answers[b] == base.answers[b]:
            token = ANSWERS[(ANSWERS.index(int(answers[b])) + 1) % len(ANSWERS)]
            ids[b, int(source.positions["answer"][b])] = token
            answers[b] = token
    return PromptSet(ids, answers, dict(source.positions), source.attention_mask)
