"""Lets `pytest benchmarks --benchmark-only` collect the bench_<op>.py files (tests/ keeps the default
test_*.py pattern). A bench file named on the command line is collected by pytest itself."""
import pytest
import torch


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(autouse=True, scope="module")
def _threads():
    """Every suite is measured on the 2 threads the comparison scripts use, whatever the host has."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)
