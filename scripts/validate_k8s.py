"""Validates deploy/k8s against Kubernetes' own schemas (kubernetes-validate, strict: unknown
fields fail) and, for the two kinds it does not bundle (ServiceMonitor, Kustomization), against
the JSON schemas in deploy/k8s/schemas. Also checks that the Kustomization lists files that
exist, that a deliberately broken manifest is rejected (so a pass means something), and writes
the ConfigMap's wattgate.toml out for `wattgate config check`.

usage: validate_k8s.py DEPLOY_K8S_DIR TOML_OUT
"""

import copy
import json
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

VERSION = "1.37.0"
CUSTOM = {"ServiceMonitor": "servicemonitor.json", "Kustomization": "kustomization.json"}


def main() -> int:
    root = pathlib.Path(sys.argv[1])
    toml_out = pathlib.Path(sys.argv[2])
    failures = 0
    checked = 0
    documents = []
    for path in sorted(root.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                documents.append((path, doc))
    for path, doc in documents:
        kind = doc.get("kind")
        name = doc.get("metadata", {}).get("name", "")
        try:
            if kind in CUSTOM:
                schema = json.loads((root / "schemas" / CUSTOM[kind]).read_text())
                jsonschema.validate(doc, schema)
            else:
                kubernetes_validate.validate(doc, VERSION, strict=True)
            checked += 1
            print(f"ok   {path.name}: {kind}/{name}")
        except Exception as e:  # every validation failure is reported, then counted
            failures += 1
            print(f"FAIL {path.name}: {kind}/{name}: {str(e).splitlines()[0]}")
        if kind == "Kustomization":
            for resource in doc.get("resources", []):
                if not (root / resource).is_file():
                    failures += 1
                    print(f"FAIL {path.name}: lists {resource}, which does not exist")
        if kind == "ConfigMap" and "wattgate.toml" in doc.get("data", {}):
            toml_out.write_text(doc["data"]["wattgate.toml"])

    # The validator must reject what it should: a Deployment with an unknown field, and a
    # ServiceMonitor endpoint with a misspelled key.
    deployment = next(d for _, d in documents if d.get("kind") == "Deployment")
    broken = copy.deepcopy(deployment)
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    monitor = next(d for _, d in documents if d.get("kind") == "ServiceMonitor")
    broken_monitor = copy.deepcopy(monitor)
    broken_monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    for label, check in [
        ("Deployment with an unknown field", lambda: kubernetes_validate.validate(broken, VERSION, strict=True)),
        ("ServiceMonitor with a misspelled key", lambda: jsonschema.validate(broken_monitor, json.loads((root / "schemas" / "servicemonitor.json").read_text()))),
    ]:
        try:
            check()
            failures += 1
            print(f"FAIL the validator accepted a {label}")
        except Exception:
            print(f"ok   a {label} is rejected")

    kinds = {d.get("kind") for _, d in documents}
    required = {"Deployment", "Service", "ConfigMap", "Secret", "HorizontalPodAutoscaler",
                "PodDisruptionBudget", "ServiceMonitor", "Kustomization", "PersistentVolumeClaim"}
    for missing in sorted(required - kinds):
        failures += 1
        print(f"FAIL no {missing} in {root}")
    print(f"{checked} of {len(documents)} manifests valid, {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
