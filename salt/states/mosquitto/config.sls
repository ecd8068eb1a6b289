{%- from "mosquitto/map.jinja" import mosquitto with context %}
{%- set m = mosquitto %}
include:
  - mosquitto.package

tributary-mosquitto-config-dir:
  file.directory:
    - name: {{ m.conf_dir }}
    - user: root
    - group: {{ m.group }}
    - mode: '0755'
    - makedirs: True
    - require:
      - pkg: tributary-mosquitto-package-installed

tributary-mosquitto-data-dir:
  file.directory:
    - name: {{ m.data_dir }}
    - user: {{ m.user }}
    - group: {{ m.group }}
    - mode: '0750'
    - makedirs: True
    - require:
      - pkg: tributary-mosquitto-package-installed

{%- if m.log_dest == 'file' %}

tributary-mosquitto-log-dir:
  file.directory:
    - name: {{ m.log_dir }}
    - user: {{ m.user }}
    - group: {{ m.group }}
    - mode: '0750'
    - makedirs: True
    - require:
      - pkg: tributary-mosquitto-package-installed
    - require_in:
      - file: tributary-mosquitto-config-file
{%- endif %}

tributary-mosquitto-validator:
  file.managed:
    - name: {{ m.tool_dir }}/mosquitto-validate
    - source: salt://mosquitto/files/validate.sh
    - mode: '0755'
    - makedirs: True

{%- if m.users %}
{%-   set lines = [] %}
{%-   for user, u in m.users | dictsort %}
{%-     do lines.append(user ~ ':' ~ u.password) %}
{%-   endfor %}
{%-   set plain = lines | join('\n') ~ '\n' %}
{#- The password file is hashed by mosquitto_passwd (salted, so not reproducible): it is
    rewritten only when the pillar credentials change, detected with a SHA-256 digest of them,
    prefixed with the minion id so equal credentials on two gateways differ. It is not keyed
    with a secret: the file is root-only (umask 077), and root on the gateway can read the
    plain credentials from its pillar anyway. #}
{%-   set digest = ('tributary-mosquitto:' ~ grains['id'] ~ ':' ~ plain) | sha256 %}

tributary-mosquitto-password-file:
  cmd.run:
    - name: >-
        set -e; umask 077; t=$(mktemp); trap 'rm -f "$t"' EXIT; cat > "$t";
        {{ m.passwd_bin }} -U "$t";
        install -m 0640 -o root -g {{ m.group }} "$t" {{ m.conf_dir }}/passwd;
        echo {{ digest }} > {{ m.conf_dir }}/.passwd.digest
    - stdin: {{ plain | yaml_dquote }}
    - hide_output: True
    - output_loglevel: quiet
    - unless: test -s {{ m.conf_dir }}/passwd && grep -qx {{ digest }} {{ m.conf_dir }}/.passwd.digest
    - require:
      - file: tributary-mosquitto-config-dir
    - require_in:
      - file: tributary-mosquitto-config-file
{%- else %}

tributary-mosquitto-password-file:
  file.absent:
    - names:
      - {{ m.conf_dir }}/passwd
      - {{ m.conf_dir }}/.passwd.digest
{%- endif %}

{%- if m.acl %}

tributary-mosquitto-acl-file:
  file.managed:
    - name: {{ m.conf_dir }}/acl
    - source: salt://mosquitto/files/acl.jinja
    - template: jinja
    - user: root
    - group: {{ m.group }}
    - mode: '0640'
    - require:
      - file: tributary-mosquitto-config-dir
    - require_in:
      - file: tributary-mosquitto-config-file
{%- else %}

tributary-mosquitto-acl-file:
  file.absent:
    - name: {{ m.conf_dir }}/acl
{%- endif %}

tributary-mosquitto-config-file:
  file.managed:
    - name: {{ m.conf_dir }}/mosquitto.conf
    - source: salt://mosquitto/files/mosquitto.conf.jinja
    - template: jinja
    - user: root
    - group: {{ m.group }}
    - mode: '0640'    # bridge passwords: root writes, the broker's group reads, nobody else
    - show_changes: False
{%- if m.validate.enabled %}
    # a broker is started with the candidate file on scratch ports; the file is replaced
    # (and the service restarted) only when it came up
    - check_cmd: {{ m.tool_dir }}/mosquitto-validate {{ m.bin }} {{ m.validate.timeout }}
{%- endif %}
    - require:
      - file: tributary-mosquitto-validator
      - file: tributary-mosquitto-data-dir
      - file: tributary-mosquitto-config-dir
