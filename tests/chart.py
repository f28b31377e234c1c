"""The Helm chart rendered by Helm's own Go SDK (`helm-python-sdk`), for the tests that read
what it makes: the manifests' checks and the runs of its commands on real servers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parents[1] / "helm" / "genrec"
RELEASE, NAMESPACE = "demo", "recs"


def render(helm: Any, values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every manifest of a release with `values`, each tagged with its template's path."""
    with helm.Chart.load(str(CHART)) as chart:
        files = chart.render(values or None, name=RELEASE, namespace=NAMESPACE)
    docs = []
    for path, text in sorted(files.items()):
        if path.endswith(".txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc["_template"] = path
                docs.append(doc)
    return docs


def one(docs: list[dict[str, Any]], kind: str, suffix: str) -> dict[str, Any]:
    """The one manifest of `kind` whose name ends with `suffix`."""
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"{kind} *{suffix}: {[d['metadata']['name'] for d in found]}"
    return found[0]
