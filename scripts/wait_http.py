"""Wait until URL answers HTTP 200, for at most SECONDS: wait_http.py URL SECONDS."""
import sys
import time
import urllib.request

url, limit = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + limit
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"{url} did not answer 200 within {limit:.0f}s")
