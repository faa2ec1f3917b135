"""Circuit discovery: `find_circuit` chains path-patching steps (each group among the senders that
reach its receivers), reuses finished steps through `finished` / `on_step` (the circuit stage's
step files: written with their receivers, reused on a rerun, recomputed where their inputs
changed), caps top-k for small models, and the `FoundCircuit` result reads and writes."""

from __future__ import annotations

import json

import pytest
import torch

from et_circuits.core.errors import CircuitError
from et_circuits.core.settings import RunSettings
from et_circuits.core.types import Receiver
from et_circuits.methods import discovery
from et_circuits.methods import path_patching as pp
from et_circuits.methods.discovery import FoundCircuit, Step
from et_circuits.pipeline.results import load_scores, step_files
from et_circuits.tasks.entity_tracking import data, recipe
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
from tests.planted import scaled_llama

S = RunSettings(batch_size=6, progress=False)


@pytest.fixture(scope="module", params=[None, 2], ids=["mha", "gqa"])
def scaled(request, tmp_path_factory):
    model, tok = scaled_llama(tmp_path_factory.mktemp("scaled"), request.param)
    vocab = data.vocabulary(tok, min_labels=8)
    clean, corrupt = recipe.path_patching_prompts(tok, vocab, 20, 7, seed=3)
    return model, tok, clean, corrupt


def test_find_circuit_saves_and_resumes(scaled, tmp_path, monkeypatch):
    """Through the circuit stage's step files: every step written with its receivers; a rerun
    reuses every step; another top-k for B recomputes only C; another seed everything."""
    model, _, clean, corrupt = scaled
    meta = {"model": "tiny", "seed": "3", "n": str(len(clean))}

    def run(top_k, meta):
        finished, on_step = step_files(tmp_path, meta, "fast")
        return discovery.find_circuit(
            model, clean, corrupt, top_k, PAPER_STEPS, settings=S, finished=finished, on_step=on_step
        )

    found = run((3, 2, 2, 2), meta)
    first, scores = found.circuit, {g: r.scores for g, r in found.scores.items()}
    assert found.reused == ()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert files == sorted(f"{s.group}.safetensors" for s in PAPER_STEPS)
    saved, key = load_scores(tmp_path / "pos_transmitter.safetensors")
    torch.testing.assert_close(saved, scores["pos_transmitter"])
    assert key["seed"] == "3" and key["method"] == "fast"
    assert key["receivers"] == str(pp.top_heads(scores["value_fetcher"], 3))
    assert first.positions == {s.group: s.position for s in PAPER_STEPS}
    assert first.groups["value_fetcher"] == pp.top_heads(scores["value_fetcher"], 3)

    calls = []
    real = discovery.path_patch
    monkeypatch.setattr(discovery, "path_patch", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    again = run((3, 2, 2, 2), meta)
    assert calls == []  # every step reused
    assert again.reused == tuple(s.group for s in PAPER_STEPS)
    assert again.circuit.groups == first.groups
    assert all(torch.allclose(scores[g], again.scores[g].scores, atol=0, rtol=0, equal_nan=True) for g in scores)
    fewer = run((3, 1, 2, 2), meta)  # another top-k for B: C recomputed, D only if C's heads changed
    changed = fewer.circuit.groups["pos_detector"] != first.groups["pos_detector"]
    assert calls == ["query_label", *(["prev_query_label"] if changed else [])]
    assert fewer.reused == ("value_fetcher", "pos_transmitter", *(() if changed else ("struct_reader",)))
    calls.clear()
    run((3, 1, 2, 2), {**meta, "seed": "4"})  # another seed in the metadata: everything recomputed
    assert calls == [s.position for s in PAPER_STEPS]


def test_corrupt_score_file_is_an_error(tmp_path):
    bad = tmp_path / "value_fetcher.safetensors"
    bad.write_text("not a tensor file")
    with pytest.raises(CircuitError, match="not a path-patching score file"):
        load_scores(bad)
    with pytest.raises(CircuitError, match="no path-patching scores"):
        load_scores(tmp_path / "missing.safetensors")


def test_finished_and_on_step_in_memory(scaled):
    """`finished` hands back a step's earlier `PathPatching` (the step is then not recomputed,
    and its heads are chosen from those scores); `on_step` sees every step once, in order, with
    its receivers, result and whether it was reused."""
    model, _, clean, corrupt = scaled
    seen = []

    def on_step(step, receivers, result, reused, seconds):
        seen.append((step.group, list(receivers), result, reused))
        assert seconds >= 0

    first = discovery.find_circuit(model, clean, corrupt, (3, 2, 2, 2), PAPER_STEPS, settings=S, on_step=on_step)
    assert [(g, reused) for g, _, _, reused in seen] == [(s.group, False) for s in PAPER_STEPS]
    assert all(result is first.scores[g] for g, _, result, _ in seen)
    assert seen[0][1] == []
    assert seen[1][1] == discovery.step_receivers(PAPER_STEPS[1], first.circuit.groups["value_fetcher"])
    # B's scores handed back with their sign flipped: B becomes the heads B ranked last
    flipped = pp.PathPatching(-first.scores["pos_transmitter"].scores, "last")
    asked = []

    def finished(step, receivers):
        asked.append(step.group)
        return flipped if step.group == "pos_transmitter" else None

    seen.clear()
    again = discovery.find_circuit(
        model, clean, corrupt, (3, 2, 2, 2), PAPER_STEPS, settings=S, finished=finished, on_step=on_step
    )
    assert asked == [s.group for s in PAPER_STEPS] and again.reused == ("pos_transmitter",)
    assert again.scores["pos_transmitter"] is flipped and seen[1][2] is flipped and seen[1][3] is True
    reach = discovery.reachable(seen[1][1], 4, 4)
    assert again.circuit.groups["pos_transmitter"] == flipped.top(2, among=reach)
    assert again.circuit.groups["pos_transmitter"] != first.circuit.groups["pos_transmitter"]
    assert again.circuit.groups["value_fetcher"] == first.circuit.groups["value_fetcher"]


def test_steps_are_checked(scaled):
    model, _, clean, corrupt = scaled
    with pytest.raises(CircuitError, match="one per step"):
        discovery.find_circuit(model, clean, corrupt, (3, 2), PAPER_STEPS, settings=S)
    orphan = (Step("a", "last", None), Step("b", "last", "q", receivers_from="nowhere"))
    with pytest.raises(CircuitError, match="no earlier step found"):
        discovery.find_circuit(model, clean, corrupt, (1, 1), orphan, settings=S)


def test_effective_top_k():
    assert discovery.effective_top_k(recipe.PAPER_TOP_K, 32, 32, 0.25) == (20, 5, 10, 5)
    assert discovery.effective_top_k(recipe.PAPER_TOP_K, 4, 4, 0.25) == (4, 4, 4, 4)
    assert discovery.effective_top_k((20, 1, 10, 5), 2, 2, 0.25) == (1, 1, 1, 1)
    with pytest.raises(CircuitError):
        discovery.effective_top_k((1, 2, 3, 0), 4, 4, 0.25)


def test_reachable_and_step_receivers():
    receivers = [Receiver(2, 1, "q", "last"), Receiver(3, 0, "q", "last")]
    assert discovery.reachable(receivers, 4, 2) == [(l, h) for l in range(3) for h in range(2)]
    assert discovery.reachable([], 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert discovery.step_receivers(Step("c", "query_label", "kv"), [(1, 2)]) == [
        Receiver(1, 2, "k", "query_label"),
        Receiver(1, 2, "v", "query_label"),
    ]
    assert discovery.step_receivers(Step("a", "last", None), [(1, 2)]) == []


# ---------------------------------------------------------------------------------------------
# The result type


@pytest.fixture(scope="module")
def found(tiny):
    """A real `FoundCircuit` on the tiny model: the paper's four steps, top-k (2, 1, 1, 1)."""
    model, tok = tiny
    clean, corrupt = recipe.path_patching_prompts(tok, data.vocabulary(tok, min_labels=8), 8, 7, seed=1)
    return discovery.find_circuit(model, clean, corrupt, (2, 1, 1, 1), PAPER_STEPS, settings=S)


def test_found_circuit_json_round_trip(found):
    assert len(found.circuit.groups["value_fetcher"]) == 2 and found.steps == PAPER_STEPS
    d = found.to_json()
    back = FoundCircuit.from_json(json.loads(json.dumps(d)))
    assert back.to_json() == d
    assert back.circuit == found.circuit and back.steps == found.steps and back.top_k == found.top_k
    assert back.reused == found.reused and list(back.scores) == list(found.scores)
    for group, result in found.scores.items():
        torch.testing.assert_close(back.scores[group].scores, result.scores, equal_nan=True, atol=0, rtol=0)
        assert back.scores[group].receivers == result.receivers


def test_found_circuit_frame(found):
    frame = found.to_frame()
    assert list(frame.columns) == ["group", "layer", "head", "score", "chosen"]
    scored = sum(int((~r.scores.isnan()).sum()) for r in found.scores.values())
    assert len(frame) == scored > 0  # one row per (step, sender)
    for group, heads in found.circuit.groups.items():
        rows = frame[frame["group"] == group]
        assert sorted(zip(rows[rows["chosen"]]["layer"], rows[rows["chosen"]]["head"])) == sorted(heads)
    a = frame[frame["group"] == "value_fetcher"]
    assert len(a) == 8 and a["chosen"].sum() == 2


def test_found_circuit_repr(found):
    text = repr(found)
    assert "\n" not in text and len(text) < 300 and "tensor" not in text
    assert text.startswith("FoundCircuit(Circuit(value_fetcher: ") and "top-k [2, 1, 1, 1]" in text


def test_screened_discovery_chooses_from_exact_scores_of_the_screened(scaled, tmp_path):
    """screen=N: attribution for every sender, exact for the N with the largest |attribution|
    among those that can reach a receiver, the group from those exact scores; the step files
    keep both and their key has the screen, so exact and screened files are not mixed up."""
    model, _, clean, corrupt = scaled
    top_k, n = (3, 2, 2, 2), 5
    meta = {"model": "tiny", "seed": "3", "n": str(len(clean))}
    finished, on_step = step_files(tmp_path, meta, "fast", (n, 1))
    found = discovery.find_circuit(
        model, clean, corrupt, top_k, PAPER_STEPS, screen=n, settings=S, finished=finished, on_step=on_step
    )
    assert found.screen == n and set(found.attribution) == {s.group for s in PAPER_STEPS}
    exact_all = discovery.find_circuit(model, clean, corrupt, top_k, PAPER_STEPS, settings=S)
    for i, step in enumerate(PAPER_STEPS):
        group, estimate, exact = step.group, found.attribution[step.group], found.scores[step.group]
        receivers = discovery.step_receivers(step, found.circuit.groups[PAPER_STEPS[i - 1].group] if i else [])
        among = discovery.reachable(receivers, 4, 4)
        assert estimate.method == "attribution"
        assert estimate.scores.isnan().all() != bool(receivers or step.receiver_kind is None)  # no receiver: no sender
        screened = discovery.screened_senders(estimate, n, among)
        assert sorted(map(tuple, (~exact.scores.isnan()).nonzero().tolist())) == sorted(screened)
        assert found.circuit.groups[group] == pp.top_heads(exact.scores, top_k[i])
        if i == 0:  # same receivers (none): the screened exact scores are the exact ones
            torch.testing.assert_close(
                exact.scores[~exact.scores.isnan()], exact_all.scores[group].scores[~exact.scores.isnan()]
            )
    saved, key = load_scores(tmp_path / "value_fetcher.safetensors")
    assert key["screen"] == str(n) and key["ig_steps"] == "1"
    again = discovery.find_circuit(
        model, clean, corrupt, top_k, PAPER_STEPS, screen=n, settings=S, finished=finished, on_step=on_step
    )
    assert again.reused == tuple(s.group for s in PAPER_STEPS) and again.circuit == found.circuit
    torch.testing.assert_close(again.attribution["value_fetcher"].scores, found.attribution["value_fetcher"].scores)
    exact_finished, _ = step_files(tmp_path, meta, "fast")
    assert exact_finished(PAPER_STEPS[0], []) is None  # a screened file is not an exact one
    assert json.loads(json.dumps(found.to_json()))["screen"] == n
    assert FoundCircuit.from_json(found.to_json()).attribution.keys() == found.attribution.keys()


def test_screen_is_checked(scaled):
    model, _, clean, corrupt = scaled
    with pytest.raises(CircuitError, match="at least every top-k"):
        discovery.find_circuit(model, clean, corrupt, (3, 2, 2, 2), PAPER_STEPS, screen=2, settings=S)
    with pytest.raises(CircuitError, match="estimate"):
        discovery.find_circuit(model, clean, corrupt, (3, 2, 2, 2), PAPER_STEPS, method="attribution", settings=S)
