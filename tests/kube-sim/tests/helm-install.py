"""Installs and uninstalls a small chart with Helm's engine (helm-python-sdk) against kube-sim.

Usage: python helm-install.py <kubeconfig> <workdir>. Exits non-zero on any failure.
"""
import pathlib
import sys

import helm_python as helm

kubeconfig, workdir = sys.argv[1], pathlib.Path(sys.argv[2])
chart = workdir / "demo"
(chart / "templates").mkdir(parents=True)
(chart / "Chart.yaml").write_text("apiVersion: v2\nname: demo\nversion: 0.1.0\nappVersion: \"1.0\"\n")
(chart / "values.yaml").write_text("replicas: 2\nmessage: hello\n")
(chart / "templates" / "all.yaml").write_text("""\
apiVersion: v1
kind: ServiceAccount
metadata:
  name: {{ .Release.Name }}-sa
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ .Release.Name }}-config
data:
  message: {{ .Values.message | quote }}
---
apiVersion: v1
kind: Service
metadata:
  name: {{ .Release.Name }}-svc
spec:
  selector: {app: {{ .Release.Name }}}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ .Release.Name }}-app
spec:
  replicas: {{ .Values.replicas }}
  selector: {matchLabels: {app: {{ .Release.Name }}}}
  template:
    metadata: {labels: {app: {{ .Release.Name }}}}
    spec:
      serviceAccountName: {{ .Release.Name }}-sa
      containers:
      - name: app
        image: busybox:1.36
        ports: [{containerPort: 8080}]
""")

cfg = helm.Config(kubeconfig_path=kubeconfig, namespace="helm-demo")
release = cfg.install(str(chart), "demo", {"message": "from helm"}, namespace="helm-demo", create_namespace=True, timeout=60)
print("installed:", release.get("name"))
listed = cfg.list()
print("releases:", listed)
assert listed and listed[0]["status"] == "deployed", listed
print("status: deployed")
up = cfg.upgrade(str(chart), "demo", {"message": "upgraded", "replicas": 3}, namespace="helm-demo", timeout=60)
print("upgraded")
assert cfg.list()[0]["revision"] == 2
out = cfg.uninstall("demo", timeout=60)
print("uninstalled:", out.get("info"))
