{#- Container mode: the broker runs in Docker from an image built locally (no registry),
    with the same configuration, data and log paths bound at the same place inside. #}
{%- from "mosquitto/map.jinja" import mosquitto with context %}
{%- set m = mosquitto %}
{%- set c = m.container %}
{%- set ctx = c.build_dir ~ '/context' %}
{%- set binds = [m.conf_dir ~ ':' ~ m.conf_dir ~ ':ro', m.data_dir ~ ':' ~ m.data_dir ~ ':rw'] %}
{%- if m.log_dest == 'file' %}
{%-   do binds.append(m.log_dir ~ ':' ~ m.log_dir ~ ':rw') %}
{%- endif %}
{#- certificate directories named in listeners and bridges, read-only #}
{%- set cert_dirs = [] %}
{%- for tls in (m.listeners | map(attribute='tls', default={}) | list)
               + (m.bridges.values() | map(attribute='tls', default={}) | list) %}
{%-   for f in ['cafile', 'certfile', 'keyfile'] %}
{%-     if tls and tls.get(f) %}
{%-       set d = salt['file.dirname'](tls[f]) %}
{%-       if d not in cert_dirs and d != m.conf_dir %}{% do cert_dirs.append(d) %}{% endif %}
{%-     endif %}
{%-   endfor %}
{%- endfor %}
{%- for d in cert_dirs %}
{%-   do binds.append(d ~ ':' ~ d ~ ':ro') %}
{%- endfor %}
include:
  - mosquitto.config
{%- if c.manage_docker %}
  - docker
{%- endif %}

{#- the package is installed for its binary, never run as a host service here #}
tributary-mosquitto-host-service-dead:
  service.dead:
    - name: {{ m.service }}
    - enable: False
    - require:
      - pkg: tributary-mosquitto-package-installed

{#- saltext-dockermod's states and the Docker SDK in Salt's own Python; reload_modules makes
    docker_image/docker_container available to the states below in the same run #}
tributary-mosquitto-dockermod-installed:
  pip.installed:
    - pkgs: {{ c.pip_pkgs | json }}
    - bin_env: {{ grains['pythonexecutable'] }}
    - reload_modules: True

tributary-mosquitto-image-build-dir:
  file.directory:
    - name: {{ c.build_dir }}
    - mode: '0755'
    - makedirs: True

tributary-mosquitto-image-context:
  cmd.script:
    - name: build-context {{ m.bin }} {{ ctx }} {{ m.user }} {{ m.group }}
    - source: salt://mosquitto/files/build-context.sh
    - shell: /bin/bash
    - stateful:
      - test_name: build-context --check {{ m.bin }} {{ ctx }} {{ m.user }} {{ m.group }}
    - require:
      - pkg: tributary-mosquitto-package-installed
      - file: tributary-mosquitto-image-build-dir

{#- docker_image.present does not rebuild an existing image: force a build when the context
    changed, and build once when the image is missing. #}
tributary-mosquitto-image-rebuilt:
  docker_image.present:
    - name: {{ c.image }}
    - tag: local
    - build: {{ ctx }}
    - force: True
    - onchanges:
      - cmd: tributary-mosquitto-image-context
    - require:
      - pip: tributary-mosquitto-dockermod-installed
{%- if c.manage_docker %}
      - tributary-docker-service-running
{%- endif %}

tributary-mosquitto-image-present:
  docker_image.present:
    - name: {{ c.image }}
    - tag: local
    - build: {{ ctx }}
    - require:
      - pip: tributary-mosquitto-dockermod-installed
      - cmd: tributary-mosquitto-image-context
      - tributary-mosquitto-image-rebuilt

tributary-mosquitto-container-running:
  docker_container.running:
    - name: {{ c.name }}
    - image: {{ c.image }}:local
    - command: -c {{ m.conf_dir }}/mosquitto.conf
    - network_mode: host
    - restart_policy: {{ c.restart_policy }}
    - binds: {{ binds | json }}
    - require:
      - tributary-mosquitto-image-present
      - file: tributary-mosquitto-config-file
      - service: tributary-mosquitto-host-service-dead
    - watch:
      - file: tributary-mosquitto-config-file
      - tributary-mosquitto-password-file
      - tributary-mosquitto-acl-file
      - tributary-mosquitto-image-rebuilt
