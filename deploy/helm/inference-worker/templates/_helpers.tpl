{{/* The release's object name: the release name when it already says inference-worker. */}}
{{- define "iw.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "iw.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/component: worker
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "iw.labels" -}}
{{ include "iw.selectorLabels" . }}
app.kubernetes.io/part-of: inference-worker
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The values of the chosen device profile. */}}
{{- define "iw.profile" -}}
{{- $p := index .Values.profiles .Values.device -}}
{{- if not $p -}}
{{- fail (printf "device: expected gpu or cpu, got %q" .Values.device) -}}
{{- end -}}
{{- toYaml $p -}}
{{- end -}}

{{/* config.toml: the values' config with the profile's merged over it, one key a line. */}}
{{- define "iw.configToml" -}}
{{- $p := include "iw.profile" . | fromYaml -}}
{{- $config := mergeOverwrite (deepCopy .Values.config) ($p.config | default dict) -}}
# inference-worker run --config: keys are the run flags with _ for -.
{{- range $key := keys $config | sortAlpha }}
{{ $key }} = {{ index $config $key | toJson }}
{{- end }}
{{- end -}}
