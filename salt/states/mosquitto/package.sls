{%- from "mosquitto/map.jinja" import mosquitto with context %}
{#- Container mode needs the package too: its binary and libraries go into the locally built
    image, and it validates configurations and hashes passwords on the host. #}
tributary-mosquitto-package-installed:
  pkg.installed:
    - pkgs:
      - {{ mosquitto.pkg }}
      - {{ mosquitto.clients_pkg }}
