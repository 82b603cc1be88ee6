"""Lets `pytest benchmarks --benchmark-only` collect the bench_<op>.py files (tests/ keeps the default
test_*.py pattern). A bench file named on the command line is collected by pytest itself."""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
