# Its presence puts the repository root on sys.path for the tests (pytest rootdir conftest).


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (Inductor compiles); -m 'not slow' leaves them out")
