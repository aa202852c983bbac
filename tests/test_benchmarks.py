"""Benchmark scripts: what they write must not destroy what people wrote by hand."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_localization_report_keeps_hand_written_notes(tmp_path):
    bench = load("bench_localization")
    path = tmp_path / "localization.md"
    bench.write_report(path, "# run 1\n")
    assert path.read_text() == "# run 1\n"  # nothing to keep yet
    path.write_text(f"# run 1\n\n{bench.HAND_NOTES}\n\n## Verdict\nseed 1 fails\n")
    bench.write_report(path, "# run 2\n\nnew numbers\n")
    text = path.read_text()
    assert text.startswith("# run 2\n\nnew numbers\n")
    assert "# run 1" not in text
    assert text.endswith(f"{bench.HAND_NOTES}\n\n## Verdict\nseed 1 fails\n")
    assert not list(tmp_path.glob("*.tmp"))
