{{- define "trellis.name" -}}trellis-control{{- end -}}
{{- define "trellis.labels" -}}
app.kubernetes.io/name: trellis-control
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/part-of: trellis
{{- end -}}
{{- define "trellis.url" -}}https://{{ include "trellis.name" . }}.{{ .Release.Namespace }}.svc:{{ .Values.controlPlane.port }}{{- end -}}
