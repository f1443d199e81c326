"""Config files loaded beside each other (`modit_jax.config_files`)."""

import os

import pytest

from modit_jax import config_files

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def test_a_sibling_is_loaded_by_path_once(tmp_path):
  (tmp_path / "base.py").write_text("VALUE = [1]\n")
  anchor = str(tmp_path / "derived.py")
  first = config_files.sibling(anchor, "base")
  assert first.VALUE == [1]
  first.VALUE.append(2)
  assert config_files.sibling(anchor, "base") is first  # not executed again


def test_siblings_of_two_folders_stay_apart(tmp_path):
  for name, value in (("a", 1), ("b", 2)):
    (tmp_path / name).mkdir()
    (tmp_path / name / "base.py").write_text(f"VALUE = {value}\n")
  values = [config_files.sibling(str(tmp_path / n / "x.py"), "base").VALUE for n in ("a", "b")]
  assert values == [1, 2]


def test_a_missing_sibling_names_its_path(tmp_path):
  with pytest.raises(FileNotFoundError, match="nowhere.py"):
    config_files.sibling(str(tmp_path / "x.py"), "nowhere")


def test_a_sibling_that_fails_is_not_kept(tmp_path):
  (tmp_path / "bad.py").write_text("raise ValueError('broken')\n")
  for _ in range(2):  # the second call runs the file again rather than returning a half module
    with pytest.raises(ValueError, match="broken"):
      config_files.sibling(str(tmp_path / "x.py"), "bad")


def test_the_pipeline_config_builds_its_runs_from_the_stage_files_beside_it():
  hppo = config_files.sibling(os.path.join(_CONFIGS, "pipeline.py"), "hppo")
  pipeline = config_files.sibling(os.path.join(_CONFIGS, "protocol.py"), "pipeline")
  run, stage = pipeline.get_config("tiny").runs.hppo.stage, hppo.get_config("tiny")
  assert run.hppo == stage.hppo and run.stage == stage.stage == "hppo"
