{{/*
Names, labels and small computed values shared by every template. Object names are derived
from one "fullname" so a second release in another namespace does not collide.
*/}}

{{- define "stash.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
The release's base name. Truncated to 42 characters so the longest derived Service name
("<fullname>-node-agent-metrics") stays within the 63-character DNS label limit.
*/}}
{{- define "stash.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 42 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 42 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "stash.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "stash.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stash.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "stash.labels" -}}
helm.sh/chart: {{ include "stash.chart" . }}
{{ include "stash.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: stash
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Per-component names and labels: component is "operator" or "node-agent". */}}
{{- define "stash.operator.fullname" -}}
{{- printf "%s-operator" (include "stash.fullname" .) -}}
{{- end -}}

{{- define "stash.agent.fullname" -}}
{{- printf "%s-node-agent" (include "stash.fullname" .) -}}
{{- end -}}

{{- define "stash.operator.selectorLabels" -}}
{{ include "stash.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "stash.agent.selectorLabels" -}}
{{ include "stash.selectorLabels" . }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{- define "stash.operator.labels" -}}
{{ include "stash.labels" . }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "stash.agent.labels" -}}
{{ include "stash.labels" . }}
app.kubernetes.io/component: node-agent
{{- end -}}

{{/* The Service behind the webhooks and the Snapshot API; serving certificates name it. */}}
{{- define "stash.apiServiceName" -}}
{{- include "stash.fullname" . -}}
{{- end -}}

{{- define "stash.certSecretName" -}}
{{- printf "%s-apiserver-cert" (include "stash.fullname" .) -}}
{{- end -}}

{{- define "stash.webhookConfigName" -}}
{{- printf "%s-admission" (include "stash.fullname" .) -}}
{{- end -}}

{{/* The ClusterRole of the trigger CronJobs' pods (rbac-operator.yaml). */}}
{{- define "stash.triggerClusterRoleName" -}}
{{- printf "%s-trigger" (include "stash.operator.fullname" .) -}}
{{- end -}}

{{- define "stash.leaseName" -}}
{{- include "stash.operator.fullname" . -}}
{{- end -}}

{{/* The APIService name is fixed by the group and version it serves. */}}
{{- define "stash.apiServiceObjectName" -}}
v1alpha1.repositories.stash.appscode.com
{{- end -}}

{{/* "<registry>/<repository>:<tag>"; the registry part is left out when empty. */}}
{{- define "stash.image" -}}
{{- $root := index . 0 -}}
{{- $img := index . 1 -}}
{{- $tag := default (default $root.Chart.AppVersion $root.Values.image.tag) $img.tag -}}
{{- if $root.Values.image.registry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $root.Values.image.registry) $img.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "stash.operator.image" -}}
{{- include "stash.image" (list . .Values.operator.image) -}}
{{- end -}}

{{- define "stash.agent.image" -}}
{{- include "stash.image" (list . .Values.agent.image) -}}
{{- end -}}

{{/* Pull secret names: the values accept "name" or {name: name}. */}}
{{- define "stash.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets -}}
{{- if kindIs "map" . -}}
{{- $names = append $names .name -}}
{{- else -}}
{{- $names = append $names . -}}
{{- end -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}

{{- define "stash.imagePullSecrets" -}}
{{- $names := include "stash.pullSecretNames" . -}}
{{- if $names -}}
imagePullSecrets:
{{- range splitList "," $names }}
  - name: {{ . }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* A byte count or a size string ("100Mi") as the agent's env value; "" means unlimited. */}}
{{- define "stash.sizeValue" -}}
{{- if kindIs "string" . -}}
{{- . -}}
{{- else if gt (int64 .) 0 -}}
{{- printf "%d" (int64 .) -}}
{{- end -}}
{{- end -}}

{{/* Log settings with the per-component override. */}}
{{- define "stash.logLevel" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- default $root.Values.logLevel $component.logLevel -}}
{{- end -}}

{{- define "stash.logFormat" -}}
{{- $root := index . 0 -}}
{{- $component := index . 1 -}}
{{- default $root.Values.logFormat $component.logFormat -}}
{{- end -}}

{{/*
Webhooks and the APIService must not call the operator for objects in its own namespace (it
could never start) or in kube-system.
*/}}
{{- define "stash.webhookNamespaceSelector" -}}
namespaceSelector:
  matchExpressions:
    - key: kubernetes.io/metadata.name
      operator: NotIn
      values:
        - {{ .Release.Namespace }}
        - kube-system
        {{- range .Values.webhooks.excludeNamespaces }}
        {{- if and (ne . $.Release.Namespace) (ne . "kube-system") }}
        - {{ . }}
        {{- end }}
        {{- end }}
{{- end -}}

{{- define "stash.certManagerAnnotation" -}}
{{- if .Values.certManager.enabled }}
annotations:
  cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "stash.certSecretName" .) }}
{{- end }}
{{- end -}}

{{/* Cross-value checks the schema cannot express with a clear message. */}}
{{- define "stash.validate" -}}
{{- if and .Values.pushgateway.enabled .Values.pushgateway.url -}}
{{- fail "pushgateway.url names an external pushgateway: set pushgateway.enabled=false to use it (the built-in one is always http://localhost:56789)" -}}
{{- end -}}
{{- if and .Values.certManager.enabled .Values.certManager.issuerRef -}}
{{- if not .Values.certManager.issuerRef.name -}}
{{- fail "certManager.issuerRef.name is required when certManager.issuerRef is set (or leave issuerRef empty to let the chart create a self-signed CA)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* The agent pods' label selector as "k=v,k=v": the operator finds the Ready agent on a node with it. */}}
{{- define "stash.agent.selectorString" -}}
{{- $parts := list -}}
{{- range $k, $v := (include "stash.agent.selectorLabels" . | fromYaml) -}}
{{- $parts = append $parts (printf "%s=%s" $k $v) -}}
{{- end -}}
{{- join "," $parts -}}
{{- end -}}
