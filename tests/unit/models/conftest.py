"""Every models test starts without a registry file and leaves none chosen."""

import pytest

from et_circuits import models


@pytest.fixture(autouse=True)
def no_registry(monkeypatch):
    monkeypatch.delenv(models.REGISTRY_VAR, raising=False)
    models.use_registry(None)
    yield
    models.use_registry(None)
