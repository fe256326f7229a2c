"""Shared by every test directory: pytest puts this directory on sys.path for its
conftest, so helper modules here (scripted_hub.py) import from tests/unit, tests/adversarial
and the rest alike."""
