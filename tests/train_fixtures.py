"""Fixtures shared by the training tests (imported into their modules, so conftest stays untouched)."""

import pytest


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models gain nothing from threads, and on a shared 2-core box two threads contend badly.
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """The colour task (fixtures/tasks.py): 64 train and 32 dev prompt/completion records."""
    from fixtures.tasks import write_task

    return write_task("colour", str(tmp_path_factory.mktemp("tasks")), n_train=64, n_dev=32)
