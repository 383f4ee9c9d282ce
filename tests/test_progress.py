"""Progress lines of a Ray stage (no Ray: the line and its duration format)."""

from __future__ import annotations

from pocl_ray.progress import duration, progress_line


def test_progress_line():
    assert progress_line("score", 250, 1000, 10.0) == "[score] 250/1000 rows (25%), 25.0 rows/s, ETA 0m30s"
    assert progress_line("eval", 0, 10, 0.0) == "[eval] 0/10 rows (0%), 0.0 rows/s, ETA ?"
    assert progress_line("score", 10, 72010, 1.0).endswith("ETA 2h00m")


def test_duration():
    assert duration(0) == "0m00s"
    assert duration(247.9) == "4m07s"
    assert duration(3599) == "59m59s"
    assert duration(3600 + 5 * 60 + 59) == "1h05m"
