"""The progress line: one line at 100%, throttled, named."""

import io

from mixbct_jax.progress import Progress


def test_one_line_at_completion_and_close_is_idempotent():
    out = io.StringIO()
    with Progress(10, "embed new", unit="img", stream=out, min_interval=0.0) as bar:
        for _ in range(10):
            bar.update(1)
        bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10  # 9 progress lines, then one "done" line; none repeats 10/10
    assert sum("10/10" in line for line in lines) == 1 and lines[-1].startswith("embed new: 10/10 (100.0%)")
    assert "done in" in lines[-1] and "ETA" in lines[0]


def test_throttled_and_disabled():
    out = io.StringIO()
    with Progress(1000, "x", stream=out, min_interval=3600) as bar:
        for _ in range(1000):
            bar.update()
    assert len(out.getvalue().splitlines()) == 2  # the first update, then the final line
    quiet = io.StringIO()
    with Progress(5, "x", stream=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_retrieval_progress_names_the_row(capsys):
    import numpy as np

    from mixbct_jax.evaluation import retrieval

    rng = np.random.default_rng(0)
    retrieval.retrieval_metrics(
        rng.normal(size=(6, 4)), np.arange(6) % 3, rng.normal(size=(6, 4)), np.arange(6) % 3, desc="retrieval new/old"
    )
    assert "retrieval new/old: 6/6" in capsys.readouterr().err
