{%- from "mosquitto/map.jinja" import mosquitto with context %}
{%- set m = mosquitto %}
{%- set probe = m.listeners[0].get('address', '127.0.0.1') %}
{%- set probe = '127.0.0.1' if probe in ['0.0.0.0', '::', ''] else probe %}
include:
  - mosquitto.config

{#- Debian's sysvinit script needs /run/mosquitto (the systemd unit creates it itself). #}
tributary-mosquitto-run-dir:
  file.directory:
    - name: {{ m.run_dir }}
    - user: {{ m.user }}
    - group: {{ m.group }}
    - mode: '0755'

tributary-mosquitto-service-running:
  service.running:
    - name: {{ m.service }}
    - enable: True
    - init_delay: {{ m.init_delay }}
    - require:
      - file: tributary-mosquitto-run-dir
      - file: tributary-mosquitto-config-file
    - watch:
      - file: tributary-mosquitto-config-file
      - tributary-mosquitto-password-file
      - tributary-mosquitto-acl-file

{#- service.running/mod_watch report success even when the broker dies right after the
    (re)start: prove it listens. #}
tributary-mosquitto-service-listening:
  cmd.run:
    - name: >-
        for i in $(seq {{ m.validate.timeout * 10 }}); do
        (exec 3<>/dev/tcp/{{ probe }}/{{ m.listeners[0].port }}) 2>/dev/null && exit 0;
        sleep 0.1; done; echo "mosquitto is not listening on {{ m.listeners[0].port }}" >&2; exit 1
    - shell: /bin/bash
    - onchanges:
      - service: tributary-mosquitto-service-running
