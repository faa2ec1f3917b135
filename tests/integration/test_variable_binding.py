"""A second task, to show the methods are task-neutral: variable binding
(`move apple to F ; ... ; print F :` -> apple), which organism-goat and organism-float were
fine-tuned on. Built here from token ids and positions of its own, and run through
`import et_circuits as et` alone: path patching with a metric of its own, DCM and CMAP
(goat -> llama)."""

import random

import pytest
import torch

import et_circuits as et

NAMES, VALUES = "ABCDEFGHIJKLMNOPQRSTUVWXYZ", ["apple", "key", "pen", "cup", "hat", "map", "bag", "ring"]
QUIET = et.RunSettings(progress=False)


def programs(tok, n, n_vars=4, seed=0, ask_other=None):
    """`n` programs of `n_vars` bindings printing one variable (with `ask_other`, a seed: the
    same programs printing another variable). Positions: `var` (the printed variable) and
    `binding` (its `move ... to` occurrence); wrong answers: the other values."""
    rng, other = random.Random(seed), random.Random(ask_other)
    rows, answers, wrong, var, binding = [], [], [], [], []
    for _ in range(n):
        names, values, q = rng.sample(NAMES, n_vars), rng.sample(VALUES, n_vars), rng.randrange(n_vars)
        if ask_other is not None:
            q = other.choice([i for i in range(n_vars) if i != q])
        text = " ; ".join(f"move {v} to {x}" for x, v in zip(names, values)) + f" ; print {names[q]} :"
        ids = tok(text).input_ids
        rows.append(ids)
        answers.append(tok.convert_tokens_to_ids(values[q]))
        wrong.append([tok.convert_tokens_to_ids(v) for i, v in enumerate(values) if i != q])
        var.append(len(ids) - 2)
        binding.append(tok.convert_ids_to_tokens(ids).index(names[q]))
    return et.PromptSet(
        torch.tensor(rows),
        torch.tensor(answers),
        {"var": torch.tensor(var), "binding": torch.tensor(binding)},
        wrong_answers=torch.tensor(wrong),
    )


def value_pairs(tok, n, seed):
    """DCM pairs: the source binds other values; the target is the source's answer."""
    base, source = programs(tok, n, seed=seed), programs(tok, n, seed=seed + 1000)
    return et.Pairs(base.replace(answers=source.answers), source)


@pytest.fixture(scope="module")
def models():
    goat, tok, _ = et.load("organism-goat", device="cpu")
    llama, _, _ = et.load("organism-llama", device="cpu")
    return goat, llama, tok


@pytest.fixture(scope="module")
def prompts(models):
    tok = models[2]
    return programs(tok, 120, seed=1), programs(tok, 120, seed=1, ask_other=5)


def test_prompts_carry_their_own_positions(models, prompts):
    tok = models[2]
    clean, corrupt = prompts
    toks = tok.convert_ids_to_tokens(clean.input_ids[0])
    assert (
        toks[clean.position("last")[0]] == ":" and toks[clean.position("var")[0]] == toks[clean.position("binding")[0]]
    )
    assert (clean.answers != corrupt.answers).all() and torch.equal(clean.position("last"), corrupt.position("last"))


def test_goat_does_the_task_and_llama_does_not(models, prompts):
    goat, llama, _ = models
    assert et.measure(goat, prompts[0]) > 0.9
    assert et.measure(llama, prompts[0]) < 0.3


def test_path_patching_with_the_tasks_metric(models, prompts):
    """Logit difference, absolute: goat's layer-1 value fetchers at the last token rank first,
    and the fast method equals the reference with senders and receivers at this task's own
    position."""
    goat, _, _ = models
    clean, corrupt = prompts
    scores = et.path_patch(goat, clean, corrupt, "last", metric=et.logit_diff, settings=QUIET)
    fetchers = et.top_heads(scores, 3)
    assert set(fetchers) == {(1, 1), (1, 2), (1, 3)} and scores.scores.min() < -1.0
    assert (scores.metric, scores.relative, scores.n) == ("logit_diff", False, len(clean))
    receivers = [et.Receiver(1, h, kind, "var") for h in range(4) for kind in "kv"]  # the changed token
    options = dict(receivers=receivers, metric=et.logit_diff, settings=QUIET)
    fast = et.path_patch(goat, clean[:40], corrupt[:40], "var", **options).scores
    ref = et.path_patch(goat, clean[:40], corrupt[:40], "var", **options, method="reference").scores
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=1e-5)
    assert fast.abs().max() > 3e-3  # 30x the tolerance: layer-0 heads at var matter through layer 1's keys / values


def test_dcm_finds_the_value_carriers(models):
    """DCM with the task's own pairs selects value fetchers, which carry the value."""
    goat, _, tok = models
    heads = [(1, 1), (1, 2), (1, 3), (0, 0)]
    result = et.dcm(
        goat, heads, "last", value_pairs(tok, 192, 10), value_pairs(tok, 96, 20), n_train=128, n_eval=64, seeds=(0, 1)
    )
    assert set(result.selected) <= {(1, 1), (1, 2), (1, 3)} and (1, 2) in result.selected
    assert result.mean > 0.8 and result.metric == "accuracy"


def test_cmap_goat_fetchers_into_llama(models, prompts):
    """Goat's three value fetchers' outputs at the last token give llama goat's accuracy."""
    goat, llama, _ = models
    fetchers = et.Circuit({"fetchers": [(1, 1), (1, 2), (1, 3)]}, {"fetchers": "last"})
    none = et.Circuit({"fetchers": [(0, 3)]}, {"fetchers": "last"})
    result = et.cmap(llama, goat, prompts[0], [et.Variant("fetchers", "z", fetchers), et.Variant("other", "z", none)])
    (_, with_fetchers), (_, with_other) = result.variants
    assert result.base < 0.3 and result.source > 0.9
    assert with_fetchers > 0.9 and with_other < 0.4
