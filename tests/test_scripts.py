"""scripts/learned_table.sh's plumbing: stages in order, each fed its inputs, skipped once done, resumed
from its checkpoint after a stop. `tokenopt train` is replaced by a stand-in that records its arguments
(the training itself is tests/test_train.py's)."""

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "learned_table.sh"

FAKE = f"""#!/usr/bin/env bash
# stands in for python: "-m tokenopt.train ARGS" is recorded (and fails for the stage named in $FAIL_ON
# after writing a checkpoint, as a run stopped part-way leaves one); anything else goes to python
if [ "$1" = "-m" ]; then
  shift 2
  echo "$*" >> "$CALLS"
  out=""; prev=""
  for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
  mkdir -p "$out"
  if [ -n "${{FAIL_ON:-}}" ] && [ "$(basename "$out")" = "$FAIL_ON" ]; then touch "$out/checkpoint.pt"; exit 3; fi
  echo '{{"epochs": [{{"test_accuracy": 0.5}}]}}' > "$out/log.json"
  exit 0
fi
exec {sys.executable} "$@"
"""


def _sets(line):
    """The policy options (``--set K=V``) of a recorded command line."""
    return [part.split()[0] for part in line.split("--set ")[1:]]


def _run(tmp_path, out, **env):
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE)
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    calls = tmp_path / "calls.txt"
    full = {**os.environ, "PY": str(fake), "CALLS": str(calls), "TABLE": "0", **env}
    proc = subprocess.run(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=full, capture_output=True, text=True)
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return proc, [line.split("--out ")[1].split()[0] for line in lines], lines


def test_learned_table_runs_each_stage_once_in_order_and_resumes_a_stopped_one(tmp_path):
    out = tmp_path / "runs"
    proc, stages, lines = _run(tmp_path, out, ONLY="base dvA")
    assert proc.returncode == 0, proc.stderr
    assert stages == [f"{out}/base", f"{out}/dvA"]
    dvA = lines[1]
    assert "--init" not in lines[0] and "--policy" not in lines[0]  # the base: from scratch
    assert f"--init {out}/base/model.pt" in lines[1] and f"--teacher {out}/base/model.pt" in lines[1]
    assert "--policy dynamicvit" in lines[1] and "--resume" not in lines[1]
    # predictors at 10x: at 30x a probe saw the keep-ratio loss climb back once the learning rate peaked
    assert "--policy-lr-scale 10" in lines[1]
    assert (out / "base" / ".done").exists() and (out / "dvA" / ".done").exists()
    assert len((out / "times.txt").read_text().splitlines()) == 2

    proc, stages, _ = _run(tmp_path, out, ONLY="base dvA")  # done: nothing runs again
    assert proc.returncode == 0 and stages == [] and "== dvA: done" in proc.stdout

    proc, stages, _ = _run(tmp_path, out, ONLY="dvB", FAIL_ON="dvB")  # stopped part-way: not done
    assert proc.returncode != 0 and stages == [f"{out}/dvB"] and not (out / "dvB" / ".done").exists()

    proc, stages, lines = _run(tmp_path, out)  # every stage left, in order; the stopped one resumed
    assert proc.returncode == 0, proc.stderr
    assert [Path(s).name for s in stages] == ["dvB", "saA", "avA", "avB", "adA", "adB", "adC"]
    assert "--resume" in lines[0] and all("--resume" not in line for line in lines[1:])
    by = dict(zip((Path(s).name for s in stages), lines))
    assert f"--init {out}/dvA/model.pt --init-policy {out}/dvA/policy.pt" in by["dvB"]
    assert f"--init {out}/avA/model.pt" in by["avB"]
    assert "--policy-lr-scale 10" in by["dvB"]
    assert _sets(by["dvB"]) == _sets(dvA) and "blocks=" in by["dvB"]  # dvB goes on at dvA's operating point
    assert f"--init {out}/dvB/model.pt" in by["adA"]  # AdaViT starts from DynamicViT's backbone
    assert "calibrate=False" in by["adA"]  # its gates as trained are where adB starts
    assert f"--init-policy {out}/adA/policy.pt" in by["adB"] and "calibrate=False" in by["adB"]
    assert f"--init {out}/adB/model.pt --init-policy {out}/adB/policy.pt" in by["adC"]  # adC goes on from adB
    targets = [dict(kv.split("=") for kv in _sets(by[name])) for name in ("adB", "adC")]
    assert float(targets[1]["token_target"]) < float(targets[0]["token_target"])  # at lower usage targets


def test_runs_folder_keeps_a_finished_stage_but_not_its_checkpoint():
    """OUT=runs/c192 carries the chain across fresh checkouts: the weights and logs a finished stage leaves
    are committed, the 35 MB resume checkpoints are ignored."""
    def ignored(path):
        return subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0
    assert ignored("runs/c192/dvA/checkpoint.pt") and ignored("runs/c192/dvA/.model.pt.123.tmp")
    assert not any(ignored(f"runs/c192/dvA/{name}") for name in ("model.pt", "policy.pt", "log.json", ".done"))
    assert not ignored("runs/c192/dvA.log") and not ignored("runs/c192/times.txt")
