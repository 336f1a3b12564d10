#!/usr/bin/env python3
"""Helm release operations for the real-cluster tests, with Helm's own engine (helm-python-sdk,
no helm binary): what `helm install`, `helm upgrade` and `helm uninstall` do.

    helm_release.py install|upgrade RELEASE NAMESPACE VALUES_JSON [--kubeconfig PATH]
    helm_release.py uninstall RELEASE NAMESPACE [--kubeconfig PATH]

The chart is charts/session-monitor-operator from this repository. install creates the namespace
(`--create-namespace`) and, like upgrade, waits for the release's resources to be ready
(`--wait`, 180 s). Prints the release's status line; exits 1 with Helm's error otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import helm_python as helm

CHART = Path(__file__).resolve().parents[2] / "charts" / "session-monitor-operator"
TIMEOUT = 180


def main(argv: list[str]) -> int:
    kubeconfig = None
    if "--kubeconfig" in argv:
        i = argv.index("--kubeconfig")
        kubeconfig = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    if len(argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    action, release, namespace = argv[1:4]
    config = helm.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        if action == "install":
            result = config.install(
                str(CHART), release, json.loads(argv[4]), namespace=namespace,
                create_namespace=True, wait="watcher", timeout=TIMEOUT,
            )
        elif action == "upgrade":
            result = config.upgrade(
                str(CHART), release, json.loads(argv[4]), namespace=namespace,
                wait="watcher", timeout=TIMEOUT,
            )
        elif action == "uninstall":
            result = config.uninstall(release, wait="watcher", timeout=TIMEOUT)
        else:
            print(__doc__, file=sys.stderr)
            return 2
    except helm.HelmError as error:
        print(f"helm {action} {release}: {error}", file=sys.stderr)
        return 1
    finally:
        config.close()
    summary = result if isinstance(result, dict) else getattr(result, "__dict__", {})
    print(json.dumps(summary, default=str)[:2000])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
