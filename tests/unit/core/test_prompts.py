"""`PromptSet` checks: token ids against a model's vocabulary."""

from __future__ import annotations

import pytest
import torch

from et_circuits.core.errors import DataError
from et_circuits.core.prompts import PromptSet


def test_prompt_ids_are_checked_against_a_vocabulary():
    prompts = PromptSet(torch.tensor([[1, 2, 3]]), torch.tensor([4]), wrong_answers=torch.tensor([[9]]))
    assert prompts.check_vocab(10) is prompts
    with pytest.raises(DataError, match=r"token id 9 in wrong_answers is outside the model's vocabulary \(0..8\)"):
        prompts.check_vocab(9)
    with pytest.raises(DataError, match="token id 4 in answers"):
        prompts.check_vocab(4)
    with pytest.raises(DataError, match="token id 3 in input_ids"):
        prompts.check_vocab(3)
