"""bench/run_gpu.py, the one command for a lent GPU, on CPU: a step that fails or overruns is recorded and the next
one still runs; results CSVs of any benchmark become ratio tables and plots."""

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import run_gpu  # noqa: E402


def test_steps_that_fail_or_overrun_are_recorded_and_the_budget_is_shared(tmp_path):
    log = (tmp_path / "log").open("w")
    env = {"PATH": "/usr/bin:/bin"}
    slow = run_gpu.Step("slow", [sys.executable, "-c", "import time; time.sleep(30)"], limit_s=1)
    failing = run_gpu.Step("failing", [sys.executable, "-c", "raise SystemExit(3)"], limit_s=20)
    missing = run_gpu.Step("optional", [sys.executable, "-c", "pass"], limit_s=20, needs="bench/no_such_bench.py")
    starved = run_gpu.Step("starved", [sys.executable, "-c", "pass"], limit_s=20)
    deadline = run_gpu.time.monotonic() + 60
    run_gpu._run(slow, env, log, deadline, later=0)
    run_gpu._run(failing, env, log, deadline, later=0)
    run_gpu._run(missing, env, log, deadline, later=0)
    run_gpu._run(starved, env, log, run_gpu.time.monotonic() + 12, later=3)
    log.close()
    assert slow.status == "timed out after 1 s" and slow.seconds < 10
    assert failing.status == "failed (exit 3)"
    assert missing.status == "skipped (bench/no_such_bench.py not found)"
    assert starved.status == "skipped (time budget spent)"
    assert "===== failing: failed (exit 3)" in (tmp_path / "log").read_text()


def test_any_results_csv_becomes_a_ratio_table_and_a_plot(tmp_path):
    path = tmp_path / "dora-nvidia-h200.csv"
    columns = ["date", "gpu", "provider", "tokens", "rank", "median_ms", "p20_ms"]
    rows = [
        ["d", "H200", "hf_peft", "512", "16", "2.0", "1.9"],
        ["d", "H200", "peftfast", "512", "16", "0.5", "0.4"],
        ["d", "H200", "gemm", "512", "16", "0.25", "0.2"],
    ]
    with path.open("w", newline="") as file:
        csv.writer(file).writerows([columns, *rows])
    table = run_gpu.read_table(path)
    assert table.case_columns == ["tokens", "rank"] and table.baseline == "hf_peft"
    lines = run_gpu.ratio_lines(table)
    assert lines[2] == "| 512 | 16 | 2 | 0.5 | 0.25 | peftfast 4.00x | hf_peft 8.00, peftfast 2.00 |"
    run_gpu.speedup_svg(tmp_path / "plot.svg", table, "dora")
    assert "peftfast" in (tmp_path / "plot.svg").read_text()
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    assert run_gpu.read_table(tmp_path / "other.csv") is None
