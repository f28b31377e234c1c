{{/* Names, labels and the pieces that several templates share. */}}

{{- define "genrec.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "genrec.fullname" -}}
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

{{/* "<fullname>-<suffix>", kept within 52 characters: a StatefulSet's pods carry a
     controller-revision-hash label of its name and 11 more (labels end at 63), and
     "<name>-headless" Services stay within 63. */}}
{{- define "genrec.component" -}}
{{- printf "%s-%s" (include "genrec.fullname" .root | trunc (int (sub 51 (len .name))) | trimSuffix "-") .name }}
{{- end }}

{{- define "genrec.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "genrec.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: genrec
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "genrec.selectorLabels" -}}
app.kubernetes.io/name: {{ include "genrec.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels and selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "genrec.componentLabels" -}}
{{ include "genrec.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "genrec.componentSelector" -}}
{{ include "genrec.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "genrec.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "genrec.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The gateway image: the Dockerfile's `gpu` target with a remote engine, `cpu` in process. */}}
{{- define "genrec.image" -}}
{{- $flavour := ternary "cpu" "gpu" (eq .Values.engine.mode "inprocess") }}
{{- $tag := .Values.image.tag | default (printf "%s-%s" .Chart.AppVersion $flavour) }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "genrec.vllmEnabled" -}}
{{- if and (eq .Values.engine.mode "remote") .Values.vllm.enabled }}true{{ end }}
{{- end }}

{{- define "genrec.routerEnabled" -}}
{{- if and (include "genrec.vllmEnabled" .) .Values.vllm.router.enabled }}true{{ end }}
{{- end }}

{{- define "genrec.engineUrl" -}}
{{- if .Values.engine.externalUrl }}
{{- .Values.engine.externalUrl }}
{{- else if include "genrec.routerEnabled" . }}
{{- printf "http://%s:%d" (include "genrec.component" (dict "root" . "name" "vllm-router")) (int .Values.vllm.router.port) }}
{{- else }}
{{- printf "http://%s:%d" (include "genrec.component" (dict "root" . "name" "vllm")) (int .Values.vllm.service.port) }}
{{- end }}
{{- end }}

{{/* vLLM replicas the gateway may see: KEDA's maxReplicas when it scales them. */}}
{{- define "genrec.vllmMaxReplicas" -}}
{{- if .Values.vllm.autoscaling.keda.enabled }}
{{- .Values.vllm.autoscaling.keda.maxReplicas | int }}
{{- else }}
{{- .Values.vllm.replicaCount | int }}
{{- end }}
{{- end }}

{{/* GENREC_ENGINE_URLS: every vLLM pod by its stable StatefulSet name, up to the most replicas
     there can be (pods that do not exist yet are health-checked out by the gateway). Empty
     with an external server or the router, which stand for all replicas behind one URL. */}}
{{- define "genrec.engineUrls" -}}
{{- if and (include "genrec.vllmEnabled" .) (not .Values.engine.externalUrl) (not (include "genrec.routerEnabled" .)) }}
{{- $sts := include "genrec.component" (dict "root" . "name" "vllm") }}
{{- $headless := include "genrec.component" (dict "root" . "name" "vllm-headless") }}
{{- $urls := list }}
{{- range $i := until (include "genrec.vllmMaxReplicas" . | int) }}
{{- $urls = append $urls (printf "http://%s-%d.%s.%s.svc:%d" $sts $i $headless $.Release.Namespace (int $.Values.vllm.service.port)) }}
{{- end }}
{{- join "," $urls }}
{{- end }}
{{- end }}

{{- define "genrec.redisCluster" -}}
{{- if and .Values.redis.enabled .Values.redis.cluster.enabled }}true{{ end }}
{{- end }}

{{/* Environment that makes REDIS_URL (and REDIS_PASSWORD before it, when needed). With the
     Redis Cluster, REDIS_URL names the cluster's Service: whichever node answers is the
     client's seed, and GENREC_REDIS_CLUSTER=true makes the client ask it for the slot map
     (a cluster has only database 0, so no `/0`). */}}
{{- define "genrec.redisEnv" -}}
{{- if .Values.redis.enabled }}
{{- $host := printf "%s.%s.svc" (include "genrec.component" (dict "root" . "name" "redis")) .Release.Namespace }}
{{- $db := ternary "" "/0" (eq (include "genrec.redisCluster" .) "true") }}
{{- if .Values.redis.auth.enabled }}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "genrec.redisSecretName" . }}
      key: {{ .Values.redis.auth.existingSecretKey }}
- name: REDIS_URL
  value: {{ printf "redis://:$(REDIS_PASSWORD)@%s:%d%s" $host (int .Values.redis.port) $db | quote }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "redis://%s:%d%s" $host (int .Values.redis.port) $db | quote }}
{{- end }}
{{- if include "genrec.redisCluster" . }}
- name: GENREC_REDIS_CLUSTER
  value: "true"
{{- end }}
{{- else if .Values.redis.external.existingSecret }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret }}
      key: {{ .Values.redis.external.existingSecretKey }}
{{- else }}
- name: REDIS_URL
  value: {{ required "redis.enabled=false needs redis.external.url or redis.external.existingSecret" .Values.redis.external.url | quote }}
{{- end }}
{{- end }}

{{- define "genrec.redisSecretName" -}}
{{- .Values.redis.auth.existingSecret | default (include "genrec.component" (dict "root" . "name" "redis")) }}
{{- end }}

{{/* The bundle volume, in any pod that serves or reads the bundle. */}}
{{- define "genrec.bundleVolume" -}}
- name: bundle
{{- if eq .Values.bundle.source "url" }}
  emptyDir:
    sizeLimit: {{ .Values.bundle.url.sizeLimit }}
- name: fetch-bundle
  configMap:
    name: {{ include "genrec.component" (dict "root" . "name" "fetch-bundle") }}
{{- else }}
  persistentVolumeClaim:
    claimName: {{ .Values.bundle.pvc.existingClaim | default (include "genrec.component" (dict "root" . "name" "bundle")) }}
    readOnly: true
{{- end }}
{{- end }}

{{/* The bundle directory every pod serves or reads: the mount, or with bundle.rollout its
     `current` symlink (resolved by each process at start; the gateway again on SIGHUP). */}}
{{- define "genrec.bundlePath" -}}
{{- if .Values.bundle.rollout.enabled }}
{{- if ne .Values.bundle.source "pvc" }}
{{- fail "bundle.rollout needs bundle.source=pvc (versioned bundles and a `current` symlink on the volume)" }}
{{- end }}
{{- printf "%s/%s" (trimSuffix "/" .Values.bundle.mountPath) .Values.bundle.rollout.current }}
{{- else }}
{{- .Values.bundle.mountPath }}
{{- end }}
{{- end }}

{{- define "genrec.bundleMount" -}}
- name: bundle
  mountPath: {{ .Values.bundle.mountPath }}
  readOnly: true
{{- if and (eq .Values.bundle.source "pvc") .Values.bundle.pvc.subPath }}
  subPath: {{ .Values.bundle.pvc.subPath }}
{{- end }}
{{- end }}

{{/* The init container that downloads and verifies the bundle (bundle.source=url). */}}
{{- define "genrec.fetchBundleInit" -}}
{{- if eq .Values.bundle.source "url" }}
{{- if not (or .Values.bundle.url.url .Values.bundle.url.secretRef.name) }}
{{- fail "bundle.source=url needs bundle.url.url or bundle.url.secretRef" }}
{{- end }}
- name: fetch-bundle
  image: {{ include "genrec.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: ["python", "/scripts/fetch_bundle.py"]
  env:
    {{- if .Values.bundle.url.secretRef.name }}
    - name: BUNDLE_URL
      valueFrom:
        secretKeyRef:
          name: {{ .Values.bundle.url.secretRef.name }}
          key: {{ .Values.bundle.url.secretRef.key }}
    {{- else }}
    - name: BUNDLE_URL
      value: {{ .Values.bundle.url.url | quote }}
    {{- end }}
    - name: BUNDLE_SHA256
      value: {{ required "bundle.source=url needs bundle.url.sha256" .Values.bundle.url.sha256 | quote }}
    - name: BUNDLE_DIR
      value: /bundle
  resources:
    {{- toYaml .Values.bundle.url.resources | nindent 4 }}
  securityContext:
    {{- toYaml .Values.gateway.securityContext | nindent 4 }}
  volumeMounts:
    - name: bundle
      mountPath: /bundle
    - name: fetch-bundle
      mountPath: /scripts
      readOnly: true
{{- end }}
{{- end }}

{{/* "<fullname>-<suffix>" within .max characters: a CronJob's name leaves room for its Jobs'
     suffix (52), a RayJob's for the names KubeRay derives from it (47). */}}
{{- define "genrec.shortComponent" -}}
{{- printf "%s-%s" (include "genrec.fullname" .root | trunc (int (sub (sub .max 1) (len .name))) | trimSuffix "-") .name }}
{{- end }}

{{/* The embed-users snapshot volume: an existing claim, the chart's claim, or an emptyDir. */}}
{{- define "genrec.snapshotsVolume" -}}
{{- $s := .Values.embedUsers.snapshots }}
- name: snapshots
{{- if or $s.existingClaim $s.create }}
  persistentVolumeClaim:
    claimName: {{ $s.existingClaim | default (include "genrec.component" (dict "root" . "name" "snapshots")) }}
{{- else }}
  emptyDir:
    sizeLimit: {{ $s.sizeLimit }}
{{- end }}
{{- end }}

{{/* The arguments of `genrec embed-users` after the bundle path (the CronJob's and the
     RayJob's entrypoint share them). */}}
{{- define "genrec.embedUsersArgs" -}}
- --workers
- {{ .Values.embedUsers.workers | toString | quote }}
- --snapshots
- {{ .Values.embedUsers.snapshots.mountPath | quote }}
- --history-len
- {{ .Values.gateway.settings.GENREC_HISTORY_LEN | default "1000" | toString | quote }}
{{- range .Values.embedUsers.extraArgs }}
- {{ . | toString | quote }}
{{- end }}
{{- end }}

{{/* A Ray head or worker pod of the embed-users RayJob: the job's image, bundle, snapshots and
     REDIS_URL, non-root like every pod here, and probes that need no wget:
     (dict "root" $ "container" "ray-head" "resources" ... "port" 8265 "path" "/api/gcs_healthz"). */}}
{{- define "genrec.rayPodTemplate" -}}
{{- $root := .root }}
{{- $e := $root.Values.embedUsers }}
metadata:
  labels:
    {{- include "genrec.componentLabels" (dict "root" $root "component" "embed-users") | nindent 4 }}
    genrec.io/redis-client: "true"
spec:
  serviceAccountName: {{ include "genrec.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.gateway.podSecurityContext | nindent 4 }}
  {{- with $e.rayJob.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $e.rayJob.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if eq $root.Values.bundle.source "url" }}
  initContainers:
    {{- include "genrec.fetchBundleInit" $root | trim | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .container }}
      image: {{ include "genrec.image" $root }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      env:
        {{- include "genrec.redisEnv" $root | trim | nindent 8 }}
        - name: RAY_USAGE_STATS_ENABLED
          value: "0"
      readinessProbe:
        httpGet:
          path: {{ .path }}
          port: {{ .port }}
        initialDelaySeconds: 10
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 6
      livenessProbe:
        httpGet:
          path: {{ .path }}
          port: {{ .port }}
        initialDelaySeconds: 30
        periodSeconds: 20
        timeoutSeconds: 5
        failureThreshold: 6
      resources:
        {{- toYaml .resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.gateway.securityContext | nindent 8 }}
      volumeMounts:
        {{- include "genrec.bundleMount" $root | nindent 8 }}
        - name: snapshots
          mountPath: {{ $e.snapshots.mountPath }}
        - name: tmp
          mountPath: /tmp
        - name: shm
          mountPath: /dev/shm
  volumes:
    {{- include "genrec.bundleVolume" $root | nindent 4 }}
    {{- include "genrec.snapshotsVolume" $root | trim | nindent 4 }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ $e.tmpSizeLimit }}
    - name: shm
      emptyDir:
        medium: Memory
        sizeLimit: {{ $e.shmSize }}
{{- end }}
