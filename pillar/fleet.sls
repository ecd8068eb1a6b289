# Fleet-wide settings. Secrets here are placeholders: keep real ones in an encrypted pillar
# (e.g. the gpg renderer) or a separate, access-controlled pillar root.
tributary:
  master:
    file_roots:
      base:
        - /srv/tributary/salt/states
        - /srv/tributary/salt
  beacons:
    tributary_mqtt:
      broker: {host: 127.0.0.1, port: 1883, username: tributary, password: CHANGE-ME-gw}
      interval: 1
    tributary_health:
      interval: 30
