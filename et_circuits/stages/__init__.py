"""Pipeline stages behind the CLI: each module has `register(subparsers)` adding its commands,
and owns the result files it writes under RESULTS/ (read by the next stage)."""

STAGES: list = []

from . import cmap as _cmap  # noqa: E402  (cmap and knockout)
STAGES.append(_cmap)

from . import circuit as _circuit  # noqa: E402  (circuit, table1, figures)
STAGES.append(_circuit)

from . import dcm as _dcm  # noqa: E402  (dcm, dcm-figure)
STAGES.append(_dcm)

from . import report as _report  # noqa: E402  (report)
STAGES.append(_report)
