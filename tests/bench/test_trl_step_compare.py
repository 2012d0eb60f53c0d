"""bench/tools/trl_step_compare.py, fastppo's step against TRL 0.11.4's, still runs.

Only fastppo's worker runs here (TRL 0.11.4 needs its own environment, which CI has not): one timed
step in a subprocess, the way the driver starts it, and the JSON it writes; then the driver's
markdown row and its append to a measurements table, on made-up figures.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "tools" / "trl_step_compare.py"


def test_fastppo_worker_times_its_steps_and_writes_the_json(tmp_path, bench):
    compare = bench("trl_step_compare")
    out = tmp_path / "fastppo.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--worker", "fastppo", "--steps", "1", "--json", str(out)],
                            env=compare.worker_env("fastppo"), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["library"] == "fastppo" and data["profiled"] is False
    assert len(data["steps_s"]) == 1 and data["steps_s"][0] > 0 and data["median_s"] == data["steps_s"][0]
    assert len(data["cpu_steps_s"]) == 1 and data["cpu_steps_s"][0] > 0
    assert data["warmup_steps"] == 2 and data["torch_threads"] == 1
    assert data["config"] == dict(batch_size=6, mini_batch_size=2, ppo_epochs=4, learning_rate=1e-3, seed=0)
    assert {"torch", "transformers"} <= set(data["versions"]) and "trl" not in data["versions"]


def test_the_batches_fit_the_tiny_model():
    # the scenario module must import without fastppo (the TRL interpreter runs it too)
    code = ("import sys; sys.path.insert(0, 'bench/tools'); import trl_step_compare as c; "
            "b = c.batches(); assert 'fastppo' not in sys.modules; "
            "rows = [t for q, r, s in b for t in q + r]; "
            "assert all(3 <= len(t) <= 12 and 2 <= int(t.min()) and int(t.max()) < 64 for t in rows); "
            "assert all(len(q) == 6 and len(s) == 6 for q, r, s in b)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def test_driver_row_appends_to_the_measurements_table(tmp_path, bench):
    compare = bench("trl_step_compare")
    versions = {"torch": "2.13.0+cpu", "transformers": "5.24.0"}
    line = compare.row({"fastppo": 50.0, "trl": 40.0}, {"fastppo": 45.0, "trl": 30.0}, versions,
                       dict(versions, transformers="4.46.3", trl="0.11.4", accelerate="1.1.1"), 3, 10,
                       "/tmp/trl011/bin/python")
    cells = line.strip("|").split(" | ")
    assert len(cells) == 6 and cells[2] == ("fastppo 50.0 ms; TRL 40.0 ms (fastppo/TRL 1.25×); CPU time fastppo "
                                            "45.0 ms, TRL 30.0 ms (1.50×)")
    assert "trl 0.11.4" in cells[3] and "--rounds 3 --steps 10" in cells[5]

    table = tmp_path / "measurements.md"
    header = ("| what | setting (model, shape, batch) | figure | device and versions | commit | source (command or "
              "script) |\n| --- | --- | --- | --- | --- | --- |\n")
    table.write_text("## Other measurements\n\nintro\n\n" + header + "| a | b | c | d | e | f |\n\nafter\n")
    compare.append_row(table, line)
    lines = table.read_text().splitlines()
    assert lines[lines.index("| a | b | c | d | e | f |") + 1] == line and lines[-1] == "after"


def test_served_worker_steps_on_request_and_the_interleaved_row(bench):
    """The worker that --interleave alternates: ready, one step per request (wall and CPU seconds), versions on quit."""
    compare = bench("trl_step_compare")
    worker = subprocess.Popen([sys.executable, str(SCRIPT), "--serve", "fastppo"], env=compare.worker_env("fastppo"),
                              cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              text=True)
    try:
        out, _ = worker.communicate("step\nstep\nquit\n", timeout=600)
    finally:
        worker.kill()
    replies = [json.loads(line[len(compare.PROTOCOL):]) for line in out.splitlines()
               if line.startswith(compare.PROTOCOL)]
    assert replies[0] == {"ready": True, "torch_threads": 1}
    assert all(r["wall"] > 0 and r["cpu"] > 0 for r in replies[1:3]) and len(replies) == 4
    assert {"torch", "transformers"} <= set(replies[3]["versions"])

    versions = {"torch": "2.13.0+cpu", "transformers": "5.24.0"}
    line = compare.row({"fastppo": 50.0, "trl": 40.0}, {"fastppo": 45.0, "trl": 30.0}, versions, versions, 0, 80,
                       "/tmp/trl011/bin/python", paired_ratio=1.4, turn=10)
    cells = line.strip("|").split(" | ")
    assert cells[2].endswith("median of the per-turn-pair CPU-time ratios 1.40×")
    assert "--interleave --turn 10 --steps 80" in cells[5]
    assert "the workers taking turns" in cells[0] and "80 steps each in alternating turns of 10" in cells[1]
