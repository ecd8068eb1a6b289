{#- The top master: Tributary (master extra) in Salt's Python, the relay engine's config and
    Elasticsearch credentials from pillar, order_masters for the syndics below it, the file
    roots every syndic master mirrors. #}
{%- from "tributary/map.jinja" import tributary with context %}
{%- set m = tributary.master %}
tributary-master-package-installed:
  pip.installed:
    - name: {{ tributary.package.master }}
    - bin_env: {{ grains['pythonexecutable'] }}

tributary-master-config:
  file.serialize:
    - name: {{ m.config_dir }}/tributary.conf
    - serializer: yaml
    - makedirs: True
    - mode: '0600'    # holds the Elasticsearch credentials
    - show_changes: False
    - dataset:
        order_masters: {{ m.order_masters | json }}
        syndic_wait: {{ m.syndic_wait | json }}
        file_roots: {{ m.file_roots | json }}
        engines:
          - tributary_relay: {{ m.relay | json }}
    - require:
      - pip: tributary-master-package-installed

{%- if m.manage_service %}

{#- engines and runners come from the fileserver (salt/_engines, salt/_runners) #}
tributary-master-engines-synced:
  cmd.run:
    - name: salt-run saltutil.sync_all
    - onchanges:
      - file: tributary-master-config
      - pip: tributary-master-package-installed

tributary-master-service-running:
  service.running:
    - name: {{ m.service }}
    - watch:
      - file: tributary-master-config
      - cmd: tributary-master-engines-synced
{%- endif %}
