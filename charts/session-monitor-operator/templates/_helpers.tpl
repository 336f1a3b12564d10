{{/*
Names, labels and the image reference, shared by every template.
*/}}

{{- define "session-monitor-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object's name: the release name, plus the chart name unless the release
name already contains it. Truncated to 63 characters (DNS label limit); the longest suffix added
to it is "-leader-election", so names beyond 47 characters should be set with fullnameOverride.
*/}}
{{- define "session-monitor-operator.fullname" -}}
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

{{- define "session-monitor-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels that never change over the release's life: the Deployment's selector. */}}
{{- define "session-monitor-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "session-monitor-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The standard labels of every object the chart creates. */}}
{{- define "session-monitor-operator.labels" -}}
helm.sh/chart: {{ include "session-monitor-operator.chart" . }}
{{ include "session-monitor-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: session-monitor
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "session-monitor-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "session-monitor-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image both binaries run from: repository:tag, the tag defaulting to appVersion. */}}
{{- define "session-monitor-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* The service image of monitors that name none: by default the operator's own image. */}}
{{- define "session-monitor-operator.defaultServiceImage" -}}
{{- .Values.defaultServiceImage | default (include "session-monitor-operator.image" .) }}
{{- end }}

{{/* The Lease replicas elect a leader on, in the release namespace. */}}
{{- define "session-monitor-operator.leaseName" -}}
{{- .Values.leaderElection.leaseName | default (include "session-monitor-operator.fullname" .) }}
{{- end }}

{{/*
The operator's RBAC rules, generated from operator/src/rbac.rs into files/operator-rules.yaml:
the one source of what the operator may do. Split for the namespaced mode: Leases (leader
election) are needed only in the release namespace, every other rule in each watched namespace.
*/}}
{{- define "session-monitor-operator.rules" -}}
{{- .Files.Get "files/operator-rules.yaml" | fromYamlArray | toYaml }}
{{- end }}

{{- define "session-monitor-operator.watchedNamespaceRules" -}}
{{- $rules := list }}
{{- range (.Files.Get "files/operator-rules.yaml" | fromYamlArray) }}
{{- if not (has "leases" .resources) }}
{{- $rules = append $rules . }}
{{- end }}
{{- end }}
{{- toYaml $rules }}
{{- end }}

{{- define "session-monitor-operator.leaseRules" -}}
{{- $rules := list }}
{{- range (.Files.Get "files/operator-rules.yaml" | fromYamlArray) }}
{{- if has "leases" .resources }}
{{- $rules = append $rules . }}
{{- end }}
{{- end }}
{{- toYaml $rules }}
{{- end }}
