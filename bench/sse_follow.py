"""Follows a coordinator's dashboard event stream (/events) as a browser's
EventSource does: reads every event, and after a dropped connection
reconnects with Last-Event-ID. Runs until killed; used by bench/driver.py
to keep a dashboard open during a run.

    python3 bench/sse_follow.py http://127.0.0.1:7780/events
"""
import sys
import time
import urllib.request

RETRY_S = 0.5


def follow(url):
    last_id = None
    while True:
        request = urllib.request.Request(url)
        if last_id is not None:
            request.add_header("Last-Event-ID", last_id)
        try:
            with urllib.request.urlopen(request, timeout=60) as stream:
                for raw in stream:
                    line = raw.decode("utf-8", "replace").rstrip("\n")
                    if line.startswith("id:"):
                        last_id = line[3:].strip()
        except OSError:
            pass
        time.sleep(RETRY_S)


if __name__ == "__main__":
    follow(sys.argv[1])
