import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/util.py

# Compiled kernels go to a fresh cache for each test session, never the user's.
os.environ.setdefault("ITDSL_CACHE_DIR", tempfile.mkdtemp(prefix="itdsl-test-cache-"))


# ---- golden files (tests/test_printer.py) ------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ instead of comparing")


@pytest.fixture
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))
