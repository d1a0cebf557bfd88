"""The `deltaprop` command (bench, check, info, train) and the pytest-benchmark suites."""
