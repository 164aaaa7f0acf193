"""docs/config.md is generated from the pydantic configs (`crs-rlhf config-docs`): it must be
exactly what the command writes now, and every config field must say what it means."""

from __future__ import annotations

from crs_rlhf.config_docs import DEFAULT_OUT, main, missing_descriptions, render


def test_every_config_field_has_a_description():
    assert missing_descriptions() == []


def test_docs_config_md_is_up_to_date():
    assert DEFAULT_OUT.read_text() == render(), "docs/config.md is stale: run `crs-rlhf config-docs` and commit it"


def test_check_fails_on_a_stale_file_and_writing_fixes_it(tmp_path, capsys):
    out = tmp_path / "config.md"
    out.write_text(render().replace("run.step_timeout_s", "run.step_retries"))  # a reference that drifted
    assert main(["--check", "--out", str(out)]) == 1
    assert "stale" in capsys.readouterr().err
    assert main(["--out", str(out)]) == 0
    assert main(["--check", "--out", str(out)]) == 0
    assert "`run.step_timeout_s`" in out.read_text() and "## PPO" in out.read_text()
