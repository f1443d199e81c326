"""The pipeline report on a hand-made results dict and hand-made training workdirs."""

import json
import os
import re

import numpy as np
import pytest

from modit_jax import report
from modit_jax import results_markdown

_CELLS = [(s, d) for s in ("item_holdout", "pattern_holdout") for d in ("d0", "d1")]
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Per method: Joint@20 and Purity@20 per cell (in _CELLS order), and per reference the cells
# with a significant gain over it (and, in `losses`, with a significant loss). Purity gaps to modit_sft: hppo -0.01, +0.02, -0.015, 0.0
# (worst -0.015 in item_holdout / d1); seed_centroid -0.05 at worst (pattern_holdout / d0).
_METHODS = {
    "seed_centroid": dict(joint=[0.10, 0.12, 0.08, 0.09], purity=[0.80, 0.78, 0.70, 0.75],
                          wins={"modit_sft": []}, losses={"modit_sft": [0, 1, 2, 3]}),
    "modit_sft": dict(joint=[0.20, 0.22, 0.18, 0.19], purity=[0.82, 0.80, 0.75, 0.77],
                      wins={"seed_centroid": [0, 3]}),
    "modit_hppo": dict(joint=[0.30, 0.31, 0.25, 0.24], purity=[0.81, 0.785, 0.77, 0.77],
                       wins={"seed_centroid": [0, 1, 2], "modit_sft": [2]}),
    "oracle_shift": dict(joint=[0.50, 0.52, 0.48, 0.49], purity=[0.60, 0.62, 0.58, 0.59],
                         wins={"seed_centroid": [0, 1, 2, 3], "modit_sft": [0, 1, 2, 3]}),
}


def _results() -> dict:
  records = []
  for method, spec in _METHODS.items():
    for c, (split, domain) in enumerate(_CELLS):
      joint, purity = spec["joint"][c], spec["purity"][c]
      records.append({
          "method": method, "split": split, "domain": domain, "n": 50,
          "oracle": method == "oracle_shift", "joint@20": joint, "purity@20": purity,
          "attr@20": 0.9 - purity / 2, "bound@20": 1.0, "joint@20_ci": [joint - 0.03,
                                                                        joint + 0.04],
          "vs": {ref: {"diff": 0.1, "ci_low": 0.05, "ci_high": 0.15, "p_gain": 0.01,
                       "p_loss": 0.99, "p_gain_holm": 0.04, "p_loss_holm": 1.0,
                       "against": ref, "significant_gain": c in cells,
                       "significant_loss": c in spec.get("losses", {}).get(ref, [])}
                 for ref, cells in spec["wins"].items()}})
  return {"dataset": "/data/world", "strongest_baseline": {"d0": "seed_centroid",
                                                           "d1": "seed_centroid"},
          "records": records}


def _write_jsonl(workdir, records) -> str:
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return str(workdir)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("runs")
  # A resumed run: step 20 is logged twice, the second time after the restart.
  pretrain = _write_jsonl(root / "pretrain", [
      {"step": 10, "loss": 6.0, "grad_norm": 1.0, "lr": 1e-4},
      {"step": 20, "loss": 5.0, "grad_norm": 1.0, "lr": 1e-4},
      {"step": 20, "loss": 4.0, "grad_norm": 0.9, "lr": 1e-4},
      {"step": 30, "loss": 3.0, "grad_norm": 0.8, "lr": 1e-4}])
  pool = {"pool/candidate_pairs": 400.0, "pool/margin_pairs": 200.0, "pool/kept_pairs": 100.0,
          "pool/best_joint": 0.3}
  hppo = _write_jsonl(root / "hppo", [
      {"step": 0, **pool},
      {"step": 10, "loss": 0.69, "dpo_loss": 0.69, "implicit_accuracy": 0.5,
       "winner_drift": 0.1, "loser_drift": 0.1},
      {"step": 20, **pool, "pool/kept_pairs": 150.0},
      {"step": 20, "loss": 0.60, "dpo_loss": 0.60, "implicit_accuracy": 0.7,
       "winner_drift": 0.1, "loser_drift": 0.2}])
  return {"pretrain": pretrain, "sft": str(root / "missing"), "hppo": hppo}


@pytest.fixture(scope="module")
def written(workdirs, tmp_path_factory):
  out = tmp_path_factory.mktemp("out")
  path = report.write_pipeline_report(str(out), _results(), workdirs, title="Test report",
                                      notes=["dataset: /data/world", "total: 12 s"])
  with open(path) as f:
    return out, path, f.read()


def _row(text: str, label: str) -> list[str]:
  """The cells of the significance-summary row of `label` (its last table row of that name)."""
  rows = [line for line in text.splitlines() if line.startswith(f"| {label} |")]
  return [c.strip() for c in rows[-1].strip("|").split("|")]


def test_load_metrics_keeps_last_record_of_a_step_and_merges_pool_records(workdirs):
  pretrain = report.load_metrics(workdirs["pretrain"])
  np.testing.assert_array_equal(pretrain["step"], [10, 20, 30])
  np.testing.assert_allclose(pretrain["loss"], [6.0, 4.0, 3.0])
  np.testing.assert_allclose(pretrain["grad_norm"], [1.0, 0.9, 0.8])
  hppo = report.load_metrics(workdirs["hppo"])
  np.testing.assert_array_equal(hppo["step"], [0, 10, 20])
  np.testing.assert_allclose(hppo["pool/kept_pairs"], [100.0, np.nan, 150.0])
  np.testing.assert_allclose(hppo["implicit_accuracy"], [np.nan, 0.5, 0.7])


def test_load_metrics_skips_a_truncated_line_and_raises_on_a_missing_file(tmp_path):
  workdir = _write_jsonl(tmp_path / "run", [{"step": 1, "loss": 2.0}])
  with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 2, "lo')
  np.testing.assert_array_equal(report.load_metrics(workdir)["step"], [1])
  with pytest.raises(FileNotFoundError):
    report.load_metrics(str(tmp_path / "none"))


def test_report_embeds_valid_pngs(written):
  out, path, text = written
  assert path == os.path.join(str(out), "report.md")
  embedded = re.findall(r"!\[[^\]]*\]\((plots/[^)]+\.png)\)", text)
  assert set(embedded) == {"plots/joint20_by_cell.png", "plots/purity_vs_attr.png",
                           "plots/training_curves.png"}
  for rel in embedded:
    with open(os.path.join(out, rel), "rb") as f:
      data = f.read()
    assert data.startswith(_PNG_MAGIC), rel
    assert len(data) > 10_000, rel


def test_report_has_title_notes_and_the_tables(written):
  _, _, text = written
  assert text.startswith("# Test report\n")
  assert "- dataset: /data/world\n" in text and "- total: 12 s\n" in text
  records = _results()["records"]
  for ref in ("seed_centroid", "modit_sft"):
    assert f"`+` vs `{ref}`" in text
    assert results_markdown.headline_table(records, ref) in text
  # pretrained_gr was not evaluated, so it gets no table.
  assert "pretrained_gr" not in text
  assert "| modit_hppo | 0.300 [0.270, 0.340]+ | 0.310 [0.280, 0.350]+ |" in text
  assert "| seed_centroid | 0.100 [0.070, 0.140]- | 0.120 [0.090, 0.160]- |" in text
  assert "d0: `seed_centroid`, d1: `seed_centroid`" in text
  assert "| oracle_shift (oracle) |" in text


def test_significance_counts_and_purity_gap(written):
  _, _, text = written
  assert "| method | significant vs `modit_sft` | significant vs `seed_centroid` |" in text
  assert _row(text, "modit_hppo") == ["modit_hppo", "1+ 0− / 4", "3+ 0− / 4",
                                      "-0.015 (item_holdout / d1), ok"]
  assert _row(text, "modit_sft") == ["modit_sft", "—", "2+ 0− / 4", "—"]
  assert _row(text, "oracle_shift (oracle)")[1:3] == ["4+ 0− / 4", "4+ 0− / 4"]
  assert _row(text, "seed_centroid") == ["seed_centroid", "0+ 4− / 4", "—",
                                         "-0.050 (pattern_holdout / d0), more than 0.02 below"]


def test_significance_summary_without_modit_sft_has_no_purity_column():
  records = [r for r in _results()["records"] if r["method"] != "modit_sft"]
  table = report.significance_summary(records, ["seed_centroid"])
  assert table.splitlines()[0] == "| method | significant vs `seed_centroid` |"
  assert "| modit_hppo | 3+ 0− / 4 |" in table


def test_missing_metrics_file_is_a_note(written, workdirs):
  _, _, text = written
  assert f"- `sft`: no `metrics.jsonl` in `{workdirs['sft']}`; skipped." in text
  assert "- `hppo`: last step 20, final loss 0.6" in text


def test_report_without_records_or_metrics(tmp_path):
  path = report.write_pipeline_report(str(tmp_path), {"records": []},
                                      {"cpt": str(tmp_path / "none")}, title="Empty")
  with open(path) as f:
    text = f.read()
  assert "No evaluation records." in text
  assert "- `cpt`: no `metrics.jsonl`" in text
  assert "![" not in text
