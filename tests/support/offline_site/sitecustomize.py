# Put on PYTHONPATH by tests/conftest.py: installs the offline guard (tests/support/offline_guard.py) in
# every Python process the tests start.
import importlib.util
import os

if os.environ.get("SLM_TEST_OFFLINE") == "1":
    _spec = importlib.util.spec_from_file_location(
        "offline_guard", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "offline_guard.py"))
    _guard = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_guard)
    _guard.install()
    import sys
    sys.modules.setdefault("offline_guard", _guard)
