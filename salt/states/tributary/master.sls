{#- The top master: Tributary (master extra) in Salt's Python, the relay engine's config and
    Elasticsearch credentials from pillar, order_masters for the syndics below it, the file
    roots every syndic master mirrors; with tributary:master:reactor:enabled, the reactor files
    (salt://reactor) and master.d/tributary-reactor.conf (reactor mapping + action table),
    removed again when not enabled. #}
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

{%- set r = m.reactor %}
{%- set reactor_conf = m.config_dir ~ '/tributary-reactor.conf' %}
{%- if r.enabled %}
{%-   set settings = {'actions': r.actions, 'renotify': r.renotify} %}
{%-   if r.notify %}{%- do settings.update({'notify': r.notify}) %}{%- endif %}
{%-   set reactor = [] %}
{%-   for rule in r.actions | sort %}
{%-     if not (rule is string and rule | regex_match('^([A-Za-z0-9_.:@-]{1,128})$')) %}
{{ raise('invalid pillar tributary:master:reactor:actions: ' ~ rule ~ ' is not a rule name') }}
{%-     endif %}
{%-     do reactor.append({'tributary/alert/' ~ rule ~ '/*': [r.dir ~ '/alert.sls']}) %}
{%-   endfor %}

tributary-master-reactor-files:
  file.recurse:
    - name: {{ r.dir }}
    - source: salt://reactor
    - clean: True
    - dir_mode: '0755'
    - file_mode: '0644'
    - makedirs: True

{#- the action table is checked by the package's own validate() before it is written #}
tributary-master-reactor-config-valid:
  cmd.run:
    - name: {{ grains['pythonexecutable'] }} -c "import json, sys; from saltext.tributary.reactor.actions import validate; ok, msg = validate(json.load(sys.stdin)); print(msg); sys.exit(0 if ok else 1)"
    - stdin: {{ settings | json | yaml_dquote }}
    - prereq:
      - file: tributary-master-reactor-config
    - require:
      - pip: tributary-master-package-installed

tributary-master-reactor-config:
  file.serialize:
    - name: {{ reactor_conf }}
    - serializer: yaml
    - makedirs: True
    - mode: '0600'    # may hold the upstream broker's password
    - show_changes: False
    - dataset:
        reactor: {{ reactor | json }}
        tributary_reactor: {{ settings | json }}
    - require:
      - file: tributary-master-reactor-files
{%- else %}

tributary-master-reactor-config:
  file.absent:
    - name: {{ reactor_conf }}

tributary-master-reactor-files:
  file.absent:
    - name: {{ r.dir }}
{%- endif %}

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
      - file: tributary-master-reactor-config
      - cmd: tributary-master-engines-synced
{%- endif %}
