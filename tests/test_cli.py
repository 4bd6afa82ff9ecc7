"""The `peftfast` command: version, environment report and the end-to-end demo."""

import pytest

import peftfast
import peftfast.ops
from peftfast import cli


def test_version_prints_the_package_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"peftfast {peftfast.__version__}"


def test_no_command_prints_help_and_fails(capsys):
    assert cli.main([]) == 2
    assert "usage: peftfast" in capsys.readouterr().out


def test_info_reports_versions_device_and_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    for label in ("python", "peftfast", "torch", "triton", "transformers", "bitsandbytes", "safetensors", "device"):
        assert f"{label}:" in out
    for label in ("backend torch", "backend triton", "backend cuda extension", "selected backend"):
        assert f"{label}:" in out
    info = cli.collect_info()
    assert info["torch"] == cli.torch.__version__
    assert info["backend torch"] == "available"
    assert info["selected backend"] == peftfast.ops.get_backend()


def test_info_survives_a_bad_backend_variable(monkeypatch):
    monkeypatch.setenv("PEFTFAST_BACKEND", "nonsense")
    assert cli.collect_info()["selected backend"].startswith("invalid")


def test_triton_backend_follows_the_interpreter_variable(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(cli.torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert cli.triton_status().startswith("available")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert cli.triton_status().startswith("not available")


def test_package_version_reports_missing_and_broken_packages(tmp_path, monkeypatch):
    (tmp_path / "peftfast_broken_pkg.py").write_text("raise RuntimeError('half installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert cli.package_version("peftfast_no_such_pkg") == "not installed"
    assert cli.package_version("peftfast_broken_pkg") == "import fails: RuntimeError: half installed"
    assert cli.package_version("torch") == cli.torch.__version__


def test_demo_learns_the_rule_and_reloads_the_same_adapter(tmp_path):
    result = cli.run_demo(steps=30, seed=0, output_dir=tmp_path)
    assert result.first_loss > 10 * result.last_loss
    assert result.max_abs_diff < 1e-5
    assert result.reload_ok
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_demo_command_writes_the_adapter_and_reports_ok(tmp_path, capsys):
    assert cli.main(["demo", "--steps", "2", "--output", str(tmp_path)]) == 0
    assert "reload check: OK" in capsys.readouterr().out
    assert (tmp_path / "adapter_config.json").is_file()
    assert (tmp_path / "adapter_model.safetensors").is_file()


def test_demo_command_fails_on_a_reload_mismatch(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "compare_logits", lambda *args: 1.0)
    assert cli.main(["demo", "--steps", "1", "--output", str(tmp_path)]) == 1
    assert "reload check: MISMATCH" in capsys.readouterr().out
