import functools
import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/util.py

# Compiled kernels go to a fresh cache for each test session, never the user's.
os.environ.setdefault("ITDSL_CACHE_DIR", tempfile.mkdtemp(prefix="itdsl-test-cache-"))
# Tests call the kernels at small sizes to test them: the small-call path (a materialised
# evaluation in torch, `itdsl.set_small_pairs`) is off except where a test turns it on.
os.environ["ITDSL_SMALL_PAIRS"] = "0"


# ---- golden files (tests/test_printer.py) ------------------------------------------------------


def pytest_addoption(parser):
    parser.addoption("--update-golden", action="store_true", default=False,
                     help="rewrite the golden files under tests/golden/ instead of comparing")


@pytest.fixture
def update_golden(request) -> bool:
    return bool(request.config.getoption("--update-golden"))


# ---- the Plan verifier, on every Plan the tests build or load -----------------------------------
# `itdsl.symbolic.verify.verify_plan` runs after `build_plan` (every path that analyses an
# operator goes through it: `analyse`, `Program.plan`, the tests that call it directly) and on
# every Plan read from the cache. The runtime itself never verifies.

VERIFIED = [0]


def _verifying(fn):
    from itdsl.symbolic.verify import verify_plan

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        plan = fn(*args, **kwargs)
        if plan is not None:
            verify_plan(plan)
            VERIFIED[0] += 1
        return plan

    wrapper.verifying = True
    return wrapper


def pytest_configure(config):
    import itdsl.cache.plans as plans
    import itdsl.symbolic.build as build
    for module, name in ((build, "build_plan"), (plans, "load_plan")):
        fn = getattr(module, name)
        if not getattr(fn, "verifying", False):
            setattr(module, name, _verifying(fn))


def pytest_sessionfinish(session):
    # a pytest-xdist worker (`make test`) hands its count to the controller
    if hasattr(session.config, "workeroutput"):
        session.config.workeroutput["verified"] = VERIFIED[0]


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error):  # the controller, as each worker finishes
    VERIFIED[0] += getattr(node, "workeroutput", {}).get("verified", 0)


def pytest_terminal_summary(terminalreporter):
    if VERIFIED[0]:
        terminalreporter.write_line(f"Plan verifier: {VERIFIED[0]} Plans verified")
