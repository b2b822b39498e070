"""What the e2e scripts share: run named checks, print one line each, exit 1 on any failure.

  from e2e_checks import run
  run([("what it checks", function), ...])
"""
import sys


def run(checks):
    """Runs every check (a failure is reported, not raised), prints "N passed, M failed", exits."""
    results = []
    for name, fn in checks:
        try:
            fn()
            results.append(True)
            print(f"ok    {name}")
        except Exception as e:  # report every failure, keep going
            results.append(False)
            print(f"FAIL  {name}: {type(e).__name__}: {e}")
    passed, failed = results.count(True), results.count(False)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)
