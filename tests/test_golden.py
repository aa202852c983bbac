"""Golden test: `mwm demo --quick` computes exactly what it computed when the golden file
was recorded (phantoms, CLIP weights, saliency maps, region masks, pretraining figures,
encoder weights, loss curves, probe metrics).

Exact float results depend on the CPU (bf16 in hardware or emulated, SIMD width), the
thread count and the library versions, so the comparison runs where the environment
matches the recording and is skipped, saying why, elsewhere. Re-record after a change
that is meant to change results: `python tests/golden_snapshot.py` (see its docstring).
"""

import json
from pathlib import Path

import pytest

from golden_snapshot import environment, snapshot

GOLDEN = Path(__file__).parent / "golden" / "demo_quick.json"


def _differences(expected: dict, actual: dict, limit: int = 12) -> list[str]:
    out = []
    for section in ("files", "curves", "results"):
        want, got = expected[section], actual[section]
        for key in sorted(set(want) | set(got)):
            if want.get(key) != got.get(key):
                state = "missing" if key not in got else ("new" if key not in want else "differs")
                out.append(f"{section}: {key} {state}")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def test_quick_demo_matches_the_golden_record(quick_demo):
    out, code, text, _ = quick_demo
    assert code == 0, text
    golden = json.loads(GOLDEN.read_text())
    here = environment()
    if here != golden["environment"]:
        pytest.skip(f"the golden record was made in another environment ({golden['environment']}; "
                    f"this one: {here}); exact results are only comparable in the same one. "
                    "Record one here with `python tests/golden_snapshot.py`.")
    differences = _differences(golden, snapshot(out))
    assert not differences, "mwm demo --quick changed:\n" + "\n".join(differences)
