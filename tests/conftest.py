import os

# Tests never reach a model hub: fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


import time  # noqa: E402

import pytest  # noqa: E402

from mwm.runtime import configure_process  # noqa: E402

# What the `mwm` command sets once per process (flush denormals), so that library calls
# in tests run as they do under the command.
configure_process()


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """`mwm demo --quick` once per test session: (output folder, stdout, seconds)."""
    import contextlib
    import io

    from mwm.cli import main

    out = tmp_path_factory.mktemp("demo") / "quick"
    stdout = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout):
        code = main(["demo", "--quick", "--out", str(out), "--quiet"])
    return out, code, stdout.getvalue(), time.perf_counter() - start
