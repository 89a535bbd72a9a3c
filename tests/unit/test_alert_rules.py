"""The operator's kit, without a service: the alerting rules pass `promtool check rules` and
their `promtool test rules` suite, every alert has a runbook in docs/operations.md, the
Operator's manifests carry the same rules, the dashboard is well formed and names only
metrics the daemon registers, and those metrics pass `promtool check metrics`.

promtool comes from Debian's ``prometheus`` package (tests/promkit.py installs it when
missing). That a real Prometheus scrapes all of this is tests/integration/test_prometheus.py.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from dispatcher.metrics import Metrics
from tests.promkit import (
    ALERTS,
    EXAMPLE_CONFIG,
    JOB,
    MONITORING,
    OPERATIONS,
    ROOT,
    RULE_TESTS,
    RUNBOOK_BASE,
    alert_rules,
    dashboard_exprs,
    documented_metrics,
    heading_anchors,
    load_dashboard,
    metric_names,
    panels,
    promtool,
)

# Label names a metric of ours may carry: each has a small, fixed set of values.
BOUNDED_LABELS = {"reason", "outcome", "consumer", "topic", "partition", "tier", "kind", "le"}
PYTHON_INFO_LABELS = {"implementation", "major", "minor", "patchlevel", "version"}
# Series a rule or the dashboard may use besides the daemon's: Prometheus's own `up` and
# the blackbox exporter's probe of /readyz.
NOT_THE_DAEMONS = {"up", "probe_success"}


SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}


def exported_names() -> set[str]:
    """The series names a daemon's /metrics shows for what it registers (counters with
    ``_total``, the histogram's ``_bucket``, ``_count`` and ``_sum``), labelled ones too
    before their first sample."""
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in SUFFIXES.get(family.type, ("",))
    }


# --- the rules --------------------------------------------------------------------------


def test_promtool_accepts_the_rule_files(tmp_path: Path) -> None:
    """`promtool check rules` accepts alerts.yml and the PrometheusRule's groups."""
    operator = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    extracted = tmp_path / "operator-rules.yml"
    extracted.write_text(yaml.safe_dump({"groups": operator["spec"]["groups"]}))
    for path in (ALERTS, extracted):
        done = promtool("check", "rules", path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"SUCCESS: {len(alert_rules(path))} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    """`promtool test rules rules.test.yml`: each alert fires when it should, only then."""
    done = promtool("test", "rules", RULE_TESTS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_quiet() -> None:
    """The suite has, for every alert, a case where it fires and one where it stays quiet."""
    suite = yaml.safe_load(RULE_TESTS.read_text())
    assert suite["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in suite["tests"]:
        for case in test.get("alert_rule_test", []):
            (firing if case["exp_alerts"] else quiet).add(case["alertname"])
    alerts = {rule["alert"] for rule in alert_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) <= alerts


def test_every_alert_says_what_it_means_and_links_its_runbook() -> None:
    """Summary, description, a severity and a runbook link to a section that exists."""
    anchors = heading_anchors(OPERATIONS.read_text())
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        annotations: dict[str, str] = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, rule["alert"]
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        url = annotations["runbook_url"]
        assert url.startswith(RUNBOOK_BASE), url
        assert url.removeprefix(RUNBOOK_BASE) in anchors, f"{rule['alert']}: no section {url}"


def test_docs_list_every_alert() -> None:
    """docs/operations.md's table of alerts names each alert of alerts.yml, and only those."""
    doc = OPERATIONS.read_text()
    section = doc.split("\n## Alerts", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(Webhook\w+)` \|", section, re.MULTILINE))
    assert listed == {rule["alert"] for rule in alert_rules()}


def test_links_within_the_operations_doc_resolve() -> None:
    """The runbooks' links to each other (and the alert table's) name existing sections."""
    doc = OPERATIONS.read_text()
    links = set(re.findall(r"\]\(#([^)]+)\)", doc))
    assert links and links <= heading_anchors(doc), sorted(links - heading_anchors(doc))


def test_rules_and_dashboard_name_only_registered_metrics() -> None:
    """Each metric a rule or a dashboard query selects is one the daemon registers (the
    integration test checks the same against a real scrape)."""
    exported = exported_names() | NOT_THE_DAEMONS
    exprs = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    exprs += dashboard_exprs(load_dashboard())
    for where, expr in exprs:
        names = metric_names(expr)
        assert names, f"{where}: no metric in {expr!r}"
        assert names <= exported, f"{where}: {sorted(names - exported)} are not exported"


def test_the_metric_name_reader_reads_promql() -> None:
    """The loose PromQL reader finds series and nothing else."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_bucket{le!="x", b="c"}[5m])))'
        " / on(instance) group_left(role) b_total offset 1h > bool 3e2"
        ' or deriv(sum without (topic) (c_seconds{topic=~"$topic"})[10m:1m]) and up'
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c_seconds", "up"}


# --- the Prometheus Operator's manifests -------------------------------------------------


def test_prometheusrule_carries_the_rules_of_alerts_yml() -> None:
    """deploy/kubernetes/monitoring/prometheusrule.yaml: the same groups, as a valid
    monitoring.coreos.com/v1 PrometheusRule."""
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["metadata"]["name"] == JOB
    assert set(rule) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(rule["spec"]) == {"groups"}
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]


def test_servicemonitor_scrapes_the_service_of_the_base() -> None:
    """The ServiceMonitor selects the Service of deploy/kubernetes (with the labels its
    kustomization gives it), on a port it has, at /metrics; job and role labels as the
    rules and the dashboard expect."""
    monitor = yaml.safe_load((MONITORING / "servicemonitor.yaml").read_text())
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    assert monitor["metadata"]["name"] == JOB
    spec = monitor["spec"]
    base = ROOT / "deploy" / "kubernetes"
    service = yaml.safe_load((base / "service.yaml").read_text())
    labels = dict(service["metadata"].get("labels", {}))
    for entry in yaml.safe_load((base / "kustomization.yaml").read_text())["labels"]:
        labels.update(entry["pairs"])
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    # no jobLabel: the job is the Service's name, which the rules select
    assert "jobLabel" not in spec and service["metadata"]["name"] == JOB
    ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in spec["endpoints"]:
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"
        assert any(r["targetLabel"] == "role" for r in endpoint["relabelings"])


def test_monitoring_kustomization_lists_its_manifests() -> None:
    """deploy/kubernetes/monitoring is its own kustomization (custom resources, applied
    only where the Operator runs), in the namespace of the base, listing every file."""
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    base = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == base["namespace"]
    on_disk = {p.name for p in MONITORING.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert not {"servicemonitor.yaml", "prometheusrule.yaml"} & set(base["resources"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl here")
def test_monitoring_kustomization_builds() -> None:
    """`kubectl kustomize` renders it: a ServiceMonitor and a PrometheusRule, namespaced."""
    done = subprocess.run(  # noqa: S603 - a fixed tool on our own files
        ["kubectl", "kustomize", str(MONITORING)],  # noqa: S607 - found on PATH above
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    documents = list(yaml.safe_load_all(done.stdout))
    assert sorted(d["kind"] for d in documents) == ["PrometheusRule", "ServiceMonitor"]
    for document in documents:
        assert document["metadata"]["namespace"] == "webhook-dispatcher"
        assert document["metadata"]["labels"]["app.kubernetes.io/name"] == JOB


def test_example_prometheus_config_is_valid() -> None:
    """`promtool check config` accepts deploy/prometheus/prometheus.yml (and its rules)."""
    done = promtool("check", "config", EXAMPLE_CONFIG)
    assert done.returncode == 0, done.stdout + done.stderr
    config = yaml.safe_load(EXAMPLE_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs[JOB]["metrics_path"] == "/metrics"
    assert all("role" in group["labels"] for group in jobs[JOB]["static_configs"])


# --- the dashboard ----------------------------------------------------------------------


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (
        a["x"] < b["x"] + b["w"]
        and b["x"] < a["x"] + a["w"]
        and a["y"] < b["y"] + b["h"]
        and b["y"] < a["y"] + a["h"]
    )


def test_dashboard_is_well_formed() -> None:
    """deploy/grafana/dashboard.json: a dashboard with datasource, role and instance
    variables; panels with unique ids that do not overlap; every query filters by role and
    instance and reads the chosen data source."""
    dashboard = load_dashboard()
    assert dashboard["uid"] == JOB and dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("role", "instance"):
        assert variables[name]["type"] == "query"
        assert variables[name]["includeAll"] and variables[name]["allValue"] == ".*"
    all_panels = panels(dashboard)
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    for i, a in enumerate(all_panels):
        grid = a["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, a["title"]
        for b in all_panels[i + 1 :]:
            assert not _overlap(grid, b["gridPos"]), (a["title"], b["title"])
    graphs = [p for p in all_panels if p["type"] != "row"]
    assert len(graphs) >= 10
    for panel in graphs:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["title"] and panel["description"], panel["id"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            expr: str = target["expr"]
            selectors = re.findall(r"\{[^}]*\}", expr)
            assert selectors, (panel["title"], expr)
            for selector in selectors:
                assert 'instance=~"$instance"' in selector, (panel["title"], expr)
                assert 'role=~"$role"' in selector, (panel["title"], expr)


def test_dashboard_covers_what_operators_watch() -> None:
    """Throughput and outcomes, latency quantiles, lag per topic, retry backlog by tier,
    notices, recorder lag, failing endpoints, CPU and memory each have a panel."""
    exprs = " ".join(expr for _, expr in dashboard_exprs(load_dashboard()))
    for needed in (
        "sum by (outcome) (rate(webhook_deliveries_total",
        "rate(webhook_events_consumed_total",
        "histogram_quantile(0.99, sum by (le) (rate(webhook_delivery_duration_seconds_bucket",
        "sum by (consumer, topic) (webhook_consumer_lag",
        'sum by (topic) (webhook_consumer_lag{consumer="retries"',
        "sum by (tier, kind) (rate(webhook_delay_records_total",
        "webhook_notices_sent_total",
        "webhook_attempt_record_lag_seconds",
        'webhook_deliveries_total{outcome!~"200|deferred"',
        "rate(process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ):
        assert needed in exprs, needed


# --- the metrics themselves -------------------------------------------------------------


def test_metrics_follow_prometheus_conventions() -> None:
    """`promtool check metrics` finds nothing to say about /metrics (counters end in
    _total, base units, no abbreviated units), and labels come from a bounded set."""
    exposition = generate_latest(Metrics().registry)
    done = promtool("check", "metrics", stdin=exposition)
    assert done.returncode == 0 and not done.stdout.strip(), done.stdout + done.stderr
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            allowed = PYTHON_INFO_LABELS if family.name == "python_info" else BOUNDED_LABELS
            assert set(sample.labels) <= allowed, (sample.name, sample.labels)


def test_every_documented_metric_is_registered() -> None:
    """Each row of docs/operations.md's metrics table is a metric the daemon registers,
    with the type it says (the reverse is tests/unit/test_docs.py)."""
    registered = {family.name: family.type for family in Metrics().registry.collect()}
    for name, kind in documented_metrics().items():
        base = name.removesuffix("_total") if kind == "counter" else name
        assert registered.get(base) == kind, f"{name} ({kind}) is documented, not registered"
        assert (kind == "counter") == name.endswith("_total"), name
