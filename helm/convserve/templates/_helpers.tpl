{{/* Names, labels and shared snippets. */}}

{{- define "convserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-scoped base name; components append -gateway / -triton (kept under 63 chars). */}}
{{- define "convserve.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 48 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 48 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "convserve.gateway.fullname" -}}{{ include "convserve.fullname" . }}-gateway{{- end -}}
{{- define "convserve.triton.fullname" -}}{{ include "convserve.fullname" . }}-triton{{- end -}}

{{- define "convserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "convserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: convserve
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "gateway"). */}}
{{- define "convserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "convserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "convserve.image" -}}
{{- $tag := default .ctx.Chart.AppVersion .image.tag -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ $tag }}
{{- end -}}
{{- end -}}

{{/* The gateway's Triton address: DNS of the headless Service, so that gRPC's
round_robin policy sees one address per ready Triton pod; in one-pod mode, the Triton
container beside it, on loopback. */}}
{{- define "convserve.tritonUrl" -}}
{{- if .Values.onePod.enabled -}}
127.0.0.1:{{ .Values.triton.ports.grpc }}
{{- else -}}
dns:///{{ include "convserve.triton.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}:{{ .Values.triton.ports.grpc }}
{{- end -}}
{{- end -}}

{{/* Container securityContext shared by every container: non-root, read-only root
filesystem, no capabilities, no privilege escalation. */}}
{{- define "convserve.containerSecurityContext" -}}
runAsNonRoot: true
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* A gRPC health probe of the gateway: (dict "ctx" $ "service" "liveness" "probe" .Values.gateway.livenessProbe).
Kubernetes' native gRPC probe speaks plaintext only; with TLS on, an exec probe
checks grpc.health.v1 over TLS with the certificate's CA instead. */}}
{{- define "convserve.gateway.grpcProbe" -}}
{{- $gw := .ctx.Values.gateway -}}
{{- if $gw.tls.enabled }}
exec:
  command:
    - python
    - -c
    - >-
      import sys, grpc;
      from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;
      creds = grpc.ssl_channel_credentials(open("{{ $gw.tls.mountPath }}/ca.crt", "rb").read());
      channel = grpc.secure_channel("127.0.0.1:{{ $gw.grpcPort }}", creds, options=[("grpc.ssl_target_name_override", "{{ $gw.tls.serverName }}")]);
      reply = g.HealthStub(channel).Check(h.HealthCheckRequest(service="{{ .service }}"), timeout={{ .probe.timeoutSeconds }});
      sys.exit(reply.status != h.HealthCheckResponse.SERVING)
{{- else }}
grpc:
  port: {{ $gw.grpcPort }}
  {{- if .service }}
  service: {{ .service | quote }}
  {{- end }}
{{- end }}
{{- with .probe }}
initialDelaySeconds: {{ .initialDelaySeconds }}
periodSeconds: {{ .periodSeconds }}
timeoutSeconds: {{ .timeoutSeconds }}
failureThreshold: {{ .failureThreshold }}
{{- end }}
{{- end -}}

{{/* Peer that may scrape metrics ports (Prometheus). */}}
{{- define "convserve.prometheusPeer" -}}
- namespaceSelector:
    {{- toYaml .Values.networkPolicy.prometheus.namespaceSelector | nindent 4 }}
  podSelector:
    {{- toYaml .Values.networkPolicy.prometheus.podSelector | nindent 4 }}
{{- end -}}

{{/* The pods that run the gateway: its own Deployment's, or Triton's in one-pod mode. */}}
{{- define "convserve.gateway.podComponent" -}}
{{- if .Values.onePod.enabled -}}triton{{- else -}}gateway{{- end -}}
{{- end -}}

{{/* Prefix of the gateway container's port and volume names: none in its own pod;
"gateway-" in Triton's, whose container already names ports grpc and metrics and a
volume tmp (a Service's named targetPort must be unique in the pod). */}}
{{- define "convserve.gateway.namePrefix" -}}
{{- if .Values.onePod.enabled -}}gateway-{{- end -}}
{{- end -}}

{{/* The gateway container, in its own Deployment or (one-pod mode) in Triton's pods:
(dict "ctx" $). In Triton's pod it runs as Triton's user (uid 1000): POSIX shared-memory
segments are created with mode 0600, so Triton can open the gateway's regions only as
the same user. It also mounts Triton's in-memory /dev/shm (the dshm volume). */}}
{{- define "convserve.gateway.container" -}}
{{- $ctx := .ctx -}}
{{- $gw := $ctx.Values.gateway -}}
{{- $onePod := $ctx.Values.onePod.enabled -}}
{{- $prefix := include "convserve.gateway.namePrefix" $ctx -}}
{{- $uid := ternary 1000 10001 $onePod -}}
- name: gateway
  image: {{ include "convserve.image" (dict "ctx" $ctx "image" $gw.image) | quote }}
  imagePullPolicy: {{ $gw.image.pullPolicy }}
  envFrom:
    - configMapRef:
        name: {{ include "convserve.gateway.fullname" $ctx }}
  ports:
    - name: {{ $prefix }}grpc
      containerPort: {{ $gw.grpcPort }}
      protocol: TCP
    - name: {{ $prefix }}metrics
      containerPort: {{ $gw.metricsPort }}
      protocol: TCP
  livenessProbe:
    {{- include "convserve.gateway.grpcProbe" (dict "ctx" $ctx "service" "liveness" "probe" $gw.livenessProbe) | trim | nindent 4 }}
  readinessProbe:
    {{- include "convserve.gateway.grpcProbe" (dict "ctx" $ctx "service" "" "probe" $gw.readinessProbe) | trim | nindent 4 }}
  lifecycle:
    preStop:
      # Endpoints and client resolvers drop the pod while it still serves; then
      # SIGTERM turns readiness NOT_SERVING and drains for drainGraceSeconds.
      exec:
        command: ["sleep", "{{ $gw.preStopSleepSeconds }}"]
  resources:
    {{- toYaml $gw.resources | nindent 4 }}
  securityContext:
    {{- include "convserve.containerSecurityContext" $ctx | nindent 4 }}
    runAsUser: {{ $uid }}
    runAsGroup: {{ $uid }}
  volumeMounts:
    # The root filesystem is read-only; libraries that want a scratch dir get this.
    - name: {{ $prefix }}tmp
      mountPath: /tmp
    {{- if $gw.tls.enabled }}
    - name: {{ $prefix }}tls
      mountPath: {{ $gw.tls.mountPath }}
      readOnly: true
    {{- end }}
    {{- if $onePod }}
    # Triton's in-memory /dev/shm: input and output tensors travel through it.
    - name: dshm
      mountPath: /dev/shm
    {{- end }}
{{- end -}}

{{/* The gateway container's own volumes (names as convserve.gateway.namePrefix says). */}}
{{- define "convserve.gateway.volumes" -}}
{{- $gw := .Values.gateway -}}
{{- $prefix := include "convserve.gateway.namePrefix" . -}}
- name: {{ $prefix }}tmp
  emptyDir:
    sizeLimit: 64Mi
{{- if $gw.tls.enabled }}
- name: {{ $prefix }}tls
  secret:
    secretName: {{ $gw.tls.secretName }}
{{- end }}
{{- end -}}
