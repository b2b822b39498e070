"""Evaluates every PromQL expression of a Grafana dashboard and of the rules a Prometheus has
loaded, against that Prometheus; fails if any returns no data or any rule reports an error.

usage: check_queries.py PROMETHEUS_URL DASHBOARD.json
Grafana's $__range and $__rate_interval are replaced with 5m and 1m. Alert expressions end in
a comparison; when an alert is not firing, its left-hand side must still return data.
"""
import json
import re
import sys
import urllib.parse
import urllib.request

prom, dashboard = sys.argv[1], sys.argv[2]


def query(expr):
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def show(result):
    values = []
    for series in result[:3]:
        v = float(series["value"][1])
        labels = ",".join(f"{k}={v}" for k, v in series["metric"].items() if k != "__name__")
        values.append(f"{v:.4g}" + (f" {{{labels}}}" if labels else ""))
    return "; ".join(values) + (" ..." if len(result) > 3 else "")


failures = 0


def check(kind, name, expr, lhs_ok=False):
    global failures
    result = query(expr)
    note = ""
    if not result and lhs_ok:
        lhs = re.sub(r"\s*(>=|<=|==|!=|>|<)\s*-?[0-9.e+]+\s*$", "", expr.split(" and ")[0])
        result = query(lhs)
        note = " (not firing; left-hand side shown)"
    status = "ok  " if result else "FAIL"
    if not result:
        failures += 1
    print(f"{status} {kind:<9} {name[:48]:<48} {show(result) if result else 'no data'}{note}")


with open(dashboard) as f:
    dash = json.load(f)
for panel in dash["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"].replace("$__range", "5m").replace("$__rate_interval", "1m")
        check("dashboard", f"{panel['title']} [{target['refId']}]", expr)

with urllib.request.urlopen(f"{prom}/api/v1/rules", timeout=30) as r:
    groups = json.load(r)["data"]["groups"]
rules = [rule for g in groups for rule in g["rules"]]
if not rules:
    print("FAIL no rules loaded")
    failures += 1
for rule in rules:
    if rule.get("health") != "ok":
        print(f"FAIL rule      {rule['name']}: health {rule.get('health')} {rule.get('lastError', '')}")
        failures += 1
        continue
    if rule["type"] == "recording":
        check("recording", rule["name"], rule["name"])
    else:
        state = rule.get("state")
        check("alert", f"{rule['name']} ({state})", rule["query"], lhs_ok=True)

total = sum(len(p.get("targets", [])) for p in dash["panels"]) + len(rules)
print(f"{total - failures} of {total} expressions returned data")
sys.exit(1 if failures else 0)
