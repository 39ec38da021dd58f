{{/*
Names. The full name is cut at 40 characters: component suffixes ("-etcd-headless", "-gateway")
must fit in 63, and KubeRay names the head Service "<raycluster>-head-svc" only while that stays
within 50 characters (longer names are cut from the front).
*/}}
{{- define "colshard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 40 | trimSuffix "-" }}
{{- end }}

{{- define "colshard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "colshard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels shared by every object; pass (dict "ctx" $ "component" "etcd"). */}}
{{- define "colshard.labels" -}}
helm.sh/chart: {{ include "colshard.chart" .ctx }}
{{ include "colshard.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: colshard
{{- end }}

{{- define "colshard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "colshard.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "colshard.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag | toString }}
{{- if eq $tag "latest" }}
{{- fail "image.tag must name a version, not \"latest\"" }}
{{- end }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "colshard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "colshard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "colshard.clusterName" -}}
{{- default .Release.Name .Values.colshard.clusterName }}
{{- end }}

{{- define "colshard.configMapName" -}}
{{- printf "%s-config" (include "colshard.fullname" .) }}
{{- end }}

{{/* storageClassName line for a PVC spec; pass (dict "ctx" $ "class" <component class>). */}}
{{- define "colshard.storageClass" -}}
{{- $class := default .ctx.Values.global.storageClass .class }}
{{- if eq $class "-" }}
storageClassName: ""
{{- else if $class }}
storageClassName: {{ $class | quote }}
{{- end }}
{{- end }}

{{/* Soft or hard pod anti-affinity over nodes; pass (dict "ctx" $ "component" "etcd" "mode" "soft"). */}}
{{- define "colshard.podAntiAffinity" -}}
{{- if eq .mode "hard" }}
podAntiAffinity:
  requiredDuringSchedulingIgnoredDuringExecution:
    - topologyKey: kubernetes.io/hostname
      labelSelector:
        matchLabels:
          {{- include "colshard.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 10 }}
{{- else if eq .mode "soft" }}
podAntiAffinity:
  preferredDuringSchedulingIgnoredDuringExecution:
    - weight: 100
      podAffinityTerm:
        topologyKey: kubernetes.io/hostname
        labelSelector:
          matchLabels:
            {{- include "colshard.selectorLabels" (dict "ctx" .ctx "component" .component) | nindent 12 }}
{{- else if .mode }}
{{- fail (printf "podAntiAffinity must be \"soft\", \"hard\" or \"\", got %q" .mode) }}
{{- end }}
{{- end }}

{{/* ---- etcd ---- */}}

{{- define "colshard.etcd.fullname" -}}
{{- printf "%s-etcd" (include "colshard.fullname" .) }}
{{- end }}

{{- define "colshard.etcd.headlessName" -}}
{{- printf "%s-etcd-headless" (include "colshard.fullname" .) }}
{{- end }}

{{/* DNS name of etcd member $i: <sts>-<i>.<headless>.<ns>.svc.<domain>; pass (dict "ctx" $ "i" 0). */}}
{{- define "colshard.etcd.memberHost" -}}
{{- printf "%s-%d.%s.%s.svc.%s" (include "colshard.etcd.fullname" .ctx) (int .i) (include "colshard.etcd.headlessName" .ctx) .ctx.Release.Namespace .ctx.Values.clusterDomain }}
{{- end }}

{{/* --initial-cluster: one name=peer-URL pair per replica. */}}
{{- define "colshard.etcd.initialCluster" -}}
{{- $members := list }}
{{- range $i := until (int .Values.etcd.replicas) }}
{{- $members = append $members (printf "%s-%d=http://%s:2380" (include "colshard.etcd.fullname" $) $i (include "colshard.etcd.memberHost" (dict "ctx" $ "i" $i))) }}
{{- end }}
{{- join "," $members }}
{{- end }}

{{/* The etcd endpoints colshard processes use (COLSHARD_ETCD / --etcd): host:port,... */}}
{{- define "colshard.etcd.endpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "%s.%s.svc:2379" (include "colshard.etcd.fullname" .) .Release.Namespace }}
{{- else if .Values.externalEtcd.endpoints }}
{{- join "," .Values.externalEtcd.endpoints }}
{{- else }}
{{- fail "etcd.enabled is false: set externalEtcd.endpoints (host:port entries)" }}
{{- end }}
{{- end }}

{{/* ---- Ray ---- */}}

{{- define "colshard.ray.clusterName" -}}
{{- $name := default (include "colshard.fullname" .) .Values.ray.clusterName }}
{{- if gt (len $name) 41 }}
{{- fail (printf "ray.clusterName %q is longer than 41 characters: KubeRay would rename its head Service" $name) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "RayCluster name %q must start with a letter (KubeRay rewrites it otherwise); set ray.clusterName or fullnameOverride" $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "colshard.ray.headService" -}}
{{- printf "%s-head-svc" (include "colshard.ray.clusterName" .) }}
{{- end }}

{{/* Ray Client address for processes outside the Ray pods (the gateway). */}}
{{- define "colshard.ray.clientAddress" -}}
{{- printf "ray://%s.%s.svc:10001" (include "colshard.ray.headService" .) .Release.Namespace }}
{{- end }}

{{/* rayStartParams "resources": KubeRay pastes it into a shell command, hence the extra quoting. */}}
{{- define "colshard.ray.resourcesParam" -}}
{{- printf "%q" (toJson .) }}
{{- end }}

{{/* ---- auth ---- */}}

{{- define "colshard.auth.secretName" -}}
{{- default (printf "%s-api-keys" (include "colshard.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{- define "colshard.auth.secretKey" -}}
{{- if .Values.auth.existingSecret }}
{{- .Values.auth.existingSecretKey }}
{{- else }}
{{- "api-keys" }}
{{- end }}
{{- end }}

{{/* Pod-spec lines shared by the Ray head and worker pods. */}}
{{- define "colshard.ray.podCommon" -}}
enableServiceLinks: false
{{- with .Values.ray.serviceAccountName }}
serviceAccountName: {{ . }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Environment of the Ray containers (shard actors inherit it from the raylet); pass (dict "ctx" $ "extraEnv" map). */}}
{{- define "colshard.ray.authSecretName" -}}
{{- default (printf "%s-ray-auth" (include "colshard.fullname" .)) .Values.ray.auth.existingSecret }}
{{- end }}

{{- /* Ray token auth for a container that runs or joins Ray (Ray pods, the gateway). */}}
{{- define "colshard.ray.authEnv" -}}
{{- if .Values.ray.auth.enabled }}
- name: RAY_AUTH_MODE
  value: token
- name: RAY_AUTH_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "colshard.ray.authSecretName" . | quote }}
      key: {{ .Values.ray.auth.existingSecretKey | quote }}
{{- else }}
- name: RAY_AUTH_MODE
  value: disabled
{{- end }}
{{- end }}

{{- define "colshard.ray.env" -}}
env:
  - name: COLSHARD_POD_NAME
    valueFrom:
      fieldRef:
        fieldPath: metadata.name
  {{- include "colshard.ray.authEnv" .ctx | nindent 2 }}
  {{- with .ctx.Values.vectorizers.jinaai.existingSecret }}
  {{- /* text2colbert-jinaai runs in Ray workers: the server-side key when no header has one. */}}
  - name: JINAAI_APIKEY
    valueFrom:
      secretKeyRef:
        name: {{ . | quote }}
        key: {{ $.ctx.Values.vectorizers.jinaai.existingSecretKey | quote }}
  {{- end }}
  {{- range $name, $value := .extraEnv }}
  - name: {{ $name }}
    value: {{ $value | toString | quote }}
  {{- end }}
envFrom:
  - configMapRef:
      name: {{ include "colshard.configMapName" .ctx }}
{{- end }}
