"""The benchmark harness on CPU: timers, work counts, CSV rows, the ratio table, the plot and `peftfast bench`.

Nothing here judges speed: times are only checked to exist and to be ordered.
"""

import csv
import dataclasses
import inspect
import time
import xml.etree.ElementTree as ElementTree

import peft
import pytest
import torch

from peftfast import bench, cli
from peftfast.ops import dispatch

CPU = torch.device("cpu")
TINY = [bench.Case(8, 16, 24, 4, 0.0, "fwd"), bench.Case(8, 16, 24, 4, 0.0, "fwd+bwd")]
CPU_PROVIDERS = ("gemm", "hf_peft", "peftfast_torch")


@pytest.fixture(scope="module")
def tiny_result() -> bench.SuiteResult:
    with pytest.MonkeyPatch.context() as patch:
        # Without a triton backend its provider is skipped, whether or not TRITON_INTERPRET=1 would let it run.
        torch_only = {"torch": dispatch._IMPLEMENTATIONS["lora_linear"]["torch"]}
        patch.setitem(dispatch._IMPLEMENTATIONS, "lora_linear", torch_only)
        return bench.run_lora_linear(TINY, CPU, torch.float32, bench.PROVIDERS, repeats=2)


def test_cpu_timer_runs_warmup_then_repeats_and_resets_grads():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def step():
        assert x.grad is None
        (x * 2).sum().backward()
        calls.append(1)

    timing = bench.time_fn(step, CPU, grad_to_none=[x], repeats=5, warmup=2)
    assert len(calls) == 7
    assert 0 <= timing.p20_ms <= timing.median_ms <= timing.p80_ms
    with pytest.raises(ValueError, match="at least 2"):
        bench.time_fn(step, CPU, repeats=1)


def test_gpu_timer_calls_the_installed_do_bench_with_arguments_it_accepts(monkeypatch):
    testing = pytest.importorskip("triton.testing")
    signature = inspect.signature(testing.do_bench)
    seen = {}

    def fake_do_bench(*args, **kwargs):
        seen.update(signature.bind(*args, **kwargs).arguments)
        return [1.0, 0.5, 2.0]

    monkeypatch.setattr(testing, "do_bench", fake_do_bench)
    x = torch.zeros(1)
    assert bench.time_fn(lambda: None, torch.device("cuda"), grad_to_none=[x]) == bench.Timing(1.0, 0.5, 2.0)
    assert seen["quantiles"] == [0.5, 0.2, 0.8]
    assert seen["grad_to_none"] == [x]


def test_side_by_side_timer_takes_turns_and_resets_grads():
    x = torch.ones(3, requires_grad=True)
    calls = []

    def step(name):
        def run():
            assert x.grad is None
            (x * 2).sum().backward()
            calls.append(name)

        return run

    with bench.cpu_threads(1):
        timings = bench.time_side_by_side({"a": (step("a"), [x]), "b": (step("b"), [x])}, CPU, repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert timings.keys() == {"a", "b"}
    for timing in timings.values():
        for clock in (timing.wall, timing.cpu):
            assert 0 <= clock.p20_ms <= clock.median_ms <= clock.p80_ms
    with pytest.raises(ValueError, match="at least 2"):
        bench.time_side_by_side({"a": (step("a"), [x])}, CPU, repeats=1)


def test_side_by_side_timer_reports_cpu_time_on_one_thread_else_wall_time():
    """A call that sleeps takes wall time but no CPU time: on one thread the reported time leaves it out, as it
    leaves out the time a busy machine keeps a call waiting for a core."""
    runs = {"sleeper": (lambda: time.sleep(0.02), [])}
    with bench.cpu_threads(1):
        one = bench.time_side_by_side(runs, CPU, repeats=2, warmup=0)["sleeper"]
    assert one.wall.median_ms >= 20 and one.cpu.median_ms < 10
    assert one.reported == one.cpu
    with bench.cpu_threads(2):
        two = bench.time_side_by_side(runs, CPU, repeats=2, warmup=0)["sleeper"]
    assert two.reported == two.wall and two.wall.median_ms >= 20


def test_side_by_side_timer_on_gpu_times_each_provider_with_do_bench(monkeypatch):
    seen = []

    def fake_time_fn(fn, device, grad_to_none=()):
        seen.append((fn, list(grad_to_none)))
        return bench.Timing(1.0, 0.5, 2.0)

    monkeypatch.setattr(bench, "time_fn", fake_time_fn)
    x = torch.zeros(1)
    first, second = (lambda: None), (lambda: None)
    timings = bench.time_side_by_side({"a": (first, [x]), "b": (second, [])}, torch.device("cuda"), repeats=5)
    assert seen == [(first, [x]), (second, [])]
    expected = bench.Timing(1.0, 0.5, 2.0)
    assert timings["a"] == bench.SideBySideTiming(wall=expected, cpu=None, reported=expected)


def test_work_counts_follow_the_documented_formula():
    fwd = bench.Case(8, 16, 24, 4, 0.0, "fwd")
    fwd_bwd = dataclasses.replace(fwd, mode="fwd+bwd")
    gemm, lora = 2 * 8 * 16 * 24, 2 * 8 * 4 * (16 + 24)
    assert bench.lora_linear_work(fwd, False, 2, 4) == (gemm, 2 * (8 * 16 + 24 * 16 + 8 * 24))
    assert bench.lora_linear_work(fwd, True, 2, 4)[0] == gemm + lora
    assert bench.lora_linear_work(fwd_bwd, False, 2, 4)[0] == 2 * gemm
    assert bench.lora_linear_work(fwd_bwd, True, 2, 4)[0] == 2 * gemm + 3 * lora
    adapters = 4 * (4 * 16 + 24 * 4)
    assert bench.lora_linear_work(fwd, True, 2, 4)[1] == 2 * (8 * 16 + 24 * 16 + 8 * 24) + adapters


def test_grids_and_filters():
    assert len(bench.grid(CPU)) == 2 * 2 * 2 * 2
    assert len(bench.grid(CPU, quick=True)) == 2 * 2
    assert len(bench.grid(torch.device("cuda"))) == 4 * 3 * 3 * 2 * 2
    cases = bench.grid(CPU, shapes=[(16, 24)], tokens=[8], ranks=[4])
    assert cases == TINY


def test_suite_times_each_provider_on_each_case_and_notes_skips(tiny_result):
    assert [(m.case, m.provider) for m in tiny_result.measurements] == [(c, p) for c in TINY for p in CPU_PROVIDERS]
    assert any(note.startswith("peftfast_triton skipped: ") for note in tiny_result.notes)
    for measurement in tiny_result.measurements:
        assert 0 < measurement.timing.p20_ms <= measurement.timing.median_ms <= measurement.timing.p80_ms
        assert measurement.peak_mem_mb is None
        assert measurement.adapter_dtype == (None if measurement.provider == "gemm" else torch.float32)


def test_suite_notes_a_missing_hf_peft(monkeypatch):
    monkeypatch.setattr(bench, "_hf_peft", lambda: None)
    result = bench.run_lora_linear(TINY[:1], CPU, torch.float32, ("gemm", "hf_peft"), repeats=2)
    assert [m.provider for m in result.measurements] == ["gemm"]
    assert list(result.notes) == ["hf_peft skipped: HF peft is not installed (pip install peft)."]


def test_csv_rows_are_appended_under_one_header(tmp_path, tiny_result):
    rows = [m.csv_row(bench.environment(CPU)) for m in tiny_result.measurements]
    path = tmp_path / "results" / "cpu.csv"
    bench.append_csv(path, rows)
    bench.append_csv(path, rows)
    with path.open(newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == bench.CSV_COLUMNS
        written = list(reader)
    assert len(written) == 2 * len(rows) == 12
    hf_fwd = written[1]
    expected = {"op": "lora_linear", "provider": "hf_peft", "tokens": "8", "d_in": "16", "d_out": "24", "rank": "4"}
    expected |= {"dtype": "float32", "adapter_dtype": "float32", "dropout": "0", "mode": "fwd", "gpu": "cpu"}
    expected |= {"torch": torch.__version__, "peft": peft.__version__, "peak_mem_mb": ""}
    assert {key: hf_fwd[key] for key in expected} == expected
    for row in written:
        assert row["date"] and row["git_sha"] and row["triton"]
        assert 0 < float(row["p20_ms"]) <= float(row["median_ms"]) <= float(row["p80_ms"])
        assert float(row["tflops"]) > 0 and float(row["gbps"]) > 0


def test_csv_with_other_columns_is_refused(tmp_path):
    path = tmp_path / "cpu.csv"
    path.write_text("date,median_ms\n")
    with pytest.raises(ValueError, match="columns"):
        bench.append_csv(path, [])


def test_ratio_table(tiny_result):
    summaries = bench.summarize(tiny_result.measurements)
    assert [summary.case for summary in summaries] == TINY
    summary = summaries[1]
    assert list(summary.ratios) == ["hf/gemm", "torch/gemm", "hf/torch"]
    assert summary.ratios["torch/gemm"] == pytest.approx(summary.ms["peftfast_torch"] / summary.ms["gemm"])
    assert summary.ratios["hf/torch"] == pytest.approx(summary.ms["hf_peft"] / summary.ms["peftfast_torch"])
    lines = bench.format_table(summaries).splitlines()
    assert len(lines) == 2 + len(TINY)
    assert lines[0].split() == "T d_in d_out r p mode gemm ms hf ms torch ms hf/gemm torch/gemm hf/torch".split()
    assert lines[3].split()[:6] == ["8", "16", "24", "4", "0", "fwd+bwd"]


def test_ratios_cover_only_the_providers_present():
    ms = {"gemm": 1.0, "peftfast_torch": 2.0, "peftfast_triton": 0.5}
    assert bench.CaseSummary(TINY[0], ms).ratios == {"torch/gemm": 2.0, "triton/gemm": 0.5}


def test_svg_plot_has_a_bar_per_lora_provider_and_case(tmp_path, tiny_result):
    summaries = bench.summarize(tiny_result.measurements)
    path = bench.write_svg(tmp_path / "plot.svg", summaries, "tiny <case> & co")
    root = ElementTree.parse(path).getroot()
    namespace = "{http://www.w3.org/2000/svg}"
    texts = [element.text for element in root.iter(f"{namespace}text")]
    assert "tiny <case> & co" in texts
    assert TINY[0].label in texts and TINY[1].label in texts
    # Two legend squares, then one bar per LoRA provider per case.
    assert len(list(root.iter(f"{namespace}rect"))) == 2 + 2 * len(TINY)


def test_cli_bench_prints_the_table_and_writes_csv_and_plot(tmp_path, capsys):
    args = ["bench", "--output-dir", str(tmp_path), "--shapes", "16x24", "--tokens", "8", "--ranks", "4"]
    assert cli.main([*args, "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "torch/gemm" in out and "rows appended to" in out
    slug = bench.results_slug(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with (tmp_path / f"{slug}.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    # On a GPU, peftfast_triton too, where the backend takes these shapes.
    assert {row["provider"] for row in rows} >= set(CPU_PROVIDERS)
    assert {(row["mode"], row["provider"]) for row in rows} >= {(c.mode, p) for c in TINY for p in CPU_PROVIDERS}
    assert (tmp_path / f"{slug}-lora_linear.svg").is_file()


def test_cli_bench_rejects_a_bad_shape(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--shapes", "4096"])
    assert "D_INxD_OUT" in capsys.readouterr().err
