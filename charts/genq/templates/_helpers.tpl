{{/* Names, labels and shared pieces of the genq chart. */}}

{{- define "genq.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "genq.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "<fullname>-<suffix>", within 63 characters. Call with (list . "suffix"). */}}
{{- define "genq.component" -}}
{{- $top := index . 0 -}}
{{- printf "%s-%s" (include "genq.fullname" $top | trunc (int (sub 62 (len (index . 1))))) (index . 1) -}}
{{- end -}}

{{- define "genq.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "genq.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: genq
{{- end -}}

{{/* Selector labels of one component. Call with (list . "api"). */}}
{{- define "genq.selectorLabels" -}}
{{- $top := index . 0 -}}
app.kubernetes.io/name: {{ include "genq.name" $top }}
app.kubernetes.io/instance: {{ $top.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* All labels of one component. Call with (list . "api"). */}}
{{- define "genq.componentLabels" -}}
{{ include "genq.labels" (index . 0) }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "genq.image" -}}
{{- $top := index . 0 -}}
{{- $img := index $top.Values.image (index . 1) -}}
{{- printf "%s:%s" $img.repository (default $top.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{- define "genq.serviceAccount.api" -}}{{ include "genq.component" (list . "api") }}{{- end -}}
{{- define "genq.serviceAccount.operator" -}}{{ include "genq.component" (list . "operator") }}{{- end -}}
{{- define "genq.serviceAccount.worker" -}}{{ include "genq.component" (list . "worker") }}{{- end -}}

{{- define "genq.adminKeySecret" -}}
{{- default (include "genq.component" (list . "admin-key")) .Values.adminKey.existingSecret -}}
{{- end -}}

{{- define "genq.workerEnvSecret" -}}
{{- default .Values.s3.existingSecret .Values.workers.envSecret -}}
{{- end -}}

{{/* The NATS URL: the in-release NATS chart's client Service, or nats.url. */}}
{{- define "genq.natsUrl" -}}
{{- if .Values.nats.enabled -}}
{{- printf "nats://%s-nats.%s.svc:4222" .Release.Name .Release.Namespace -}}
{{- else -}}
{{- required "set nats.url (an external NATS server with JetStream) or nats.enabled=true" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{/*
The tools: each enabled toolPools entry as a ToolPool spec (tool: {kind, name} added,
enabled/name removed), then extraToolPools. Rendered as YAML {pools: [...]}.
*/}}
{{- define "genq.toolPools" -}}
{{- $pools := list -}}
{{- range $key := list "imageEdit" "textToImage" "upscale" -}}
{{- $p := index $.Values.toolPools $key -}}
{{- if and $p $p.enabled -}}
{{- $spec := omit $p "enabled" "name" -}}
{{- $_ := set $spec "tool" (dict "kind" $key "name" $p.name) -}}
{{- $pools = append $pools $spec -}}
{{- end -}}
{{- end -}}
{{- range .Values.extraToolPools -}}
{{- $pools = append $pools . -}}
{{- end -}}
{{- toYaml (dict "pools" $pools) -}}
{{- end -}}

{{/*
GENQ_* settings every genq process of the release shares (API and operator). No GENQ_CONFIG:
with the Kubernetes store and no genq.yaml, both read the tools from the namespace's
ToolPools (and follow their changes).
*/}}
{{- define "genq.commonEnv" -}}
- name: GENQ_STORE
  value: kubernetes
- name: GENQ_KUBE_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: GENQ_NATS_URL
  value: {{ include "genq.natsUrl" . | quote }}
- name: GENQ_BLOB
  value: s3
{{- with .Values.s3.endpoint }}
- name: GENQ_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
- name: GENQ_S3_BUCKET
  value: {{ .Values.s3.bucket | quote }}
- name: GENQ_S3_REGION
  value: {{ .Values.s3.region | quote }}
- name: GENQ_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
{{- with .Values.s3.existingSecret }}
{{- /* Standard AWS names, not GENQ_*: the operator never copies them into worker Deployments. */}}
- name: AWS_ACCESS_KEY_ID
  valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: AWS_ACCESS_KEY_ID}}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom: {secretKeyRef: {name: {{ . | quote }}, key: AWS_SECRET_ACCESS_KEY}}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "genq.podSecurity" -}}
{{- with .Values.podSecurityContext }}
securityContext:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
