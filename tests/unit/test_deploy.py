"""Deployment files: Kubernetes manifests and the systemd unit are valid."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"


def test_kustomization_lists_only_existing_manifests() -> None:
    """Every resource of the kustomization exists, and every manifest is listed."""
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk


@pytest.mark.parametrize(
    "manifest", sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
)
def test_kubernetes_manifests_pass_strict_schema_validation(manifest: str) -> None:
    """Each manifest validates, strictly, against the Kubernetes API schemas."""
    for document in yaml.safe_load_all((K8S / manifest).read_text()):
        kubernetes_validate.validate(document, "1.30.0", strict=True)


def test_deployment_grace_period_outlasts_the_drain() -> None:
    """Kubernetes waits longer than the drain timeout before it kills the pod."""
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > float(config["data"]["DISPATCHER_DRAIN_TIMEOUT_SECONDS"])
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` accepts the unit (with ExecStart pointed at our binary)."""
    unit = (ROOT / "deploy" / "systemd" / "webhook-dispatcher.service").read_text()
    dispatcher = Path(sys.executable).parent / "dispatcher"
    assert dispatcher.exists()
    unit = unit.replace("/opt/webhook-dispatcher/bin/dispatcher", str(dispatcher))
    path = tmp_path / "webhook-dispatcher.service"
    path.write_text(unit)
    result = subprocess.run(  # noqa: S603 - a fixed tool on our own file
        ["systemd-analyze", "verify", str(path)],  # noqa: S607 - found on PATH above
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [line for line in result.stderr.splitlines() if path.name in line]
    assert result.returncode == 0 and not problems, result.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_template_unit_verifies_and_sets_the_port_of_its_instance(tmp_path: Path) -> None:
    """The template unit of N instances verifies as an instance, whose name is its port."""
    template = (ROOT / "deploy" / "systemd" / "webhook-dispatcher@.service").read_text()
    single = (ROOT / "deploy" / "systemd" / "webhook-dispatcher.service").read_text()
    assert "ExecStart=/usr/bin/env DISPATCHER_HTTP_PORT=%i " in template
    # the same service as the single unit, but for its comments, name and ExecStart
    differs = ("#", "Description=", "ExecStart=")
    assert [x for x in template.splitlines() if not x.startswith(differs)] == [
        x for x in single.splitlines() if not x.startswith(differs)
    ]
    dispatcher = Path(sys.executable).parent / "dispatcher"
    path = tmp_path / "webhook-dispatcher@.service"
    path.write_text(template.replace("/opt/webhook-dispatcher/bin/dispatcher", str(dispatcher)))
    instance = tmp_path / "webhook-dispatcher@8081.service"
    instance.symlink_to(path)
    result = subprocess.run(  # noqa: S603 - a fixed tool on our own file
        ["systemd-analyze", "verify", str(instance)],  # noqa: S607 - found on PATH above
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    problems = [line for line in result.stderr.splitlines() if "webhook-dispatcher@" in line]
    assert result.returncode == 0 and not problems, result.stderr
