{#- Undo mosquitto: stop the broker (service or container), remove the files this formula
    manages. The Debian package stays unless mosquitto:clean:remove_package is true (its
    clients are used by other tooling). Persistent data is kept. #}
{%- from "mosquitto/map.jinja" import mosquitto with context %}
{%- set m = mosquitto %}
{%- if m.mode == 'container' %}

tributary-mosquitto-container-absent:
  docker_container.absent:
    - name: {{ m.container.name }}
    - force: True

tributary-mosquitto-image-absent:
  docker_image.absent:
    - images:
      - {{ m.container.image }}:local
    - require:
      - docker_container: tributary-mosquitto-container-absent
{%- else %}

tributary-mosquitto-service-dead:
  service.dead:
    - name: {{ m.service }}
    - enable: False
{%- endif %}

tributary-mosquitto-config-absent:
  file.absent:
    - names:
      - {{ m.conf_dir }}/mosquitto.conf
      - {{ m.conf_dir }}/passwd
      - {{ m.conf_dir }}/.passwd.digest
      - {{ m.conf_dir }}/acl
      - {{ m.tool_dir }}/mosquitto-validate
      - {{ m.container.build_dir }}
{%- if m.clean.remove_package %}

tributary-mosquitto-package-removed:
  pkg.removed:
    - pkgs:
      - {{ m.pkg }}
{%- endif %}
