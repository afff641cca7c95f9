def pytest_configure(config):
    config.addinivalue_line("markers", "slow: spawns processes (test_distributed.py); deselect with -m 'not slow'")
