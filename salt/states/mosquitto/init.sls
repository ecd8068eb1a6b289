{#- Mosquitto: package mode (Debian's package and service) or container mode (Docker). #}
{%- from "mosquitto/map.jinja" import mosquitto with context %}
include:
{%- if mosquitto.mode == 'container' %}
  - mosquitto.container
{%- else %}
  - mosquitto.service
{%- endif %}
