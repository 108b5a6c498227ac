"""`make demo`'s driver: every stage runs once, a second run reuses them, and other settings get their own runs."""

import json

from mixbct_jax import demo


def test_demo_runs_every_stage_and_reuses_them_only_for_the_same_settings(tmp_path, capfd):
    table = demo.run(tmp_path, steps=3, seed=0)
    run = demo.run_dir(tmp_path, steps=3, seed=0)
    assert set(table) == {"new_only", "mixbct"}
    for rows in table.values():
        assert set(rows) == {"old/old", "new/new", "new/old"}
        assert all(0.0 <= m["mAP"] <= 1.0 for m in rows.values())
    assert (run / "reports" / "summary.md").is_file() and (run / "reports" / "training_curves.png").is_file()
    last = json.loads((run / "new_mixbct" / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 3
    capfd.readouterr()

    again = demo.run(tmp_path, steps=3, seed=0)
    err = capfd.readouterr().err
    assert err.count("done already") == 5 and again == table

    # Another step count is another run folder: nothing of the 3-step run is reused or overwritten.
    assert demo.run_dir(tmp_path, steps=4, seed=0) != run and demo.run_dir(tmp_path, steps=3, seed=1) != run
