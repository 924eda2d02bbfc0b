"""The Kubernetes manifests in deploy/ agree with the worker binary: its flags, one port everywhere."""

import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")


def _read(name: str) -> str:
    with open(os.path.join(DEPLOY, name)) as f:
        return f.read()


def _worker_flags() -> set[str]:
    help_text = subprocess.run(
        [sys.executable, "-m", "experiments.worker", "--helpshort"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    return set(re.findall(r"^\s+--(\w+) \(default", help_text, re.MULTILINE))


def test_the_workers_arguments_are_flags_of_the_worker_binary():
    deployment = _read("worker-deployment.yaml")
    assert 'command: ["python", "-m", "experiments.worker"]' in deployment
    arguments = re.findall(r'^\s+- "--(\w+)=([^"]*)"', deployment, re.MULTILINE)
    assert {name for name, _ in arguments} <= _worker_flags(), arguments
    assert dict(arguments)["bind"] == "$(POD_IP)"  # a private pod address: no wildcard, no public bind


def test_one_port_in_the_worker_its_service_the_policy_and_the_coordinator():
    port = dict(re.findall(r'- "--(\w+)=([^"]*)"', _read("worker-deployment.yaml")))["port"]
    assert f"containerPort: {port}" in _read("worker-deployment.yaml")
    assert f"tcpSocket: {{port: {port}}}" in _read("worker-deployment.yaml")
    assert f"port: {port}, targetPort: {port}" in _read("worker-service.yaml")
    assert f"port: {port}}}" in _read("networkpolicy.yaml")
    assert f'{{print $1":{port}"}}' in _read("coordinator-job.yaml")


def test_only_the_coordinator_may_reach_the_workers():
    policy = _read("networkpolicy.yaml")
    assert "matchLabels: {app: tffpipe-worker}" in policy and "policyTypes: [Ingress]" in policy
    assert "matchLabels: {app: tffpipe-coordinator}" in policy
    assert "labels: {app: tffpipe-coordinator}" in _read("coordinator-job.yaml")
    assert "clusterIP: None" in _read("worker-service.yaml")  # headless: DNS lists the worker pods
