"""The differential fuzzer (`make fuzz`). Its TVM paths test the compiled kernels at the
small sizes it draws: the small-call path (a materialised torch evaluation,
`itdsl.set_small_pairs`) is off in it, as in the test suite."""

import os

os.environ["ITDSL_SMALL_PAIRS"] = "0"
