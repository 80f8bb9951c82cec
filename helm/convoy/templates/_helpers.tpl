{{/* Name of every object: <release>-convoy, or the release name when it already says convoy. */}}
{{- define "convoy.fullname" -}}
{{- if contains "convoy" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-convoy" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "convoy.labels" -}}
app.kubernetes.io/name: convoy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "convoy.selectorLabels" -}}
app.kubernetes.io/name: convoy
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "convoy.replayName" -}}{{ include "convoy.fullname" . }}-replay{{- end -}}

{{- define "convoy.replaySecret" -}}
{{- .Values.replay.existingSecret | default (printf "%s-replay-password" (include "convoy.fullname" .)) -}}
{{- end -}}

{{/* redis:// URL of every shard: one per StatefulSet pod, through the headless Service's DNS. */}}
{{- define "convoy.shardUrls" -}}
{{- $name := include "convoy.replayName" . -}}
{{- $urls := list -}}
{{- range $i := until (int .Values.replay.shards) -}}
{{- $urls = append $urls (printf "redis://%s-%d.%s.%s.svc.%s:%d/0" $name $i $name $.Release.Namespace $.Values.clusterDomain (int $.Values.replay.port)) -}}
{{- end -}}
{{- join "," $urls -}}
{{- end -}}

{{- define "convoy.numCollectors" -}}
{{- mul (int .Values.carla.replicas) (int .Values.carla.serversPerWorker) -}}
{{- end -}}

{{/* The `convoy train` command line; the shard password travels as CONVOY_REPLAY_PASSWORD. */}}
{{- define "convoy.trainCommand" -}}
{{- $args := list "convoy" "train" "--config" .Values.train.config "run.ray_address=auto" -}}
{{- $args = append $args (printf "run.out_dir=%s" .Values.storage.uri) -}}
{{- $args = append $args (printf "collector.num_collectors=%s" (include "convoy.numCollectors" .)) -}}
{{- $args = append $args (printf "replay.shard_urls=%s" (include "convoy.shardUrls" .)) -}}
{{- $args = append $args "learner.resources=learner:1" -}}
{{- range .Values.train.extraArgs -}}
{{- $args = append $args . -}}
{{- end -}}
{{- $quoted := list -}}
{{- range $args -}}
{{- if regexMatch "^[A-Za-z0-9_./:=,@%+-]+$" . -}}
{{- $quoted = append $quoted . -}}
{{- else -}}
{{- $quoted = append $quoted (. | squote) -}}
{{- end -}}
{{- end -}}
{{- join " " $quoted -}}
{{- end -}}

{{- define "convoy.env" -}}
- name: CONVOY_REPLAY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "convoy.replaySecret" . }}
      key: password
{{- with .Values.storage.s3EndpointUrl }}
- name: CONVOY_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "convoy.containerSecurity" -}}
allowPrivilegeEscalation: false
capabilities:
  drop: ["ALL"]
{{- end -}}

{{/* The Ray cluster: shared by the RayJob (rayClusterSpec) and the long-lived RayCluster (spec). */}}
{{- define "convoy.rayClusterSpec" -}}
{{- $c := .Values.carla -}}
{{- if or (gt (int $c.minReplicas) (int $c.replicas)) (gt (int $c.replicas) (int $c.maxReplicas)) -}}
{{- fail (printf "carla: need minReplicas <= replicas <= maxReplicas, got %v <= %v <= %v" $c.minReplicas $c.replicas $c.maxReplicas) -}}
{{- end -}}
rayVersion: {{ .Values.rayVersion | quote }}
{{- if .Values.rayAuthToken }}
authOptions:
  mode: token
{{- end }}
enableInTreeAutoscaling: {{ .Values.autoscaling.enabled }}
{{- if .Values.autoscaling.enabled }}
autoscalerOptions:
  idleTimeoutSeconds: {{ .Values.autoscaling.idleTimeoutSeconds }}
{{- end }}
headGroupSpec:
  rayStartParams:
    dashboard-host: "0.0.0.0"
  # The learner asks for {learner: 1} (see convoy.trainCommand), so it lands on this GPU.
  resources:
    learner: "1"
  template:
    metadata:
      labels:
        {{- include "convoy.labels" . | nindent 8 }}
        app.kubernetes.io/component: head
    spec:
      {{- with .Values.serviceAccountName }}
      serviceAccountName: {{ . }}
      {{- end }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        runAsNonRoot: true
        runAsUser: 1000
        runAsGroup: 1000
        fsGroup: 1000
      {{- with .Values.head.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.head.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: ray-head
          image: "{{ .Values.image.learner.repository }}:{{ .Values.image.learner.tag }}"
          imagePullPolicy: {{ .Values.image.learner.pullPolicy }}
          securityContext:
            {{- include "convoy.containerSecurity" . | nindent 12 }}
          env:
            {{- include "convoy.env" . | nindent 12 }}
          {{- with .Values.storage.credentialsSecret }}
          envFrom:
            - secretRef:
                name: {{ . }}
          {{- end }}
          resources:
            requests:
              cpu: {{ .Values.head.resources.cpu | quote }}
              memory: {{ .Values.head.resources.memory | quote }}
              {{- if gt (int .Values.head.gpus) 0 }}
              nvidia.com/gpu: {{ .Values.head.gpus }}
              {{- end }}
            limits:
              cpu: {{ .Values.head.resources.cpu | quote }}
              memory: {{ .Values.head.resources.memory | quote }}
              {{- if gt (int .Values.head.gpus) 0 }}
              nvidia.com/gpu: {{ .Values.head.gpus }}
              {{- end }}
          volumeMounts:
            - name: shm
              mountPath: /dev/shm
            {{- if and .Values.storage.credentialsSecret .Values.storage.credentialsMountPath }}
            - name: storage-credentials
              mountPath: {{ .Values.storage.credentialsMountPath }}
              readOnly: true
            {{- end }}
      volumes:
        # Ray's object store lives in /dev/shm; the container default (64 MiB) is too small.
        - name: shm
          emptyDir:
            medium: Memory
        {{- if and .Values.storage.credentialsSecret .Values.storage.credentialsMountPath }}
        - name: storage-credentials
          secret:
            secretName: {{ .Values.storage.credentialsSecret }}
        {{- end }}
workerGroupSpecs:
  - groupName: carla
    replicas: {{ .Values.carla.replicas }}
    minReplicas: {{ .Values.carla.minReplicas }}
    maxReplicas: {{ .Values.carla.maxReplicas }}
    rayStartParams: {}
    # One slot per CARLA server: collectors ask for {carla: 1}.
    resources:
      carla: {{ .Values.carla.serversPerWorker | quote }}
    template:
      metadata:
        labels:
          {{- include "convoy.labels" . | nindent 10 }}
          app.kubernetes.io/component: carla-worker
      spec:
        {{- with .Values.serviceAccountName }}
        serviceAccountName: {{ . }}
        {{- end }}
        {{- with .Values.imagePullSecrets }}
        imagePullSecrets:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .Values.carla.nodeSelector }}
        nodeSelector:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        {{- with .Values.carla.tolerations }}
        tolerations:
          {{- toYaml . | nindent 10 }}
        {{- end }}
        containers:
          # The image runs as CARLA's own non-root user `carla`.
          - name: ray-worker
            image: "{{ .Values.image.carla.repository }}:{{ .Values.image.carla.tag }}"
            imagePullPolicy: {{ .Values.image.carla.pullPolicy }}
            securityContext:
              {{- include "convoy.containerSecurity" . | nindent 14 }}
            env:
              {{- include "convoy.env" . | nindent 14 }}
            resources:
              requests:
                cpu: {{ .Values.carla.resources.cpu | quote }}
                memory: {{ .Values.carla.resources.memory | quote }}
                nvidia.com/gpu: {{ .Values.carla.gpusPerWorker }}
              limits:
                cpu: {{ .Values.carla.resources.cpu | quote }}
                memory: {{ .Values.carla.resources.memory | quote }}
                nvidia.com/gpu: {{ .Values.carla.gpusPerWorker }}
            volumeMounts:
              - name: shm
                mountPath: /dev/shm
        volumes:
          - name: shm
            emptyDir:
              medium: Memory
{{- end -}}
