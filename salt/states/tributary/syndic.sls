{#- A syndic master: forwards to the top master and serves its gateways the same file tree
    as the top master (gateways sync custom modules and states from their own syndic
    master). The syndic host's salt-minion is a minion of the top master, so salt:// below
    is the top master's tree: it is mirrored (clean: True) into the syndic's file_roots. #}
{%- from "tributary/map.jinja" import tributary with context %}
{%- set s = tributary.syndic %}

{%- set served = salt['cp.list_master_dirs']() %}
{%- for d in s.mirror.dirs if d in served %}

tributary-syndic-file-tree-{{ d }}:
  file.recurse:
    - name: {{ s.mirror_dir }}/{{ d }}
    - source: salt://{{ d }}
    - clean: True
    - makedirs: True
    - require_in:
      - file: tributary-syndic-config
{%- endfor %}
{%- set served_files = salt['cp.list_master']() %}
{%- for f in s.mirror.files if f in served_files %}

tributary-syndic-file-tree-{{ f }}:
  file.managed:
    - name: {{ s.mirror_dir }}/{{ f }}
    - source: salt://{{ f }}
    - makedirs: True
    - require_in:
      - file: tributary-syndic-config
{%- endfor %}

{#- The syndic master's engines: tributary_keys publishes its accepted gateway keys upward;
    tributary_uplink carries Tributary's events and job returns to the top master where
    salt-syndic cannot (Salt 3008: uplink 'auto' turns it on from this host's Salt version). #}
{%- set engines = [{'tributary_keys': s['keys']}] %}
{%- set uplink = s.uplink.enabled %}
{%- if uplink == 'auto' %}
{%-   set uplink = (grains.get('saltversioninfo', [0])[0] | int) >= 3008 %}
{%- elif uplink is not sameas true and uplink is not sameas false %}
{{ raise('invalid pillar tributary:syndic:uplink:enabled: must be auto, true or false') }}
{%- endif %}
{%- set salt_syndic = {'syndic_event_forward_timeout': s.syndic_event_forward_timeout} %}
{%- if uplink %}
{%-   do engines.append({'tributary_uplink': s.uplink.config}) %}
{#-   the uplink carries events, returns and jobs' minion lists: salt-syndic passes jobs down #}
{%-   do salt_syndic.update(s.uplink.salt_syndic) %}
{%- endif %}
{#- Scale-out (README "Scale-out"): with tributary:syndic:relay set, this syndic master runs
    its own tributary_relay (scaleout role syndic) for its gateways; its syndic_id defaults to
    the one tributary_keys signs as. The file then holds Elasticsearch credentials: 0600. #}
{%- set relay = s.relay %}
{%- if relay %}
{%-   set so = {'role': 'syndic',
                'syndic_id': s['keys'].get('syndic_id') or grains['id']} %}
{%-   set relay = salt['slsutil.merge']({'scaleout': so}, relay, strategy='recurse') %}
{%-   do engines.append({'tributary_relay': relay}) %}

tributary-syndic-package-installed:
  pip.installed:
    - name: {{ tributary.package.master }}
    - bin_env: {{ grains['pythonexecutable'] }}
    - require_in:
      - file: tributary-syndic-config
{%- endif %}

tributary-syndic-config:
  file.serialize:
    - name: {{ s.config_dir }}/tributary-syndic.conf
    - serializer: yaml
    - makedirs: True
    - mode: '{{ '0600' if relay else '0644' }}'
    - show_changes: {{ not relay }}
    - dataset:
        syndic_master: {{ s.syndic_master | json }}
{%- for key, value in salt_syndic | dictsort %}
        {{ key }}: {{ value | json }}
{%- endfor %}
        engines: {{ engines | json }}
        file_roots:
          base:
            - {{ s.mirror_dir }}
{%- if s.manage_service %}

tributary-syndic-master-running:
  service.running:
    - name: {{ s.service }}
    - watch:
      - file: tributary-syndic-config

tributary-syndic-running:
  service.running:
    - name: {{ s.syndic_service }}
    - require:
      - service: tributary-syndic-master-running
    - watch:
      - file: tributary-syndic-config
{%- endif %}
