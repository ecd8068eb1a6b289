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
{%-   set broker = cfg.get('broker') %}
{%-   if broker is mapping and broker.get('password') is not none %}
{#-     The broker password goes to a 0600 file, never into the beacon config: beacon.present
        shows the whole config in its changes and the minion saves it in beacons.conf. #}
{%-     set pw_file = tributary.secrets_dir ~ '/' ~ name ~ '.broker-password' %}

tributary-gateway-beacon-{{ name }}-password:
  file.managed:
    - name: {{ pw_file }}
    - contents: {{ broker.password | string | yaml_dquote }}
    - mode: '0600'
    - makedirs: True
    - show_changes: False
    - require_in:
      - beacon: tributary-gateway-beacon-{{ name }}
{%-     set broker = broker | dictsort | list %}
{%-     set safe = {} %}
{%-     for k, v in broker if k != 'password' %}{%- do safe.update({k: v}) %}{%- endfor %}
{%-     do safe.update({'password_file': pw_file}) %}
{%-     do cfg.update({'broker': safe}) %}
{%-   endif %}

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
