{#- A gateway: the Tributary package (gateway extra) in Salt's own Python, the custom
    modules from the fileserver, beacons from pillar (saved to minion.d/beacons.conf and
    live), refreshed. #}
{%- from "tributary/map.jinja" import tributary with context %}
tributary-gateway-package-installed:
  pip.installed:
    - name: {{ tributary.package.gateway }}
    - bin_env: {{ grains['pythonexecutable'] }}

tributary-gateway-modules-synced:
  saltutil.sync_all:
    - refresh: True
    - require:
      - pip: tributary-gateway-package-installed

{%- for name, cfg in tributary.gateway_beacons | dictsort %}

tributary-gateway-beacon-{{ name }}:
  beacon.present:
    - name: {{ name }}
    - save: True
{%-   for key, value in cfg.items() %}
    - {{ key }}: {{ value | json }}
{%-   endfor %}
    - require:
      - saltutil: tributary-gateway-modules-synced
    - require_in:
      - module: tributary-gateway-beacons-refreshed
{%- endfor %}

tributary-gateway-beacons-refreshed:
  module.run:
    - saltutil.refresh_beacons: []
    - onchanges:
      - saltutil: tributary-gateway-modules-synced
{%- for name in tributary.gateway_beacons %}
      - beacon: tributary-gateway-beacon-{{ name }}
{%- endfor %}
