{#- Docker engine from Debian's docker.io, daemon.json from pillar, the service. #}
{%- from "docker/map.jinja" import docker with context %}
tributary-docker-package-installed:
  pkg.installed:
    - name: {{ docker.pkg }}

tributary-docker-daemon-json:
  file.serialize:
    - name: {{ docker.config_file }}
    - serializer: json
    - dataset: {{ docker.daemon | json }}
    - makedirs: True
    - mode: '0644'
    - require:
      - pkg: tributary-docker-package-installed

{%- if docker.manage_service %}

tributary-docker-service-running:
  service.running:
    - name: {{ docker.service }}
    - enable: True
    - watch:
      - file: tributary-docker-daemon-json
{%- else %}

{#- dockerd is run by something else (e.g. a test harness): nothing to start #}
tributary-docker-service-running:
  test.nop:
    - require:
      - file: tributary-docker-daemon-json
{%- endif %}
