"""benchmarks/report.py on a small synthetic pytest-benchmark JSON: plots written, table rows right."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

_REPORT_PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"


def _load_report():
    spec = importlib.util.spec_from_file_location("flatlora_bench_report", _REPORT_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


report = _load_report()

FACTS = {"device": "Test CPU", "device_type": "cpu", "threads": 2, "torch": "2.x", "triton": None, "mode": "short"}


def _bench(suite, impl, median_ms, *, M, pass_kind="forward+backward", depth=1, peak=None, shape="sq"):
    info = dict(FACTS, suite=suite, implementation=impl, pass_kind=pass_kind, shape=shape, M=M, N=64, K=64, r=4,
                dtype="float32", depth=depth)
    if peak is not None:
        info["peak_memory_bytes"] = peak
    name = f"test_{suite}[{shape}-M{M}-L{depth}-{pass_kind}-{impl}]"
    return {"name": name, "extra_info": info, "stats": {"median": median_ms / 1e3, "iqr": 0.0, "rounds": 3}}


@pytest.fixture
def bench_json(tmp_path):
    benchmarks = [
        _bench("linear", "lora", 2.0, M=64),
        _bench("linear", "fused", 3.0, M=64),
        _bench("linear", "naive", 5.0, M=64),
        _bench("linear", "lora", 4.0, M=128),
        _bench("linear", "fused", 4.0, M=128),  # naive missing at M=128: a skipped cell
        _bench("linear", "lora", 1.0, M=64, pass_kind="forward"),
        _bench("linear", "fused", 1.5, M=64, pass_kind="forward"),
        _bench("memory_stack", "lora", 1.0, M=32, depth=1, peak=2**20, shape="stack-64"),
        _bench("memory_stack", "naive", 1.0, M=32, depth=1, peak=3 * 2**20, shape="stack-64"),
        _bench("memory_stack", "lora", 1.0, M=32, depth=2, peak=2 * 2**20, shape="stack-64"),
        _bench("memory_stack", "naive", 1.0, M=32, depth=2, peak=5 * 2**20, shape="stack-64"),
        {"name": "test_other_suite", "extra_info": {}, "stats": {"median": 1.0}},  # not ours: ignored
    ]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"datetime": "2026-11-23T00:00:00", "machine_info": {"flatlora": FACTS},
                                "benchmarks": benchmarks}))
    return path


def _table_rows(markdown: str, first_header: str) -> list[list[str]]:
    """Data rows of the first table whose header starts with ``| first_header``."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header}"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split("|")))))
    return rows


def test_report_writes_plots_and_summary(bench_json, tmp_path):
    out = tmp_path / "results"
    written = report.main([str(bench_json), "--out", str(out)])
    names = sorted(p.name for p in written)
    assert any(n.startswith("time_ratio_") and n.endswith(".png") for n in names)
    assert any(n.startswith("memory_vs_depth_") and n.endswith(".png") for n in names)
    for path in written:
        assert path.exists() and path.stat().st_size > 0
    assert (out / "summary.md").read_text().startswith("# Benchmark summary")
    png = next(p for p in written if p.suffix == ".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_time_table_rows(bench_json, tmp_path):
    report.main([str(bench_json), "--out", str(tmp_path / "results")])
    markdown = (tmp_path / "results" / "summary.md").read_text()
    rows = _table_rows(markdown, "run | shape | M | N x K | r |")
    assert [(r["M"], r["pass"]) for r in rows] == [("64", "forward+backward"), ("128", "forward+backward"), ("64", "forward")]
    first, second, third = rows
    assert first["lora"] == "2.000 (1.00x)"
    assert first["fused"] == "3.000 (1.50x)"
    assert first["naive"] == "5.000 (2.50x)"
    assert second["fused"] == "4.000 (1.00x)"
    assert second["naive"] == "skipped"
    assert third["fused"] == "1.500 (1.50x)"
    assert list(first)[-3:] == ["lora", "fused", "naive"]  # baseline first


def test_summary_memory_table_rows(bench_json, tmp_path):
    report.main([str(bench_json), "--out", str(tmp_path / "results")])
    markdown = (tmp_path / "results" / "summary.md").read_text()
    rows = _table_rows(markdown, "run | shape | M | N x K | layers |")
    assert [(r["layers"], r["lora"], r["naive"]) for r in rows] == [
        ("1", "1.00 (1.00x)", "3.00 (3.00x)"),
        ("2", "2.00 (1.00x)", "5.00 (2.50x)"),
    ]


def test_ratios_never_mix_runs(bench_json, tmp_path):
    other = tmp_path / "other.json"
    data = json.loads(bench_json.read_text())
    data["benchmarks"] = [b for b in data["benchmarks"] if b["extra_info"].get("implementation") != "lora"]
    other.write_text(json.dumps(data))
    results, _ = report.load([str(other), str(bench_json)])
    base = report.baselines(results)
    lonely = next(r for r in results if r.source == 0 and r.implementation == "fused")
    assert report.time_ratio(lonely, base) is None  # its run has no lora result


def test_no_results_is_an_error(tmp_path):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"benchmarks": []}))
    with pytest.raises(SystemExit):
        report.main([str(empty), "--out", str(tmp_path / "results")])
