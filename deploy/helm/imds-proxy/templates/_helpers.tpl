{{/* The image of every container: the repository at the tag, or at the chart's appVersion. */}}
{{- define "imds-proxy.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The labels of the chart's objects (the pods' selector labels stay those of the kustomize manifests). */}}
{{- define "imds-proxy.labels" -}}
app.kubernetes.io/part-of: imds-proxy
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/instance: {{ .Release.Name }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end }}

{{/*
The webhook's TLS material as YAML (ca, cert, key: base64 PEM): the Secret
already in the cluster on an upgrade, else a new CA (10 years) and a
serving certificate for the webhook's Service (1 year) made once per
render, memoised so that every template sees the same.
*/}}
{{- define "imds-proxy.webhookTLS" -}}
{{- if not .Values._webhookTLS -}}
{{- $existing := lookup "v1" "Secret" .Release.Namespace "imds-proxy-webhook-tls" -}}
{{- if and $existing (index $existing.data "ca.crt") -}}
{{- $_ := set .Values "_webhookTLS" (dict "ca" (index $existing.data "ca.crt") "cert" (index $existing.data "tls.crt") "key" (index $existing.data "tls.key")) -}}
{{- else -}}
{{- $service := printf "imds-proxy-webhook.%s.svc" .Release.Namespace -}}
{{- $ca := genCA "imds-proxy-webhook-ca" 3650 -}}
{{- $cert := genSignedCert $service nil (list $service (printf "%s.cluster.local" $service)) 365 $ca -}}
{{- $_ := set .Values "_webhookTLS" (dict "ca" ($ca.Cert | b64enc) "cert" ($cert.Cert | b64enc) "key" ($cert.Key | b64enc)) -}}
{{- end -}}
{{- end -}}
{{- toYaml .Values._webhookTLS -}}
{{- end }}
