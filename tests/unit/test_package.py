"""`import et_circuits` stays light: it loads neither plotly nor the entity-tracking task, which
`et.figures` and `et.entity_tracking` load on first use (in a fresh interpreter, so that no
other test's imports count)."""

from __future__ import annotations

import subprocess
import sys

import pytest

CHECK = r"""
import sys
import et_circuits as et

loaded = sorted(m for m in sys.modules if m == "plotly" or m.startswith(("plotly.", "et_circuits.tasks",
                                                                         "et_circuits.presentation")))
assert not loaded, loaded
assert callable(et.path_patch) and callable(et.measure) and et.prepare is et.prepare_runs

figures = et.figures
assert figures is sys.modules["et_circuits.presentation"], figures
assert "plotly" in sys.modules and callable(figures.step_heatmaps)
task = et.entity_tracking
assert task is sys.modules["et_circuits.tasks.entity_tracking"], task
assert callable(task.data.make_prompts) and callable(task.recipe.discover)
from et_circuits.tasks.entity_tracking.paper import PAPER_STEPS
assert et.PAPER_STEPS is PAPER_STEPS
try:
    et.no_such_name
except AttributeError as e:
    assert "no_such_name" in str(e)
else:
    raise AssertionError("an unknown name resolved")
print("ok")
"""


@pytest.mark.xdist_group("processes-2")  # starts processes (make test: one per group at a time)
def test_import_is_light_and_lazy_names_resolve():
    proc = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
