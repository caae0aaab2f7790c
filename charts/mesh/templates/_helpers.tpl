{{/*
Names, labels, images and the pieces every workload shares.
*/}}

{{- define "mesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Prefix of every object name: the release name, plus the chart name unless it is in it. */}}
{{- define "mesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := include "mesh.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "mesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Selector labels of one component. `app.kubernetes.io/name` is always "mesh": the
NetworkPolicies the operator writes for each model admit the gateway and the
agents by `app.kubernetes.io/name: mesh` + their component, whatever the release.
Call with (dict "root" $ "component" "operator").
*/}}
{{- define "mesh.selectorLabels" -}}
app.kubernetes.io/name: mesh
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of an object of one component (same argument as mesh.selectorLabels). */}}
{{- define "mesh.labels" -}}
{{ include "mesh.selectorLabels" . }}
app.kubernetes.io/part-of: mesh
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
helm.sh/chart: {{ include "mesh.chart" .root }}
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Image reference from an image block (repository, tag, digest); an empty repository
is <registry>/<name>. Call with (dict "root" $ "image" .Values.image "name" "mesh").
*/}}
{{- define "mesh.imageRef" -}}
{{- $image := .image -}}
{{- $repository := $image.repository | default (printf "%s/%s" .root.Values.registry .name) -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $repository $image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repository (default .root.Chart.AppVersion $image.tag) -}}
{{- end -}}
{{- end }}

{{- define "mesh.image" -}}
{{- include "mesh.imageRef" (dict "root" . "image" .Values.image "name" "mesh") -}}
{{- end }}

{{- define "mesh.agentImage" -}}
{{- include "mesh.imageRef" (dict "root" . "image" .Values.agentImage "name" "mesh-agent") -}}
{{- end }}

{{/*
The llama.cpp image of one build holding both programs; the operator replaces
{variant} per node (cuda or cpu). Its tag defaults to the build the chart pins.
*/}}
{{- define "mesh.llamaCppImage" -}}
{{- $tag := .Values.llamaCpp.tag | default (index .Chart.Annotations "mesh.dev/llama-cpp") -}}
{{- printf "%s/llama.cpp:%s-{variant}" .Values.registry $tag -}}
{{- end }}

{{- define "mesh.rpcServerImage" -}}
{{- .Values.llamaCpp.rpcServerImage | default (include "mesh.llamaCppImage" .) -}}
{{- end }}

{{- define "mesh.llamaServerImage" -}}
{{- .Values.llamaCpp.llamaServerImage | default (include "mesh.llamaCppImage" .) -}}
{{- end }}

{{/* Service account names. */}}
{{- define "mesh.operatorServiceAccount" -}}
{{- default (printf "%s-operator" (include "mesh.fullname" .)) .Values.operator.serviceAccount.name }}
{{- end }}

{{- define "mesh.gatewayServiceAccount" -}}
{{- default (printf "%s-gateway" (include "mesh.fullname" .)) .Values.gateway.serviceAccount.name }}
{{- end }}

{{- define "mesh.agentServiceAccount" -}}
{{- default (printf "%s-agent" (include "mesh.fullname" .)) .Values.agent.serviceAccount.name }}
{{- end }}

{{/* Namespace of the agent's objects. */}}
{{- define "mesh.agentNamespace" -}}
{{- default .Release.Namespace .Values.agent.namespace }}
{{- end }}

{{/* Namespaces of the Prometheus pods that may scrape mesh's pods and the models' hosts. */}}
{{- define "mesh.scraperNamespaces" -}}
{{- if .Values.networkPolicy.scraperNamespaces }}
{{- join "," .Values.networkPolicy.scraperNamespaces }}
{{- else }}
{{- .Release.Namespace }}
{{- end }}
{{- end }}

{{/*
Who may scrape /metrics of mesh's own pods: the labelled Prometheus pods of the
scraper namespaces (matched by the name label the API server sets), then the
peers of networkPolicy.metricsFrom.
*/}}
{{- define "mesh.metricsPeers" -}}
- namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
          {{- range splitList "," (include "mesh.scraperNamespaces" .) }}
          - {{ . | quote }}
          {{- end }}
  podSelector:
    matchLabels:
      mesh.dev/metrics-scraper: "true"
{{- with .Values.networkPolicy.metricsFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "mesh.gatewayName" -}}
{{- printf "%s-gateway" (include "mesh.fullname" .) }}
{{- end }}

{{/*
The downward-API variables every server needs: it binds to its own pod IP, never
0.0.0.0 (the end-to-end harness runs the pods of a node in one network namespace,
each on its own address).
*/}}
{{- define "mesh.podEnv" -}}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: POD_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end }}

{{/* Pod Security Standard `restricted`: the pod part. */}}
{{- define "mesh.restrictedPodSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/* Pod Security Standard `restricted`: the container part. */}}
{{- define "mesh.restrictedContainerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
The pod template's annotations block: prometheus.io annotations for
annotation-based scraping, then the user's. Call with
(dict "root" $ "port" N "extra" .Values.x.podAnnotations); prints nothing when empty.
*/}}
{{- define "mesh.podAnnotations" -}}
{{- $all := dict }}
{{- if .root.Values.metrics.annotations }}
{{- $_ := set $all "prometheus.io/scrape" "true" }}
{{- $_ := set $all "prometheus.io/port" (toString .port) }}
{{- $_ := set $all "prometheus.io/path" "/metrics" }}
{{- end }}
{{- $all = merge (deepCopy (default dict .extra)) $all }}
{{- with $all -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
