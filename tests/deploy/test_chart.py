"""The Helm chart, rendered by Helm's own engine (helm-python-sdk wraps Helm's Go SDK) for
both values files and the model-repository variants, then checked against the
Kubernetes 1.30 schemas and for what the deployment relies on: probes on the right
health services and ports, selectors that match, graceful-shutdown budgets, PDBs,
NetworkPolicies and non-root, read-only containers; and the one-pod mode
(onePod.enabled), where the gateway is a container of the Triton pods."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from ._deploy import CHART, DASHBOARD, KUBE_VERSION, NAMESPACE, ROOT, render, values_file

VALUES_FILES = ("values.yaml", "values-production.yaml")
# Kinds from CRDs, which kubernetes-validate has no schema for; checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Settings the chart already sets and the gateway reads once the lead lands them.
PENDING_SETTINGS = {"TLS_CERT_FILE", "TLS_KEY_FILE"}
ONE_POD = {"onePod": {"enabled": True}}


@pytest.fixture(scope="module", params=VALUES_FILES)
def manifests(request, helm, chart):
    values = {} if request.param == "values.yaml" else values_file(helm, request.param)
    return request.param, render(chart, values)


@pytest.fixture(scope="module")
def production(helm, chart):
    return render(chart, values_file(helm, "values-production.yaml"))


@pytest.fixture(scope="module")
def default(chart):
    return render(chart)


def values_of(helm, name: str, one_pod: bool = False) -> dict:
    values = {} if name == "values.yaml" else values_file(helm, name)
    return {**values, **ONE_POD} if one_pod else values


@pytest.fixture(scope="module", params=VALUES_FILES)
def one_pod(request, helm, chart):
    """(values file, manifests with onePod.enabled, manifests of the same values without it)."""
    return (request.param, render(chart, values_of(helm, request.param, one_pod=True)),
            render(chart, values_of(helm, request.param)))


def one(docs, kind, suffix=""):
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    assert len(found) == 1, f"expected one {kind} *{suffix}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def pod_spec(docs, component):
    return one(docs, "Deployment", f"-{component}")["spec"]["template"]["spec"]


def container(docs, component):
    return next(c for c in pod_spec(docs, component)["containers"] if c["name"] == component)


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def config(docs) -> dict:
    return one(docs, "ConfigMap", "-gateway")["data"]


def environment(docs, spec: dict) -> dict:
    """A container's environment as Kubernetes builds it: envFrom ConfigMaps, then env."""
    env = {}
    for source in spec.get("envFrom", []):
        name = source["configMapRef"]["name"]
        env.update(next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == name)["data"])
    env.update({e["name"]: e["value"] for e in spec.get("env", [])})
    return env


def assert_valid(name, docs):
    """Every manifest validates against the Kubernetes schemas (CRD kinds excepted)."""
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (pip install kubernetes-validate)")
    assert docs, f"{name} rendered nothing"
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{name}: {doc['kind']}/{doc['metadata']['name']} {path}: {exc.message}")


def assert_non_root(deployment):
    spec = deployment["spec"]["template"]["spec"]
    pod = spec.get("securityContext", {})
    assert spec.get("automountServiceAccountToken") is False
    for c in spec["containers"] + spec.get("initContainers", []):
        where = f"{deployment['metadata']['name']}/{c['name']}"
        security = {**pod, **c.get("securityContext", {})}
        assert security.get("runAsNonRoot") is True, where
        assert security.get("runAsUser", 0) != 0, where
        assert security.get("readOnlyRootFilesystem") is True, where
        assert security.get("allowPrivilegeEscalation") is False, where
        assert security.get("capabilities", {}).get("drop") == ["ALL"], where
        assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"], where
        assert c["resources"]["limits"]["memory"], where


# ------------------------------------------------------------------------- engine
@pytest.mark.parametrize("values_name", VALUES_FILES)
@pytest.mark.parametrize("one_pod", [False, True], ids=["", "one-pod"])
def test_helm_lint_is_clean(helm, values_name, one_pod):
    values = values_of(helm, values_name, one_pod)
    report = helm.lint(CHART, values, strict=True, kube_version=f"v{KUBE_VERSION}.0")
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); warnings and errors are not allowed.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_every_manifest_validates_against_kubernetes_schemas(manifests):
    assert_valid(*manifests)


def test_both_values_files_comment_every_value():
    """Every value has a comment saying why: on the line above it, or above an enclosing
    key (a `resources:` block's comment covers its requests and limits)."""
    for name in VALUES_FILES:
        stack: list[tuple[int, bool]] = []  # (indent, commented) of the enclosing keys
        previous = ""
        doc_block = False  # the comment block above starts with "# -- "
        for number, line in enumerate((CHART / name).read_text().splitlines(), 1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                if stripped.startswith("#") and not previous.startswith("#"):
                    doc_block = stripped.startswith("# -- ")
                previous = stripped or previous
                continue
            indent = len(line) - len(line.lstrip())
            while stack and stack[-1][0] >= indent:
                stack.pop()
            commented = previous.startswith("#")
            # Section rulers ("# ----- gateway") do not count for the keys under them.
            documents_children = commented and doc_block
            covered = commented or any(c for _, c in stack)
            is_parent = stripped.endswith(":") and not stripped.startswith("-")
            if not is_parent:
                assert covered, f"{name}:{number}: {stripped!r} has no comment"
            stack.append((indent, documents_children))
            previous = stripped


# ------------------------------------------------------------------------ gateway
def test_gateway_probes_use_grpc_health_services(manifests):
    _, docs = manifests
    gateway = container(docs, "gateway")
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    settings = config(docs)
    assert ports == {"grpc": int(settings["CONVSERVE_GRPC_PORT"]), "metrics": int(settings["CONVSERVE_METRICS_PORT"])}
    # Liveness: the gateway's own loop ("liveness"), never Triton, so an outage restarts nothing.
    assert gateway["livenessProbe"]["grpc"] == {"port": ports["grpc"], "service": "liveness"}
    # Readiness: service "" (the default), SERVING only while Triton is ready.
    assert gateway["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert gateway["readinessProbe"]["grpc"].get("service", "") == ""


def test_gateway_drains_within_its_grace_period(manifests):
    _, docs = manifests
    spec = pod_spec(docs, "gateway")
    command = container(docs, "gateway")["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(config(docs)["CONVSERVE_DRAIN_GRACE_S"])
    assert pre_stop > 0
    assert spec["terminationGracePeriodSeconds"] > pre_stop + drain


def test_gateway_config_is_valid_settings(manifests, monkeypatch):
    from service.settings import Settings

    _, docs = manifests
    data = config(docs)
    assert "CONVSERVE_MAX_CONNECTION_AGE_S" in data
    known = {name.upper() for name in Settings.model_fields}
    unknown = {key for key in data if key.removeprefix("CONVSERVE_") not in known | PENDING_SETTINGS}
    assert not unknown, f"ConfigMap keys that service/settings.py does not read: {unknown}"
    for key in list(os.environ):
        if key.startswith("CONVSERVE_"):
            monkeypatch.delenv(key)
    for key, value in data.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # validates every value, as the gateway does at start-up
    assert settings.grpc_port == int(data["CONVSERVE_GRPC_PORT"])
    gateway = one(docs, "Deployment", "-gateway")
    assert gateway["spec"]["template"]["spec"]["containers"][0]["envFrom"] == [
        {"configMapRef": {"name": one(docs, "ConfigMap", "-gateway")["metadata"]["name"]}}]


def test_gateway_reaches_triton_through_the_headless_service(manifests):
    _, docs = manifests
    service = one(docs, "Service", "-triton")
    assert service["spec"]["clusterIP"] == "None"
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    host = f"{service['metadata']['name']}.{NAMESPACE}.svc.cluster.local"
    assert config(docs)["CONVSERVE_TRITON_URL"] == f"dns:///{host}:{grpc_port}"
    # Separate pods do not share /dev/shm: tensors stay in gRPC messages (the default).
    assert "CONVSERVE_TRITON_SHARED_MEMORY" not in config(docs)


def test_services_select_their_pods_and_name_real_ports(manifests):
    _, docs = manifests
    for service in (d for d in docs if d["kind"] == "Service"):
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        deployment = one(docs, "Deployment", f"-{component}")
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        ports = {p["name"]: p["containerPort"] for p in container(docs, component)["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports, f"{service['metadata']['name']}: no container port {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]]


def test_production_autoscales_on_cpu_and_in_flight_calls(production):
    hpa = one(production, "HorizontalPodAutoscaler", "-gateway")
    gateway = one(production, "Deployment", "-gateway")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": gateway["metadata"]["name"]}
    assert "replicas" not in gateway["spec"]  # the HPA owns it
    kinds = {m["type"]: m for m in hpa["spec"]["metrics"]}
    assert kinds["Resource"]["resource"]["name"] == "cpu"
    assert kinds["Pods"]["pods"]["metric"]["name"] == "convserve_requests_in_flight"
    adapter = yaml.safe_load((ROOT / "deploy" / "prometheus" / "adapter-values.yaml").read_text())
    rule = adapter["rules"]["custom"][0]
    assert rule["name"]["as"] == "convserve_requests_in_flight"
    assert "convserve_requests_in_flight" in rule["seriesQuery"]
    assert config(production)["CONVSERVE_REFLECTION"] == "false"


def test_default_values_have_no_hpa_and_reflection_on(default):
    assert not [d for d in default if d["kind"] == "HorizontalPodAutoscaler"]
    assert config(default)["CONVSERVE_REFLECTION"] == "true"


# ------------------------------------------------------------------------- triton
def test_triton_probes_and_shutdown(manifests):
    _, docs = manifests
    triton = container(docs, "triton")
    spec = pod_spec(docs, "triton")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    for probe, path in (("startupProbe", "/v2/health/ready"), ("readinessProbe", "/v2/health/ready"),
                        ("livenessProbe", "/v2/health/live")):
        assert triton[probe]["httpGet"] == {"path": path, "port": "http"}
    startup = triton["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "slow model loads need minutes"
    args = dict(a.split("=", 1) for a in triton["args"] if "=" in a)
    assert args["--strict-readiness"] == "true"
    assert args["--http-port"] == "8000" and args["--grpc-port"] == "8001" and args["--metrics-port"] == "8002"
    pre_stop = float(triton["lifecycle"]["preStop"]["exec"]["command"][1])
    assert int(args["--exit-timeout-secs"]) + pre_stop < spec["terminationGracePeriodSeconds"]
    shm = next(v for v in spec["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in triton["volumeMounts"]


def test_gpu_is_requested_only_in_production(default, production):
    assert "nvidia.com/gpu" not in container(default, "triton")["resources"].get("limits", {})
    assert "--allow-gpu-metrics=false" in container(default, "triton")["args"]
    assert container(production, "triton")["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "--allow-gpu-metrics=true" in container(production, "triton")["args"]


@pytest.mark.parametrize("source", ["image", "pvc", "s3"])
def test_model_repository_sources(chart, source):
    values = {"modelRepository": {"source": source, "s3": {"url": "s3://bucket/models",
                                                          "credentialsSecret": "s3-creds"}}}
    docs = render(chart, values)
    spec = pod_spec(docs, "triton")
    mounts = {m["name"]: m for m in container(docs, "triton")["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    if source == "image":
        assert "models" not in mounts and "models" not in volumes
        return
    assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"] is True
    if source == "pvc":
        claim = one(docs, "PersistentVolumeClaim")
        assert volumes["models"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    else:
        sync = spec["initContainers"][0]
        assert sync["args"][:4] == ["s3", "sync", "s3://bucket/models", "/models"]
        assert sync["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
        assert "emptyDir" in volumes["models"]


@pytest.mark.parametrize("values, message", [
    ({"gateway": {"terminationGracePeriodSeconds": 20}}, "drainGraceSeconds"),
    ({"triton": {"exitTimeoutSeconds": 120}}, "exitTimeoutSeconds"),
    ({"modelRepository": {"source": "nfs"}}, "image, pvc or s3"),
    ({"modelRepository": {"source": "s3"}}, "s3.url"),
    ({"gateway": {"tls": {"enabled": True}}}, "secretName"),
    # One pod: Triton's grace period must cover the gateway's drain too.
    ({**ONE_POD, "triton": {"terminationGracePeriodSeconds": 24, "exitTimeoutSeconds": 5}},
     "onePod: triton.terminationGracePeriodSeconds"),
    # One pod: Triton must take calls for as long as the gateway still accepts them.
    ({**ONE_POD, "gateway": {"preStopSleepSeconds": 10}}, "onePod: triton.preStopSleepSeconds"),
    # One pod, one network namespace: no port twice.
    ({**ONE_POD, "gateway": {"metricsPort": 8002}}, "must differ"),
    ({**ONE_POD, "gateway": {"grpcPort": 9464}}, "must differ"),
])
def test_unsafe_values_fail_to_render(helm, chart, values, message):
    with pytest.raises(helm.HelmRenderError, match=message.replace(".", r"\.")):
        chart.render(values, name="convserve", namespace=NAMESPACE)


def test_tls_mounts_the_secret_and_probes_over_tls(chart):
    docs = render(chart, {"gateway": {"tls": {"enabled": True, "secretName": "gateway-tls"}}})
    gateway = container(docs, "gateway")
    assert {"name": "tls", "mountPath": "/etc/convserve/tls", "readOnly": True} in gateway["volumeMounts"]
    data = config(docs)
    assert data["CONVSERVE_TLS_CERT_FILE"] == "/etc/convserve/tls/tls.crt"
    assert data["CONVSERVE_TLS_KEY_FILE"] == "/etc/convserve/tls/tls.key"
    # Native gRPC probes speak plaintext only: with TLS they become exec checks.
    assert "grpc" not in gateway["livenessProbe"] and 'service="liveness"' in gateway["livenessProbe"]["exec"]["command"][2]


# ---------------------------------------------------------------- safety and policy
def test_pdbs_cover_both_components(manifests):
    _, docs = manifests
    for component in ("gateway", "triton"):
        pdb = one(docs, "PodDisruptionBudget", f"-{component}")
        labels = one(docs, "Deployment", f"-{component}")["spec"]["template"]["metadata"]["labels"]
        assert selects(pdb["spec"]["selector"]["matchLabels"], labels)


def test_network_policies_fence_triton_and_metrics(manifests):
    _, docs = manifests
    gateway_labels = one(docs, "Deployment", "-gateway")["spec"]["template"]["metadata"]["labels"]
    triton_policy = one(docs, "NetworkPolicy", "-triton")
    triton_labels = one(docs, "Deployment", "-triton")["spec"]["template"]["metadata"]["labels"]
    assert selects(triton_policy["spec"]["podSelector"]["matchLabels"], triton_labels)
    assert triton_policy["spec"]["policyTypes"] == ["Ingress"]
    by_port = {rule["ports"][0]["port"]: rule["from"] for rule in triton_policy["spec"]["ingress"]}
    assert set(by_port) == {8001, 8002}, "Triton must open its gRPC and metrics ports only"
    assert len(by_port[8001]) == 1 and selects(by_port[8001][0]["podSelector"]["matchLabels"], gateway_labels)
    assert "namespaceSelector" not in by_port[8001][0], "only the release's own gateway"
    prometheus = by_port[8002][0]
    assert prometheus["namespaceSelector"] and prometheus["podSelector"]

    gateway_policy = one(docs, "NetworkPolicy", "-gateway")
    assert selects(gateway_policy["spec"]["podSelector"]["matchLabels"], gateway_labels)
    metrics_rules = [r for r in gateway_policy["spec"]["ingress"] if r["ports"][0]["port"] == 9464]
    assert metrics_rules and metrics_rules[0]["from"] == [prometheus]


def test_no_container_runs_as_root(manifests):
    _, docs = manifests
    for deployment in (d for d in docs if d["kind"] == "Deployment"):
        assert_non_root(deployment)


# --------------------------------------------------------------------- monitoring
def test_service_monitor_scrapes_both_metrics_services(production):
    monitor = one(production, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    scraped = [s for s in production if s["kind"] == "Service"
               and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert sorted(s["metadata"]["name"].rsplit("-", 1)[-1] for s in scraped) == ["metrics", "triton"]
    for service in scraped:
        assert "metrics" in {p["name"] for p in service["spec"]["ports"]}


def test_dashboard_ships_as_a_sidecar_configmap(manifests):
    _, docs = manifests
    configmap = one(docs, "ConfigMap", "-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["convserve.json"]) == json.loads(DASHBOARD.read_text())
    # The copy for importing by hand is the same file.
    shipped = ROOT / "deploy" / "grafana" / "convserve-dashboard.json"
    assert json.loads(shipped.read_text()) == json.loads(DASHBOARD.read_text())


# ------------------------------------------------------------------------ one pod
def one_pod_gateway(docs) -> dict:
    return next(c for c in pod_spec(docs, "triton")["containers"] if c["name"] == "gateway")


def test_one_pod_manifests_validate_and_run_as_non_root(one_pod):
    name, docs, _ = one_pod
    assert_valid(f"{name} + onePod", docs)
    assert_non_root(one(docs, "Deployment", "-triton"))


def test_one_pod_renders_no_gateway_deployment_hpa_or_pdb(one_pod):
    _, docs, _ = one_pod
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "Deployment"] == ["convserve-triton"]
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]  # production autoscales when off
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "PodDisruptionBudget"] == ["convserve-triton"]


def test_one_pod_runs_the_gateway_container_beside_triton(one_pod):
    _, docs, apart = one_pod
    spec = pod_spec(docs, "triton")
    assert [c["name"] for c in spec["containers"]] == ["triton", "gateway"]
    gateway, own = one_pod_gateway(docs), container(apart, "gateway")
    # The same container as in the gateway's own Deployment (one named template) ...
    for key in ("image", "imagePullPolicy", "envFrom", "livenessProbe", "readinessProbe", "lifecycle", "resources"):
        assert gateway[key] == own[key], key
    assert [p["containerPort"] for p in gateway["ports"]] == [p["containerPort"] for p in own["ports"]]
    # ... as Triton's user: shared-memory segments are mode 0600, so Triton opens the
    # gateway's regions only as the user that created them.
    triton = container(docs, "triton")
    uid = {**spec["securityContext"], **triton["securityContext"]}["runAsUser"]
    assert gateway["securityContext"]["runAsUser"] == uid == 1000
    assert gateway["securityContext"]["runAsGroup"] == triton["securityContext"]["runAsGroup"]
    # The pod's grace period covers the gateway's preStop sleep and drain, and Triton keeps
    # taking calls (its preStop sleep) until after the gateway has stopped accepting them.
    env = environment(docs, gateway)
    gateway_pre_stop = float(gateway["lifecycle"]["preStop"]["exec"]["command"][1])
    assert spec["terminationGracePeriodSeconds"] > gateway_pre_stop + float(env["CONVSERVE_DRAIN_GRACE_S"])
    assert float(triton["lifecycle"]["preStop"]["exec"]["command"][1]) > gateway_pre_stop
    # Gateway settings changes roll the Triton pods, as they roll the gateway's own.
    annotations = one(docs, "Deployment", "-triton")["spec"]["template"]["metadata"]["annotations"]
    assert len(annotations["checksum/config"]) == 64


def test_one_pod_shares_an_in_memory_dev_shm(one_pod, helm):
    name, docs, _ = one_pod
    spec = pod_spec(docs, "triton")
    volumes = {v["name"]: v for v in spec["volumes"]}
    shm_volumes = set()
    for c in spec["containers"]:
        mounts = [m for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert len(mounts) == 1, c["name"]
        shm_volumes.add(mounts[0]["name"])
    assert len(shm_volumes) == 1, "one volume, the same /dev/shm in both containers"
    shm = volumes[shm_volumes.pop()]["emptyDir"]
    assert shm["medium"] == "Memory"
    expected = values_of(helm, name).get("triton", {}).get("shmSizeLimit", "1Gi")
    assert shm["sizeLimit"] == expected
    # Volume names are unique in the pod: the gateway keeps its own /tmp.
    assert len(volumes) == len(spec["volumes"])
    tmp = {m["name"] for m in one_pod_gateway(docs)["volumeMounts"] if m["mountPath"] == "/tmp"}
    assert tmp == {"gateway-tmp"} and "emptyDir" in volumes["gateway-tmp"]


def test_one_pod_gateway_calls_triton_on_loopback_through_shared_memory(one_pod, monkeypatch):
    from service.settings import Settings

    _, docs, _ = one_pod
    env = environment(docs, one_pod_gateway(docs))
    grpc_port = next(p["containerPort"] for p in container(docs, "triton")["ports"] if p["name"] == "grpc")
    assert env["CONVSERVE_TRITON_URL"] == f"127.0.0.1:{grpc_port}"
    assert env["CONVSERVE_TRITON_SHARED_MEMORY"] == "true"
    for key in list(os.environ):
        if key.startswith("CONVSERVE_"):
            monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()  # as the gateway reads it at start-up
    assert settings.triton_shared_memory is True
    assert settings.triton_url == f"127.0.0.1:{grpc_port}"


def test_one_pod_services_select_the_triton_pods_and_name_real_ports(one_pod):
    _, docs, _ = one_pod
    deployment = one(docs, "Deployment", "-triton")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    containers = deployment["spec"]["template"]["spec"]["containers"]
    # A Service's named targetPort must be unique in the pod (Kubernetes takes the first match).
    owners = {}
    for c in containers:
        for port in c["ports"]:
            assert port["name"] not in owners, f"port {port['name']} in {owners.get(port['name'])} and {c['name']}"
            owners[port["name"]] = c["name"]
    ports = {p["name"]: p["containerPort"] for c in containers for p in c["ports"]}
    assert len(set(ports.values())) == len(ports), "one network namespace: no port twice"
    for service in (d for d in docs if d["kind"] == "Service"):
        name = service["metadata"]["name"]
        assert selects(service["spec"]["selector"], labels), name
        component = service["metadata"]["labels"]["app.kubernetes.io/component"]
        for port in service["spec"]["ports"]:
            assert owners[port["targetPort"]] == component, f"{name}: {port['targetPort']}"
            assert port["port"] == ports[port["targetPort"]]
    gateway = one(docs, "Service", "-gateway")
    assert {p["targetPort"]: p["port"] for p in gateway["spec"]["ports"]} == {"gateway-grpc": 50051}


def test_one_pod_network_policies_open_the_gateway_ports_on_triton_pods(one_pod):
    _, docs, _ = one_pod
    labels = one(docs, "Deployment", "-triton")["spec"]["template"]["metadata"]["labels"]
    triton_policy = one(docs, "NetworkPolicy", "-triton")
    gateway_policy = one(docs, "NetworkPolicy", "-gateway")
    for policy in (triton_policy, gateway_policy):
        assert selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    # The gateway calls Triton on loopback: nothing outside the pod reaches Triton's gRPC.
    assert {rule["ports"][0]["port"] for rule in triton_policy["spec"]["ingress"]} == {8002}
    by_port = {rule["ports"][0]["port"]: rule for rule in gateway_policy["spec"]["ingress"]}
    assert set(by_port) == {50051, 9464}
    assert "from" not in by_port[50051]  # gatewayClients is [] by default: anyone
    assert by_port[9464]["from"] == triton_policy["spec"]["ingress"][0]["from"]  # Prometheus only


def test_one_pod_service_monitor_scrapes_the_gateway_on_triton_pods(helm, chart):
    docs = render(chart, values_of(helm, "values-production.yaml", one_pod=True))
    monitor = one(docs, "ServiceMonitor")
    scraped = {s["metadata"]["name"]: s for s in docs if s["kind"] == "Service"
               and selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])}
    assert sorted(scraped) == ["convserve-gateway-metrics", "convserve-triton"]
    metrics = next(p for p in scraped["convserve-gateway-metrics"]["spec"]["ports"] if p["name"] == "metrics")
    gateway_ports = {p["name"]: p["containerPort"] for p in one_pod_gateway(docs)["ports"]}
    assert gateway_ports[metrics["targetPort"]] == int(config(docs)["CONVSERVE_METRICS_PORT"])


def test_one_pod_with_tls_mounts_the_secret_in_the_gateway_container(chart):
    docs = render(chart, {**ONE_POD, "gateway": {"tls": {"enabled": True, "secretName": "gateway-tls"}}})
    assert_valid("onePod + tls", docs)
    volumes = {v["name"]: v for v in pod_spec(docs, "triton")["volumes"]}
    assert volumes["gateway-tls"]["secret"]["secretName"] == "gateway-tls"
    gateway = one_pod_gateway(docs)
    assert {"name": "gateway-tls", "mountPath": "/etc/convserve/tls", "readOnly": True} in gateway["volumeMounts"]
    assert "exec" in gateway["livenessProbe"]
    assert not [m for m in container(docs, "triton")["volumeMounts"] if m["name"] == "gateway-tls"]
