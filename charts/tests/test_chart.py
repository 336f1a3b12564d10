#!/usr/bin/env python3
"""Tests of the Helm chart charts/session-monitor-operator, with the real Helm engine.

Helm 4 runs in-process (helm-python-sdk, offline): the chart is linted, rendered with its
default values, with charts/tests/values-all.yaml (every option on) and with variants, and the
rendered objects are checked: kinds, names, labels, RBAC rules (exactly the generated
files/operator-rules.yaml, which operator/src/rbac.rs produces), probes, security context,
replicas and leader election, the optional ServiceMonitor and dashboard. Invalid values must be
rejected by values.schema.json, and every rendered manifest must validate (kubernetes-validate,
strict) against the minimum supported Kubernetes version. The Grafana dashboard's queries must
name metrics the binaries export and parse as PromQL (promtool).

    pip install helm-python-sdk kubernetes-validate     # and: apt-get install -y prometheus
    python3 charts/tests/test_chart.py

Prints one line per test and a closing "N passed, N failed"; exits 1 on any failure.
`cargo test -p session-monitor-operator --test chart` runs it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import traceback
from pathlib import Path

try:
    import helm_python as helm
    import jsonschema
    import kubernetes_validate
    import yaml
except ImportError as error:  # pragma: no cover - the message is the point
    print(
        f"missing Python module: {error.name}\n"
        "install the chart test dependencies: pip install helm-python-sdk kubernetes-validate",
        file=sys.stderr,
    )
    sys.exit(2)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "session-monitor-operator"
VALUES_ALL = ROOT / "charts" / "tests" / "values-all.yaml"
RULES_FILE = CHART / "files" / "operator-rules.yaml"
RBAC_RS = ROOT / "operator" / "src" / "rbac.rs"
CRD_NAME = "sessionmonitors.sessionmonitor.io.yaml"
DASHBOARD = CHART / "dashboards" / "session-monitor.json"
ALERTS = CHART / "files" / "alerts.yaml"
ALERT_TESTS = ROOT / "charts" / "tests" / "alerts.test.yaml"

RELEASE = "smon"
NAMESPACE = "smon-system"
# The oldest Kubernetes the project supports (k8s-openapi's v1_33 feature).
MIN_KUBERNETES = "1.33"
# Custom resources kubernetes-validate has no schema for: skipped explicitly, and reported.
NOT_VALIDATED_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
STANDARD_LABELS = (
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
)

TESTS = []


def test(function):
    TESTS.append(function)
    return function


# ---------------------------------------------------------------------------------------------
# Helpers


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def values_all() -> dict:
    return load_yaml(VALUES_ALL)


def chart_metadata() -> dict:
    return load_yaml(CHART / "Chart.yaml")


class Rendered:
    """The objects of one `helm template`, with lookups by kind and name."""

    def __init__(self, values: dict | None, namespace: str = NAMESPACE):
        with helm.Chart.load(CHART) as chart:
            self.files = chart.render(values or {}, name=RELEASE, namespace=namespace)
        self.notes = next((t for p, t in self.files.items() if p.endswith("NOTES.txt")), "")
        self.objects = []
        for path, text in sorted(self.files.items()):
            if path.endswith("NOTES.txt"):
                continue
            for document in yaml.safe_load_all(text):
                if document is not None:
                    assert isinstance(document, dict), f"{path}: not an object: {document!r}"
                    self.objects.append(document)

    def kinds(self) -> list[str]:
        return sorted(o["kind"] for o in self.objects)

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}: {self.kinds()}"
        return found[0]

    def deployment(self) -> dict:
        return self.one("Deployment")

    def container(self) -> dict:
        containers = self.deployment()["spec"]["template"]["spec"]["containers"]
        assert len(containers) == 1, containers
        return containers[0]

    def args(self) -> dict[str, str]:
        parsed = {}
        for arg in self.container()["args"]:
            key, _, value = arg.partition("=")
            assert key not in parsed, f"{key} given twice"
            parsed[key] = value
        return parsed


def rule_triples(rules: list[dict]) -> set[tuple[str, str, str]]:
    """(API group, resource, verb) for every permission a list of PolicyRules grants."""
    triples = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, f"unexpected rule fields: {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    triples.add((group, resource, verb))
    return triples


def generated_rules() -> list[dict]:
    rules = load_yaml(RULES_FILE)
    assert isinstance(rules, list) and rules, f"{RULES_FILE}: no rules"
    return rules


def rbac_rs_triples() -> set[tuple[str, str, str]]:
    """The rules of operator/src/rbac.rs's OPERATOR_RULES table, parsed from the source."""
    source = RBAC_RS.read_text()
    start = source.index("=", source.index("pub const OPERATOR_RULES"))
    table = source[start : source.index("];", start)]
    table = re.sub(r"//[^\n]*", "", table)
    entries = re.findall(r'\(\s*"([^"]*)"\s*,\s*"([^"]*)"\s*,\s*&\[([^\]]*)\]\s*,?\s*\)', table)
    assert entries, f"no rules parsed from {RBAC_RS}"
    assert len(entries) == table.count("("), f"{RBAC_RS}: {table.count('(')} tuples, parsed {len(entries)}"
    triples = set()
    for group, resource, verbs in entries:
        for verb in re.findall(r'"([^"]+)"', verbs):
            triples.add((group, resource, verb))
    return triples


def is_lease_rule(rule: dict) -> bool:
    return "leases" in rule["resources"]


def schema_rejects(values: dict) -> str:
    """The error of validate_schema, and render too must refuse the values."""
    with helm.Chart.load(CHART) as chart:
        try:
            chart.validate_schema(values)
        except helm.HelmValuesError as error:
            message = str(error)
        else:
            raise AssertionError(f"schema accepted invalid values {values}")
        try:
            chart.render(values, name=RELEASE, namespace=NAMESPACE)
        except helm.HelmValuesError:
            pass
        else:
            raise AssertionError(f"render accepted invalid values {values}")
    return message


def check_standard_labels(obj: dict, chart: dict, name: str = "session-monitor-operator", version=None):
    labels = obj["metadata"].get("labels", {})
    where = f"{obj['kind']}/{obj['metadata']['name']}"
    for key in STANDARD_LABELS:
        assert key in labels, f"{where} lacks label {key}: {labels}"
    assert labels["helm.sh/chart"] == f"{chart['name']}-{chart['version']}", where
    assert labels["app.kubernetes.io/name"] == name, where
    assert labels["app.kubernetes.io/instance"] == RELEASE, where
    assert labels["app.kubernetes.io/version"] == (version or chart["appVersion"]), where
    assert labels["app.kubernetes.io/managed-by"] == "Helm", where
    assert labels["app.kubernetes.io/component"] == "operator", where
    assert labels["app.kubernetes.io/part-of"] == "session-monitor", where


def workspace_version() -> str:
    cargo = (ROOT / "Cargo.toml").read_text()
    section = cargo[cargo.index("[workspace.package]") :]
    return re.search(r'^version\s*=\s*"([^"]+)"', section, re.M).group(1)


# ---------------------------------------------------------------------------------------------
# Lint


@test
def lint_reports_no_error_or_warning():
    for label, values in (("default values", None), ("values-all.yaml", values_all())):
        for kube_version in (None, f"v{MIN_KUBERNETES}.0"):
            report = helm.lint(CHART, values, strict=True, kube_version=kube_version)
            problems = [m for m in report["messages"] if m["severity"] >= 2]
            assert not report["errors"] and not problems, f"helm lint ({label}, {kube_version}): {report}"


# ---------------------------------------------------------------------------------------------
# Default values


@test
def default_values_render_the_operator_with_a_cluster_role():
    r = Rendered(None)
    assert r.kinds() == sorted(
        ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment", "Service"]
    ), r.kinds()
    fullname = f"{RELEASE}-session-monitor-operator"
    for obj in r.objects:
        assert obj["metadata"]["name"] == fullname, obj["metadata"]
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NAMESPACE, obj["metadata"]
        else:
            assert "namespace" not in obj["metadata"], obj["metadata"]


@test
def every_object_carries_the_standard_labels():
    chart = chart_metadata()
    for obj in Rendered(None).objects:
        check_standard_labels(obj, chart)
    everything = Rendered(values_all())
    for obj in everything.objects:
        check_standard_labels(obj, chart, name="smon-operator", version="0.1.0-rc.1")
        assert obj["metadata"]["labels"]["team"] == "bi-platform", obj["metadata"]


@test
def the_service_and_the_deployment_select_the_operator_pods():
    for values in (None, values_all()):
        r = Rendered(values)
        deployment = r.deployment()
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert set(selector) == {"app.kubernetes.io/name", "app.kubernetes.io/instance"}, selector
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items(), (selector, pod_labels)
        service = r.one("Service")
        assert service["spec"]["selector"] == selector, service["spec"]
        port = service["spec"]["ports"][0]
        assert port["name"] == "http-metrics" and port["targetPort"] == "http-metrics", port
        assert port["port"] == r.container()["ports"][0]["containerPort"], port


@test
def the_cluster_role_grants_exactly_the_generated_rules():
    r = Rendered(None)
    role = r.one("ClusterRole")
    rules = generated_rules()
    assert role["rules"] == rules, "the ClusterRole's rules differ from files/operator-rules.yaml"
    # And so every permission of operator/src/rbac.rs, the table the code is checked against.
    missing = rbac_rs_triples() - rule_triples(role["rules"])
    assert not missing, f"the ClusterRole lacks {sorted(missing)} of operator/src/rbac.rs"
    extra = rule_triples(role["rules"]) - rbac_rs_triples()
    assert not extra, f"the ClusterRole grants {sorted(extra)} that operator/src/rbac.rs does not list"
    binding = r.one("ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }, binding["roleRef"]
    service_account = r.one("ServiceAccount")
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": service_account["metadata"]["name"], "namespace": NAMESPACE}
    ], binding["subjects"]
    pod = r.deployment()["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == service_account["metadata"]["name"], pod


@test
def the_generated_rules_file_is_the_table_of_rbac_rs():
    # operator/tests/crd.rs checks the file byte for byte against `rbac-rules`; this checks the
    # parse of the table itself, so a hand edit of either shows here too.
    assert rule_triples(generated_rules()) == rbac_rs_triples()
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}
    for group, resource, verb in rbac_rs_triples():
        assert verb in verbs, f"unknown verb {verb} on {group}/{resource}"
        assert verb != "*" and resource != "*" and group != "*", "wildcards are not least privilege"


@test
def the_deployment_runs_the_operator_binary_with_probes():
    r = Rendered(None)
    deployment = r.deployment()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate", deployment["spec"]["strategy"]
    container = r.container()
    chart = chart_metadata()
    image = f"ghcr.io/session-monitor/session-monitor:{chart['appVersion']}"
    assert container["image"] == image, container["image"]
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["command"] == ["/usr/local/bin/session-monitor-operator"], container["command"]
    args = r.args()
    assert args == {
        "--default-image": image,
        "--http-listen": "0.0.0.0:8080",
        "--leader-election": "true",
        "--lease-name": f"{RELEASE}-session-monitor-operator",
        "--log-level": "info",
        "--log-format": "json",
    }, args
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}, env
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}, env
    assert container["ports"] == [{"name": "http-metrics", "containerPort": 8080, "protocol": "TCP"}]
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http-metrics"}, container[probe]
        assert container[probe]["periodSeconds"] >= 1, container[probe]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    pod = deployment["spec"]["template"]["spec"]
    for absent in ("nodeSelector", "tolerations", "affinity", "priorityClassName", "imagePullSecrets"):
        assert absent not in pod, f"{absent} rendered without being set"


@test
def the_default_service_image_is_the_operators_compiled_default():
    # One image holds both binaries: the chart's image:tag must be what the operator would use
    # without --default-image (operator/src/run.rs), at the workspace's version.
    run_rs = (ROOT / "operator" / "src" / "run.rs").read_text()
    compiled = re.search(r'"([a-z0-9./-]+):\{\}"', run_rs)
    assert compiled, "operator/src/run.rs: default image format not found"
    assert chart_metadata()["appVersion"] == workspace_version(), "Chart.yaml appVersion != Cargo.toml version"
    expected = f"{compiled.group(1)}:{workspace_version()}"
    assert Rendered(None).args()["--default-image"] == expected


@test
def the_pod_runs_non_root_read_only_without_capabilities():
    r = Rendered(None)
    pod = r.deployment()["spec"]["template"]["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 65532 and pod["runAsGroup"] == 65532, pod
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, pod
    container = r.container()["securityContext"]
    assert container["readOnlyRootFilesystem"] is True, container
    assert container["allowPrivilegeEscalation"] is False, container
    assert container["runAsNonRoot"] is True, container
    assert container["capabilities"] == {"drop": ["ALL"]}, container
    assert "privileged" not in container or container["privileged"] is False, container


@test
def optional_objects_are_off_by_default():
    r = Rendered(None)
    assert not r.all("ServiceMonitor") and not r.all("ConfigMap"), r.kinds()
    assert not r.all("Role") and not r.all("RoleBinding"), r.kinds()


# ---------------------------------------------------------------------------------------------
# Every option on


@test
def values_all_turns_every_option_on():
    values = values_all()
    r = Rendered(values)
    assert r.kinds() == sorted(
        ["ServiceAccount", "Deployment", "Service", "ServiceMonitor", "PrometheusRule", "ConfigMap"]
        + ["Role", "RoleBinding"] * 3
    ), r.kinds()
    deployment = r.deployment()
    assert deployment["metadata"]["name"] == "qlik-smon-operator"
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    pod_meta = deployment["spec"]["template"]["metadata"]
    assert pod_meta["annotations"] == values["podAnnotations"], pod_meta
    assert pod_meta["labels"]["example.com/tier"] == "control", pod_meta
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "qlik-smon"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["terminationGracePeriodSeconds"] == 60
    assert pod["securityContext"] == values["podSecurityContext"]
    container = r.container()
    assert container["image"] == "registry.example.com/mirror/session-monitor:0.1.0-rc.1"
    assert container["imagePullPolicy"] == "Always"
    assert container["securityContext"] == values["securityContext"]
    assert container["resources"] == values["resources"]
    assert [e["name"] for e in container["env"]] == ["POD_NAME", "POD_NAMESPACE", "RUST_BACKTRACE", "HTTPS_PROXY"]
    assert container["env"][3] == values["extraEnv"][1]
    assert container["ports"][0]["containerPort"] == 9090
    for probe in ("livenessProbe", "readinessProbe"):
        expected = dict(values[probe], httpGet=container[probe]["httpGet"])
        assert container[probe] == expected, container[probe]
    assert r.args() == {
        "--default-image": "registry.example.com/mirror/session-monitor:0.1.0-custom",
        "--http-listen": "0.0.0.0:9090",
        "--leader-election": "true",
        "--lease-name": "qlik-smon-leader",
        "--log-level": "info,kube=debug",
        "--log-format": "text",
        "--watch-namespaces": "qlik-prod,qlik-test",
    }, r.args()
    service_account = r.one("ServiceAccount")
    assert service_account["metadata"]["name"] == "qlik-smon"
    assert service_account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    service = r.one("Service")
    assert service["metadata"]["annotations"] == values["metrics"]["service"]["annotations"]
    assert service["spec"]["ports"][0]["port"] == 9090


@test
def watch_namespaces_use_roles_and_no_cluster_permission():
    r = Rendered(values_all())
    assert not r.all("ClusterRole") and not r.all("ClusterRoleBinding"), r.kinds()
    rules = generated_rules()
    namespaced = [rule for rule in rules if not is_lease_rule(rule)]
    leases = [rule for rule in rules if is_lease_rule(rule)]
    assert leases and namespaced, rules
    for namespace in ("qlik-prod", "qlik-test"):
        role = next(o for o in r.all("Role") if o["metadata"]["namespace"] == namespace)
        assert role["metadata"]["name"] == "qlik-smon-operator", role["metadata"]
        assert role["rules"] == namespaced, f"Role in {namespace}: {role['rules']}"
        binding = next(o for o in r.all("RoleBinding") if o["metadata"]["namespace"] == namespace)
        assert binding["roleRef"]["kind"] == "Role" and binding["roleRef"]["name"] == "qlik-smon-operator"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "qlik-smon", "namespace": NAMESPACE}]
    lease_role = r.one("Role", "qlik-smon-operator-leader-election")
    assert lease_role["metadata"]["namespace"] == NAMESPACE, lease_role["metadata"]
    assert lease_role["rules"] == leases, lease_role["rules"]
    lease_binding = r.one("RoleBinding", "qlik-smon-operator-leader-election")
    assert lease_binding["metadata"]["namespace"] == NAMESPACE
    assert lease_binding["roleRef"]["name"] == "qlik-smon-operator-leader-election"
    # Together the Roles grant every rule of rbac.rs, and nothing more.
    granted = set()
    for role in r.all("Role"):
        granted |= rule_triples(role["rules"])
    assert granted == rbac_rs_triples(), granted ^ rbac_rs_triples()


@test
def the_service_monitor_exists_only_when_enabled():
    assert not Rendered(None).all("ServiceMonitor")
    r = Rendered({"metrics": {"serviceMonitor": {"enabled": True}}})
    monitor = r.one("ServiceMonitor")
    assert monitor["metadata"]["namespace"] == NAMESPACE
    assert monitor["spec"]["selector"]["matchLabels"] == r.deployment()["spec"]["selector"]["matchLabels"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert monitor["spec"]["endpoints"] == [{"port": "http-metrics", "path": "/metrics"}], monitor["spec"]
    everything = Rendered(values_all())
    monitor = everything.one("ServiceMonitor")
    assert monitor["metadata"]["namespace"] == "monitoring"
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    endpoint = monitor["spec"]["endpoints"][0]
    expected = values_all()["metrics"]["serviceMonitor"]
    assert endpoint["interval"] == "30s" and endpoint["scrapeTimeout"] == "10s", endpoint
    assert endpoint["relabelings"] == expected["relabelings"]
    assert endpoint["metricRelabelings"] == expected["metricRelabelings"]
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


@test
def the_dashboard_configmap_exists_only_when_enabled():
    assert not Rendered(None).all("ConfigMap")
    r = Rendered(values_all())
    config_map = r.one("ConfigMap")
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["annotations"] == {"grafana_folder": "Qlik"}
    assert json.loads(config_map["data"]["session-monitor.json"]) == json.loads(DASHBOARD.read_text())


# ---------------------------------------------------------------------------------------------
# Replicas and leader election


@test
def leader_election_off_recreates_and_tells_the_operator():
    r = Rendered({"leaderElection": {"enabled": False}})
    deployment = r.deployment()
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}, deployment["spec"]["strategy"]
    assert r.args()["--leader-election"] == "false"


@test
def more_than_one_replica_needs_leader_election():
    message = schema_rejects({"replicaCount": 2, "leaderElection": {"enabled": False}})
    assert "leaderElection" in message, message
    r = Rendered({"replicaCount": 3})
    assert r.deployment()["spec"]["replicas"] == 3 and r.args()["--leader-election"] == "true"


# ---------------------------------------------------------------------------------------------
# Values and schema


INVALID_VALUES = [
    {"replicas": 2},  # a typo of replicaCount
    {"replicaCount": -1},
    {"replicaCount": "two"},
    {"image": {"pullPolicy": "Sometimes"}},
    {"image": {"repository": ""}},
    {"image": {"registry": "docker.io"}},
    {"logFormat": "xml"},
    {"watchNamespaces": "qlik-prod,qlik-test"},
    {"watchNamespaces": ["Qlik_Prod"]},
    {"watchNamespaces": ["qlik", "qlik"]},
    {"metrics": {"port": 70000}},
    {"metrics": {"port": "8080"}},
    {"metrics": {"service": {"type": "ExternalName"}}},
    {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
    {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
    {"leaderElection": {"enabled": "true"}},
    {"serviceAccount": {"name": "Operator"}},
    {"rbac": {"create": True, "aggregate": True}},
    {"livenessProbe": {"exec": {"command": ["true"]}}},
    {"livenessProbe": {"periodSeconds": 0}},
    {"resources": {"request": {"cpu": "1"}}},
    {"nodeSelector": {"disk": 1}},
    {"tolerations": ["NoSchedule"]},
    {"extraEnv": [{"value": "no name"}]},
    {"imagePullSecrets": ["regcred"]},
    {"grafanaDashboard": {"enabled": 1}},
    {"podAnnotations": {"a": True}},
    {"terminationGracePeriodSeconds": -5},
]


@test
def the_schema_rejects_invalid_values():
    for values in INVALID_VALUES:
        schema_rejects(values)
    print(f"    {len(INVALID_VALUES)} invalid value sets rejected")


@test
def the_schema_accepts_the_defaults_and_values_all():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        chart.validate_schema(values_all())
        chart.validate_schema(chart.values)


def walk_schema(values, schema: dict, path: str, undeclared: list):
    """Every key of `values` must be a declared property, down to free-form objects."""
    if not isinstance(values, dict) or "properties" not in schema:
        return
    for key, value in values.items():
        if key not in schema["properties"]:
            undeclared.append(f"{path}{key}")
        else:
            walk_schema(value, schema["properties"][key], f"{path}{key}.", undeclared)


@test
def the_schema_covers_every_value():
    schema = json.loads((CHART / "values.schema.json").read_text())
    defaults = load_yaml(CHART / "values.yaml")
    undeclared = []
    walk_schema(defaults, schema, "", undeclared)
    walk_schema(values_all(), schema, "", undeclared)
    assert not undeclared, f"values without a schema: {undeclared}"
    stale = set(schema["properties"]) - set(defaults) - {"global"}
    assert not stale, f"schema properties missing from values.yaml: {stale}"
    assert set(values_all()) == set(defaults), set(values_all()) ^ set(defaults)
    for key, prop in schema["properties"].items():
        assert prop.get("description"), f"values.schema.json: {key} has no description"


def documented_value_paths() -> list[str]:
    """Dotted paths of the values.yaml keys with a `# --` comment right above them."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []
    paths = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while parents and parents[-1][0] >= indent:
            parents.pop()
        path = ".".join([p for _, p in parents] + [match.group(2)])
        parents.append((indent, match.group(2)))
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            if "# --" in lines[above]:
                paths.append(path)
                break
            above -= 1
    return paths


@test
def the_charts_readme_lists_every_value():
    readme = (CHART / "README.md").read_text()
    listed = set()
    for cell in re.findall(r"^\| ([^|]+) \|", readme, re.M):
        last = ""
        for token in re.findall(r"`([^`]+)`", cell):
            if token.startswith(".") and last:
                token = last.rsplit(".", 1)[0] + token
            listed.add(token)
            last = token
    missing = [p for p in documented_value_paths() if p not in listed]
    assert not missing, f"charts/session-monitor-operator/README.md does not list {missing}"


@test
def values_yaml_documents_every_value():
    # Each key is documented by a `# --` comment right above it, or above one of its parents.
    lines = (CHART / "values.yaml").read_text().splitlines()
    documented_at: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for number, line in enumerate(lines):
        match = re.match(r"^( *)([A-Za-z][A-Za-z0-9_]*):", line)
        if not match:
            continue
        indent = len(match.group(1))
        while documented_at and documented_at[-1][0] >= indent:
            documented_at.pop()
        comments = []
        above = number - 1
        while above >= 0 and lines[above].strip().startswith("#"):
            comments.append(lines[above])
            above -= 1
        documented = any("# --" in c for c in comments) or any(d for _, d in documented_at)
        is_leaf = not line.rstrip().endswith(":")
        if is_leaf and not documented:
            undocumented.append(line.strip())
        documented_at.append((indent, documented))
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


# ---------------------------------------------------------------------------------------------
# CRD, Kubernetes schemas, NOTES


@test
def the_charts_crd_is_byte_identical_to_crds():
    source = (ROOT / "crds" / CRD_NAME).read_bytes()
    assert (CHART / "crds" / CRD_NAME).read_bytes() == source, f"charts/.../crds/{CRD_NAME} differs from crds/"
    with helm.Chart.load(CHART) as chart:
        crds = chart.crds
    assert [c["name"] for c in crds] == [f"crds/{CRD_NAME}"], crds
    assert crds[0]["data"].encode() == source, "the CRD Helm loads differs from crds/"


RENDER_CASES = {
    "default values": lambda: None,
    "values-all.yaml": values_all,
    "leader election off": lambda: {"leaderElection": {"enabled": False}},
    "one watched namespace, existing ServiceAccount, no RBAC": lambda: {
        "watchNamespaces": ["qlik"],
        "serviceAccount": {"create": False, "name": "preexisting"},
        "rbac": {"create": False},
    },
    "ServiceMonitor and dashboard only": lambda: {
        "metrics": {"serviceMonitor": {"enabled": True}},
        "grafanaDashboard": {"enabled": True},
    },
}


@test
def every_manifest_validates_against_the_minimum_kubernetes():
    skipped = set()
    count = 0
    for label, values in RENDER_CASES.items():
        for obj in Rendered(values()).objects:
            key = (obj["apiVersion"], obj["kind"])
            if key in NOT_VALIDATED_KINDS:
                skipped.add(key)
                continue
            try:
                kubernetes_validate.validate(obj, MIN_KUBERNETES, strict=True)
            except kubernetes_validate.ValidationError as error:
                raise AssertionError(
                    f"{label}: {obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes "
                    f"{MIN_KUBERNETES}: {error.message} at {list(error.path)}"
                ) from None
            count += 1
    crd = load_yaml(CHART / "crds" / CRD_NAME)
    kubernetes_validate.validate(crd, MIN_KUBERNETES, strict=True)
    count += 1
    print(f"    {count} objects valid for Kubernetes {MIN_KUBERNETES} (strict), the CRD included")
    for api_version, kind in sorted(skipped):
        print(f"    not validated: {kind} ({api_version}), a custom resource kubernetes-validate has no schema for")


@test
def an_existing_service_account_without_rbac_renders_only_the_operator():
    r = Rendered(RENDER_CASES["one watched namespace, existing ServiceAccount, no RBAC"]())
    assert r.kinds() == ["Deployment", "Service"], r.kinds()
    assert r.deployment()["spec"]["template"]["spec"]["serviceAccountName"] == "preexisting"
    assert r.args()["--watch-namespaces"] == "qlik"


@test
def notes_show_a_first_session_monitor_valid_for_the_crd():
    crd = load_yaml(CHART / "crds" / CRD_NAME)
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    schema = version["schema"]["openAPIV3Schema"]
    for values, namespace in ((None, "qlik"), (values_all(), "qlik-prod")):
        notes = Rendered(values).notes
        block = re.search(r"\n\n(  apiVersion: v1\n.*?)\n\n", notes, re.S)
        assert block, f"NOTES.txt shows no example:\n{notes}"
        documents = list(yaml.safe_load_all(textwrap.dedent(block.group(1))))
        assert [d["kind"] for d in documents] == ["Secret", "SessionMonitor"], documents
        monitor = documents[1]
        assert monitor["apiVersion"] == f"{crd['spec']['group']}/{version['name']}"
        assert monitor["metadata"]["namespace"] == namespace, monitor["metadata"]
        jsonschema.Draft7Validator(schema).validate(monitor)
        kubernetes_validate.validate(documents[0], MIN_KUBERNETES, strict=True)
        assert "kubectl apply --server-side --force-conflicts" in notes and "helm show crds" in notes, notes


@test
def the_packaged_chart_carries_its_files():
    # What `helm package` ships (after .helmignore) still renders the same objects.
    with tempfile.TemporaryDirectory() as directory:
        archive = helm.package(CHART, destination=directory)
        with helm.Chart.load(archive) as packaged:
            names = {f["name"] for f in packaged.files}
            assert {"files/operator-rules.yaml", "dashboards/session-monitor.json", "README.md"} <= names, names
            assert [c["name"] for c in packaged.crds] == [f"crds/{CRD_NAME}"]
            values = values_all()
            rendered = packaged.render(values, name=RELEASE, namespace=NAMESPACE)
    expected = Rendered(values).files
    assert rendered == expected, "the packaged chart renders differently"


# ---------------------------------------------------------------------------------------------
# Dashboard and image


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = []
    for panel in dashboard["panels"]:
        queries += [t["expr"] for t in panel.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def documented_metrics() -> set[str]:
    """Metric names in README.md: the "Metrics" table and the operator's metrics paragraph."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Metrics") :]
    section = section[: section.index("\n## ", 1)]
    names = set()
    for row in re.findall(r"^\| (`[^|]*) \|", section, re.M):
        names |= {f"session_monitor_{n}" for n in re.findall(r"`([a-z_]+)", row)}
    operator = re.search(r"\*\*Operator metrics\*\*.*?(?:\n\n|$)", readme, re.S)
    assert operator, "README.md: no **Operator metrics** paragraph"
    for token in re.findall(r"`([^`]+)`", operator.group(0)):
        name = token.split("{")[0]
        if re.fullmatch(r"[a-z][a-z_]*", name):
            names.add(f"session_monitor_operator_{name}")
    return names


@test
def the_dashboard_shows_metrics_the_binaries_export():
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert dashboard["uid"] and dashboard["title"]
    used = set()
    for query in dashboard_queries() + [rule["expr"] for rule in alert_rules()]:
        used |= set(re.findall(r"\b(session_monitor_[a-z_]+)", query))
    documented = documented_metrics()
    service_src = (ROOT / "service" / "src" / "metrics.rs").read_text()
    operator_src = (ROOT / "operator" / "src" / "metrics.rs").read_text()
    for name in sorted(used):
        base = re.sub(r"_(bucket|sum|count)$", "", name) if name.endswith(("_bucket", "_sum", "_count")) else name
        assert base in documented, f"dashboard uses {name}, not documented in README.md"
        if base.startswith("session_monitor_operator_"):
            assert f'"{base}"' in operator_src, f"operator/src/metrics.rs does not export {base}"
        else:
            suffix = base[len("session_monitor_") :]
            assert re.search(rf'["_]{re.escape(suffix)}"', service_src), f"service/src/metrics.rs does not export {base}"
    # The picture the brief asks for: users and sessions, per proxy, events, rejects, MQTT,
    # checkpoint.
    for needed in (
        "session_monitor_active_users",
        "session_monitor_active_sessions",
        "session_monitor_host_active_users",
        "session_monitor_events_total",
        "session_monitor_datagrams_dropped_total",
        "session_monitor_mqtt_connected",
        "session_monitor_checkpoint_writes_total",
    ):
        assert needed in used, f"the dashboard does not show {needed}"
    print(f"    {len(used)} metrics, all documented and exported")


def alert_rules() -> list[dict]:
    return [rule for group in load_yaml(ALERTS)["groups"] for rule in group["rules"]]


@test
def the_prometheus_rule_carries_the_alert_file_only_when_enabled():
    assert not Rendered(None).all("PrometheusRule")
    rule = Rendered(values_all()).one("PrometheusRule")
    assert rule["metadata"]["namespace"] == "monitoring"
    assert rule["metadata"]["labels"]["release"] == "prometheus"
    assert rule["spec"] == load_yaml(ALERTS)


@test
def the_alert_rules_pass_promtool_and_each_has_a_unit_test_and_a_runbook_entry():
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    for command in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        result = subprocess.run([promtool, *command], capture_output=True, text=True)
        assert result.returncode == 0, f"promtool {' '.join(command)}:\n{result.stdout}{result.stderr}"
    names = [rule["alert"] for rule in alert_rules()]
    fired = {
        case["alertname"]
        for test in load_yaml(ALERT_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in load_yaml(ALERT_TESTS)["tests"]
        for case in test["alert_rule_test"]
        if not case["exp_alerts"]
    }
    readme = (ROOT / "README.md").read_text()
    runbook = readme[readme.index("\n### Alerts") :]
    runbook = runbook[: runbook.index("\n## ", 1)]
    for name in names:
        assert name in fired, f"no unit test fires {name}"
        assert name in quiet, f"no unit test keeps {name} quiet"
        assert f"`{name}`" in runbook, f"README.md, Alerts: no entry for {name}"
    print(f"    {len(names)} alerts, each fired by a unit test and in the runbook")


@test
def the_dashboard_queries_are_valid_promql():
    promtool = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    assert promtool, "promtool is missing: apt-get install -y prometheus (see README, Tests)"
    rules = []
    for number, query in enumerate(dashboard_queries()):
        if query.startswith("label_values("):
            query = re.fullmatch(r"label_values\((.*),\s*[a-z_]+\)", query).group(1)
        expr = query.replace("$__rate_interval", "5m").replace("$namespace", ".*").replace("$monitor", ".*")
        assert "$" not in expr, f"unknown Grafana variable in {query}"
        rules.append({"record": f"dashboard:query_{number}", "expr": expr})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as file:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, file)
        file.flush()
        result = subprocess.run([promtool, "check", "rules", file.name], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"
    print(f"    {len(rules)} queries parse")


@test
def the_chart_matches_the_images_layout():
    # The Dockerfile's runtime contract: the service is the entrypoint (the operator's own
    # Deployments pass it only args), the operator binary sits where the chart's command points,
    # and the user is the one the security contexts name.
    dockerfile = (ROOT / "Dockerfile").read_text()
    r = Rendered(None)
    operator_binary = r.container()["command"][0]
    assert f"{Path(operator_binary).parent}/" in dockerfile and Path(operator_binary).name in dockerfile
    assert 'ENTRYPOINT ["/usr/local/bin/session-monitor"]' in dockerfile
    uid = r.deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert f"USER {uid}:{uid}" in dockerfile
    assert re.search(r"^FROM gcr\.io/distroless/\S+:nonroot$", dockerfile, re.M), "runtime image is not distroless nonroot"
    assert "--release" in dockerfile and "--locked" in dockerfile
    desired = (ROOT / "operator" / "src" / "desired.rs").read_text()
    assert f"const RUN_AS: i64 = {uid};" in desired, "the service pods run as another user than the image's"


# ---------------------------------------------------------------------------------------------


def main() -> int:
    passed = failed = 0
    for function in TESTS:
        name = function.__name__
        try:
            function()
        except Exception as error:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAIL {name}")
            detail = traceback.format_exception(error) if not isinstance(error, AssertionError) else [str(error)]
            print(textwrap.indent("".join(detail).rstrip(), "    "))
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"chart: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
