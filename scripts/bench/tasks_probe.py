"""Sequential tasks through one node's API, one at a time on a keep-alive
connection, for `scripts/bench.sh tasks`: where a task's time goes.

Each task is POST /v1/tasks {"agent", "input"} (the node gives it a new task
id); prints one JSON line per task: where, agent, status, e2e_ms (the
client's round trip), millis (the host's run time, whole ms), stages_ms (the
host's stages: claim, embed, search, generate, record; empty when the
answer has none).
Usage: tasks_probe.py WHERE HOST:PORT AGENT COUNT INPUT [INPUT...]
(COUNT tasks, cycling through the inputs; a failed task is printed with its
status and body, and counts as an error.)
"""

import http.client
import json
import sys
import time


def main():
    where, api, agent, count, inputs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5:]
    host, port = api.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    for i in range(count):
        body = json.dumps({"agent": agent, "input": inputs[i % len(inputs)]})
        sent = time.perf_counter()
        try:
            conn.request("POST", "/v1/tasks", body, {"content-type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
            status = resp.status
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            conn = http.client.HTTPConnection(host, int(port), timeout=120)
            data, status = str(e).encode(), 0
        e2e = (time.perf_counter() - sent) * 1000
        row = {"where": where, "agent": agent, "status": status, "e2e_ms": e2e}
        if status == 200:
            answer = json.loads(data)
            row["millis"] = answer.get("millis")
            row["stages_ms"] = answer.get("stages_ms") or {}
        else:
            row["body"] = data[:300].decode("utf-8", "replace")
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
