{%- from "docker/map.jinja" import docker with context %}
{%- if docker.manage_service %}
tributary-docker-service-dead:
  service.dead:
    - name: {{ docker.service }}
    - enable: False
{%- endif %}

tributary-docker-daemon-json-absent:
  file.absent:
    - name: {{ docker.config_file }}
{%- if docker.clean.remove_package %}

tributary-docker-package-removed:
  pkg.removed:
    - name: {{ docker.pkg }}
{%- endif %}
