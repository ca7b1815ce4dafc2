"""The benchmark: ``python3 bench/bench.py`` (bench.py), its timed tasks, the authors' DIH step."""
